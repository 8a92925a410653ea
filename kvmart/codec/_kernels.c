/* kvmart's codec kernels (kvmart/codec/huffman.py, legacy.py; the bitstream is specified in docs/FORMAT.md).

   Compiled by `pip install` (setup.py), so nothing is compiled on a request. Plain C over the buffer protocol (no
   numpy headers); every length is checked here against the shapes it is given and every read of a stream is
   bounded, so corrupt input is an error code, never an out-of-bounds access. The loops release the GIL.

   Format 2: each element u (16 or 32 bits) is split at bit `shift` into a symbol, u >> shift (sign, exponent and
   the top mantissa bits), and shift low bits: the lowest min(2, shift / 8) bytes go to a byte plane, the rest
   (raw_bits) stay in the bitstream. Symbols are coded with canonical Huffman codes, one code per cluster of
   channels, in four streams: coded element k goes to stream k % 4, its code (MSB first), then its raw bits.
   Decoding is one table lookup per element, four streams in flight.

   Format 1 (rANS, kvmart 0.1's codec): decode only, so that old artifacts still load. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TABLE_LOG 12
#define MAX_SYMBOLS 4096
#define MAX_MODELS 255
#define STREAMS 4

/* status codes shared with the Python side (tans.py turns them into CodecError messages) */
#define OK 0
#define ERR_SHORT -1      /* the stream ran out */
#define ERR_LEFTOVER -2   /* bits left over */
#define ERR_STATES -3     /* format 1: the states do not end where the encoder started */
#define ERR_MODEL -4      /* an invalid model */
#define ERR_SOURCE -5     /* a copied row that does not come from an earlier one */
#define ERR_NOMEM -6
#define ERR_SYMBOL -7     /* an element whose symbol is not in the alphabet (encoder) */

/* ---- buffers -------------------------------------------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_buf(PyObject *obj, Buf *b, int writable, Py_ssize_t min_bytes, const char *what) {
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    b->held = 1;
    if (b->view.len < min_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, at least %zd needed", what, b->view.len, min_bytes);
        return -1;
    }
    return 0;
}

static void release(Buf *b) {
    if (b->held) PyBuffer_Release(&b->view);
    b->held = 0;
}

#define U8(b) ((uint8_t *)(b).view.buf)

/* a symbol (u >> shift) has 1 to 12 bits; the lowest zero_bits (<= shift) are zero in every element */
static int check_item(int itemsize, int shift, int zero_bits) {
    if ((itemsize != 2 && itemsize != 4) || shift < 0 || shift > 8 * itemsize - 1 || 8 * itemsize - shift > 12
        || zero_bits < 0 || zero_bits > shift) {
        PyErr_Format(PyExc_ValueError, "itemsize %d with shift %d and %d zero bits", itemsize, shift, zero_bits);
        return -1;
    }
    return 0;
}

static int plane_bytes(int shift) { return shift / 8 < 2 ? shift / 8 : 2; }

static inline uint32_t element(const uint8_t *src, int itemsize, size_t i) {
    if (itemsize == 2) { uint16_t v; memcpy(&v, src + 2 * i, 2); return v; }
    uint32_t v; memcpy(&v, src + 4 * i, 4); return v;
}

/* ---- canonical Huffman codes ---------------------------------------------------------------------------------- */

/* A model is given by its code lengths in the side-block form: per symbol, 0 if absent, else 1 + its code length
   (a length of 0: the model's only symbol, coded in no bits). Valid: every length <= table_log, and the code is
   complete (Kraft sum exactly 1), so that every table_log-bit index decodes to a symbol. */
static int code_counts(const uint8_t *lengths, int nsym, int table_log, uint32_t *count /* [MAX_TABLE_LOG + 1] */) {
    memset(count, 0, sizeof(uint32_t) * (MAX_TABLE_LOG + 1));
    uint64_t kraft = 0;
    int present = 0;
    for (int s = 0; s < nsym; s++) {
        if (!lengths[s]) continue;
        int len = lengths[s] - 1;
        if (len > table_log) return ERR_MODEL;
        count[len]++;
        kraft += (uint64_t)1 << (table_log - len);
        present++;
    }
    if (kraft != ((uint64_t)1 << table_log) || (count[0] && present != 1)) return ERR_MODEL;
    return OK;
}

/* Canonical codes (deflate's rule: shorter codes first, then by symbol index; MSB first). */
static int canonical(const uint8_t *lengths, int nsym, int table_log, uint16_t *codes) {
    uint32_t count[MAX_TABLE_LOG + 1], next[MAX_TABLE_LOG + 2];
    if (code_counts(lengths, nsym, table_log, count) != OK) return ERR_MODEL;
    uint32_t code = 0;
    next[1] = 0;
    for (int len = 2; len <= table_log; len++) next[len] = code = (code + count[len - 1]) << 1;
    for (int s = 0; s < nsym; s++) {
        int len = lengths[s] - 1;
        codes[s] = (lengths[s] && len > 0) ? (uint16_t)next[len]++ : 0;
    }
    return OK;
}

/* Decode table of one model: for each table_log-bit index, two u16: the code's length and high << raw_bits, the
   element's upper part (above its plane bytes) before its raw bits are or-ed in. */
static int build_dtable(const uint8_t *lengths, const uint16_t *highs, int nsym, int table_log, int raw_bits,
                        uint16_t *dt) {
    uint16_t codes[MAX_SYMBOLS];
    if (canonical(lengths, nsym, table_log, codes) != OK) return ERR_MODEL;
    for (int s = 0; s < nsym; s++) {
        if (!lengths[s]) continue;
        int len = lengths[s] - 1;
        uint16_t upper = (uint16_t)(highs[s] << raw_bits);
        uint32_t first = (uint32_t)codes[s] << (table_log - len), n = 1u << (table_log - len);
        for (uint32_t i = first; i < first + n; i++) { dt[2 * i] = (uint16_t)len; dt[2 * i + 1] = upper; }
    }
    return OK;
}

typedef struct { uint32_t count; int symbol; } Leaf;

static int by_count(const void *a, const void *b) {
    const Leaf *x = a, *y = b;
    if (x->count != y->count) return x->count < y->count ? -1 : 1;
    return x->symbol - y->symbol;
}

/* Huffman code lengths of `counts`, at most max_len bits (miniz's adjustment of an optimal code), in the
   side-block form. Deterministic: ties go to the lower symbol index. */
