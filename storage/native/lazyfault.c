/* Lazy restore: a userfaultfd handler for guest RAM that needs no GIL.
 *
 * Guest RAM is registered with userfaultfd (missing mode).  Two threads made
 * here with pthread_create -- never Python threads, so no Python thread
 * holding the GIL can block them -- fill it from the store:
 *
 *   fault thread       reads fault messages from the userfaultfd and serves
 *                      each missing page at once (vCPU page walks and KVM's
 *                      own accesses through get_user_pages, and any host
 *                      thread of the VMM touching guest memory);
 *   background thread  fills every other page: first the pages the recent
 *                      checkpoints of the path changed (the likely working
 *                      set), then the rest in page order, in runs of up to
 *                      LZ_RUN pages per UFFDIO_COPY.
 *
 * Each has its own read-only SQLite connection (function pointers from the
 * libsqlite3 the Python sqlite3 module uses, the same way pagecodec.c takes
 * LZ4 from python-lz4) inside one read transaction opened before the guest
 * starts, and reads only the bytes of the blob it needs with incremental
 * BLOB I/O (pack_data is a rowid table: rowid = pack id).  The page index
 * is the store's own numpy arrays (blob per page; pack, offset, codec, base,
 * content hash and checksum per blob), which the Python side keeps alive.
 *
 * A page is populated only after its stored bytes pass their checksum, it
 * decodes to exactly one page and that page matches its content hash.  A
 * page that fails is never populated: the first failure is recorded (page,
 * blob, why), the page is made PROT_NONE and its waiters woken, so a vCPU on
 * it gets EFAULT from KVM_RUN instead of running on a wrong or zero page,
 * and the event fd tells the Python side to stop the machine.
 *
 * UFFDIO_COPY/ZEROPAGE are kernel writes: KVM's dirty log never sees them,
 * and they do not go through GuestMemory.write, so a populated page is not
 * dirty.  A guest write afterwards is logged as usual.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define LZ_PAGE 4096
#define LZ_RUN 64
#define LZ_BG 2                 /* background threads */
#define LZ_BG_NICE 5            /* their nice value at first ... */
#define LZ_BG_NICE_NS 50000000  /* ... for this long, then: */
#define LZ_BG_NICE_AFTER (-5)   /* above the vCPUs (where allowed: root) */
#define LZ_CHUNK 4096           /* pages a background thread takes at a time */
#define LZ_CACHE 256            /* whole packs a background thread keeps ... */
#define LZ_CACHE_BYTES (16 << 20)   /* ... up to this many bytes */

/* error kinds (lz_error) */
#define LZE_MISSING 1     /* blob not in the catalogue / pack row missing */
#define LZE_CHECKSUM 2    /* stored bytes fail their checksum */
#define LZE_DECODE 3      /* does not decode to one page */
#define LZE_HASH 4        /* decodes, but not to its content hash */
#define LZE_BASE 5        /* the delta's base is missing or damaged */
#define LZE_UFFD 6        /* UFFDIO_COPY/ZEROPAGE failed */
#define LZE_META 7        /* the blob's pack has damaged metadata (err_pack) */
#define LZE_DIGEST 8      /* the image's page maps do not add up to the checkpoint's digest */
#define LZE_MAP 9         /* a page map of the path is damaged (err_pack: its checkpoint) */
#define LZ_MAX_BLOB ((int64_t)1 << 25)   /* storage.validate.MAX_BLOB_ID */

#define LZ_MASK63 0x7FFFFFFFFFFFFFFFULL
#define LZ_FREED 255      /* codec of a slot prune() removed */

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_blob sqlite3_blob;
typedef int (*sq_open_fn)(const char *, sqlite3 **, int, const char *);
typedef int (*sq_close_fn)(sqlite3 *);
typedef int (*sq_exec_fn)(sqlite3 *, const char *, void *, void *, char **);
typedef int (*sq_busy_fn)(sqlite3 *, int);
typedef int (*sq_bopen_fn)(sqlite3 *, const char *, const char *, const char *, int64_t, int,
                           sqlite3_blob **);
