"""Builds kvmart's one compiled part, the codec kernels (kvmart/codec/csrc/*.c, one extension module), when kvmart
is installed (`pip install -e .` uses the machine's C compiler): nothing is compiled later, on a request. Everything
else about the package is in pyproject.toml."""

from glob import glob

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvmart.codec._kernels", sorted(glob("kvmart/codec/csrc/*.c")),
                             depends=sorted(glob("kvmart/codec/csrc/*.h")), extra_compile_args=["-O3", "-Wall"])])