static void huffman_lengths(const uint32_t *counts, int nsym, int max_len, uint8_t *out, Leaf *leaves,
                            uint64_t *weight, int *parent) {
    int n = 0;
    memset(out, 0, nsym);
    for (int s = 0; s < nsym; s++)
        if (counts[s]) { leaves[n].count = counts[s]; leaves[n].symbol = s; n++; }
    if (n == 0) return;
    if (n == 1) { out[leaves[0].symbol] = 1; return; }
    qsort(leaves, n, sizeof(Leaf), by_count);
    for (int i = 0; i < n; i++) weight[i] = leaves[i].count;
    int li = 0, qi = n, qn = n; /* leaves in [li, n), internal nodes in [qi, qn) */
    for (int k = 0; k < n - 1; k++) {
        int pick[2];
        for (int j = 0; j < 2; j++)
            pick[j] = (li < n && (qi >= qn || weight[li] <= weight[qi])) ? li++ : qi++;
        weight[qn] = weight[pick[0]] + weight[pick[1]];
        parent[pick[0]] = parent[pick[1]] = qn++;
    }
    uint32_t count[64] = {0};
    int depth[2 * MAX_SYMBOLS];
    depth[2 * n - 2] = 0;
    for (int i = 2 * n - 3; i >= 0; i--) depth[i] = depth[parent[i]] + 1;
    for (int i = 0; i < n; i++) count[depth[i] > max_len ? max_len : depth[i]]++;
    uint64_t total = 0;
    for (int len = 1; len <= max_len; len++) total += (uint64_t)count[len] << (max_len - len);
    while (total > ((uint64_t)1 << max_len)) { /* lengthen a shorter code to make room, until the code fits */
        count[max_len]--;
        for (int len = max_len - 1; len > 0; len--)
            if (count[len]) { count[len]--; count[len + 1] += 2; break; }
        total--;
    }
    int i = 0; /* the least frequent symbols get the longest codes */
    for (int len = max_len; len >= 1; len--)
        for (uint32_t c = 0; c < count[len]; c++) out[leaves[i++].symbol] = (uint8_t)(len + 1);
}

/* lengths(counts u32 [K * nsym], nsym, K, max_len, out u8 [K * nsym]): each model's code lengths. */
static PyObject *py_lengths(PyObject *self, PyObject *args) {
    PyObject *counts_o, *out_o;
    int nsym, K, max_len;
    if (!PyArg_ParseTuple(args, "OiiiO", &counts_o, &nsym, &K, &max_len, &out_o)) return NULL;
    if (nsym < 1 || nsym > MAX_SYMBOLS || K < 1 || max_len < 1 || max_len > MAX_TABLE_LOG
        || ((int64_t)1 << max_len) < nsym) {
        PyErr_SetString(PyExc_ValueError, "lengths: arguments out of range");
        return NULL;
    }
    Buf counts, out;
    if (get_buf(counts_o, &counts, 0, (Py_ssize_t)4 * nsym * K, "counts") < 0
        || get_buf(out_o, &out, 1, (Py_ssize_t)nsym * K, "lengths") < 0) {
        release(&counts);
        return NULL;
    }
    Leaf *leaves = malloc(sizeof(Leaf) * nsym);
    uint64_t *weight = malloc(sizeof(uint64_t) * 2 * nsym);
    int *parent = malloc(sizeof(int) * 2 * nsym);
    if (leaves && weight && parent)
        for (int k = 0; k < K; k++)
            huffman_lengths((const uint32_t *)counts.view.buf + (size_t)k * nsym, nsym, max_len,
                            U8(out) + (size_t)k * nsym, leaves, weight, parent);
    int ok = leaves && weight && parent;
    free(leaves); free(weight); free(parent);
    release(&counts); release(&out);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- format 2: encode ----------------------------------------------------------------------------------------- */

static PyObject *py_histogram(PyObject *self, PyObject *args) {
    PyObject *src_o, *out_o;
    int itemsize, shift;
    if (!PyArg_ParseTuple(args, "OiiO", &src_o, &itemsize, &shift, &out_o) || check_item(itemsize, shift, 0) < 0)
        return NULL;
    size_t bins = (size_t)1 << (8 * itemsize - shift);
    Buf src, out;
    if (get_buf(src_o, &src, 0, 0, "source") < 0 || get_buf(out_o, &out, 1, (Py_ssize_t)(4 * bins), "histogram") < 0) {
        release(&src);
        return NULL;
    }
    size_t n = (size_t)src.view.len / itemsize;
    uint32_t *h = (uint32_t *)out.view.buf;
    const uint8_t *p = U8(src);
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 2) {
        for (size_t i = 0; i < n; i++) h[element(p, 2, i) >> shift]++;
    } else {
        for (size_t i = 0; i < n; i++) h[element(p, 4, i) >> shift]++;
    }
    Py_END_ALLOW_THREADS
    release(&src); release(&out);
    Py_RETURN_NONE;
}

/* Per channel (l * D + d) counts of each symbol lut[u >> shift], over the coded rows (rows[t] != 0). */
static PyObject *py_channel_histogram(PyObject *self, PyObject *args) {
    PyObject *src_o, *rows_o, *lut_o, *out_o;
    int itemsize, shift, nsym;
    Py_ssize_t L, T, D;
    if (!PyArg_ParseTuple(args, "OiinnnOOiO", &src_o, &itemsize, &shift, &L, &T, &D, &rows_o, &lut_o, &nsym, &out_o)
        || check_item(itemsize, shift, 0) < 0)
        return NULL;
    size_t bins = (size_t)1 << (8 * itemsize - shift), C = (size_t)L * D;
    Buf src, rows, lut, out;
    rows.held = lut.held = out.held = 0;
    if (get_buf(src_o, &src, 0, (Py_ssize_t)(L * T * D * itemsize), "source") < 0
        || get_buf(rows_o, &rows, 0, T, "rows") < 0 || get_buf(lut_o, &lut, 0, (Py_ssize_t)(2 * bins), "lut") < 0
        || get_buf(out_o, &out, 1, (Py_ssize_t)(4 * C * nsym), "histogram") < 0) {
        release(&src); release(&rows); release(&lut); release(&out);
        return NULL;
    }
    const uint8_t *p = U8(src), *keep = U8(rows);
    const uint16_t *map = (const uint16_t *)lut.view.buf;
    uint32_t *h = (uint32_t *)out.view.buf;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t l = 0; l < L; l++)
        for (Py_ssize_t t = 0; t < T; t++) {
            if (!keep[t]) continue;
            size_t base = ((size_t)l * T + t) * D;
            uint32_t *hc = h + (size_t)l * D * nsym;
            for (Py_ssize_t d = 0; d < D; d++) {
                uint32_t s = map[element(p, itemsize, base + d) >> shift];
                if (s >= (uint32_t)nsym) { bad = 1; continue; }
                hc[(size_t)d * nsym + s]++;
            }
        }
    Py_END_ALLOW_THREADS
    release(&src); release(&rows); release(&lut); release(&out);
    if (bad) { PyErr_SetString(PyExc_ValueError, "an element's symbol is outside the alphabet"); return NULL; }
    Py_RETURN_NONE;
}

