/* What the encoder (formats 2 and 3) learns about a tensor before it codes it, in one or two passes:

   scan              which token rows repeat an earlier row bit for bit (stored as references), the counts of
                     u >> shift over the other rows (per channel, or of the whole tensor), and the OR of every
                     element (the low bits that are zero in all of them)
   channel_histogram per channel, the counts of each symbol over the rows that are coded (after a whole-tensor
                     scan, where per-channel counts of every value would take too much memory)

   A token row t is all L blocks' D elements at token t, the tensor read as [L, T, D]. */

#include "common.h"

#define MAX_CANDIDATES 8 /* rows compared in full before a row is taken as new: bounds crafted input */

static inline uint64_t mix(uint64_t x, uint64_t w) {
    x = (x ^ w) * 0xFF51AFD7ED558CCDull;
    return x ^ (x >> 29);
}

/* One pass in memory order: each row's hash, the counts of u >> shift over every row, and the OR of every element.
   The hash only picks candidates (find_copies compares rows in full), so it reads a row's first and last 8 bytes
   in each block: nearly free, and rows of real KV differ there. Counts go per channel (hist [L*D][stride]: a
   stride that is not a power of two, or every channel's count of one value falls in one cache set), or into one
   histogram kept as four interleaved copies (hist [4][bins]: a run of equal values does not wait on its own
   counter). */
KV_INLINE uint32_t hash_and_count(const uint8_t *src, const int ITEM, int shift, size_t L, size_t T, size_t D,
                                  uint64_t *hashes, uint32_t *hist, size_t bins, const int PER_CHANNEL) {
    /* bins: the stride between channels' (or copies') counts */
    const size_t row_bytes = D * ITEM;
    uint32_t ored = 0;
    for (size_t t = 0; t < T; t++) hashes[t] = 0x9E3779B97F4A7C15ull ^ row_bytes;
    for (size_t l = 0; l < L; l++) {
        uint32_t *h = PER_CHANNEL ? hist + l * D * bins : hist;
        for (size_t t = 0; t < T; t++) {
            const uint8_t *r = src + (l * T + t) * row_bytes;
            uint64_t head = row_bytes >= 8 ? load_le(r) : load_le_tail(r, row_bytes, 0);
            uint64_t tail = row_bytes >= 8 ? load_le(r + row_bytes - 8) : 0;
            hashes[t] = mix(mix(hashes[t], head), tail);
            for (size_t d = 0; d < D; d++) {
                uint32_t u = ITEM == 2 ? (uint32_t)((const uint16_t *)r)[d] : ((const uint32_t *)r)[d];
                ored |= u;
                h[(PER_CHANNEL ? d : (d & 3)) * bins + (u >> shift)]++;
            }
        }
    }
    return ored;
}

#define COUNT_VARIANTS(NAME, ATTR)                                                                                \
    ATTR static uint32_t NAME(const uint8_t *src, int itemsize, int shift, size_t L, size_t T, size_t D,          \
                              uint64_t *hashes, uint32_t *hist, size_t bins, int per_channel) {                   \
        if (itemsize == 2)                                                                                        \
            return per_channel ? hash_and_count(src, 2, shift, L, T, D, hashes, hist, bins, 1)                    \
                               : hash_and_count(src, 2, shift, L, T, D, hashes, hist, bins, 0);                   \
        return per_channel ? hash_and_count(src, 4, shift, L, T, D, hashes, hist, bins, 1)                        \
                           : hash_and_count(src, 4, shift, L, T, D, hashes, hist, bins, 0);                       \
    }
COUNT_VARIANTS(count_plain, )
#if KV_X86
COUNT_VARIANTS(count_fast, KV_FAST_ATTR)
#endif

static int same_rows(const uint8_t *src, size_t L, size_t T, size_t row_bytes, size_t a, size_t b) {
    for (size_t l = 0; l < L; l++)
        if (memcmp(src + (l * T + a) * row_bytes, src + (l * T + b) * row_bytes, row_bytes)) return 0;
    return 1;
}

