/* What every kernel of kvmart's codec shares (kvmart/codec/csrc/; the bitstreams: docs/FORMAT.md).

   Compiled by `pip install` (setup.py), so nothing is compiled on a request. Plain C over the buffer protocol (no
   numpy headers); every length is checked against the shapes given and every read of a stream is bounded, so
   corrupt input is an error code, never an out-of-bounds access. The loops release the GIL. */

#ifndef KVMART_CODEC_COMMON_H
#define KVMART_CODEC_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TABLE_LOG 12
#define MAX_SYMBOLS 4096
#define MAX_MODELS 255

/* status codes shared with the Python side (format2.py, format3.py, legacy.py turn them into CodecError) */
#define OK 0
#define ERR_SHORT -1      /* a stream ran out */
#define ERR_LEFTOVER -2   /* bits left over, or non-zero padding */
#define ERR_STATES -3     /* format 1: the states do not end where the encoder started */
#define ERR_MODEL -4      /* an invalid code */
#define ERR_SOURCE -5     /* a copied row that does not come from an earlier coded one */
#define ERR_NOMEM -6
#define ERR_SYMBOL -7     /* an element whose symbol has no code (encoder) */

/* x86-64 builds get copies of the hot loops for CPUs with BMI2 and MOVBE (one-instruction variable shifts and
   byte-swapping loads) and AVX2, picked at run time; GCC must not merge the decoders' scalar stores into vectors
   (the merge goes through the stack and stalls every store-to-load forward). */
#if defined(__x86_64__) && defined(__GNUC__)
#define KV_X86 1
#define KV_FAST_ATTR __attribute__((target("avx2,bmi,bmi2,movbe")))
#else
#define KV_X86 0
#define KV_FAST_ATTR
#endif
#if defined(__GNUC__) && !defined(__clang__)
#define KV_NO_SLP __attribute__((optimize("no-tree-slp-vectorize")))
#else
#define KV_NO_SLP
#endif
#define KV_INLINE static inline __attribute__((always_inline))

int kv_cpu_is_modern(void); /* BMI2, MOVBE and AVX2, and not asked to stay portable (huffman.c) */

/* ---- buffers ---------------------------------------------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static inline int get_buf(PyObject *obj, Buf *b, int writable, Py_ssize_t min_bytes, const char *what) {
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

static inline void release(Buf *b) {
    if (b->held) PyBuffer_Release(&b->view);
    b->held = 0;
}

#define U8(b) ((uint8_t *)(b).view.buf)

/* a symbol (u >> shift) has 1 to 12 bits; the lowest zero_bits (<= shift) are zero in every element */
static inline int check_item(int itemsize, int shift, int zero_bits) {
    if ((itemsize != 2 && itemsize != 4) || shift < 0 || shift > 8 * itemsize - 1 || 8 * itemsize - shift > 12
        || zero_bits < 0 || zero_bits > shift) {
        PyErr_Format(PyExc_ValueError, "itemsize %d with shift %d and %d zero bits", itemsize, shift, zero_bits);
        return -1;
    }
    return 0;
}

/* the low part (shift - zero_bits bits) of an element: its lowest min(2, bits / 8) bytes go to the byte plane */
static inline int plane_bytes(int low_bits) { return low_bits / 8 < 2 ? low_bits / 8 : 2; }

static inline uint32_t element(const uint8_t *src, int itemsize, size_t i) {
    if (itemsize == 2) { uint16_t v; memcpy(&v, src + 2 * i, 2); return v; }
    uint32_t v; memcpy(&v, src + 4 * i, 4); return v;
}

/* ---- loads and stores ------------------------------------------------------------------------------------------- */

static inline uint64_t load_be(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint64_t load_le(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* 8 bytes from byte `at` of a buffer of n bytes; bytes past its end read as zeros */
static inline uint64_t load_be_tail(const uint8_t *p, uint64_t n, uint64_t at) {
    uint8_t tmp[8] = {0};
    for (uint64_t i = 0; i < 8 && at + i < n; i++) tmp[i] = p[at + i];
    return load_be(tmp);
}

static inline uint64_t load_le_tail(const uint8_t *p, uint64_t n, uint64_t at) {
    uint8_t tmp[8] = {0};
    for (uint64_t i = 0; i < 8 && at + i < n; i++) tmp[i] = p[at + i];
    return load_le(tmp);
}

static inline void store_be64(uint8_t *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static inline void store_le64(uint8_t *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

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

/* ---- canonical Huffman codes (huffman.c) ------------------------------------------------------------------------ */

/* A code is given by its lengths in the side-block form: per symbol, 0 if absent, else 1 + its code length (a
   length of 0: the code's only symbol, coded in no bits). Valid: every length <= table_log and the code complete
   (Kraft sum exactly 1). kv_code_counts: ERR_MODEL if invalid, else the number of codes of each length. */
int kv_code_counts(const uint8_t *lengths, int nsym, int table_log, uint32_t *count /* [MAX_TABLE_LOG + 1] */);
/* Canonical codewords (DEFLATE's rule: shorter codes first, then by symbol index; MSB first); ERR_MODEL if invalid. */
int kv_canonical(const uint8_t *lengths, int nsym, int table_log, uint16_t *codes);

/* ---- the module's functions (module.c lists them) --------------------------------------------------------------- */

PyObject *py_lengths(PyObject *self, PyObject *args);
PyObject *py_portable(PyObject *self, PyObject *args);
PyObject *py_scan(PyObject *self, PyObject *args);
PyObject *py_kmeans(PyObject *self, PyObject *args);
PyObject *py_channel_histogram(PyObject *self, PyObject *args);
PyObject *py_encode_v2(PyObject *self, PyObject *args);
PyObject *py_decode_v2(PyObject *self, PyObject *args);
PyObject *py_encode_v3(PyObject *self, PyObject *args);
PyObject *py_decode_v3(PyObject *self, PyObject *args);
PyObject *py_decode_v1(PyObject *self, PyObject *args);

#endif
