/* Format 3 of the codec: the decoder (format3.py; the bitstream: docs/FORMAT.md).

   Eight streams in flight (coded element k is in stream k % 8): each codeword is one lookup in its channel's
   table of 2^table_log 16-bit entries (symbol value << 6 | codeword length), so each stream's dependency chain is
   shift, load, shift (by the entry itself), and eight chains keep the core busy. A row's entries go to a small
   scratch ring as they are; two rows later (once those narrow stores have left the store buffer) one vectorized
   pass merges them with the planes into the output elements. Copied rows are filled last, from their (decoded)
   sources.

   Stream windows: 64 bits, MSB first, loaded at the byte of the last refill, with a sentinel bit below the data
   (bit `s`, the refill's bit offset). Reading shifts the window left, so ctz(window) = s + bits read: a refill at
   the start of every 5th group of eight elements (each stream then reads at most 5 x 11 = 55 of its >= 56 bits)
   moves the byte position by ctz / 8. */

#include "common.h"
#if KV_X86
#include <immintrin.h>
#endif

#define STREAMS 8
#define MAX_LOG 11
#define PER_REFILL 5 /* groups of eight elements between refills */
#define LAG 2        /* rows between a row's decode and its merge */

typedef struct {
    const uint8_t *base[STREAMS];
    uint64_t nbytes[STREAMS], nbits[STREAMS];
    size_t L, T, D, count;
    const uint32_t *sources;          /* NULL when no row is copied */
    const uint16_t *const *chan;      /* per channel: its decode table */
    const uint8_t *plane, *raw;
    uint64_t raw_len;
    int table_log, shift, zero_bits, pb, raw_bits, itemsize;
    uint8_t *out;
} Job;

typedef struct {
    const uint8_t *base[STREAMS]; /* each stream's first byte (the job's: here, the hot loop needs one pointer) */
    uint64_t pos[STREAMS];        /* byte of each stream's last refill */
    uint64_t c[STREAMS];          /* windows, when not in registers */
} State;

/* ---- merging a row's entries with its planes ---------------------------------------------------------------- */

/* element kk of the row starting at coded element k0 (any layout): u = value << shift | low << zero_bits */
static void merge_scalar(const Job *job, uint8_t *row, const uint16_t *xs, size_t k0, size_t from) {
    const int pb = job->pb, r = job->raw_bits;
    const uint32_t mask = (1u << r) - 1;
    for (size_t d = from; d < job->D; d++) {
        size_t kk = k0 + d;
        uint32_t low = 0;
        if (pb == 1) low = job->plane[kk];
        if (pb == 2) low = job->plane[2 * kk] | (uint32_t)job->plane[2 * kk + 1] << 8;
        if (r) {
            uint64_t bit = (uint64_t)kk * r, at = bit >> 3;
            uint64_t w = at + 8 <= job->raw_len ? load_le(job->raw + at) : load_le_tail(job->raw, job->raw_len, at);
            low |= (uint32_t)((w >> (bit & 7)) & mask) << (8 * pb);
        }
        uint32_t u = ((uint32_t)(xs[d] >> 6) << job->shift) | (low << job->zero_bits);
        if (job->itemsize == 2) { uint16_t v = (uint16_t)u; memcpy(row + 2 * d, &v, 2); }
        else memcpy(row + 4 * d, &u, 4);
    }
}

/* The portable merge where D % 8 == 0 and R <= 8: eight elements a step, their raw bits one 64-bit load (while
   8 bytes are left in the raw plane), the layout known at compile time. Returns where it stopped. */
KV_INLINE size_t merge_groups(const Job *job, uint8_t *row, const uint16_t *xs, size_t k0, const int ITEM,
                              const int PB) {
    const int r = job->raw_bits, shift = job->shift, z = job->zero_bits;
    const uint32_t mask = (1u << r) - 1;
    const uint8_t *at = job->raw + k0 * (uint64_t)r / 8;
    size_t d = 0;
    for (; d + 8 <= job->D && (!r || at + 8 <= job->raw + job->raw_len); d += 8, at += r) {
        uint64_t w = r ? load_le(at) : 0;
        for (int q = 0; q < 8; q++) {
            size_t kk = k0 + d + q;
            uint32_t low = (uint32_t)((w >> (r * q)) & mask) << (8 * PB);
            if (PB == 1) low |= job->plane[kk];
            if (PB == 2) low |= job->plane[2 * kk] | (uint32_t)job->plane[2 * kk + 1] << 8;
            uint32_t u = ((uint32_t)(xs[d + q] >> 6) << shift) | (low << z);
            if (ITEM == 2) { uint16_t v = (uint16_t)u; memcpy(row + 2 * (d + q), &v, 2); }
            else memcpy(row + 4 * (d + q), &u, 4);
        }
    }
    return d;
}

