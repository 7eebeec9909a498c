"""Region data served by the router in C (issue 13, build step 2, first part).

With the router, a READ or WRITE of a region's data whose pages are placed
(present, plain: not poisoned, locked or in device memory) or absent under
one policy with a published plan (a first touch) is answered by the router
from the core's page tables; everything else goes to Python as before.  The router's counters are read from debugfs
(``sys/kernel/debug/cdmfs/router``): served_reads / served_writes.

To make a placed page fault again the tests drop the kernel's clean copies
with posix_fadvise(POSIX_FADV_DONTNEED) (unmapped pages only).
"""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

import cdmfs
from conftest import PAGE, SMALL_CONFIG, router_stats

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the router mounts with mount(2): root only")

NPAGES = 64


@pytest.fixture(scope="module")
def rm():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDMFS_ROUTER", "1")
        with cdmfs.mounted(SMALL_CONFIG) as m:
            yield m


def check_ok(m: cdmfs.Mount) -> None:
    with open(os.path.join(m.path, "sys/kernel/debug/cdmfs/check")) as f:
        assert f.read().strip() == "ok"


def pattern(n: int, seed: int) -> bytes:
    return b"".join(((seed * 1000003 + i) & 0xFFFFFFFF).to_bytes(4, "little") * (PAGE // 4)
                    for i in range(n))


def drop(fd: int) -> None:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def test_placed_pages_served_in_c(rm):
    r = rm.region("served", NPAGES * PAGE)
    data = pattern(NPAGES, 1)
    fd = os.open(r.data, os.O_RDWR)
    try:
        s0, st0 = router_stats(rm), r.stat
        os.pwrite(fd, data, 0)                  # first touch: placed in C too
        s1 = router_stats(rm)
        assert delta(s1, s0)["served_writes"] == 1
        assert r.stat["N0"] == NPAGES
        drop(fd)
        s1, st1 = router_stats(rm), r.stat
        assert os.pread(fd, len(data), 0) == data     # re-faults of placed pages: C
        s2, st2 = router_stats(rm), r.stat
        d = delta(s2, s1)
        assert d["served_reads"] > 0
        # The region's cpu_faults count the READs served in C as Python's would.
        assert delta(st2, st1)["cpu_faults"] == d["served_reads"]
        new = pattern(NPAGES, 2)
        os.pwrite(fd, new, 0)                   # placed: C
        s3, st3 = router_stats(rm), r.stat
        d = delta(s3, s2)
        assert d["served_writes"] > 0
        assert delta(st3, st2)["writebacks"] == d["served_writes"]
        drop(fd)
        assert os.pread(fd, len(new), 0) == new
        # A read past the end: Python's, zero bytes.
        assert os.pread(fd, PAGE, NPAGES * PAGE) == b""
        assert st3["cpu_faults"] >= st0["cpu_faults"]
    finally:
        os.close(fd)
    check_ok(rm)
    r.remove()


def test_mmap_write_back_and_refault(rm):
    r = rm.region("mapped", NPAGES * PAGE)
    data = pattern(NPAGES, 3)
    mm = r.mmap()
    mm[:] = data                                # first touch (READ of absent pages): Python
    s0 = router_stats(rm)
    mm.flush()                                  # write-back of placed pages: C
    s1 = router_stats(rm)
    assert delta(s1, s0)["served_writes"] > 0
    mm.close()
    fd = os.open(r.data, os.O_RDONLY)
    try:
        drop(fd)
    finally:
        os.close(fd)
    mm = r.mmap()
    try:
        assert mm[:] == data                    # re-faults: C
    finally:
        mm.close()
    assert delta(router_stats(rm), s1)["served_reads"] > 0
    where = r.stat
    assert where["N0"] == NPAGES and where["pages"] == NPAGES
    check_ok(rm)
    r.remove()


def node_numastat(m: cdmfs.Mount, nid: int) -> dict[str, int]:
    with open(os.path.join(m.path, f"sys/devices/system/node/node{nid}/numastat")) as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def test_first_touch_served_in_c(rm):
    """A first touch is placed by the core from the plan Python published for
    the range's policy: node 0 by default, node 1 in an mbind range of
    bind:1, each counted as the kernel counts an allocation."""
    r = rm.region("fresh", NPAGES * PAGE)
    r.mbind(NPAGES // 2 * PAGE, NPAGES // 2 * PAGE, "bind:1")
    s0, n0, n1 = router_stats(rm), node_numastat(rm, 0), node_numastat(rm, 1)
    fd = os.open(r.data, os.O_RDONLY)
    try:
        # Page by page (read-ahead off): each READ lies in one policy range.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for k in range(NPAGES):
            assert os.pread(fd, PAGE, k * PAGE) == bytes(PAGE)
    finally:
        os.close(fd)
    d = delta(router_stats(rm), s0)
    assert d["served_reads"] == NPAGES
    assert r.stat["N0"] == NPAGES // 2 and r.stat["N1"] == NPAGES // 2
    d0, d1 = delta(node_numastat(rm, 0), n0), delta(node_numastat(rm, 1), n1)
    assert d0["numa_hit"] == NPAGES // 2 and d0["local_node"] == NPAGES // 2
    # bind:1 from a CPU of node 0: hits on node 1, remote to the faulting CPU.
    assert d1["numa_hit"] == NPAGES // 2 and d1["other_node"] == NPAGES // 2
    assert r.numa_maps_text.splitlines() == [
        "00000000 default anon=32 N0=32 kernelpagesize_kB=4",
        "00020000 bind:1 anon=32 N1=32 kernelpagesize_kB=4"]
    check_ok(rm)
    r.remove()


def test_first_touch_of_an_isolated_node_is_forwarded(rm):
    """Node 1 (cdm0's memory) is isolated: a default first touch never
    lands there, in C or in Python; with node 0 full the fault fails
    (Python's EIO) instead of spilling into node 1."""
    with open(os.path.join(rm.path, "sys/devices/system/node/node0/meminfo")) as f:
        free0 = int(next(l for l in f if "MemFree" in l).split()[3]) * 1024 // PAGE
    r = rm.region("full", (free0 + 8) * PAGE)
    fd = os.open(r.data, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        got = 0
        with pytest.raises(OSError) as e:
            for k in range(free0 + 8):
                os.pread(fd, PAGE, k * PAGE)
                got += 1
        assert e.value.errno == errno.EIO
        assert got <= free0
    finally:
        os.close(fd)
    assert r.stat.get("N1", 0) == 0
    check_ok(rm)
    r.remove()


TWO_CPU_NODES = """
block_size = "4M"
[[node]]
id = 0
kind = "sysram"
size = "8M"
cpus = "0"
[[node]]
id = 1
kind = "sysram"
size = "8M"
cpus = "1"
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0),
                    reason="needs host CPUs 0 and 1")
def test_first_touch_local_to_the_faulting_cpu():
    """With CPUs on two nodes the core asks which CPU faulted: a process on
    CPU 1 gets node 1's memory under the default policy, on CPU 0 node 0's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDMFS_ROUTER", "1")
        with cdmfs.mounted(TWO_CPU_NODES) as m:
            r = m.region("local", NPAGES * PAGE)
            s0, ns0 = router_stats(m), [node_numastat(m, nid) for nid in (0, 1)]
            for cpu, lo in ((1, 0), (0, NPAGES // 2)):
                pid = os.fork()
                if pid == 0:
                    try:
                        os.sched_setaffinity(0, {cpu})
                        fd = os.open(r.data, os.O_RDWR)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                        for k in range(lo, lo + NPAGES // 2):
                            os.pread(fd, PAGE, k * PAGE)
                        os._exit(0)
                    except BaseException:
                        os._exit(1)
                assert os.waitpid(pid, 0)[1] == 0
            assert delta(router_stats(m), s0)["served_reads"] == NPAGES
            assert r.stat["N1"] == NPAGES // 2 and r.stat["N0"] == NPAGES // 2
            for nid in (0, 1):
                d = delta(node_numastat(m, nid), ns0[nid])
                assert d["numa_hit"] == d["local_node"] == NPAGES // 2, (nid, d)
                assert d["other_node"] == 0, (nid, d)
            r.remove()


def test_fault_back_from_gpu0(rm):
    """A CPU read of device-private pages: the router migrates them back to
    RAM in C (migrate_to_ram by the range's policy); Python then finishes
    what only it knows before its next request: gpu0 drops its mirrored
    entries and counts the pages that left its memory, the region counts
    them migrated."""
    r = rm.region("dev", NPAGES * PAGE)
    gpu = rm.device("gpu0")
    data = pattern(NPAGES, 4)
    fd = os.open(r.data, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        res = r.migrate(0, NPAGES * PAGE, "gpu0")
        assert res["migrated"] == NPAGES
        assert r.stat["private:gpu0"] == NPAGES
        assert set(gpu.snapshot("dev", 0, NPAGES * PAGE).values()) == {"private-local"}
        drop(fd)
        s0, g0, st0, n0 = router_stats(rm), gpu.stat, r.stat, node_numastat(rm, 0)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        half = NPAGES // 2
        for k in range(half):                        # device-private: C faults back
            assert os.pread(fd, PAGE, k * PAGE) == data[k * PAGE:(k + 1) * PAGE]
        s1 = router_stats(rm)
        assert delta(s1, s0)["served_reads"] == half
        st1 = r.stat
        assert st1["N0"] == half and st1["private:gpu0"] == NPAGES - half
        assert delta(st1, st0)["migrated_pages"] == half
        d = delta(gpu.stat, g0)
        assert d["migrated_from"] == half and d["invalidations"] == half
        snap = gpu.snapshot("dev", 0, NPAGES * PAGE)
        assert [snap[k] for k in range(NPAGES)] == ["none"] * half + ["private-local"] * (NPAGES - half)
        dn = delta(node_numastat(rm, 0), n0)
        assert dn["numa_hit"] == half and dn["local_node"] == half
        # The rest in one read: all of it in C, then re-faults of placed pages.
        assert os.pread(fd, len(data), 0) == data
        assert r.stat["N0"] == NPAGES and r.stat["private:gpu0"] == 0
        assert set(gpu.snapshot("dev", 0, NPAGES * PAGE).values()) == {"none"}
        drop(fd)
        assert os.pread(fd, len(data), 0) == data   # back on N0: C
        assert delta(router_stats(rm), s1)["served_reads"] > 0
    finally:
        os.close(fd)
    check_ok(rm)
    r.remove()


def test_truncate_and_rmdir_race_reads(rm):
    """Readers re-fault placed pages in a loop while the file shrinks and
    grows under them and the region is removed: no crash, data correct where
    the file still has it, the core consistent."""
    for round_ in range(3):
        name = f"race{round_}"
        r = rm.region(name, NPAGES * PAGE)
        data = pattern(NPAGES, 10 + round_)
        fd = os.open(r.data, os.O_RDWR)
        os.pwrite(fd, data, 0)
        os.close(fd)
        stop = threading.Event()
        errors: list[BaseException] = []

        def reader():
            while not stop.is_set():
                try:
                    fd = os.open(r.data, os.O_RDWR)
                except FileNotFoundError:
                    return
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    got = os.pread(fd, PAGE * 8, PAGE * 4)
                    # The file may be cut anywhere meanwhile: what is read is
                    # the data or zeroes (regrown).
                    for k in range(0, len(got), PAGE):
                        page = got[k:k + PAGE]
                        assert page in (data[PAGE * 4 + k:PAGE * 4 + k + PAGE], bytes(len(page))), k
                    os.pwrite(fd, data[PAGE * 20:PAGE * 21], PAGE * 20)
                except OSError:
                    pass                        # ENOENT after rmdir, EIO...
                except BaseException as e:      # a wrong byte
                    errors.append(e)
                    return
                finally:
                    os.close(fd)
                time.sleep(0.002)   # rmdir needs a moment with nothing open

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            r.truncate(6 * PAGE)
            r.truncate(NPAGES * PAGE)
        deadline = time.monotonic() + 20
        while True:
            try:
                os.rmdir(r.path)
                break
            except OSError:
                assert time.monotonic() < deadline, "rmdir never found the region closed"
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[0]
        assert name not in rm.regions
    check_ok(rm)
    assert router_stats(rm)["served_reads"] > 0


def test_stat_counters_match_the_python_path(rm, monkeypatch):
    """The same requests counted on a mount without the router and on this
    one give the same cpu_faults and writebacks in stat."""
    def run(m: cdmfs.Mount) -> dict[str, int]:
        r = m.region("count", 16 * PAGE)
        fd = os.open(r.data, os.O_RDWR)
        try:
            st0 = r.stat
            os.pwrite(fd, pattern(16, 5), 0)        # one WRITE
            os.pwrite(fd, pattern(1, 6), 3 * PAGE)  # one WRITE
            drop(fd)
            for k in range(4):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.pread(fd, PAGE, k * 4 * PAGE)
            st1 = r.stat
        finally:
            os.close(fd)
        r.remove()
        return delta(st1, st0)

    routed = run(rm)
    monkeypatch.setenv("CDMFS_ROUTER", "0")
    with cdmfs.mounted(SMALL_CONFIG) as plain:
        assert not os.path.exists(os.path.join(plain.path, "sys/kernel/debug/cdmfs/router"))
        direct = run(plain)
    assert routed["writebacks"] == direct["writebacks"] == 2
    assert routed["cpu_faults"] == direct["cpu_faults"] > 0


def test_migration_writes_dirty_pages_back_in_large_writes(rm):
    """Migrating mapped, dirty pages: the daemon writes the batch back
    (sync_file_range) before it invalidates, so the kernel sends a few
    large WRITEs instead of laundering each dirty page in a WRITE of its
    own; every byte arrives on gpu0."""
    n = 512                                      # one 2 MiB batch
    r = rm.region("dirty", n * PAGE)
    mm = r.mmap()
    try:
        data = pattern(n, 9)
        mm[:] = data                            # dirty in the page cache, never synced
        st0 = r.stat
        res = r.migrate(0, n * PAGE, "gpu0")
        assert res["migrated"] == n
        d = delta(r.stat, st0)
        assert 0 < d["writebacks"] <= 8, d
        assert r.stat["private:gpu0"] == n
        assert mm[:] == data                    # faulted back, intact
    finally:
        mm.close()
    check_ok(rm)
    r.remove()