/* sources[t]: t for a row coded in full, else an earlier row it repeats (itself coded: the first with its
   values, unless MAX_CANDIDATES rows of the same hash differ from it). Rows are found by hash in an
   open-addressing table, then compared in full. */
static int find_copies(const uint8_t *src, size_t L, size_t T, size_t row_bytes, const uint64_t *hashes,
                       uint32_t *sources) {
    size_t slots = 16;
    while (slots < 2 * T) slots <<= 1;
    uint32_t *table = malloc(sizeof(uint32_t) * slots);
    if (!table) return ERR_NOMEM;
    memset(table, 0xFF, sizeof(uint32_t) * slots);
    for (size_t t = 0; t < T; t++) {
        size_t at = (size_t)(hashes[t] ^ (hashes[t] >> 32)) & (slots - 1);
        int compared = 0;
        sources[t] = (uint32_t)t;
        for (; table[at] != UINT32_MAX; at = (at + 1) & (slots - 1))
            if (hashes[table[at]] == hashes[t] && compared++ < MAX_CANDIDATES
                && same_rows(src, L, T, row_bytes, table[at], t)) {
                sources[t] = table[at];
                break;
            }
        if (sources[t] == t) table[at] = (uint32_t)t;
    }
    free(table);
    return OK;
}

/* scan(src, itemsize, shift, L, T, D, sources u32 [T] (out), hist u32 (out, added to), stride) -> the OR of every
   element. hist: counts of u >> shift over the coded rows, per channel if stride (hist [L*D][stride], stride >=
   2^(8 * itemsize - shift)), else of the whole tensor (hist [2^(8 * itemsize - shift)]). */
PyObject *py_scan(PyObject *self, PyObject *args) {
    PyObject *src_o, *sources_o, *hist_o;
    int itemsize, shift;
    Py_ssize_t L, T, D, stride;
    if (!PyArg_ParseTuple(args, "OiinnnOOn", &src_o, &itemsize, &shift, &L, &T, &D, &sources_o, &hist_o, &stride)
        || check_item(itemsize, shift, 0) < 0)
        return NULL;
    size_t bins = (size_t)1 << (8 * itemsize - shift), C = (size_t)L * D;
    const int per_channel = stride != 0;
    if (L < 0 || T < 0 || D < 0 || T > (Py_ssize_t)UINT32_MAX - 1 || (per_channel && (size_t)stride < bins)) {
        PyErr_SetString(PyExc_ValueError, "scan: shape out of range");
        return NULL;
    }
    Buf src, sources, hist;
    sources.held = hist.held = 0;
    if (get_buf(src_o, &src, 0, L * T * D * itemsize, "source") < 0
        || get_buf(sources_o, &sources, 1, 4 * T, "sources") < 0
        || get_buf(hist_o, &hist, 1, (Py_ssize_t)(4 * (per_channel ? C * stride : bins)), "histogram") < 0) {
        release(&src); release(&sources); release(&hist);
        return NULL;
    }
    uint64_t *hashes = malloc(sizeof(uint64_t) * (T ? T : 1));
    uint32_t *counts = per_channel ? (uint32_t *)hist.view.buf : calloc(4 * bins, sizeof(uint32_t));
    int status = hashes && counts ? OK : ERR_NOMEM;
    uint64_t ored = 0;
    if (status == OK) {
        const uint8_t *p = U8(src);
        uint32_t *rows = (uint32_t *)sources.view.buf, *h = (uint32_t *)hist.view.buf;
        size_t row_bytes = (size_t)D * itemsize;
        Py_BEGIN_ALLOW_THREADS
#if KV_X86
        size_t step = per_channel ? (size_t)stride : bins;
        ored = kv_cpu_is_modern() ? count_fast(p, itemsize, shift, L, T, D, hashes, counts, step, per_channel)
                                  : count_plain(p, itemsize, shift, L, T, D, hashes, counts, step, per_channel);
#else
        ored = count_plain(p, itemsize, shift, L, T, D, hashes, counts, per_channel ? (size_t)stride : bins,
                           per_channel);
#endif
        status = find_copies(p, L, T, row_bytes, hashes, rows);
        for (size_t t = 0; t < (size_t)T && status == OK; t++) { /* a copied row is not coded: uncount it */
            if (rows[t] == t) continue;
            for (size_t l = 0; l < (size_t)L; l++)
                for (size_t d = 0; d < (size_t)D; d++)
                    counts[(per_channel ? (l * D + d) * (size_t)stride : 0)
                           + (element(p, itemsize, ((size_t)l * T + t) * D + d) >> shift)]--;
        }
        if (!per_channel)
            for (size_t b = 0; b < bins; b++)
                h[b] += counts[b] + counts[bins + b] + counts[2 * bins + b] + counts[3 * bins + b];
        Py_END_ALLOW_THREADS
    }
    free(hashes);
    if (!per_channel) free(counts);
    release(&src); release(&sources); release(&hist);
    if (status != OK) return PyErr_NoMemory();
    return PyLong_FromUnsignedLongLong(ored);
}

