/* Decoder designs that format 3's was chosen over (bench/codec_decoders.py builds this file with the machine's C
   compiler and times each on real KV; x86-64 with BMI2 and AVX2 only). Not part of kvmart.

   Every design decodes the same symbols: bfloat16 elements split as format 3 splits them (a 10-bit symbol coded
   with its channel's canonical Huffman code, at most 11 bits; 6 raw bits packed LSB first), every row coded,
   element k in stream k % N. They differ in the number of streams N, in the decode table's entries, and in where
   the raw bits are merged in. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TL 11
#define RAW 6

static inline uint64_t load_be(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return __builtin_bswap64(v); }
static inline uint64_t load_le(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static void canonical(const uint8_t *lengths, int nsym, uint16_t *codes) {
    uint32_t count[16] = {0}, next[17];
    for (int s = 0; s < nsym; s++) if (lengths[s]) count[lengths[s] - 1]++;
    uint32_t code = 0;
    next[1] = 0;
    for (int len = 2; len <= TL; len++) next[len] = code = (code + count[len - 1]) << 1;
    for (int s = 0; s < nsym; s++) {
        int len = lengths[s] - 1;
        codes[s] = (lengths[s] && len > 0) ? (uint16_t)next[len]++ : 0;
    }
}

/* Tables of every code: kind 0 value << 6 | length (format 3's), 1 value << 4 | length, 2 u32 value << 16 | length. */
void build_tables(const uint8_t *lengths, const uint16_t *values, int nsym, int K, int kind, void *out) {
    uint16_t codes[4096];
    for (int k = 0; k < K; k++) {
        const uint8_t *ln = lengths + (size_t)k * nsym;
        canonical(ln, nsym, codes);
        for (int s = 0; s < nsym; s++) {
            if (!ln[s]) continue;
            int len = ln[s] - 1;
            uint32_t first = (uint32_t)codes[s] << (TL - len), n = 1u << (TL - len);
            for (uint32_t i = first; i < first + n; i++) {
                size_t at = ((size_t)k << TL) + i;
                if (kind == 0) ((uint16_t *)out)[at] = (uint16_t)(values[s] << 6 | len);
                else if (kind == 1) ((uint16_t *)out)[at] = (uint16_t)(values[s] << 4 | len);
                else ((uint32_t *)out)[at] = (uint32_t)values[s] << 16 | (uint32_t)len;
            }
        }
    }
}

/* Encoder: u (bf16 bits, [L, T, D]) -> N streams of `cap` bytes each (MSB first) and the raw plane. */
void encode(const uint16_t *u, size_t L, size_t T, size_t D, const uint8_t *models, const uint8_t *lengths,
            int nsym, int K, const uint16_t *lut, int N, uint8_t *streams, size_t cap, uint8_t *raw) {
    uint32_t *tab = malloc(sizeof(uint32_t) * K * nsym);
    uint16_t codes[4096];
    for (int k = 0; k < K; k++) {
        canonical(lengths + (size_t)k * nsym, nsym, codes);
        for (int s = 0; s < nsym; s++) {
            int l = lengths[(size_t)k * nsym + s];
            tab[k * nsym + s] = l ? ((uint32_t)codes[s] << 8) | (l - 1) : 0;
        }
    }
    uint64_t acc[16] = {0};
    int nb[16] = {0};
    size_t pos[16] = {0}, rpos = 0, k = 0;
    uint64_t racc = 0;
    int rb = 0;
    for (size_t l = 0; l < L; l++)
        for (size_t t = 0; t < T; t++)
            for (size_t d = 0; d < D; d++, k++) {
                uint32_t v = u[k], e = tab[models[l * D + d] * nsym + lut[v >> RAW]];
                int j = (int)(k % N), len = e & 255;
                acc[j] = (acc[j] << len) | (e >> 8);
                nb[j] += len;
                while (nb[j] >= 8) { nb[j] -= 8; streams[j * cap + pos[j]++] = (uint8_t)(acc[j] >> nb[j]); }
                racc |= (uint64_t)(v & ((1u << RAW) - 1)) << rb;
                for (rb += RAW; rb >= 8; rb -= 8, racc >>= 8) raw[rpos++] = (uint8_t)racc;
            }
    for (int j = 0; j < N; j++)
        if (nb[j]) streams[j * cap + pos[j]] = (uint8_t)(acc[j] << (8 - nb[j]));
    if (rb) raw[rpos] = (uint8_t)racc;
    free(tab);
}

/* ---- the merge two rows later (format 3's), 16 elements a step: value << 6 entries, or value << 4 (shift 2 more) */
typedef struct { __m256i shuffle, multiply; } Unpack;

