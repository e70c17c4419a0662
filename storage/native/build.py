"""cffi build script of ``storage._pagecodec`` (run by setup.py at install):
the page loops (pagecodec.c) and the lazy-restore fault handler
(lazyfault.c) in one extension."""
from pathlib import Path

from cffi import FFI

here = Path(__file__).parent
ffibuilder = FFI()
ffibuilder.cdef("""
int64_t pc_decode(int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                  uintptr_t, uintptr_t, uintptr_t);
void pc_scan(int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t);
uint64_t pc_xxh3_64(uintptr_t, int64_t, uintptr_t);
int64_t pc_xxh3_64_many(int64_t, uintptr_t, int64_t, uintptr_t, uintptr_t, uintptr_t);
void pc_digest_update(int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t);
const char *pc_encode_fns(void);
int64_t pc_encode(int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                  uintptr_t);
int64_t pc_image_digest(int64_t, uintptr_t, uintptr_t, int64_t, uintptr_t, uintptr_t);
const char *lz_fn(int64_t);
int64_t lz_uffd_open(void);
int64_t lz_uffd_register(int64_t, uintptr_t, int64_t);
int64_t lz_uffd_unregister(int64_t, uintptr_t, int64_t);
uintptr_t lz_create(int64_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, int64_t, int64_t, uintptr_t,
                    int64_t, uintptr_t, uintptr_t, uintptr_t, const char *);
void lz_set_fatal(uintptr_t, int64_t, const char *, const char *, int64_t, int64_t);
int64_t lz_fill_now(uintptr_t, int64_t, int64_t);
int64_t lz_start(uintptr_t, int64_t);
void lz_started(uintptr_t);
void lz_join_background(uintptr_t);
void lz_stop(uintptr_t);
void lz_destroy(uintptr_t);
void lz_stats(uintptr_t, uintptr_t);
""")
ffibuilder.set_source("storage._pagecodec",
                      (here / "pagecodec.c").read_text() + "\n" + (here / "lazyfault.c").read_text(),
                      extra_compile_args=["-O3"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
