"""setup.py's build step for the C API: ``libcdmfs.so`` and ``cdmfs.h``,
installed in the package as ``cdmfs/capi/libcdmfs.so`` and
``cdmfs/capi/include/cdmfs.h`` (``cdmfs capi --cflags``/``--libs`` print how
to build against them; cdmfs/tools/capi.py).

The library is an ordinary shared object, not a Python module: an Extension
whose file name is ``libcdmfs.so``, built by a build_ext that also copies the
header beside it.  ``with_capi(base)`` wraps another build_ext class, so that
other build steps compose with this one.
"""
import os
import shutil

from setuptools import Extension

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "cdmfs.capi.libcdmfs"
HEADER = "cdmfs.h"

extension = Extension(
    NAME,
    sources=[os.path.relpath(os.path.join(HERE, "cdmfs.c"))],
    depends=[os.path.relpath(os.path.join(HERE, HEADER))],
    extra_compile_args=["-O2", "-Wall", "-fvisibility=hidden"],
    extra_link_args=["-Wl,-soname,libcdmfs.so"],
)


def with_capi(base):
    class build_ext(base):
        def get_ext_filename(self, fullname):
            # distutils asks with the last name only (get_ext_fullpath),
            # setuptools with the full name (editable installs)
            if fullname == NAME:
                return os.path.join(*NAME.split(".")[:-1], "libcdmfs.so")
            if fullname == NAME.rpartition(".")[2]:
                return "libcdmfs.so"
            return super().get_ext_filename(fullname)

        def get_export_symbols(self, ext):
            if ext.name == NAME:
                return []           # not a Python module: no PyInit_
            return super().get_export_symbols(ext)

        def build_extension(self, ext):
            super().build_extension(ext)
            if ext.name == NAME:
                install_header(os.path.dirname(self.get_ext_fullpath(NAME)))

        def copy_extensions_to_source(self):
            # an editable install (pip install -e): the library goes to the
            # source tree, whose cdmfs/capi is not in git
            if any(ext.name == NAME for ext in self.extensions):
                package = NAME.rpartition(".")[0]
                install_header(self.get_finalized_command("build_py").get_package_dir(package))
            super().copy_extensions_to_source()
    return build_ext


def install_header(directory):
    """Makes the library's directory and puts the header in its include/."""
    include = os.path.join(directory, "include")
    os.makedirs(include, exist_ok=True)
    shutil.copyfile(os.path.join(HERE, HEADER), os.path.join(include, HEADER))
