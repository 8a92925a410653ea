/* Format 2 of the codec: the decoder (kvmart 0.2's artifacts; docs/FORMAT.md). One table lookup per element, four
   streams in flight. */

#include "common.h"

#define STREAMS 4

/* Decode table of one model: for each table_log-bit index, two u16: the code's length and high << raw_bits, the
   element's upper part (above its plane bytes) before its raw bits are or-ed in. */
static int build_dtable(const uint8_t *lengths, const uint16_t *highs, int nsym, int table_log, int raw_bits,
                        uint16_t *dt) {
    uint16_t codes[MAX_SYMBOLS];
    if (kv_canonical(lengths, nsym, table_log, codes) != OK) return ERR_MODEL;
    for (int s = 0; s < nsym; s++) {
        if (!lengths[s]) continue;
        int len = lengths[s] - 1;
        uint16_t upper = (uint16_t)(highs[s] << raw_bits);
        uint32_t first = (uint32_t)codes[s] << (table_log - len), n = 1u << (table_log - len);
        for (uint32_t i = first; i < first + n; i++) { dt[2 * i] = (uint16_t)len; dt[2 * i + 1] = upper; }
    }
    return OK;
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
        c##J = ((CHECKED) && byte_ + 8 > job->nbytes[J] ? load_be_tail(job->base[J], job->nbytes[J], byte_)          \
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
VARIANTS(decode_bmi2, KV_FAST_ATTR)
static int decode_job(const Job *job, int itemsize, int pb) {
    return kv_cpu_is_modern() ? decode_bmi2(job, itemsize, pb) : decode_plain(job, itemsize, pb);
}
#else
static int decode_job(const Job *job, int itemsize, int pb) { return decode_plain(job, itemsize, pb); }
#endif

/* decode_v2(streams, (bits0..bits3), itemsize, shift, zero_bits, L, T, D, sources|None, highs, nsym, models, lengths, K,
   table_log, plane, raw, out) -> status (0, or a negative ERR_ code). `streams`: the four streams back to back, each
   ceil(bits / 8) bytes; `sources[t]`: t for a coded token row, else the earlier coded row it repeats. */
PyObject *py_decode_v2(PyObject *self, PyObject *args) {
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
