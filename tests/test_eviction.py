"""Oversubscription of device memory (issue 15, SPEC §7 ``eviction``): a full
device memory evicts its least recently used 2 MiB chunks to system RAM."""
from __future__ import annotations

import errno
import struct
import zlib

import pytest

import cdmfs
from conftest import EVICTION_CONFIG, PAGE

MB = 1 << 20
CONFIG = EVICTION_CONFIG
GPU_PAGES = 8 * MB // PAGE


@pytest.fixture(scope="module")
def m():
    with cdmfs.mounted(CONFIG) as mount:
        yield mount


def words(n_bytes: int, base: int = 0) -> bytes:
    return struct.pack(f"<{n_bytes // 8}Q", *range(base, base + n_bytes // 8))


def gpu_used_pages(m) -> int:
    return m.device("gpu0").meminfo["MemUsed"] * 1024 // PAGE


def test_defaults_and_bad_input(m):
    assert m.device("gpu0").eviction == "lru"
    assert m.device("cdm0").eviction == "off"
    for bad in ("", "fifo", "lru off", "1"):
        with pytest.raises(OSError) as e:
            m.device("gpu0").eviction = bad
        assert e.value.errno == errno.EINVAL
    assert m.device("gpu0").eviction == "lru"


def test_add_over_twice_device_memory_is_exact(m):
    """A device kernel over a buffer twice the device's memory completes,
    every byte is right, and eviction counts agree with meminfo."""
    size = 2 * 8 * MB
    r = m.region("twice", size)
    with open(r.path + "/data", "r+b") as f:
        f.write(words(size))
    gpu = m.device("gpu0")
    st0 = gpu.stat
    res = gpu.access("add", "twice", 0, size, 3)
    assert res["status"] == "ok"
    st = gpu.stat
    evictions = st["evictions"] - st0["evictions"]
    evicted = st["evicted_bytes"] - st0["evicted_bytes"]
    assert evictions > 0 and evicted > 0
    assert evicted % PAGE == 0 and evicted <= evictions * 2 * MB
    # meminfo: the device's memory holds exactly the region's pages there.
    assert gpu_used_pages(m) == r.stat["private:gpu0"]
    assert r.stat["private:gpu0"] <= GPU_PAGES
    assert r.stat["N0"] + r.stat["private:gpu0"] == size // PAGE
    # moved in = stays + moved out
    assert st["migrated_to"] - st0["migrated_to"] == r.stat["private:gpu0"] + \
        (st["migrated_from"] - st0["migrated_from"])
    # A second pass works too (evicting the first's pages), then every byte.
    gpu.access("add", "twice", 0, size, 4)
    with open(r.path + "/data", "rb") as f:
        got = f.read()
    assert got == struct.pack(f"<{size // 8}Q", *[w + 7 for w in range(size // 8)])
    assert r.stat["private:gpu0"] == 0 or gpu_used_pages(m) == r.stat["private:gpu0"]
    r.remove()


def test_migrate_into_full_device_evicts_lru_chunk(m):
    """A migration into full device memory evicts the chunk used longest ago."""
    gpu = m.device("gpu0")
    a = m.region("lru_a", 8 * MB)
    b = m.region("lru_b", 4 * MB)
    for r in (a, b):
        with open(r.path + "/data", "r+b") as f:
            f.write(bytes([7]) * r.size)
    a.migrate(0, 8 * MB, "gpu0")
    assert a.stat["private:gpu0"] == GPU_PAGES
    # Use the last 6 MiB of a again: the first 2 MiB chunk is the LRU one.
    gpu.access("touch", "lru_a", 2 * MB, 6 * MB)
    st0 = gpu.stat
    res = b.migrate(0, 2 * MB, "gpu0")
    assert res["migrated"] == 2 * MB // PAGE
    assert gpu.stat["evictions"] - st0["evictions"] == 1
    pages = a.pagemap(0, 8 * MB // PAGE)
    device_private = [bool(e >> 62 & 1) for e in pages]
    assert not any(device_private[:512]) and all(device_private[512:])
    with open(a.path + "/data", "rb") as f:
        assert f.read() == bytes([7]) * a.size
    a.remove()
    b.remove()


def test_off_fails_with_enomem_and_pins_are_never_evicted(m):
    gpu = m.device("gpu0")
    a = m.region("off_a", 8 * MB)
    b = m.region("off_b", 2 * MB)
    a.migrate(0, 8 * MB, "gpu0")
    gpu.eviction = "off"
    try:
        res = b.migrate(0, 2 * MB, "gpu0")
        assert res["migrated"] == 0 and res["holes"][0][2] == "-ENOMEM"
    finally:
        gpu.eviction = "lru"
    # A pinned page is not in device memory (pinning brings it to RAM) and
    # stays where it is whatever the pressure.
    a.pin(0, 2 * MB)
    assert a.stat["pinned"] == 512
    c = m.region("off_c", 8 * MB)
    c.migrate(0, 8 * MB, "gpu0")
    assert a.stat["pinned"] == 512 and a.stat["N0"] >= 512
    a.unpin(0, 2 * MB)
    for r in (a, b, c):
        r.remove()


def test_read_duplicates_give_way_before_chunks_are_evicted(m):
    """A device memory full of read duplicates takes a migration: the
    duplicates go first (no copy back), no chunk is evicted."""
    gpu = m.device("gpu0")
    a = m.region("dup_a", 8 * MB)
    b = m.region("dup_b", 2 * MB)
    with open(a.path + "/data", "r+b") as f:
        f.write(bytes([6]) * a.size)
    a.advise(0, 8 * MB, "read_mostly")
    gpu.access("read", "dup_a", 0, 8 * MB)
    assert a.stat["duplicated"] == GPU_PAGES and gpu.meminfo["MemFree"] == 0
    st0 = gpu.stat
    res = b.migrate(0, 2 * MB, "gpu0")
    assert res["migrated"] == 512
    assert gpu.stat["evictions"] == st0["evictions"]
    assert a.stat["duplicated"] == GPU_PAGES - 512
    assert gpu_used_pages(m) == GPU_PAGES
    # The pages whose duplicates went are read where they are; duplicates
    # take free memory only, so none is made now and b stays.
    res = gpu.access("read", "dup_a", 0, 8 * MB)
    assert res["crc32"] == zlib.crc32(bytes([6]) * 8 * MB)
    assert res["remote_bytes"] == 2 * MB and res["migrated"] == 0
    assert b.stat["private:gpu0"] == 512 and a.stat["duplicated"] == GPU_PAGES - 512
    for r in (a, b):
        r.remove()
    assert gpu_used_pages(m) == 0
