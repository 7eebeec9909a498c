"""Shared fixtures: real mounts and C programs compiled for the test run."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

import cdmfs

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = 4096

def cdm_machine(sysram: str, cdm: str = "8M", gpu: str = "8M", block_size: str = "4M") -> str:
    """The embedded default's shape at other sizes: node 0 (system RAM, every
    CPU), node 1 (cdm0's coherent memory) and gpu0's private memory."""
    blocks = f'block_size = "{block_size}"\n' if block_size else ""
    return f"""{blocks}[[node]]
id = 0
kind = "sysram"
size = "{sysram}"
cpus = "all"
[[node]]
id = 1
kind = "cdm"
size = "{cdm}"
[[device]]
name = "cdm0"
memory = "node:1"
[[device]]
name = "gpu0"
memory = "private:{gpu}"
"""


# A small machine for tests that fill nodes: 8 MiB of sysram, 8 MiB of CDM.
SMALL_CONFIG = cdm_machine("8M")
# 64 MiB of sysram beside 8 MiB devices: room to oversubscribe a device
# (eviction) with everything it evicts fitting in system RAM.
EVICTION_CONFIG = cdm_machine("64M")


def abort_fuse(m: cdmfs.Mount) -> None:
    """Unsticks a deadlocked mount so the test fails instead of hanging:
    aborting the connection fails every request in flight (fusectl is
    mounted first where the machine has not)."""
    conns = "/sys/fs/fuse/connections"
    if not os.listdir(conns):
        # mount(2), not mount(8): a child would inherit the mount's files and
        # hang closing them (a close flushes dirty pages to the stuck daemon).
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount(b"none", conns.encode(), b"fusectl", 0, None)
    path = f"{conns}/{os.minor(os.stat(m.path).st_dev)}/abort"
    if os.path.exists(path):
        with open(path, "w") as f:
            f.write("1")


@pytest.fixture(scope="session")
def cprog(tmp_path_factory):
    """cprog("pattern") -> path of tests/c/pattern.c compiled for this run."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("cbin")
    built = {}

    def build(name: str) -> str:
        if name not in built:
            exe = str(out / name)
            subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", exe, os.path.join(HERE, "c", f"{name}.c")],
                           check=True)
            built[name] = exe
        return built[name]
    return build


@pytest.fixture(scope="module")
def mnt():
    """The embedded default machine, mounted for a test module."""
    with cdmfs.mounted() as m:
        yield m


@pytest.fixture(scope="module")
def small():
    """SMALL_CONFIG mounted for a test module."""
    with cdmfs.mounted(SMALL_CONFIG) as m:
        yield m


def xorshift_page(seed: int, page: int) -> bytes:
    """The bytes tests/c/pattern.c writes into a page."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + page + 1) & mask
    out = bytearray()
    for _ in range(PAGE // 8):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        out += x.to_bytes(8, "little")
    return bytes(out)


def fill(r: cdmfs.client.Region, byte: int = 0x5A) -> None:
    """Every byte of a region's data set to byte, by write(2)."""
    with open(r.data, "r+b") as f:
        f.write(bytes([byte]) * r.size)


def used_kb(m: cdmfs.Mount, nid: int) -> int:
    return m.node(nid).meminfo["MemUsed"]


def router_stats(m: cdmfs.Mount) -> dict[str, int]:
    """The router's counters (debugfs ``cdmfs/router``, root only)."""
    with open(os.path.join(m.path, "sys/kernel/debug/cdmfs/router")) as f:
        return {k: int(v) for k, v in (line.split() for line in f)}
