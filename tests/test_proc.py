"""MOUNT/proc/ (SPEC §4): the machine-wide vmstat and meminfo in the kernel's
formats, compared with this host's /proc files, and the counters as the
kernel counts them: a migration's target pages in the target node's
numastat (alloc_migration_target()'s zone_statistics()), pgmigrate_* and
pgfault machine-wide in proc/vmstat and in no node's vmstat.

Every test reads through a real mount with plain file I/O; counts are
compared as before/after deltas on a module's own mount.
"""
from __future__ import annotations

import os
import re

import pytest

import cdmfs
from cdmfs.fs import formats

PAGE = 4096
NODE = "sys/devices/system/node"
NUMASTAT = ("numa_hit", "numa_miss", "numa_foreign", "interleave_hit", "local_node", "other_node")
KV = re.compile(r"([a-z0-9_]+) (\d+)")
MEMINFO = re.compile(r"(\S+):(\s+)(\d+)( kB)?")


@pytest.fixture(scope="module")
def mnt():
    """The embedded default machine: node 0 sysram with every CPU, node 1
    CDM (device cdm0), gpu0's private memory."""
    with cdmfs.mounted() as m:
        yield m


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def host(path: str) -> str:
    try:
        return read(path)
    except OSError as e:
        pytest.skip(f"host has no readable {path}: {e.strerror}")


