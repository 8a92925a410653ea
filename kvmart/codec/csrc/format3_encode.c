/* Format 3 of the codec: the encoder (format3.py; the bitstream: docs/FORMAT.md).

   Each element u is split at bit `shift`: its symbol u >> shift (sign, exponent and the top mantissa bits) is
   Huffman-coded with the code of its channel's cluster; of its low part (bits zero_bits .. shift - 1) the lowest
   P = min(2, bits / 8) bytes go to the byte plane and the R bits above them to the raw plane, packed LSB first.
   Coded element k's codeword goes to stream k % 8, MSB first; the eight streams follow one another.

   Two loops, so that each is short: the first maps a block of coded elements to their codewords (code << 4 |
   length, 16 bits) into a stream-major scratch and writes the planes; the second appends each stream's share of the
   block to it with a 64-bit accumulator flushed every four codewords, without a branch. */

#include "common.h"

#define STREAMS 8
#define MAX_LOG 11     /* format 3's longest codeword */
#define NO_CODE 0xFFFF /* a symbol without a codeword: bit 15 is set in no valid entry (codes have at most 11 bits) */
#define HEADER_BITS_AT 16 /* where the header holds the streams' lengths */
#define ERR_PLAN -8       /* streams of other lengths than the counts give: a plan of another tensor */

#define BLOCK 4096 /* groups of eight mapped before they are written out: a 64 KB scratch that stays in cache */

typedef struct {
    uint8_t *out;   /* the next byte to store at */
    uint8_t *limit; /* the first byte it must not store at (the next stream's first) */
    uint64_t acc;   /* pending bits: the lowest nb */
    int nb;
} Writer;

typedef struct {
    const uint8_t *src;
    const uint32_t *rows;         /* rows[t] == t: row t is coded */
    const uint16_t *const *chan;  /* per channel: its code's entry per value u >> shift, code << 4 | length */
    size_t L, T, D;
    int shift, zero_bits, raw_bits;
    uint16_t *entries;            /* [8 * BLOCK]: the block's element i at (i % 8) * BLOCK + i / 8 */
    uint8_t *plane, *raw, *raw_end; /* raw_end: the raw plane's last byte + 1 (the streams' first) */
    Writer w[STREAMS];
} Job;

/* The pending bits at o, as one big-endian word (nb = 0: a zero word); its low bytes are zero, overwritten by the
   next store. Within 8 bytes of the limit, only the bytes before it are stored. */
static inline void put_word(uint8_t *o, const uint8_t *limit, uint64_t acc, int nb) {
    uint64_t word = acc << (63 - nb) << 1;
    if (o + 8 <= limit) {
        store_be64(o, word);
        return;
    }
    for (int b = 0; o + b < limit && b < 8; b++) o[b] = (uint8_t)(word >> (56 - 8 * b));
}

/* Stream j's n codewords of the block, MSB first. Every 4 codewords (at most 44 bits, above at most 7 pending) the
   pending bits are stored as one word and the whole bytes among them passed. */
KV_INLINE void write_codes(Writer *w, const uint16_t *ent, size_t n) {
    uint8_t *o = w->out;
    uint64_t acc = w->acc;
    int nb = w->nb;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int q = 0; q < 4; q++) {
            uint32_t e = ent[i + q], len = e & 15;
            acc = (acc << len) | (e >> 4);
            nb += (int)len;
        }
        put_word(o, w->limit, acc, nb);
        o += nb >> 3;
        nb &= 7;
    }
    for (; i < n; i++) {
        uint32_t e = ent[i], len = e & 15;
        acc = (acc << len) | (e >> 4);
        nb += (int)len;
    }
    if (nb >= 8) { /* at most 7 + 3 x 11 bits: keep fewer than 8 pending */
        put_word(o, w->limit, acc, nb);
        o += nb >> 3;
        nb &= 7;
    }
    w->out = o; w->acc = acc; w->nb = nb;
}

