"""Builds the C core (cffi API mode); everything else is in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["native/build_core.py:ffibuilder"])
