"""The memory manager and the drivers without FUSE (in addition to the tests
through real mounts): they work on their own floor, tell the world through
events, and drop device mirrors through the mmu notifiers they take."""
from __future__ import annotations

import errno
import os
import zlib

import pytest

import pytest

from cdmfs import config
from cdmfs._core import lib
from cdmfs.drivers import dmirror
from cdmfs.mm import memory_failure
from cdmfs.mm.machine import Machine
from cdmfs.mm.migrate_device import migrate_range
from cdmfs.mm.region import Regions

PAGE = 4096


def machine():
    m = Machine(config.load(None))
    regions = Regions(m)
    devices = dmirror.probe(m)
    events = []
    for kind in ("cpu_fault", "device_fault", "migrate", "region_removed", "device_offline",
                 "device_online", "poison", "memory_offline", "memory_online"):
        m.events.subscribe(kind, lambda kind=kind, **fields: events.append((kind, fields)))
    return m, regions, devices, events


async def test_every_mover_reports_an_event():
    m, regions, devices, events = machine()
    r = regions.create("r")
    r.resize(64 * PAGE)
    data = os.urandom(64 * PAGE)
    await r.writeback(0, data, os.getpid())
    assert bytes(await r.fault(0, 8 * PAGE, os.getpid())) == data[:8 * PAGE]
    assert events[-1] == ("cpu_fault", {"region": r, "pid": os.getpid(), "first": 0, "n": 8,
                                        "node": "0", "type": "fault"})

    res = await migrate_range(m, r, 0, 32, m.target("gpu0"))
    assert res.migrated == 32
    kind, fields = events[-1]
    assert kind == "migrate" and fields["moved"] == 32 and fields["device_moves"] == {"gpu0": 32}
    gpu = devices["gpu0"]
    assert gpu.stats["migrated_to"] == 32
    assert gpu.mirror(r).unmapped(0, 32) == 0          # it mapped what came into its memory

    await gpu.access(r, 32, 32, "touch", 0)
    faults = [f for k, f in events if k == "device_fault"]
    assert [(f["device"], f["first"], f["n"], f["faults"]) for f in faults] == [("gpu0", 32, 32, 32)]
    assert dict(r.stat())["private:gpu0"] == 64         # its fault migrated the rest in

    # Out of service: its memory comes back to node 0 and its mirror goes.
    await gpu.set_online(False)
    assert ("device_offline", {"device": "gpu0", "moved": 64}) in events
    assert gpu.mirrors == {} and r.core.resident[m.nodes[0].pool] == 64
    await gpu.set_online(True)
    assert events[-1] == ("device_online", {"device": "gpu0"})
    assert bytes(await r.fault(0, 64 * PAGE, os.getpid())) == data

    # A poisoned page is told with its region and frame.
    pfn = r.pagemap(5, 1)
    pfn = int.from_bytes(pfn, "little") & ((1 << 55) - 1)
    await memory_failure.hard_offline(m.hotplug, pfn * PAGE)
    assert events[-1] == ("poison", {"region": r, "page": 5, "pfn": pfn})

    regions.remove("r")
    assert events[-1] == ("region_removed", {"region": r})
    assert all(r.id not in d.mirrors for d in devices.values())


def test_region_ids_are_reused_and_bounded():
    """The reverse map names a frame's region in 24 bits: ids come back when
    regions go, and no more regions than that exist at once."""
    from cdmfs.mm import region as mm_region
    m, regions, _, _ = machine()
    for k in range(200):
        r = regions.create(f"r{k}")
        assert r.id == 0
        regions.remove(f"r{k}")
    a, b = regions.create("a"), regions.create("b")
    assert (a.id, b.id) == (0, 1)
    regions.remove("a")
    assert regions.create("c").id == 0          # the smallest free id first
    regions._next_id = mm_region.MAX_REGION_ID + 1
    try:
        regions.create("d")
    except OSError as e:
        assert e.errno == errno.ENOSPC
    else:
        raise AssertionError("a region past the reverse map's reach was created")


# ------------------------------------------------------------- truncation


