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
typedef int (*comp_fn)(const char *, char *, int, int);
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
 * delta fails or mismatches, so the caller can still name the damage.  Returns -1 when all
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
        switch (codec[i]) {
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
        if (r == PAGE)
            digest(h, d, got);
        if (r != PAGE || memcmp(got, want + 16 * i, 16) != 0) {
            if (codec[i] == CODEC_LZ4_DELTA && (const char *)dict[i] == d)
                memcpy(d, aside, PAGE);
            return i;
        }
    }
    return -1;
}

/* Content hashes of n pages at pages + 4096 i into hashes[16 i ..]. */
void pc_hash(int64_t n, uintptr_t pages_, uintptr_t hashes_, uintptr_t h_)
{
    const char *pages = (const char *)pages_;
    uint8_t *hashes = (uint8_t *)hashes_;
    h128_fn h = (h128_fn)h_;
    for (int64_t i = 0; i < n; i++)
        digest(h, pages + PAGE * i, hashes + 16 * i);
}

/* LZ4-compress the n pages at pages + 4096 idx[i] back to back into out
 * (capacity cap).  size[i] gets each one's compressed size, or 0 when it
 * does not fit in limit - 1 bytes (LZ4 gives up early on such pages; their
 * bytes are not kept).  Returns the bytes used, or -1 - i when out had less
 * than limit bytes left for page i (nothing of page i was kept). */
int64_t pc_compress(int64_t n, uintptr_t pages_, uintptr_t idx_, uintptr_t out_,
                    int64_t cap, uintptr_t size_, int64_t limit, uintptr_t comp_)
{
    const char *pages = (const char *)pages_;
    const int64_t *idx = (const int64_t *)idx_;
    char *out = (char *)out_;
    int64_t *size = (int64_t *)size_;
    comp_fn comp = (comp_fn)comp_;
    int64_t used = 0;
    if (limit < 2 || limit > PAGE + 1)
        return -1;
    for (int64_t i = 0; i < n; i++) {
        if (cap - used < limit)
            return -1 - i;
        int r = comp(pages + PAGE * idx[i], out + used, PAGE, (int)(limit - 1));
        size[i] = r > 0 ? r : 0;
        used += size[i];
    }
    return used;
}
