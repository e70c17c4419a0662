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

typedef struct {
    int64_t pack;
    char *data;
    int size, cap;
    uint64_t used;
} lz_pack;

typedef struct {
    sqlite3 *db;
    sqlite3_blob *blob;
    int64_t pack;                 /* row the blob handle is on, or -1 */
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
} lz_src;

typedef int (*lz_dec_fn)(const char *, char *, int, int);
typedef int (*lz_dec_dict_fn)(const char *, char *, int, int, const char *, int);
typedef struct { uint64_t low64, high64; } lz_h128_t;
typedef lz_h128_t (*lz_h128_fn)(const void *, size_t);
typedef uint64_t (*lz_h64_fn)(const void *, size_t);

typedef struct lz_bgarg {
    struct lz_ctx *c;
    int k;
} lz_bgarg;

typedef struct lz_ctx {
    int uffd, evfd, stopfd;
    char *host;
    int64_t npages;
    const int64_t *img;
    const int64_t *pack, *start, *end, *base;
    const uint8_t *codec, *hash;
    const uint64_t *crc;
    int64_t nblobs;
    const int64_t *hot;
    int64_t nhot;
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
    lz_src fsrc, bsrc[LZ_BG];
    pthread_t fault_thr, bg_thr[LZ_BG];
    int fault_started, bg_started;
    int64_t next_chunk, bg_left;
    lz_bgarg bgarg[LZ_BG];
    volatile int stop;
    /* counters (atomics: both threads add) */
    int64_t populated, faults, fault_pages, bg_pages, zero_pages, eexist;
    int64_t bg_done_ns, t0_ns;
    volatile int bg_done;
    /* first failure */
    volatile int err;
    int64_t err_page, err_blob;
    int err_errno;
    pthread_mutex_t err_lock;
} lz_ctx;

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
static int lz_fail(lz_ctx *c, int kind, int64_t page, int64_t blob, int err)
{
    pthread_mutex_lock(&c->err_lock);
    if (!c->err) {
        c->err_page = page;
        c->err_blob = blob;
        c->err_errno = err;
        __atomic_store_n(&c->err, kind, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&c->err_lock);
    return kind;
}

static int lz_src_open(lz_ctx *c, lz_src *s, const char *path)
{
    s->pack = -1;
    s->blob = NULL;
    s->buf = malloc(2 * LZ_PAGE + 64);
    s->run = malloc((size_t)LZ_RUN * LZ_PAGE);
    if (!s->buf || !s->run)
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
    s->blob = NULL;
    if (s->db) {
        c->sq_exec(s->db, "COMMIT", NULL, NULL, NULL);
        c->sq_close(s->db);
    }
    s->db = NULL;
    free(s->buf);
    free(s->run);
    s->buf = s->run = NULL;
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

/* The stored bytes of blob b (*at: in s->buf or in a cached pack), checked;
 * 0 or an error kind. */
static int lz_read_blob(lz_ctx *c, lz_src *s, int64_t b, const char **at, int *len)
{
    int64_t p = c->pack[b], st = c->start[b], n = c->end[b] - c->start[b];
    if (p < 0 || n < 0 || n > 2 * LZ_PAGE)
        return LZE_MISSING;
    if (s->cached) {
        lz_pack *e = lz_pack_get(c, s, p);
        if (!e || st + n > e->size)
            return LZE_MISSING;
        if (c->h64(e->data + st, (size_t)n) != c->crc[b])
            return LZE_CHECKSUM;
        *at = e->data + st;
        *len = (int)n;
        return 0;
    }
    if (s->blob && s->pack != p) {
        if (c->sq_breopen(s->blob, p) != 0) {
            c->sq_bclose(s->blob);          /* an aborted handle: start again */
            s->blob = NULL;
        }
    }
    if (!s->blob) {
        if (c->sq_bopen(s->db, "main", "pack_data", "data", p, 0, &s->blob) != 0) {
            s->blob = NULL;
            s->pack = -1;
            return LZE_MISSING;
        }
    }
    s->pack = p;
    if (c->sq_bread(s->blob, s->buf, (int)n, (int)st) != 0)
        return LZE_MISSING;
    if (c->h64(s->buf, (size_t)n) != c->crc[b])
        return LZE_CHECKSUM;
    *at = s->buf;
    *len = (int)n;
    return 0;
}

static int lz_digest_ok(lz_ctx *c, const char *page, int64_t b)
{
    lz_h128_t v = c->h128(page, LZ_PAGE);
    const uint8_t *w = c->hash + 16 * b;
    for (int k = 0; k < 8; k++) {
        if (w[k] != (uint8_t)(v.high64 >> (56 - 8 * k)) || w[8 + k] != (uint8_t)(v.low64 >> (56 - 8 * k)))
            return 0;
    }
    return 1;
}

/* Decode blob b (raw or plain LZ4), stored as len bytes at src, into out. */
static int lz_plain(lz_ctx *c, const char *src, int64_t b, int len, char *out)
{
    switch (c->codec[b]) {
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

/* Decode page `page` into out; 1 for a zero page (out untouched), 0 when
 * decoded and checked, else an error kind (recorded by the caller). */
static int lz_decode_page(lz_ctx *c, lz_src *s, int64_t page, char *out, int64_t *blob)
{
    int64_t b = c->img[page];
    int len, r;
    const char *at;
    *blob = b;
    if (b == 0)
        return 1;
    if (b < 0 || b >= c->nblobs)
        return LZE_MISSING;
    if (c->codec[b] == 2) {                 /* LZ4 delta against its base */
        int64_t a = c->base[b];
        if (a <= 0 || a >= c->nblobs || c->codec[a] == 2)
            return LZE_BASE;
        if ((r = lz_read_blob(c, s, a, &at, &len)) != 0 || (r = lz_plain(c, at, a, len, s->dict)) != 0)
            return LZE_BASE;
        if ((r = lz_read_blob(c, s, b, &at, &len)) != 0)
            return r;
        if (c->dec_dict(at, out, len, LZ_PAGE, s->dict, LZ_PAGE) != LZ_PAGE)
            return LZE_DECODE;
    } else {
        if ((r = lz_read_blob(c, s, b, &at, &len)) != 0)
            return r;
        if ((r = lz_plain(c, at, b, len, out)) != 0)
            return r;
    }
    return lz_digest_ok(c, out, b) ? 0 : LZE_HASH;
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
    int r = lz_decode_page(c, s, page, s->run, &blob);
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

/* Fill pages [lo, hi) that are still missing, in runs of one kind. */
static int lz_fill_range(lz_ctx *c, lz_src *s, int64_t lo, int64_t hi)
{
    int64_t p = lo;
    if (s->niced && lz_now() - c->t0_ns > LZ_BG_NICE_NS) {
        /* Then ahead of the vCPUs: while pages are missing the guest runs
         * fault to fault (~10x slower), so the sooner the fill is done the
         * sooner it runs at full speed.  Unprivileged: back to 0. */
        if (setpriority(PRIO_PROCESS, (id_t)s->tid, LZ_BG_NICE_AFTER))
            setpriority(PRIO_PROCESS, (id_t)s->tid, 0);
        s->niced = 0;
    }
    while (p < hi && !c->stop && !__atomic_load_n(&c->err, __ATOMIC_ACQUIRE)) {
        if (__atomic_load_n(&c->state[p], __ATOMIC_ACQUIRE)) {
            p++;
            continue;
        }
        int zero = c->img[p] == 0;
        int64_t n = 0;
        while (p + n < hi && n < LZ_RUN && !__atomic_load_n(&c->state[p + n], __ATOMIC_ACQUIRE)
               && (c->img[p + n] == 0) == zero) {
            if (!zero) {
                int64_t blob;
                int r = lz_decode_page(c, s, p + n, s->run + n * LZ_PAGE, &blob);
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
    setpriority(PRIO_PROCESS, (id_t)s->tid, LZ_BG_NICE);
    s->niced = 1;
    /* recent pages are scattered over memory and so over the base's packs:
     * read just their blobs (whole packs would be read again and again) */
    s->cached = 0;
    for (int64_t i = a->k; i < c->nhot && !c->stop && !c->err; i += LZ_BG)
        if (lz_fill_range(c, s, c->hot[i], c->hot[i] + 1))
            break;
    s->cached = 1;
    while (!c->stop && !c->err) {
        int64_t lo = __atomic_fetch_add(&c->next_chunk, LZ_CHUNK, __ATOMIC_RELAXED);
        if (lo >= c->npages)
            break;
        if (lz_fill_range(c, s, lo, lo + LZ_CHUNK < c->npages ? lo + LZ_CHUNK : c->npages))
            break;
    }
    /* the packs it kept are not needed any more */
    for (int i = 0; i < s->ncache; i++)
        free(s->cache[i].data);
    s->ncache = 0;
    s->cache_bytes = 0;
    if (__atomic_sub_fetch(&c->bg_left, 1, __ATOMIC_ACQ_REL) == 0) {
        if (!c->err && !c->stop) {
            c->bg_done_ns = lz_now() - c->t0_ns;
            __atomic_store_n(&c->bg_done, 1, __ATOMIC_RELEASE);
        }
        lz_signal(c);
    }
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

/* args: see storage/lazy.py (_Native.create) for the order. */
uintptr_t lz_create(int64_t uffd, int64_t evfd, uintptr_t host, int64_t npages, uintptr_t img,
                    uintptr_t cat_, int64_t nblobs, uintptr_t hot, int64_t nhot, uintptr_t state,
                    uintptr_t fns_, const char *path)
{
    const uintptr_t *cat = (const uintptr_t *)cat_, *fns = (const uintptr_t *)fns_;
    lz_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return 0;
    c->uffd = (int)uffd;
    c->evfd = (int)evfd;
    c->stopfd = eventfd(0, EFD_CLOEXEC);
    c->host = (char *)host;
    c->npages = npages;
    c->img = (const int64_t *)img;
    c->pack = (const int64_t *)cat[0];
    c->start = (const int64_t *)cat[1];
    c->end = (const int64_t *)cat[2];
    c->codec = (const uint8_t *)cat[3];
    c->base = (const int64_t *)cat[4];
    c->hash = (const uint8_t *)cat[5];
    c->crc = (const uint64_t *)cat[6];
    c->nblobs = nblobs;
    c->hot = (const int64_t *)hot;
    c->nhot = nhot;
    c->state = (uint8_t *)state;
    c->dec = (lz_dec_fn)fns[0];
    c->dec_dict = (lz_dec_dict_fn)fns[1];
    c->h128 = (lz_h128_fn)fns[2];
    c->h64 = (lz_h64_fn)fns[3];
    c->sq_open = (sq_open_fn)fns[4];
    c->sq_close = (sq_close_fn)fns[5];
    c->sq_exec = (sq_exec_fn)fns[6];
    c->sq_busy = (sq_busy_fn)fns[7];
    c->sq_bopen = (sq_bopen_fn)fns[8];
    c->sq_breopen = (sq_breopen_fn)fns[9];
    c->sq_bread = (sq_bread_fn)fns[10];
    c->sq_bclose = (sq_bclose_fn)fns[11];
    c->sq_bbytes = (sq_bbytes_fn)fns[12];
    c->t0_ns = lz_now();
    pthread_mutex_init(&c->err_lock, NULL);
    int bad = c->stopfd < 0 || lz_src_open(c, &c->fsrc, path);
    for (int k = 0; k < LZ_BG; k++) {
        c->bsrc[k].cached = 1;
        bad = bad || lz_src_open(c, &c->bsrc[k], path);
    }
    if (bad) {
        lz_src_close(c, &c->fsrc);
        for (int k = 0; k < LZ_BG; k++)
            lz_src_close(c, &c->bsrc[k]);
        if (c->stopfd >= 0)
            close(c->stopfd);
        free(c);
        return 0;
    }
    return (uintptr_t)c;
}

/* Populate pages [lo, hi) now, on the caller's thread (the system area,
 * before the vCPUs start).  0 or an error kind. */
int64_t lz_fill_now(uintptr_t c_, int64_t lo, int64_t hi)
{
    lz_ctx *c = (lz_ctx *)c_;
    return lz_fill_range(c, &c->fsrc, lo, hi);
}

/* Start the fault thread and (background != 0) the background fill. */
int64_t lz_start(uintptr_t c_, int64_t background)
{
    lz_ctx *c = (lz_ctx *)c_;
    c->t0_ns = lz_now();
    if (pthread_create(&c->fault_thr, NULL, lz_fault_loop, c))
        return -1;
    c->fault_started = 1;
    if (background) {
        c->bg_left = LZ_BG;
        for (int k = 0; k < LZ_BG; k++) {
            c->bgarg[k].c = c;
            c->bgarg[k].k = k;
            if (pthread_create(&c->bg_thr[k], NULL, lz_bg_loop, &c->bgarg[k])) {
                c->stop = 1;                 /* the ones started end at once */
                c->bg_started = k;
                return -2;
            }
            c->bg_started = k + 1;
        }
    }
    return 0;
}

/* Wait for the background fill to end (it ends by itself, on a failure or
 * on lz_stop). */
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
    c->stop = 1;
    ssize_t r = write(c->stopfd, &one, 8);
    (void)r;
    lz_join_background(c_);
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
    for (int k = 0; k < LZ_BG; k++)
        lz_src_close(c, &c->bsrc[k]);
    close(c->stopfd);
    pthread_mutex_destroy(&c->err_lock);
    free(c);
}

/* out[0..11]: populated, faults, fault_pages, bg_pages, zero_pages, eexist,
 * bg_done, bg_done_ns, err, err_page, err_blob, err_errno. */
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
    pthread_mutex_unlock(&c->err_lock);
}