static void merge_portable(const Job *job, uint8_t *row, const uint16_t *xs, size_t k0) {
    size_t d = 0;
    if (job->D % 8 == 0 && job->raw_bits <= 8) {
        if (job->itemsize == 2)
            d = job->pb ? merge_groups(job, row, xs, k0, 2, 1) : merge_groups(job, row, xs, k0, 2, 0);
        else if (job->pb == 2) d = merge_groups(job, row, xs, k0, 4, 2);
        else d = job->pb ? merge_groups(job, row, xs, k0, 4, 1) : merge_groups(job, row, xs, k0, 4, 0);
    }
    if (d < job->D) merge_scalar(job, row, xs, k0, d);
}

#if KV_X86
/* Where R <= 8 and k0 * R is a whole number of bytes (D % 8 == 0): 16 (16-bit) or 8 (32-bit) elements a step.
   Element i of eight has its raw bits at bit R*i of R bytes: a byte shuffle puts the two bytes holding them in its
   lane, a shift (16-bit lanes: multiply-high by 2^(15 - s)) brings them down. */
typedef struct {
    __m256i shuffle16, multiply16, shuffle32, shift32;
} Unpack;

KV_FAST_ATTR static void unpack_init(int r, Unpack *u) {
    uint8_t s16[32], s32[32];
    uint16_t m16[16];
    uint32_t v32[8];
    for (int i = 0; i < 8; i++) {
        int byte = r * i / 8, s = r * i % 8;
        for (int h = 0; h < 2; h++) {
            s16[16 * h + 2 * i] = (uint8_t)byte;
            s16[16 * h + 2 * i + 1] = (uint8_t)(byte + 1);
            m16[8 * h + i] = (uint16_t)(1u << (15 - s));
        }
        int lane = i % 4, half = i / 4; /* 32-bit lanes: a 128-bit half holds four */
        s32[16 * half + 4 * lane] = (uint8_t)byte;
        s32[16 * half + 4 * lane + 1] = (uint8_t)(byte + 1);
        s32[16 * half + 4 * lane + 2] = s32[16 * half + 4 * lane + 3] = 0x80; /* zero */
        v32[i] = (uint32_t)s;
    }
    u->shuffle16 = _mm256_loadu_si256((const __m256i *)s16);
    u->multiply16 = _mm256_loadu_si256((const __m256i *)m16);
    u->shuffle32 = _mm256_loadu_si256((const __m256i *)s32);
    u->shift32 = _mm256_loadu_si256((const __m256i *)v32);
}

/* Elements [0, end) of the row in vector steps, the layout known at compile time; returns where it stopped. */
KV_FAST_ATTR KV_INLINE size_t merge_steps(const Job *job, const Unpack *un, uint8_t *row, const uint16_t *xs, size_t k0,
                             size_t end, const int ITEM, const int PB, const int RAW) {
    const int r = job->raw_bits;
    const __m128i shift = _mm_cvtsi32_si128(job->shift), zero = _mm_cvtsi32_si128(job->zero_bits),
                  above = _mm_cvtsi32_si128(8 * PB);
    const uint8_t *at = job->raw + k0 * (uint64_t)r / 8; /* the row's first raw byte: k0 * r is whole bytes */
    size_t d = 0;
    if (ITEM == 2) {
        const __m256i mask = _mm256_set1_epi16((short)((1 << r) - 1));
        for (; d + 16 <= end; d += 16, at += 2 * r) {
            __m256i v = _mm256_sll_epi16(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(xs + d)), 6), shift);
            __m256i low = _mm256_setzero_si256();
            if (PB) low = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(job->plane + k0 + d)));
            if (RAW) {
                __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)at)),
                                                    _mm_loadu_si128((const __m128i *)(at + r)), 1);
                b = _mm256_mulhi_epu16(_mm256_slli_epi16(_mm256_shuffle_epi8(b, un->shuffle16), 1), un->multiply16);
                b = _mm256_and_si256(b, mask);
                low = PB ? _mm256_or_si256(low, _mm256_sll_epi16(b, above)) : b;
            }
            _mm256_storeu_si256((__m256i *)(row + 2 * d), _mm256_or_si256(v, _mm256_sll_epi16(low, zero)));
        }
    } else {
        const __m256i mask = _mm256_set1_epi32((1 << r) - 1);
        for (; d + 8 <= end; d += 8, at += r) {
            __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(xs + d)));
            v = _mm256_sll_epi32(_mm256_srli_epi32(v, 6), shift);
            __m256i low = _mm256_setzero_si256();
            if (PB == 2) low = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(job->plane + 2 * (k0 + d))));
            if (PB == 1) low = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(job->plane + k0 + d)));
            if (RAW) {
                __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)load_le(at)), un->shuffle32);
                b = _mm256_and_si256(_mm256_srlv_epi32(b, un->shift32), mask);
                low = PB ? _mm256_or_si256(low, _mm256_sll_epi32(b, above)) : b;
            }
            _mm256_storeu_si256((__m256i *)(row + 4 * d), _mm256_or_si256(v, _mm256_sll_epi32(low, zero)));
        }
    }
    return d;
}

