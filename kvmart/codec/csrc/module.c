/* The `kvmart.codec._kernels` extension module: the codec's compiled kernels (kernels.py imports it on first use). */

#include "common.h"

static PyMethodDef methods[] = {
    {"portable", py_portable, METH_VARARGS, "Run only the portable loops (for tests); returns the previous setting."},
    {"lengths", py_lengths, METH_VARARGS, "Length-limited Huffman code lengths of each model."},
    {"scan", py_scan, METH_VARARGS, "Repeated token rows, a histogram of u >> shift, and the OR of every element."},
    {"kmeans", py_kmeans, METH_VARARGS, "k-means of channels by the code length of their counts."},
    {"channel_histogram", py_channel_histogram, METH_VARARGS, "Per-channel symbol counts over the coded rows."},
    {"encode_v3", py_encode_v3, METH_VARARGS, "Write a tensor's planes and streams in format 3."},
    {"decode_v3", py_decode_v3, METH_VARARGS, "Decode format 3's planes and streams; returns a status code."},
    {"encode_v2", py_encode_v2, METH_VARARGS, "Huffman-encode a tensor in format 2 (for comparisons and tests)."},
    {"decode_v2", py_decode_v2, METH_VARARGS, "Decode a format-2 stream; returns a status code."},
    {"decode_v1", py_decode_v1, METH_VARARGS, "Decode a format-1 (rANS) stream; returns a status code."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "kvmart's codec kernels (C).", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
