/* k-means of channels by the code length of their symbol counts (clusters.py decides how many clusters; this is its
   inner loop, in C because numpy spent most of the encoder's time on calls over small arrays). */

#include <math.h>

#include "common.h"

typedef struct { double mean; size_t channel; } Ranked;

static int by_mean(const void *a, const void *b) { /* ties: the lower channel first (a stable sort's order) */
    const Ranked *x = a, *y = b;
    if (x->mean != y->mean) return x->mean < y->mean ? -1 : 1;
    return x->channel < y->channel ? -1 : x->channel > y->channel;
}

/* A channel's counts, the symbols with none left out: nz[first[c] .. first[c + 1]) (symbol, count). */
typedef struct { size_t symbol; double count; } Count;

/* cost[c * G + g]: bits of coding channel c with group g's distribution (its counts, plus 1e-3 for every symbol);
   returns the bits of every channel coded with its own group's. logp [S * G]: scratch, symbol-major, so that the
   innermost loop runs over groups. */
KV_INLINE double code_bits(const double *restrict hist, size_t C, size_t S, size_t G, const int64_t *restrict labels,
                           const Count *restrict nz, const size_t *restrict first, double *restrict logp,
                           double *restrict cost) {
    memset(logp, 0, sizeof(double) * G * S);
    for (size_t c = 0; c < C; c++)
        for (size_t s = 0; s < S; s++) logp[s * G + labels[c]] += hist[c * S + s];
    for (size_t g = 0; g < G; g++) {
        double total = 0;
        for (size_t s = 0; s < S; s++) total += logp[s * G + g] + 1e-3;
        const double absent = log2(1e-3 / total); /* most of a group's symbols: computed once */
        for (size_t s = 0; s < S; s++)
            logp[s * G + g] = logp[s * G + g] == 0 ? absent : log2((logp[s * G + g] + 1e-3) / total);
    }
    double bits = 0;
    for (size_t c = 0; c < C; c++) {
        double *row = cost + c * G;
        for (size_t g = 0; g < G; g++) row[g] = 0;
        for (size_t i = first[c]; i < first[c + 1]; i++) {
            const double h = nz[i].count, *lp = logp + nz[i].symbol * G;
            for (size_t g = 0; g < G; g++) row[g] -= h * lp[g];
        }
        bits += row[labels[c]];
    }
    return bits;
}

/* The k-means loop: labels from the ranking, then moves while anything moves; returns the estimated bits. */
KV_INLINE double run(const double *h, size_t C, size_t S, size_t G, int steps, int64_t *lab, Ranked *ranked,
                     Count *nz, size_t *first, double *counts, double *cost) {
    double bits;
    first[0] = 0;
    for (size_t c = 0; c < C; c++) {
        size_t n = first[c];
        for (size_t s = 0; s < S; s++)
            if (h[c * S + s] != 0) { nz[n].symbol = s; nz[n].count = h[c * S + s]; n++; }
        first[c + 1] = n;
    }
    for (size_t c = 0; c < (size_t)C; c++) {
        double weighted = 0, total = 0;
        for (size_t s = 0; s < (size_t)S; s++) { weighted += h[c * S + s] * (double)s; total += h[c * S + s]; }
        ranked[c].mean = weighted / (total > 1 ? total : 1);
        ranked[c].channel = c;
    }
    qsort(ranked, C, sizeof(Ranked), by_mean);
    for (size_t i = 0; i < (size_t)C; i++) {
        int64_t g = (int64_t)(i * G / C);
        lab[ranked[i].channel] = g < (int64_t)G - 1 ? g : (int64_t)G - 1;
    }
    bits = code_bits(h, C, S, G, lab, nz, first, counts, cost);
    for (int step = 0; step < steps; step++) {
        int moved = 0;
        for (size_t c = 0; c < (size_t)C; c++) {
            size_t best = 0;
            for (size_t g = 1; g < (size_t)G; g++)
                if (cost[c * G + g] < cost[c * G + best]) best = g;
            moved |= (int64_t)best != lab[c];
            lab[c] = (int64_t)best;
        }
        if (!moved) break;
        bits = code_bits(h, C, S, G, lab, nz, first, counts, cost);
    }
    return bits;
}

static double run_plain(const double *h, size_t C, size_t S, size_t G, int steps, int64_t *lab, Ranked *ranked,
                        Count *nz, size_t *first, double *counts, double *cost) {
    return run(h, C, S, G, steps, lab, ranked, nz, first, counts, cost);
}
#if KV_X86
KV_FAST_ATTR static double run_fast(const double *h, size_t C, size_t S, size_t G, int steps, int64_t *lab,
                                    Ranked *ranked, Count *nz, size_t *first, double *counts, double *cost) {
    return run(h, C, S, G, steps, lab, ranked, nz, first, counts, cost);
}
#endif

/* kmeans(hist float64 [C * S], C, S, G, steps, labels int64 [C] (out)) -> estimated bits. Starts from the channels
   ranked by mean symbol (deterministic), then moves each channel to its cheapest group while anything moves. */
PyObject *py_kmeans(PyObject *self, PyObject *args) {
    PyObject *hist_o, *labels_o;
    Py_ssize_t C, S, G;
    int steps;
    if (!PyArg_ParseTuple(args, "OnnniO", &hist_o, &C, &S, &G, &steps, &labels_o)) return NULL;
    if (C < 1 || S < 1 || G < 1 || G > C) {
        PyErr_SetString(PyExc_ValueError, "kmeans: sizes out of range");
        return NULL;
    }
    Buf hist, labels;
    labels.held = 0;
    if (get_buf(hist_o, &hist, 0, 8 * C * S, "hist") < 0 || get_buf(labels_o, &labels, 1, 8 * C, "labels") < 0) {
        release(&hist); release(&labels);
        return NULL;
    }
    const double *h = (const double *)hist.view.buf;
    int64_t *lab = (int64_t *)labels.view.buf;
    Ranked *ranked = malloc(sizeof(Ranked) * C);
    double *counts = malloc(sizeof(double) * G * S), *cost = malloc(sizeof(double) * C * G), bits = 0;
    Count *nz = malloc(sizeof(Count) * C * S);
    size_t *first = malloc(sizeof(size_t) * (C + 1));
    int ok = ranked && counts && cost && nz && first;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
#if KV_X86
        bits = kv_cpu_is_modern() ? run_fast(h, C, S, G, steps, lab, ranked, nz, first, counts, cost)
                                  : run_plain(h, C, S, G, steps, lab, ranked, nz, first, counts, cost);
#else
        bits = run_plain(h, C, S, G, steps, lab, ranked, nz, first, counts, cost);
#endif
        Py_END_ALLOW_THREADS
    }
    free(ranked); free(counts); free(cost); free(nz); free(first);
    release(&hist); release(&labels);
    if (!ok) return PyErr_NoMemory();
    return PyFloat_FromDouble(bits);
}
