"""fallocate(2) and lseek(2) SEEK_DATA/SEEK_HOLE on region data, served on
the router's side channel (pyfuse3 has no FUSE_FALLOCATE nor FUSE_LSEEK):
mounts with CDMFS_ROUTER=1, through util-linux fallocate, cp and os.lseek.
"""
from __future__ import annotations

import ctypes
import errno
import os
import subprocess

import pytest

import cdmfs
from conftest import PAGE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the router mounts with mount(2): root only")

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_ZERO_RANGE = 1, 2, 8, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(path: str, mode: int, off: int, length: int) -> int:
    """0 or the errno of fallocate(2)."""
    fd = os.open(path, os.O_RDWR)
    try:
        return 0 if _libc.fallocate(fd, mode, off, length) == 0 else ctypes.get_errno()
    finally:
        os.close(fd)


def util(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["fallocate", *args], capture_output=True, text=True, timeout=60)


def holes(path: str) -> list[tuple[int, int]]:
    """The data extents of path as SEEK_DATA/SEEK_HOLE tell them."""
    out, fd = [], os.open(path, os.O_RDONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    finally:
        os.close(fd)
    return out


@pytest.fixture(scope="module")
def routed():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDMFS_ROUTER", "1")
        with cdmfs.mounted() as m:
            yield m


def test_seek_data_and_hole(routed):
    r = routed.region("sk", 32 * PAGE + 100)
    assert holes(r.data) == []
    fd = os.open(r.data, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 5, os.SEEK_HOLE) == 5
        os.pwrite(fd, b"a", 3 * PAGE + 7)
        os.pwrite(fd, b"b" * (2 * PAGE), 10 * PAGE)
        os.pwrite(fd, b"c", 32 * PAGE + 50)       # the last, partial page
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 * PAGE
        assert os.lseek(fd, 3 * PAGE + 9, os.SEEK_DATA) == 3 * PAGE + 9
        assert os.lseek(fd, 3 * PAGE, os.SEEK_HOLE) == 4 * PAGE
        # Past the end: ENXIO both ways (lseek(2)).
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            with pytest.raises(OSError) as e:
                os.lseek(fd, 32 * PAGE + 100, whence)
            assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    # The hole at the end of a file whose last page is data is the size.
    assert holes(r.data) == [(3 * PAGE, 4 * PAGE), (10 * PAGE, 12 * PAGE), (32 * PAGE, 32 * PAGE + 100)]


def test_seek_on_other_files_sees_no_holes(routed):
    path = os.path.join(routed.path, "sys/devices/system/node/online")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 1, os.SEEK_HOLE) == size
    finally:
        os.close(fd)


def test_cp_sparse_keeps_the_holes(routed, tmp_path):
    r = routed.region("cp", 64 * PAGE)
    with open(r.data, "r+b") as f:
        f.seek(5 * PAGE)
        f.write(b"x" * PAGE)
        f.seek(40 * PAGE)
        f.write(b"y" * 3 * PAGE)
    before = r.stat
    dest = str(tmp_path / "copy")
    subprocess.run(["cp", "--sparse=always", r.data, dest], check=True, timeout=60)
    with open(dest, "rb") as f:
        data = f.read()
    assert data == b"\0" * 5 * PAGE + b"x" * PAGE + b"\0" * 34 * PAGE + b"y" * 3 * PAGE + b"\0" * 21 * PAGE
    assert os.stat(dest).st_blocks * 512 <= 8 * PAGE
    # Reading holes through SEEK_DATA placed nothing.
    assert r.stat["N0"] + r.stat["N1"] == before["N0"] + before["N1"] == 4


def test_fallocate_places_and_grows(routed):
    r = routed.region("fa", 4 * PAGE)
    assert r.stat["N0"] == 0
    res = util("-l", str(16 * PAGE), r.data)
    assert res.returncode == 0, res
    s = r.stat
    assert (s["size"], s["N0"] + s["N1"]) == (16 * PAGE, 16)
    assert holes(r.data) == [(0, 16 * PAGE)]
    with open(r.data, "rb") as f:
        assert f.read() == b"\0" * 16 * PAGE
    # KEEP_SIZE: past the end places nothing and the size stays.
    assert util("-n", "-o", str(14 * PAGE), "-l", str(8 * PAGE), r.data).returncode == 0
    assert r.size == 16 * PAGE and r.stat["N0"] + r.stat["N1"] == 16
    # An offset past the end grows the file: the pages before stay holes.
    assert util("-o", str(20 * PAGE), "-l", str(2 * PAGE), r.data).returncode == 0
    assert r.size == 22 * PAGE
    assert holes(r.data) == [(0, 16 * PAGE), (20 * PAGE, 22 * PAGE)]


def test_fallocate_follows_the_policy(routed):
    r = routed.region("fpol", 8 * PAGE)
    r.policy = "bind:1"
    assert util("-l", str(8 * PAGE), r.data).returncode == 0
    s = r.stat
    assert (s["N0"], s["N1"]) == (0, 8)


def test_fallocate_without_memory_is_enospc(routed):
    r = routed.region("fbig", PAGE)
    total = sum(routed.node(n).meminfo["MemTotal"] for n in routed.nodes) * 1024
    assert fallocate(r.data, 0, 0, total + 64 * PAGE) == errno.ENOSPC
    assert r.size == PAGE


