"""cffi (API mode) builder of cdmfs._core from native/cdmcore.h and the parts of
the C core (SOURCES; internal.h is what they share).

The cdef is derived from cdmcore.h so that the C layout is written once:
comments and include guards go, a ``#define`` of anything but a plain number
becomes ``#define NAME ...`` (cffi reads the value from the compiler), array
lengths named by an enum become ``[...]``, and the mutex, which Python never
touches, becomes the struct's ``...``.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

# The parts of the core, as the kernel's mm tree cuts it.
SOURCES = [
    "page_alloc.c",
    "pagetable.c",
    "mempolicy.c",
    "migrate.c",
    "device.c",
    "hotplug.c",
    "memory_failure.c",
    "gup.c",
    "numa_balancing.c",
    "hints.c",
    "fuse.c",
    "router.c",
    "attr_cache.c",
    "check.c",
    "trace.c",
]


def header_cdef(path: str) -> str:
    text = open(path).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#define"):
            words = stripped.split()
            if words[1] == "CDMCORE_H":
                continue
            value = words[2] if len(words) == 3 and words[2].isdigit() else "..."
            lines.append(f"#define {words[1]} {value}")
        elif stripped.startswith("#"):
            continue
        else:
            lines.append(line)
    cdef = re.sub(r"\[(CDM_NR_[A-Z_]+)\]", "[...]", "\n".join(lines))
    return cdef.replace("pthread_mutex_t lock;", "...;")


ffibuilder = FFI()
ffibuilder.cdef(header_cdef(os.path.join(HERE, "cdmcore.h")))
ffibuilder.set_source(
    "cdmfs._core",
    '#include "cdmcore.h"',
    sources=[os.path.relpath(os.path.join(HERE, name)) for name in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    depends=[os.path.relpath(os.path.join(HERE, name)) for name in ("cdmcore.h", "internal.h")],
    extra_compile_args=["-O2", "-Wall"],
    libraries=["pthread", "deflate"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
