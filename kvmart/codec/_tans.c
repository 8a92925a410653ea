/* kvmart's codec kernels (kvmart/codec/tans.py, legacy.py; the bitstream is specified in docs/FORMAT.md).

   Compiled by `pip install` (setup.py), so nothing is compiled on a request. Plain C99 over the buffer protocol:
   no numpy headers, every length checked here against the shapes it is given, and every read of a stream is
   bounds-checked, so corrupt input is an error code, never an out-of-bounds access. The hot loops release the GIL.

   Format 2 (tANS): each element u (16 or 32 bits) is split into a symbol, u >> shift, and `shift` raw low bits.
   Symbols are coded by tANS (FSE's table construction, tables of 2^table_log states), one model per channel
   cluster, four interleaved states (coded element k uses state k % 4), one bitstream that the encoder writes
   from the last element to the first and the decoder reads from its end: per element, `shift` raw bits, then the
   state's bits above them.

   Format 1 (rANS, kvmart <= 0.1's codec): decode only, kept so that old artifacts still load. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TABLE_LOG 12
#define MIN_TABLE_LOG 5
#define MAX_SYMBOLS 4096
#define MAX_MODELS 255
#define STATES 4

/* status codes shared with the Python side (tans.py turns them into CodecError messages) */
#define OK 0
#define ERR_SHORT -1      /* the stream ran out */
#define ERR_LEFTOVER -2   /* bits left over */
#define ERR_STATES -3     /* the states do not end where the encoder started */
#define ERR_MODEL -4      /* an invalid model */
#define ERR_SOURCE -5     /* a copied row that does not come from an earlier one */
#define ERR_NOMEM -6
#define ERR_SYMBOL -7     /* an element whose symbol is not in the alphabet (encoder) */

static int highbit(uint32_t v) { return 31 - __builtin_clz(v); } /* v > 0 */

static uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static void store64(uint8_t *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

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

static int check_item(int itemsize, int shift) {
    if ((itemsize != 2 && itemsize != 4) || shift < 0 || shift > 8 * itemsize - 1 || 8 * itemsize - shift > 16) {
        PyErr_Format(PyExc_ValueError, "itemsize %d with shift %d", itemsize, shift);
        return -1;
    }
    return 0;
}

static inline uint32_t element(const uint8_t *src, int itemsize, size_t i) {
    if (itemsize == 2) { uint16_t v; memcpy(&v, src + 2 * i, 2); return v; }
    uint32_t v; memcpy(&v, src + 4 * i, 4); return v;
}

/* ---- tables --------------------------------------------------------------------------------------------------- */

/* FSE's symbol spread: symbol s takes freq[s] states, placed with a fixed odd step (coprime with the table size). */
static int spread(const uint16_t *freq, int nsym, int table_log, uint16_t *table) {
    uint32_t size = 1u << table_log, mask = size - 1, step = (size >> 1) + (size >> 3) + 3, pos = 0, total = 0;
    for (int s = 0; s < nsym; s++) {
        for (uint32_t i = 0; i < freq[s]; i++) {
            table[pos] = (uint16_t)s;
            pos = (pos + step) & mask;
        }
        total += freq[s];
    }
    return (total == size && pos == 0) ? OK : ERR_MODEL;
}

static int valid_model(const uint16_t *freq, int nsym, int table_log) {
    uint32_t total = 0;
    for (int s = 0; s < nsym; s++) total += freq[s];
    return total == (1u << table_log) ? OK : ERR_MODEL;
}

/* Decode table of one model: entry = base | nbits << 12 | high value << 16, for state x in [0, 2^table_log). */
static int build_dtable(const uint16_t *freq, const uint16_t *highs, int nsym, int table_log, uint32_t *dt,
                        uint16_t *scratch_spread, uint32_t *scratch_next) {
    if (valid_model(freq, nsym, table_log) != OK || spread(freq, nsym, table_log, scratch_spread) != OK) return ERR_MODEL;
    uint32_t size = 1u << table_log;
    for (int s = 0; s < nsym; s++) scratch_next[s] = freq[s];
    for (uint32_t u = 0; u < size; u++) {
        int s = scratch_spread[u];
        uint32_t next = scratch_next[s]++;
        int nb = table_log - highbit(next);
        uint32_t base = (next << nb) - size;
        dt[u] = base | ((uint32_t)nb << 12) | ((uint32_t)highs[s] << 16);
    }
    return OK;
}

typedef struct {
    int32_t delta_find;
    uint32_t delta_nbits;
} SymbolTT;

/* Encode tables of one model (FSE_buildCTable): state_table [2^table_log], symbol transforms [nsym]. */
static int build_ctable(const uint16_t *freq, int nsym, int table_log, uint16_t *state_table, SymbolTT *tt,
                        uint16_t *scratch_spread, uint32_t *scratch_cumul) {
    if (valid_model(freq, nsym, table_log) != OK || spread(freq, nsym, table_log, scratch_spread) != OK) return ERR_MODEL;
    uint32_t size = 1u << table_log, total = 0;
    for (int s = 0; s < nsym; s++) { scratch_cumul[s] = total; total += freq[s]; }
    for (uint32_t u = 0; u < size; u++) state_table[scratch_cumul[scratch_spread[u]]++] = (uint16_t)(size + u);
    total = 0;
    for (int s = 0; s < nsym; s++) {
        uint32_t f = freq[s];
        if (f == 0) {
            tt[s].delta_nbits = 0; tt[s].delta_find = 0;  /* never used: the encoder refuses such symbols */
        } else if (f == 1) {
            tt[s].delta_nbits = ((uint32_t)table_log << 16) - size;
            tt[s].delta_find = (int32_t)total - 1;
        } else {
            uint32_t max_bits = table_log - highbit(f - 1);
            tt[s].delta_nbits = (max_bits << 16) - (f << max_bits);
            tt[s].delta_find = (int32_t)total - (int32_t)f;
        }
        total += f;
    }
    return OK;
}

/* ---- format 2: encode ----------------------------------------------------------------------------------------- */

static PyObject *py_histogram(PyObject *self, PyObject *args) {
    PyObject *src_o, *out_o;
    int itemsize, shift;
    if (!PyArg_ParseTuple(args, "OiiO", &src_o, &itemsize, &shift, &out_o) || check_item(itemsize, shift) < 0)
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
        || check_item(itemsize, shift) < 0)
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

typedef struct {
    uint8_t *out;
    size_t cap, pos; /* bytes */
    uint64_t acc;
    int bits;
} Writer;

static inline void put(Writer *w, uint64_t value, int n) { /* n <= 32 */
    w->acc |= value << w->bits;
    w->bits += n;
    if (w->bits >= 32) {
        uint32_t lo = (uint32_t)w->acc;
        if (w->pos + 4 <= w->cap) {
            w->out[w->pos] = (uint8_t)lo; w->out[w->pos + 1] = (uint8_t)(lo >> 8);
            w->out[w->pos + 2] = (uint8_t)(lo >> 16); w->out[w->pos + 3] = (uint8_t)(lo >> 24);
        }
        w->pos += 4;
        w->acc >>= 32;
        w->bits -= 32;
    }
}

/* encode(src, itemsize, shift, L, T, D, rows, lut, nsym, models, freqs, K, table_log, out)
   -> (nbits, (s0, s1, s2, s3)) : the decoder's initial states; `out` must hold the bound computed in tans.py. */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    PyObject *src_o, *rows_o, *lut_o, *models_o, *freqs_o, *out_o;
    int itemsize, shift, nsym, K, table_log;
    Py_ssize_t L, T, D;
    if (!PyArg_ParseTuple(args, "OiinnnOOiOOiiO", &src_o, &itemsize, &shift, &L, &T, &D, &rows_o, &lut_o, &nsym,
                          &models_o, &freqs_o, &K, &table_log, &out_o) || check_item(itemsize, shift) < 0)
        return NULL;
    if (table_log < MIN_TABLE_LOG || table_log > MAX_TABLE_LOG || nsym < 1 || nsym > MAX_SYMBOLS || K < 1
        || K > MAX_MODELS) {
        PyErr_SetString(PyExc_ValueError, "table_log, symbols or models out of range");
        return NULL;
    }
    size_t bins = (size_t)1 << (8 * itemsize - shift), C = (size_t)L * D, size = (size_t)1 << table_log;
    Buf src, rows, lut, models, freqs, out;
    rows.held = lut.held = models.held = freqs.held = out.held = 0;
    if (get_buf(src_o, &src, 0, (Py_ssize_t)(L * T * D * itemsize), "source") < 0
        || get_buf(rows_o, &rows, 0, T, "rows") < 0 || get_buf(lut_o, &lut, 0, (Py_ssize_t)(2 * bins), "lut") < 0
        || get_buf(models_o, &models, 0, (Py_ssize_t)C, "models") < 0
        || get_buf(freqs_o, &freqs, 0, (Py_ssize_t)(2 * K * nsym), "freqs") < 0
        || get_buf(out_o, &out, 1, 0, "out") < 0) {
        release(&src); release(&rows); release(&lut); release(&models); release(&freqs); release(&out);
        return NULL;
    }
    uint16_t *state_tables = malloc(sizeof(uint16_t) * size * K);
    SymbolTT *tts = malloc(sizeof(SymbolTT) * (size_t)nsym * K);
    uint16_t *sp = malloc(sizeof(uint16_t) * size);
    uint32_t *cumul = malloc(sizeof(uint32_t) * nsym);
    const uint8_t *model_of = U8(models);
    int status = (state_tables && tts && sp && cumul) ? OK : ERR_NOMEM;
    for (int k = 0; k < K && status == OK; k++)
        status = build_ctable((const uint16_t *)freqs.view.buf + (size_t)k * nsym, nsym, table_log,
                              state_tables + k * size, tts + (size_t)k * nsym, sp, cumul);
    for (size_t c = 0; c < C && status == OK; c++)
        if (model_of[c] >= K) status = ERR_MODEL;
    uint64_t nbits = 0;
    uint32_t states[STATES] = {0, 0, 0, 0};
    Writer w = {U8(out), (size_t)out.view.len, 0, 0, 0};
    if (status == OK) {
        const uint8_t *p = U8(src), *keep = U8(rows);
        const uint16_t *map = (const uint16_t *)lut.view.buf, *fq = (const uint16_t *)freqs.view.buf;
        uint64_t low_mask = (shift == 0) ? 0 : ((1ull << shift) - 1);
        size_t coded_rows = 0;
        for (Py_ssize_t t = 0; t < T; t++) coded_rows += keep[t] != 0;
        size_t count = coded_rows * C; /* coded elements */
        uint32_t x[STATES];
        for (int j = 0; j < STATES; j++) x[j] = (uint32_t)size;
        Py_BEGIN_ALLOW_THREADS
        size_t k = count;
        for (Py_ssize_t l = L - 1; l >= 0 && status == OK; l--)
            for (Py_ssize_t t = T - 1; t >= 0 && status == OK; t--) {
                if (!keep[t]) continue;
                size_t base = ((size_t)l * T + t) * D;
                const uint8_t *mrow = model_of + (size_t)l * D;
                for (Py_ssize_t d = D - 1; d >= 0; d--) {
                    k--;
                    uint32_t u = element(p, itemsize, base + d);
                    uint32_t s = map[u >> shift];
                    int m = mrow[d];
                    if (s >= (uint32_t)nsym || fq[(size_t)m * nsym + s] == 0) { status = ERR_SYMBOL; break; }
                    const SymbolTT *tt = tts + (size_t)m * nsym + s;
                    int j = (int)(k & (STATES - 1));
                    uint32_t state = x[j];
                    int nb = (int)((state + tt->delta_nbits) >> 16);
                    /* the chunk the decoder reads right after this symbol: raw low bits, then the state's bits */
                    put(&w, u & low_mask, shift);
                    put(&w, state & ((1u << nb) - 1), nb);
                    x[j] = state_tables[m * size + (state >> nb) + tt->delta_find];
                }
            }
        Py_END_ALLOW_THREADS
        nbits = (uint64_t)w.pos * 8 + w.bits;
        while (w.bits > 0) { /* flush the last partial word, byte by byte */
            if (w.pos < w.cap) w.out[w.pos] = (uint8_t)w.acc;
            w.pos++; w.acc >>= 8; w.bits -= 8;
        }
        if (w.pos > w.cap) status = ERR_NOMEM;
        for (int j = 0; j < STATES; j++) states[j] = x[j] - (uint32_t)size;
    }
    free(state_tables); free(tts); free(sp); free(cumul);
    release(&src); release(&rows); release(&lut); release(&models); release(&freqs); release(&out);
    if (status == ERR_SYMBOL) { PyErr_SetString(PyExc_ValueError, "an element's symbol has no frequency"); return NULL; }
    if (status == ERR_MODEL) { PyErr_SetString(PyExc_ValueError, "invalid model"); return NULL; }
    if (status != OK) { PyErr_SetString(PyExc_MemoryError, "encode: out of memory or output too small"); return NULL; }
    return Py_BuildValue("K(IIII)", (unsigned long long)nbits, states[0], states[1], states[2], states[3]);
}

