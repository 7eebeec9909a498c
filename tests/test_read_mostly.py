"""Read duplication (issue 15, ``read_mostly`` advice): a device read copies
the page into the device's memory as a read-only duplicate while the CPU
keeps its copy; any write collapses every duplicate first; a reader never
sees a stale duplicate."""
from __future__ import annotations

import os
import struct
import threading
import zlib

import pytest

import cdmfs
from conftest import PAGE, fill

KB = 1024
MB = 1 << 20


@pytest.fixture(scope="module")
def m():
    with cdmfs.mounted() as mount:
        yield mount



def used_kb(dev) -> int:
    return dev.meminfo["MemUsed"]


def test_reads_duplicate_and_migrate_nothing(m):
    r = m.region("rm_dup", 1 * MB)
    fill(r, 0x33)
    r.advise(0, 1 * MB, "read_mostly")
    gpu = m.device("gpu0")
    used0, st0 = used_kb(gpu), gpu.stat
    res = gpu.access("read", "rm_dup", 0, 1 * MB)
    assert res["migrated"] == 0 and res["crc32"] == zlib.crc32(bytes([0x33]) * MB)
    assert res["remote_bytes"] == 1 * MB
    # The CPU keeps its copy; the device holds a duplicate of every page.
    assert r.stat["N0"] == 256 and r.stat["private:gpu0"] == 0
    assert r.stat["duplicated"] == 256
    assert gpu.stat["duplicated"] - st0["duplicated"] == 256
    assert used_kb(gpu) - used0 == 1 * MB // KB
    # The next read is local, and still migrates nothing.
    res = gpu.access("read", "rm_dup", 0, 1 * MB)
    assert res["migrated"] == 0 and res["local_bytes"] == 1 * MB and res["remote_bytes"] == 0
    assert res["crc32"] == zlib.crc32(bytes([0x33]) * MB)
    # A CPU write collapses the duplicates of what it writes, and the device
    # then reads the new bytes.
    with open(os.path.join(r.path, "data"), "r+b") as f:
        f.seek(8 * PAGE)
        f.write(b"\x44" * PAGE)
    assert r.stat["duplicated"] == 255
    expect = bytes([0x33]) * (8 * PAGE) + b"\x44" * PAGE + bytes([0x33]) * (MB - 9 * PAGE)
    assert gpu.access("read", "rm_dup", 0, 1 * MB)["crc32"] == zlib.crc32(expect)
    assert r.stat["duplicated"] == 256
    # A device write collapses them all (of its range) and migrates as usual.
    res = gpu.access("write", "rm_dup", 0, 64 * KB, 0x55)
    assert r.stat["duplicated"] == 256 - 16
    assert res["migrated"] == 16 and r.stat["private:gpu0"] == 16
    # A migration collapses too.
    r.migrate(64 * KB, 64 * KB, "1")
    assert r.stat["duplicated"] == 256 - 32
    # unset: the duplicates of the range go; a read migrates again.
    r.advise(0, 512 * KB, "unset:read_mostly")
    assert r.stat["duplicated"] == 128
    res = gpu.access("read", "rm_dup", 256 * KB, 64 * KB)
    assert res["migrated"] == 16 and res["faults"] == 16
    res = gpu.access("read", "rm_dup", 512 * KB, 64 * KB)
    assert res["migrated"] == 0 and res["local_bytes"] == 64 * KB
    assert r.stat["duplicated"] == 128
    r.remove()
    assert gpu.stat["duplicated"] == st0["duplicated"]
    assert used_kb(gpu) == used0


def test_two_devices_duplicate_and_one_write_collapses_both(m):
    r = m.region("rm_two", 256 * KB)
    fill(r, 1)
    r.advise(0, 256 * KB, "read_mostly")
    gpu, cdm = m.device("gpu0"), m.device("cdm0")
    gpu.access("read", "rm_two", 0, 256 * KB)
    cdm.access("read", "rm_two", 0, 256 * KB)
    assert gpu.stat["duplicated"] >= 64 and cdm.stat["duplicated"] >= 64
    assert m.node(1).meminfo["MemUsed"] >= 256
    # The C path would serve this WRITE; the mark leaves it to Python.
    with open(os.path.join(r.path, "data"), "r+b") as f:
        f.write(b"\x02" * 256 * KB)
    assert r.stat["duplicated"] == 0
    for dev in (gpu, cdm):
        assert dev.access("read", "rm_two", 0, 256 * KB)["crc32"] == zlib.crc32(b"\x02" * 256 * KB)
    r.remove()
    assert gpu.stat["duplicated"] == 0 and cdm.stat["duplicated"] == 0


@pytest.mark.parametrize("through", ["pwrite", "mmap"])
def test_no_stale_read_under_concurrent_cpu_writers(m, through):
    """CPU writers store increasing versions into pages while the device
    reads them: every device read of a page sees a version at least the one
    committed before the read began (pwrite returned, or msync for a
    mapping), never an older duplicate."""
    npages = 16
    r = m.region(f"rm_race_{through}", npages * PAGE)
    fill(r, 0)
    r.advise(0, npages * PAGE, "read_mostly")
    gpu = m.device("gpu0")
    committed = [0] * npages
    stop = threading.Event()
    errors = []

    def page_of(v: int) -> bytes:
        return struct.pack("<Q", v) * (PAGE // 8)

    def writer():
        try:
            fd = os.open(os.path.join(r.path, "data"), os.O_RDWR)
            mm = None
            if through == "mmap":
                import mmap
                mm = mmap.mmap(fd, npages * PAGE)
            v = 0
            while not stop.is_set() and v < 300:
                v += 1
                for p in range(npages):
                    if mm is None:
                        os.pwrite(fd, page_of(v), p * PAGE)
                    else:
                        mm[p * PAGE:(p + 1) * PAGE] = page_of(v)
                        mm.flush(p * PAGE, PAGE)
                    committed[p] = v
            if mm is not None:
                mm.close()
            os.close(fd)
        except Exception as e:      # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    checked = 0
    try:
        while t.is_alive() and checked < 400:
            p = checked % npages
            floor = committed[p]
            crc = gpu.access("read", r.name, p * PAGE, PAGE)["crc32"]
            ceiling = committed[p] + 1
            assert crc in {zlib.crc32(page_of(v)) for v in range(floor, ceiling + 1)}, (p, floor, ceiling)
            checked += 1
    finally:
        stop.set()
        t.join()
    assert not errors
    # Quiet now: every page reads its last version, from a duplicate or not.
    for p in range(npages):
        assert gpu.access("read", r.name, p * PAGE, PAGE)["crc32"] == zlib.crc32(page_of(committed[p]))
    r.remove()


def test_duplicates_fill_device_memory_then_evict(m):
    """Duplicates count in the device's MemUsed; the device going offline
    drops them all."""
    r = m.region("rm_off", 2 * MB)
    fill(r, 5)
    r.advise(0, 2 * MB, "read_mostly")
    gpu = m.device("gpu0")
    used0 = used_kb(gpu)
    gpu.access("touch", "rm_off", 0, 2 * MB)
    assert used_kb(gpu) - used0 == 2 * MB // KB
    gpu.online = False
    try:
        assert r.stat["duplicated"] == 0 and gpu.stat["duplicated"] == 0
    finally:
        gpu.online = True
    assert used_kb(gpu) == used0
    with open(os.path.join(r.path, "data"), "rb") as f:
        assert f.read() == bytes([5]) * r.size
    r.remove()
