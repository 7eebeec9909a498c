"""Builds libcdmfs_run.so, the interposer of ``cdmfs run``, from the C files
of this folder: a plain shared library (no Python in it), loaded with
LD_PRELOAD.  setup.py runs it after build_ext (``build_ext_with_preload``);
``python native/preload/build_preload.py DIR`` builds it into DIR by hand."""
import os
import sys

from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["util.c", "region.c", "mempolicy.c", "sysfs.c", "dmirror.c"]
NAME = "libcdmfs_run.so"


def build(compiler, out_dir: str, tmp_dir: str) -> str:
    """Compiles and links the interposer into out_dir; returns its path."""
    sources = [os.path.join(HERE, s) for s in SOURCES]
    objects = compiler.compile(sources, output_dir=tmp_dir, extra_postargs=["-O2", "-Wall", "-fPIC"],
                               depends=[os.path.join(HERE, h) for h in ("preload.h", "hmm_dmirror.h")])
    target = os.path.join(out_dir, NAME)
    compiler.link_shared_object(objects, target, libraries=["dl", "pthread"])
    return target


class build_ext_with_preload(build_ext):
    """build_ext, then the interposer next to the package's extensions."""

    def run(self):
        super().run()
        out = os.path.join("cdmfs") if self.inplace else os.path.join(self.build_lib, "cdmfs")
        os.makedirs(out, exist_ok=True)
        build(self.compiler, out, os.path.join(self.build_temp, "preload"))


if __name__ == "__main__":
    import subprocess
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    target = os.path.join(out, NAME)
    subprocess.run(["cc", "-O2", "-Wall", "-fPIC", "-shared", "-o", target,
                    *[os.path.join(HERE, s) for s in SOURCES], "-ldl", "-lpthread"], check=True)
    print(target)