/* ---- format 2: decode ----------------------------------------------------------------------------------------- */

/* One element: state x -> the element's value, reading its chunk backward from bit `pos`. Returns 0 if the
   stream ran out. `n8` is the stream's byte count (>= 8): a read never leaves it. */
#define DECODE_ONE(X, DST)                                                                              \
    do {                                                                                                \
        uint32_t e = dt[(X)];                                                                           \
        uint32_t nb = (e >> 12) & 15;                                                                   \
        uint64_t len = shift + nb;                                                                      \
        if (pos < len) { status = ERR_SHORT; goto done; }                                               \
        pos -= len;                                                                                     \
        uint64_t byte = pos >> 3;                                                                       \
        if (byte > last) byte = last;                                                                   \
        uint64_t v = load64(stream + byte) >> (pos - 8 * byte);                                         \
        (DST) = ((e >> 16) << shift) | (uint32_t)(v & low_mask);                                        \
        (X) = (e & 0xFFF) + (uint32_t)((v >> shift) & ((1u << nb) - 1));                                \
    } while (0)

static int decode2(const uint8_t *stream, uint64_t nbytes, uint64_t nbits, uint32_t *x, int itemsize, int shift,
                   size_t L, size_t T, size_t D, const uint32_t *sources, const uint8_t *model_of,
                   const uint32_t *tables, int table_log, uint8_t *out) {
    uint64_t pos = nbits, last = nbytes - 8, low_mask = (shift == 0) ? 0 : ((1ull << shift) - 1);
    size_t size = (size_t)1 << table_log, row_bytes = D * itemsize;
    uint32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
    int status = OK;
    size_t k = 0; /* coded elements so far: element k uses state k % 4 */
    for (size_t l = 0; l < L; l++) {
        const uint8_t *mrow = model_of + l * D;
        for (size_t t = 0; t < T; t++) {
            uint8_t *row = out + (l * T + t) * row_bytes;
            if (sources && sources[t] != t) {
                memcpy(row, out + (l * T + sources[t]) * row_bytes, row_bytes);
                continue;
            }
            size_t d = 0;
            if (itemsize == 2 && (k & 3) == 0) { /* the common case: four elements, four states in registers */
                uint16_t *o = (uint16_t *)row;
                for (; d + 4 <= D; d += 4) {
                    uint32_t a, b, c, e4;
                    const uint32_t *dt;
                    dt = tables + mrow[d] * size; DECODE_ONE(x0, a);
                    dt = tables + mrow[d + 1] * size; DECODE_ONE(x1, b);
                    dt = tables + mrow[d + 2] * size; DECODE_ONE(x2, c);
                    dt = tables + mrow[d + 3] * size; DECODE_ONE(x3, e4);
                    o[d] = (uint16_t)a; o[d + 1] = (uint16_t)b; o[d + 2] = (uint16_t)c; o[d + 3] = (uint16_t)e4;
                }
                k += d;
            } else if (itemsize == 4 && (k & 3) == 0) {
                uint32_t *o = (uint32_t *)row;
                for (; d + 4 <= D; d += 4) {
                    const uint32_t *dt;
                    dt = tables + mrow[d] * size; DECODE_ONE(x0, o[d]);
                    dt = tables + mrow[d + 1] * size; DECODE_ONE(x1, o[d + 1]);
                    dt = tables + mrow[d + 2] * size; DECODE_ONE(x2, o[d + 2]);
                    dt = tables + mrow[d + 3] * size; DECODE_ONE(x3, o[d + 3]);
                }
                k += d;
            }
            for (; d < D; d++, k++) { /* rows whose length is not a multiple of 4: states in turn */
                const uint32_t *dt = tables + mrow[d] * size;
                uint32_t value;
                switch (k & 3) {
                    case 0: DECODE_ONE(x0, value); break;
                    case 1: DECODE_ONE(x1, value); break;
                    case 2: DECODE_ONE(x2, value); break;
                    default: DECODE_ONE(x3, value); break;
                }
                if (itemsize == 2) { uint16_t v16 = (uint16_t)value; memcpy(row + 2 * d, &v16, 2); }
                else memcpy(row + 4 * d, &value, 4);
            }
        }
    }
    if (pos != 0) status = ERR_LEFTOVER;
    else if (x0 | x1 | x2 | x3) status = ERR_STATES;
done:
    return status;
}