def test_other_modes_are_not_supported(routed):
    r = routed.region("fmode", 8 * PAGE)
    res = util("-z", "-l", str(PAGE), r.data)        # ZERO_RANGE: reaches the daemon
    assert res.returncode != 0 and "not supported" in res.stderr, res
    assert fallocate(r.data, FALLOC_FL_COLLAPSE_RANGE, 0, PAGE) == errno.EOPNOTSUPP   # the kernel's own
    assert fallocate(r.data, FALLOC_FL_ZERO_RANGE, 0, PAGE) == errno.EOPNOTSUPP
    attr = os.path.join(routed.path, "regions/fmode/policy")
    assert fallocate(attr, 0, 0, PAGE) == errno.EOPNOTSUPP
    # The mount still serves fallocate after the refusals.
    assert fallocate(r.data, 0, 0, PAGE) == 0


def test_punch_hole(routed):
    r = routed.region("ph", 16 * PAGE)
    pattern = bytes(range(256)) * (16 * PAGE // 256)
    with open(r.data, "r+b") as f:
        f.write(pattern)
    assert r.stat["N0"] + r.stat["N1"] == 16
    # [4 pages + 100, 9 pages + 50): pages 5-8 freed, the edges zeroed.
    res = util("-p", "-o", str(4 * PAGE + 100), "-l", str(5 * PAGE - 50), r.data)
    assert res.returncode == 0, res
    s = r.stat
    assert s["N0"] + s["N1"] == 12 and s["size"] == 16 * PAGE
    assert holes(r.data) == [(0, 5 * PAGE), (9 * PAGE, 16 * PAGE)]
    # Past the end: the range is clipped to the size, which stays.
    assert util("-p", "-o", str(15 * PAGE), "-l", str(8 * PAGE), r.data).returncode == 0
    assert r.size == 16 * PAGE and r.stat["N0"] + r.stat["N1"] == 11
    # Reading the hole reads zeros (and, a CPU's first touch, places its pages).
    with open(r.data, "rb") as f:
        data = f.read()
    lo, hi = 4 * PAGE + 100, 9 * PAGE + 50
    assert data[:lo] == pattern[:lo] and data[hi:15 * PAGE] == pattern[hi:15 * PAGE]
    assert data[lo:hi] == b"\0" * (hi - lo) and data[15 * PAGE:] == b"\0" * PAGE
    # PUNCH_HOLE without KEEP_SIZE: the kernel refuses it.
    assert fallocate(r.data, FALLOC_FL_PUNCH_HOLE, 0, PAGE) == errno.EOPNOTSUPP


def test_punch_device_private_pages(routed):
    r = routed.region("phg", 8 * PAGE)
    pattern = os.urandom(8 * PAGE)
    with open(r.data, "r+b") as f:
        f.write(pattern)
    assert r.migrate(0, 8 * PAGE, "gpu0")["migrated"] == 8
    assert r.stat["private:gpu0"] == 8
    assert util("-p", "-o", str(2 * PAGE), "-l", str(4 * PAGE), r.data).returncode == 0
    s = r.stat
    assert (s["private:gpu0"], s["N0"] + s["N1"]) == (4, 0)
    assert holes(r.data) == [(0, 2 * PAGE), (6 * PAGE, 8 * PAGE)]
    with open(r.data, "rb") as f:
        data = f.read()
    assert data == pattern[:2 * PAGE] + b"\0" * 4 * PAGE + pattern[6 * PAGE:]


def test_punch_under_a_mapping(routed):
    r = routed.region("phm", 16 * PAGE)
    m = r.mmap()
    try:
        pattern = bytes(range(1, 256)) * (16 * PAGE // 255) + b"\1" * (16 * PAGE % 255)
        m[:] = pattern                       # dirty in the page cache, not written back
        lo, hi = 3 * PAGE + 10, 11 * PAGE
        assert util("-p", "-o", str(lo), "-l", str(hi - lo), r.data).returncode == 0
        s = r.stat
        assert s["N0"] + s["N1"] == 9        # pages 4-10 freed
        assert holes(r.data) == [(0, 4 * PAGE), (11 * PAGE, 16 * PAGE)]
        assert m[:lo] == pattern[:lo] and m[hi:] == pattern[hi:]
        assert m[lo:hi] == b"\0" * (hi - lo)
        # Touching the hole through the mapping places its pages again.
        m[5 * PAGE] = 7
        m.flush()
    finally:
        m.close()
    with open(r.data, "rb") as f:
        data = f.read()
    assert data[5 * PAGE] == 7 and data[:lo] == pattern[:lo] and data[hi:] == pattern[hi:]
    assert r.stat["N0"] + r.stat["N1"] == 16   # the hole read back through the mapping


def test_data_write_moves_mtime_and_keeps_the_mapping(routed):
    r = routed.region("mt", 8 * PAGE)
    m = r.mmap()
    try:
        m[:] = b"m" * 8 * PAGE
        m.flush()
        t0 = os.stat(r.data).st_mtime_ns
        faults = r.stat["cpu_faults"]
        fd = os.open(r.data, os.O_WRONLY)
        try:
            os.pwrite(fd, b"w" * 10, 2 * PAGE)
        finally:
            os.close(fd)
        assert os.stat(r.data).st_mtime_ns > t0
        # The kernel saw mtime change and kept the page cache: no fault.
        assert m[2 * PAGE:2 * PAGE + 10] == b"w" * 10 and m[:PAGE] == b"m" * PAGE
        assert r.stat["cpu_faults"] == faults
    finally:
        m.close()
