/* Canonical Huffman codes shared by the codec's formats 2 and 3: validating a code, assigning its codewords, and
   building length-limited code lengths from counts (the encoder's `lengths`). */

#include "common.h"

static int portable_only = 0; /* set by tests: run the portable loops a CPU without BMI2 or AVX2 would */

int kv_cpu_is_modern(void) {
#if KV_X86
    return !portable_only && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")
           && __builtin_cpu_supports("movbe") && __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

/* portable(flag) -> the previous setting: with flag true, every kernel runs its portable loops (tests compare them
   with the fast ones; nothing else calls this). */
PyObject *py_portable(PyObject *self, PyObject *args) {
    int flag, before = portable_only;
    if (!PyArg_ParseTuple(args, "p", &flag)) return NULL;
    portable_only = flag;
    return PyBool_FromLong(before);
}


/* A model is given by its code lengths in the side-block form: per symbol, 0 if absent, else 1 + its code length
   (a length of 0: the model's only symbol, coded in no bits). Valid: every length <= table_log, and the code is
   complete (Kraft sum exactly 1), so that every table_log-bit index decodes to a symbol. */
int kv_code_counts(const uint8_t *lengths, int nsym, int table_log, uint32_t *count /* [MAX_TABLE_LOG + 1] */) {
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
int kv_canonical(const uint8_t *lengths, int nsym, int table_log, uint16_t *codes) {
    uint32_t count[MAX_TABLE_LOG + 1], next[MAX_TABLE_LOG + 2];
    if (kv_code_counts(lengths, nsym, table_log, count) != OK) return ERR_MODEL;
    uint32_t code = 0;
    next[1] = 0;
    for (int len = 2; len <= table_log; len++) next[len] = code = (code + count[len - 1]) << 1;
    for (int s = 0; s < nsym; s++) {
        int len = lengths[s] - 1;
        codes[s] = (lengths[s] && len > 0) ? (uint16_t)next[len]++ : 0;
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
PyObject *py_lengths(PyObject *self, PyObject *args) {
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