/* Where R <= 8 and D % 8 == 0 (so that a row's raw bits start on a byte). The vector loads read up to 16 bytes
   past a step's raw bits: steps stop short of the raw plane's end, the rest of the row goes element by element. */
KV_FAST_ATTR static void merge_avx2(const Job *job, const Unpack *un, uint8_t *row, const uint16_t *xs, size_t k0) {
    const int r = job->raw_bits, pb = job->pb;
    size_t end = job->D;
    if (r) { /* a step of 8 elements reads bytes [at, at + 2r + 16) at most: at = first + step * r */
        uint64_t first = k0 * (uint64_t)r / 8, need = first + 2 * (uint64_t)r + 16;
        uint64_t room = job->raw_len > need ? job->raw_len - need : 0;
        uint64_t steps = job->raw_len >= need ? room / r + 1 : 0;
        if (8 * steps < end) end = 8 * steps;
    }
    size_t d;
    if (job->itemsize == 2) {
        if (pb == 0)
            d = r ? merge_steps(job, un, row, xs, k0, end, 2, 0, 1) : merge_steps(job, un, row, xs, k0, end, 2, 0, 0);
        else
            d = r ? merge_steps(job, un, row, xs, k0, end, 2, 1, 1) : merge_steps(job, un, row, xs, k0, end, 2, 1, 0);
    } else if (pb == 2) {
        d = r ? merge_steps(job, un, row, xs, k0, end, 4, 2, 1) : merge_steps(job, un, row, xs, k0, end, 4, 2, 0);
    } else if (pb == 1) {
        d = r ? merge_steps(job, un, row, xs, k0, end, 4, 1, 1) : merge_steps(job, un, row, xs, k0, end, 4, 1, 0);
    } else {
        d = r ? merge_steps(job, un, row, xs, k0, end, 4, 0, 1) : merge_steps(job, un, row, xs, k0, end, 4, 0, 0);
    }
    if (d < job->D) merge_scalar(job, row, xs, k0, d);
}
#endif

/* ---- decoding rows ---------------------------------------------------------------------------------------------- */

/* Refill stream j from its byte position (bytes past its end read as zeros): checked, for the last rows. */
static inline uint64_t refill_checked(const Job *job, State *st, int j, uint64_t c) {
    uint64_t n = (uint64_t)__builtin_ctzll(c);
    st->pos[j] += n >> 3;
    return (load_be_tail(job->base[j], job->nbytes[j], st->pos[j]) | 1) << (n & 7);
}

/* One row of any width, element by element, every refill checked (windows in st->c). */
static void row_checked(const Job *job, State *st, const uint16_t *const *codes, uint16_t *xs, size_t k) {
    const int sh = 64 - job->table_log;
    for (size_t d = 0; d < job->D; d++, k++) {
        int j = (int)(k & 7);
        if (j == 0 && (k >> 3) % PER_REFILL == 0)
            for (int i = 0; i < STREAMS; i++) st->c[i] = refill_checked(job, st, i, st->c[i]);
        uint16_t x = codes[d][st->c[j] >> sh];
        st->c[j] <<= (x & 63);
        xs[d] = x;
    }
}

