"""Soak: everything at once for a fixed time, then prove nothing was lost.

CPU threads (tests/c/hmm_stress.c) write and verify sequence-numbered records
in their own pages of a mapped region, never syncing, while other workers
migrate random ranges of it among every node and device, change its policies,
run device kernels (add/write/read) on a second region checked against a
model, and grow and shrink a third region; meanwhile usermode hints change
(preferred_location, accessed_by, read_mostly with its duplicates, unset,
background prefetches), both devices count accesses (access counters at a
low threshold) and gpu0's memory is smaller than the regions migrated into
it, so that full memory evicts (oversubscription).  At the end: zero corrupt records
(in the live mapping and in a fresh process), the device region equals the
model, and every counter agrees (pages in the regions' stat files = pages
used on the nodes and devices).

CDMFS_SOAK_SECONDS sets the duration (CI: the short default; the long form
is e.g. CDMFS_SOAK_SECONDS=600).
"""
from __future__ import annotations

import os
import random
import subprocess
import threading
import time
import zlib

import cdmfs
from conftest import PAGE, cdm_machine

SECONDS = float(os.environ.get("CDMFS_SOAK_SECONDS", "15"))
CPU_PAGES = 2048
DEV_PAGES = 256
ELASTIC_KEEP = 64
COLD_PAGES = 1024
HOG_PAGES = 1536            # 6 MiB: more than gpu0's memory
TARGETS = ("node:0", "node:1", "gpu0")
POLICIES = ("default", "bind:0", "bind:1", "interleave:0-1", "preferred:1", "preferred_many:0-1")
ADVICE = ("preferred_location:node:0", "preferred_location:node:1", "preferred_location:gpu0",
          "accessed_by:gpu0", "accessed_by:cdm0", "read_mostly", "unset:preferred_location",
          "unset:accessed_by", "unset:read_mostly", "prefetch:node:0", "prefetch:node:1", "prefetch:gpu0")
# The embedded default, but gpu0 with 4 MiB: less than the regions that
# migrate into it, so that it evicts.
CONFIG = cdm_machine("1G", cdm="1G", gpu="4M", block_size="")