__attribute__((target("avx2"))) static void unpack_init(Unpack *u) {
    uint8_t s[32];
    uint16_t m[16];
    for (int i = 0; i < 8; i++) {
        int byte = RAW * i / 8, sh = RAW * i % 8;
        for (int h = 0; h < 2; h++) {
            s[16 * h + 2 * i] = (uint8_t)byte;
            s[16 * h + 2 * i + 1] = (uint8_t)(byte + 1);
            m[8 * h + i] = (uint16_t)(1u << (15 - sh));
        }
    }
    u->shuffle = _mm256_loadu_si256((const __m256i *)s);
    u->multiply = _mm256_loadu_si256((const __m256i *)m);
}

__attribute__((target("avx2"))) static inline void merge16(uint16_t *out, const uint16_t *xs, const uint8_t *rp,
                                                          const Unpack *un, int value_shift) {
    __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)rp)),
                                        _mm_loadu_si128((const __m128i *)(rp + RAW)), 1);
    b = _mm256_mulhi_epu16(_mm256_slli_epi16(_mm256_shuffle_epi8(b, un->shuffle), 1), un->multiply);
    b = _mm256_and_si256(b, _mm256_set1_epi16((1 << RAW) - 1));
    __m256i v = _mm256_loadu_si256((const __m256i *)xs);
    v = _mm256_slli_epi16(_mm256_srl_epi16(v, _mm_cvtsi32_si128(value_shift)), RAW);
    _mm256_storeu_si256((__m256i *)out, _mm256_or_si256(v, b));
}