/* Rows that can be decoded with unchecked refills: each reads at most `worst` bytes past a stream's position. */
static size_t safe_rows(const Job *job, const State *st) {
    uint64_t worst = ((job->D / 8 + PER_REFILL) * (uint64_t)job->table_log + 7) / 8 + 16, room = UINT64_MAX;
    for (int j = 0; j < STREAMS; j++) {
        uint64_t left = st->pos[j] < job->nbytes[j] ? job->nbytes[j] - st->pos[j] : 0;
        if (left < room) room = left;
    }
    return room > worst ? (size_t)(room / worst - 1) : 0;
}

#define REFILL(J)                                                                                                 \
    do {                                                                                                          \
        uint64_t n_ = (uint64_t)__builtin_ctzll(c##J), p_ = st->pos[J] + (n_ >> 3);                               \
        st->pos[J] = p_;                                                                                          \
        c##J = (load_be(st->base[J] + p_) | 1) << (n_ & 7);                                                      \
    } while (0)
#define ONE(J)                                                                                                    \
    do {                                                                                                          \
        uint16_t x_ = p[J][c##J >> sh];                                                                           \
        c##J <<= (x_ & 63); /* the length: x_'s low 6 bits (shlx masks them itself) */                     \
        x[J] = x_;                                                                                                \
    } while (0)
#define SPILL() do { st->c[0] = c0; st->c[1] = c1; st->c[2] = c2; st->c[3] = c3; \
                     st->c[4] = c4; st->c[5] = c5; st->c[6] = c6; st->c[7] = c7; } while (0)
#define FILL() do { c0 = st->c[0]; c1 = st->c[1]; c2 = st->c[2]; c3 = st->c[3]; \
                    c4 = st->c[4]; c5 = st->c[5]; c6 = st->c[6]; c7 = st->c[7]; } while (0)

/* Block l's coded rows from coded element *k on: the windows stay in registers across rows while refills can go
   unchecked (D % 8 == 0); a row near a stream's end goes through row_checked. Merges lag LAG rows behind, and the
   block's last rows are merged before it returns. */
KV_INLINE void decode_block(const Job *job, State *st, size_t l, size_t *k_io, uint16_t *ring, const void *unpack,
                            const int FAST) {
    const size_t T = job->T, D = job->D, row_bytes = D * job->itemsize;
    const uint16_t *const *codes = job->chan + l * D;
    const int sh = 64 - job->table_log, grouped = D % 8 == 0;
    uint64_t c0, c1, c2, c3, c4, c5, c6, c7;
    FILL();
    uint8_t *rows[LAG + 1];
    size_t starts[LAG + 1], n = 0, k = *k_io, safe = 0;
    for (size_t t = 0; t < T; t++) {
        if (job->sources && job->sources[t] != t) continue;
        uint16_t *xs = ring + (n % (LAG + 1)) * D;
        if (grouped && (safe || (safe = safe_rows(job, st)))) {
            size_t g = (PER_REFILL - (k >> 3) % PER_REFILL) % PER_REFILL; /* groups until a refill; 0: now */
            uint16_t *x = xs;
            for (const uint16_t *const *p = codes; p < codes + D; p += 8, x += 8) {
                if (g == 0) {
                    REFILL(0); REFILL(1); REFILL(2); REFILL(3); REFILL(4); REFILL(5); REFILL(6); REFILL(7);
                    g = PER_REFILL;
                }
                g--;
                ONE(0); ONE(1); ONE(2); ONE(3); ONE(4); ONE(5); ONE(6); ONE(7);
            }
            safe--;
        } else {
            SPILL();
            row_checked(job, st, codes, xs, k);
            FILL();
        }
        rows[n % (LAG + 1)] = job->out + (l * T + t) * row_bytes;
        starts[n % (LAG + 1)] = k;
        k += D;
        if (++n > LAG) {
            size_t i = (n - 1 - LAG) % (LAG + 1);
#if KV_X86
            if (FAST && unpack) merge_avx2(job, (const Unpack *)unpack, rows[i], ring + i * D, starts[i]);
            else
#endif
                merge_portable(job, rows[i], ring + i * D, starts[i]);
        }
    }
    for (size_t m = n > LAG ? n - LAG : 0; m < n; m++) {
        size_t i = m % (LAG + 1);
#if KV_X86
        if (FAST && unpack) merge_avx2(job, (const Unpack *)unpack, rows[i], ring + i * D, starts[i]);
        else
#endif
            merge_portable(job, rows[i], ring + i * D, starts[i]);
    }
    SPILL();
    *k_io = k;
}