KV_INLINE int count_rows(const uint8_t *p, const int ITEM, int shift, size_t L, size_t T, size_t D,
                         const uint32_t *rows, const uint16_t *lut, uint32_t nsym, uint32_t *h) {
    int bad = 0;
    for (size_t l = 0; l < L; l++)
        for (size_t t = 0; t < T; t++) {
            if (rows[t] != t) continue;
            const uint8_t *r = p + (l * T + t) * D * ITEM;
            uint32_t *hc = h + l * D * nsym;
            for (size_t d = 0; d < D; d++, hc += nsym) {
                uint32_t u = ITEM == 2 ? ((const uint16_t *)r)[d] : ((const uint32_t *)r)[d];
                uint32_t s = lut[u >> shift];
                bad |= s >= nsym;
                hc[s < nsym ? s : 0]++;
            }
        }
    return bad;
}

/* channel_histogram(src, itemsize, shift, L, T, D, sources u32 [T], lut u16 [2^(8 * itemsize - shift)], nsym,
   hist u32 [L * D * nsym] (out, added to)): per channel (l * D + d), the counts of each symbol lut[u >> shift]
   over the coded rows (sources[t] == t). ValueError if an element's symbol is not < nsym. */
PyObject *py_channel_histogram(PyObject *self, PyObject *args) {
    PyObject *src_o, *rows_o, *lut_o, *out_o;
    int itemsize, shift, nsym;
    Py_ssize_t L, T, D;
    if (!PyArg_ParseTuple(args, "OiinnnOOiO", &src_o, &itemsize, &shift, &L, &T, &D, &rows_o, &lut_o, &nsym, &out_o)
        || check_item(itemsize, shift, 0) < 0)
        return NULL;
    if (L < 0 || T < 0 || D < 0 || nsym < 1) {
        PyErr_SetString(PyExc_ValueError, "channel_histogram: arguments out of range");
        return NULL;
    }
    size_t bins = (size_t)1 << (8 * itemsize - shift), C = (size_t)L * D;
    Buf src, rows, lut, out;
    rows.held = lut.held = out.held = 0;
    if (get_buf(src_o, &src, 0, L * T * D * itemsize, "source") < 0 || get_buf(rows_o, &rows, 0, 4 * T, "rows") < 0
        || get_buf(lut_o, &lut, 0, (Py_ssize_t)(2 * bins), "lut") < 0
        || get_buf(out_o, &out, 1, (Py_ssize_t)(4 * C * nsym), "histogram") < 0) {
        release(&src); release(&rows); release(&lut); release(&out);
        return NULL;
    }
    const uint32_t *r = (const uint32_t *)rows.view.buf;
    int bad = 0;
    for (Py_ssize_t t = 0; t < T; t++) bad |= r[t] > (uint32_t)t || r[r[t]] != r[t];
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        bad = itemsize == 2 ? count_rows(U8(src), 2, shift, L, T, D, r, lut.view.buf, nsym, out.view.buf)
                            : count_rows(U8(src), 4, shift, L, T, D, r, lut.view.buf, nsym, out.view.buf);
        Py_END_ALLOW_THREADS
    }
    release(&src); release(&rows); release(&lut); release(&out);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "an element's symbol is outside the alphabet, or bad rows");
        return NULL;
    }
    Py_RETURN_NONE;
}