/* The block's n mapped elements (n <= 8 * BLOCK; a multiple of 8 but for the tensor's last block) to the streams. */
KV_INLINE void flush_block(Job *job, size_t n) {
    for (int j = 0; j < STREAMS; j++)
        write_codes(&job->w[j], job->entries + (size_t)j * BLOCK, n > (size_t)j ? (n - j + STREAMS - 1) / STREAMS : 0);
}

/* The raw bits of eight elements of a group, packed LSB first (8 R <= 64 bits). PEXT: BMI2's bit extraction,
   two or four words at a time, where the element's raw bits are `lanes` (its R-bit mask at its raw bits' place,
   repeated in each element's lane of a 64-bit word). */
static inline uint64_t PEXT(uint64_t w, uint64_t m) { /* asm: the instruction, whatever this function's target */
#if KV_X86
    uint64_t out;
    __asm__("pextq %2, %1, %0" : "=r"(out) : "r"(w), "r"(m));
    return out;
#else
    (void)w; (void)m;
    return 0;
#endif
}

KV_INLINE uint64_t raw_group(const uint8_t *p, const int ITEM, const int PEXT_OK, uint64_t lanes, int below, int r,
                             uint32_t mask) {
    if (PEXT_OK && ITEM == 2)
        return PEXT(load_le(p), lanes) | PEXT(load_le(p + 8), lanes) << (4 * r);
    if (PEXT_OK)
        return PEXT(load_le(p), lanes) | PEXT(load_le(p + 8), lanes) << (2 * r)
               | PEXT(load_le(p + 16), lanes) << (4 * r) | PEXT(load_le(p + 24), lanes) << (6 * r);
    uint64_t group = 0;
    for (int q = 0; q < 8; q++) {
        uint32_t u = ITEM == 2 ? (uint32_t)((const uint16_t *)p)[q] : ((const uint32_t *)p)[q];
        group |= (uint64_t)((u >> below) & mask) << (r * q);
    }
    return group;
}

/* Row by row: each coded element's codeword entry into the block's scratch, its low part into the planes; the
   scratch goes to the streams when full. GROUPED (D % 8 == 0 and R <= 8): eight elements a step, their raw bits
   packed into one little-endian word, stored whole (the next group's store overwrites the bytes past its 8 R bits;
   the last groups' are stored a byte at a time). Otherwise one element a step, its raw bits out a byte at a time. */