typedef int (*sq_breopen_fn)(sqlite3_blob *, int64_t);
typedef int (*sq_bread_fn)(sqlite3_blob *, void *, int, int);
typedef int (*sq_bclose_fn)(sqlite3_blob *);
typedef int (*sq_bbytes_fn)(sqlite3_blob *);
typedef struct sqlite3_stmt sqlite3_stmt;
typedef int (*sq_prepare_fn)(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
typedef int (*sq_bind64_fn)(sqlite3_stmt *, int, int64_t);
typedef int (*sq_step_fn)(sqlite3_stmt *);
typedef int64_t (*sq_col64_fn)(sqlite3_stmt *, int);
typedef int (*sq_coltype_fn)(sqlite3_stmt *, int);
typedef int (*sq_finalize_fn)(sqlite3_stmt *);

typedef struct {
    int64_t pack;
    char *data;
    int size, cap;
    uint64_t used;
} lz_pack;

/* One pack of the directory (storage/lazy.py passes id, first, n, size and
 * mchk of every pack, checked as integers and without overlapping ids); its
 * metadata (the five arrays of its `packs` row) are read on first use, by
 * whichever thread needs one of its blobs first, and checked like
 * storage.packs.parse_pack_row does: the check value, lengths, offsets
 * increasing up to the size, delta bases older than their blob. */
typedef struct {
    int64_t pid, first, n, size, mchk;   /* size, mchk: read with the metadata */
    char *meta;          /* le64 pid, first, n; codecs n; bases 8n; hashes 16n; ends 4n; crcs 8n */
    volatile int state;  /* 0 not read yet, 1 read and checked, 2 damaged */
} lz_pk;

/* Where one blob is and how to check it. */
typedef struct {
    int64_t pack, start, end, base;
    int codec;
    const uint8_t *hash;
    uint64_t crc;
} lz_blob;

typedef struct {
    sqlite3 *db;
    sqlite3_blob *blob;
    int64_t pack;                 /* row the blob handle is on, or -1 */
    /* Reading single blobs (not whole packs), a delta's base comes through a
     * handle of its own: a run of deltas then keeps each handle on its row
     * (the base pack, the delta pack) instead of moving one between the two
     * for every page, which costs a seek and the walk to the offset. */
    sqlite3_blob *bblob;
    int64_t bpack;
    char *buf;                    /* stored bytes of one blob */
    char dict[LZ_PAGE];           /* a delta's base, decoded */
    char *run;                    /* LZ_RUN pages being decoded */
    /* Background threads read whole packs and keep the recent ones: in page
     * order, consecutive pages mostly come from the same base pack, and
     * deltas from the few packs of the newer checkpoints.  The fault thread
     * reads just the bytes of one blob (latency over throughput). */
    int cached, niced, tid;
    lz_pack cache[LZ_CACHE];
    int ncache;
    int64_t cache_bytes;
    uint64_t tick;
    int64_t last, prev;           /* directory entries of the last two packs looked up */
    /* The digest terms (storage.codec) of the pages of the chunks this
     * (background) source went over in page order, whoever placed them:
     * added up here instead of a second pass over the image (lz_finished
     * compares the total with the digest). */
    unsigned __int128 *term;      /* per page of the run being decoded */
    unsigned __int128 dsum;
} lz_src;

typedef int (*lz_dec_fn)(const char *, char *, int, int);
typedef int (*lz_dec_dict_fn)(const char *, char *, int, int, const char *, int);
typedef struct { uint64_t low64, high64; } lz_h128_t;
typedef lz_h128_t (*lz_h128_fn)(const void *, size_t);
typedef uint64_t (*lz_h64_fn)(const void *, size_t);

struct lz_ctx;
static void lz_finished(struct lz_ctx *c);

typedef struct lz_bgarg {
    struct lz_ctx *c;
    int k;
} lz_bgarg;

typedef struct lz_ctx {
    int uffd, evfd, stopfd;
    char *host;
    int64_t npages;
    /* The image (blob id per page, 0 = zero page) is built here, by the
     * check thread, from the path's page maps -- the pages below sys_hi
     * before the guest starts (lz_fill_now) -- so that nothing before the
     * guest's first instruction reads all of it. */
    int64_t *img;
    volatile int img_ready;       /* 1: img merged (img_ok) or failed (err is set) */
    volatile int img_ok;
    int64_t img_ns;               /* when it was merged, from lz_start */
    pthread_mutex_t img_lock;
    pthread_cond_t img_cond;
    int64_t sys_hi;               /* img[0, sys_hi) resolved before the start */
    const int64_t *mck, *mn;      /* the path's maps, oldest first: checkpoint, entries */
    int64_t nmaps, nrecent, recent_max;
    lz_pk *pk;                    /* the pack directory, by first blob id */
    int64_t *pk_first;            /* its first ids alone: the binary search stays in a few cache lines */
    int64_t npk;
    pthread_mutex_t pk_lock;      /* held while a pack's metadata are read */
    uint64_t digest_lo, digest_hi;
    uint64_t zero_lo, zero_hi;    /* the zero page's content hash, as stored */
    int64_t *hot;                 /* pages the newest maps change, newest first */
    int64_t nhot;
    int64_t *order;               /* the chunks of the page-order pass, the hottest first */
    int64_t nchunks;
    uint8_t *state;
    lz_dec_fn dec;
    lz_dec_dict_fn dec_dict;
    lz_h128_fn h128;
    lz_h64_fn h64;
    sq_open_fn sq_open;
    sq_close_fn sq_close;
    sq_exec_fn sq_exec;
    sq_busy_fn sq_busy;
    sq_bopen_fn sq_bopen;
    sq_breopen_fn sq_breopen;
    sq_bread_fn sq_bread;
    sq_bclose_fn sq_bclose;
    sq_bbytes_fn sq_bbytes;
    sq_prepare_fn sq_prepare;
    sq_bind64_fn sq_bind64;
    sq_step_fn sq_step;
    sq_col64_fn sq_col64;
    sq_coltype_fn sq_coltype;
    sq_finalize_fn sq_finalize;
    lz_src fsrc, bsrc[LZ_BG], csrc;
    pthread_t fault_thr, bg_thr[LZ_BG], check_thr;
    int fault_started, bg_started, check_started, background, eager;
    int64_t next_chunk, bg_left;
    volatile int go;              /* a vCPU is entering the guest (lz_started): stop making way */
    lz_bgarg bgarg[LZ_BG];
    volatile int stop;
    /* counters (atomics: both threads add) */
    int64_t populated, faults, fault_pages, bg_pages, zero_pages, eexist;
    int64_t bg_done_ns, t0_ns;
    volatile int bg_done;
    /* first failure */
    volatile int err;
    int64_t err_page, err_blob, err_pack;   /* err_pack: a map's checkpoint for LZE_MAP */
    int err_errno;
    /* What a host thread that touches a page that failed (PROT_NONE) gets
     * instead of a crash: this line on fatal_fd, then _exit(fatal_code)
     * (lz_set_fatal; formatted by lz_fail, written by lz_segv). */
    int64_t ckpt;
    char fpre[64], fsuf[32], fatal[512];
    int fatal_len, fatal_fd, fatal_code;
    pthread_mutex_t err_lock;
} lz_ctx;

/* Zeroed memory of `size` bytes straight from the kernel (NULL if none). */
static void *lz_zalloc(size_t size)
{
    void *p = mmap(NULL, size ? size : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void lz_zfree(void *p, size_t size)
{
    if (p)
        munmap(p, size ? size : 1);
}

static int64_t lz_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void lz_signal(lz_ctx *c)
{
    uint64_t one = 1;
    ssize_t r = write(c->evfd, &one, 8);
    (void)r;
}

/* Record the first failure; returns the kind. */
static const char *lz_why(int kind)
{
    switch (kind) {
    case LZE_MISSING: return "references a blob that is missing from the store";
    case LZE_CHECKSUM: return "stored bytes fail their checksum";
    case LZE_DECODE: return "does not decode to one page";
    case LZE_HASH: return "does not decode to its content hash";
    case LZE_BASE: return "its delta base is missing or damaged";
    case LZE_UFFD: return "could not be placed (UFFDIO_COPY failed)";
    case LZE_META: return "its pack has damaged metadata";
    default: return "failed";
    }
}

static int lz_fail(lz_ctx *c, int kind, int64_t page, int64_t blob, int err)
{
    pthread_mutex_lock(&c->err_lock);
    if (!c->err) {
        c->err_page = page;
        c->err_blob = blob;
        c->err_errno = err;
        const char *then = "; a VMM thread touched it, the restore stopped there";
        int n;
        if (kind == LZE_MAP)
            n = snprintf(c->fatal, sizeof c->fatal, "%scheckpoint %lld: the page map of checkpoint %lld is "
                         "damaged%s%s", c->fpre, (long long)c->ckpt, (long long)c->err_pack, then, c->fsuf);
        else if (kind == LZE_DIGEST)
            n = snprintf(c->fatal, sizeof c->fatal, "%scheckpoint %lld: its page maps do not match the "
                         "checkpoint's digest%s", c->fpre, (long long)c->ckpt, c->fsuf);
        else
            n = snprintf(c->fatal, sizeof c->fatal, "%scheckpoint %lld, page %lld (gpa %#llx), blob %lld: %s%s%s",
                         c->fpre, (long long)c->ckpt, (long long)page, (unsigned long long)page * LZ_PAGE,
                         (long long)blob, lz_why(kind), then, c->fsuf);
        c->fatal_len = n < 0 ? 0 : n < (int)sizeof c->fatal ? n : (int)sizeof c->fatal - 1;
        __atomic_store_n(&c->err, kind, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&c->err_lock);
    return kind;
}

/* ---- host threads on a page that failed ----
 * A vCPU on a PROT_NONE page gets EFAULT from KVM_RUN, but a host thread
 * (a Python VMM thread reading guest memory, with the GIL) gets SIGSEGV.
 * It cannot be given the page (it failed its checks) nor left waiting (it
 * holds the GIL the code that would stop the machine needs), so the
 * process reports the failure in one line and exits; the store is only
 * read by a lazy restore, and a checkpoint being written is rolled back by
 * SQLite as after a kill. */
#define LZ_LIVE 16
static lz_ctx *volatile lz_live[LZ_LIVE];
static struct sigaction lz_old_segv, lz_old_bus;
static pthread_mutex_t lz_sig_lock = PTHREAD_MUTEX_INITIALIZER;
static int lz_sig_installed;

static void lz_segv(int sig, siginfo_t *si, void *uc)
{
    char *a = (char *)si->si_addr;
    for (int i = 0; i < LZ_LIVE; i++) {
        lz_ctx *c = lz_live[i];
        if (!c || a < c->host || a >= c->host + c->npages * LZ_PAGE)
            continue;
        if (__atomic_load_n(&c->state[(a - c->host) / LZ_PAGE], __ATOMIC_ACQUIRE) == 2
            && __atomic_load_n(&c->err, __ATOMIC_ACQUIRE)) {
            ssize_t r = write(c->fatal_fd, c->fatal, (size_t)c->fatal_len);
            (void)r;
            _exit(c->fatal_code);
        }
    }
    struct sigaction *old = sig == SIGSEGV ? &lz_old_segv : &lz_old_bus;
    if (old->sa_flags & SA_SIGINFO) {
        old->sa_sigaction(sig, si, uc);
    } else if (old->sa_handler == SIG_DFL || old->sa_handler == SIG_IGN) {
        sigaction(sig, old, NULL);            /* the access faults again, as it would have */
    } else {
        old->sa_handler(sig);
    }
}

static void lz_live_add(lz_ctx *c)
{
    pthread_mutex_lock(&lz_sig_lock);
    if (!lz_sig_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = lz_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, &lz_old_segv) == 0 && sigaction(SIGBUS, &sa, &lz_old_bus) == 0)
            lz_sig_installed = 1;
    }
    for (int i = 0; i < LZ_LIVE; i++)
        if (!lz_live[i]) {
            lz_live[i] = c;
            break;
        }
    pthread_mutex_unlock(&lz_sig_lock);
}

static void lz_live_remove(lz_ctx *c)
{
    pthread_mutex_lock(&lz_sig_lock);
    for (int i = 0; i < LZ_LIVE; i++)
        if (lz_live[i] == c)
            lz_live[i] = NULL;
    pthread_mutex_unlock(&lz_sig_lock);
}

static int lz_src_open(lz_ctx *c, lz_src *s, const char *path)
{
    s->pack = s->bpack = -1;
    s->last = s->prev = -1;
    s->blob = s->bblob = NULL;
    s->buf = malloc(2 * LZ_PAGE + 64);
    s->run = malloc((size_t)LZ_RUN * LZ_PAGE);
    s->term = malloc((size_t)LZ_RUN * sizeof *s->term);
    if (!s->buf || !s->run || !s->term)
        return -1;
    /* SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX (one thread per connection) */
    if (c->sq_open(path, &s->db, 0x00000001 | 0x00008000, NULL) != 0)
        return -2;
    c->sq_busy(s->db, 10000);
    /* One read transaction for the whole lazy phase: every page comes from
     * the same snapshot of the store, whatever is committed meanwhile. */
    /* reads through a mapping of the file: one copy less than pread */
    c->sq_exec(s->db, "PRAGMA mmap_size = 2147418112", NULL, NULL, NULL);
    if (c->sq_exec(s->db, "BEGIN; SELECT count(*) FROM pack_data WHERE id = 0", NULL, NULL, NULL) != 0)
        return -3;
    return 0;
}

static void lz_src_close(lz_ctx *c, lz_src *s)
{
    if (s->blob)
        c->sq_bclose(s->blob);
    if (s->bblob)
        c->sq_bclose(s->bblob);
    s->blob = s->bblob = NULL;
    if (s->db) {
        c->sq_exec(s->db, "COMMIT", NULL, NULL, NULL);
        c->sq_close(s->db);
    }
    s->db = NULL;
    free(s->buf);
    free(s->run);
    free(s->term);
    s->buf = s->run = NULL;
    s->term = NULL;
    for (int i = 0; i < s->ncache; i++)
        free(s->cache[i].data);
    s->ncache = 0;
    s->cache_bytes = 0;
}

/* The whole of pack p, from the cache or read now (evicting the least
 * recently used packs past the budget); NULL if it cannot be read. */
static lz_pack *lz_pack_get(lz_ctx *c, lz_src *s, int64_t p)
{
    for (int i = 0; i < s->ncache; i++)
        if (s->cache[i].pack == p) {
            s->cache[i].used = ++s->tick;
            return &s->cache[i];
        }
    if (s->blob && s->pack != p && c->sq_breopen(s->blob, p) != 0) {
        c->sq_bclose(s->blob);
        s->blob = NULL;
    }
    if (!s->blob && c->sq_bopen(s->db, "main", "pack_data", "data", p, 0, &s->blob) != 0) {
        s->blob = NULL;
        s->pack = -1;
        return NULL;
    }
    s->pack = p;
    int size = c->sq_bbytes(s->blob), size_cap = 0;
    char *data = NULL;
    while (s->ncache && (s->ncache == LZ_CACHE || s->cache_bytes + size > LZ_CACHE_BYTES)) {
        int old = 0;
        for (int i = 1; i < s->ncache; i++)
            if (s->cache[i].used < s->cache[old].used)
                old = i;
        s->cache_bytes -= s->cache[old].size;
        /* keep one evicted buffer that is big enough: a fresh one would be
         * faulted in page by page */
        if (!data && s->cache[old].cap >= size) {
            data = s->cache[old].data;
            size_cap = s->cache[old].cap;
        } else {
            free(s->cache[old].data);
        }
        s->cache[old] = s->cache[--s->ncache];
    }
    if (!data) {
        size_cap = size > 0 ? size : 1;
        if (!(data = malloc((size_t)size_cap)))
            return NULL;
    }
    if (c->sq_bread(s->blob, data, size, 0) != 0) {
        free(data);
        return NULL;
    }
    lz_pack *e = &s->cache[s->ncache++];
    e->pack = p;
    e->data = data;
    e->size = size;
    e->cap = size_cap;
    e->used = ++s->tick;
    s->cache_bytes += size;
    return e;
}

static uint64_t lz_ld64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint32_t lz_ld32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Integer columns of the row `id` that `sql` selects (one '?', ncol
 * columns), read here rather than by the Python side: they follow the big
 * arrays in their rows, so reading them walks the row's overflow pages.
 * 0 when the row is there and every column is an integer. */
static int lz_ints(lz_ctx *c, lz_src *s, const char *sql, int64_t id, int ncol, int64_t *out)
{
    sqlite3_stmt *st = NULL;
    int ok = c->sq_prepare(s->db, sql, -1, &st, NULL) == 0 && st && c->sq_bind64(st, 1, id) == 0
             && c->sq_step(st) == 100;                     /* SQLITE_ROW */
    for (int i = 0; ok && i < ncol; i++) {
        ok = c->sq_coltype(st, i) == 1;                    /* SQLITE_INTEGER */
        out[i] = ok ? c->sq_col64(st, i) : 0;
    }
    if (st)
        c->sq_finalize(st);
    return ok ? 0 : -1;
}

/* Read and check the metadata of directory entry k with s's connection
 * (called under pk_lock); 1 when good, 2 when damaged. */
static int lz_load_pack(lz_ctx *c, lz_src *s, lz_pk *k)
{
    static const char *cols[5] = {"codecs", "bases", "hashes", "ends", "crcs"};
    const int64_t n = k->n, width[5] = {1, 8, 16, 4, 8};
    size_t total = 24 + (size_t)n * 37, off = 24;
    char *m = malloc(total);
    if (!m)
        return 2;
    int64_t head[3] = {k->pid, k->first, k->n}, sm[2];
    memcpy(m, head, 24);
    if (lz_ints(c, s, "SELECT size, mchk FROM packs WHERE id = ?", k->pid, 2, sm) || sm[0] < 0 || sm[1] < 0) {
        free(m);
        return 2;
    }
    k->size = sm[0];
    k->mchk = sm[1];
    for (int i = 0; i < 5; i++) {
        sqlite3_blob *h = NULL;
        if (c->sq_bopen(s->db, "main", "packs", cols[i], k->pid, 0, &h) != 0) {
            if (h)
                c->sq_bclose(h);
            free(m);
            return 2;
        }
        int len = c->sq_bbytes(h);
        int ok = len == n * width[i] && c->sq_bread(h, m + off, len, 0) == 0;
        c->sq_bclose(h);
        if (!ok) {
            free(m);
            return 2;
        }
        off += (size_t)len;
    }
    int good = (c->h64(m, total) & LZ_MASK63) == (uint64_t)k->mchk;
    const char *bases = m + 24 + n, *ends = m + 24 + 25 * n;
    int64_t prev = 0;
    for (int64_t j = 0; good && j < n; j++) {
        int64_t e = lz_ld32(ends + 4 * j), base = (int64_t)lz_ld64(bases + 8 * j);
        if (e < prev || base < 0 || base >= k->first + j)
            good = 0;
        prev = e;
    }
    if (!good || prev != k->size) {
        free(m);
        return 2;
    }
    k->meta = m;
    return 1;
}

/* Where blob b is (its pack's metadata read now if need be): 0, or
 * LZE_MISSING (no pack holds it, or prune freed it) or LZE_META (its pack's
 * metadata are damaged; err_pack says which). */
static int lz_find(lz_ctx *c, lz_src *s, int64_t b, lz_blob *o)
{
    int64_t lo = 0, hi = c->npk;             /* the last entry with first <= b */
    if (s->last >= 0 && c->pk[s->last].first <= b && b < c->pk[s->last].first + c->pk[s->last].n) {
        lo = s->last;
    } else if (s->prev >= 0 && c->pk[s->prev].first <= b && b < c->pk[s->prev].first + c->pk[s->prev].n) {
        lo = s->prev;                        /* page order alternates base and delta packs */
        s->prev = s->last;
        s->last = lo;
    } else {
        const int64_t *f = c->pk_first;
        while (hi - lo > 1) {
            int64_t mid = (lo + hi) / 2;
            if (f[mid] <= b)
                lo = mid;
            else
                hi = mid;
        }
        if (!c->npk || b < c->pk[lo].first || b >= c->pk[lo].first + c->pk[lo].n)
            return LZE_MISSING;
        s->prev = s->last;
        s->last = lo;
    }
    lz_pk *k = &c->pk[lo];
    int st = __atomic_load_n(&k->state, __ATOMIC_ACQUIRE);
    if (!st) {
        pthread_mutex_lock(&c->pk_lock);
        st = k->state;
        if (!st) {
            st = lz_load_pack(c, s, k);
            __atomic_store_n(&k->state, st, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&c->pk_lock);
    }
    if (st != 1) {
        pthread_mutex_lock(&c->err_lock);
        if (!c->err)
            c->err_pack = k->pid;
        pthread_mutex_unlock(&c->err_lock);
        return LZE_META;
    }
    const int64_t n = k->n, j = b - k->first;
    const char *m = k->meta + 24;
    o->codec = (uint8_t)m[j];
    if (o->codec == LZ_FREED)
        return LZE_MISSING;
    o->pack = k->pid;
    o->base = (int64_t)lz_ld64(m + n + 8 * j);
    o->hash = (const uint8_t *)m + 9 * n + 16 * j;
    o->start = j ? lz_ld32(m + 25 * n + 4 * (j - 1)) : 0;
    o->end = lz_ld32(m + 25 * n + 4 * j);
    o->crc = lz_ld64(m + 29 * n + 8 * j);
    return 0;
}

/* The stored bytes of blob bl (*at: in s->buf or in a cached pack); with
 * `check`, against their checksum.  0 or an error kind.  Pages are read
 * unchecked: the decoded page's content hash is what proves it right, and
 * LZ4's safe decoder takes any input; the checksum is looked at only when
 * the page fails, to say whether the stored bytes are what is damaged. */
static int lz_read_blob(lz_ctx *c, lz_src *s, const lz_blob *bl, const char **at, int *len, int check,
                        int base)
{
    int64_t p = bl->pack, st = bl->start, n = bl->end - bl->start;
    if (p < 0 || n < 0 || n > 2 * LZ_PAGE)
        return LZE_MISSING;
    if (s->cached) {
        lz_pack *e = lz_pack_get(c, s, p);
        if (!e || st + n > e->size)
            return LZE_MISSING;
        if (check && c->h64(e->data + st, (size_t)n) != bl->crc)
            return LZE_CHECKSUM;
        *at = e->data + st;
        *len = (int)n;
        return 0;
    }
    sqlite3_blob **h = base ? &s->bblob : &s->blob;
    int64_t *hp = base ? &s->bpack : &s->pack;
    if (*h && *hp != p) {
        if (c->sq_breopen(*h, p) != 0) {
            c->sq_bclose(*h);               /* an aborted handle: start again */
            *h = NULL;
        }
    }
    if (!*h) {
        if (c->sq_bopen(s->db, "main", "pack_data", "data", p, 0, h) != 0) {
            *h = NULL;
            *hp = -1;
            return LZE_MISSING;
        }
    }
    *hp = p;
    if (c->sq_bread(*h, s->buf, (int)n, (int)st) != 0)
        return LZE_MISSING;
    if (check && c->h64(s->buf, (size_t)n) != bl->crc)
        return LZE_CHECKSUM;
    *at = s->buf;
    *len = (int)n;
    return 0;
}

static int lz_digest_ok(lz_ctx *c, const char *page, const uint8_t *w)
{
    lz_h128_t v = c->h128(page, LZ_PAGE);
    for (int k = 0; k < 8; k++) {
        if (w[k] != (uint8_t)(v.high64 >> (56 - 8 * k)) || w[8 + k] != (uint8_t)(v.low64 >> (56 - 8 * k)))
            return 0;
    }
    return 1;
}

/* Decode blob bl (raw or plain LZ4), stored as len bytes at src, into out. */
static int lz_plain(const lz_ctx *c, const char *src, const lz_blob *bl, int len, char *out)
{
    switch (bl->codec) {
    case 0:
        if (len != LZ_PAGE)
            return LZE_DECODE;
        memcpy(out, src, LZ_PAGE);
        return 0;
    case 1:
        return c->dec(src, out, len, LZ_PAGE) == LZ_PAGE ? 0 : LZE_DECODE;
    default:
        return LZE_DECODE;
    }
}

/* Decode page `page` into out (unchecked); 1 for a zero page (out
 * untouched), 0 when decoded, else an error kind. */
static int lz_decode_raw(lz_ctx *c, lz_src *s, int64_t page, char *out, lz_blob *bl, int check)
{
    int64_t b = c->img[page];
    int len, r;
    const char *at;
    lz_blob ba;
    if (b == 0)
        return 1;
    if (b < 0)
        return LZE_MISSING;
    if ((r = lz_find(c, s, b, bl)) != 0)
        return r;
    if (bl->codec == 2) {                   /* LZ4 delta against its base */
        int64_t a = bl->base;
        if (a <= 0 || lz_find(c, s, a, &ba) != 0 || ba.codec == 2)
            return LZE_BASE;
        if ((r = lz_read_blob(c, s, &ba, &at, &len, check, 1)) != 0
            || (r = lz_plain(c, at, &ba, len, s->dict)) != 0)
            return LZE_BASE;
        if (check && !lz_digest_ok(c, s->dict, ba.hash))
            return LZE_BASE;
        if ((r = lz_read_blob(c, s, bl, &at, &len, check, 0)) != 0)
            return r;
        if (c->dec_dict(at, out, len, LZ_PAGE, s->dict, LZ_PAGE) != LZ_PAGE)
            return LZE_DECODE;
    } else {
        if ((r = lz_read_blob(c, s, bl, &at, &len, check, 0)) != 0)
            return r;
        if ((r = lz_plain(c, at, bl, len, out)) != 0)
            return r;
    }
    return 0;
}

/* Page p's term of the checkpoint's digest (storage.codec: a sum of one
 * term per non-zero page, from its blob's content hash h), as
 * lz_check_loop adds it up. */
static unsigned __int128 lz_term(const lz_ctx *c, int64_t p, const uint8_t *h)
{
    uint64_t lo, hi;
    memcpy(&lo, h, 8);
    memcpy(&hi, h + 8, 8);
    if (lo == c->zero_lo && hi == c->zero_hi)
        return 0;
    uint64_t k = (uint64_t)p * 0x9E3779B97F4A7C15ULL;
    return ((unsigned __int128)fmix64(hi ^ (k + 0x632BE59BD9B4E019ULL)) << 64) | fmix64(lo ^ k);
}

/* Decode page `page` into out; 1 for a zero page (out untouched), 0 when
 * decoded and checked (its content hash), else an error kind (recorded by
 * the caller): on a failure the page is decoded again with every check,
 * to name what is damaged. */
static int lz_decode_page(lz_ctx *c, lz_src *s, int64_t page, char *out, int64_t *blob,
                          unsigned __int128 *term)
{
    lz_blob bl;
    *blob = c->img[page];
    int r = lz_decode_raw(c, s, page, out, &bl, 0);
    if (r == 1 || (r == 0 && lz_digest_ok(c, out, bl.hash))) {
        *term = r ? 0 : lz_term(c, page, bl.hash);
        return r;
    }
    if (r == LZE_MISSING || r == LZE_META)
        return r;
    int again = lz_decode_raw(c, s, page, out, &bl, 1);
    return again > 1 ? again : r ? r : LZE_HASH;
}

static void lz_wake(lz_ctx *c, int64_t page, int64_t n)
{
    struct uffdio_range r = {(uint64_t)(uintptr_t)(c->host + page * LZ_PAGE), (uint64_t)n * LZ_PAGE};
    ioctl(c->uffd, UFFDIO_WAKE, &r);
}

/* Stop the guest from ever running on page `page`: it stays unpopulated,
 * becomes PROT_NONE (a retried access by KVM fails with EFAULT), and its
 * waiters are woken to see that. */
static void lz_poison(lz_ctx *c, int64_t page)
{
    __atomic_store_n(&c->state[page], 2, __ATOMIC_RELEASE);
    mprotect(c->host + page * LZ_PAGE, LZ_PAGE, PROT_NONE);
    lz_wake(c, page, 1);
    lz_signal(c);
}

/* Place n pages at `page` (decoded at src, or zero pages when src is NULL).
 * A page some other thread placed first (EEXIST) counts as placed: its
 * waiters are woken, which the kernel does not do on EEXIST.  A page that
 * cannot be placed (ENOMEM, ...) is poisoned like a damaged one. */
static int lz_place(lz_ctx *c, int64_t page, int64_t n, const char *src, int64_t *counter)
{
    int64_t done = 0;
    while (done < n) {
        int64_t left = n - done;
        char *dst = c->host + (page + done) * LZ_PAGE;
        int64_t got;
        int rc;
        if (src) {
            struct uffdio_copy cp = {(uint64_t)(uintptr_t)dst, (uint64_t)(uintptr_t)(src + done * LZ_PAGE),
                                     (uint64_t)left * LZ_PAGE, 0, 0};
            rc = ioctl(c->uffd, UFFDIO_COPY, &cp);
            got = cp.copy;
        } else {
            struct uffdio_zeropage zp = {{(uint64_t)(uintptr_t)dst, (uint64_t)left * LZ_PAGE}, 0, 0};
            rc = ioctl(c->uffd, UFFDIO_ZEROPAGE, &zp);
            got = zp.zeropage;
        }
        if (rc == 0) {
            got = left * LZ_PAGE;
        } else if (got > 0) {
            /* partial: go on from where it stopped */
        } else if (errno == EEXIST || got == -EEXIST) {
            lz_wake(c, page + done, 1);
            __atomic_store_n(&c->state[page + done], 1, __ATOMIC_RELEASE);
            __atomic_fetch_add(&c->eexist, 1, __ATOMIC_RELAXED);
            done += 1;
            continue;
        } else if ((errno == EAGAIN || got == -EAGAIN) && !c->stop) {
            continue;                        /* the mm changed under us: retry */
        } else {
            int e = errno;
            lz_fail(c, LZE_UFFD, page + done, c->img[page + done], e);
            lz_poison(c, page + done);
            return LZE_UFFD;
        }
        int64_t k = got / LZ_PAGE;
        for (int64_t i = 0; i < k; i++)
            __atomic_store_n(&c->state[page + done + i], 1, __ATOMIC_RELEASE);
        __atomic_fetch_add(&c->populated, k, __ATOMIC_RELAXED);
        __atomic_fetch_add(counter, k, __ATOMIC_RELAXED);
        if (!src)
            __atomic_fetch_add(&c->zero_pages, k, __ATOMIC_RELAXED);
        done += k;
    }
    return 0;
}

/* Wait until the image is complete; 0 when it failed or the handler stops. */
static int lz_image_wait(lz_ctx *c)
{
    if (!__atomic_load_n(&c->img_ready, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&c->img_lock);
        while (!c->img_ready && !c->stop)
            pthread_cond_wait(&c->img_cond, &c->img_lock);
        pthread_mutex_unlock(&c->img_lock);
    }
    /* after another page's failure the others are still served: the machine
     * is being stopped, but a host thread may still read them meanwhile */
    return c->img_ready && c->img_ok;
}

static void lz_image_set(lz_ctx *c)
{
    pthread_mutex_lock(&c->img_lock);
    __atomic_store_n(&c->img_ready, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&c->img_cond);
    pthread_mutex_unlock(&c->img_lock);
}

static int lz_map_fail(lz_ctx *c, int64_t i)
{
    pthread_mutex_lock(&c->err_lock);
    if (!c->err)
        c->err_pack = c->mck[i];
    pthread_mutex_unlock(&c->err_lock);
    lz_fail(c, LZE_MAP, -1, -1, 0);
    lz_signal(c);
    return LZE_MAP;
}

/* Map i of the path, whole: le64 checkpoint, pages, blobs (what its check
 * value covers), checked (check value, pages increasing and in range, blob
 * ids in range); NULL when damaged. */
static char *lz_read_map(lz_ctx *c, lz_src *s, int64_t i)
{
    static const char *cols[2] = {"pages", "blobs"};
    const int64_t n = c->mn[i];
    int64_t chk;
    if (lz_ints(c, s, "SELECT chk FROM maps WHERE ckpt = ?", c->mck[i], 1, &chk))
        return NULL;
    char *m = malloc(8 + 16 * (size_t)n);
    if (!m)
        return NULL;
    memcpy(m, &c->mck[i], 8);
    for (int k = 0; k < 2; k++) {
        sqlite3_blob *h = NULL;
        int ok = c->sq_bopen(s->db, "main", "maps", cols[k], c->mck[i], 0, &h) == 0
            && c->sq_bbytes(h) == 8 * n && c->sq_bread(h, m + 8 + 8 * n * k, (int)(8 * n), 0) == 0;
        if (h)
            c->sq_bclose(h);
        if (!ok) {
            free(m);
            return NULL;
        }
    }
    if ((c->h64(m, 8 + 16 * (size_t)n) & LZ_MASK63) != (uint64_t)chk) {
        free(m);
        return NULL;
    }
    const int64_t *pg = (const int64_t *)(m + 8), *bl = pg + n;
    for (int64_t j = 0; j < n; j++)
        if (pg[j] < 0 || pg[j] >= c->npages || (j && pg[j] <= pg[j - 1]) || bl[j] < 0 || bl[j] >= LZ_MAX_BLOB) {
            free(m);
            return NULL;
        }
    return m;
}

/* The entries of map i for pages [0, hi) into img, read on their own:
 * pages are sorted and distinct, so they are among its first hi entries
 * (the system area, before the guest starts; the whole map's check value
 * is checked by the check thread just after). */
static int lz_resolve(lz_ctx *c, lz_src *s, int64_t i, int64_t hi)
{
    const int64_t n = c->mn[i], k = n < hi ? n : hi;
    sqlite3_blob *h = NULL;
    int64_t *buf = malloc(16 * (size_t)(k > 0 ? k : 1));
    if (!buf)
        return -1;
    int ok = 1;
    for (int col = 0; ok && col < 2 && k > 0; col++) {
        h = NULL;
        ok = c->sq_bopen(s->db, "main", "maps", col ? "blobs" : "pages", c->mck[i], 0, &h) == 0
             && c->sq_bbytes(h) == 8 * n && c->sq_bread(h, buf + col * k, (int)(8 * k), 0) == 0;
        if (h)
            c->sq_bclose(h);
    }
    for (int64_t j = 0; ok && j < k && buf[j] < hi; j++) {
        if (buf[j] < 0 || (j && buf[j] <= buf[j - 1]) || buf[k + j] < 0 || buf[k + j] >= LZ_MAX_BLOB)
            ok = 0;
        else
            c->img[buf[j]] = buf[k + j];
    }
    free(buf);
    return ok ? 0 : -1;
}

static int lz_cmp64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The whole image from the path's maps, oldest first, and the hot list from
 * the newest nrecent of them (never the base: it is all of memory): its
 * first recent_max pages, filled one by one first, and the order of the
 * chunks of the page-order pass by how many of them each holds. */
static int lz_build_image(lz_ctx *c, lz_src *s)
{
    char **keep = calloc((size_t)(c->nmaps > 0 ? c->nmaps : 1), sizeof *keep);
    int r = 0;
    if (!keep) {
        lz_map_fail(c, 0);
        lz_image_set(c);
        return LZE_MAP;
    }
    for (int64_t i = 0; i < c->nmaps && !c->stop; i++) {
        char *m = lz_read_map(c, s, i);
        if (!m) {
            r = lz_map_fail(c, i);
            break;
        }
        const int64_t n = c->mn[i], *pg = (const int64_t *)(m + 8), *bl = pg + n;
        for (int64_t j = 0; j < n; j++)
            c->img[pg[j]] = bl[j];
        if (i > 0 && i >= c->nmaps - c->nrecent)
            keep[i] = m;
        else
            free(m);
    }
    if (!r && c->nrecent > 0) {
        uint8_t *seen = lz_zalloc((size_t)c->npages);
        int64_t *count = calloc((size_t)c->nchunks, 8);
        c->hot = malloc(8 * (size_t)(c->recent_max > 0 ? c->recent_max : 1));
        if (seen && c->hot && count) {
            for (int64_t i = c->nmaps - 1; i > 0 && i >= c->nmaps - c->nrecent; i--) {
                if (!keep[i])
                    continue;
                const int64_t n = c->mn[i], *pg = (const int64_t *)(keep[i] + 8);
                for (int64_t j = 0; j < n; j++)
                    if (!seen[pg[j]]) {
                        seen[pg[j]] = 1;
                        count[pg[j] / LZ_CHUNK]++;
                        if (c->nhot < c->recent_max)
                            c->hot[c->nhot++] = pg[j];
                    }
            }
            /* the chunks by how many of those pages they hold, most first (ties
             * in page order): a working set that is not scattered over all of
             * memory is then filled early, at the page-order pass's cost */
            for (int64_t i = 0; i < c->nchunks; i++)
                c->order[i] = ((int64_t)(LZ_CHUNK - count[i]) << 40) | i;
            qsort(c->order, (size_t)c->nchunks, 8, lz_cmp64);
            for (int64_t i = 0; i < c->nchunks; i++)
                c->order[i] &= ((int64_t)1 << 40) - 1;
        }
        lz_zfree(seen, (size_t)c->npages);
        free(count);
    }
    for (int64_t i = 0; i < c->nmaps; i++)
        free(keep[i]);
    free(keep);
    c->img_ok = !r && !c->stop;
    c->img_ns = lz_now() - c->t0_ns;
    lz_image_set(c);
    return r;
}

/* Serve one page (fault path): decode and place it, or poison it. */
static int lz_serve(lz_ctx *c, lz_src *s, int64_t page, int64_t *counter)
{
    uint8_t st = __atomic_load_n(&c->state[page], __ATOMIC_ACQUIRE);
    if (st == 1) {                           /* placed since the fault was queued */
        lz_wake(c, page, 1);
        return 0;
    }
    if (st == 2) {
        lz_wake(c, page, 1);
        return 0;
    }
    int64_t blob;
    int r;
    if (page >= c->sys_hi && !lz_image_wait(c)) {
        lz_poison(c, page);                  /* the image failed (err is set) or we stop */
        return LZE_MAP;
    }
    r = lz_decode_page(c, s, page, s->run, &blob, s->term);
    if (r > 1) {
        lz_fail(c, r, page, blob, 0);
        lz_poison(c, page);
        return r;
    }
    return lz_place(c, page, 1, r == 1 ? NULL : s->run, counter);
}

static void *lz_fault_loop(void *arg)
{
    lz_ctx *c = arg;
    struct uffd_msg msg[16];
    struct pollfd pf[2] = {{c->uffd, POLLIN, 0}, {c->stopfd, POLLIN, 0}};
    while (!c->stop) {
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pf[1].revents)
            break;
        ssize_t n = read(c->uffd, msg, sizeof msg);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            break;
        }
        for (ssize_t i = 0; i < n / (ssize_t)sizeof msg[0]; i++) {
            if (msg[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t a = msg[i].arg.pagefault.address;
            int64_t page = (int64_t)((a - (uint64_t)(uintptr_t)c->host) / LZ_PAGE);
            if (a < (uint64_t)(uintptr_t)c->host || page >= c->npages)
                continue;
            __atomic_fetch_add(&c->faults, 1, __ATOMIC_RELAXED);
            lz_serve(c, &c->fsrc, page, &c->fault_pages);
        }
    }
    return NULL;
}

/* The digest term of page p, from its blob's content hash in the catalogue
 * (a page someone else placed); 0 or an error kind (recorded here). */
static int lz_account(lz_ctx *c, lz_src *s, int64_t p)
{
    int64_t b = c->img[p];
    lz_blob bl;
    int r;
    if (!b)
        return 0;
    if (b < 0 || (r = lz_find(c, s, b, &bl)) != 0) {
        lz_fail(c, b < 0 ? LZE_MISSING : r, p, b, 0);
        lz_signal(c);
        return b < 0 ? LZE_MISSING : r;
    }
    s->dsum += lz_term(c, p, bl.hash);
    return 0;
}

/* Fill pages [lo, hi) that are still missing, in runs of one kind.
 * ``account``: add the digest term of every page of the range to s->dsum,
 * whoever placed it (the chunks of the page-order pass cover every page
 * once: their terms add up to the image's digest, which lz_finished
 * compares -- no separate pass over the image). */
static int lz_fill_range(lz_ctx *c, lz_src *s, int64_t lo, int64_t hi, int account)
{
    int64_t p = lo;
    while (p < hi && !c->stop && !__atomic_load_n(&c->err, __ATOMIC_ACQUIRE)) {
        if (s->niced && (__atomic_load_n(&c->go, __ATOMIC_RELAXED) || lz_now() - c->t0_ns > LZ_BG_NICE_NS)) {
            /* A vCPU is in the guest (or LZ_BG_NICE_NS passed): now ahead of
             * the vCPUs.  While pages are missing the guest runs fault to
             * fault (~10x slower), so the sooner the fill is done the sooner
             * it runs at full speed.  Unprivileged: back to 0.  (Looked at
             * every run, not every chunk: a chunk takes 10-20 ms.) */
            if (setpriority(PRIO_PROCESS, (id_t)s->tid, LZ_BG_NICE_AFTER))
                setpriority(PRIO_PROCESS, (id_t)s->tid, 0);
            s->niced = 0;
        }
        if (__atomic_load_n(&c->state[p], __ATOMIC_ACQUIRE)) {
            int r = account ? lz_account(c, s, p) : 0;
            if (r)
                return r;
            p++;
            continue;
        }
        int zero = c->img[p] == 0;
        int64_t n = 0;
        while (p + n < hi && n < LZ_RUN && !__atomic_load_n(&c->state[p + n], __ATOMIC_ACQUIRE)
               && (c->img[p + n] == 0) == zero) {
            if (!zero) {
                int64_t blob;
                int r = lz_decode_page(c, s, p + n, s->run + n * LZ_PAGE, &blob, s->term + n);
                if (r) {
                    if (r == 1)
                        break;
                    /* place what decoded so far, then stop at the damage */
                    if (n)
                        lz_place(c, p, n, s->run, &c->bg_pages);
                    lz_fail(c, r, p + n, blob, 0);
                    lz_poison(c, p + n);
                    return r;
                }
            }
            n++;
        }
        if (n == 0) {                        /* a zero page inside a non-zero run's check */
            p++;
            continue;
        }
        int r = lz_place(c, p, n, zero ? NULL : s->run, &c->bg_pages);
        if (r)
            return r;
        if (account && !zero)               /* placed here or, racing, by the fault thread */
            for (int64_t i = 0; i < n; i++)
                s->dsum += s->term[i];
        p += n;
    }
    return 0;
}

/* Background thread k of LZ_BG: its share of the recent pages, then chunks
 * of LZ_CHUNK pages taken in page order (both threads move through memory
 * together); the last one to finish says done. */
static void *lz_bg_loop(void *arg)
{
    lz_bgarg *a = arg;
    lz_ctx *c = a->c;
    lz_src *s = &c->bsrc[a->k];
    /* below the VMM while it starts the vCPUs (the first LZ_BG_NICE_NS):
     * time to the first instruction is what a lazy restore is for (an
     * eager fill, with no vCPU running, is not slowed by this) */
    s->tid = (int)syscall(SYS_gettid);
    if (c->eager) {                         /* nothing to make way for: the restore waits for this */
        if (setpriority(PRIO_PROCESS, (id_t)s->tid, LZ_BG_NICE_AFTER))
            setpriority(PRIO_PROCESS, (id_t)s->tid, 0);
    } else {
        setpriority(PRIO_PROCESS, (id_t)s->tid, LZ_BG_NICE);
        s->niced = 1;
    }
    if (!lz_image_wait(c)) {
        lz_finished(c);
        return NULL;
    }
    /* recent pages are scattered over memory and so over the base's packs:
     * read just their blobs (whole packs would be read again and again) */
    s->cached = 0;
    for (int64_t i = a->k; i < c->nhot && !c->stop && !c->err; i += LZ_BG)
        if (lz_fill_range(c, s, c->hot[i], c->hot[i] + 1, 0))
            break;
    s->cached = 1;
    while (!c->stop && !c->err) {
        int64_t i = __atomic_fetch_add(&c->next_chunk, 1, __ATOMIC_RELAXED);
        if (i >= c->nchunks)
            break;
        int64_t lo = c->order[i] * LZ_CHUNK;
        if (lz_fill_range(c, s, lo, lo + LZ_CHUNK < c->npages ? lo + LZ_CHUNK : c->npages, 1))
            break;
    }
    /* the packs it kept are not needed any more */
    for (int i = 0; i < s->ncache; i++)
        free(s->cache[i].data);
    s->ncache = 0;
    s->cache_bytes = 0;
    lz_finished(c);
    return NULL;
}

/* The pass that ends the fill (the last of the background threads and the
 * check thread to finish): done, unless something failed or it was stopped. */
static void lz_finished(lz_ctx *c)
{
    if (__atomic_sub_fetch(&c->bg_left, 1, __ATOMIC_ACQ_REL) == 0) {
        if (c->background && !c->err && !c->stop) {
            /* the page-order pass went over every page once, each thread
             * adding the terms of its chunks: their total is the image's */
            unsigned __int128 sum = 0;
            for (int k = 0; k < LZ_BG; k++)
                sum += c->bsrc[k].dsum;
            if ((uint64_t)sum != c->digest_lo || (uint64_t)(sum >> 64) != c->digest_hi)
                lz_fail(c, LZE_DIGEST, -1, -1, 0);
        }
        if (c->background && !c->err && !c->stop) {
            c->bg_done_ns = lz_now() - c->t0_ns;
            __atomic_store_n(&c->bg_done, 1, __ATOMIC_RELEASE);
        }
        lz_signal(c);
    }
}

/* The check thread merges the image from the page maps (lz_build_image).
 * The image's page maps must add up to the checkpoint's digest
 * (storage.codec: a sum of one term per non-zero page, from its blob's
 * content hash), as a materialize checks before returning a byte.  That
 * needs every referenced pack's metadata, so it is done beside the guest,
 * not before it starts: by the fill threads as they go (lz_fill_range), or,
 * without them (tests: every page from a fault), in a pass here.  The pages
 * themselves are checked one by one as they are served (checksum, content
 * hash). */
static void *lz_check_loop(void *arg)
{
    lz_ctx *c = arg;
    lz_src *s = &c->csrc;
    unsigned __int128 sum = 0;
    int64_t p = 0;
    if (!c->eager)                           /* behind the VMM's start */
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), LZ_BG_NICE);
    if (lz_build_image(c, s)) {
        lz_finished(c);
        return NULL;
    }
    if (c->background) {
        /* the fill threads add the digest's terms up as they go over every
         * page in page order (lz_fill_range; lz_finished compares), so no
         * second pass over the image: only without them (tests) is it here */
        lz_finished(c);
        return NULL;
    }
    for (p = 0; p < c->npages && !c->stop && !__atomic_load_n(&c->err, __ATOMIC_ACQUIRE); p++) {
        int64_t b = c->img[p];
        lz_blob bl;
        int r;
        if (!b)
            continue;
        if (b < 0 || (r = lz_find(c, s, b, &bl)) != 0) {
            lz_fail(c, b < 0 ? LZE_MISSING : r, p, b, 0);
            lz_signal(c);
            break;
        }
        uint64_t lo, hi;
        memcpy(&lo, bl.hash, 8);
        memcpy(&hi, bl.hash + 8, 8);
        if (lo == c->zero_lo && hi == c->zero_hi)
            continue;
        uint64_t k = (uint64_t)p * 0x9E3779B97F4A7C15ULL;
        sum += ((unsigned __int128)fmix64(hi ^ (k + 0x632BE59BD9B4E019ULL)) << 64) | fmix64(lo ^ k);
    }
    if (p == c->npages && ((uint64_t)sum != c->digest_lo || (uint64_t)(sum >> 64) != c->digest_hi)) {
        lz_fail(c, LZE_DIGEST, -1, -1, 0);
        lz_signal(c);
    }
    lz_finished(c);
    return NULL;
}

/* ---- the interface (storage/lazy.py) ---- */

/* A userfaultfd for missing-page faults, kernel faults included (KVM's
 * get_user_pages): no UFFD_USER_MODE_ONLY.  -errno on failure. */
int64_t lz_uffd_open(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    struct uffdio_api api = {UFFD_API, 0, 0};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* Register [addr, addr + len) for missing faults; 0 or -errno. */
int64_t lz_uffd_register(int64_t fd, uintptr_t addr, int64_t len)
{
    struct uffdio_register reg = {{(uint64_t)addr, (uint64_t)len}, UFFDIO_REGISTER_MODE_MISSING, 0};
    if (ioctl((int)fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    if (!(reg.ioctls & ((uint64_t)1 << _UFFDIO_COPY)) || !(reg.ioctls & ((uint64_t)1 << _UFFDIO_ZEROPAGE)))
        return -EOPNOTSUPP;
    return 0;
}

int64_t lz_uffd_unregister(int64_t fd, uintptr_t addr, int64_t len)
{
    struct uffdio_range r = {(uint64_t)addr, (uint64_t)len};
    return ioctl((int)fd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

/* lz_create's function table, by name: the caller asks lz_fn(i) for the name
 * of entry i (NULL past the end) and puts that function's address there, so
 * neither side holds a positional list the other could silently disagree
 * with (as the encoder's pc_encode_fns); here each name is tied to its slot
 * by a designated initializer. */
enum { LZF_DEC, LZF_DEC_DICT, LZF_H128, LZF_H64, LZF_OPEN, LZF_CLOSE, LZF_EXEC, LZF_BUSY, LZF_BOPEN,
       LZF_BREOPEN, LZF_BREAD, LZF_BCLOSE, LZF_BBYTES, LZF_PREPARE, LZF_BIND64, LZF_STEP, LZF_COL64,
       LZF_COLTYPE, LZF_FINALIZE, LZF_COUNT };
static const char *const LZ_FN_NAMES[LZF_COUNT] = {
    [LZF_DEC] = "LZ4_decompress_safe", [LZF_DEC_DICT] = "LZ4_decompress_safe_usingDict",
    [LZF_H128] = "XXH3_128bits", [LZF_H64] = "XXH3_64bits",
    [LZF_OPEN] = "sqlite3_open_v2", [LZF_CLOSE] = "sqlite3_close_v2", [LZF_EXEC] = "sqlite3_exec",
    [LZF_BUSY] = "sqlite3_busy_timeout", [LZF_BOPEN] = "sqlite3_blob_open",
    [LZF_BREOPEN] = "sqlite3_blob_reopen", [LZF_BREAD] = "sqlite3_blob_read",
    [LZF_BCLOSE] = "sqlite3_blob_close", [LZF_BBYTES] = "sqlite3_blob_bytes",
    [LZF_PREPARE] = "sqlite3_prepare_v2", [LZF_BIND64] = "sqlite3_bind_int64", [LZF_STEP] = "sqlite3_step",
    [LZF_COL64] = "sqlite3_column_int64", [LZF_COLTYPE] = "sqlite3_column_type",
    [LZF_FINALIZE] = "sqlite3_finalize",
};

const char *lz_fn(int64_t i)
{
    return i >= 0 && i < LZF_COUNT ? LZ_FN_NAMES[i] : NULL;
}

/* args: see storage/lazy.py (LazyImage.__init__) for the order.  dir_: three
 * int64 arrays of npk entries (pack id, first blob id, blob count), sorted
 * by first id, ranges not overlapping; digest_: the checkpoint's digest
 * (low, high); fns_: the table lz_fn() names. */
uintptr_t lz_create(int64_t uffd, int64_t evfd, uintptr_t host, int64_t npages, uintptr_t maps_,
                    int64_t nmaps, int64_t nrecent, int64_t recent_max, uintptr_t dir_, int64_t npk,
                    uintptr_t digest_, uintptr_t state, uintptr_t fns_, const char *path)
{
    const uintptr_t *maps = (const uintptr_t *)maps_;
    const uintptr_t *dir = (const uintptr_t *)dir_, *fns = (const uintptr_t *)fns_;
    const uint64_t *digest = (const uint64_t *)digest_;
    lz_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return 0;
    c->pk = calloc(npk > 0 ? (size_t)npk : 1, sizeof *c->pk);
    c->pk_first = calloc(npk > 0 ? (size_t)npk : 1, 8);
    /* untouched zero pages until written: O(1) now.  mmap, not calloc: once
     * glibc's mmap threshold has grown past this size (it follows the sizes
     * freed), calloc serves it from the heap and clears it, O(memory). */
    c->img = lz_zalloc((size_t)npages * 8);
    c->nchunks = (npages + LZ_CHUNK - 1) / LZ_CHUNK;
    c->order = malloc(8 * (size_t)(c->nchunks > 0 ? c->nchunks : 1));
    if (!c->pk || !c->img || !c->pk_first || !c->order) {
        free(c->pk);
        free(c->pk_first);
        free(c->order);
        lz_zfree(c->img, (size_t)npages * 8);
        free(c);
        return 0;
    }
    for (int64_t i = 0; i < c->nchunks; i++)
        c->order[i] = i;                     /* page order until the hot pages re-order it */
    c->mck = (const int64_t *)maps[0];
    c->mn = (const int64_t *)maps[1];
    c->nmaps = nmaps;
    c->nrecent = nrecent;
    c->recent_max = recent_max;
    for (int64_t i = 0; i < npk; i++) {
        c->pk[i].pid = ((const int64_t *)dir[0])[i];
        c->pk[i].first = ((const int64_t *)dir[1])[i];
        c->pk[i].n = ((const int64_t *)dir[2])[i];
        c->pk_first[i] = c->pk[i].first;
    }
    c->npk = npk;
    c->digest_lo = digest[0];
    c->digest_hi = digest[1];
    c->uffd = (int)uffd;
    c->evfd = (int)evfd;
    c->stopfd = eventfd(0, EFD_CLOEXEC);
    c->host = (char *)host;
    c->npages = npages;
    c->state = (uint8_t *)state;
    c->dec = (lz_dec_fn)fns[LZF_DEC];
    c->dec_dict = (lz_dec_dict_fn)fns[LZF_DEC_DICT];
    c->h128 = (lz_h128_fn)fns[LZF_H128];
    c->h64 = (lz_h64_fn)fns[LZF_H64];
    c->sq_open = (sq_open_fn)fns[LZF_OPEN];
    c->sq_close = (sq_close_fn)fns[LZF_CLOSE];
    c->sq_exec = (sq_exec_fn)fns[LZF_EXEC];
    c->sq_busy = (sq_busy_fn)fns[LZF_BUSY];
    c->sq_bopen = (sq_bopen_fn)fns[LZF_BOPEN];
    c->sq_breopen = (sq_breopen_fn)fns[LZF_BREOPEN];
    c->sq_bread = (sq_bread_fn)fns[LZF_BREAD];
    c->sq_bclose = (sq_bclose_fn)fns[LZF_BCLOSE];
    c->sq_bbytes = (sq_bbytes_fn)fns[LZF_BBYTES];
    c->sq_prepare = (sq_prepare_fn)fns[LZF_PREPARE];
    c->sq_bind64 = (sq_bind64_fn)fns[LZF_BIND64];
    c->sq_step = (sq_step_fn)fns[LZF_STEP];
    c->sq_col64 = (sq_col64_fn)fns[LZF_COL64];
    c->sq_coltype = (sq_coltype_fn)fns[LZF_COLTYPE];
    c->sq_finalize = (sq_finalize_fn)fns[LZF_FINALIZE];
    c->t0_ns = lz_now();
    snprintf(c->fpre, sizeof c->fpre, "error: ");
    snprintf(c->fsuf, sizeof c->fsuf, "\n");
    c->fatal_fd = 2;
    c->fatal_code = 1;
    {   /* the zero page's content hash, in the byte order the catalogue stores */
        static const char zero[LZ_PAGE];
        lz_h128_t z = c->h128(zero, LZ_PAGE);
        uint8_t w[16];
        for (int k = 0; k < 8; k++) {
            w[k] = (uint8_t)(z.high64 >> (56 - 8 * k));
            w[8 + k] = (uint8_t)(z.low64 >> (56 - 8 * k));
        }
        memcpy(&c->zero_lo, w, 8);
        memcpy(&c->zero_hi, w + 8, 8);
    }
    pthread_mutex_init(&c->err_lock, NULL);
    pthread_mutex_init(&c->pk_lock, NULL);
    pthread_mutex_init(&c->img_lock, NULL);
    pthread_cond_init(&c->img_cond, NULL);
    int bad = c->stopfd < 0 || lz_src_open(c, &c->fsrc, path) || lz_src_open(c, &c->csrc, path);
    for (int k = 0; k < LZ_BG; k++) {
        c->bsrc[k].cached = 1;
        bad = bad || lz_src_open(c, &c->bsrc[k], path);
    }
    if (bad) {
        lz_src_close(c, &c->fsrc);
        lz_src_close(c, &c->csrc);
        for (int k = 0; k < LZ_BG; k++)
            lz_src_close(c, &c->bsrc[k]);
        if (c->stopfd >= 0)
            close(c->stopfd);
        free(c->pk);
        free(c->pk_first);
        lz_zfree(c->img, (size_t)npages * 8);
        free(c->order);
        free(c);
        return 0;
    }
    lz_live_add(c);
    return (uintptr_t)c;
}

/* How a host thread's touch of a failed page is reported (see lz_segv):
 * the line prefix + message + suffix, to fd, then _exit(code). */
void lz_set_fatal(uintptr_t c_, int64_t ckpt, const char *prefix, const char *suffix, int64_t fd, int64_t code)
{
    lz_ctx *c = (lz_ctx *)c_;
    c->ckpt = ckpt;
    snprintf(c->fpre, sizeof c->fpre, "%s", prefix);
    snprintf(c->fsuf, sizeof c->fsuf, "%s", suffix);
    c->fatal_fd = (int)fd;
    c->fatal_code = (int)code;
}

/* Populate pages [lo, hi) now, on the caller's thread (the system area,
 * before the vCPUs start).  0 or an error kind. */
int64_t lz_fill_now(uintptr_t c_, int64_t lo, int64_t hi)
{
    lz_ctx *c = (lz_ctx *)c_;
    if (lo != 0 || hi > c->npages || hi < 0)
        return LZE_MAP;
    for (int64_t i = 0; i < c->nmaps; i++)
        if (lz_resolve(c, &c->fsrc, i, hi))
            return lz_map_fail(c, i);
    c->sys_hi = hi;
    return lz_fill_range(c, &c->fsrc, lo, hi, 0);
}

/* Start the fault thread and (background != 0) the background fill;
 * background == 2: an eager fill (no vCPU runs meanwhile: no yielding). */
int64_t lz_start(uintptr_t c_, int64_t background)
{
    lz_ctx *c = (lz_ctx *)c_;
    c->t0_ns = lz_now();
    if (pthread_create(&c->fault_thr, NULL, lz_fault_loop, c))
        return -1;
    pthread_setname_np(c->fault_thr, "lazy-fault");   /* as profilers and top show them */
    c->fault_started = 1;
    c->background = background != 0;
    c->eager = background == 2;
    c->bg_left = background ? LZ_BG + 1 : 1;
    if (pthread_create(&c->check_thr, NULL, lz_check_loop, c)) {
        c->stop = 1;
        return -3;
    }
    pthread_setname_np(c->check_thr, "lazy-check");
    c->check_started = 1;
    if (background) {
        for (int k = 0; k < LZ_BG; k++) {
            c->bgarg[k].c = c;
            c->bgarg[k].k = k;
            if (pthread_create(&c->bg_thr[k], NULL, lz_bg_loop, &c->bgarg[k])) {
                c->stop = 1;                 /* the ones started end at once */
                c->bg_started = k;
                return -2;
            }
            char name[16];
            snprintf(name, sizeof name, "lazy-fill%d", k);
            pthread_setname_np(c->bg_thr[k], name);
            c->bg_started = k + 1;
        }
    }
    return 0;
}

/* Wait for the background fill to end (it ends by itself, on a failure or
 * on lz_stop). */
/* A vCPU thread is about to enter the guest for the first time: the
 * background threads stop making way for the start (they would after
 * LZ_BG_NICE_NS anyway). */
void lz_started(uintptr_t c_)
{
    lz_ctx *c = (lz_ctx *)c_;
    __atomic_store_n(&c->go, 1, __ATOMIC_RELAXED);
}

void lz_join_background(uintptr_t c_)
{
    lz_ctx *c = (lz_ctx *)c_;
    for (int k = 0; k < c->bg_started; k++)
        pthread_join(c->bg_thr[k], NULL);
    c->bg_started = 0;
}

/* Stop both threads and wait for them. */
void lz_stop(uintptr_t c_)
{
    lz_ctx *c = (lz_ctx *)c_;
    uint64_t one = 1;
    lz_live_remove(c);
    c->stop = 1;
    ssize_t r = write(c->stopfd, &one, 8);
    (void)r;
    pthread_mutex_lock(&c->img_lock);
    pthread_cond_broadcast(&c->img_cond);
    pthread_mutex_unlock(&c->img_lock);
    lz_join_background(c_);
    if (c->check_started) {
        pthread_join(c->check_thr, NULL);
        c->check_started = 0;
    }
    if (c->fault_started) {
        pthread_join(c->fault_thr, NULL);
        c->fault_started = 0;
    }
}

/* Free everything (threads must be stopped). */
void lz_destroy(uintptr_t c_)
{
    lz_ctx *c = (lz_ctx *)c_;
    lz_src_close(c, &c->fsrc);
    lz_src_close(c, &c->csrc);
    for (int k = 0; k < LZ_BG; k++)
        lz_src_close(c, &c->bsrc[k]);
    close(c->stopfd);
    pthread_mutex_destroy(&c->err_lock);
    pthread_mutex_destroy(&c->pk_lock);
    pthread_mutex_destroy(&c->img_lock);
    pthread_cond_destroy(&c->img_cond);
    for (int64_t i = 0; i < c->npk; i++)
        free(c->pk[i].meta);
    free(c->pk);
    free(c->pk_first);
    lz_zfree(c->img, (size_t)c->npages * 8);
    free(c->hot);
    free(c->order);
    free(c);
}

/* out[0..13]: populated, faults, fault_pages, bg_pages, zero_pages, eexist,
 * bg_done, bg_done_ns, err, err_page, err_blob, err_errno, err_pack, the
 * image's merge time (ns from the start; 0 until merged). */
void lz_stats(uintptr_t c_, uintptr_t out_)
{
    lz_ctx *c = (lz_ctx *)c_;
    int64_t *o = (int64_t *)out_;
    o[0] = __atomic_load_n(&c->populated, __ATOMIC_RELAXED);
    o[1] = __atomic_load_n(&c->faults, __ATOMIC_RELAXED);
    o[2] = __atomic_load_n(&c->fault_pages, __ATOMIC_RELAXED);
    o[3] = __atomic_load_n(&c->bg_pages, __ATOMIC_RELAXED);
    o[4] = __atomic_load_n(&c->zero_pages, __ATOMIC_RELAXED);
    o[5] = __atomic_load_n(&c->eexist, __ATOMIC_RELAXED);
    o[6] = __atomic_load_n(&c->bg_done, __ATOMIC_ACQUIRE);
    o[7] = c->bg_done_ns;
    pthread_mutex_lock(&c->err_lock);
    o[8] = c->err;
    o[9] = c->err_page;
    o[10] = c->err_blob;
    o[11] = c->err_errno;
    o[12] = c->err_pack;
    o[13] = __atomic_load_n(&c->img_ready, __ATOMIC_ACQUIRE) ? c->img_ns : 0;
    pthread_mutex_unlock(&c->err_lock);
}
