/* snapctl's page loops in C: decode (and hash-check) or hash (and compress)
 * a batch of 4096-byte pages in one call, so that the per-page work is not
 * Python's and the GIL is released for the whole batch (two threads use
 * both cores).  No library is linked: LZ4 and xxh3 are called through the
 * function pointers the Python side takes from python-lz4's and xxhash's own
 * extension modules -- the same code that wrote the store.  Every pointer
 * and array arrives as a uintptr_t (an int from numpy's .ctypes.data).
 */
#include <stdint.h>
#include <string.h>

#define PAGE 4096
#define CODEC_RAW 0
#define CODEC_LZ4 1
#define CODEC_LZ4_DELTA 2

typedef int (*dec_fn)(const char *, char *, int, int);
typedef int (*dec_dict_fn)(const char *, char *, int, int, const char *, int);
typedef int (*comp_fn)(const char *, char *, int, int);  /* LZ4_compress_default */
typedef struct { uint64_t low64, high64; } h128_t;   /* XXH128_hash_t */
typedef h128_t (*h128_fn)(const void *, size_t);

/* xxh3_128 of one page as xxhash's canonical digest (big-endian high, low). */
static void digest(h128_fn h, const char *page, uint8_t out[16])
{
    h128_t v = h(page, PAGE);
    for (int k = 0; k < 8; k++) {
        out[k] = (uint8_t)(v.high64 >> (56 - 8 * k));
        out[8 + k] = (uint8_t)(v.low64 >> (56 - 8 * k));
    }
}

/* Decode n blobs: blob i is len[i] bytes at src[i] with codec[i]; it goes to
 * the page at dst[i] and must hash to want[16 i ..].  A delta's dictionary is
 * the page at dict[i]; when that is dst[i] itself (the base was decoded into
 * the delta's own page), it is copied aside first -- and put back if the
 * delta fails or mismatches, so the caller can still name the damage.
 * A codec with bit 7 set (NO_CHECK) skips the hash check: for a base
 * decoded only to serve as its delta's dictionary, whose delta's own check
 * covers it (a wrong dictionary cannot give the delta's content).  Returns -1 when all
 * decode and match, else the index of the first that does not. */
int64_t pc_decode(int64_t n, uintptr_t src_, uintptr_t len_, uintptr_t codec_,
                  uintptr_t dst_, uintptr_t dict_, uintptr_t want_,
                  uintptr_t dec_, uintptr_t dec_dict_, uintptr_t h_)
{
    const int64_t *src = (const int64_t *)src_, *len = (const int64_t *)len_;
    const int64_t *dst = (const int64_t *)dst_, *dict = (const int64_t *)dict_;
    const uint8_t *codec = (const uint8_t *)codec_, *want = (const uint8_t *)want_;
    dec_fn dec = (dec_fn)dec_;
    dec_dict_fn dec_dict = (dec_dict_fn)dec_dict_;
    h128_fn h = (h128_fn)h_;
    char aside[PAGE];
    uint8_t got[16];

    for (int64_t i = 0; i < n; i++) {
        const char *s = (const char *)src[i];
        char *d = (char *)dst[i];
        int l = (int)len[i], r = -1;
        if (len[i] < 0 || len[i] > (1 << 30))
            return i;
        int kind = codec[i] & 0x7f, check = !(codec[i] & 0x80);
        switch (kind) {
        case CODEC_RAW:
            if (l == PAGE) {
                memcpy(d, s, PAGE);
                r = PAGE;
            }
            break;
        case CODEC_LZ4:
            r = dec(s, d, l, PAGE);
            break;
        case CODEC_LZ4_DELTA: {
            const char *dc = (const char *)dict[i];
            if (dc == d) {
                memcpy(aside, d, PAGE);
                dc = aside;
            }
            r = dec_dict(s, d, l, PAGE, dc, PAGE);
            break;
        }
        default:
            break;
        }
        if (r == PAGE && check)
            digest(h, d, got);
        if (r != PAGE || (check && memcmp(got, want + 16 * i, 16) != 0)) {
            if (kind == CODEC_LZ4_DELTA && (const char *)dict[i] == d)
                memcpy(d, aside, PAGE);
            return i;
        }
    }
    return -1;
}

/* One pass over the n pages at pages + 4096 idx[i]: words[i] = how many of
 * its 512 8-byte words are not zero, and for a page that is not all zero its
 * content hash into hashes[16 i ..] (left alone for zero pages). */
