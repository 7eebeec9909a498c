"""Placement the kernel decides (issue balancing): NUMA balancing with
hinting faults, memory tiers with demotion and promotion, and the controls.

The two-node machine has one host CPU per node (CPU 0 on node 0, CPU 1 on
node 1), so a child pinned to a CPU makes its node the faulting one, as
test_router_data.test_first_touch_local_to_the_faulting_cpu does.  Waits
are bounded by generous deadlines, never timed assertions.
"""
from __future__ import annotations

import errno
import mmap
import os
import random
import time

import pytest

import cdmfs

PAGE = 4096
N = 512
DEADLINE = 60.0

TWO_NODES = """
block_size = "4M"
[[node]]
id = 0
kind = "sysram"
size = "32M"
cpus = "0"
[[node]]
id = 1
kind = "sysram"
size = "32M"
cpus = "1"
"""

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0),
    reason="needs host CPUs 0 and 1")

FAST_SCAN = {"scan_delay_ms": "20", "scan_period_min_ms": "50", "scan_period_max_ms": "200"}


def path(m: cdmfs.Mount, rel: str) -> str:
    return os.path.join(m.path, rel)


def read(m: cdmfs.Mount, rel: str) -> str:
    with open(path(m, rel)) as f:
        return f.read()


def write(m: cdmfs.Mount, rel: str, text: str) -> None:
    with open(path(m, rel), "w") as f:
        f.write(text)


def vmstat(m: cdmfs.Mount, rel: str = "proc/vmstat") -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in read(m, rel).splitlines())}