/* A 64-bit hash of each token row (all L blocks of D elements at token t), to find repeated rows. */
static PyObject *py_row_hashes(PyObject *self, PyObject *args) {
    PyObject *src_o, *out_o;
    int itemsize;
    Py_ssize_t L, T, D;
    if (!PyArg_ParseTuple(args, "OinnnO", &src_o, &itemsize, &L, &T, &D, &out_o)) return NULL;
    Buf src, out;
    if (get_buf(src_o, &src, 0, (Py_ssize_t)(L * T * D * itemsize), "source") < 0
        || get_buf(out_o, &out, 1, (Py_ssize_t)(8 * T), "hashes") < 0) {
        release(&src);
        return NULL;
    }
    const uint8_t *p = U8(src);
    uint64_t *h = (uint64_t *)out.view.buf;
    size_t row_bytes = (size_t)D * itemsize;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < T; t++) h[t] = 0x9E3779B97F4A7C15ull;
    for (Py_ssize_t l = 0; l < L; l++)
        for (Py_ssize_t t = 0; t < T; t++) {
            const uint8_t *r = p + ((size_t)l * T + t) * row_bytes;
            uint64_t x = h[t];
            size_t i = 0;
            for (; i + 8 <= row_bytes; i += 8) {
                uint64_t w;
                memcpy(&w, r + i, 8);
                x = (x ^ w) * 0xFF51AFD7ED558CCDull;
                x ^= x >> 29;
            }
            for (; i < row_bytes; i++) { x = (x ^ r[i]) * 0xC4CEB9FE1A85EC53ull; x ^= x >> 31; }
            h[t] = x;
        }
    Py_END_ALLOW_THREADS
    release(&src); release(&out);
    Py_RETURN_NONE;
}

/* ---- format 2: encode ----------------------------------------------------------------------------------------- */

static inline void store_be32(uint8_t *p, uint32_t v) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    memcpy(p, &v, 4);
}

static inline void store_le32(uint8_t *p, uint32_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    memcpy(p, &v, 4);
}

typedef struct {
    const uint8_t *src, *keep;
    const uint32_t *const *chan; /* per channel: its model's entries, code << 8 | (length + 1) per symbol */
    const uint16_t *map;          /* u >> shift -> symbol (nsym: outside the alphabet, an entry of 0) */
    size_t L, T, D, count;
    int shift, zero_bits, raw_bits;
    uint32_t *entries;            /* scratch: each coded element's entry */
    uint8_t *out[STREAMS], *raw, *plane;
    uint64_t bits[STREAMS];
} EncodeJob;

typedef struct {
    uint8_t *out;
    size_t pos;   /* bytes written */
    uint64_t acc; /* pending bits: the lowest `bits` */
    int bits;
} Writer;

/* Stream j's share of the entries ent[0..n) (elements first + j, first + j + 4, ..., where first is a multiple
   of 4): their codes, MSB first, with the writer held in registers. */
static inline __attribute__((always_inline)) void write_codes(Writer *w, const uint32_t *ent, size_t n, int j) {
    uint8_t *out = w->out;
    size_t pos = w->pos;
    uint64_t acc = w->acc;
    int bits = w->bits;
    for (size_t i = (size_t)j; i < n; i += STREAMS) {
        uint32_t e = ent[i], len = (e & 31) - 1;
        acc = (acc << len) | (e >> 8);
        bits += len;
        if (bits >= 32) { bits -= 32; store_be32(out + pos, (uint32_t)(acc >> bits)); pos += 4; }
    }
    w->pos = pos; w->acc = acc; w->bits = bits;
}

#define ENCODE_BLOCK 4096 /* entries gathered before they are written out, stream by stream (stays in L1) */

/* Two passes per block of coded elements: their entries (and raw bits and plane bytes) in order, then each
   stream's codes. */
static inline __attribute__((always_inline)) int encode_rows(EncodeJob *job, const int ITEM, const int PB,
                                                             const int HAS_RAW) {
    const size_t L = job->L, T = job->T, D = job->D;
    const int shift = job->shift, z = job->zero_bits, r = job->raw_bits;
    const uint32_t raw_mask = (1u << r) - 1, zero_mask = (1u << z) - 1;
    const uint16_t *map = job->map;
    uint32_t *ent = job->entries;
    uint8_t *rp = job->raw, *pl = job->plane;
    size_t rpos = 0, k = 0, n = 0; /* k: coded elements so far; n: of them, entries not written out yet */
    uint64_t racc = 0;
    int rbits = 0;
    Writer w[STREAMS];
    for (int j = 0; j < STREAMS; j++) { w[j].out = job->out[j]; w[j].pos = 0; w[j].acc = 0; w[j].bits = 0; }
    for (size_t l = 0; l < L; l++)
        for (size_t t = 0; t < T; t++) {
            if (!job->keep[t]) continue;
            const uint8_t *p = job->src + ((l * T + t) * D) * ITEM;
            const uint32_t *const *mrow = job->chan + l * D;
            for (size_t d = 0; d < D; d++, k++) {
                uint32_t u = ITEM == 2 ? (uint32_t)((const uint16_t *)p)[d] : ((const uint32_t *)p)[d];
                uint32_t e = mrow[d][map[u >> shift]];
                if (!e || (u & zero_mask)) return ERR_SYMBOL;
                u >>= z; /* the low part: shift - z bits, above z bits that are zero in every element */
                ent[n++] = e;
                if (HAS_RAW) {
                    racc |= (uint64_t)((u >> (8 * PB)) & raw_mask) << rbits;
                    rbits += r;
                    if (rbits >= 32) { store_le32(rp + rpos, (uint32_t)racc); rpos += 4; racc >>= 32; rbits -= 32; }
                }
                if (PB == 1) pl[k] = (uint8_t)u;
                else if (PB == 2) { uint16_t lo = (uint16_t)u; memcpy(pl + 2 * k, &lo, 2); }
            }
            if (n >= ENCODE_BLOCK) { /* write out whole groups of four; keep the rest for the next block */
                size_t whole = n & ~(size_t)(STREAMS - 1);
                for (int j = 0; j < STREAMS; j++) write_codes(&w[j], ent, whole, j);
                memmove(ent, ent + whole, (n - whole) * sizeof(uint32_t));
                n -= whole;
            }
        }
    for (int j = 0; j < STREAMS; j++) write_codes(&w[j], ent, n, j);
    for (; rbits > 0; rbits -= 8, racc >>= 8) rp[rpos++] = (uint8_t)racc; /* zero bits pad the last byte */
    for (int j = 0; j < STREAMS; j++) {
        job->bits[j] = 8 * (uint64_t)w[j].pos + w[j].bits;
        while (w[j].bits > 0) { /* the last byte is padded with zero bits */
            int b = w[j].bits;
            w[j].out[w[j].pos++] = b >= 8 ? (uint8_t)(w[j].acc >> (b - 8)) : (uint8_t)(w[j].acc << (8 - b));
            w[j].bits = b >= 8 ? b - 8 : 0;
        }
    }
    return OK;
}