KV_INLINE int encode_rows(Job *job, const int ITEM, const int PB, const int GROUPED, const int PEXT_OK) {
    const size_t L = job->L, T = job->T, D = job->D;
    const int shift = job->shift, z = job->zero_bits, r = job->raw_bits, below = z + 8 * PB;
    const uint32_t raw_mask = (1u << r) - 1;
    const uint64_t lanes = ITEM == 2 ? (uint64_t)(raw_mask << below) * 0x0001000100010001ull
                                     : (uint64_t)(raw_mask << below) * 0x0000000100000001ull;
    uint16_t *ent = job->entries;
    uint8_t *pl = job->plane, *rp = job->raw;
    uint64_t ored = 0;   /* every element or-ed (the zero bits must be zero) */
    uint32_t missing = 0; /* every entry or-ed (bit 15: a symbol with no code) */
    size_t k = 0, i = 0, rpos = 0;  /* k: coded elements so far; i: of them, in the block */
    uint32_t racc = 0;
    int rbits = 0;
    for (size_t l = 0; l < L; l++)
        for (size_t t = 0; t < T; t++) {
            if (job->rows[t] != t) continue;
            const uint8_t *p = job->src + (l * T + t) * D * ITEM;
            const uint16_t *const *codes = job->chan + l * D;
            for (size_t d = 0; d < D; d += GROUPED ? 8 : 1) {
                uint16_t *slot = ent + (GROUPED ? i >> 3 : (i & 7) * BLOCK + (i >> 3));
                for (int q = 0; q < (GROUPED ? 8 : 1); q++) {
                    uint32_t u = ITEM == 2 ? (uint32_t)((const uint16_t *)p)[d + q] : ((const uint32_t *)p)[d + q];
                    uint16_t e = codes[d + q][u >> shift];
                    if (!(GROUPED && PEXT_OK)) ored |= u; /* else below, a word at a time */
                    missing |= e;
                    slot[q * BLOCK] = e;
                    uint32_t low = u >> z;
                    if (PB == 1) pl[k + q] = (uint8_t)low;
                    if (PB == 2) { uint16_t lo = (uint16_t)low; memcpy(pl + 2 * (k + q), &lo, 2); }
                    if (!GROUPED && r) {
                        racc |= ((low >> (8 * PB)) & raw_mask) << rbits;
                        for (rbits += r; rbits >= 8; rbits -= 8, racc >>= 8) rp[rpos++] = (uint8_t)racc;
                    }
                }
                if (GROUPED && PEXT_OK)
                    for (int q = 0; q < ITEM; q++) ored |= load_le(p + d * ITEM + 8 * q); /* 8 elements: ITEM words */
                if (GROUPED && r) {
                    uint64_t group = raw_group(p + d * ITEM, ITEM, PEXT_OK, lanes, below, r, raw_mask);
                    uint8_t *at = rp + (k >> 3) * r;
                    if (at + 8 <= job->raw_end) store_le64(at, group);
                    else for (int b = 0; b < r; b++) at[b] = (uint8_t)(group >> (8 * b)); /* the plane's end */
                }
                k += GROUPED ? 8 : 1;
                i += GROUPED ? 8 : 1;
                if (i == 8 * BLOCK) { flush_block(job, i); i = 0; }
            }
        }
    flush_block(job, i);
    if (!GROUPED && rbits) rp[rpos] = (uint8_t)racc; /* zero bits pad the last byte */
    const uint64_t zeros = (uint64_t)((1u << z) - 1) * (ITEM == 2 ? 0x0001000100010001ull : 0x0000000100000001ull);
    return (missing & 0x8000) || (ored & zeros) ? ERR_SYMBOL : OK;
}

#define LAYOUTS(PX)                                                                                               \
    if (itemsize == 2 && pb == 0) return grouped ? encode_rows(job, 2, 0, 1, PX) : encode_rows(job, 2, 0, 0, 0);   \
    if (itemsize == 2) return grouped ? encode_rows(job, 2, 1, 1, PX) : encode_rows(job, 2, 1, 0, 0);              \
    if (pb == 0) return grouped ? encode_rows(job, 4, 0, 1, PX) : encode_rows(job, 4, 0, 0, 0);                    \
    if (pb == 1) return grouped ? encode_rows(job, 4, 1, 1, PX) : encode_rows(job, 4, 1, 0, 0);                    \
    return grouped ? encode_rows(job, 4, 2, 1, PX) : encode_rows(job, 4, 2, 0, 0);

static int encode_plain(Job *job, int itemsize, int pb, int grouped) { LAYOUTS(0) }
#if KV_X86
KV_FAST_ATTR static int encode_fast(Job *job, int itemsize, int pb, int grouped) { LAYOUTS(0) }
KV_FAST_ATTR static int encode_pext(Job *job, int itemsize, int pb, int grouped) { LAYOUTS(1) }
#endif

static int encode_job(Job *job, int itemsize, int pb, int grouped) {
#if KV_X86
    /* AMD's Zen 1 and 2 have PEXT, microcoded: a hundred times slower than the shifts it replaces */
    if (kv_cpu_is_modern())
        return __builtin_cpu_is("znver1") || __builtin_cpu_is("znver2") ? encode_fast(job, itemsize, pb, grouped)
                                                                         : encode_pext(job, itemsize, pb, grouped);
#endif
    return encode_plain(job, itemsize, pb, grouped);
}

/* encode_v3(src, itemsize, shift, zero_bits, L, T, D, rows u32 [T], lut u16 [2^(W - shift)], nsym, models u8
   [L * D], lengths u8 [K * nsym], K, table_log, prefix, expected) -> bytes: the whole encoding, `prefix` (the
   header, whose eight stream lengths at byte 16 are filled in here, then the tables and side block) followed by the
   byte plane, the raw plane and the eight streams. `expected`: the streams' lengths in bits, known from the counts
   (then each stream is written at its place), or None (each is written in a region of the longest length, every
   codeword of table_log bits, then moved; the buffer shrinks to fit). ValueError for an element whose symbol has
   no codeword or whose zero bits are not zero, and for streams other than expected. */