def fast_scan(m: cdmfs.Mount) -> None:
    for k, v in FAST_SCAN.items():
        write(m, f"sys/kernel/debug/sched/numa_balancing/{k}", v)


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def on_cpu(cpu: int, fn) -> int:
    """Runs fn() in a child pinned to cpu; returns its pid (exit 0: fn True)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.sched_setaffinity(0, {cpu})
            code = 0 if fn() else 2
        finally:
            os._exit(code)
    return pid


def first_touch(r, cpu: int, data: bytes) -> None:
    def fill():
        fd = os.open(r.data, os.O_RDWR)
        with mmap.mmap(fd, len(data)) as mm:
            mm[:] = data
            mm.flush()
        os.close(fd)
        return True
    pid = on_cpu(cpu, fill)
    assert os.waitpid(pid, 0)[1] == 0


def reader(r, cpu: int, data: bytes, seconds: float) -> int:
    """A child on cpu reading every page of r through a mapping for
    seconds, then checking the bytes (exit 2 if they differ)."""
    def loop():
        fd = os.open(r.data, os.O_RDONLY)
        with mmap.mmap(fd, len(data), prot=mmap.PROT_READ) as mm:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for k in range(0, len(data), PAGE):
                    mm[k]
                time.sleep(0.005)
            ok = mm[:] == data
        os.close(fd)
        return ok
    return on_cpu(cpu, loop)


def wait_child(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def two():
    with cdmfs.mounted(TWO_NODES) as m:
        fast_scan(m)
        yield m


# ---------------------------------------------------------------- controls

CONTROLS = {
    "proc/sys/kernel/numa_balancing": ("1\n", ["4", "-1", "x", " ", "1 2", "0x10"]),
    "proc/sys/kernel/numa_balancing_promote_rate_limit_MBps": ("65536\n", ["-1", "abc", "2147483648"]),
    "sys/kernel/debug/sched/numa_balancing/scan_delay_ms": ("1000\n", ["-5", "1e3", "4294967296"]),
    "sys/kernel/debug/sched/numa_balancing/scan_period_min_ms": ("1000\n", ["ten", "-1"]),
    "sys/kernel/debug/sched/numa_balancing/scan_period_max_ms": ("60000\n", ["\n", "9" * 20]),
    "sys/kernel/debug/sched/numa_balancing/scan_size_mb": ("256\n", ["256M", "-256"]),
    "sys/kernel/debug/sched/numa_balancing/hot_threshold_ms": ("1000\n", ["1.5", "x"]),
    "sys/kernel/mm/numa/demotion_enabled": ("false\n", ["maybe", "2", "\n"]),
}


def test_controls_have_the_kernels_defaults_and_refuse_bad_writes():
    with cdmfs.mounted(TWO_NODES) as m:
        for rel, (default, bad) in CONTROLS.items():
            assert read(m, rel) == default, rel
            debugfs = rel.startswith("sys/kernel/debug/")     # root's alone
            assert os.stat(path(m, rel)).st_mode & 0o777 == (0o600 if debugfs else 0o644), rel
            for text in bad:
                with pytest.raises(OSError) as e:
                    write(m, rel, text)
                assert e.value.errno == errno.EINVAL, (rel, text)
                assert read(m, rel) == default, (rel, text)
        for mode in ("0", "2", "3", "1"):
            write(m, "proc/sys/kernel/numa_balancing", mode + "\n")
            assert read(m, "proc/sys/kernel/numa_balancing") == mode + "\n"
        write(m, "sys/kernel/mm/numa/demotion_enabled", "1")
        assert read(m, "sys/kernel/mm/numa/demotion_enabled") == "true\n"
        write(m, "sys/kernel/mm/numa/demotion_enabled", "n")
        assert read(m, "sys/kernel/mm/numa/demotion_enabled") == "false\n"
        write(m, "sys/kernel/debug/sched/numa_balancing/scan_size_mb", "64")
        assert read(m, "sys/kernel/debug/sched/numa_balancing/scan_size_mb") == "64\n"
        # Two DRAM nodes: one tier, memory_tier4 (abstract distance 576 >> 7).
        tiers = path(m, "sys/devices/virtual/memory_tiering")
        assert os.listdir(tiers) == ["memory_tier4"]
        assert read(m, "sys/devices/virtual/memory_tiering/memory_tier4/nodelist") == "0-1\n"
        zi = read(m, "proc/zoneinfo")
        assert zi.startswith("Node 0, zone   Normal\n")
        for key in ("min", "low", "high", "promo"):
            assert f"\n        {key:<8} " in zi
        for key in ("numa_pte_updates", "numa_hint_faults", "numa_hint_faults_local",
                    "numa_pages_migrated"):
            assert key in vmstat(m)
        for key in ("pgpromote_success", "pgdemote_kswapd", "pgdemote_direct"):
            assert key in vmstat(m, "sys/devices/system/node/node0/vmstat")


def test_cdm_nodes_keep_balancing_and_reclaim_off():
    with cdmfs.mounted() as m:
        node = "sys/devices/system/node/node1"
        assert read(m, f"{node}/numa_balancing") == "0\n" and read(m, f"{node}/reclaim") == "0\n"
        assert read(m, "sys/devices/system/node/node0/numa_balancing") == "1\n"


# ---------------------------------------------------------------- balancing


@needs_two_cpus
def test_pages_move_to_the_node_of_the_cpu_that_reads_them(two):
    """First touched from CPU 0 (node 0), then read from CPU 1: hinting
    faults move them to node 1 within a bounded time, bytes intact, and the
    counters agree with what moved."""
    m = two
    r = m.region("bal", N * PAGE)
    data = pattern(N * PAGE)
    first_touch(r, 0, data)
    assert r.stat["N0"] == N
    v0 = vmstat(m)
    t0 = time.monotonic()
    pid = reader(r, 1, data, DEADLINE)
    try:
        while r.stat["N1"] < N * 9 // 10 and time.monotonic() - t0 < DEADLINE:
            time.sleep(0.05)
        t90 = time.monotonic() - t0
        assert r.stat["N1"] >= N * 9 // 10, r.stat
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    print(f"90% of {N} pages on the accessing node after {t90:.2f} s")
    v = vmstat(m)
    moved = v["numa_pages_migrated"] - v0["numa_pages_migrated"]
    st = r.stat
    assert moved == st["N1"] == st["migrated_pages"]
    assert v["numa_hint_faults"] - v0["numa_hint_faults"] >= moved
    # Every hinting fault took a mark the scanner set (maybe before v0).
    assert v["numa_pte_updates"] >= v["numa_hint_faults"]
    assert v["numa_hint_faults_local"] <= v["numa_hint_faults"]
    assert v["pgmigrate_success"] - v0["pgmigrate_success"] == moved
    with open(r.data, "rb") as f:
        assert f.read() == data
    assert read(m, "sys/kernel/debug/cdmfs/check") == "ok\n"


def nothing_moves(m, r, data, seconds: float = 1.5) -> dict[str, int]:
    v0 = vmstat(m)
    pid = reader(r, 1, data, seconds)
    assert wait_child(pid) == 0
    assert r.stat["N0"] == N and r.stat["N1"] == 0
    v = vmstat(m)
    return {k: v[k] - v0[k] for k in v}


@needs_two_cpus
def test_nothing_moves_with_balancing_off(two):
    m = two
    write(m, "proc/sys/kernel/numa_balancing", "0")
    r = m.region("off", N * PAGE)
    data = pattern(N * PAGE, 2)
    first_touch(r, 0, data)
    d = nothing_moves(m, r, data)
    assert d["numa_pte_updates"] == d["numa_hint_faults"] == d["numa_pages_migrated"] == 0


@needs_two_cpus
def test_nothing_moves_to_a_node_whose_switch_is_off(two):
    m = two
    write(m, "sys/devices/system/node/node1/numa_balancing", "0")
    r = m.region("sw", N * PAGE)
    data = pattern(N * PAGE, 3)
    first_touch(r, 0, data)
    d = nothing_moves(m, r, data)
    assert d["numa_pages_migrated"] == 0


@needs_two_cpus
def test_nothing_moves_under_a_single_node_bind(two):
    m = two
    r = m.region("bind", N * PAGE)
    r.policy = "bind:0"
    data = pattern(N * PAGE, 4)
    first_touch(r, 0, data)
    d = nothing_moves(m, r, data)
    assert d["numa_pages_migrated"] == 0
    assert d["numa_hint_faults"] > 0       # sampled all the same, as the kernel does


# ---------------------------------------------------------------- tiers

TIERED = """
block_size = "4M"
[[node]]
id = 0
kind = "sysram"
size = "8M"
cpus = "all"
[[node]]
id = 1
kind = "memory"
size = "32M"
[[node]]
id = 2
kind = "cdm"
size = "32M"
[[device]]
name = "cdm0"
memory = "node:2"
"""
NODE0 = 2048


def fill(r, n: int, seed: int) -> bytes:
    """Writes n pages of r through a mapping (this process's CPU)."""
    data = pattern(n * PAGE, seed)
    fd = os.open(r.data, os.O_RDWR)
    with mmap.mmap(fd, n * PAGE) as mm:
        mm[:] = data
        mm.flush()
    os.close(fd)
    return data


def keep_reading(r, data: bytes, seconds: float) -> int:
    """A child reading r's pages through a mapping for seconds (no pinning)."""
    def loop():
        fd = os.open(r.data, os.O_RDONLY)
        with mmap.mmap(fd, len(data), prot=mmap.PROT_READ) as mm:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for k in range(0, len(data), PAGE):
                    mm[k]
                time.sleep(0.002)
            ok = mm[:] == data
        os.close(fd)
        return ok
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if loop() else 2
        finally:
            os._exit(code)
    return pid


def until(cond, deadline: float = DEADLINE) -> bool:
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def node_vmstat(m, nid: int) -> dict[str, int]:
    return vmstat(m, f"sys/devices/system/node/node{nid}/vmstat")


def zone_marks(m, nid: int) -> dict[str, int]:
    out, node = {}, None
    for line in read(m, "proc/zoneinfo").splitlines():
        if line.startswith("Node "):
            node = int(line.split(",")[0].split()[1])
        elif node == nid and line.strip().split(" ")[0] in ("min", "low", "high", "promo"):
            k, v = line.split()
            out[k] = int(v)
    return out


@pytest.fixture
def tiered():
    with cdmfs.mounted(TIERED) as m:
        fast_scan(m)
        write(m, "sys/kernel/mm/numa/demotion_enabled", "1")
        yield m


def test_tiers_from_the_access_figures(tiered):
    m = tiered
    tiers = sorted(os.listdir(path(m, "sys/devices/virtual/memory_tiering")))
    assert tiers == ["memory_tier4", "memory_tier70"]
    assert read(m, "sys/devices/virtual/memory_tiering/memory_tier4/nodelist") == "0\n"
    assert read(m, "sys/devices/virtual/memory_tiering/memory_tier70/nodelist") == "1-2\n"
    assert read(m, "sys/devices/system/node/node1/reclaim") == "1\n"     # memory: not CDM
    assert read(m, "sys/devices/system/node/node2/reclaim") == "0\n"


def test_filling_the_fast_node_demotes_cold_pages_and_keeps_hot_ones(tiered):
    """Node 0 filled past its low watermark: kswapd demotes the pages nobody
    touched to node 1 (never to the CDM node 2) until node 0 is above its
    high watermark; the pages a reader keeps touching stay; data intact."""
    m = tiered
    marks = zone_marks(m, 0)
    cold = m.region("cold", 1000 * PAGE)
    cold_data = fill(cold, 1000, 11)
    hot = m.region("hot", 400 * PAGE)
    hot_data = fill(hot, 400, 12)
    pid = keep_reading(hot, hot_data, 4.0)
    try:
        time.sleep(0.3)
        filler = m.region("filler", 800 * PAGE)
        filler_data = fill(filler, 800, 13)
        assert until(lambda: node_vmstat(m, 0)["nr_free_pages"] >= marks["high"])
        time.sleep(0.5)
    finally:
        assert wait_child(pid) == 0
    demoted = node_vmstat(m, 0)["pgdemote_kswapd"]
    assert cold.stat["N1"] > 0 and demoted >= cold.stat["N1"]
    assert hot.stat["N0"] == 400 and hot.stat["N1"] == 0
    assert all(r.stat.get("N2", 0) == 0 for r in (cold, hot, filler))
    v = vmstat(m)
    print(f"demoted {demoted} pages (cold: {cold.stat['N1']} on node 1), hot kept {hot.stat['N0']}")
    assert v["pgdemote_kswapd"] == demoted and v["pgsteal_kswapd"] == demoted
    for r, data in ((cold, cold_data), (hot, hot_data), (filler, filler_data)):
        with open(r.data, "rb") as f:
            assert f.read() == data
    assert read(m, "sys/kernel/debug/cdmfs/check") == "ok\n"


def test_a_full_node_demotes_directly_for_a_bound_fault(tiered):
    """bind:0 on a full node 0: the fault reclaims by demotion (direct)
    instead of failing, while node 1 has room."""
    m = tiered
    cold = m.region("cold", 1900 * PAGE)
    cold_data = fill(cold, 1900, 21)
    # The hinting scanner unmaps them: nobody touches them again, they are cold.
    assert until(lambda: vmstat(m)["numa_pte_updates"] >= 1900)
    b = m.region("bound", 400 * PAGE)
    b.policy = "bind:0"
    b_data = fill(b, 400, 22)
    assert b.stat["N0"] == 400
    assert cold.stat["N1"] > 0
    print(f"bound fault: pgdemote_direct {vmstat(m)['pgdemote_direct']}, "
          f"pgdemote_kswapd {vmstat(m)['pgdemote_kswapd']}")
    assert vmstat(m)["pgdemote_direct"] + vmstat(m)["pgdemote_kswapd"] >= cold.stat["N1"]
    for r, data in ((cold, cold_data), (b, b_data)):
        with open(r.data, "rb") as f:
            assert f.read() == data


def test_a_cdm_node_never_receives_a_demoted_page():
    conf = TIERED.replace('kind = "memory"\nsize = "32M"', 'kind = "cdm"\nsize = "32M"') \
        .replace('name = "cdm0"\nmemory = "node:2"', 'name = "cdm0"\nmemory = "node:2"\n[[device]]\n'
                 'name = "cdm1"\nmemory = "node:1"')
    with cdmfs.mounted(conf) as m:
        write(m, "sys/kernel/mm/numa/demotion_enabled", "1")
        # Even with its switches on: isolated nodes are no demotion target.
        for nid in (1, 2):
            write(m, f"sys/devices/system/node/node{nid}/reclaim", "1")
        r = m.region("full", 2040 * PAGE)
        data = fill(r, 2040, 31)
        time.sleep(1.0)
        assert r.stat["N0"] == 2040 and r.stat.get("N1", 0) == 0 and r.stat.get("N2", 0) == 0
        assert node_vmstat(m, 0)["pgdemote_kswapd"] == 0
        with open(r.data, "rb") as f:
            assert f.read() == data


def test_tiering_mode_promotes_reaccessed_pages_within_the_rate_limit(tiered):
    """Pages on the slow node that the CPU reads again come back to node 0
    (numa_balancing 2), no faster than the promote rate limit allows."""
    m = tiered
    write(m, "proc/sys/kernel/numa_balancing", "2")
    write(m, "proc/sys/kernel/numa_balancing_promote_rate_limit_MBps", "1")    # 256 pages/s
    r = m.region("slow", 600 * PAGE)
    r.policy = "preferred:1"
    data = fill(r, 600, 41)
    assert r.stat["N1"] == 600
    r.policy = "default"
    v0, t0 = node_vmstat(m, 0), time.monotonic()
    pid = keep_reading(r, data, 2.0)
    assert wait_child(pid) == 0
    elapsed = time.monotonic() - t0
    v = node_vmstat(m, 0)
    promoted = v["pgpromote_success"] - v0["pgpromote_success"]
    assert 0 < promoted == r.stat["N0"]
    print(f"promoted {promoted} of 600 pages in {elapsed:.1f} s at 1 MB/s")
    assert promoted <= 256 * (elapsed + 1)
    assert v["pgpromote_candidate"] - v0["pgpromote_candidate"] >= promoted
    # Without the limit the rest come back too.
    write(m, "proc/sys/kernel/numa_balancing_promote_rate_limit_MBps", "65536")
    pid = keep_reading(r, data, DEADLINE)
    try:
        assert until(lambda: r.stat["N0"] == 600)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    with open(r.data, "rb") as f:
        assert f.read() == data


@needs_two_cpus
def test_balancing_keeps_the_data_of_a_concurrent_writer(two):
    """A writer on CPU 1 stamps every page through its mapping, round after
    round, never syncing, while hinting faults move the pages under it:
    every page ends with the last round's stamp and its other bytes intact."""
    m = two
    r = m.region("writer", N * PAGE)
    data = bytearray(pattern(N * PAGE, 5))
    first_touch(r, 0, bytes(data))
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rd)
            os.sched_setaffinity(0, {1})
            fd = os.open(r.data, os.O_RDWR)
            with mmap.mmap(fd, N * PAGE) as mm:
                end, rounds = time.monotonic() + 3.0, 0
                while time.monotonic() < end or rounds < 3:
                    rounds += 1
                    stamp = rounds.to_bytes(8, "little")
                    for k in range(N):
                        mm[k * PAGE:k * PAGE + 8] = stamp
                os.write(wr, rounds.to_bytes(8, "little"))
            code = 0
        finally:
            os._exit(code)
    os.close(wr)
    assert wait_child(pid) == 0
    rounds = int.from_bytes(os.read(rd, 8), "little")
    os.close(rd)
    assert r.stat["N1"] > 0, r.stat            # it did move pages under the writer
    with open(r.data, "rb") as f:
        got = f.read()
    stamp = rounds.to_bytes(8, "little")
    for k in range(N):
        page = got[k * PAGE:(k + 1) * PAGE]
        assert page[:8] == stamp and page[8:] == data[k * PAGE + 8:(k + 1) * PAGE], k
    assert read(m, "sys/kernel/debug/cdmfs/check") == "ok\n"
