"""Linux's HMM selftests, ported to a shared file mapping of a cdmfs region.

tools/testing/selftests/mm/hmm-tests.c drives lib/test_hmm.c, a fake device
that mirrors the process address space, migrates pages into its memory and
snapshots the CPU page table.  Here the buffer is a region's ``data`` file,
mapped MAP_SHARED by a C program (tests/c/hmm_cpu.c) that keeps its mapping
for the whole test, as hmm-tests keeps ``buffer->ptr``, and writes and checks
hmm-tests' pattern ``ptr[i] = i`` (ints counted from the start of the file);
the device is ``devices/NAME/{access,snapshot}`` and ``regions/NAME/migrate``.

    hmm-tests                        here
    HMM_DMIRROR_READ / _WRITE        access read (crc32 of the bytes) / write, add
    HMM_DMIRROR_MIGRATE_TO_DEV       migrate START LENGTH gpu0 | 1 (cdm0's node)
    HMM_DMIRROR_MIGRATE_TO_SYS       migrate START LENGTH 0
    HMM_DMIRROR_SNAPSHOT             snapshot
    buffer->cpages                   "migrated" of a migration, "bytes" of an access
    buffer->faults == 1              one device fault batch (stat fault_batches)
    hmm_device_private / _coherent   the gpu0 / cdm0 variants
    hmm2 (two devices)               a machine with gpu0 and gpu1 (TWO_GPUS)

Cases that need an anonymous private mapping (fork/COW, mprotect, THP,
hugetlbfs, exclusive access, gup) have no shared-file counterpart and are not
ported; migrate_release belongs to the lifecycle issue.
"""
from __future__ import annotations

import array
import errno
import os
import random
import select
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count

import pytest

import cdmfs
from conftest import PAGE, abort_fuse

NPAGES = 1024                 # HMM_BUFFER_SIZE: 1024 pages
SIZE = NPAGES * PAGE
NTIMES = 10                   # hmm-tests' NTIMES
KB = PAGE // 1024             # kB a page

TWO_GPUS = """
[[node]]
id = 0
kind = "sysram"
size = "1G"
cpus = "all"
[[node]]
id = 1
kind = "cdm"
size = "1G"
[[device]]
name = "cdm0"
memory = "node:1"
[[device]]
name = "gpu0"
memory = "private:1G"
[[device]]
name = "gpu1"
memory = "private:1G"
"""


@dataclass(frozen=True)
class Kind:
    """A device variant of a test: where its memory is, as the files name it."""
    name: str
    target: str          # migration target of its memory
    key: str             # the region stat key counting pages in its memory
    local: str           # snapshot flag of a page in its memory
    coherent: bool

    def used_kb(self, m: cdmfs.Mount) -> int:
        return m.device(self.name).meminfo["MemUsed"]


GPU0 = Kind("gpu0", "gpu0", "private:gpu0", "private-local", False)
CDM0 = Kind("cdm0", "1", "N1", "coherent-local", True)
KINDS = [pytest.param(GPU0, id="private"), pytest.param(CDM0, id="coherent")]


# ---------------------------------------------------------------- helpers

