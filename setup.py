"""Builds the C core (cffi API mode) and the C API library (native/libcdmfs);
everything else is in pyproject.toml."""
import os
import runpy

from setuptools import setup
from setuptools.command.build_ext import build_ext

capi = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "libcdmfs", "build.py"))

setup(cffi_modules=["native/build_core.py:ffibuilder"],
      ext_modules=[capi["extension"]],
      cmdclass={"build_ext": capi["with_capi"](build_ext)})