#define ENCODE_VARIANTS(PREFIX, ATTR)                                                                             \
    ATTR static int PREFIX(EncodeJob *job, int itemsize, int pb) {                                                \
        int raw = job->raw_bits > 0;                                                                              \
        if (itemsize == 2 && pb == 0) return raw ? encode_rows(job, 2, 0, 1) : encode_rows(job, 2, 0, 0);         \
        if (itemsize == 2) return raw ? encode_rows(job, 2, 1, 1) : encode_rows(job, 2, 1, 0);                    \
        if (pb == 2) return raw ? encode_rows(job, 4, 2, 1) : encode_rows(job, 4, 2, 0);                          \
        if (pb == 1) return raw ? encode_rows(job, 4, 1, 1) : encode_rows(job, 4, 1, 0);                          \
        return raw ? encode_rows(job, 4, 0, 1) : encode_rows(job, 4, 0, 0);                                       \
    }

ENCODE_VARIANTS(encode_plain, )
#if defined(__x86_64__) && defined(__GNUC__)
ENCODE_VARIANTS(encode_bmi2, __attribute__((target("bmi,bmi2,movbe"))))
static int encode_job(EncodeJob *job, int itemsize, int pb) {
    int modern = __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("movbe");
    return modern ? encode_bmi2(job, itemsize, pb) : encode_plain(job, itemsize, pb);
}
#else
static int encode_job(EncodeJob *job, int itemsize, int pb) { return encode_plain(job, itemsize, pb); }
#endif

/* encode(src, itemsize, shift, zero_bits, L, T, D, rows, lut, nsym, models, lengths, K, table_log, plane, raw,
   (out0..out3)) -> (bits0, bits1, bits2, bits3). Coded element k (rows[t] != 0, in l, t, d order): its symbol's
   code to stream k % 4; of its low part (bits zero_bits .. shift - 1), the lowest min(2, bits / 8) bytes to
   `plane` and the rest to `raw`. Each output must hold what the most expensive encoding takes (table_log bits per
   code). */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    PyObject *src_o, *rows_o, *lut_o, *models_o, *lengths_o, *plane_o, *raw_o, *outs_o[STREAMS];
    int itemsize, shift, nsym, K, table_log;
    Py_ssize_t L, T, D;
    int zero_bits;
    if (!PyArg_ParseTuple(args, "OiiinnnOOiOOiiOO(OOOO)", &src_o, &itemsize, &shift, &zero_bits, &L, &T, &D, &rows_o,
                          &lut_o, &nsym, &models_o, &lengths_o, &K, &table_log, &plane_o, &raw_o, &outs_o[0],
                          &outs_o[1], &outs_o[2], &outs_o[3]) || check_item(itemsize, shift, zero_bits) < 0)
        return NULL;
    if (table_log < 1 || table_log > MAX_TABLE_LOG || nsym < 1 || nsym > MAX_SYMBOLS || K < 1 || K > MAX_MODELS
        || L < 0 || T < 0 || D < 0) {
        PyErr_SetString(PyExc_ValueError, "table_log, symbols, models or shape out of range");
        return NULL;
    }
    size_t bins = (size_t)1 << (8 * itemsize - shift), C = (size_t)L * D;
    const int pb = plane_bytes(shift - zero_bits), r = shift - zero_bits - 8 * pb;
    Buf src, rows, lut, models, lengths, plane, raw, outs[STREAMS];
    rows.held = lut.held = models.held = lengths.held = plane.held = raw.held = 0;
    for (int j = 0; j < STREAMS; j++) outs[j].held = 0;
    int fail = get_buf(src_o, &src, 0, (Py_ssize_t)(L * T * D * itemsize), "source") < 0
        || get_buf(rows_o, &rows, 0, T, "rows") < 0 || get_buf(lut_o, &lut, 0, (Py_ssize_t)(2 * bins), "lut") < 0
        || get_buf(models_o, &models, 0, (Py_ssize_t)C, "models") < 0
        || get_buf(lengths_o, &lengths, 0, (Py_ssize_t)K * nsym, "lengths") < 0
        || get_buf(plane_o, &plane, 1, 0, "plane") < 0 || get_buf(raw_o, &raw, 1, 0, "raw plane") < 0;
    for (int j = 0; j < STREAMS && !fail; j++) fail = get_buf(outs_o[j], &outs[j], 1, 0, "stream") < 0;
    size_t count = 0;
    for (Py_ssize_t t = 0; t < T && !fail; t++) count += U8(rows)[t] != 0;
    count *= C;
    int status = fail ? ERR_NOMEM : OK;
    /* what the outputs must hold: every code at its longest, every raw bit, whole words */
    for (int j = 0; j < STREAMS && status == OK; j++)
        if ((size_t)outs[j].view.len < ((count / STREAMS + 1) * table_log + 7) / 8 + 8) status = ERR_NOMEM;
    if (status == OK && ((size_t)raw.view.len < (count * r + 7) / 8 + 8 || (size_t)plane.view.len < count * pb))
        status = ERR_NOMEM;
    uint16_t *codes = status == OK ? malloc(sizeof(uint16_t) * (size_t)K * nsym) : NULL;
    uint32_t *mcodes = status == OK ? malloc(sizeof(uint32_t) * (size_t)K * (nsym + 1)) : NULL;
    uint16_t *map = status == OK ? malloc(sizeof(uint16_t) * bins) : NULL;
    const uint32_t **chan = status == OK ? malloc(sizeof(uint32_t *) * (C ? C : 1)) : NULL;
    uint32_t *entries = status == OK ? malloc(sizeof(uint32_t) * (ENCODE_BLOCK + (size_t)D)) : NULL;
    if (status == OK && !(codes && mcodes && map && chan && entries)) status = ERR_NOMEM;
    for (int k = 0; k < K && status == OK; k++)
        status = canonical(U8(lengths) + (size_t)k * nsym, nsym, table_log, codes + (size_t)k * nsym);
    for (size_t c = 0; c < C && status == OK; c++)
        if (U8(models)[c] >= K) status = ERR_MODEL;
    EncodeJob job;
    if (status == OK) {
        /* a model's entry per symbol: code << 8 | (length + 1); 0 where the symbol has no code, and in the extra
           column nsym, where elements outside the alphabet land */
        for (int m = 0; m < K; m++)
            for (int s = 0; s <= nsym; s++) {
                size_t i = (size_t)m * nsym + s;
                mcodes[(size_t)m * (nsym + 1) + s] =
                    s < nsym && U8(lengths)[i] ? ((uint32_t)codes[i] << 8) | U8(lengths)[i] : 0;
            }
        for (size_t b = 0; b < bins; b++) {
            uint16_t s = ((const uint16_t *)lut.view.buf)[b];
            map[b] = s < nsym ? s : (uint16_t)nsym;
        }
        for (size_t c = 0; c < C; c++) chan[c] = mcodes + (size_t)U8(models)[c] * (nsym + 1);
        job.src = U8(src); job.keep = U8(rows); job.chan = chan; job.map = map; job.entries = entries;
        job.L = (size_t)L; job.T = (size_t)T; job.D = (size_t)D; job.shift = shift; job.raw_bits = r;
        job.zero_bits = zero_bits;
        for (int j = 0; j < STREAMS; j++) job.out[j] = U8(outs[j]);
        job.raw = U8(raw); job.plane = U8(plane);
        Py_BEGIN_ALLOW_THREADS
        status = encode_job(&job, itemsize, pb);
        Py_END_ALLOW_THREADS
    }
    free(codes); free(mcodes); free(map); free((void *)chan); free(entries);
    release(&src); release(&rows); release(&lut); release(&models); release(&lengths); release(&plane);
    release(&raw);
    for (int j = 0; j < STREAMS; j++) release(&outs[j]);
    if (fail) return NULL;
    if (status == ERR_SYMBOL) { PyErr_SetString(PyExc_ValueError, "an element's symbol has no code"); return NULL; }
    if (status == ERR_MODEL) { PyErr_SetString(PyExc_ValueError, "invalid model"); return NULL; }
    if (status != OK) { PyErr_SetString(PyExc_ValueError, "encode: output buffers too small"); return NULL; }
    return Py_BuildValue("(KKKK)", (unsigned long long)job.bits[0], (unsigned long long)job.bits[1],
                         (unsigned long long)job.bits[2], (unsigned long long)job.bits[3]);
}