class Cpu:
    """tests/c/hmm_cpu.c on a region: one command, one reply line."""

    def __init__(self, exe: str, region: cdmfs.client.Region, pages: int, timeout: float = 60):
        self.timeout = timeout
        self.proc = subprocess.Popen([exe, region.data, str(pages)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buf = b""

    def __call__(self, *words) -> str:
        cmd = " ".join(str(w) for w in words)
        os.write(self.proc.stdin.fileno(), cmd.encode() + b"\n")
        line = self._readline()
        if not line.startswith("ok"):
            why = line or f"CPU program died (status {self.proc.wait()})"
            raise AssertionError(f"CPU {cmd}: {why}")
        return line[2:].strip()

    def _readline(self) -> str:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.proc.kill()
                raise AssertionError("CPU program stuck (a fault never answered?)")
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def resident(self, first: int, n: int) -> str:
        """mincore() of pages [first, first + n) of the CPU's mapping: "0110..."."""
        return self("mincore", first, n)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.write(self.proc.stdin.fileno(), b"quit\n")
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


_names = count()


@contextmanager
def buffer(m: cdmfs.Mount, exe: str, pages: int = NPAGES):
    """hmm-tests' hmm_buffer: a fresh region of ``pages`` pages, mapped by a
    CPU program for the duration; freed after (region removed)."""
    r = m.region(f"hmm{next(_names)}", pages * PAGE)
    cpu = Cpu(exe, r, pages)
    try:
        yield r, cpu
    finally:
        cpu.close()
        r.remove()


def ints(first: int, n: int, base: int = 0) -> bytes:
    """The bytes of hmm-tests' pattern ptr[i] = i + base over pages [first, first + n)."""
    lo = first * PAGE // 4
    return array.array("i", range(lo + base, lo + n * PAGE // 4 + base)).tobytes()


def crc(data: bytes) -> int:
    return zlib.crc32(data)


def device(m: cdmfs.Mount, name: str, policy: str | None = None) -> cdmfs.client.Device:
    d = m.device(name)
    if policy is not None:
        d.fault_policy = policy
        assert d.fault_policy == policy
    return d


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def placement(r: cdmfs.client.Region) -> dict:
    st = r.stat
    return {k: v for k, v in st.items() if (k.startswith("N") and k[1:].isdigit()) or k.startswith("private:")}


def flags(snap: dict, first: int = 0, n: int | None = None) -> Counter:
    return Counter(f for p, f in snap.items() if p >= first and (n is None or p < first + n))


@pytest.fixture(scope="module")
def hmm_cpu(cprog):
    return cprog("hmm_cpu")


@pytest.fixture(autouse=True)
def default_fault_policies(request):
    """Each test sets the fault policies it needs; afterwards the devices of
    the module's mounts get their defaults back (remote for coherent, migrate
    for private), whatever the test did or where it failed."""
    yield
    for name in ("mnt", "two"):
        if name in request.fixturenames:
            m = request.getfixturevalue(name)
            for dev in m.devices:
                d = m.device(dev)
                with open(os.path.join(d.path, "type")) as f:
                    d.fault_policy = "remote" if f.read().strip() == "coherent" else "migrate"


@pytest.fixture(scope="module")
def two():
    """hmm2: node 0 sysram, node 1 CDM (cdm0), and two private devices."""
    with cdmfs.mounted(TWO_GPUS) as m:
        yield m


# ---------------------------------------------------------------- anon_read

@pytest.mark.parametrize("policy", ["remote", "migrate"])
@pytest.mark.parametrize("kind", KINDS)
def test_anon_read(mnt, hmm_cpu, kind, policy):
    """anon_read: the device reads memory the CPU initialised, leaving the first
    two pages zero (page 0 never touched: pte_none; page 1 only read by the
    CPU: the zero page).  remote is HMM_DMIRROR_READ as it is (the device
    mirrors, nothing moves); migrate adds a device fault that pulls the pages
    into the device's memory."""
    dev = device(mnt, kind.name, policy)
    with buffer(mnt, hmm_cpu) as (r, cpu):
        cpu("touch", 1, 1)
        cpu("fill", 2, NPAGES - 2, 0)
        assert placement(r)["N0"] == NPAGES - 1           # page 0 never touched
        want = bytes(2 * PAGE) + ints(2, NPAGES - 2)
        st0, used0, n0 = dev.stat, kind.used_kb(mnt), mnt.node(0).meminfo["MemUsed"]

        res = dev.access("read", r.name, 0, SIZE)
        assert res["status"] == "ok" and res["bytes"] == SIZE
        assert res["crc32"] == crc(want)                 # saw the CPU's unsynced stores
        assert res["faults"] == NPAGES                   # nothing was in its page table
        d = delta(dev.stat, st0)
        assert d["faults"] == NPAGES and d["fault_batches"] == 1     # buffer->faults == 1
        where = placement(r)
        snap = dev.snapshot(r.name, 0, SIZE)
        if policy == "remote":
            # Read where the pages lie; the device's own first touch of page 0
            # allocates it by the region's policy (node 0), never on its memory.
            assert res["migrated"] == 0
            assert where["N0"] == NPAGES and where[kind.key] == 0
            assert (res["local_bytes"], res["remote_bytes"]) == (0, SIZE)
            assert snap[0] == "zero" and snap[1] == "zero"            # HMM_DMIRROR_PROT_ZERO
            assert flags(snap, 2) == Counter({"read": NPAGES - 2})    # HMM_DMIRROR_PROT_READ
            assert kind.used_kb(mnt) == used0
        else:
            # Every page moved into (page 0: was allocated in) device memory.
            assert res["migrated"] == NPAGES
            assert where["N0"] == 0 and where[kind.key] == NPAGES
            assert (res["local_bytes"], res["remote_bytes"]) == (SIZE, 0)
            assert d["migrated_to"] == NPAGES
            assert flags(snap) == Counter({kind.local: NPAGES})
            assert kind.used_kb(mnt) - used0 == NPAGES * KB
            assert n0 - mnt.node(0).meminfo["MemUsed"] == (NPAGES - 1) * KB

        # The CPU still sees its values (a private page faults back first).
        st1 = dev.stat
        cpu("check", 2, NPAGES - 2, 0)
        cpu("bytes", 0, 2, 0)
        after = placement(r)
        if policy == "migrate" and not kind.coherent:
            assert after["N0"] == NPAGES and after[kind.key] == 0
            assert delta(dev.stat, st1)["migrated_from"] == NPAGES
            assert delta(dev.stat, st1)["invalidations"] >= 1
            assert flags(dev.snapshot(r.name, 0, SIZE)) == Counter({"none": NPAGES})
        else:
            assert after == where                          # nothing moved on a CPU access
            assert dev.snapshot(r.name, 0, SIZE) == snap


# ---------------------------------------------------------------- anon_write

@pytest.mark.parametrize("policy", ["remote", "migrate"])
@pytest.mark.parametrize("kind", KINDS)
def test_anon_write(mnt, hmm_cpu, kind, policy):
    """anon_write + file_write: the device writes memory the CPU never touched;
    the CPU's mapping and read() both see the device's bytes."""
    dev = device(mnt, kind.name, policy)
    with buffer(mnt, hmm_cpu) as (r, cpu):
        st0 = dev.stat
        res = dev.access("write", r.name, 0, SIZE, 0xA5)
        assert res["status"] == "ok" and res["bytes"] == SIZE and "crc32" not in res
        assert res["faults"] == NPAGES and delta(dev.stat, st0)["fault_batches"] == 1
        where = placement(r)
        snap = dev.snapshot(r.name, 0, SIZE)
        if policy == "remote":
            # A device may not allocate where the policy says no: node 0.
            assert res["migrated"] == 0 and where["N0"] == NPAGES
            assert flags(snap) == Counter({"write": NPAGES})      # HMM_DMIRROR_PROT_WRITE
        else:
            # Untouched pages are allocated directly in device memory.
            assert res["migrated"] == NPAGES and where[kind.key] == NPAGES and where["N0"] == 0
            assert flags(snap) == Counter({kind.local: NPAGES})
        cpu("bytes", 0, NPAGES, 0xA5)
        with open(r.data, "rb") as f:
            assert f.read() == b"\xa5" * SIZE


@pytest.mark.parametrize("kind", KINDS)
def test_anon_write_over_cpu_data(mnt, hmm_cpu, kind):
    """anon_write with a result that depends on every word: the CPU writes
    ptr[i] = i, the device adds to every 64-bit word (a read-modify-write,
    under each fault policy in turn), the CPU sees exactly original + total
    after each; the device's read agrees with read().  The fault policy acts
    on device faults only: a page still in the device's page table is not
    moved again."""
    with buffer(mnt, hmm_cpu) as (r, cpu):
        cpu("fill", 0, NPAGES, 0)
        total = 0
        # (policy, value added, pages migrated by the device's fault)
        steps = [("migrate", 1 << 40, NPAGES),
                 ("remote", 3, 0),
                 # still mapped: a private device's remote access mapped the
                 # sysram pages the CPU's check had faulted back; a coherent
                 # device's pages never left its page table
                 ("migrate", 5, 0)]
        for policy, arg, migrated in steps:
            dev = device(mnt, kind.name, policy)
            res = dev.access("add", r.name, 0, SIZE, arg)
            assert res["status"] == "ok" and res["bytes"] == SIZE
            assert res["migrated"] == migrated, (policy, res)
            total += arg
            cpu("check", 0, NPAGES, 0, total)
        assert placement(r)["N1" if kind.coherent else "N0"] == NPAGES
        with open(r.data, "rb") as f:
            data = f.read()
        assert device(mnt, kind.name).access("read", r.name, 0, SIZE)["crc32"] == crc(data)


# ---------------------------------------------------------------- anon_read_multiple

@pytest.mark.parametrize("kind", KINDS)
def test_anon_read_multiple(mnt, hmm_cpu, kind):
    """anon_read_multiple: NTIMES buffers, ptr[i] = i + c, each read by the
    device in one fault batch; then the same buffer rewritten by the CPU and
    read again NTIMES times (the device never sees a stale byte)."""
    dev = device(mnt, kind.name, "migrate" if not kind.coherent else "remote")
    for c in range(NTIMES):
        with buffer(mnt, hmm_cpu) as (r, cpu):
            cpu("fill", 0, NPAGES, c)
            st0 = dev.stat
            res = dev.access("read", r.name, 0, SIZE)
            assert res["crc32"] == crc(ints(0, NPAGES, c))
            assert res["faults"] == NPAGES and delta(dev.stat, st0)["fault_batches"] == 1
    with buffer(mnt, hmm_cpu) as (r, cpu):
        for c in range(NTIMES):
            cpu("fill", 0, NPAGES, c)
            res = dev.access("read", r.name, 0, SIZE)
            assert res["crc32"] == crc(ints(0, NPAGES, c)), f"round {c}"
            # A private device pulled the pages in; the CPU's stores fault them
            # back, which drops them from its page table: it faults again.
            assert res["faults"] == (NPAGES if not kind.coherent or c == 0 else 0)
        cpu("check", 0, NPAGES, NTIMES - 1)


# ---------------------------------------------------------------- migrate

@pytest.mark.parametrize("kind", KINDS)
def test_migrate(mnt, hmm_cpu, kind):
    """migrate: CPU-initialised memory migrated to the device; the device
    reads it locally; memory moved between the node and the device."""
    dev = device(mnt, kind.name)
    with buffer(mnt, hmm_cpu) as (r, cpu):
        cpu("fill", 0, NPAGES, 0)
        assert cpu.resident(0, NPAGES) == "1" * NPAGES
        n0, used0, st0 = mnt.node(0).meminfo["MemUsed"], kind.used_kb(mnt), dev.stat

        res = r.migrate(0, SIZE, kind.target)
        assert res == {"requested": NPAGES, "migrated": NPAGES, "skipped": 0, "holes": []}
        assert placement(r)["N0"] == 0 and placement(r)[kind.key] == NPAGES
        assert n0 - mnt.node(0).meminfo["MemUsed"] == NPAGES * KB
        assert kind.used_kb(mnt) - used0 == NPAGES * KB
        assert delta(dev.stat, st0)["migrated_to"] == NPAGES
        if not kind.coherent:
            # The host kernel really dropped them: nothing the CPU could read.
            assert cpu.resident(0, NPAGES) == "0" * NPAGES

        # Check what the device read: it mapped what it migrated (as test_hmm
        # does), so no fault, every byte local.
        res = dev.access("read", r.name, 0, SIZE)
        assert res["crc32"] == crc(ints(0, NPAGES))
        assert (res["faults"], res["migrated"]) == (0, 0)
        assert (res["local_bytes"], res["remote_bytes"]) == (SIZE, 0)
        assert flags(dev.snapshot(r.name, 0, SIZE)) == Counter({kind.local: NPAGES})

        cpu("check", 0, NPAGES, 0)
        back = NPAGES if not kind.coherent else 0
        assert placement(r)["N0"] == back and placement(r)[kind.key] == NPAGES - back


@pytest.mark.parametrize("kind", KINDS)
def test_migrate_fault(mnt, hmm_cpu, kind):
    """migrate_fault: migrate, the CPU reads the first half (a private page
    faults back to sysram, a coherent one stays), migrate the mixed range again."""
    dev = device(mnt, kind.name)
    half = NPAGES // 2
    with buffer(mnt, hmm_cpu) as (r, cpu):
        cpu("fill", 0, NPAGES, 0)
        assert r.migrate(0, SIZE, kind.target)["migrated"] == NPAGES
        assert dev.access("read", r.name, 0, SIZE)["crc32"] == crc(ints(0, NPAGES))

        st0 = dev.stat
        cpu("check", 0, half, 0)
        where = placement(r)
        if kind.coherent:
            assert where["N0"] == 0 and where[kind.key] == NPAGES      # mapped in place
            assert delta(dev.stat, st0)["migrated_from"] == 0
            snap = dev.snapshot(r.name, 0, SIZE)
            assert flags(snap) == Counter({kind.local: NPAGES})
        else:
            assert where["N0"] == half and where[kind.key] == NPAGES - half
            assert delta(dev.stat, st0)["migrated_from"] == half
            snap = dev.snapshot(r.name, 0, SIZE)
            assert flags(snap, 0, half) == Counter({"none": half})
            assert flags(snap, half) == Counter({kind.local: NPAGES - half})
            assert cpu.resident(half, NPAGES - half) == "0" * (NPAGES - half)

        res = r.migrate(0, SIZE, kind.target)
        # Pages already there are neither moved nor holes.
        assert res == {"requested": NPAGES, "migrated": 0 if kind.coherent else half,
                       "skipped": 0, "holes": []}
        assert placement(r)[kind.key] == NPAGES
        res = dev.access("read", r.name, 0, SIZE)
        assert res["crc32"] == crc(ints(0, NPAGES)) and res["local_bytes"] == SIZE
        cpu("check", 0, NPAGES, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_migrate_multiple(mnt, hmm_cpu, kind):
    """migrate_multiple: NTIMES to the device and back.  A private page comes
    back by a CPU fault; a coherent one gives no fault, so it is migrated back
    explicitly (as hmm-tests does with HMM_DMIRROR_MIGRATE_TO_SYS)."""
    dev = device(mnt, kind.name)
    n0 = mnt.node(0).meminfo["MemUsed"]
    used0 = kind.used_kb(mnt)
    st0 = dev.stat
    with buffer(mnt, hmm_cpu) as (r, cpu):
        for c in range(NTIMES):
            cpu("fill", 0, NPAGES, c)
            assert r.migrate(0, SIZE, kind.target)["migrated"] == NPAGES, f"round {c}"
            assert kind.used_kb(mnt) - used0 == NPAGES * KB
            assert dev.access("read", r.name, 0, SIZE)["crc32"] == crc(ints(0, NPAGES, c))
            if kind.coherent:
                assert r.migrate(0, SIZE, "0")["migrated"] == NPAGES
            cpu("check", 0, NPAGES, c)
            assert placement(r)["N0"] == NPAGES and placement(r)[kind.key] == 0
            assert kind.used_kb(mnt) == used0
        d = delta(dev.stat, st0)
        assert d["migrated_to"] == d["migrated_from"] == NTIMES * NPAGES
    assert mnt.node(0).meminfo["MemUsed"] == n0


# ---------------------------------------------------------------- coherent device memory

def test_coherent_pages_stay_on_cpu_access(mnt, hmm_cpu):
    """The coherent-device variants' point: the CPU maps pages on the CDM node
    directly.  Reads and writes leave them there (no fault-back, the device's
    page table keeps them); only an explicit migration brings them back."""
    cdm, gpu = device(mnt, "cdm0", "remote"), device(mnt, "gpu0", "migrate")
    with buffer(mnt, hmm_cpu) as (r, cpu):
        cpu("fill", 0, NPAGES, 0)
        assert r.migrate(0, SIZE, "node:1")["migrated"] == NPAGES
        n1 = mnt.node(1).meminfo["MemUsed"]
        st0, mig0 = cdm.stat, r.stat["migrated_pages"]
        assert cdm.access("touch", r.name, 0, SIZE)["faults"] == 0   # mapped by the migration

        cpu("check", 0, NPAGES, 0)
        cpu("fill", 0, NPAGES, 7)
        assert cpu.resident(0, NPAGES) == "1" * NPAGES      # the CPU maps CDM memory
        assert placement(r)["N1"] == NPAGES and placement(r)["N0"] == 0
        assert r.stat["migrated_pages"] == mig0
        assert mnt.node(1).meminfo["MemUsed"] == n1
        d = delta(cdm.stat, st0)
        assert d["invalidations"] == 0 and d["migrated_from"] == 0
        assert flags(cdm.snapshot(r.name, 0, SIZE)) == Counter({"coherent-local": NPAGES})
        assert flags(gpu.snapshot(r.name, 0, SIZE)) == Counter({"coherent-remote": NPAGES})

        # The device reads the CPU's new stores in place, locally, no fault.
        res = cdm.access("read", r.name, 0, SIZE)
        assert res["crc32"] == crc(ints(0, NPAGES, 7))
        assert (res["faults"], res["local_bytes"], res["remote_bytes"]) == (0, SIZE, 0)

        # Getting them back takes a migration.
        assert r.migrate(0, SIZE, "0")["migrated"] == NPAGES
        assert placement(r)["N0"] == NPAGES and mnt.node(1).meminfo["MemUsed"] == n1 - NPAGES * KB
        assert flags(cdm.snapshot(r.name, 0, SIZE)) == Counter({"none": NPAGES})
        cpu("check", 0, NPAGES, 7)


# ---------------------------------------------------------------- mincore

def test_mincore_after_every_migration_to_gpu0(mnt, hmm_cpu):
    """After every migration of a CPU-mapped range to gpu0, mincore() on the
    CPU's mapping shows those pages not resident: the host kernel really
    dropped them, dirty data first written back (the device reads it)."""
    rng = random.Random(4)
    gpu = device(mnt, "gpu0", "migrate")
    pages = 256
    with buffer(mnt, hmm_cpu, pages) as (r, cpu):
        cpu("fill", 0, pages, 0)
        for it in range(60):
            first = rng.randrange(pages)
            n = rng.randint(1, min(32, pages - first))
            if it % 2:
                cpu("fill", first, n, it)              # dirty, never synced
            else:
                cpu("touch", first, n)                 # clean, maybe faulted back
            assert cpu.resident(first, n) == "1" * n
            res = r.migrate(first * PAGE, n * PAGE, "gpu0")
            assert res["migrated"] == n and res["skipped"] == 0, res
            assert cpu.resident(first, n) == "0" * n, f"iteration {it}: pages {first}+{n}"
            if it % 2:
                assert gpu.access("read", r.name, first * PAGE, n * PAGE)["crc32"] == crc(ints(first, n, it))
                cpu("check", first, n, it)
                cpu("fill", first, n, 0)
        cpu("check", 0, pages, 0)


# ---------------------------------------------------------------- two devices

@pytest.mark.parametrize("policy", ["remote", "migrate"])
def test_double_map(two, hmm_cpu, policy):
    """double_map: two devices read the same range; then it migrates to
    device 1 and device 0 reads it again.  Device 0 cannot reach device 1's
    private memory: under remote the pages come back to sysram first (as a
    CPU access would), under migrate they move on into device 0's memory."""
    g0, g1 = device(two, "gpu0", policy), device(two, "gpu1", policy)
    npages = 6
    size = npages * PAGE
    want = crc(ints(0, npages))
    with buffer(two, hmm_cpu, npages) as (r, cpu):
        cpu("fill", 0, npages, 0)
        for d in (g0, g1):
            st0 = d.stat
            res = d.access("read", r.name, 0, size)
            assert res["crc32"] == want and res["faults"] == npages
            assert delta(d.stat, st0)["fault_batches"] == 1
        if policy == "remote":
            assert placement(r)["N0"] == npages
            for d in (g0, g1):
                assert flags(d.snapshot(r.name, 0, size)) == Counter({"read": npages})
        else:
            assert placement(r)["private:gpu1"] == npages     # pulled from gpu0 to gpu1

        st0 = g0.stat
        assert r.migrate(0, size, "gpu1")["migrated"] == (npages if policy == "remote" else 0)
        if policy == "remote":
            assert delta(g0.stat, st0)["invalidations"] >= 1
        assert flags(g0.snapshot(r.name, 0, size)) == Counter({"private-remote": npages})
        assert flags(g1.snapshot(r.name, 0, size)) == Counter({"private-local": npages})

        moved0 = r.stat["migrated_pages"]
        res = g0.access("read", r.name, 0, size)
        assert res["crc32"] == want and res["faults"] == npages
        where = placement(r)
        if policy == "remote":
            assert (where["N0"], where["private:gpu0"], where["private:gpu1"]) == (npages, 0, 0)
            assert flags(g0.snapshot(r.name, 0, size)) == Counter({"read": npages})
            assert flags(g1.snapshot(r.name, 0, size)) == Counter({"none": npages})
        else:
            # Not straight from one device's memory into the other's: migrate_vma
            # takes only its own pgmap's pages, so they fault back to RAM first.
            assert (where["N0"], where["private:gpu0"], where["private:gpu1"]) == (0, npages, 0)
            assert r.stat["migrated_pages"] - moved0 == 2 * npages
            assert flags(g0.snapshot(r.name, 0, size)) == Counter({"private-local": npages})
            assert flags(g1.snapshot(r.name, 0, size)) == Counter({"private-remote": npages})
        cpu("check", 0, npages, 0)


def poison(m: cdmfs.Mount, r: cdmfs.client.Region, page: int) -> bool:
    """Hard-offlines the frame under a region page (memory failure), through
    regions/NAME/pagemap and sys/devices/system/memory/hard_offline_page.
    False if this build has no hard_offline_page yet (the lifecycle issue)."""
    hard = os.path.join(m.path, "sys/devices/system/memory/hard_offline_page")
    if not os.path.exists(hard):
        return False
    with open(os.path.join(r.path, "pagemap"), "rb") as f:
        f.seek(page * 8)
        entry, = struct.unpack("<Q", f.read(8))
    assert entry >> 63, f"page {page} not present: {entry:#x}"
    with open(hard, "w") as f:
        f.write(f"{(entry & ((1 << 55) - 1)) * PAGE:#x}\n")
    return True


def test_snapshot(two, hmm_cpu):
    """snapshot (hmm2): a range of mixed placement, one page per flag.

      0 never touched        none           5 migrated to gpu0            private-local
      1 read by CPU (zero)   zero           6 migrated to gpu1            private-remote
      2 CPU wrote, dev read  read           7 migrated to node 1 (cdm0)   coherent-remote
      3 device wrote         write          8 its frame poisoned          error
      4 written, not by the device: none

    hmm-tests gets ``error`` from an unmapped hole; a shared file has none (a
    range beyond the end is refused whole, EINVAL), so page 8 is poisoned by
    a memory failure instead, where the build has it (the lifecycle issue)."""
    g0, g1, cdm = device(two, "gpu0", "remote"), device(two, "gpu1"), device(two, "cdm0")
    npages = 9
    size = npages * PAGE
    with buffer(two, hmm_cpu, npages) as (r, cpu):
        cpu("touch", 1, 1)
        cpu("fill", 2, 7, 0)
        assert g0.access("read", r.name, PAGE, 2 * PAGE)["crc32"] == crc(bytes(PAGE) + ints(2, 1))
        assert g0.access("write", r.name, 3 * PAGE, PAGE, 0x33)["faults"] == 1
        for page, target in ((5, "gpu0"), (6, "gpu1"), (7, "node:1")):
            assert r.migrate(page * PAGE, PAGE, target)["migrated"] == 1
        poisoned = poison(two, r, 8)
        where = placement(r)
        assert (where["N0"], where["N1"], where["private:gpu0"], where["private:gpu1"]) == (
            5 - poisoned, 1, 1, 1)
        last = {8: "error" if poisoned else "none"}

        snap = g0.snapshot(r.name, 0, size)
        assert snap == {0: "none", 1: "zero", 2: "read", 3: "write", 4: "none",
                        5: "private-local", 6: "private-remote", 7: "coherent-remote", **last}
        assert g1.snapshot(r.name, 0, size) == {
            0: "none", 1: "none", 2: "none", 3: "none", 4: "none",
            5: "private-remote", 6: "private-local", 7: "coherent-remote", **last}
        assert cdm.snapshot(r.name, 4 * PAGE, 5 * PAGE) == {
            4: "none", 5: "private-remote", 6: "private-remote", 7: "coherent-local", **last}
        # A snapshot changes nothing: not placement, not the device's page table.
        assert placement(r) == where and g0.snapshot(r.name, 0, size) == snap
        with pytest.raises(OSError) as e:
            g0.snapshot(r.name, 0, size + PAGE)
        assert e.value.errno == 22
        if poisoned:
            with pytest.raises(OSError) as e:
                g0.access("read", r.name, 8 * PAGE, PAGE)
            assert e.value.errno == 5

        # The CPU's view, after: private pages fault back and leave both mirrors.
        cpu("check", 2, 1, 0)
        cpu("bytes", 3, 1, 0x33)
        cpu("check", 4, 4, 0)
        after = g0.snapshot(r.name, 0, size)
        assert [after[p] for p in (5, 6, 7)] == ["none", "none", "coherent-remote"]
        assert g1.snapshot(r.name, 6 * PAGE, PAGE) == {6: "none"}


# ---------------------------------------------------------------- anon_teardown

RACED_ROUNDS = 3            # anon_teardown: rounds whose truncation must land during the read
MAX_TEARDOWN_ROUNDS = 200   # ... found in at most this many rounds


@pytest.mark.parametrize("policy", ["remote", "migrate"])
def test_anon_teardown(mnt, hmm_cpu, policy):
    """anon_teardown: the device reads the buffer while another thread takes
    away its second half (truncate: the shared-file form of munmap) once the
    read is under way (its device fault counted), after a random delay.

    The device counts the accesses whose range was truncated while they ran
    (stat ``truncated_accesses``), so each round knows whether its truncation
    landed during the read or after it.  In at least RACED_ROUNDS rounds it
    landed during the read (the rounds go on past NTIMES until then, up to
    MAX_TEARDOWN_ROUNDS); such a read either fails with EFAULT or returns
    the right bytes, and a read the truncation came after returns the right
    bytes.  Never wrong bytes, a hang or a leak.  The first half keeps its
    data; the second half's memory is freed, and the device's page table no
    longer maps it."""
    dev = device(mnt, "gpu0", policy)
    rng = random.Random(policy)
    half = NPAGES // 2
    outcomes = Counter()
    base0, used0 = mnt.node(0).meminfo["MemUsed"], GPU0.used_kb(mnt)
    # The delays spread over [0, spread): it grows while truncations land
    # during the read and shrinks while they land after it, so that the rounds
    # see both (no assertion rests on it).
    spread = 0.1
    rounds = raced = 0
    while (rounds < NTIMES or raced < RACED_ROUNDS) and rounds < MAX_TEARDOWN_ROUNDS:
        c = rounds
        rounds += 1
        with buffer(mnt, hmm_cpu) as (r, cpu):
            cpu("fill", 0, NPAGES, c)
            st0 = dev.stat
            truncated = []

            def unmap_buffer() -> None:
                try:
                    deadline = time.monotonic() + 60
                    while dev.stat["fault_batches"] == st0["fault_batches"]:
                        if time.monotonic() > deadline:
                            raise TimeoutError("the device read never faulted")
                        time.sleep(0.001)
                    time.sleep(rng.uniform(0, spread))
                    os.truncate(r.data, half * PAGE)
                    truncated.append(None)
                except OSError as e:
                    truncated.append(e)

            th = threading.Thread(target=unmap_buffer)
            th.start()
            try:
                res = dev.access("read", r.name, 0, SIZE)
                outcome = "read" if (res["crc32"], res["bytes"]) == (crc(ints(0, NPAGES, c)), SIZE) \
                    else "wrong bytes"
            except OSError as e:
                outcome = errno.errorcode.get(e.errno, str(e.errno))
            th.join(120)
            assert not th.is_alive(), f"round {c}: truncate hangs"
            assert truncated == [None], f"round {c}: truncate failed: {truncated[0]!r}"
            during = delta(dev.stat, st0)["truncated_accesses"]
            assert during in (0, 1), f"round {c}: {during} accesses truncated, one ran"
            if during:
                raced += 1
                assert outcome in ("read", "EFAULT"), f"round {c}, truncated during the read: {outcome}"
            else:
                assert outcome == "read", f"round {c}, truncated after the read: {outcome}"
            outcomes["during" if during else "after", outcome] += 1
            spread *= 1.25 if during else 0.8
            st = r.stat
            assert st["pages"] == half and st["size"] == half * PAGE
            assert sum(placement(r).values()) == half
            assert flags(dev.snapshot(r.name, 0, half * PAGE)).keys() <= {"none", "read", "private-local"}
            cpu("check", 0, half, c)
            # Nor does the device's page table keep anything of the second
            # half: grown back and stored by the CPU, its pages are none of its.
            r.truncate(SIZE)
            with open(r.data, "r+b") as f:
                f.seek(half * PAGE)
                f.write(bytes([c + 1]) * (half * PAGE))
            assert flags(dev.snapshot(r.name, half * PAGE, half * PAGE)) == Counter({"none": half}), \
                f"round {c}: the device still maps truncated pages"
        # Everything freed with the region: nothing leaked on the node or the device.
        assert mnt.node(0).meminfo["MemUsed"] == base0 and GPU0.used_kb(mnt) == used0
    print(f"anon_teardown[{policy}]: {rounds} rounds, {dict(outcomes)}")
    assert raced >= RACED_ROUNDS, (
        f"in {rounds} rounds the truncation landed during the device read {raced} times: "
        f"the race was not exercised ({dict(outcomes)})")


# ---------------------------------------------------------------- concurrency

MIGRATIONS = int(os.environ.get("CDMFS_HMM_MIGRATIONS", "10000"))
CPU_PAGES, ADD_PAGES = 64, 32
STALL = 30.0                # seconds without a migration done: stuck (speed is the bench's business)


def test_concurrent_cpu_threads_migrations_and_device(cprog, hmm_cpu, tmp_path):
    """Several CPU threads (one C program, tests/c/hmm_stress.c) write and check
    sequence-numbered records in their own pages through one mapping, never
    syncing, while this process migrates random page-aligned ranges of the
    whole region between node 0, node 1 and gpu0 (MIGRATIONS requests,
    CDMFS_HMM_MIGRATIONS to change it) and gpu0 and cdm0 take turns adding to
    other pages.  Zero corrupted records (in the live mapping and in a fresh
    process), and every added page holds exactly original + total added.
    No bound on the time it takes; STALL seconds without a migration done
    fail it as stuck (a deadlock), the mount aborted."""
    stress = cprog("hmm_stress")
    pages = CPU_PAGES + ADD_PAGES
    shadow = tmp_path / "shadow"
    with cdmfs.mounted() as m:
        r = m.region("stress", pages * PAGE)
        cpu = Cpu(hmm_cpu, r, pages)
        cpu("fill", CPU_PAGES, ADD_PAGES, 0)
        cpu.close()
        # The CPU threads run until told to stop (3600 s: a safety net only).
        proc = subprocess.Popen([stress, "run", r.data, str(pages), "0", str(CPU_PAGES), "4",
                                 "3600", str(shadow), "1000"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "running"

        stop = threading.Event()
        errors: list[str] = []
        added = {"total": 0, "runs": 0}

        def adder() -> None:
            rng = random.Random(1)
            devs = [m.device("gpu0"), m.device("cdm0")]
            try:
                while not stop.is_set():
                    arg = rng.randint(1, 1 << 20)
                    res = devs[added["runs"] % 2].access("add", r.name, CPU_PAGES * PAGE, ADD_PAGES * PAGE, arg)
                    assert res["status"] == "ok" and res["bytes"] == ADD_PAGES * PAGE
                    added["total"] += arg
                    added["runs"] += 1
            except Exception as e:
                errors.append(f"adder: {e!r}")

        done = {"migrations": 0, "moved": 0, "moved_cpu": 0, "holes": Counter()}

        def migrator() -> None:
            rng = random.Random(2)
            targets = ("0", "node:1", "gpu0")
            try:
                while done["migrations"] < MIGRATIONS and not stop.is_set():
                    first = rng.randrange(pages)
                    n = rng.randint(1, min(8, pages - first))
                    res = r.migrate(first * PAGE, n * PAGE, rng.choice(targets))
                    assert res["requested"] == n and res["migrated"] + res["skipped"] <= n, res
                    done["migrations"] += 1
                    done["moved"] += res["migrated"]
                    if first + n <= CPU_PAGES:
                        done["moved_cpu"] += res["migrated"]
                    done["holes"].update(err for _, _, err in res["holes"])
            except Exception as e:
                errors.append(f"migrator: {e!r}")

        workers = [threading.Thread(target=adder), threading.Thread(target=migrator)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        # Watch: no migration done for STALL seconds is stuck.
        seen, seen_at = -1, t0
        while workers[1].is_alive():
            workers[1].join(1)
            now = time.monotonic()
            if done["migrations"] != seen:
                seen, seen_at = done["migrations"], now
            elif now - seen_at > STALL:
                break
        elapsed = time.monotonic() - t0
        stop.set()
        workers[0].join(30)
        workers[1].join(5)
        if any(w.is_alive() for w in workers):
            abort_fuse(m)
            proc.kill()
            pytest.fail(f"stuck (deadlock?) after {done['migrations']} migrations, {added['runs']} device adds")
        os.write(proc.stdin.fileno(), b"stop\n")
        out, _ = proc.communicate(timeout=120)
        rate = done["migrations"] / elapsed
        print(f"concurrency: {done['migrations']} migrations in {elapsed:.1f}s ({rate:.0f}/s), "
              f"{done['moved']} pages moved ({done['moved_cpu']} under the CPU threads), "
              f"holes {dict(done['holes'])}, {added['runs']} device adds; stress: {out.strip()}")

        assert not errors, errors
        assert done["migrations"] == MIGRATIONS
        assert proc.returncode == 0 and " corrupt=0" in out, out
        assert done["moved_cpu"] > 0 and added["runs"] > 0
        assert set(done["holes"]) <= {"-EBUSY", "-ENOENT"}

        # A new process maps the file afresh: every record as last written.
        check = subprocess.run([stress, "check", r.data, str(pages), "0", str(CPU_PAGES), str(shadow)],
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0 and "corrupt=0" in check.stdout, check.stdout + check.stderr
        # Every word of the added pages: original + total added.
        cpu = Cpu(hmm_cpu, r, pages)
        cpu("check", CPU_PAGES, ADD_PAGES, 0, added["total"] % (1 << 64))
        cpu.close()
        # The device and read() agree on every byte; the pages are all accounted.
        with open(r.data, "rb") as f:
            data = f.read()
        assert m.device("gpu0").access("read", r.name, 0, pages * PAGE)["crc32"] == crc(data)
        assert sum(placement(r).values()) == pages
        r.remove()
