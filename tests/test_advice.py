"""Usermode hints (issue 15, SPEC §6.3): preferred_location, accessed_by,
prefetch, unset, and the listing of ``advise``."""
from __future__ import annotations

import errno
import os
import time

import pytest

import cdmfs
from conftest import PAGE, fill

KB = 1024
MB = 1 << 20


@pytest.fixture(scope="module")
def m():
    with cdmfs.mounted() as mount:
        yield mount


def listing(r) -> list[tuple[int, int, str]]:
    with open(os.path.join(r.path, "advise")) as f:
        return [(int(a), int(b), " ".join(rest)) for a, b, *rest in (l.split() for l in f.read().splitlines())]



def test_listing_splits_and_merges(m):
    r = m.region("adv_list", 1 * MB)
    r.advise(0, 64 * KB, "preferred_location:gpu0")
    r.advise(32 * KB, 64 * KB, "accessed_by:cdm0")
    assert listing(r) == [
        (0, 32 * KB, "preferred_location:private:gpu0"),
        (32 * KB, 32 * KB, "accessed_by:cdm0 preferred_location:private:gpu0"),
        (64 * KB, 32 * KB, "accessed_by:cdm0"),
    ]
    # The same advice on the neighbour merges; a different one splits.
    r.advise(64 * KB, 32 * KB, "preferred_location:gpu0")
    assert listing(r) == [
        (0, 32 * KB, "preferred_location:private:gpu0"),
        (32 * KB, 64 * KB, "accessed_by:cdm0 preferred_location:private:gpu0"),
    ]
    r.advise(16 * KB, 16 * KB, "preferred_location:node:1")
    assert listing(r)[:3] == [
        (0, 16 * KB, "preferred_location:private:gpu0"),
        (16 * KB, 16 * KB, "preferred_location:node:1"),
        (32 * KB, 64 * KB, "accessed_by:cdm0 preferred_location:private:gpu0"),
    ]
    r.advise(0, 1 * MB, "unset:preferred_location")
    assert listing(r) == [(32 * KB, 64 * KB, "accessed_by:cdm0")]
    r.advise(0, 1 * MB, "read_mostly")
    r.advise(0, 1 * MB, "unset:accessed_by:cdm0")
    assert listing(r) == [(0, 1 * MB, "read_mostly")]
    r.advise(0, 1 * MB, "unset:read_mostly")
    assert listing(r) == []
    # Pins list with the rest.
    r.pin(0, 8 * KB)
    r.advise(4 * KB, 8 * KB, "accessed_by:gpu0")
    assert listing(r) == [(0, 4 * KB, "pin"), (4 * KB, 4 * KB, "accessed_by:gpu0 pin"),
                          (8 * KB, 4 * KB, "accessed_by:gpu0")]
    r.unpin(0, 8 * KB)
    r.advise(0, 1 * MB, "unset:accessed_by")
    assert listing(r) == []
    r.remove()


@pytest.mark.parametrize("request_text", [
    "0 4096 unknown", "0 4096 preferred_location:gpu9", "0 4096 preferred_location:",
    "0 4096 preferred_location", "0 4096 accessed_by:nosuch", "0 4096 accessed_by",
    "0 4096 read_mostly:1", "0 4096 prefetch", "0 4096 prefetch:node:7", "0 4096 unset:pin",
    "0 4096 unset:", "0 4096 unset:accessed_by:gpu9", "1 4096 read_mostly", "0 4095 read_mostly",
    "0 0 read_mostly", "0 2097152 read_mostly", "-4096 4096 read_mostly", "0 4096",
    "0 4096 read_mostly extra", "x 4096 read_mostly",
])
def test_bad_advice_is_einval_and_changes_nothing(m, request_text):
    r = m.region("adv_bad", 1 * MB)
    r.advise(0, 8 * KB, "preferred_location:gpu0")
    before = listing(r), r.stat
    with pytest.raises(OSError) as e:
        with open(os.path.join(r.path, "advise"), "w") as f:
            f.write(request_text + "\n")
    assert e.value.errno == errno.EINVAL
    assert (listing(r), r.stat) == before
    r.advise(0, 1 * MB, "unset:preferred_location")


def test_preferred_location_device_fault_migrates_in_others_map_remotely(m):
    r = m.region("adv_pref", 1 * MB)
    fill(r)
    gpu, cdm = m.device("gpu0"), m.device("cdm0")
    assert cdm.fault_policy == "remote"
    # cdm0 under fault_policy remote: pages that prefer its node come in.
    r.advise(0, 256 * KB, "preferred_location:cdm0")         # its node, node:1
    res = cdm.access("read", "adv_pref", 0, 512 * KB)
    assert res["migrated"] == 64
    assert r.stat["N1"] == 64
    # gpu0 (fault_policy migrate): pages that prefer node 1 stay there, reached
    # remotely; the others come into gpu0 as usual.
    res = gpu.access("read", "adv_pref", 0, 512 * KB)
    assert res["migrated"] == 64                    # [256K, 512K) only
    assert res["remote_bytes"] == 256 * KB and res["local_bytes"] == 256 * KB
    assert r.stat["N1"] == 64 and r.stat["private:gpu0"] == 64
    # A page preferring gpu0 is left where it is by a coherent device's fault:
    # cdm0 reaches system RAM, so nothing moves.
    r.advise(512 * KB, 256 * KB, "preferred_location:gpu0")
    cdm.fault_policy = "migrate"
    try:
        res = cdm.access("read", "adv_pref", 512 * KB, 256 * KB)
        assert res["migrated"] == 0 and res["remote_bytes"] == 256 * KB
        assert r.stat["N0"] == 256 - 128
    finally:
        cdm.fault_policy = "remote"
    with open(os.path.join(r.path, "data"), "rb") as f:
        assert f.read() == bytes([0x5A]) * r.size
    r.remove()


