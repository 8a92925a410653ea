"""Builds kvmart's one compiled part, the codec kernels (kvmart.codec._kernels.c), when kvmart is installed
(`pip install -e .` uses the machine's C compiler): nothing is compiled later, on a request. Everything else
about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvmart.codec._kernels", ["kvmart/codec/_kernels.c"], extra_compile_args=["-O3", "-Wall"])])
