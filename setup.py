"""Builds the C core (cffi API mode), the C API library (native/libcdmfs) and
the interposer of ``cdmfs run`` (native/preload); everything else is in
pyproject.toml."""
import os
import runpy
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
capi = runpy.run_path(os.path.join(HERE, "native", "libcdmfs", "build.py"))
sys.path.insert(0, os.path.join(HERE, "native", "preload"))
from build_preload import build_ext_with_preload  # noqa: E402

setup(cffi_modules=["native/build_core.py:ffibuilder"],
      ext_modules=[capi["extension"]],
      cmdclass={"build_ext": capi["with_capi"](build_ext_with_preload)})