def kv(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        m = KV.fullmatch(line)
        assert m, f"not a 'name value' line: {line!r}"
        out[m.group(1)] = int(m.group(2))
    return out


def vmstat(m) -> dict:
    return kv(read(os.path.join(m.path, "proc/vmstat")))


def numastat(m, nid: int) -> dict:
    return kv(read(os.path.join(m.path, NODE, f"node{nid}", "numastat")))


def node_vmstat(m, nid: int) -> dict:
    return kv(read(os.path.join(m.path, NODE, f"node{nid}", "vmstat")))


def meminfo_layout(text: str) -> list:
    """[(key, number, has kB, column where the number ends)] per line."""
    out = []
    for line in text.splitlines():
        m = MEMINFO.fullmatch(line)
        assert m, f"not a meminfo line: {line!r}"
        out.append((m.group(1), int(m.group(3)), bool(m.group(4)), m.end(3)))
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def migrate(region, start: int, length: int, target: str) -> str:
    """One migration through the transaction file; its answer."""
    fd = os.open(os.path.join(region.path, "migrate"), os.O_RDWR)
    try:
        os.write(fd, f"{start} {length} {target}\n".encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def fill(region, npages: int) -> None:
    """First touch of pages [0, npages) by write(2): one page each, no read-ahead."""
    fd = os.open(region.data, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x5a" * (npages * PAGE), 0)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- #
# formats, against the host's /proc
# --------------------------------------------------------------------------- #


def test_proc_dir(mnt):
    assert sorted(os.listdir(mnt.path)) == ["devices", "proc", "regions", "sys"]
    assert sorted(os.listdir(os.path.join(mnt.path, "proc"))) == ["meminfo", "sys", "vmstat", "zoneinfo"]
    for name in ("meminfo", "vmstat", "zoneinfo"):
        assert os.stat(os.path.join(mnt.path, "proc", name)).st_mode & 0o777 == 0o444


def test_vmstat_keys_in_the_kernels_order(mnt):
    ours = list(vmstat(mnt))
    theirs = list(kv(host("/proc/vmstat")))
    # The keys present are in the kernel's order ...
    assert [k for k in ours if k in theirs] == [k for k in theirs if k in ours]
    # ... and on this reference kernel they are the host's, every one.
    assert ours == theirs
    for key in ("nr_free_pages", "nr_anon_pages", "numa_hit", "numa_local", "pgalloc_normal",
                "pgalloc_movable", "pgfree", "pgfault", "pgmigrate_success", "pgmigrate_fail"):
        assert key in ours


def test_meminfo_format_is_the_hosts(mnt):
    ours = meminfo_layout(read(os.path.join(mnt.path, "proc/meminfo")))
    theirs = meminfo_layout(host("/proc/meminfo"))
    assert [k for k, *_ in ours] == [k for k, *_ in theirs]
    for (key, n, kb, end), (_, hn, hkb, hend) in zip(ours, theirs):
        assert kb == hkb, key
        # %8lu kB / %5lu: a wider number pushes on, so compare where both fit.
        width = 8 if kb else 5
        if len(str(n)) <= width and len(str(hn)) <= width:
            assert end == hend, f"{key}: number ends at {end}, host {hend}"


def test_meminfo_sums_the_nodes(mnt):
    info = {k: n for k, n, *_ in meminfo_layout(read(os.path.join(mnt.path, "proc/meminfo")))}
    nodes = [mnt.node(n).meminfo for n in mnt.nodes]
    assert info["MemTotal"] == sum(n["MemTotal"] for n in nodes) == 2 * 1048576
    for key in ("MemFree", "AnonPages", "Mapped", "Dirty", "Mlocked", "Active(anon)"):
        assert info[key] == sum(n[key] for n in nodes), key
    assert info["MemAvailable"] == info["MemFree"]
    assert info["CommitLimit"] == info["MemTotal"] // 2
    assert info["Hugepagesize"] == 2048
    assert info["HugePages_Total"] == info["SwapTotal"] == info["Cached"] == 0
    v = vmstat(mnt)
    assert v["nr_free_pages"] * 4 == info["MemFree"]


def test_vmstat_sums_the_nodes(mnt):
    v = vmstat(mnt)
    nodes = [node_vmstat(mnt, n) for n in mnt.nodes]
    for key in formats.NODE_VMSTAT_KEYS:
        assert v[key] == sum(n[key] for n in nodes), key


# --------------------------------------------------------------------------- #
# counters as the kernel counts them
# --------------------------------------------------------------------------- #


def test_first_touch_counts_pgalloc_not_pgfault_for_writes(mnt):
    before, n0 = vmstat(mnt), numastat(mnt, 0)
    r = mnt.region("touch", 16 * PAGE)
    fill(r, 10)
    d = delta(vmstat(mnt), before)
    assert d["pgalloc_normal"] == 10 and d["pgalloc_movable"] == 0
    assert d["numa_hit"] == d["numa_local"] == 10
    assert d["nr_anon_pages"] == 10 and d["nr_free_pages"] == -10
    assert d["pgfault"] == 0              # write(2) is no fault
    assert delta(numastat(mnt, 0), n0)["numa_hit"] == 10
    r.remove()
    d = delta(vmstat(mnt), before)
    assert d["pgfree"] == 10 and d["nr_anon_pages"] == 0


def test_migration_target_counted_in_numastat(mnt):
    """move_pages() to node 1 from a CPU of node 0: numa_hit and other_node
    on node 1 for every page; node 0 unchanged; back to node 0: numa_hit and
    local_node there.  pgmigrate_success counts each move machine-wide,
    pgalloc_<zone> the target frames; no node vmstat has either."""
    n = 24
    r = mnt.region("mig", 32 * PAGE)
    fill(r, n)
    v0, s0, s1 = vmstat(mnt), numastat(mnt, 0), numastat(mnt, 1)
    nv0 = node_vmstat(mnt, 1)
    assert migrate(r, 0, n * PAGE, "1").startswith(f"requested {n}\nmigrated {n}\nskipped 0\n")
    assert r.stat["N1"] == n
    d1 = delta(numastat(mnt, 1), s1)
    assert d1 == dict(numa_hit=n, numa_miss=0, numa_foreign=0, interleave_hit=0,
                      local_node=0, other_node=n)
    assert delta(numastat(mnt, 0), s0) == dict.fromkeys(NUMASTAT, 0)
    dv = delta(vmstat(mnt), v0)
    assert dv["pgmigrate_success"] == n and dv["pgmigrate_fail"] == 0
    assert dv["pgalloc_movable"] == n and dv["pgalloc_normal"] == 0     # CDM is ZONE_MOVABLE
    assert dv["pgfree"] == n
    assert dv["numa_hit"] == n and dv["numa_other"] == n and dv["numa_local"] == 0
    # the node's vmstat shows the same numastat items, and no vm event
    nv = delta(node_vmstat(mnt, 1), nv0)
    assert nv["numa_hit"] == nv["numa_other"] == n and nv["nr_anon_pages"] == n
    assert not {"pgmigrate_success", "pgmigrate_fail", "pgfault"} & set(nv)

    v0, s0, s1 = vmstat(mnt), numastat(mnt, 0), numastat(mnt, 1)
    assert migrate(r, 0, n * PAGE, "node:0").startswith(f"requested {n}\nmigrated {n}\n")
    assert delta(numastat(mnt, 0), s0) == dict(numa_hit=n, numa_miss=0, numa_foreign=0,
                                               interleave_hit=0, local_node=n, other_node=0)
    assert delta(numastat(mnt, 1), s1) == dict.fromkeys(NUMASTAT, 0)
    assert delta(vmstat(mnt), v0)["pgmigrate_success"] == n
    r.remove()


def test_private_memory_is_no_node(mnt):
    """Device-private memory has no numastat: a migration into gpu0 counts
    no NUMA event and no pgalloc; the CPU fault that brings the pages back
    allocates them by the region's policy, a first touch's hit and local."""
    n = 8
    r = mnt.region("priv", n * PAGE)        # nothing beyond for read-ahead to place
    fill(r, n)
    v0, s0, s1 = vmstat(mnt), numastat(mnt, 0), numastat(mnt, 1)
    assert migrate(r, 0, n * PAGE, "gpu0").startswith(f"requested {n}\nmigrated {n}\n")
    assert r.stat["private:gpu0"] == n
    assert delta(numastat(mnt, 0), s0) == dict.fromkeys(NUMASTAT, 0)
    assert delta(numastat(mnt, 1), s1) == dict.fromkeys(NUMASTAT, 0)
    dv = delta(vmstat(mnt), v0)
    assert dv["pgmigrate_success"] == n
    assert dv["pgalloc_normal"] == dv["pgalloc_movable"] == 0
    assert dv["pgfree"] == n                     # node 0's frames, freed
    # The CPU reads them: fault-back, by the default policy from node 0.
    v0, s0 = vmstat(mnt), numastat(mnt, 0)
    with open(r.data, "rb") as f:
        assert f.read(n * PAGE) == b"\x5a" * (n * PAGE)
    assert r.stat["N0"] == n
    d0 = delta(numastat(mnt, 0), s0)
    assert d0 == dict(numa_hit=n, numa_miss=0, numa_foreign=0, interleave_hit=0, local_node=n, other_node=0)
    dv = delta(vmstat(mnt), v0)
    assert dv["pgmigrate_success"] == n and dv["pgalloc_normal"] == n and dv["pgfault"] >= 1
    r.remove()


def test_pgmigrate_fail_counts_a_pinned_page(mnt):
    r = mnt.region("pin", 8 * PAGE)
    fill(r, 4)
    with open(os.path.join(r.path, "advise"), "w") as f:
        f.write(f"0 {PAGE} pin\n")
    v0, s1 = vmstat(mnt), numastat(mnt, 1)
    out = migrate(r, 0, 4 * PAGE, "1")
    assert out.startswith("requested 4\nmigrated 3\nskipped 1\npage 0 -EBUSY\n"), out
    dv = delta(vmstat(mnt), v0)
    assert dv["pgmigrate_success"] == 3 and dv["pgmigrate_fail"] == 1
    assert delta(numastat(mnt, 1), s1)["numa_hit"] == 3
    with open(os.path.join(r.path, "advise"), "w") as f:
        f.write(f"0 {PAGE} unpin\n")
    r.remove()