async def test_grown_tail_reads_zero_after_a_device_write_past_the_end():
    """A device kernel runs on whole pages, so it writes the bytes of the last
    page past the end of the file; growing the file again must show zeros
    there, as a CPU write past the end never would."""
    m, regions, devices, _ = machine()
    r = regions.create("r")
    r.resize(3 * PAGE)
    await r.writeback(0, b"\xaa" * (3 * PAGE), os.getpid())
    r.resize(2 * PAGE + 100)                        # shrink: the tail goes to zero
    assert bytes(await r.fault(2 * PAGE, PAGE, os.getpid())) == b"\xaa" * 100
    await devices["gpu0"].access(r, 2, 1, "write", 0xff)
    r.resize(3 * PAGE)                              # grow: past the old end reads zero
    tail = bytes(await r.fault(2 * PAGE, PAGE, os.getpid()))
    assert tail == b"\xff" * 100 + bytes(PAGE - 100)
    assert m.check() == ""


async def test_shrink_waits_for_a_migration_holding_the_tail_page():
    """The page a shrink cuts in two must read zero past the new end.  While
    a migration holds it locked, its copy may be taken already, so zeroing
    the old frame would be lost when the migration installs the copy: resize
    fails with EAGAIN, changing nothing, and truncate waits for the page."""
    import trio
    from cdmfs._core import ffi, lib
    m, regions, _, _ = machine()
    r = regions.create("r")
    r.resize(3 * PAGE)
    await r.writeback(0, b"\xaa" * (3 * PAGE), os.getpid())
    target = m.target("gpu0").pool
    src, dst, st = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]"), ffi.new("int32_t[1]")
    assert lib.cdm_migrate_collect(m.core, r.core, 2, 1, target, 0, 0, src, st) == 1
    assert lib.cdm_migrate_lock(m.core, r.core, 2, 1, st) == 1
    assert lib.cdm_migrate_alloc(m.core, target, 1, st, dst) == 1
    lib.cdm_migrate_copy(m.core, 1, st, src, dst)
    with pytest.raises(OSError) as err:
        r.resize(2 * PAGE + 100)
    assert err.value.errno == errno.EAGAIN and r.size == 3 * PAGE
    done = []
    async with trio.open_nursery() as nursery:
        async def shrink():
            await r.truncate(2 * PAGE + 100)
            done.append(r.size)
        nursery.start_soon(shrink)
        await trio.sleep(0.05)
        assert not done                                 # waiting for the page
        assert lib.cdm_migrate_finalize(m.core, r.core, 2, 1, target, dst, st) == 1
        r.wake_waiters()
    assert done == [2 * PAGE + 100]
    r.resize(3 * PAGE)
    await migrate_range(m, r, 0, 3, m.node_target(0))
    assert bytes(await r.fault(0, 3 * PAGE, os.getpid())) == b"\xaa" * (2 * PAGE + 100) + bytes(PAGE - 100)
    assert m.check() == ""


# ----------------------------------------------------- locked snapshots


class CountingLib:
    """Stands in for cdmfs._core.lib in a module, counting native calls."""

    def __init__(self, lib):
        self._lib = lib
        self.calls: list[str] = []

    def __getattr__(self, name):
        value = getattr(self._lib, name)
        if callable(value):
            def call(*args, _name=name, _fn=value):
                self.calls.append(_name)
                return _fn(*args)
            return call
        return value


def test_sysfs_reads_are_one_snapshot_each(monkeypatch):
    """meminfo, vmstat and numastat of a node and a region's stat read the
    core through one locked snapshot each, not a struct field at a time."""
    from cdmfs.fs.sysfs import node as sysfs_node
    from cdmfs.mm import machine as mm_machine, region as mm_region
    m, regions, _, _ = machine()
    r = regions.create("r")
    r.resize(8 * PAGE)
    counting = CountingLib(mm_machine.lib)
    monkeypatch.setattr(mm_machine, "lib", counting)
    monkeypatch.setattr(mm_region, "lib", counting)
    monkeypatch.setattr(sysfs_node, "lib", counting)
    for show in (sysfs_node.node_meminfo, sysfs_node.node_vmstat, sysfs_node.node_numastat):
        counting.calls.clear()
        assert show(m, 0)
        assert counting.calls == ["cdm_pool_snapshot"], (show.__name__, counting.calls)
    counting.calls.clear()
    assert dict(r.stat())["pages"] == 8
    assert counting.calls == ["cdm_region_snapshot"]


