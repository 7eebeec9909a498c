"""Builds the C core (cffi API mode) and the interposer of ``cdmfs run``
(native/preload/build.py); everything else is in pyproject.toml."""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "preload"))
from build_preload import build_ext_with_preload  # noqa: E402

setup(cffi_modules=["native/build_core.py:ffibuilder"],
      cmdclass={"build_ext": build_ext_with_preload})