void pc_scan(int64_t n, uintptr_t pages_, uintptr_t idx_, uintptr_t words_, uintptr_t hashes_,
             uintptr_t h_)
{
    const char *pages = (const char *)pages_;
    const int64_t *idx = (const int64_t *)idx_;
    int64_t *words = (int64_t *)words_;
    uint8_t *hashes = (uint8_t *)hashes_;
    h128_fn h = (h128_fn)h_;
    for (int64_t i = 0; i < n; i++) {
        const char *page = pages + PAGE * idx[i];
        int64_t c = 0;
        for (int k = 0; k < PAGE / 8; k++) {
            uint64_t w;
            memcpy(&w, page + 8 * k, 8);
            c += w != 0;
        }
        words[i] = c;
        if (c)
            digest(h, page, hashes + 16 * i);
    }
}

typedef void *(*create_fn)(void);
typedef int (*free_fn)(void *);
typedef int (*load_dict_fn)(void *, const char *, int);
typedef int (*comp_continue_fn)(void *, const char *, char *, int, int, int);
typedef uint64_t (*h64_fn)(const void *, size_t);

/* pc_encode's function table, by name: the caller builds it in this order
 * from pc_encode_fns() (the names, space-separated), so neither side holds
 * a positional list the other could silently disagree with. */
enum { F_COMPRESS, F_CREATE_STREAM, F_FREE_STREAM, F_LOAD_DICT, F_COMPRESS_CONTINUE, F_XXH3_64, F_COUNT };
static const char ENCODE_FNS[] = "LZ4_compress_default LZ4_createStream LZ4_freeStream LZ4_loadDict "
                                 "LZ4_compress_fast_continue XXH3_64bits";

const char *pc_encode_fns(void)
{
    return ENCODE_FNS;
}

/* Encode the n pages at pages + 4096 idx[i] back to back into out, which has
 * room for n raw pages: LZ4 with the 4096 bytes at dict[i] as dictionary
 * where dict[i] != 0, plain LZ4 elsewhere, and the page itself (raw) when
 * the block would not be smaller than a page.  codec[i], size[i] and crc[i]
 * (xxh3_64 of the stored bytes) describe each.  fn: the table named by
 * pc_encode_fns().  Returns the bytes used, or -1 when no LZ4 stream could be
 * had. */
int64_t pc_encode(int64_t n, uintptr_t pages_, uintptr_t idx_, uintptr_t dict_, uintptr_t out_,
                  uintptr_t codec_, uintptr_t size_, uintptr_t crc_, uintptr_t fn_)
{
    const char *pages = (const char *)pages_;
    const int64_t *idx = (const int64_t *)idx_, *dict = (const int64_t *)dict_;
    const uintptr_t *fn = (const uintptr_t *)fn_;
    char *out = (char *)out_;
    uint8_t *codec = (uint8_t *)codec_;
    int64_t *size = (int64_t *)size_;
    uint64_t *crc = (uint64_t *)crc_;
    comp_fn comp = (comp_fn)fn[F_COMPRESS];
    load_dict_fn load_dict = (load_dict_fn)fn[F_LOAD_DICT];
    comp_continue_fn comp_continue = (comp_continue_fn)fn[F_COMPRESS_CONTINUE];
    h64_fn h64 = (h64_fn)fn[F_XXH3_64];
    void *stream = NULL;
    int64_t used = 0;

    for (int64_t i = 0; i < n; i++) {
        const char *page = pages + PAGE * idx[i];
        char *o = out + used;
        int r;
        if (dict[i]) {
            if (!stream && !(stream = ((create_fn)fn[F_CREATE_STREAM])()))
                return -1;
            load_dict(stream, (const char *)dict[i], PAGE);
            r = comp_continue(stream, page, o, PAGE, PAGE - 1, 1);
            codec[i] = CODEC_LZ4_DELTA;
        } else {
            r = comp(page, o, PAGE, PAGE - 1);
            codec[i] = CODEC_LZ4;
        }
        if (r <= 0) {                       /* does not shrink: stored as is */
            memcpy(o, page, PAGE);
            r = PAGE;
            codec[i] = CODEC_RAW;
        }
        size[i] = r;
        crc[i] = h64(o, (size_t)r);
        used += r;
    }
    if (stream)
        ((free_fn)fn[F_FREE_STREAM])(stream);
    return used;
}