def page_of(value: int) -> bytes:
    return (value & (2**64 - 1)).to_bytes(8, "little") * (PAGE // 8)


class Workers:
    """Background loops that run until the deadline, recording failures."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name: str, step) -> None:
        def loop() -> None:
            rng = random.Random(name)
            n = 0
            try:
                while time.monotonic() < self.deadline:
                    step(rng)
                    n += 1
            except Exception as e:  # reported by the test, not swallowed
                self.errors.append(f"{name}: {e!r}")
            self.counts[name] = n
        t = threading.Thread(target=loop, name=name)
        t.start()
        self.threads.append(t)

    def join(self) -> None:
        for t in self.threads:
            # The loops run until the deadline: a hang is a step still going
            # two minutes after it.
            t.join(timeout=max(0.0, self.deadline - time.monotonic()) + 120)
            assert not t.is_alive(), f"{t.name} hangs"


# The soak's machine with a slower tier (issue balancing): a small node 0
# that the workload overfills (the CPU region alone, 8 MiB, may be bound to
# it, and gpu0's 4 MiB evicts into it), a CXL-like memory node 2 below it, NUMA
# balancing in both modes with a fast scanner, and demotion on.
TIERED = """
block_size = "4M"
[[node]]
id = 0
kind = "sysram"
size = "12M"
cpus = "all"
[[node]]
id = 1
kind = "cdm"
size = "16M"
[[node]]
id = 2
kind = "memory"
size = "64M"
[[device]]
name = "cdm0"
memory = "node:1"
[[device]]
name = "gpu0"
memory = "private:4M"
"""
AUTOMATIC = {
    "proc/sys/kernel/numa_balancing": "3",
    "sys/kernel/mm/numa/demotion_enabled": "1",
    "sys/kernel/debug/sched/numa_balancing/scan_delay_ms": "50",
    "sys/kernel/debug/sched/numa_balancing/scan_period_min_ms": "100",
    "sys/kernel/debug/sched/numa_balancing/scan_period_max_ms": "400",
}


def test_soak(cprog, tmp_path):
    with cdmfs.mounted(CONFIG) as m:
        soak(m, cprog("hmm_stress"), tmp_path)


def test_soak_with_balancing_and_demotion(cprog, tmp_path):
    """The same workload while the kernel's automatic placement moves pages
    on its own: hinting faults, promotion, demotion by kswapd and by faults."""
    with cdmfs.mounted(TIERED) as m:
        for rel, value in AUTOMATIC.items():
            with open(os.path.join(m.path, rel), "w") as f:
                f.write(value)
        # Cold pages that crowd node 0: reclaim demotes them to make room.
        cold = m.region("cold", COLD_PAGES * PAGE)
        cold_data = random.Random(2).randbytes(COLD_PAGES * PAGE)
        with open(cold.data, "r+b") as f:
            f.write(cold_data)
        soak(m, cprog("hmm_stress"), tmp_path)
        with open(cold.data, "rb") as f:
            assert f.read() == cold_data
        with open(os.path.join(m.path, "proc/vmstat")) as f:
            v = {k: int(n) for k, n in (line.split() for line in f)}
        assert v["numa_pte_updates"] > 0
        print("automatic placement:", {k: v[k] for k in (
            "numa_pte_updates", "numa_hint_faults", "numa_pages_migrated", "pgdemote_kswapd",
            "pgdemote_direct", "pgpromote_success")})


def soak(m, stress, tmp_path) -> None:
    if True:
        cpu = m.region("cpu", CPU_PAGES * PAGE)
        dev = m.region("dev", DEV_PAGES * PAGE)
        elastic = m.region("elastic", ELASTIC_KEEP * PAGE)
        hog = m.region("hog", HOG_PAGES * PAGE)
        hog_total = [0]
        shadow = tmp_path / "shadow"
        proc = subprocess.Popen([stress, "run", cpu.data, str(CPU_PAGES), "0", str(CPU_PAGES), "4",
                                 str(int(SECONDS) + 120), str(shadow)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "running"

        # The device region's model: every page holds one 64-bit value in every word.
        model = [0] * DEV_PAGES
        model_lock = threading.Lock()
        gpu, cdm = m.device("gpu0"), m.device("cdm0")
        gpu.access("write", "dev", 0, DEV_PAGES * PAGE, 0)
        gpu.access_counters = "8 64K"
        cdm.access_counters = "8 64K"
        m.node(1).numa_balancing = True         # counter migrations into the CDM node
        keep = bytes(random.Random(1).randbytes(ELASTIC_KEEP * PAGE))
        with open(elastic.data, "r+b") as f:
            f.write(keep)

        # The CPU region into gpu0, half at a time, twice its memory: the
        # second half evicts the first.
        for half in range(2):
            cpu.migrate(half * CPU_PAGES // 2 * PAGE, CPU_PAGES // 2 * PAGE, "gpu0")
        evictions0 = gpu.stat["evictions"]     # the stress threads may have faulted them back first

        w = Workers(time.monotonic() + SECONDS)

        def migrate_cpu(rng: random.Random) -> None:
            first = rng.randrange(CPU_PAGES)
            # Now and then a large range: into gpu0, more than it holds.
            n = rng.randint(1, min(1024 if rng.random() < 0.1 else 64, CPU_PAGES - first))
            res = cpu.migrate(first * PAGE, n * PAGE, rng.choice(TARGETS))
            assert res["requested"] == n

        def policies(rng: random.Random) -> None:
            first = rng.randrange(CPU_PAGES)
            n = rng.randint(1, min(256, CPU_PAGES - first))
            cpu.mbind(first * PAGE, n * PAGE, rng.choice(POLICIES), move=rng.random() < 0.3)
            if rng.random() < 0.1:
                cpu.policy = rng.choice(POLICIES)
            time.sleep(0.01)

        def device_kernels(rng: random.Random) -> None:
            first = rng.randrange(DEV_PAGES)
            n = rng.randint(1, DEV_PAGES - first)
            d = rng.choice((gpu, cdm))
            op = rng.choice(("add", "add", "read", "write"))
            with model_lock:
                if op == "add":
                    k = rng.randrange(1, 1 << 40)
                    d.access("add", "dev", first * PAGE, n * PAGE, k)
                    for p in range(first, first + n):
                        model[p] += k
                elif op == "write":
                    b = rng.randrange(256)
                    d.access("write", "dev", first * PAGE, n * PAGE, b)
                    for p in range(first, first + n):
                        model[p] = int.from_bytes(bytes([b]) * 8, "little")
                else:
                    res = d.access("read", "dev", first * PAGE, n * PAGE)
                    want = zlib.crc32(b"".join(page_of(model[p]) for p in range(first, first + n)))
                    assert res["crc32"] == want, f"device read of pages {first}+{n} differs from the model"

        def migrate_dev(rng: random.Random) -> None:
            first = rng.randrange(DEV_PAGES)
            n = rng.randint(1, DEV_PAGES - first)
            dev.migrate(first * PAGE, n * PAGE, rng.choice(TARGETS))
            if rng.random() < 0.05:
                gpu.fault_policy = rng.choice(("migrate", "remote"))

        def grow_shrink(rng: random.Random) -> None:
            size = rng.randint(ELASTIC_KEEP, 4 * ELASTIC_KEEP) * PAGE
            elastic.truncate(size)
            with open(elastic.data, "rb") as f:
                head = f.read(ELASTIC_KEEP * PAGE)
                tail = f.read()
            assert head == keep, "the kept part of a growing and shrinking region changed"
            with open(elastic.data, "r+b") as f:      # dirty the grown part, then shrink it away
                f.seek(ELASTIC_KEEP * PAGE)
                f.write(b"\xee" * (size - ELASTIC_KEEP * PAGE))
            assert tail == bytes(len(tail)), "grown pages are not zero"
            elastic.truncate(ELASTIC_KEEP * PAGE)

        def hints(rng: random.Random) -> None:
            region, pages = rng.choice(((cpu, CPU_PAGES), (dev, DEV_PAGES)))
            first = rng.randrange(pages)
            n = rng.randint(1, min(128, pages - first))
            region.advise(first * PAGE, n * PAGE, rng.choice(ADVICE))
            time.sleep(0.005)

        def oversubscribe(rng: random.Random) -> None:
            # A kernel over more than gpu0's memory: it evicts as it goes.
            k = rng.randrange(1, 1 << 20)
            res = gpu.access("add", "hog", 0, HOG_PAGES * PAGE, k)
            assert res["status"] == "ok"
            hog_total[0] += k
            if rng.random() < 0.3:
                got = gpu.access("read", "hog", 0, HOG_PAGES * PAGE)["crc32"]
                assert got == zlib.crc32(page_of(hog_total[0]) * HOG_PAGES), "hog differs from its model"

        w.start("migrate-cpu-1", migrate_cpu)
        w.start("hints", hints)
        w.start("oversubscribe", oversubscribe)
        w.start("migrate-cpu-2", migrate_cpu)
        w.start("policies", policies)
        w.start("device-kernels", device_kernels)
        w.start("migrate-dev", migrate_dev)
        w.start("grow-shrink", grow_shrink)
        w.join()

        out, err = proc.communicate("stop\n", timeout=120)
        assert proc.returncode == 0, (out, err)
        assert "corrupt=0" in out, out
        assert not w.errors, w.errors
        assert w.counts["migrate-cpu-1"] + w.counts["migrate-cpu-2"] > 0
        assert w.counts["device-kernels"] > 0

        # A fresh process sees exactly the records the threads last wrote.
        check = subprocess.run([stress, "check", cpu.data, str(CPU_PAGES), "0", str(CPU_PAGES), str(shadow)],
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        # The device region is the model, page for page, read by the CPU.
        with open(dev.data, "rb") as f:
            data = f.read()
        for p in range(DEV_PAGES):
            assert data[p * PAGE:(p + 1) * PAGE] == page_of(model[p]), f"dev page {p}"

        with open(hog.data, "rb") as f:
            assert f.read() == page_of(hog_total[0]) * HOG_PAGES, "hog differs from its model"
        assert w.counts["oversubscribe"] > 0

        # Counters agree: every page a region holds is used on a node or
        # device, and so is every read duplicate (gpu0's in its memory,
        # cdm0's on node 1), and nothing else.
        for r in (cpu, dev):
            r.wait_prefetch()
        # Automatic placement off (a tiered machine's kswapd and scanner would
        # go on moving pages between the reads below); a move under way ends
        # within the deadline.
        for rel in ("proc/sys/kernel/numa_balancing", "sys/kernel/mm/numa/demotion_enabled"):
            with open(os.path.join(m.path, rel), "w") as f:
                f.write("0")
        deadline = time.monotonic() + 10
        while True:
            regions = [m.region(name).stat for name in m.regions]
            on_nodes = {n: sum(st[f"N{n}"] for st in regions) for n in m.nodes}
            on_nodes[1] += cdm.stat["duplicated"]
            used = {n: m.node(n).meminfo["MemUsed"] for n in m.nodes}
            if all(used[n] == on_nodes[n] * PAGE // 1024 for n in m.nodes) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for n in m.nodes:
            assert used[n] == on_nodes[n] * PAGE // 1024, n
        private = sum(st["private:gpu0"] for st in regions)
        assert gpu.meminfo["MemUsed"] == (private + gpu.stat["duplicated"]) * PAGE // 1024
        assert sum(st["duplicated"] for st in regions) <= gpu.stat["duplicated"] + cdm.stat["duplicated"]
        # And the core's own invariants: allocator, page tables, reverse map, counters.
        with open(os.path.join(m.path, "sys/kernel/debug/cdmfs/check")) as f:
            assert f.read() == "ok\n"
        hinted = {k: gpu.stat[k] + cdm.stat[k] for k in ("evictions", "counter_migrations", "duplicated")}
        hinted["evictions_while_running"] = gpu.stat["evictions"] - evictions0
        print(f"soak {SECONDS:.0f}s: {w.counts}, stress: {out.strip()}, devices: {hinted}")