KV_NO_SLP static void decode_plain(const Job *job, State *st, size_t l, size_t *k, uint16_t *ring) {
    decode_block(job, st, l, k, ring, NULL, 0);
}

#if KV_X86
KV_FAST_ATTR KV_NO_SLP static void decode_fast(const Job *job, State *st, size_t l, size_t *k, uint16_t *ring,
                                               const Unpack *unpack) {
    decode_block(job, st, l, k, ring, unpack, 1);
}
#endif

/* Every block, then the copied rows; then every stream must end exactly at its last bit. */
static int decode_job(const Job *job) {
    State st;
    for (int j = 0; j < STREAMS; j++) { /* ctz 0: the first refill reads byte 0 */
        st.base[j] = job->base[j];
        st.pos[j] = 0;
        st.c[j] = 1;
    }
    uint16_t *ring = malloc(sizeof(uint16_t) * (LAG + 1) * (job->D ? job->D : 1));
    if (!ring) return ERR_NOMEM;
    size_t k = 0;
#if KV_X86
    Unpack unpack;
    int fast = kv_cpu_is_modern(), simd = fast && job->D % 8 == 0 && job->raw_bits <= 8;
    if (fast) unpack_init(job->raw_bits, &unpack);
    for (size_t l = 0; l < job->L; l++) {
        if (fast) decode_fast(job, &st, l, &k, ring, simd ? &unpack : NULL);
        else decode_plain(job, &st, l, &k, ring);
    }
#else
    for (size_t l = 0; l < job->L; l++) decode_plain(job, &st, l, &k, ring);
#endif
    free(ring);
    const size_t row_bytes = job->D * job->itemsize;
    if (job->sources)
        for (size_t l = 0; l < job->L; l++)
            for (size_t t = 0; t < job->T; t++)
                if (job->sources[t] != t)
                    memcpy(job->out + (l * job->T + t) * row_bytes,
                           job->out + (l * job->T + job->sources[t]) * row_bytes, row_bytes);
    for (int j = 0; j < STREAMS; j++) {
        uint64_t end = 8 * st.pos[j] + (uint64_t)__builtin_ctzll(st.c[j]);
        if (end > job->nbits[j]) return ERR_SHORT;
        if (end < job->nbits[j]) return ERR_LEFTOVER;
    }
    return OK;
}

/* Decode table of one code: for each table_log-bit index, the symbol's value << 6 | its codeword's length (values
   have at most 10 bits, so that a shift by the whole entry shifts by the length alone). */
static int build_table(const uint8_t *lengths, const uint16_t *values, int nsym, int table_log, uint16_t *table) {
    uint16_t codes[MAX_SYMBOLS];
    if (kv_canonical(lengths, nsym, table_log, codes) != OK) return ERR_MODEL;
    for (int s = 0; s < nsym; s++) {
        if (!lengths[s]) continue;
        int len = lengths[s] - 1;
        uint16_t entry = (uint16_t)(values[s] << 6 | len);
        uint32_t first = (uint32_t)codes[s] << (table_log - len), n = 1u << (table_log - len);
        for (uint32_t i = first; i < first + n; i++) table[i] = entry;
    }
    return OK;
}

/* ---- parsing --------------------------------------------------------------------------------------------------- */

#define ERR_HEADER -9    /* a header field out of range */
#define ERR_VALUES -10   /* symbol values not increasing, or wider than a symbol */
#define ERR_CHANNEL -11  /* a channel's code out of range */
#define ERR_SIDE -12     /* the side block does not hold the copies' varints and one length per symbol and code */
#define ERR_COPIES -13   /* copied rows out of range */
#define ERR_TRUNCATED -14
#define HEADER_BYTES 80