#define REFILL(J)                                                                                                 \
    { uint64_t n_ = (uint64_t)__builtin_ctzll(c##J); ptr[J] += n_ >> 3; c##J = (load_be(ptr[J]) | 1) << (n_ & 7); }
#define ONE6(J, I) { uint16_t x_ = p[I][c##J >> (64 - TL)]; c##J <<= (x_ & 63); x[I] = x_; }
#define ONE4(J, I) { uint16_t x_ = p[I][c##J >> (64 - TL)]; c##J <<= (x_ & 15); x[I] = x_; }
#define ONE32(J, I) { uint32_t x_ = q[I][c##J >> (64 - TL)]; c##J <<= (x_ & 63); x[I] = (uint16_t)(x_ >> 10); }

/* The row loop every deferred-merge design shares: GROUP elements a step (8 / N groups of N), BODY decodes them into
   x[0..GROUP), a refill of every stream every 5 codewords of each, the merge two rows later. */
#define DESIGN(NAME, NSTREAMS, TABLE_T, BODY, VALUE_SHIFT, REFILLS, STATE)                                         \
    __attribute__((target("avx2,bmi,bmi2,movbe"), noinline)) void NAME(                                           \
        uint8_t *streams, size_t cap, size_t L, size_t T, size_t D, const TABLE_T *tables, const uint8_t *models, \
        const uint8_t *raw, uint16_t *out) {                                                                       \
        const TABLE_T **chan = malloc(sizeof(TABLE_T *) * L * D);                                                  \
        for (size_t i = 0; i < L * D; i++) chan[i] = tables + ((size_t)models[i] << TL);                          \
        const uint8_t *ptr[16];                                                                                    \
        for (int j = 0; j < NSTREAMS; j++) ptr[j] = streams + j * cap;                                             \
        uint64_t STATE;                                                                                            \
        uint16_t *ring = malloc(sizeof(uint16_t) * 3 * D);                                                         \
        Unpack un;                                                                                                 \
        unpack_init(&un);                                                                                          \
        int g = 0;                                                                                                 \
        const uint8_t *rp = raw;                                                                                   \
        for (size_t l = 0; l < L; l++) {                                                                           \
            const TABLE_T *const *end = chan + l * D + D;                                                          \
            for (size_t t = 0; t < T; t++) {                                                                       \
                uint16_t *x = ring + (t % 3) * D;                                                                  \
                for (const TABLE_T *const *p0 = chan + l * D; p0 < end; p0 += NSTREAMS, x += NSTREAMS) {          \
                    const TABLE_T *const *p = p0, *const *q = p0;                                                  \
                    (void)p; (void)q;                                                                              \
                    if (g == 0) { REFILLS g = 5; }                                                                 \
                    g--;                                                                                           \
                    BODY                                                                                           \
                }                                                                                                  \
                if (t >= 2) {                                                                                      \
                    uint16_t *row = out + (l * T + t - 2) * D, *xs = ring + ((t - 2) % 3) * D;                    \
                    for (size_t i = 0; i < D; i += 16, rp += 2 * RAW) merge16(row + i, xs + i, rp, &un, VALUE_SHIFT); \
                }                                                                                                  \
            }                                                                                                      \
            for (size_t t = T >= 2 ? T - 2 : 0; t < T; t++) {                                                      \
                uint16_t *row = out + (l * T + t) * D, *xs = ring + (t % 3) * D;                                  \
                for (size_t i = 0; i < D; i += 16, rp += 2 * RAW) merge16(row + i, xs + i, rp, &un, VALUE_SHIFT);  \
            }                                                                                                      \
        }                                                                                                          \
        free(ring); free((void *)chan);                                                                            \
    }

#define R4 REFILL(0) REFILL(1) REFILL(2) REFILL(3)
#define R8 R4 REFILL(4) REFILL(5) REFILL(6) REFILL(7)
#define R16 R8 REFILL(8) REFILL(9) REFILL(10) REFILL(11) REFILL(12) REFILL(13) REFILL(14) REFILL(15)
#define S4 c0 = 1, c1 = 1, c2 = 1, c3 = 1
#define S8 S4, c4 = 1, c5 = 1, c6 = 1, c7 = 1
#define S16 S8, c8 = 1, c9 = 1, c10 = 1, c11 = 1, c12 = 1, c13 = 1, c14 = 1, c15 = 1

DESIGN(streams4, 4, uint16_t, ONE6(0, 0) ONE6(1, 1) ONE6(2, 2) ONE6(3, 3), 6, R4, S4)
DESIGN(streams8, 8, uint16_t,
       ONE6(0, 0) ONE6(1, 1) ONE6(2, 2) ONE6(3, 3) ONE6(4, 4) ONE6(5, 5) ONE6(6, 6) ONE6(7, 7), 6, R8, S8)
DESIGN(streams16, 16, uint16_t,
       ONE6(0, 0) ONE6(1, 1) ONE6(2, 2) ONE6(3, 3) ONE6(4, 4) ONE6(5, 5) ONE6(6, 6) ONE6(7, 7)
       ONE6(8, 8) ONE6(9, 9) ONE6(10, 10) ONE6(11, 11) ONE6(12, 12) ONE6(13, 13) ONE6(14, 14) ONE6(15, 15),
       6, R16, S16)
DESIGN(streams8_masked, 8, uint16_t,
       ONE4(0, 0) ONE4(1, 1) ONE4(2, 2) ONE4(3, 3) ONE4(4, 4) ONE4(5, 5) ONE4(6, 6) ONE4(7, 7), 4, R8, S8)
DESIGN(streams8_u32, 8, uint32_t,
       ONE32(0, 0) ONE32(1, 1) ONE32(2, 2) ONE32(3, 3) ONE32(4, 4) ONE32(5, 5) ONE32(6, 6) ONE32(7, 7), 6, R8, S8)

/* Eight streams with each step's raw bits merged at once (PDEP: 4 elements' raw bits into 16-bit lanes), the
   values combined into 64-bit words: no scratch, no second pass. */
__attribute__((target("avx2,bmi,bmi2,movbe"), noinline)) void streams8_inline(
    uint8_t *streams, size_t cap, size_t L, size_t T, size_t D, const uint16_t *tables, const uint8_t *models,
    const uint8_t *raw, uint16_t *out) {
    const uint16_t **chan = malloc(sizeof(uint16_t *) * L * D);
    for (size_t i = 0; i < L * D; i++) chan[i] = tables + ((size_t)models[i] << TL);
    const uint8_t *ptr[16];
    for (int j = 0; j < 8; j++) ptr[j] = streams + j * cap;
    uint64_t S8;
    const uint64_t lanes = 0x003F003F003F003Full;
    int g = 0;
    const uint8_t *rp = raw;
    uint16_t *op = out;
    for (size_t l = 0; l < L; l++) {
        const uint16_t *const *end = chan + l * D + D;
        for (size_t t = 0; t < T; t++)
            for (const uint16_t *const *p = chan + l * D; p < end; p += 8, rp += RAW, op += 8) {
                if (g == 0) { R8 g = 5; }
                g--;
                uint64_t w = load_le(rp), o0 = _pdep_u64(w, lanes), o1 = _pdep_u64(w >> (4 * RAW), lanes);
                uint16_t x[8];
                ONE6(0, 0) ONE6(1, 1) ONE6(2, 2) ONE6(3, 3) ONE6(4, 4) ONE6(5, 5) ONE6(6, 6) ONE6(7, 7)
                for (int i = 0; i < 4; i++) {
                    o0 |= (uint64_t)(x[i] >> 6) << (16 * i + RAW);
                    o1 |= (uint64_t)(x[i + 4] >> 6) << (16 * i + RAW);
                }
                memcpy(op, &o0, 8);
                memcpy(op + 4, &o1, 8);
            }
    }
    free((void *)chan);
}
