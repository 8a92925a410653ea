/* Format 2 of the codec: the encoder, kept for comparisons and tests (kvmart writes format 3; docs/FORMAT.md).

   Each element u (16 or 32 bits) is split at bit `shift` into a symbol, u >> shift (sign, exponent and the top
   mantissa bits), and shift low bits: the lowest min(2, bits / 8) bytes go to a byte plane, the rest (raw_bits) to
   a packed raw plane. Symbols are coded with canonical Huffman codes, one code per cluster of channels, in four
   streams: coded element k goes to stream k % 4, its code MSB first. */

#include "common.h"

#define STREAMS 4
typedef struct {
    const uint8_t *src;
    const uint32_t *rows;          /* rows[t] == t: row t is coded */
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
            if (job->rows[t] != t) continue;
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
ENCODE_VARIANTS(encode_bmi2, KV_FAST_ATTR)
static int encode_job(EncodeJob *job, int itemsize, int pb) {
    return kv_cpu_is_modern() ? encode_bmi2(job, itemsize, pb) : encode_plain(job, itemsize, pb);
}
#else
static int encode_job(EncodeJob *job, int itemsize, int pb) { return encode_plain(job, itemsize, pb); }
#endif

/* encode_v2(src, itemsize, shift, zero_bits, L, T, D, rows u32 (rows[t] == t: coded), lut, nsym, models, lengths, K, table_log, plane, raw,
   (out0..out3)) -> (bits0, bits1, bits2, bits3). Coded element k (rows[t] != 0, in l, t, d order): its symbol's
   code to stream k % 4; of its low part (bits zero_bits .. shift - 1), the lowest min(2, bits / 8) bytes to
   `plane` and the rest to `raw`. Each output must hold what the most expensive encoding takes (table_log bits per
   code). */
PyObject *py_encode_v2(PyObject *self, PyObject *args) {
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
        || get_buf(rows_o, &rows, 0, 4 * T, "rows") < 0 || get_buf(lut_o, &lut, 0, (Py_ssize_t)(2 * bins), "lut") < 0
        || get_buf(models_o, &models, 0, (Py_ssize_t)C, "models") < 0
        || get_buf(lengths_o, &lengths, 0, (Py_ssize_t)K * nsym, "lengths") < 0
        || get_buf(plane_o, &plane, 1, 0, "plane") < 0 || get_buf(raw_o, &raw, 1, 0, "raw plane") < 0;
    for (int j = 0; j < STREAMS && !fail; j++) fail = get_buf(outs_o[j], &outs[j], 1, 0, "stream") < 0;
    size_t count = 0;
    for (Py_ssize_t t = 0; t < T && !fail; t++) count += ((const uint32_t *)rows.view.buf)[t] == (uint32_t)t;
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
        status = kv_canonical(U8(lengths) + (size_t)k * nsym, nsym, table_log, codes + (size_t)k * nsym);
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
        job.src = U8(src); job.rows = (const uint32_t *)rows.view.buf; job.chan = chan; job.map = map; job.entries = entries;
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