static uint64_t le(const uint8_t *p, int n) { /* an n-byte little-endian number */
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* LEB128 varints, at most 5 bytes, no needless zero group; -1 if malformed or past `end`. */
static int64_t varint(const uint8_t **at, const uint8_t *end) {
    uint64_t v = 0;
    for (int i = 0; i < 5 && *at < end; i++) {
        uint8_t b = *(*at)++;
        v |= (uint64_t)(b & 0x7F) << (7 * i);
        if (b < 0x80) return (i > 0 && b == 0) ? -1 : (int64_t)v;
    }
    return -1;
}

/* The copied rows from the side block's gaps and distances: sources[t] = t, or the earlier coded row it repeats. */
static int read_copies(const uint8_t **at, const uint8_t *end, uint64_t M, size_t T, uint32_t *sources) {
    for (size_t t = 0; t < T; t++) sources[t] = (uint32_t)t;
    const uint8_t *back = *at;
    for (uint64_t i = 0; i < M; i++) /* the distances follow the M gaps */
        if (varint(&back, end) < 0) return ERR_SIDE;
    uint64_t row = 0;
    for (uint64_t i = 0; i < M; i++) {
        int64_t gap = varint(at, end), distance = varint(&back, end);
        if (gap < 0 || distance < 0) return ERR_SIDE;
        row += (uint64_t)gap;
        if (gap < 1 || row >= T || distance < 1 || (uint64_t)distance > row) return ERR_COPIES;
        sources[row] = (uint32_t)(row - (uint64_t)distance);
    }
    *at = back;
    return OK;
}

typedef struct { /* what decode_v3 reads from the header, tables and side block */
    int shift, zero_bits, table_log, K, nsym;
    uint64_t M, side_bytes, bits[STREAMS];
    const uint8_t *models, *lengths, *plane, *raw, *streams;
    uint64_t plane_len, raw_len, streams_len;
} Parsed;

static int parse(const uint8_t *p, uint64_t n, const uint8_t *side, uint64_t side_len, int itemsize, size_t L,
                 size_t T, size_t D, uint32_t *sources, uint16_t *values, Parsed *f) {
    const int width = 8 * itemsize;
    if (n < HEADER_BYTES) return ERR_TRUNCATED;
    if (p[0] != 3) return ERR_HEADER;
    f->shift = p[1]; f->zero_bits = p[2]; f->table_log = p[3];
    f->K = (int)le(p + 4, 2); f->nsym = (int)le(p + 6, 2); f->M = le(p + 8, 4); f->side_bytes = le(p + 12, 4);
    for (int j = 0; j < STREAMS; j++) f->bits[j] = le(p + 16 + 8 * j, 8);
    if (f->shift < width - 10 || f->shift >= width || f->zero_bits > f->shift || f->table_log < 1
        || f->table_log > MAX_LOG || f->nsym < 1 || f->nsym > (1 << f->table_log) || f->K < 1 || f->K > MAX_MODELS
        || (f->K > 1 && (size_t)f->K > L * D) || f->M >= T)
        return ERR_HEADER;
    size_t C = L * D, channels = f->K > 1 ? C : 0;
    uint64_t at = HEADER_BYTES;
    if (n - at < 2 * (uint64_t)f->nsym + channels + f->side_bytes) return ERR_TRUNCATED;
    for (int s = 0; s < f->nsym; s++) {
        values[s] = (uint16_t)le(p + at + 2 * s, 2);
        if ((values[s] >> (width - f->shift)) || (s && values[s] <= values[s - 1])) return ERR_VALUES;
    }
    at += 2 * (uint64_t)f->nsym;
    f->models = p + at;
    for (size_t c = 0; c < channels; c++)
        if (f->models[c] >= f->K) return ERR_CHANNEL;
    at += channels + f->side_bytes; /* the side block: inflated by the caller */
    const uint8_t *s = side, *end = side + side_len;
    int status = read_copies(&s, end, f->M, T, sources);
    if (status != OK) return status;
    if ((uint64_t)(end - s) != (uint64_t)f->K * f->nsym) return ERR_SIDE;
    f->lengths = s;
    const int pb = plane_bytes(f->shift - f->zero_bits), r = f->shift - f->zero_bits - 8 * pb;
    uint64_t count = (uint64_t)(T - f->M) * C;
    f->plane_len = count * pb;
    f->raw_len = (count * r + 7) / 8;
    f->streams_len = 0;
    for (int j = 0; j < STREAMS; j++) {
        if (f->bits[j] > ((uint64_t)1 << 60)) return ERR_TRUNCATED;
        f->streams_len += (f->bits[j] + 7) / 8;
    }
    if (n - at < f->plane_len || n - at - f->plane_len < f->raw_len
        || n - at - f->plane_len - f->raw_len < f->streams_len)
        return ERR_TRUNCATED;
    f->plane = p + at;
    f->raw = f->plane + f->plane_len;
    f->streams = f->raw + f->raw_len;
    if (n - at - f->plane_len - f->raw_len != f->streams_len) return ERR_LEFTOVER;
    return OK;
}

/* decode_v3(data, side, itemsize, L, T, D, out) -> status (0, or a negative ERR_ code): a whole format-3 encoding
   of a non-empty tensor, `side` its side block inflated, into `out`. Every field is checked here. */
PyObject *py_decode_v3(PyObject *self, PyObject *args) {
    PyObject *data_o, *side_o, *out_o;
    int itemsize;
    Py_ssize_t L, T, D;
    if (!PyArg_ParseTuple(args, "OOinnnO", &data_o, &side_o, &itemsize, &L, &T, &D, &out_o)) return NULL;
    if ((itemsize != 2 && itemsize != 4) || L < 1 || T < 1 || D < 1 || T > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "decode_v3: an itemsize of 2 or 4 and a non-empty shape, please");
        return NULL;
    }
    Buf data, side, out;
    side.held = out.held = 0;
    if (get_buf(data_o, &data, 0, 0, "data") < 0 || get_buf(side_o, &side, 0, 0, "side") < 0
        || get_buf(out_o, &out, 1, L * T * D * itemsize, "out") < 0) {
        release(&data); release(&side); release(&out);
        return NULL;
    }
    size_t C = (size_t)L * D;
    uint32_t *sources = malloc(sizeof(uint32_t) * T);
    uint16_t values[MAX_SYMBOLS];
    Parsed f;
    int status = sources ? parse(U8(data), (uint64_t)data.view.len, U8(side), (uint64_t)side.view.len, itemsize,
                                 (size_t)L, (size_t)T, (size_t)D, sources, values, &f)
                         : ERR_NOMEM;
    Job job;
    if (status == OK) {
        job.L = (size_t)L; job.T = (size_t)T; job.D = (size_t)D; job.count = (T - f.M) * C;
        job.sources = f.M ? sources : NULL; job.plane = f.plane; job.raw = f.raw; job.raw_len = f.raw_len;
        job.table_log = f.table_log; job.shift = f.shift; job.zero_bits = f.zero_bits;
        job.pb = plane_bytes(f.shift - f.zero_bits); job.raw_bits = f.shift - f.zero_bits - 8 * job.pb;
        job.itemsize = itemsize; job.out = U8(out);
        uint64_t offset = 0;
        for (int j = 0; j < STREAMS && status == OK; j++) {
            job.base[j] = f.streams + offset;
            job.nbytes[j] = (f.bits[j] + 7) / 8;
            job.nbits[j] = f.bits[j];
            offset += job.nbytes[j];
            if (f.bits[j] % 8 && (job.base[j][job.nbytes[j] - 1] & (0xFF >> (f.bits[j] % 8))))
                status = ERR_LEFTOVER; /* a stream's padding is zero bits */
        }
        uint64_t raw_total = (uint64_t)job.count * job.raw_bits;
        if (status == OK && raw_total % 8 && (f.raw[f.raw_len - 1] >> (raw_total % 8)))
            status = ERR_LEFTOVER; /* the raw plane's padding is zero bits */
    }
    size_t size = status == OK ? (size_t)1 << f.table_log : 0;
    uint16_t *tables = status == OK ? malloc(sizeof(uint16_t) * size * f.K) : NULL;
    const uint16_t **chan = status == OK ? malloc(sizeof(uint16_t *) * C) : NULL;
    if (status == OK && (!tables || !chan)) status = ERR_NOMEM;
    for (int m = 0; status == OK && m < f.K; m++)
        status = build_table(f.lengths + (size_t)m * f.nsym, values, f.nsym, f.table_log, tables + m * size);
    if (status == OK) {
        for (size_t c = 0; c < C; c++) chan[c] = tables + (f.K > 1 ? f.models[c] : 0) * size;
        job.chan = chan;
        Py_BEGIN_ALLOW_THREADS
        status = decode_job(&job);
        Py_END_ALLOW_THREADS
    }
    free(tables); free((void *)chan); free(sources);
    release(&data); release(&side); release(&out);
    return PyLong_FromLong(status);
}
