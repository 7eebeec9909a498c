"""Where the C API is installed, and how to build against it: ``cdmfs capi
--cflags`` / ``--libs`` (meant to become ``cdmfs run --cflags`` / ``--libs``).

The package holds ``capi/include/cdmfs.h`` and ``capi/libcdmfs.so``, built by
setup.py from native/libcdmfs (see native/libcdmfs/build.py).  A program
links with ``cc prog.c $(cdmfs capi --cflags) $(cdmfs capi --libs)``; the
library's folder goes into its run path, so it runs without LD_LIBRARY_PATH.
"""
from __future__ import annotations

import os
import shlex

HEADER = "cdmfs.h"
LIBRARY = "libcdmfs.so"


class CapiMissing(OSError):
    """The package was installed without its C API (not built)."""


def libdir() -> str:
    """The folder of libcdmfs.so in the installed package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "capi")


def includedir() -> str:
    """The folder of cdmfs.h."""
    return os.path.join(libdir(), "include")


def library() -> str:
    return os.path.join(libdir(), LIBRARY)


def header() -> str:
    return os.path.join(includedir(), HEADER)


def _check() -> None:
    for path in (header(), library()):
        if not os.path.isfile(path):
            raise CapiMissing(f"{path} is missing: the C API is built by `pip install .` (or -e .)")


def cflags() -> str:
    """The compiler flags: ``-I`` the header's folder."""
    _check()
    return f"-I{shlex.quote(includedir())}"


def libs() -> str:
    """The linker flags: ``-L`` and run path of the library's folder, ``-lcdmfs``."""
    _check()
    d = shlex.quote(libdir())
    return f"-L{d} -Wl,-rpath,{d} -lcdmfs"
