/* Format 1 of the codec (rANS, kvmart 0.1): decode only, so that old artifacts still load (legacy.py;
   docs/FORMAT.md, *Format 1*). */

#include "common.h"

#define V1_PROB_BITS 12
#define V1_SCALE (1 << V1_PROB_BITS)
#define V1_ALPHABET 512

/* decode_v1(words, states, labels, freqs, itemsize, L, T, D, low, out) -> status.
   words: the 16-bit words after the four 32-bit states; labels: u8 [L*D] model of each channel; freqs: u16
   [K * 512]; low: the element's lower bytes, little-endian, (itemsize - 1) bytes per element (the sign bit
   cleared), interleaved. Rows (channels) are coded channel-major, token t of a row with state t % 4. */
PyObject *py_decode_v1(PyObject *self, PyObject *args) {
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