def test_cdmfs_reads_no_native_struct_directly():
    """Every read of pools and regions goes through a locked accessor: no
    field of the live structs is read from Python (tests may look inside)."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parent.parent / "cdmfs"
    live = re.compile(r"core\.(pools|npages|size|resident|nr_\w+|pte|cap)\b|\.counters\[")
    found = [f"{path.relative_to(root)}:{k + 1}: {line.strip()}"
             for path in root.rglob("*.py")
             for k, line in enumerate(path.read_text().splitlines()) if live.search(line)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", ["cdm0", "gpu0"])
async def test_device_read_sees_cpu_stores_made_during_it(name):
    """A device read sees every CPU store made before it answers.  It takes
    the CPU's copies back first, but the CPU may fault a page in again right
    after and store to it: the store sits in the CPU's copy, where the device
    op cannot see it.  The read must notice the page is mapped again, take it
    back (its store written back) and read again.

    The CPU is the host page cache, modelled deterministically: cpu_unmapper
    (which the filesystem installs) writes back the dirty copies of the range
    and drops them; on its first call, right after that and before the device
    op, the CPU faults page 3 back in and stores new bytes to its copy."""
    m, regions, devices, _ = machine()
    dev = devices[name]
    dev.fault_policy = "remote"         # the device reaches the pages where they lie
    npages, page, pid = 8, 3, os.getpid()
    r = regions.create("r")
    r.resize(npages * PAGE)
    old = os.urandom(npages * PAGE)
    await r.writeback(0, old, pid)
    stored = os.urandom(PAGE)
    dirty: dict[int, bytearray] = {}    # the CPU's copies it stored to, not written back
    calls = []

    async def cpu_unmapper(region, first, n, write_back=True):
        calls.append((first, n))
        for p in sorted(p for p in dirty if first <= p < first + n):
            await region.writeback(p * PAGE, bytes(dirty.pop(p)), pid)
        lib.cdm_region_uncache(m.core, region.core, first, n)
        if len(calls) == 1:
            copy = await region.fault(page * PAGE, PAGE, pid)
            copy[:] = stored
            dirty[page] = copy
    m.cpu_unmapper = cpu_unmapper

    res = await dev.access(r, 0, npages, "read", 0)
    want = old[:page * PAGE] + stored + old[(page + 1) * PAGE:]
    assert calls[0] == (0, npages) and len(calls) >= 2, calls
    assert not dirty, "the CPU's store was never written back"
    got, crc_want, crc_old = res.crc32, zlib.crc32(want), zlib.crc32(old)
    assert got == crc_want, (
        f"the device read missed a CPU store made before it answered: crc32 {got:#010x}, "
        f"{'the bytes from before the store' if got == crc_old else 'neither old nor new bytes'} "
        f"(want {crc_want:#010x}); {len(calls)} invalidation(s)")
    assert bytes(await r.fault(0, npages * PAGE, pid)) == want


async def test_truncation_after_a_device_write_leaves_no_entry_past_the_end():
    """A device write whose range is truncated after its device op (here
    while its last invalidation runs, the CPU having faulted a page in
    meanwhile) answers as written, is counted in truncated_accesses, and
    leaves no entry in the device's page table past the new end: pages grown
    back there and stored by the CPU are none of the device's."""
    m, regions, devices, _ = machine()
    dev = devices["cdm0"]
    npages, half, pid = 8, 4, os.getpid()
    r = regions.create("r")
    r.resize(npages * PAGE)
    await r.writeback(0, bytes(npages * PAGE), pid)
    calls = []

    async def cpu_unmapper(region, first, n, write_back=True):
        calls.append((first, n))
        lib.cdm_region_uncache(m.core, region.core, first, n)
        if len(calls) == 1:
            await region.fault(0, PAGE, pid)        # the CPU maps page 0 again
        else:
            region.resize(half * PAGE)              # and the range is truncated
    m.cpu_unmapper = cpu_unmapper

    res = await dev.access(r, 0, npages, "write", 0x5A)
    assert len(calls) == 2 and res.bytes == npages * PAGE
    assert dev.stats["truncated_accesses"] == 1
    r.resize(npages * PAGE)
    await r.writeback(half * PAGE, bytes([1]) * (half * PAGE), pid)
    snap = dict(line.split() for line in "".join(dev.snapshot(r, 0, npages)).splitlines())
    assert [snap[str(p)] for p in range(npages)] == ["write"] * half + ["none"] * half, snap