PyObject *py_encode_v3(PyObject *self, PyObject *args) {
    PyObject *src_o, *rows_o, *lut_o, *models_o, *lengths_o, *expected_o;
    const char *prefix;
    int itemsize, shift, zero_bits, nsym, K, table_log;
    Py_ssize_t L, T, D, at;
    if (!PyArg_ParseTuple(args, "OiiinnnOOiOOiiy#O", &src_o, &itemsize, &shift, &zero_bits, &L, &T, &D, &rows_o,
                          &lut_o, &nsym, &models_o, &lengths_o, &K, &table_log, &prefix, &at, &expected_o)
        || check_item(itemsize, shift, zero_bits) < 0)
        return NULL;
    unsigned long long expected[STREAMS];
    const int exact = expected_o != Py_None;
    if (exact && !PyArg_ParseTuple(expected_o, "KKKKKKKK", &expected[0], &expected[1], &expected[2], &expected[3],
                                   &expected[4], &expected[5], &expected[6], &expected[7]))
        return NULL;
    if (table_log < 1 || table_log > MAX_LOG || nsym < 1 || nsym > MAX_SYMBOLS || K < 1 || K > MAX_MODELS
        || L < 0 || T < 0 || D < 0 || at < HEADER_BITS_AT + 8 * STREAMS) {
        PyErr_SetString(PyExc_ValueError, "encode_v3: table_log, symbols, codes, shape or offset out of range");
        return NULL;
    }
    size_t bins = (size_t)1 << (8 * itemsize - shift), C = (size_t)L * D, count = 0;
    const int pb = plane_bytes(shift - zero_bits), r = shift - zero_bits - 8 * pb;
    Buf src, rows, lut, models, lengths;
    rows.held = lut.held = models.held = lengths.held = 0;
    if (get_buf(src_o, &src, 0, L * T * D * itemsize, "source") < 0 || get_buf(rows_o, &rows, 0, 4 * T, "rows") < 0
        || get_buf(lut_o, &lut, 0, (Py_ssize_t)(2 * bins), "lut") < 0
        || get_buf(models_o, &models, 0, (Py_ssize_t)C, "models") < 0
        || get_buf(lengths_o, &lengths, 0, (Py_ssize_t)K * nsym, "lengths") < 0) {
        release(&src); release(&rows); release(&lut); release(&models); release(&lengths);
        return NULL;
    }
    const uint32_t *row_of = (const uint32_t *)rows.view.buf;
    int status = OK;
    for (Py_ssize_t t = 0; t < T; t++) {
        if (row_of[t] > (uint32_t)t || row_of[row_of[t]] != row_of[t]) status = ERR_MODEL;
        count += row_of[t] == (uint32_t)t;
    }
    count *= C;
    size_t raw_len = (count * r + 7) / 8, longest = ((count + STREAMS - 1) / STREAMS * table_log + 7) / 8, total = 0;
    for (int j = 0; j < STREAMS && exact; j++) {
        if (expected[j] > (uint64_t)longest * 8) status = ERR_MODEL;
        total += (expected[j] + 7) / 8;
    }
    /* the planes, then the streams: where their lengths are known (`expected`), each at its place; else each in a
       region of the longest length plus 8 bytes (for whole-word stores), moved together at the end */
    size_t room = exact ? total : STREAMS * (longest + 8);
    PyObject *result = status == OK ? PyBytes_FromStringAndSize(NULL, at + count * pb + raw_len + room) : NULL;
    if (status == OK && !result) status = ERR_NOMEM;
    uint8_t *out = result ? (uint8_t *)PyBytes_AS_STRING(result) : NULL;
    if (out) memcpy(out, prefix, at);
    for (size_t c = 0; c < C && status == OK; c++)
        if (U8(models)[c] >= K) status = ERR_MODEL;
    uint16_t *codes = NULL, *table = NULL, *entries = NULL;
    const uint16_t **chan = NULL;
    if (status == OK) {
        codes = malloc(sizeof(uint16_t) * nsym);
        table = malloc(sizeof(uint16_t) * (size_t)K * bins);
        chan = malloc(sizeof(uint16_t *) * (C ? C : 1));
        entries = malloc(sizeof(uint16_t) * STREAMS * BLOCK);
        if (!codes || !table || !chan || !entries) status = ERR_NOMEM;
    }
    const uint16_t *lut_of = (const uint16_t *)lut.view.buf;
    for (int m = 0; m < K && status == OK; m++) { /* each code's entry per value, NO_CODE for values it has none of */
        const uint8_t *len = U8(lengths) + (size_t)m * nsym;
        status = kv_canonical(len, nsym, table_log, codes);
        for (size_t v = 0; v < bins && status == OK; v++) {
            uint16_t s = lut_of[v];
            table[(size_t)m * bins + v] = s < nsym && len[s] ? (uint16_t)(codes[s] << 4 | (len[s] - 1)) : NO_CODE;
        }
    }
    uint64_t bits[STREAMS] = {0};
    uint8_t *end = NULL;
    if (status == OK) {
        for (size_t c = 0; c < C; c++) chan[c] = table + (size_t)U8(models)[c] * bins;
        Job job = {.src = U8(src), .rows = row_of, .chan = chan, .L = L, .T = T, .D = D,
                   .shift = shift, .zero_bits = zero_bits, .raw_bits = r, .entries = entries,
                   .plane = out + at, .raw = out + at + count * pb, .raw_end = out + at + count * pb + raw_len};
        uint8_t *first[STREAMS], *streams = job.raw + raw_len;
        for (int j = 0; j < STREAMS; j++) {
            first[j] = exact ? (j ? first[j - 1] + (expected[j - 1] + 7) / 8 : streams)
                             : streams + (size_t)j * (longest + 8);
            job.w[j].out = first[j];
            job.w[j].limit = exact ? first[j] + (expected[j] + 7) / 8 : first[j] + longest + 8;
            job.w[j].acc = 0;
            job.w[j].nb = 0;
        }
        Py_BEGIN_ALLOW_THREADS
        status = encode_job(&job, itemsize, pb, D % 8 == 0 && r <= 8);
        end = streams;
        for (int j = 0; j < STREAMS && status == OK; j++) {
            Writer *w = &job.w[j];
            put_word(w->out, w->limit, w->acc, w->nb); /* the last bits, zero-padded */
            bits[j] = 8 * (uint64_t)(w->out - first[j]) + (uint64_t)w->nb;
            if (exact && bits[j] != expected[j]) status = ERR_PLAN;
            if (!exact) memmove(end, first[j], (bits[j] + 7) / 8);
            end += (bits[j] + 7) / 8;
        }
        Py_END_ALLOW_THREADS
    }
    free(codes); free(table); free((void *)chan); free(entries);
    release(&src); release(&rows); release(&lut); release(&models); release(&lengths);
    if (status != OK) {
        Py_XDECREF(result);
        if (status == ERR_NOMEM) return PyErr_NoMemory();
        PyErr_SetString(PyExc_ValueError, status == ERR_SYMBOL ? "an element's symbol has no code"
                                          : status == ERR_PLAN ? "encode_v3: streams of other lengths than the counts "
                                                                 "give (a plan of another tensor)"
                                                               : "encode_v3: invalid code, model or rows");
        return NULL;
    }
    for (int j = 0; j < STREAMS; j++) /* the header's stream lengths, in bits, little-endian */
        for (int b = 0; b < 8; b++) out[HEADER_BITS_AT + 8 * j + b] = (uint8_t)(bits[j] >> (8 * b));
    if (_PyBytes_Resize(&result, (Py_ssize_t)(end - out)) < 0) return NULL;
    return result;
}