def test_accessed_by_keeps_a_mapping_through_migrations(m):
    r = m.region("adv_acc", 256 * KB)
    fill(r, 3)
    gpu = m.device("gpu0")
    r.advise(0, 256 * KB, "accessed_by:gpu0")
    st0 = gpu.stat
    res = gpu.access("read", "adv_acc", 0, 256 * KB)
    assert res["faults"] == 0 and res["migrated"] == 0
    assert res["remote_bytes"] == 256 * KB and r.stat["N0"] == 64
    # Re-established after every migration: to node 1 and back.
    for target, flag in (("1", "coherent-remote"), ("0", "write")):
        r.migrate(0, 256 * KB, target)
        snap = gpu.snapshot("adv_acc", 0, 256 * KB)
        assert set(snap.values()) == {flag}, snap
        res = gpu.access("add", "adv_acc", 0, 256 * KB, 1)
        assert res["faults"] == 0 and res["migrated"] == 0 and res["remote_bytes"] == 256 * KB
    assert gpu.stat["faults"] == st0["faults"]
    # Model: remote bytes cost the device's remote bandwidth.
    assert res["modeled_ns"] >= 256 * KB * 1000 // 32000
    # Unset: the next access faults and migrates as the fault policy says.
    r.advise(0, 256 * KB, "unset:accessed_by")
    res = gpu.access("read", "adv_acc", 0, 256 * KB)
    assert res["faults"] == 64 and res["migrated"] == 64
    with open(os.path.join(r.path, "data"), "rb") as f:
        word = (int.from_bytes(bytes([3]) * 8, "little") + 2).to_bytes(8, "little")
        assert f.read() == word * (256 * KB // 8)
    r.remove()


def wait_prefetch(r, done: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = r.stat
        if st["prefetch_done"] >= done and st["prefetch_active"] == 0:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.01)


def test_prefetch_runs_in_the_background(m):
    size = 64 * MB
    r = m.region("adv_pf", size)
    fill(r, 9)
    gpu = m.device("gpu0")
    used0 = gpu.meminfo["MemUsed"]          # read (and cached by the router) before
    r.advise(0, size, "prefetch:gpu0")
    st = wait_prefetch(r, 1)
    # What the background work changed shows at once, never a stale render.
    assert gpu.meminfo["MemUsed"] - used0 == size // KB
    assert st["prefetch_requested"] == size // PAGE
    assert st["prefetch_migrated"] == size // PAGE and st["prefetch_skipped"] == 0
    assert st["private:gpu0"] == size // PAGE
    # The client and the C API's word: prefetch to system RAM.
    r.prefetch(0, size, "cpu")
    st = wait_prefetch(r, 2)
    assert st["N0"] == size // PAGE and st["private:gpu0"] == 0
    with open(os.path.join(r.path, "data"), "rb") as f:
        assert f.read() == bytes([9]) * size
    r.remove()


def test_prefetch_of_a_removed_region_loses_nothing(m):
    r = m.region("adv_pf_rm", 16 * MB)
    fill(r, 1)
    r.advise(0, 16 * MB, "prefetch:gpu0")
    # The prefetch's invalidations open the data file for a moment (the
    # write-back before an invalidation): rmdir may see it open, EBUSY.
    deadline = time.monotonic() + 60
    while True:
        try:
            r.remove()
            break
        except OSError as e:
            assert e.errno == errno.EBUSY and time.monotonic() < deadline
            time.sleep(0.001)
    # The daemon is still there and consistent.
    r2 = m.region("adv_pf_rm2", 1 * MB)
    fill(r2, 2)
    assert m.device("gpu0").access("read", "adv_pf_rm2", 0, 1 * MB)["status"] == "ok"
    r2.remove()


@pytest.mark.parametrize("router", ["1", "0"])
def test_cpu_fault_back_goes_to_the_preferred_node(router, monkeypatch):
    """A CPU fault is "a fault from elsewhere": pages in gpu0's memory whose
    preferred location is cdm0's node come back to node 1 (the CPU maps
    it), not to node 0 where the policy would place a new page; the rest
    of the region by its policy.  With the router the core leaves those
    fault-backs to Python; without it Python does them all."""
    monkeypatch.setenv("CDMFS_ROUTER", router)
    with cdmfs.mounted() as mnt:
        r = mnt.region("adv_cpu", 64 * PAGE)
        data = bytes(range(256)) * (64 * PAGE // 256)
        with open(r.data, "r+b") as f:
            f.write(data)
        assert r.migrate(0, 64 * PAGE, "gpu0")["migrated"] == 64
        r.advise(0, 32 * PAGE, "preferred_location:cdm0")
        with open(r.data, "rb") as f:
            assert f.read() == data                 # every page faulted back, intact
        st = r.stat
        assert (st["N1"], st["N0"], st["private:gpu0"]) == (32, 32, 0)
        # Unset: the next fault-backs go by the policy again.
        assert r.migrate(0, 64 * PAGE, "gpu0")["migrated"] == 64
        r.advise(0, 64 * PAGE, "unset:preferred_location")
        with open(r.data, "rb") as f:
            assert f.read() == data
        assert r.stat["N0"] == 64
        r.remove()
