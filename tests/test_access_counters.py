"""Device access counters (issue 15, SPEC §7 ``access_counters``): accesses
to pages outside the device's memory are counted per granule; at the
threshold the granule migrates in and its counter starts again."""
from __future__ import annotations

import errno
import os

import pytest

import cdmfs
from conftest import PAGE, fill

KB = 1024
MB = 1 << 20
GRANULE = 64 * KB // PAGE


@pytest.fixture(scope="module")
def m():
    with cdmfs.mounted() as mount:
        yield mount


@pytest.fixture
def cdm(m):
    """cdm0 counting, with its node open to automatic placement (a cdm
    node's numa_balancing switch is off by default: no counter migration)."""
    dev = m.device("cdm0")
    dev.access_counters = "256 64K"
    m.node(1).numa_balancing = True
    yield dev
    m.node(1).numa_balancing = False
    dev.access_counters = "0"



def test_settings_and_bad_input(m):
    dev = m.device("gpu0")
    assert dev.access_counters == "0"
    for good in ("256 64K", "1 2M", "4294967296 16M", "0"):
        dev.access_counters = good
        assert dev.access_counters == good
    dev.access_counters = "17 2M"
    for bad in ("", "256", "256 4K", "256 64k", "0 64K", "-1 64K", "x 64K", "256 64K 1",
                "4294967297 64K", "1.5 2M", "off"):
        with pytest.raises(OSError) as e:
            dev.access_counters = bad
        assert e.value.errno == errno.EINVAL, bad
        assert dev.access_counters == "17 2M"
    dev.access_counters = "0"


def test_pages_move_exactly_at_the_threshold_per_granule(m, cdm):
    r = m.region("ac_exact", 1 * MB)
    fill(r, 0x11)
    st0 = cdm.stat
    # Granule 0: 16 pages an access; 15 accesses = 240 < 256: nothing moves.
    for _ in range(15):
        res = cdm.access("read", "ac_exact", 0, 64 * KB)
        assert res["migrated"] == 0
    assert r.stat["N1"] == 0
    assert cdm.stat["counter_notifications"] == st0["counter_notifications"]
    # The 16th reaches 256: granule 0, and only it, moves in.
    res = cdm.access("read", "ac_exact", 0, 64 * KB)
    assert res["migrated"] == GRANULE
    assert r.stat["N1"] == GRANULE
    snap = cdm.snapshot("ac_exact", 0, 128 * KB)
    assert all(snap[p] == "coherent-local" for p in range(GRANULE))
    assert all(snap[p] != "coherent-local" for p in range(GRANULE, 2 * GRANULE))
    st = cdm.stat
    assert st["counter_notifications"] - st0["counter_notifications"] == 1
    assert st["counter_migrations"] - st0["counter_migrations"] == 1
    # Granule 1, two pages an access: 127 accesses = 254, then 256.
    for _ in range(127):
        assert cdm.access("touch", "ac_exact", 64 * KB, 8 * KB)["migrated"] == 0
    assert r.stat["N1"] == GRANULE
    assert cdm.access("touch", "ac_exact", 64 * KB, 8 * KB)["migrated"] == GRANULE
    assert r.stat["N1"] == 2 * GRANULE
    # Local pages count nothing: granule 0 is in, accesses to it never notify.
    for _ in range(20):
        cdm.access("read", "ac_exact", 0, 64 * KB)
    assert cdm.stat["counter_notifications"] - st0["counter_notifications"] == 2
    with open(os.path.join(r.path, "data"), "rb") as f:
        assert f.read() == bytes([0x11]) * r.size
    r.remove()


def test_counter_starts_again_after_a_migration_and_respects_advice(m, cdm):
    r = m.region("ac_advice", 256 * KB)
    fill(r, 2)
    r.advise(0, 32 * KB, "preferred_location:node:0")     # half of granule 0
    for _ in range(16):
        cdm.access("read", "ac_advice", 0, 64 * KB)
    # The notification came; only the pages without contrary advice moved.
    assert r.stat["N1"] == GRANULE // 2
    # Pinned pages stay too.
    r.pin(64 * KB, 64 * KB)
    for _ in range(16):
        cdm.access("read", "ac_advice", 64 * KB, 64 * KB)
    assert r.stat["N1"] == GRANULE // 2 and r.stat["pinned"] == GRANULE
    r.unpin(64 * KB, 64 * KB)
    # The counter of granule 1 started again after its notification: 15 more
    # accesses move nothing, the 16th moves it.
    for _ in range(15):
        cdm.access("read", "ac_advice", 64 * KB, 64 * KB)
    assert r.stat["N1"] == GRANULE // 2
    cdm.access("read", "ac_advice", 64 * KB, 64 * KB)
    assert r.stat["N1"] == GRANULE // 2 + GRANULE
    r.remove()


def test_node_numa_balancing_switch_gates_counter_migrations(m, cdm):
    r = m.region("ac_switch", 64 * KB)
    fill(r, 3)
    node1 = m.node(1)
    node1.numa_balancing = False
    try:
        for _ in range(16):
            cdm.access("read", "ac_switch", 0, 64 * KB)
        assert r.stat["N1"] == 0
        assert cdm.stat["counter_notifications"] > 0
    finally:
        node1.numa_balancing = True
    for _ in range(16):
        cdm.access("read", "ac_switch", 0, 64 * KB)
    assert r.stat["N1"] == GRANULE
    r.remove()


def test_private_device_with_accessed_by_counts_remote_accesses(m):
    """gpu0 reaching sysram pages through accessed_by (no faults) migrates a
    2M granule after 256 accesses; its pages then count as local."""
    gpu = m.device("gpu0")
    r = m.region("ac_gpu", 4 * MB)
    fill(r, 4)
    r.advise(0, 4 * MB, "accessed_by:gpu0")
    gpu.access_counters = "256 2M"
    try:
        res = gpu.access("read", "ac_gpu", 0, 4 * MB)      # 1024 pages: 512 each granule
        assert res["faults"] == 0
        assert res["migrated"] == 1024 and r.stat["private:gpu0"] == 1024
        res = gpu.access("read", "ac_gpu", 0, 4 * MB)
        assert res["local_bytes"] == 4 * MB and res["migrated"] == 0 and res["faults"] == 0
    finally:
        gpu.access_counters = "0"
    with open(os.path.join(r.path, "data"), "rb") as f:
        assert f.read() == bytes([4]) * r.size
    r.remove()
