"""The mount without the C router (CDMFS_ROUTER=0, what a user who is not
root gets): libfuse mounts and pyfuse3 serves every request in Python.

The rest of the suite runs as root, through the router; this module keeps
the other path honest on what a user checks first: bytes through mmap and
write(), placement and migration to and from device memory, attribute files,
and the operations only the router can offer (lseek's holes, fallocate),
which fail here as on a FUSE filesystem without them.
"""
from __future__ import annotations

import ctypes
import errno
import os

import pytest

import cdmfs
from cdmfs.fs.daemon import daemon_pid
from conftest import PAGE, SMALL_CONFIG

NPAGES = 64


@pytest.fixture(scope="module")
def plain():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDMFS_ROUTER", "0")
        with cdmfs.mounted(SMALL_CONFIG) as m:
            yield m


def threads_of(pid: int) -> set[str]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            out.add(f.read().strip())
    return out


def test_no_router_threads(plain):
    assert "cdmfs-router" not in threads_of(daemon_pid(plain.path))
    assert not os.path.exists(os.path.join(plain.path, "sys/kernel/debug/cdmfs/router"))


def test_data_placement_and_fault_back(plain):
    r = plain.region("p", NPAGES * PAGE)
    r.mbind(NPAGES // 2 * PAGE, NPAGES // 2 * PAGE, "bind:1")
    data = os.urandom(NPAGES * PAGE)
    mm = r.mmap()
    try:
        mm[:] = data                             # first touch by policy, in Python
        mm.flush()
    finally:
        mm.close()
    assert r.stat["N0"] == NPAGES // 2 and r.stat["N1"] == NPAGES // 2
    res = r.migrate(0, NPAGES * PAGE, "gpu0")
    assert res["migrated"] == NPAGES
    gpu = plain.device("gpu0")
    g0 = gpu.stat
    with open(r.data, "rb") as f:
        assert f.read() == data                  # faulted back by Python
    assert r.stat["private:gpu0"] == 0
    assert gpu.stat["migrated_from"] - g0["migrated_from"] == NPAGES
    r.remove()


def test_attribute_reads(plain):
    info = plain.node(0).meminfo
    assert 0 < info["MemFree"] <= info["MemTotal"]
    with open(os.path.join(plain.path, "sys/devices/system/node/online")) as f:
        assert f.read() == "0-1\n"


def test_holes_and_fallocate_need_the_router(plain):
    """pyfuse3 has no lseek or fallocate: the kernel's generic lseek sees
    the whole file as data, and fallocate is not supported."""
    r = plain.region("h", 8 * PAGE)
    fd = os.open(r.data, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 8 * PAGE
        # fallocate(2) itself (posix_fallocate would fall back to writes).
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        assert libc.fallocate(fd, 0, 0, PAGE) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    r.remove()