/* xxh3_64 of n bytes at p (fn: XXH3_64bits), without the GIL. */
uint64_t pc_xxh3_64(uintptr_t p, int64_t n, uintptr_t fn)
{
    return ((h64_fn)fn)((const void *)p, (size_t)n);
}

/* xxh3_64 of each of the n blobs stored back to back in the size bytes at
 * data: blob i ends at ends[i] and starts where blob i-1 ended (0 for the
 * first); into out[i].  Returns -1, or the index of the first blob whose end
 * is below its start or past size (nothing is read beyond data + size). */
int64_t pc_xxh3_64_many(int64_t n, uintptr_t data_, int64_t size, uintptr_t ends_, uintptr_t out_,
                        uintptr_t fn)
{
    const char *data = (const char *)data_;
    const int64_t *ends = (const int64_t *)ends_;
    uint64_t *out = (uint64_t *)out_;
    h64_fn h64 = (h64_fn)fn;
    int64_t start = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t end = ends[i];
        if (end < start || end > size)
            return i;
        out[i] = h64(data + start, (size_t)(end - start));
        start = end;
    }
    return -1;
}

static uint64_t fmix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDULL;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ULL;
    return x ^ (x >> 33);
}

/* The digest term (storage/codec.py) of page p with the content hash at h
 * (16 bytes: little-endian lo, hi halves); 0 for the zero page's hash z. */
static unsigned __int128 term(uint64_t p, const uint8_t *h, const uint8_t *z)
{
    uint64_t lo, hi, zlo, zhi;
    memcpy(&lo, h, 8);
    memcpy(&hi, h + 8, 8);
    memcpy(&zlo, z, 8);
    memcpy(&zhi, z + 8, 8);
    if (lo == zlo && hi == zhi)
        return 0;
    uint64_t k = p * 0x9E3779B97F4A7C15ULL;
    return ((unsigned __int128)fmix64(hi ^ (k + 0x632BE59BD9B4E019ULL)) << 64) | fmix64(lo ^ k);
}

/* storage/codec.py's digest_update: out = digest - terms(pages, old) +
 * terms(pages, new) modulo 2**128 (digest and out as low, high uint64
 * halves; old and new: n x 16 content hashes; zero: the zero page's hash). */
void pc_digest_update(int64_t n, uintptr_t pages_, uintptr_t old_, uintptr_t new_, uintptr_t zero_,
                      uintptr_t digest_, uintptr_t out_)
{
    const int64_t *pages = (const int64_t *)pages_;
    const uint8_t *old = (const uint8_t *)old_, *nw = (const uint8_t *)new_, *z = (const uint8_t *)zero_;
    const uint64_t *digest = (const uint64_t *)digest_;
    uint64_t *out = (uint64_t *)out_;
    unsigned __int128 sum = ((unsigned __int128)digest[1] << 64) | digest[0];
    for (int64_t i = 0; i < n; i++) {
        uint64_t p = (uint64_t)pages[i];
        sum += term(p, nw + 16 * i, z) - term(p, old + 16 * i, z);
    }
    out[0] = (uint64_t)sum;
    out[1] = (uint64_t)(sum >> 64);
}

/* The image digest (storage/codec.py) of an image given as a blob id per
 * page, from the catalogue's content hashes, in one pass: every non-zero id
 * must be a known blob (below nblobs, pack[id] >= 0).  Returns -1 with the
 * 128-bit sum in out[0] (low), out[1] (high), or the first page whose blob
 * is unknown.  hash[0..15] is the zero page's hash (blob 0): its term is 0. */
int64_t pc_image_digest(int64_t npages, uintptr_t img_, uintptr_t pack_, int64_t nblobs, uintptr_t hash_,
                        uintptr_t out_)
{
    const int64_t *img = (const int64_t *)img_, *pack = (const int64_t *)pack_;
    const uint8_t *hash = (const uint8_t *)hash_;
    uint64_t *out = (uint64_t *)out_;
    unsigned __int128 sum = 0;
    for (int64_t p = 0; p < npages; p++) {
        int64_t b = img[p];
        if (!b)
            continue;
        if (b < 0 || b >= nblobs || pack[b] < 0)
            return p;
        sum += term((uint64_t)p, hash + 16 * b, hash);
    }
    out[0] = (uint64_t)sum;
    out[1] = (uint64_t)(sum >> 64);
    return -1;
}