/* decode(stream, nbits, states, itemsize, shift, L, T, D, sources|None, highs, nsym, models, freqs, K, table_log,
   out) -> status (0, or a negative ERR_ code). `sources[t]` is t for a coded token row, else an earlier row it
   copies. */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    PyObject *stream_o, *sources_o, *highs_o, *models_o, *freqs_o, *out_o;
    unsigned long long nbits;
    unsigned int s0, s1, s2, s3;
    int itemsize, shift, nsym, K, table_log;
    Py_ssize_t L, T, D;
    if (!PyArg_ParseTuple(args, "OK(IIII)iinnnOOiOOiiO", &stream_o, &nbits, &s0, &s1, &s2, &s3, &itemsize, &shift,
                          &L, &T, &D, &sources_o, &highs_o, &nsym, &models_o, &freqs_o, &K, &table_log, &out_o)
        || check_item(itemsize, shift) < 0)
        return NULL;
    if (table_log < MIN_TABLE_LOG || table_log > MAX_TABLE_LOG || nsym < 1 || nsym > MAX_SYMBOLS || K < 1
        || K > MAX_MODELS || L < 0 || T < 0 || D < 0) {
        PyErr_SetString(PyExc_ValueError, "table_log, symbols, models or shape out of range");
        return NULL;
    }
    size_t C = (size_t)L * D, size = (size_t)1 << table_log;
    Buf stream, sources, highs, models, freqs, out;
    sources.held = highs.held = models.held = freqs.held = out.held = 0;
    if (get_buf(stream_o, &stream, 0, 8, "stream") < 0
        || (sources_o != Py_None && get_buf(sources_o, &sources, 0, 4 * T, "sources") < 0)
        || get_buf(highs_o, &highs, 0, 2 * nsym, "highs") < 0
        || get_buf(models_o, &models, 0, (Py_ssize_t)C, "models") < 0
        || get_buf(freqs_o, &freqs, 0, (Py_ssize_t)(2 * K * nsym), "freqs") < 0
        || get_buf(out_o, &out, 1, (Py_ssize_t)(L * T * D * itemsize), "out") < 0) {
        release(&stream); release(&sources); release(&highs); release(&models); release(&freqs); release(&out);
        return NULL;
    }
    int status = OK;
    const uint32_t *src_rows = sources.held ? (const uint32_t *)sources.view.buf : NULL;
    if (src_rows)
        for (Py_ssize_t t = 0; t < T; t++)
            if (src_rows[t] > (uint32_t)t || (src_rows[t] != (uint32_t)t && src_rows[src_rows[t]] != src_rows[t]))
                status = ERR_SOURCE; /* a copy must name an earlier row that was coded */
    const uint8_t *model_of = U8(models);
    for (size_t c = 0; c < C && status == OK; c++)
        if (model_of[c] >= K) status = ERR_MODEL;
    uint64_t nbytes = (uint64_t)stream.view.len;
    if (status == OK && nbytes != (nbits <= 64 ? 8 : (nbits + 7) / 8))
        status = ERR_LEFTOVER; /* the stream is max(8, ceil(nbits / 8)) bytes */
    for (uint64_t bit = nbits; status == OK && bit < 8 * nbytes; bit++)
        if ((U8(stream)[bit >> 3] >> (bit & 7)) & 1) status = ERR_LEFTOVER; /* its padding is zero bits */
    uint32_t x[STATES] = {s0, s1, s2, s3};
    for (int j = 0; j < STATES && status == OK; j++)
        if (x[j] >= size) status = ERR_STATES;
    uint32_t *tables = NULL;
    if (status == OK) {
        tables = malloc(sizeof(uint32_t) * size * K);
        uint16_t *sp = malloc(sizeof(uint16_t) * size);
        uint32_t *next = malloc(sizeof(uint32_t) * nsym);
        if (!tables || !sp || !next) status = ERR_NOMEM;
        for (int k = 0; k < K && status == OK; k++)
            status = build_dtable((const uint16_t *)freqs.view.buf + (size_t)k * nsym, (const uint16_t *)highs.view.buf,
                                  nsym, table_log, tables + k * size, sp, next);
        free(sp); free(next);
    }
    if (status == OK) {
        Py_BEGIN_ALLOW_THREADS
        status = decode2(U8(stream), nbytes, nbits, x, itemsize, shift, (size_t)L, (size_t)T, (size_t)D, src_rows,
                         model_of, tables, table_log, U8(out));
        Py_END_ALLOW_THREADS
    }
    free(tables);
    release(&stream); release(&sources); release(&highs); release(&models); release(&freqs); release(&out);
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
    {"encode", py_encode, METH_VARARGS, "tANS-encode a tensor (format 2)."},
    {"decode", py_decode, METH_VARARGS, "Decode a format-2 stream; returns a status code."},
    {"decode_v1", py_decode_v1, METH_VARARGS, "Decode a format-1 (rANS) stream; returns a status code."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tans", "kvmart's codec kernels (C).", -1, methods};

PyMODINIT_FUNC PyInit__tans(void) { return PyModule_Create(&module); }
