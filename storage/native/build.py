"""cffi build script of ``storage._pagecodec`` (run by setup.py at install)."""
from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
int64_t pc_decode(int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                  uintptr_t, uintptr_t, uintptr_t);
void pc_scan(int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t);
uint64_t pc_xxh3_64(uintptr_t, int64_t, uintptr_t);
int64_t pc_encode(int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                  uintptr_t);
""")
ffibuilder.set_source("storage._pagecodec", (Path(__file__).parent / "pagecodec.c").read_text(),
                      extra_compile_args=["-O3"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