/* ---- format 2: decode ----------------------------------------------------------------------------------------- */

static inline uint64_t load_be(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static uint64_t load_tail(const uint8_t *p, uint64_t n, uint64_t byte) { /* bytes past the end read as zeros */
    uint8_t tmp[8] = {0};
    for (uint64_t i = 0; i < 8 && byte + i < n; i++) tmp[i] = p[byte + i];
    return load_be(tmp);
}

static inline uint64_t load_le(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static uint64_t load_le_tail(const uint8_t *p, uint64_t n, uint64_t byte) {
    uint8_t tmp[8] = {0};
    for (uint64_t i = 0; i < 8 && byte + i < n; i++) tmp[i] = p[byte + i];
    return load_le(tmp);
}

typedef struct {
    const uint8_t *base[STREAMS];
    uint64_t nbytes[STREAMS], nbits[STREAMS];
    size_t L, T, D;
    const uint32_t *sources;
    const uint16_t **chan; /* decode table of each channel: per index, (code length, upper part) */
    const uint8_t *plane, *raw;
    uint64_t raw_bytes;
    int table_log, raw_bits, zero_bits;
    uint8_t *out;
} Job;

/* Refill stream J's window at its bit position: 56 data bits, MSB first, above a sentinel bit at bit 7. Every
   bit read shifts the window left, so the sentinel's position tells how many bits were read since the refill
   (at most 56: `per` elements between refills). */
#define RELOAD(J, CHECKED)                                                                                        \
    do {                                                                                                          \
        if (loads) pos##J += (uint64_t)__builtin_ctzll(c##J) - 7;                                                 \
        uint64_t byte_ = pos##J >> 3;                                                                             \
        c##J = ((CHECKED) && byte_ + 8 > job->nbytes[J] ? load_tail(job->base[J], job->nbytes[J], byte_)          \
                                                        : load_be(job->base[J] + byte_)) << (pos##J & 7);         \
        c##J = (c##J & ~(uint64_t)0xFF) | 0x80;                                                                   \
    } while (0)

/* Unchecked (the common case) when every stream has a row's worth of bytes left after this refill. */
#define RELOAD_ALL()                                                                                              \
    do {                                                                                                          \
        if (fast) { RELOAD(0, 0); RELOAD(1, 0); RELOAD(2, 0); RELOAD(3, 0); }                                     \
        else { RELOAD(0, 1); RELOAD(1, 1); RELOAD(2, 1); RELOAD(3, 1); }                                          \
        loads = 1;                                                                                                \
        g = G;                                                                                                    \
    } while (0)

/* One element from stream J into element I of the row (coded element KK), its raw bits RAW: a table lookup on
   the window's top TL bits gives the code's length and the element's upper part. */
#define ONE(J, I, KK, RAW)                                                                                        \
    do {                                                                                                          \
        const uint16_t *e_ = dts[I] + 2 * (c##J >> (64 - TL));                                                    \
        c##J <<= e_[0];                                                                                           \
        uint32_t top_ = (uint32_t)e_[1] | (RAW);                                                                  \
        if (ITEM == 2 && PB == 0) ((uint16_t *)row)[I] = (uint16_t)(top_ << zb);                                  \
        else if (ITEM == 2) ((uint16_t *)row)[I] = (uint16_t)(((top_ << 8) | job->plane[KK]) << zb);              \
        else if (PB == 2) {                                                                                       \
            uint16_t lo_; memcpy(&lo_, job->plane + 2 * (KK), 2); ((uint32_t *)row)[I] = ((top_ << 16) | lo_) << zb; \
        } else if (PB == 1) ((uint32_t *)row)[I] = ((top_ << 8) | job->plane[KK]) << zb;                          \
        else ((uint32_t *)row)[I] = top_ << zb;                                                                   \
    } while (0)

#define NEXT_RAW() (HAS_RAW ? (rv_ = (uint32_t)(w_ & raw_mask), w_ >>= raw_bits, rv_) : 0u)

/* The decoder, specialized (always inlined) by element width, plane bytes, raw bits or none, table_log. */
static inline __attribute__((always_inline)) int decode_rows(const Job *job, const int ITEM, const int PB,
                                                             const int HAS_RAW, const int TL, const int ZERO) {
    const int raw_bits = job->raw_bits, zb = ZERO ? job->zero_bits : 0;
    const uint64_t raw_mask = ((uint64_t)1 << raw_bits) - 1;
    const size_t L = job->L, T = job->T, D = job->D, row_bytes = D * ITEM;
    const size_t per = (size_t)(56 / TL); /* elements a stream decodes between refills */
    const size_t G = STREAMS * per;
    const uint64_t margin = 16 + ((D / STREAMS + per + 1) * (uint64_t)TL) / 8;
    const uint64_t raw_margin = 16 + (D * (uint64_t)raw_bits) / 8;
    uint64_t pos0 = 0, pos1 = 0, pos2 = 0, pos3 = 0, c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    int loads = 0;
    size_t k = 0, g = 0;
    for (size_t l = 0; l < L; l++) {
        const uint16_t *const *dts = job->chan + l * D;
        for (size_t t = 0; t < T; t++) {
            uint8_t *row = job->out + (l * T + t) * row_bytes;
            if (job->sources && job->sources[t] != t) {
                memcpy(row, job->out + (l * T + job->sources[t]) * row_bytes, row_bytes);
                continue;
            }
            /* a row reads at most margin bytes of a stream past its position: refills need no bounds check */
            int fast = (pos0 >> 3) + margin <= job->nbytes[0] && (pos1 >> 3) + margin <= job->nbytes[1]
                       && (pos2 >> 3) + margin <= job->nbytes[2] && (pos3 >> 3) + margin <= job->nbytes[3]
                       && (!HAS_RAW || (k * raw_bits >> 3) + raw_margin <= job->raw_bytes);
            size_t d = 0;
            if ((k & 7) == 0 && fast)
                for (; d + 8 <= D; d += 8, k += 8) { /* eight elements: their raw bits are one 64-bit load */
                    uint64_t w_ = HAS_RAW ? load_le(job->raw + (k >> 3) * raw_bits) : 0;
                    uint32_t rv_;
                    if (g == 0) RELOAD_ALL();
                    ONE(0, d, k, NEXT_RAW()); ONE(1, d + 1, k + 1, NEXT_RAW());
                    ONE(2, d + 2, k + 2, NEXT_RAW()); ONE(3, d + 3, k + 3, NEXT_RAW());
                    g -= 4;
                    if (g == 0) RELOAD_ALL();
                    ONE(0, d + 4, k + 4, NEXT_RAW()); ONE(1, d + 5, k + 5, NEXT_RAW());
                    ONE(2, d + 6, k + 6, NEXT_RAW()); ONE(3, d + 7, k + 7, NEXT_RAW());
                    g -= 4;
                }
            for (; d < D; d++, k++) {
                uint32_t raw = 0;
                if (HAS_RAW) {
                    uint64_t bit = k * raw_bits;
                    raw = (uint32_t)((load_le_tail(job->raw, job->raw_bytes, bit >> 3) >> (bit & 7)) & raw_mask);
                }
                if (g == 0) RELOAD_ALL();
                g--;
                switch (k & 3) {
                    case 0: ONE(0, d, k, raw); break;
                    case 1: ONE(1, d, k, raw); break;
                    case 2: ONE(2, d, k, raw); break;
                    default: ONE(3, d, k, raw); break;
                }
            }
        }
    }
    if (loads) { /* every stream must end exactly at its last bit */
        pos0 += (uint64_t)__builtin_ctzll(c0) - 7; pos1 += (uint64_t)__builtin_ctzll(c1) - 7;
        pos2 += (uint64_t)__builtin_ctzll(c2) - 7; pos3 += (uint64_t)__builtin_ctzll(c3) - 7;
    }
    uint64_t pos[STREAMS] = {pos0, pos1, pos2, pos3};
    for (int j = 0; j < STREAMS; j++) {
        if (pos[j] > job->nbits[j]) return ERR_SHORT;
        if (pos[j] < job->nbits[j]) return ERR_LEFTOVER;
    }
    return OK;
}

/* Specialized copies: table_log 11 (what the encoder writes) without zero bits, for each element layout; and
   one general copy per layout (any table_log, zero bits). */
#define LAYOUTS(TL, ZERO)                                                                                         \
    if (itemsize == 2 && pb == 0) return raw ? decode_rows(job, 2, 0, 1, TL, ZERO) : decode_rows(job, 2, 0, 0, TL, ZERO); \
    if (itemsize == 2) return raw ? decode_rows(job, 2, 1, 1, TL, ZERO) : decode_rows(job, 2, 1, 0, TL, ZERO);   \
    if (pb == 2) return raw ? decode_rows(job, 4, 2, 1, TL, ZERO) : decode_rows(job, 4, 2, 0, TL, ZERO);         \
    if (pb == 1) return raw ? decode_rows(job, 4, 1, 1, TL, ZERO) : decode_rows(job, 4, 1, 0, TL, ZERO);         \
    return raw ? decode_rows(job, 4, 0, 1, TL, ZERO) : decode_rows(job, 4, 0, 0, TL, ZERO);

#define VARIANTS(PREFIX, ATTR)                                                                                    \
    ATTR static int PREFIX(const Job *job, int itemsize, int pb) {                                                \
        int raw = job->raw_bits > 0;                                                                              \
        if (job->table_log == 11 && job->zero_bits == 0) { LAYOUTS(11, 0) }                                       \
        LAYOUTS(job->table_log, 1)                                                                                \
    }

VARIANTS(decode_plain, )
#if defined(__x86_64__) && defined(__GNUC__)
/* shifts by a variable count in one instruction, byte-swapping loads, one-instruction trailing zero counts */
VARIANTS(decode_bmi2, __attribute__((target("bmi,bmi2,movbe"))))
static int decode_job(const Job *job, int itemsize, int pb) {
    int modern = __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("movbe");
    return modern ? decode_bmi2(job, itemsize, pb) : decode_plain(job, itemsize, pb);
}
#else
static int decode_job(const Job *job, int itemsize, int pb) { return decode_plain(job, itemsize, pb); }
#endif

/* decode(streams, (bits0..bits3), itemsize, shift, zero_bits, L, T, D, sources|None, highs, nsym, models, lengths, K,
   table_log, plane, raw, out) -> status (0, or a negative ERR_ code). `streams`: the four streams back to back, each
   ceil(bits / 8) bytes; `sources[t]`: t for a coded token row, else the earlier coded row it repeats. */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    PyObject *streams_o, *sources_o, *highs_o, *models_o, *lengths_o, *plane_o, *raw_o, *out_o;
    unsigned long long bits[STREAMS];
    int itemsize, shift, nsym, K, table_log;
    Py_ssize_t L, T, D;
    int zero_bits;
    if (!PyArg_ParseTuple(args, "O(KKKK)iiinnnOOiOOiiOOO", &streams_o, &bits[0], &bits[1], &bits[2], &bits[3],
                          &itemsize, &shift, &zero_bits, &L, &T, &D, &sources_o, &highs_o, &nsym, &models_o,
                          &lengths_o, &K, &table_log, &plane_o, &raw_o, &out_o)
        || check_item(itemsize, shift, zero_bits) < 0)
        return NULL;
    if (table_log < 1 || table_log > MAX_TABLE_LOG || nsym < 1 || nsym > MAX_SYMBOLS || K < 1 || K > MAX_MODELS
        || L < 0 || T < 0 || D < 0) {
        PyErr_SetString(PyExc_ValueError, "table_log, symbols, models or shape out of range");
        return NULL;
    }
    size_t C = (size_t)L * D, size = (size_t)1 << table_log, count_rows = 0;
    int pb = plane_bytes(shift - zero_bits);
    Buf streams, sources, highs, models, lengths, plane, raw, out;
    sources.held = highs.held = models.held = lengths.held = plane.held = raw.held = out.held = 0;
    if (get_buf(streams_o, &streams, 0, 0, "streams") < 0
        || (sources_o != Py_None && get_buf(sources_o, &sources, 0, 4 * T, "sources") < 0)
        || get_buf(highs_o, &highs, 0, 2 * nsym, "highs") < 0
        || get_buf(models_o, &models, 0, (Py_ssize_t)C, "models") < 0
        || get_buf(lengths_o, &lengths, 0, (Py_ssize_t)K * nsym, "lengths") < 0
        || get_buf(plane_o, &plane, 0, 0, "plane") < 0 || get_buf(raw_o, &raw, 0, 0, "raw plane") < 0
        || get_buf(out_o, &out, 1, (Py_ssize_t)(L * T * D * itemsize), "out") < 0) {
        release(&streams); release(&sources); release(&highs); release(&models); release(&lengths);
        release(&plane); release(&raw); release(&out);
        return NULL;
    }
    int status = OK;
    const uint32_t *src_rows = sources.held ? (const uint32_t *)sources.view.buf : NULL;
    for (Py_ssize_t t = 0; t < T; t++) {
        if (src_rows && (src_rows[t] > (uint32_t)t || src_rows[src_rows[t]] != src_rows[t]))
            status = ERR_SOURCE; /* a copy must name an earlier row that was coded */
        count_rows += !src_rows || src_rows[t] == (uint32_t)t;
    }
    const uint8_t *model_of = U8(models);
    for (size_t c = 0; c < C && status == OK; c++)
        if (model_of[c] >= K) status = ERR_MODEL;
    Job job;
    uint64_t offset = 0;
    for (int j = 0; j < STREAMS; j++) {
        job.base[j] = U8(streams) + offset;
        job.nbytes[j] = (bits[j] + 7) / 8;
        job.nbits[j] = bits[j];
        offset += job.nbytes[j];
        if (offset > (uint64_t)streams.view.len) { status = ERR_LEFTOVER; break; }
        if (bits[j] % 8 && (job.base[j][job.nbytes[j] - 1] & (0xFF >> (bits[j] % 8))))
            status = ERR_LEFTOVER; /* a stream's padding is zero bits */
    }
    int raw_bits = shift - zero_bits - 8 * pb;
    uint64_t raw_total = (uint64_t)count_rows * C * raw_bits;
    if (offset != (uint64_t)streams.view.len || (size_t)plane.view.len != count_rows * C * pb
        || (uint64_t)raw.view.len != (raw_total + 7) / 8)
        status = ERR_LEFTOVER;
    if (status == OK && raw_total % 8 && (U8(raw)[raw.view.len - 1] >> (raw_total % 8)))
        status = ERR_LEFTOVER; /* the raw plane's padding is zero bits */
    uint16_t *tables = NULL;
    const uint16_t **chan = NULL;
    if (status == OK) {
        tables = malloc(sizeof(uint16_t) * 2 * size * K);
        chan = malloc(sizeof(uint16_t *) * (C ? C : 1));
        if (!tables || !chan) status = ERR_NOMEM;
        for (int k = 0; k < K && status == OK; k++)
            status = build_dtable(U8(lengths) + (size_t)k * nsym, (const uint16_t *)highs.view.buf, nsym, table_log,
                                  raw_bits, tables + 2 * k * size);
        for (size_t c = 0; c < C && status == OK; c++) chan[c] = tables + 2 * model_of[c] * size;
    }
    if (status == OK) {
        job.L = (size_t)L; job.T = (size_t)T; job.D = (size_t)D;
        job.sources = src_rows; job.chan = chan; job.plane = U8(plane);
        job.raw = U8(raw); job.raw_bytes = (uint64_t)raw.view.len;
        job.table_log = table_log; job.raw_bits = raw_bits; job.zero_bits = zero_bits; job.out = U8(out);
        Py_BEGIN_ALLOW_THREADS
        status = decode_job(&job, itemsize, pb);
        Py_END_ALLOW_THREADS
    }
    free(tables); free((void *)chan);
    release(&streams); release(&sources); release(&highs); release(&models); release(&lengths);
    release(&plane); release(&raw); release(&out);
    return PyLong_FromLong(status);
}

/* ---- format 1 (legacy rANS): decode only ---------------------------------------------------------------------- */

#define V1_PROB_BITS 12
#define V1_SCALE (1 << V1_PROB_BITS)
#define V1_ALPHABET 512

/* decode_v1(words, states, labels, freqs, itemsize, L, T, D, low, out) -> status.
   words: the 16-bit words after the four 32-bit states; labels: u8 [L*D] model of each channel; freqs: u16
   [K * 512]; low: the element's lower bytes, little-endian, (itemsize - 1) bytes per element (the sign bit
   cleared), interleaved. Rows (channels) are coded channel-major, token t of a row with state t % 4. */
static PyObject *py_decode_v1(PyObject *self, PyObject *args) {
    PyObject *words_o, *labels_o, *freqs_o, *low_o, *out_o;
    unsigned int s[4];
    int itemsize, K;
    Py_ssize_t L, T, D;
    if (!PyArg_ParseTuple(args, "O(IIII)OOiinnnOO", &words_o, &s[0], &s[1], &s[2], &s[3], &labels_o, &freqs_o, &K,
                          &itemsize, &L, &T, &D, &low_o, &out_o))
        return NULL;
    if ((itemsize != 2 && itemsize != 4) || K < 1 || K > 256 || L < 0 || T < 0 || D < 0) {
        PyErr_SetString(PyExc_ValueError, "decode_v1: bad arguments");
        return NULL;
    }
    size_t C = (size_t)L * D, n = C * T;
    Buf words, labels, freqs, low, out;
    labels.held = freqs.held = low.held = out.held = 0;
    if (get_buf(words_o, &words, 0, 0, "words") < 0 || get_buf(labels_o, &labels, 0, (Py_ssize_t)C, "labels") < 0
        || get_buf(freqs_o, &freqs, 0, 2 * V1_ALPHABET * K, "freqs") < 0
        || get_buf(low_o, &low, 0, (Py_ssize_t)(n * (itemsize - 1)), "low") < 0
        || get_buf(out_o, &out, 1, (Py_ssize_t)(n * itemsize), "out") < 0) {
        release(&words); release(&labels); release(&freqs); release(&low); release(&out);
        return NULL;
    }
    int status = OK;
    const uint16_t *fq = (const uint16_t *)freqs.view.buf;
    uint16_t *sym = malloc(sizeof(uint16_t) * V1_SCALE * K);
    uint32_t *packed = malloc(sizeof(uint32_t) * V1_SCALE * K);
    uint16_t *symbols = malloc(sizeof(uint16_t) * (n ? n : 1));
    if (!sym || !packed || !symbols) status = ERR_NOMEM;
    for (int g = 0; g < K && status == OK; g++) { /* slot -> symbol, and freq << 13 | (slot - cum) */
        uint32_t slot = 0;
        for (int v = 0; v < V1_ALPHABET; v++)
            for (uint32_t j = 0; j < fq[g * V1_ALPHABET + v]; j++, slot++) {
                if (slot >= V1_SCALE) { status = ERR_MODEL; break; }
                sym[g * V1_SCALE + slot] = (uint16_t)v;
                packed[g * V1_SCALE + slot] = ((uint32_t)fq[g * V1_ALPHABET + v] << 13) | j;
            }
        if (slot != V1_SCALE) status = ERR_MODEL;
    }
    const uint8_t *lab = U8(labels);
    for (size_t c = 0; c < C && status == OK; c++)
        if (lab[c] >= K) status = ERR_MODEL;
    if (status == OK) {
        const uint8_t *wb = U8(words);
        size_t count = (size_t)words.view.len / 2, pos = 0;
        uint64_t x[4] = {s[0], s[1], s[2], s[3]};
        const uint8_t *lo = U8(low);
        uint8_t *o = U8(out);
        Py_BEGIN_ALLOW_THREADS
        for (size_t r = 0; r < C && status == OK; r++) {
            int g = lab[r];
            for (size_t t = 0; t < (size_t)T; t++) {
                int j = (int)(t & 3);
                uint32_t slot = (uint32_t)(x[j] & (V1_SCALE - 1));
                symbols[r * T + t] = sym[g * V1_SCALE + slot];
                uint32_t p = packed[g * V1_SCALE + slot];
                x[j] = (uint64_t)(p >> 13) * (x[j] >> V1_PROB_BITS) + (p & 0x1FFF);
                if (x[j] < 65536) {
                    if (pos >= count) { status = ERR_SHORT; break; }
                    x[j] = (x[j] << 16) | (uint64_t)(wb[2 * pos] | (wb[2 * pos + 1] << 8));
                    pos++;
                }
            }
        }
        if (status == OK && pos != count) status = ERR_LEFTOVER;
        if (status == OK && (x[0] != 65536 || x[1] != 65536 || x[2] != 65536 || x[3] != 65536)) status = ERR_STATES;
        if (status == OK) { /* element = rotate right by one of (lower bytes, sign cleared) | exponent | sign */
            int shift = 8 * itemsize - 8;
            for (size_t l = 0; l < (size_t)L; l++)
                for (size_t t = 0; t < (size_t)T; t++)
                    for (size_t d = 0; d < (size_t)D; d++) {
                        size_t i = (l * T + t) * D + d;
                        uint32_t symbol = symbols[(l * D + d) * T + t];
                        uint32_t lower = lo[i * (itemsize - 1)];
                        for (int b = 1; b < itemsize - 1; b++) lower |= (uint32_t)lo[i * (itemsize - 1) + b] << (8 * b);
                        uint32_t v = (lower & ~1u) | ((symbol >> 1) << shift) | (symbol & 1);
                        uint32_t u = (v >> 1) | ((v & 1) << (8 * itemsize - 1));
                        if (itemsize == 2) { uint16_t u16 = (uint16_t)u; memcpy(o + 2 * i, &u16, 2); }
                        else memcpy(o + 4 * i, &u, 4);
                    }
        }
        Py_END_ALLOW_THREADS
    }
    free(sym); free(packed); free(symbols);
    release(&words); release(&labels); release(&freqs); release(&low); release(&out);
    return PyLong_FromLong(status);
}

static PyMethodDef methods[] = {
    {"histogram", py_histogram, METH_VARARGS, "Add the counts of u >> shift to a uint32 histogram."},
    {"channel_histogram", py_channel_histogram, METH_VARARGS, "Per-channel symbol counts over the coded rows."},
    {"row_hashes", py_row_hashes, METH_VARARGS, "A 64-bit hash of each token row."},
    {"lengths", py_lengths, METH_VARARGS, "Length-limited Huffman code lengths of each model."},
    {"encode", py_encode, METH_VARARGS, "Huffman-encode a tensor (format 2)."},
    {"decode", py_decode, METH_VARARGS, "Decode a format-2 stream; returns a status code."},
    {"decode_v1", py_decode_v1, METH_VARARGS, "Decode a format-1 (rANS) stream; returns a status code."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "kvmart's codec kernels (C).", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
