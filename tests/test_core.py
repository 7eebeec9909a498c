"""Unit tests of the native core (native/*.c, through cdmcore.h) without FUSE.

Everything here talks to cdmfs._core directly: pools and the frame allocator,
region page tables, gather/scatter with allocation plans and the NUMA event
counters, the batched frame copy, the steps of a migration, and the raw
invalidation write.  Assertions are on bytes, counters and error codes.
"""
import errno
import os
import random
import threading

import pytest

from cdmfs._core import ffi, lib

PAGE = lib.CDM_PAGE_SIZE
MAXP = lib.CDM_MAX_POOLS
ALL_COUNTERS = [
    lib.CDM_NUMA_HIT, lib.CDM_NUMA_MISS, lib.CDM_NUMA_FOREIGN, lib.CDM_INTERLEAVE_HIT,
    lib.CDM_LOCAL_NODE, lib.CDM_OTHER_NODE, lib.CDM_PGFAULT, lib.CDM_PGALLOC,
    lib.CDM_PGFREE, lib.CDM_PGMIGRATE_SUCCESS, lib.CDM_PGMIGRATE_FAIL,
]
NUMA = {
    "numa_hit": lib.CDM_NUMA_HIT, "numa_miss": lib.CDM_NUMA_MISS,
    "numa_foreign": lib.CDM_NUMA_FOREIGN, "interleave_hit": lib.CDM_INTERLEAVE_HIT,
    "local_node": lib.CDM_LOCAL_NODE, "other_node": lib.CDM_OTHER_NODE,
}
FLAG_BITS = (lib.CDM_PTE_PRESENT | lib.CDM_PTE_CPU | lib.CDM_PTE_LOCKED | lib.CDM_PTE_PINNED
             | lib.CDM_PTE_POISONED | lib.CDM_PTE_DIRTY | lib.CDM_PTE_PRIVATE
             | lib.CDM_PTE_MIGRATING | lib.CDM_PTE_NUMA)


def proc_status_kib(key: str) -> int:
    """A kB line of /proc/self/status (VmRSS, VmPTE, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} line")


def vm_rss_kib() -> int:
    return proc_status_kib("VmRSS")


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Plan:
    """A struct cdm_plan with the arrays it points into kept alive."""

    def __init__(self, table, rows, local=0, interleave=False):
        self.table = ffi.new("int32_t[]", list(table))
        self.fallback = ffi.new("int32_t[]", [-1] * (MAXP * MAXP))
        for pool, order in rows.items():
            for k, q in enumerate(order):
                self.fallback[pool * MAXP + k] = q
        self.c = ffi.new("struct cdm_plan *")
        self.c.local = local
        self.c.interleave = int(interleave)
        self.c.ntable = len(table)
        self.c.table = self.table
        self.c.fallback = self.fallback


class Machine:
    """A cdm_machine plus helpers; pools get disjoint PFN ranges away from 0."""

    def __init__(self):
        self.m = lib.cdm_machine_new()
        assert self.m != ffi.NULL
        self.regions = []
        self.next_pfn = 0x100000

    def check(self):
        """cdm_machine_check over every region: "" if the invariants hold,
        else the first violation."""
        regions = ffi.new("struct cdm_region *[]", self.regions or [ffi.NULL])
        msg = ffi.new("char[]", 256)
        rc = lib.cdm_machine_check(self.m, regions, len(self.regions), msg, 256)
        text = ffi.string(msg).decode()
        assert (rc == 0) == (text == ""), (rc, text)
        return text

    def close(self):
        violation = self.check()
        for r in self.regions:
            lib.cdm_region_free(self.m, r)
        self.regions = []
        lib.cdm_machine_free(self.m)
        assert violation == ""

    # pools
    def add_pool(self, npages, flags=0, base=None):
        if base is None:
            base = self.next_pfn
        idx = lib.cdm_pool_add(self.m, base, npages, flags)
        assert idx >= 0, idx
        self.next_pfn = max(self.next_pfn, base + npages + 0x1000)
        return idx

    def pool(self, i):
        return self.m.pools[i]

    def free(self, i):
        return lib.cdm_pool_free_pages(self.m, i)

    def ctr(self, i, c):
        return self.m.pools[i].counters[c]

    def counters(self):
        return [[self.m.pools[i].counters[c] for c in ALL_COUNTERS]
                for i in range(self.m.npools)]

    def numa(self, i):
        return {k: self.ctr(i, c) for k, c in NUMA.items()}

    def alloc(self, pool, n):
        out = ffi.new("uint64_t[]", max(n, 1))
        rc = lib.cdm_pool_alloc(self.m, pool, n, out)
        return rc, [out[k] for k in range(n)]

    def pool_free(self, pfns):
        arr = ffi.new("uint64_t[]", list(pfns))
        lib.cdm_pool_free(self.m, arr, len(pfns))

    def frame(self, pfn):
        addr = lib.cdm_pfn_addr(self.m, pfn)
        assert addr != ffi.NULL
        return bytes(ffi.buffer(addr, PAGE))

    def fill(self, pfn, data):
        assert len(data) == PAGE
        ffi.memmove(lib.cdm_pfn_addr(self.m, pfn), data, PAGE)

    def owner(self, pfn):
        reg = ffi.new("uint32_t *")
        page = ffi.new("uint64_t *")
        rc = lib.cdm_pfn_owner(self.m, pfn, reg, page)
        return (rc, reg[0], page[0]) if rc == 0 else (rc, None, None)

    # regions
    def region(self, npages, rid=None):
        r = lib.cdm_region_new(self.m, len(self.regions) if rid is None else rid)
        assert r != ffi.NULL
        self.regions.append(r)
        assert lib.cdm_region_resize(self.m, r, npages) == 0
        return r

    def ptes(self, r, first=0, n=None):
        if n is None:
            n = r.npages - first
        out = ffi.new("uint64_t[]", max(n, 1))
        lib.cdm_region_ptes(self.m, r, first, n, out)
        return [out[k] for k in range(n)]

    def rw(self, r, off, data_or_len, plan=None, write=None, mark_cpu=0):
        """write(bytes) or read(length); returns (rc, bytes read or None, result)."""
        res = ffi.new("struct cdm_rw_result *")
        c = plan.c if plan is not None else ffi.NULL
        if isinstance(data_or_len, (bytes, bytearray)):
            buf = ffi.from_buffer(bytearray(data_or_len))
            rc = lib.cdm_region_rw(self.m, r, off, len(data_or_len), buf, 1, mark_cpu, c, res)
            return rc, None, res
        n = data_or_len
        buf = ffi.new("uint8_t[]", max(n, 1))
        rc = lib.cdm_region_rw(self.m, r, off, n, buf, 0, mark_cpu, c, res)
        return rc, bytes(ffi.buffer(buf, n)), res

    def write(self, r, off, data, plan=None, mark_cpu=0):
        rc, _, res = self.rw(r, off, data, plan, mark_cpu=mark_cpu)
        assert rc == 0, (rc, res.page)
        return res

    def read(self, r, off, n, plan=None, mark_cpu=0):
        rc, data, res = self.rw(r, off, n, plan, mark_cpu=mark_cpu)
        assert rc == 0, (rc, res.page)
        return data

    # migration
    def migrate(self, r, first, n, target, alloc_absent=0, between=None, after_lock=None):
        """Runs collect -> lock -> alloc -> copy -> finalize.  `between` runs after
        collect (where the caller would invalidate CPU copies), `after_lock`
        after lock.  Returns the statuses of every step and what was counted."""
        src = ffi.new("uint64_t[]", n)
        dst = ffi.new("uint64_t[]", n)
        st = ffi.new("int32_t[]", n)
        steps = {}
        steps["collected"] = lib.cdm_migrate_collect(self.m, r, first, n, target,
                                                     alloc_absent, 0, src, st)
        steps["collect"] = list(st)
        steps["src"] = list(src)
        if between:
            between()
        steps["locked"] = lib.cdm_migrate_lock(self.m, r, first, n, st)
        steps["lock"] = list(st)
        if after_lock:
            after_lock()
        steps["got"] = lib.cdm_migrate_alloc(self.m, target, n, st, dst)
        steps["alloc"] = list(st)
        steps["dst"] = list(dst)
        lib.cdm_migrate_copy(self.m, n, st, src, dst)
        steps["moved"] = lib.cdm_migrate_finalize(self.m, r, first, n, target, dst, st)
        steps["final"] = list(st)
        return steps


@pytest.fixture
def mach():
    m = Machine()
    yield m
    m.close()


def pfn_of(pte):
    return pte & lib.CDM_PTE_PFN_MASK


def pool_of(pte):
    return (pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT


def simple_plan(pool, local=None):
    return Plan([pool], {pool: [pool]}, local=pool if local is None else local)


def assert_no_transient_bits(m, r):
    for i, pte in enumerate(m.ptes(r)):
        assert not pte & (lib.CDM_PTE_LOCKED | lib.CDM_PTE_MIGRATING), (i, hex(pte))
        assert not pte & (1 << 48), (i, hex(pte))  # the core's internal PTE_NEW


def assert_accounting(m, r):
    """Pool and region counters agree with what the page table says."""
    ptes = m.ptes(r)
    for i in range(m.m.npools):
        present = [p for p in ptes if p & lib.CDM_PTE_PRESENT and pool_of(p) == i]
        assert r.resident[i] == len(present), i
        for p in present:
            assert m.pool(i).base_pfn <= pfn_of(p) < m.pool(i).base_pfn + m.pool(i).npages


# ----------------------------------------------------------------- pools


def test_terabyte_pool_is_sparse(mach):
    npages = 2 ** 28  # 1 TiB of 4 KiB frames
    before = vm_rss_kib()
    p = mach.add_pool(npages)
    assert mach.pool(p).npages == npages
    assert mach.free(p) == npages
    rc, pfns = mach.alloc(p, 1000)
    assert rc == 0
    assert len(set(pfns)) == 1000
    for k, pfn in enumerate(pfns):
        ffi.memmove(lib.cdm_pfn_addr(mach.m, pfn), bytes([k & 0xff]) * PAGE, PAGE)
    grown = vm_rss_kib() - before
    assert grown < 100 * 1024, f"RSS grew by {grown} KiB"
    assert mach.free(p) == npages - 1000
    assert all(mach.frame(pfn) == bytes([k & 0xff]) * PAGE for k, pfn in enumerate(pfns))
    # A page at the far end of the node works too.
    base = mach.pool(p).base_pfn
    assert lib.cdm_pfn_pool(mach.m, base + npages - 1) == p
    assert lib.cdm_pfn_pool(mach.m, base + npages) == -1
    last = lib.cdm_pfn_addr(mach.m, base + npages - 1)
    ffi.memmove(last, b"\x5a" * PAGE, PAGE)
    assert bytes(ffi.buffer(last, PAGE)) == b"\x5a" * PAGE
    assert vm_rss_kib() - before < 100 * 1024


def test_snapshots_copy_what_the_structs_count(mach):
    """cdm_pool_snapshot and cdm_region_snapshot: the counters of the live
    structs, copied under the lock; an unknown pool is -EINVAL."""
    a = mach.add_pool(32, base=0x3000)
    g = mach.add_pool(16, flags=lib.CDM_POOL_PRIVATE, base=0x5000)
    r = mach.region(8)
    mach.write(r, 0, pattern(41, 6 * PAGE), simple_plan(a))
    mach.read(r, 0, 2 * PAGE, mark_cpu=1)
    assert mach.migrate(r, 4, 2, g)["moved"] == 2
    res = ffi.new("struct cdm_rw_result *")
    assert lib.cdm_region_pin(mach.m, r, 0, 1, 1, 0, res) == 0
    assert lib.cdm_page_poison(mach.m, r, 3, pfn_of(mach.ptes(r, 3, 1)[0])) == 0
    assert lib.cdm_region_truncate(mach.m, r, 7 * PAGE + 1) == 0
    ps = ffi.new("struct cdm_pool_stats *")
    for i in (a, g):
        assert lib.cdm_pool_snapshot(mach.m, i, ps) == 0
        p = mach.pool(i)
        assert (ps.base_pfn, ps.npages, ps.flags) == (p.base_pfn, p.npages, p.flags)
        assert (ps.nr_used, ps.nr_retired, ps.nr_mapped, ps.nr_dirty, ps.nr_pinned, ps.nr_held) == \
            (p.nr_used, p.nr_retired, p.nr_mapped, p.nr_dirty, p.nr_pinned, p.nr_held)
        assert ps.nr_free == mach.free(i)
        assert list(ps.counters) == [p.counters[c] for c in ALL_COUNTERS]
    assert lib.cdm_pool_snapshot(mach.m, a, ps) == 0
    assert (ps.nr_used, ps.nr_retired, ps.nr_mapped, ps.nr_pinned) == (3, 1, 2, 1)
    rs = ffi.new("struct cdm_region_stats *")
    lib.cdm_region_snapshot(mach.m, r, rs)
    assert (rs.size, rs.npages, rs.nr_pinned, rs.nr_poisoned) == (7 * PAGE + 1, 8, 1, 1)
    assert list(rs.resident) == list(r.resident)
    assert (rs.resident[a], rs.resident[g]) == (3, 2)
    for bad in (-1, 2, MAXP):
        ps.nr_used = 12345
        assert lib.cdm_pool_snapshot(mach.m, bad, ps) == -errno.EINVAL
        assert ps.nr_used == 12345
    assert lib.cdm_region_pin(mach.m, r, 0, 1, 0, 0, res) == 0


def test_pool_add_rejects_bad_ranges(mach):
    a = mach.add_pool(100, base=1000)
    assert lib.cdm_pool_add(mach.m, 2000, 0, 0) == -errno.EINVAL
    assert lib.cdm_pool_add(mach.m, lib.CDM_PTE_PFN_MASK - 10, 100, 0) == -errno.EINVAL
    # Overlapping an existing pool would make a PFN belong to two pools.
    assert lib.cdm_pool_add(mach.m, 1050, 100, 0) == -errno.EINVAL
    assert lib.cdm_pool_add(mach.m, 900, 101, 0) == -errno.EINVAL
    assert mach.m.npools == 1
    b = mach.add_pool(100, base=1100)  # adjacent is fine
    assert (a, b) == (0, 1)
    assert lib.cdm_pfn_pool(mach.m, 1099) == a
    assert lib.cdm_pfn_pool(mach.m, 1100) == b
    assert lib.cdm_pfn_pool(mach.m, 999) == -1
    assert lib.cdm_pfn_pool(mach.m, 1200) == -1


def test_pool_alloc_all_or_nothing(mach):
    p = mach.add_pool(10)
    rc, first = mach.alloc(p, 4)
    assert rc == 0 and mach.free(p) == 6
    before = mach.counters()
    rc, _ = mach.alloc(p, 7)
    assert rc == -errno.ENOMEM
    assert mach.free(p) == 6
    assert mach.pool(p).nr_used == 4
    # Nothing happened: no allocation or free events for the backed-out frames.
    assert mach.counters() == before
    rc, rest = mach.alloc(p, 6)
    assert rc == 0 and mach.free(p) == 0
    assert sorted(first + rest) == list(range(mach.pool(p).base_pfn, mach.pool(p).base_pfn + 10))
    rc, _ = mach.alloc(p, 1)
    assert rc == -errno.ENOMEM
    assert mach.free(p) == 0


def test_free_then_alloc_reuses_frames_zeroed(mach):
    p = mach.add_pool(8)
    rc, pfns = mach.alloc(p, 8)
    assert rc == 0
    for pfn in pfns:
        mach.fill(pfn, pattern(pfn, PAGE))
    freed = [pfns[1], pfns[4], pfns[6]]
    mach.pool_free(freed)
    assert mach.free(p) == 3
    rc, again = mach.alloc(p, 3)
    assert rc == 0
    assert sorted(again) == sorted(freed)
    for pfn in again:
        assert mach.frame(pfn) == bytes(PAGE)
    for pfn in set(pfns) - set(freed):  # the others kept their data
        assert mach.frame(pfn) == pattern(pfn, PAGE)


def test_freed_frames_stay_resident_up_to_the_window(mach):
    """The newest CDM_RESIDENT_FREE_PAGES frees keep their host memory (reuse
    costs no host page fault); older ones are given back to the host."""
    window = lib.CDM_RESIDENT_FREE_PAGES
    extra = 1000
    p = mach.add_pool(window + extra)
    rc, pfns = mach.alloc(p, window + extra)
    assert rc == 0
    base = mach.pool(p).base_pfn
    for pfn in pfns:
        ffi.memmove(lib.cdm_pfn_addr(mach.m, pfn), b"\x77", 1)
    rss_full = vm_rss_kib()
    mach.pool_free(pfns)
    stale = [bool(mach.pool(p).fflags[pfn - base] & lib.CDM_FRAME_STALE) for pfn in pfns]
    assert stale == [False] * extra + [True] * window
    assert mach.pool(p).nresident == window
    # Only the pushed-out frames went back to the host.
    assert rss_full - vm_rss_kib() >= extra * PAGE // 1024 - 256
    # Every frame handed out again reads as zeros, stale or dropped.
    rc, again = mach.alloc(p, window + extra)
    assert rc == 0 and sorted(again) == sorted(pfns)
    assert all(mach.frame(pfn)[:1] == b"\0" for pfn in again)
    assert mach.pool(p).nresident == 0


def test_migration_copy_target_skips_zeroing_but_allocated_pages_are_zero(mach):
    """A stale frame taken as a copy's target is overwritten whole; one taken
    for a page never touched (CDM_MIG_ALLOC) must read as zeros."""
    p = mach.add_pool(8)
    rc, pfns = mach.alloc(p, 2)
    for pfn in pfns:
        mach.fill(pfn, pattern(pfn, PAGE))
    mach.pool_free(pfns)
    status = ffi.new("int32_t[]", [lib.CDM_MIG_MOVE, lib.CDM_MIG_ALLOC])
    dst = ffi.new("uint64_t[]", 2)
    assert lib.cdm_migrate_alloc(mach.m, p, 2, status, dst) == 2
    assert mach.frame(dst[1]) == bytes(PAGE)
    assert not any(mach.pool(p).fflags[d - mach.pool(p).base_pfn] & lib.CDM_FRAME_STALE for d in dst)


def test_first_touch_of_a_reused_frame_reads_zeros_around_the_write(mach):
    p = mach.add_pool(4)
    plan = simple_plan(p)
    r = mach.region(1)
    mach.write(r, 0, b"\xee" * PAGE, plan)
    lib.cdm_region_resize(mach.m, r, 0)            # the frame is freed, still resident
    lib.cdm_region_resize(mach.m, r, 1)
    mach.write(r, 100, b"abc", plan)              # first touch takes the same frame
    assert mach.read(r, 0, PAGE, plan) == bytes(100) + b"abc" + bytes(PAGE - 103)


def test_fail_alloc_injection_fails_exactly_n(mach):
    p = mach.add_pool(16)
    mach.m.pools[p].fail_alloc = 3
    results = [mach.alloc(p, 1)[0] for _ in range(5)]
    assert results == [-errno.ENOMEM] * 3 + [0, 0]
    assert mach.pool(p).fail_alloc == 0
    assert mach.free(p) == 14
    # A multi-frame request with injection pending fails whole and consumes one.
    mach.m.pools[p].fail_alloc = 1
    assert mach.alloc(p, 4)[0] == -errno.ENOMEM
    assert mach.free(p) == 14
    assert mach.alloc(p, 4)[0] == 0
    assert mach.free(p) == 10


def test_fail_alloc_in_first_touch_falls_back_then_recovers(mach):
    a = mach.add_pool(16)
    b = mach.add_pool(16)
    plan = Plan([a], {a: [a, b]}, local=a)
    mach.m.pools[a].fail_alloc = 2
    r = mach.region(4)
    mach.write(r, 0, b"x" * (4 * PAGE), plan)
    assert [pool_of(p) for p in mach.ptes(r)] == [b, b, a, a]
    assert mach.numa(a)["numa_foreign"] == 2 and mach.numa(b)["numa_miss"] == 2
    # Without a fallback the injected failure is the page's -ENOSPC.
    only_a = simple_plan(a)
    r2 = mach.region(2)
    mach.m.pools[a].fail_alloc = 1
    rc, _, res = mach.rw(r2, 0, 2 * PAGE, only_a)
    assert rc == -errno.ENOSPC and res.page == 0
    assert mach.ptes(r2) == [0, 0]
    assert mach.read(r2, 0, 2 * PAGE, only_a) == bytes(2 * PAGE)


def test_pgalloc_pgfree_counters(mach):
    p = mach.add_pool(32)
    rc, pfns = mach.alloc(p, 5)
    assert rc == 0
    assert mach.ctr(p, lib.CDM_PGALLOC) == 5 and mach.ctr(p, lib.CDM_PGFREE) == 0
    mach.pool_free(pfns[:2])
    assert mach.ctr(p, lib.CDM_PGALLOC) == 5 and mach.ctr(p, lib.CDM_PGFREE) == 2
    r = mach.region(3)
    mach.write(r, 0, b"a" * (3 * PAGE), simple_plan(p))
    assert mach.ctr(p, lib.CDM_PGALLOC) == 8
    assert lib.cdm_region_resize(mach.m, r, 1) == 0
    assert mach.ctr(p, lib.CDM_PGFREE) == 4
    assert mach.pool(p).nr_used == 3 + 1
    assert mach.free(p) == 32 - 4


def test_pfn_pool_and_owner(mach):
    a = mach.add_pool(8)
    b = mach.add_pool(8)
    base_a, base_b = mach.pool(a).base_pfn, mach.pool(b).base_pfn
    assert lib.cdm_pfn_pool(mach.m, base_a) == a
    assert lib.cdm_pfn_pool(mach.m, base_a + 7) == a
    assert lib.cdm_pfn_pool(mach.m, base_a + 8) == -1
    assert lib.cdm_pfn_pool(mach.m, base_b + 3) == b
    assert lib.cdm_pfn_pool(mach.m, 0) == -1
    assert lib.cdm_pfn_addr(mach.m, base_b + 8) == ffi.NULL
    r = mach.region(4, rid=7)
    plan = Plan([a, b], {a: [a], b: [b]})
    mach.write(r, 2 * PAGE, b"z" * (2 * PAGE), plan)  # pages 2 (a) and 3 (b)
    ptes = mach.ptes(r)
    assert ptes[:2] == [0, 0]
    assert pool_of(ptes[2]) == a and pool_of(ptes[3]) == b
    assert mach.owner(pfn_of(ptes[2])) == (0, 7, 2)
    assert mach.owner(pfn_of(ptes[3])) == (0, 7, 3)
    assert mach.owner(base_a + 5)[0] == -errno.ENOENT  # a free frame
    assert mach.owner(base_b + 100)[0] == -errno.EINVAL  # no pool
    assert lib.cdm_region_resize(mach.m, r, 3) == 0
    assert mach.owner(pfn_of(ptes[3]))[0] == -errno.ENOENT
    assert mach.owner(pfn_of(ptes[2])) == (0, 7, 2)


# ------------------------------------------------------ region page table


def test_region_resize_grow_shrink(mach):
    a = mach.add_pool(64)
    b = mach.add_pool(64)
    r = mach.region(10)
    plan = Plan([a, a, b], {a: [a], b: [b]})
    data = pattern(1, 10 * PAGE)
    mach.write(r, 0, data, plan)
    assert (r.resident[a], r.resident[b]) == (7, 3)  # pages 0,1,3,4,6,7,9 on a
    assert (mach.free(a), mach.free(b)) == (57, 61)
    assert lib.cdm_region_resize(mach.m, r, 4) == 0
    assert r.npages == 4
    assert (r.resident[a], r.resident[b]) == (3, 1)
    assert (mach.free(a), mach.free(b)) == (61, 63)
    assert (mach.pool(a).nr_used, mach.pool(b).nr_used) == (3, 1)
    assert mach.pool(a).nr_dirty == 3
    rc, _, res = mach.rw(r, 4 * PAGE, 1, plan)
    assert rc == -errno.EINVAL
    rc, _, res = mach.rw(r, 3 * PAGE + 10, PAGE, plan)  # spills past the end
    assert rc == -errno.EINVAL
    # Grow: the old pages come back as zero pages, not as the old data.
    assert lib.cdm_region_resize(mach.m, r, 10) == 0
    assert mach.ptes(r)[4:] == [0] * 6
    assert mach.read(r, 0, 10 * PAGE, plan) == data[:4 * PAGE] + bytes(6 * PAGE)
    # A big, sparse page table is cheap, to grow and to shrink again (a table
    # of 2**26 entries is 512 MiB if every entry gets written).
    before = vm_rss_kib()
    assert lib.cdm_region_resize(mach.m, r, 2 ** 26) == 0
    mach.write(r, (2 ** 26 - 1) * PAGE, b"end", plan)
    assert mach.read(r, (2 ** 26 - 1) * PAGE, 3) == b"end"
    assert vm_rss_kib() - before < 50 * 1024
    assert lib.cdm_region_resize(mach.m, r, 0) == 0
    assert vm_rss_kib() - before < 50 * 1024
    assert (mach.free(a), mach.free(b)) == (64, 64)
    assert list(r.resident)[:2] == [0, 0]
    assert mach.pool(a).nr_dirty == 0 and mach.pool(b).nr_dirty == 0


def test_truncate_zeroes_the_page_the_end_cuts(mach):
    """cdm_region_truncate takes bytes: the page the new end cuts reads zero
    past it, and growing zeroes past the old end too (a device kernel writes
    whole pages, past the end); a page in device-private memory is zeroed
    there, a poisoned one stays poisoned, an untouched one stays untouched."""
    a = mach.add_pool(16)
    g = mach.add_pool(16, flags=lib.CDM_POOL_PRIVATE)
    r = mach.region(4)
    plan = simple_plan(a)
    data = pattern(31, 4 * PAGE)
    mach.write(r, 0, data, plan)
    assert lib.cdm_region_truncate(mach.m, r, 3 * PAGE + 100) == 0
    assert (r.npages, r.size) == (4, 3 * PAGE + 100)
    tail = pfn_of(mach.ptes(r, 3, 1)[0])
    assert mach.frame(tail) == data[3 * PAGE:3 * PAGE + 100] + bytes(PAGE - 100)
    # Written past the end (as a device does), then grown: zero past the old end.
    mach.fill(tail, b"\xff" * PAGE)
    assert lib.cdm_region_truncate(mach.m, r, 3 * PAGE + 200) == 0
    assert mach.frame(tail) == b"\xff" * 100 + bytes(PAGE - 100)
    assert lib.cdm_region_truncate(mach.m, r, 6 * PAGE) == 0
    assert mach.read(r, 3 * PAGE, PAGE) == b"\xff" * 100 + bytes(PAGE - 100)
    # A whole-page size zeroes nothing.
    before = mach.read(r, 0, 3 * PAGE)
    assert lib.cdm_region_truncate(mach.m, r, 3 * PAGE) == 0
    assert mach.read(r, 0, 3 * PAGE) == before == data[:3 * PAGE]
    # Device-private: the device's memory holds the page, and is zeroed.
    assert mach.migrate(r, 2, 1, g)["moved"] == 1
    private = mach.ptes(r, 2, 1)[0]
    assert private & lib.CDM_PTE_PRIVATE
    assert lib.cdm_region_truncate(mach.m, r, 2 * PAGE + 10) == 0
    assert mach.ptes(r, 2, 1)[0] == private
    assert mach.frame(pfn_of(private)) == data[2 * PAGE:2 * PAGE + 10] + bytes(PAGE - 10)
    assert mach.migrate(r, 2, 1, a)["moved"] == 1
    assert mach.read(r, 2 * PAGE, PAGE) == data[2 * PAGE:2 * PAGE + 10] + bytes(PAGE - 10)
    # Poisoned: no frame to zero, the page stays poisoned.
    pte = mach.ptes(r, 2, 1)[0]
    assert lib.cdm_page_poison(mach.m, r, 2, pfn_of(pte)) == 0
    assert lib.cdm_region_truncate(mach.m, r, 2 * PAGE + 5) == 0
    assert mach.ptes(r, 2, 1)[0] & lib.CDM_PTE_POISONED and r.nr_poisoned == 1
    assert mach.rw(r, 2 * PAGE, 1)[0] == -errno.EIO
    # Untouched: stays absent.
    assert lib.cdm_region_truncate(mach.m, r, 2 * PAGE) == 0
    assert lib.cdm_region_truncate(mach.m, r, 4 * PAGE + 7) == 0
    assert lib.cdm_region_truncate(mach.m, r, 4 * PAGE + 3) == 0
    assert mach.ptes(r, 2, 3) == [0, 0, 0]
    assert mach.read(r, 0, 2 * PAGE) == data[:2 * PAGE]
    assert mach.check() == ""


def test_truncate_waits_for_a_locked_tail_page(mach):
    """The page to zero is locked by a migration whose copy may be taken:
    -EAGAIN and nothing changed.  A collected page not locked yet is zeroed
    where it is, and the migration then copies the zeros."""
    a = mach.add_pool(16)
    c = mach.add_pool(16)
    r = mach.region(3)
    data = pattern(32, 3 * PAGE)
    mach.write(r, 0, data, simple_plan(a))
    before = mach.ptes(r)

    def shrink_locked():
        assert lib.cdm_region_truncate(mach.m, r, 2 * PAGE + 100) == -errno.EAGAIN
        assert (r.npages, r.size) == (3, 3 * PAGE)
        assert mach.frame(pfn_of(before[2])) == data[2 * PAGE:]

    s = mach.migrate(r, 2, 1, c, after_lock=shrink_locked)
    assert s["moved"] == 1
    assert mach.read(r, 0, 3 * PAGE) == data

    def shrink_collected():
        assert lib.cdm_region_truncate(mach.m, r, 2 * PAGE + 100) == 0

    s = mach.migrate(r, 2, 1, a, between=shrink_collected)
    assert s["moved"] == 1 and pool_of(mach.ptes(r, 2, 1)[0]) == a
    assert mach.read(r, 2 * PAGE, PAGE) == data[2 * PAGE:2 * PAGE + 100] + bytes(PAGE - 100)
    assert_no_transient_bits(mach, r)
    assert mach.check() == ""


def test_region_free_releases_everything(mach):
    a = mach.add_pool(16)
    r = lib.cdm_region_new(mach.m, 3)
    assert lib.cdm_region_resize(mach.m, r, 5) == 0
    res = ffi.new("struct cdm_rw_result *")
    buf = ffi.new("uint8_t[]", 5 * PAGE)
    plan = simple_plan(a)  # keeps the plan's arrays alive during the call
    assert lib.cdm_region_rw(mach.m, r, 0, 5 * PAGE, buf, 1, 1, plan.c, res) == 0
    assert mach.pool(a).nr_mapped == 5
    lib.cdm_region_free(mach.m, r)
    assert mach.free(a) == 16
    assert mach.pool(a).nr_used == 0 and mach.pool(a).nr_mapped == 0
    assert mach.pool(a).nr_dirty == 0


def test_pte_layout(mach):
    a = mach.add_pool(8, base=0x2000)
    b = mach.add_pool(8, base=0x4000)
    r = mach.region(4)
    mach.read(r, 0, PAGE, simple_plan(a))      # first touch by a read
    mach.write(r, 3 * PAGE, b"w", simple_plan(b))  # by a write
    p0, p1, p2, p3 = mach.ptes(r)
    assert p1 == 0 and p2 == 0
    for pte, pool in ((p0, a), (p3, b)):
        assert pte & lib.CDM_PTE_PRESENT
        assert pool_of(pte) == pool
        base = mach.pool(pool).base_pfn
        assert base <= pfn_of(pte) < base + 8
        assert not pte & (lib.CDM_PTE_PRIVATE | lib.CDM_PTE_LOCKED | lib.CDM_PTE_CPU)
        # Nothing outside the documented fields.
        assert pte & ~(lib.CDM_PTE_PFN_MASK | lib.CDM_PTE_POOL_MASK | FLAG_BITS) == 0
    assert not p0 & lib.CDM_PTE_DIRTY
    assert p3 & lib.CDM_PTE_DIRTY
    assert pfn_of(p0) == 0x2000 and pfn_of(p3) == 0x4000
    assert mach.frame(pfn_of(p3))[:1] == b"w"
    # cdm_region_ptes beyond the end gives zeros.
    assert mach.ptes(r, 2, 6) == [0, p3, 0, 0, 0, 0]


# ------------------------------------------------------ gather / scatter


def test_first_touch_allocates_by_plan(mach):
    a = mach.add_pool(8)
    b = mach.add_pool(8)
    r = mach.region(6)
    res = mach.write(r, PAGE, b"q" * (2 * PAGE), simple_plan(b, local=a))
    assert res.allocated == 2
    ptes = mach.ptes(r)
    assert [bool(p & lib.CDM_PTE_PRESENT) for p in ptes] == [0, 1, 1, 0, 0, 0]
    assert pool_of(ptes[1]) == b and pool_of(ptes[2]) == b
    assert (r.resident[a], r.resident[b]) == (0, 2)
    # Pages already present are not reallocated, whatever the plan says.
    res = mach.write(r, 0, b"p" * (3 * PAGE), simple_plan(a))
    assert res.allocated == 1
    ptes2 = mach.ptes(r)
    assert pool_of(ptes2[0]) == a and ptes2[1:3] == ptes[1:3]
    # Without a plan, or with a plan that names no pool, an absent page
    # cannot be touched.
    rc, _, res = mach.rw(r, 3 * PAGE, 10)
    assert rc == -errno.ENOSPC and res.page == 3
    rc, _, res = mach.rw(r, 3 * PAGE, 10, Plan([], {}))
    assert rc == -errno.ENOSPC and res.page == 3
    # Nothing to do is fine, even at the end.
    rc, _, res = mach.rw(r, 6 * PAGE, 0, simple_plan(a))
    assert rc == 0 and res.allocated == 0
    assert mach.read(r, 0, 3 * PAGE) == b"p" * (3 * PAGE)  # present: no plan needed


def serve(mach, r, off, n, local, write=None):
    """cdm_region_serve: (rc, bytes read)."""
    buf = ffi.from_buffer(bytearray(write) if write is not None else bytearray(n))
    rc = lib.cdm_region_serve(mach.m, r, off, n, buf, int(write is not None), local, 0)
    return rc, bytes(ffi.buffer(buf))


def test_serve_places_a_first_touch_by_the_published_plan(mach):
    """The router's first touch: the plan Python published for the range's
    policy and the faulting CPU's pool, copied by the core; without one (or
    not knowing the CPU yet) the request is Python's, nothing changed."""
    a, b = mach.add_pool(8), mach.add_pool(8)
    r = mach.region(8)
    # No policies published: Python's.
    assert serve(mach, r, 0, PAGE, a)[0] == -errno.EAGAIN
    start, end, ids = ffi.new("uint64_t[]", [4]), ffi.new("uint64_t[]", [6]), ffi.new("int32_t[]", [1])
    assert lib.cdm_region_set_policies(mach.m, r, 0, 1, start, end, ids) == 0
    # Policy 0 (pages 0-3, 6-7) goes to a, policy 1 (pages 4-5) to b; only
    # CPUs of pool a have plans.
    for policy, pool in ((0, a), (1, b)):
        plan = simple_plan(pool, local=a)
        assert lib.cdm_machine_set_plan(mach.m, policy, plan.c) == 0
    del plan                                # the core keeps copies
    assert serve(mach, r, 0, PAGE, -1)[0] == -errno.ENXIO      # which CPU?
    assert serve(mach, r, 0, PAGE, b)[0] == -errno.EAGAIN      # no plan for b's CPUs
    assert serve(mach, r, 3 * PAGE, 2 * PAGE, a)[0] == -errno.EAGAIN   # two policies
    assert mach.ptes(r) == [0] * 8
    before = mach.numa(a), mach.numa(b)
    assert serve(mach, r, 0, 2 * PAGE, a, b"x" * 2 * PAGE)[0] == 2 * PAGE
    assert serve(mach, r, 4 * PAGE, 2 * PAGE, a) == (2 * PAGE, bytes(2 * PAGE))
    ptes = mach.ptes(r)
    assert [pool_of(p) if p else None for p in ptes] == [a, a, None, None, b, b, None, None]
    assert all(p & lib.CDM_PTE_CPU for p in ptes if p)
    assert ptes[0] & lib.CDM_PTE_DIRTY and not ptes[4] & lib.CDM_PTE_DIRTY
    na, nb = mach.numa(a), mach.numa(b)
    assert na["numa_hit"] - before[0]["numa_hit"] == 2 and na["local_node"] - before[0]["local_node"] == 2
    assert nb["numa_hit"] - before[1]["numa_hit"] == 2 and nb["other_node"] - before[1]["other_node"] == 2
    assert serve(mach, r, 0, 2 * PAGE, -1) == (2 * PAGE, b"x" * 2 * PAGE)  # placed: no CPU needed
    # No memory left: Python's (it fails the fault), nothing allocated.
    full = mach.region(16)
    lib.cdm_region_set_policies(mach.m, full, 0, 0, ffi.NULL, ffi.NULL, ffi.NULL)
    assert serve(mach, full, 0, 16 * PAGE, a)[0] == -errno.EAGAIN
    assert mach.ptes(full) == [0] * 16
    # Forgotten plans (the placement changed): Python's again.
    lib.cdm_machine_clear_plans(mach.m)
    assert serve(mach, r, 6 * PAGE, PAGE, a)[0] == -errno.EAGAIN
    # Bad input changes nothing.
    bad = simple_plan(63)
    assert lib.cdm_machine_set_plan(mach.m, 0, bad.c) == -errno.EINVAL
    assert lib.cdm_machine_set_plan(mach.m, lib.CDM_MAX_POLICIES, simple_plan(a).c) == -errno.EINVAL
    unsorted = ffi.new("uint64_t[]", [4, 2]), ffi.new("uint64_t[]", [6, 3]), ffi.new("int32_t[]", [0, 0])
    assert lib.cdm_region_set_policies(mach.m, r, 0, 2, *unsorted) == -errno.EINVAL
    assert mach.check() == ""


def test_numa_hinting_mark_leaves_the_read_to_python(mach):
    """change_prot_numa in the core: numa_mark marks the CPU-mapped pages of
    the pools asked for (not pinned ones, not unmapped ones), at most max,
    and says where to go on; serve refuses a READ of a marked page (the
    hinting fault is Python's) but still serves a WRITE and unmarked pages;
    numa_take clears the mark once and reports the entries as they were."""
    a, b = mach.add_pool(16), mach.add_pool(16)
    r = mach.region(8)
    lib.cdm_region_set_policies(mach.m, r, 0, 0, ffi.NULL, ffi.NULL, ffi.NULL)
    lib.cdm_machine_set_plan(mach.m, 0, simple_plan(a).c)
    assert serve(mach, r, 0, 6 * PAGE, a, b"h" * 6 * PAGE)[0] == 6 * PAGE
    lib.cdm_region_uncache(mach.m, r, 5, 1)         # page 5: not CPU-mapped
    assert lib.cdm_region_pin(mach.m, r, 4, 1, 1, 0, ffi.new("struct cdm_rw_result *")) == 0
    nxt = ffi.new("uint64_t *")
    # Only pool b's pages: none.
    assert lib.cdm_region_numa_mark(mach.m, r, 0, 8, 1 << b, 100, nxt) == 0 and nxt[0] == 8
    # At most 2, then on from page 2.
    assert lib.cdm_region_numa_mark(mach.m, r, 0, 8, 1 << a, 2, nxt) == 2 and nxt[0] == 2
    assert lib.cdm_region_numa_mark(mach.m, r, 0, 8, 1 << a, 100, nxt) == 2 and nxt[0] == 8
    ptes = mach.ptes(r)
    assert [bool(p & lib.CDM_PTE_NUMA) for p in ptes] == [True] * 4 + [False] * 4
    assert mach.check() == ""
    # A READ of a marked page: Python's, nothing changed; unmarked pages are served.
    served = r.served_reads
    assert serve(mach, r, 0, PAGE, a)[0] == -errno.EAGAIN
    assert serve(mach, r, 3 * PAGE, 2 * PAGE, a)[0] == -errno.EAGAIN
    assert mach.ptes(r) == ptes and r.served_reads == served
    assert serve(mach, r, 4 * PAGE, 2 * PAGE, a) == (2 * PAGE, b"h" * 2 * PAGE)
    # A WRITE (write(2), no hinting fault) is served and keeps the mark.
    assert serve(mach, r, PAGE, PAGE, a, b"w" * PAGE)[0] == PAGE
    assert mach.ptes(r, 1, 1)[0] & lib.CDM_PTE_NUMA
    # The hinting fault takes the marks of its range, once.
    out = ffi.new("uint64_t[]", 3)
    assert lib.cdm_region_numa_take(mach.m, r, 0, 3, out) == 3
    assert all(out[k] & lib.CDM_PTE_NUMA for k in range(3))
    assert lib.cdm_region_numa_take(mach.m, r, 0, 3, out) == 0
    assert serve(mach, r, 0, 2 * PAGE, a) == (2 * PAGE, b"h" * PAGE + b"w" * PAGE)
    assert serve(mach, r, 3 * PAGE, PAGE, a)[0] == -errno.EAGAIN     # still marked
    # Past the end: zero entries, nothing taken.
    out = ffi.new("uint64_t[]", 4)
    assert lib.cdm_region_numa_take(mach.m, r, 6, 4, out) == 0 and out[2] == 0 and out[3] == 0
    assert mach.check() == ""


def test_serve_faults_device_private_pages_back(mach):
    """migrate_to_ram in the router's path: private pages come back by the
    plan, bytes intact, the source frames freed and counted as migrations,
    one log entry per source pool for Python; pinned pages, no room, or no
    memory leave the request to Python with nothing changed."""
    a, g = mach.add_pool(8), mach.add_pool(8, flags=lib.CDM_POOL_PRIVATE)
    r = mach.region(8)
    plan = simple_plan(a)
    assert lib.cdm_machine_set_plan(mach.m, 0, plan.c) == 0
    assert lib.cdm_region_set_policies(mach.m, r, 0, 0, ffi.NULL, ffi.NULL, ffi.NULL) == 0
    data = pattern(7, 6 * PAGE)
    mach.write(r, 0, data, plan)
    assert mach.migrate(r, 0, 6, g)["moved"] == 6
    out = ffi.new("struct cdm_faultback[]", 8)
    assert lib.cdm_machine_take_faultbacks(mach.m, out, 8) == 0
    free_g = mach.free(g)
    mig0 = mach.ctr(g, lib.CDM_PGMIGRATE_SUCCESS)
    # Pages 1-2 private, page 6 absent: one read, all in C.
    assert serve(mach, r, PAGE, 2 * PAGE, a) == (2 * PAGE, data[PAGE:3 * PAGE])
    ptes = mach.ptes(r)
    assert pool_of(ptes[1]) == a and pool_of(ptes[2]) == a and pool_of(ptes[0]) == g
    assert not ptes[1] & lib.CDM_PTE_PRIVATE and ptes[1] & lib.CDM_PTE_CPU
    assert mach.free(g) == free_g + 2
    assert mach.ctr(g, lib.CDM_PGMIGRATE_SUCCESS) == mig0 + 2
    assert lib.cdm_machine_take_faultbacks(mach.m, out, 8) == 1
    assert (out[0].region, out[0].pool, out[0].first, out[0].n, out[0].moved) == (0, g, 1, 2, 2)
    # A pinned private page: Python's.
    res = ffi.new("struct cdm_rw_result *")
    assert lib.cdm_region_pin(mach.m, r, 3, 1, 1, 0, res) == 0 and res.allocated == 1
    assert serve(mach, r, 3 * PAGE, PAGE, a)[0] == -errno.EAGAIN
    # No memory left in a (one frame free, 3 asked): nothing changes.
    other = mach.region(5)
    mach.write(other, 0, bytes(5 * PAGE), plan)
    before = mach.ptes(r)
    assert serve(mach, r, 4 * PAGE, 3 * PAGE, a)[0] == -errno.EAGAIN
    assert mach.ptes(r) == before and mach.free(g) == free_g + 2
    assert lib.cdm_machine_take_faultbacks(mach.m, out, 8) == 0
    assert mach.check() == ""


def test_local_pool_of_a_pid(mach):
    a, b = mach.add_pool(8), mach.add_pool(8)
    assert lib.cdm_machine_local_pool(mach.m, os.getpid()) == -1      # not told yet
    assert lib.cdm_machine_set_cpu_nodes(mach.m, a, 1, ffi.new("int32_t[]", [a])) == 0
    assert lib.cdm_machine_local_pool(mach.m, os.getpid()) == a       # one node: no question
    ncpu = os.cpu_count()
    pools = [b] * ncpu
    assert lib.cdm_machine_set_cpu_nodes(mach.m, a, ncpu, ffi.new("int32_t[]", pools)) == 0
    assert lib.cdm_machine_local_pool(mach.m, os.getpid()) == b       # every CPU is b's
    assert lib.cdm_machine_local_pool(mach.m, 0x7fffffff) == a        # no such pid: the default
    assert lib.cdm_machine_set_cpu_nodes(mach.m, 63, 0, ffi.NULL) == -errno.EINVAL


def test_write_read_roundtrip_unaligned(mach):
    a = mach.add_pool(64)
    plan = simple_plan(a)
    r = mach.region(16)
    data = pattern(2, 3 * PAGE + 777)
    off = 5 * PAGE - 1234
    mach.write(r, off, data, plan)
    assert mach.read(r, off, len(data), plan) == data
    whole = mach.read(r, 0, 16 * PAGE, plan)
    assert whole[:off] == bytes(off)
    assert whole[off:off + len(data)] == data
    assert whole[off + len(data):] == bytes(16 * PAGE - off - len(data))
    # Small reads inside and across page boundaries.
    for o, n in ((off + 1, 1), (5 * PAGE - 3, 6), (6 * PAGE + 4095, 2), (off, 1)):
        assert mach.read(r, o, n) == whole[o:o + n]
    # Overwrite a few bytes across a boundary; neighbours are untouched.
    mach.write(r, 6 * PAGE - 2, b"ABCD")
    whole2 = mach.read(r, 0, 16 * PAGE)
    assert whole2[6 * PAGE - 2:6 * PAGE + 2] == b"ABCD"
    assert whole2[:6 * PAGE - 2] == whole[:6 * PAGE - 2]
    assert whole2[6 * PAGE + 2:] == whole[6 * PAGE + 2:]
    # The bytes are in the frames the page table names.
    for i in range(16):
        pte = mach.ptes(r, i, 1)[0]
        assert mach.frame(pfn_of(pte)) == whole2[i * PAGE:(i + 1) * PAGE]


def test_untouched_pages_read_as_zeros(mach):
    a = mach.add_pool(8)
    rc, pfns = mach.alloc(a, 8)  # dirty every frame, then give them back
    assert rc == 0
    for pfn in pfns:
        mach.fill(pfn, b"\xee" * PAGE)
    mach.pool_free(pfns)
    r = mach.region(8)
    assert mach.read(r, 0, 8 * PAGE, simple_plan(a)) == bytes(8 * PAGE)
    assert mach.ctr(a, lib.CDM_PGFAULT) == 1        # one READ is one fault, whatever its length
    assert r.resident[a] == 8


def test_fallback_and_numa_counters(mach):
    """zone_statistics(): hit/miss on the pool used, foreign on the intended
    one, local/other against the faulting CPU's pool."""
    a = mach.add_pool(2)
    b = mach.add_pool(5)
    c = mach.add_pool(4)
    r = mach.region(8)
    plan = Plan([a], {a: [a, b, c]}, local=a)
    mach.write(r, 0, pattern(3, 4 * PAGE), plan)
    assert [pool_of(p) for p in mach.ptes(r, 0, 4)] == [a, a, b, b]
    assert mach.numa(a) == dict(numa_hit=2, numa_miss=0, numa_foreign=2, interleave_hit=0,
                                local_node=2, other_node=0)
    assert mach.numa(b) == dict(numa_hit=0, numa_miss=2, numa_foreign=0, interleave_hit=0,
                                local_node=0, other_node=2)
    # A CPU on b's node faults in pages intended for c, which is full after 4.
    plan2 = Plan([c], {c: [c, b]}, local=b)
    fill = mach.region(4)
    mach.write(fill, 0, b"c" * (3 * PAGE), Plan([c], {c: [c]}, local=c))
    mach.write(r, 4 * PAGE, pattern(4, 3 * PAGE), plan2)
    assert [pool_of(p) for p in mach.ptes(r, 4, 3)] == [c, b, b]
    assert mach.numa(c) == dict(numa_hit=4, numa_miss=0, numa_foreign=2, interleave_hit=0,
                                local_node=3, other_node=1)
    assert mach.numa(b) == dict(numa_hit=0, numa_miss=4, numa_foreign=0, interleave_hit=0,
                                local_node=2, other_node=2)
    assert mach.numa(a)["numa_foreign"] == 2  # unchanged
    assert mach.read(r, 0, 4 * PAGE) == pattern(3, 4 * PAGE)
    assert mach.read(r, 4 * PAGE, 3 * PAGE) == pattern(4, 3 * PAGE)
    # A row may start elsewhere than its intended pool (an isolated node is
    # never tried): every page is then a miss.
    r2 = mach.region(1)
    mach.write(r2, 0, b"m", Plan([a], {a: [b]}, local=b))
    assert pool_of(mach.ptes(r2)[0]) == b
    assert mach.numa(b)["numa_miss"] == 5 and mach.numa(a)["numa_foreign"] == 3
    assert mach.numa(b)["local_node"] == 3
    assert_accounting(mach, r)


def test_interleave_alternates_by_page_index(mach):
    a = mach.add_pool(16)
    b = mach.add_pool(3)
    plan = Plan([a, b], {a: [a, b], b: [b, a]}, local=a, interleave=True)
    r = mach.region(12)
    # Touch out of order: placement follows the page index, not the order.
    for i in (5, 2, 3, 4, 0, 1):
        mach.write(r, i * PAGE, bytes([i]) * 10, plan)
    assert [pool_of(p) for p in mach.ptes(r, 0, 6)] == [a, b, a, b, a, b]
    assert mach.numa(a) == dict(numa_hit=3, numa_miss=0, numa_foreign=0, interleave_hit=3,
                                local_node=3, other_node=0)
    assert mach.numa(b) == dict(numa_hit=3, numa_miss=0, numa_foreign=0, interleave_hit=3,
                                local_node=0, other_node=3)
    # b is full: its pages fall back to a, which is a miss and no interleave hit.
    mach.write(r, 6 * PAGE, b"x" * (4 * PAGE), plan)
    assert [pool_of(p) for p in mach.ptes(r, 6, 4)] == [a, a, a, a]
    assert mach.numa(a) == dict(numa_hit=5, numa_miss=2, numa_foreign=0, interleave_hit=5,
                                local_node=7, other_node=0)
    assert mach.numa(b)["numa_foreign"] == 2 and mach.numa(b)["interleave_hit"] == 3
    # Weighted interleave: a table with a repeated twice.
    c = mach.add_pool(16)
    w = Plan([a, a, c], {a: [a], c: [c]}, local=a, interleave=True)
    r2 = mach.region(6)
    mach.read(r2, 0, 6 * PAGE, w)
    assert [pool_of(p) for p in mach.ptes(r2)] == [a, a, c, a, a, c]
    assert mach.numa(c)["interleave_hit"] == 2


def test_enospc_changes_nothing(mach):
    a = mach.add_pool(2)
    b = mach.add_pool(1)
    plan = Plan([a], {a: [a, b]}, local=a)
    r = mach.region(8)
    mach.write(r, 2 * PAGE, b"keep", plan)  # page 2 on a
    before_ptes = mach.ptes(r)
    before_ctr = mach.counters()
    free = (mach.free(a), mach.free(b))
    # Pages 0..4: 0 and 1 fit (a, b), 3 does not.
    rc, _, res = mach.rw(r, 0, b"y" * (5 * PAGE), plan)
    assert rc == -errno.ENOSPC
    assert res.page == 3 and res.allocated == 0
    assert (mach.free(a), mach.free(b)) == free
    assert mach.ptes(r) == before_ptes
    assert mach.counters() == before_ctr
    assert (r.resident[a], r.resident[b]) == (1, 0)
    assert mach.pool(a).nr_dirty == 1 and mach.pool(b).nr_dirty == 0
    # A read-fault that cannot be satisfied is the same.
    rc, _, res = mach.rw(r, 0, 5 * PAGE, plan, mark_cpu=1)
    assert rc == -errno.ENOSPC and res.page == 3
    assert mach.ptes(r) == before_ptes and mach.counters() == before_ctr
    assert mach.read(r, 2 * PAGE, 4) == b"keep"
    # What fits still works afterwards, and the allocator is intact.
    mach.write(r, 0, b"y" * (2 * PAGE), plan)
    assert [pool_of(p) for p in mach.ptes(r, 0, 3)] == [a, b, a]
    assert (mach.free(a), mach.free(b)) == (0, 0)
    assert len({pfn_of(p) for p in mach.ptes(r, 0, 3)}) == 3
    assert_accounting(mach, r)


@pytest.mark.parametrize("bit,err", [
    (lib.CDM_PTE_LOCKED, -errno.EAGAIN),
    (lib.CDM_PTE_POISONED, -errno.EIO),
])
def test_locked_and_poisoned_pages_refuse_access(mach, bit, err):
    a = mach.add_pool(16)
    plan = simple_plan(a)
    r = mach.region(6)
    mach.write(r, 2 * PAGE, b"d" * (2 * PAGE), plan)  # pages 2, 3
    r.pte[3] |= bit
    before_ptes = mach.ptes(r)
    before_ctr = mach.counters()
    for write in (0, 1):
        # The range starts with absent pages: they must not be allocated either.
        if write:
            rc, _, res = mach.rw(r, 0, b"n" * (5 * PAGE), plan, mark_cpu=1)
        else:
            rc, _, res = mach.rw(r, 100, 4 * PAGE, plan, mark_cpu=1)
        assert rc == err and res.page == 3 and res.allocated == 0
        assert mach.ptes(r) == before_ptes
        assert mach.counters() == before_ctr
        assert mach.free(a) == 14
    # Other pages are unaffected.
    assert mach.read(r, 2 * PAGE, PAGE, plan) == b"d" * PAGE
    r.pte[3] &= ~bit
    assert mach.read(r, 3 * PAGE, PAGE) == b"d" * PAGE


def test_private_page_is_eremote(mach):
    a = mach.add_pool(16)
    g = mach.add_pool(16, flags=lib.CDM_POOL_PRIVATE)
    r = mach.region(4)
    mach.write(r, 0, pattern(5, 4 * PAGE), simple_plan(a))
    s = mach.migrate(r, 1, 1, g)
    assert s["final"] == [lib.CDM_MIG_DONE]
    pte = mach.ptes(r, 1, 1)[0]
    assert pte & lib.CDM_PTE_PRIVATE and pool_of(pte) == g
    assert mach.frame(pfn_of(pte)) == pattern(5, 4 * PAGE)[PAGE:2 * PAGE]
    for write in (0, 1):
        if write:
            rc, _, res = mach.rw(r, 0, b"z" * (3 * PAGE), simple_plan(a))
        else:
            rc, _, res = mach.rw(r, PAGE - 1, 2, simple_plan(a))
        assert rc == -errno.EREMOTE and res.page == 1
    assert mach.read(r, 0, PAGE) == pattern(5, 4 * PAGE)[:PAGE]
    assert mach.read(r, 2 * PAGE, 2 * PAGE) == pattern(5, 4 * PAGE)[2 * PAGE:]


def test_mark_cpu_and_uncache(mach):
    a = mach.add_pool(16)
    b = mach.add_pool(16)
    plan = Plan([a, b], {a: [a], b: [b]})
    r = mach.region(8)
    mach.write(r, 0, b"w" * (2 * PAGE), plan)  # a write(): no CPU mapping
    assert mach.pool(a).nr_mapped == 0 and mach.pool(b).nr_mapped == 0
    assert not any(p & lib.CDM_PTE_CPU for p in mach.ptes(r))
    mach.read(r, 0, 6 * PAGE, plan, mark_cpu=1)  # a CPU fault over pages 0-5
    ptes = mach.ptes(r)
    assert [bool(p & lib.CDM_PTE_CPU) for p in ptes] == [1] * 6 + [0] * 2
    assert (mach.pool(a).nr_mapped, mach.pool(b).nr_mapped) == (3, 3)
    mach.write(r, 7 * PAGE, b"m", plan, mark_cpu=1)  # write-fault marks too
    assert mach.pool(b).nr_mapped == 4
    lib.cdm_region_uncache(mach.m, r, 1, 2)
    ptes = mach.ptes(r)
    assert [bool(p & lib.CDM_PTE_CPU) for p in ptes] == [1, 0, 0, 1, 1, 1, 0, 1]
    assert (mach.pool(a).nr_mapped, mach.pool(b).nr_mapped) == (2, 3)
    lib.cdm_region_uncache(mach.m, r, 0, 1000)  # beyond the end is harmless
    assert (mach.pool(a).nr_mapped, mach.pool(b).nr_mapped) == (0, 0)
    assert not any(p & lib.CDM_PTE_CPU for p in mach.ptes(r))
    # Data and presence are untouched by uncaching.
    assert all(p & lib.CDM_PTE_PRESENT for p in mach.ptes(r, 0, 6))
    assert mach.read(r, 0, 2 * PAGE) == b"w" * (2 * PAGE)
    # Shrinking a mapped page drops its mapped count.
    mach.read(r, 0, 8 * PAGE, plan, mark_cpu=1)
    assert lib.cdm_region_resize(mach.m, r, 5) == 0
    assert (mach.pool(a).nr_mapped, mach.pool(b).nr_mapped) == (3, 2)


# ------------------------------------------------------------ batched copy


def test_copy_frames_with_holes(mach):
    a = mach.add_pool(16)
    b = mach.add_pool(16)
    rc, src = mach.alloc(a, 6)
    rc2, dst = mach.alloc(b, 6)
    assert rc == 0 and rc2 == 0
    for k in range(6):
        mach.fill(src[k], pattern(100 + k, PAGE))
        mach.fill(dst[k], bytes([0xd0 + k]) * PAGE)
    s = list(src)
    d = list(dst)
    s[1] = 0      # hole in the source
    d[3] = 0      # hole in the destination
    lib.cdm_copy_frames(mach.m, ffi.new("uint64_t[]", s), ffi.new("uint64_t[]", d), 6)
    for k in range(6):
        if k in (1, 3):
            assert mach.frame(dst[k]) == bytes([0xd0 + k]) * PAGE
        else:
            assert mach.frame(dst[k]) == pattern(100 + k, PAGE)
        assert mach.frame(src[k]) == pattern(100 + k, PAGE)
    # Copy within a pool, and to frames out of order.
    order = [src[5], src[0]]
    lib.cdm_copy_frames(mach.m, ffi.new("uint64_t[]", [dst[0], dst[5]]),
                        ffi.new("uint64_t[]", order), 2)
    assert mach.frame(src[5]) == pattern(100, PAGE)
    assert mach.frame(src[0]) == pattern(105, PAGE)


# -------------------------------------------------------------- migration


def test_migrate_moves_data_between_pools(mach):
    a = mach.add_pool(32)
    c = mach.add_pool(32)
    g = mach.add_pool(32, flags=lib.CDM_POOL_PRIVATE)
    r = mach.region(12, rid=5)
    data = pattern(6, 12 * PAGE)
    mach.write(r, 0, data, simple_plan(a))
    mach.read(r, 0, 12 * PAGE, mark_cpu=1)
    old = mach.ptes(r)
    s = mach.migrate(r, 2, 8, c)
    assert s["collected"] == 8 and s["collect"] == [lib.CDM_MIG_MOVE] * 8
    assert s["src"] == old[2:10]
    assert s["locked"] == 8 and s["got"] == 8 and s["moved"] == 8
    assert s["final"] == [lib.CDM_MIG_DONE] * 8
    new = mach.ptes(r)
    assert new[:2] == old[:2] and new[10:] == old[10:]
    for i in range(2, 10):
        assert pool_of(new[i]) == c and pfn_of(new[i]) == s["dst"][i - 2]
        assert new[i] & lib.CDM_PTE_PRESENT and new[i] & lib.CDM_PTE_DIRTY
        assert not new[i] & lib.CDM_PTE_CPU  # collect cleared the CPU belief
        assert mach.owner(pfn_of(new[i])) == (0, 5, i)
        assert mach.owner(pfn_of(old[i]))[0] == -errno.ENOENT
    assert (mach.free(a), mach.free(c)) == (32 - 4, 32 - 8)
    assert (r.resident[a], r.resident[c]) == (4, 8)
    assert mach.ctr(a, lib.CDM_PGMIGRATE_SUCCESS) + mach.ctr(c, lib.CDM_PGMIGRATE_SUCCESS) == 8
    assert mach.ctr(a, lib.CDM_PGFREE) == 8
    assert (mach.pool(a).nr_mapped, mach.pool(c).nr_mapped) == (4, 0)
    assert (mach.pool(a).nr_dirty, mach.pool(c).nr_dirty) == (4, 8)
    assert mach.read(r, 0, 12 * PAGE) == data
    assert_no_transient_bits(mach, r)
    assert_accounting(mach, r)
    # Into device-private memory and back.
    s = mach.migrate(r, 0, 12, g)
    assert s["moved"] == 12
    assert all(p & lib.CDM_PTE_PRIVATE and pool_of(p) == g for p in mach.ptes(r))
    for i, p in enumerate(mach.ptes(r)):
        assert mach.frame(pfn_of(p)) == data[i * PAGE:(i + 1) * PAGE]
    assert mach.rw(r, 0, 1)[0] == -errno.EREMOTE
    assert (mach.free(a), mach.free(c), mach.free(g)) == (32, 32, 20)
    s = mach.migrate(r, 0, 12, a)
    assert s["final"] == [lib.CDM_MIG_DONE] * 12
    assert not any(p & lib.CDM_PTE_PRIVATE for p in mach.ptes(r))
    assert mach.read(r, 0, 12 * PAGE) == data
    assert (mach.free(a), mach.free(c), mach.free(g)) == (20, 32, 32)
    assert sum(mach.ctr(i, lib.CDM_PGMIGRATE_SUCCESS) for i in (a, c, g)) == 32
    assert_no_transient_bits(mach, r)
    assert_accounting(mach, r)


def test_migrate_status_codes(mach):
    a = mach.add_pool(32)
    c = mach.add_pool(32)
    r = mach.region(8)
    plan = Plan([a, c], {a: [a], c: [c]})
    # pages 0-5 present: 0 a, 1 c (already there), 2 a pinned, 3 c, 4 a poisoned, 5 c
    data = pattern(7, 6 * PAGE)
    mach.write(r, 0, data, plan)
    r.pte[2] |= lib.CDM_PTE_PINNED
    r.pte[4] |= lib.CDM_PTE_POISONED
    before = mach.ptes(r)
    s = mach.migrate(r, 0, 8, c)
    E = errno
    assert s["collect"] == [lib.CDM_MIG_MOVE, lib.CDM_MIG_THERE, -E.EBUSY, lib.CDM_MIG_THERE,
                            -E.EIO, lib.CDM_MIG_THERE, -E.ENOENT, -E.ENOENT]
    assert s["collected"] == 1 and s["moved"] == 1
    assert s["final"] == [lib.CDM_MIG_DONE, lib.CDM_MIG_THERE, -E.EBUSY, lib.CDM_MIG_THERE,
                          -E.EIO, lib.CDM_MIG_THERE, -E.ENOENT, -E.ENOENT]
    after = mach.ptes(r)
    assert pool_of(after[0]) == c
    assert after[1:] == before[1:]  # skipped pages are exactly as they were
    assert after[2] & lib.CDM_PTE_PINNED and after[4] & lib.CDM_PTE_POISONED
    assert (mach.free(a), mach.free(c)) == (32 - 2, 32 - 4)
    assert mach.ctr(a, lib.CDM_PGMIGRATE_SUCCESS) == 1
    assert_no_transient_bits(mach, r)
    r.pte[4] &= ~lib.CDM_PTE_POISONED
    assert mach.read(r, 0, 6 * PAGE) == data
    # Beyond the end of the region: -EINVAL, nothing written there.
    s = mach.migrate(r, 6, 4, a)
    assert s["final"][2:] == [-E.EINVAL, -E.EINVAL]
    assert lib.cdm_region_resize(mach.m, r, 10) == 0
    assert mach.ptes(r, 8, 2) == [0, 0]
    r.pte[2] &= ~lib.CDM_PTE_PINNED  # set above without its counters: for the final check


def test_migrate_alloc_absent(mach):
    a = mach.add_pool(8)
    g = mach.add_pool(8, flags=lib.CDM_POOL_PRIVATE)
    r = mach.region(4, rid=2)
    mach.write(r, PAGE, b"one", simple_plan(a))
    s = mach.migrate(r, 0, 4, g, alloc_absent=1)
    assert s["collect"] == [lib.CDM_MIG_ALLOC, lib.CDM_MIG_MOVE, lib.CDM_MIG_ALLOC,
                            lib.CDM_MIG_ALLOC]
    assert s["collected"] == 4 and s["locked"] == 4 and s["got"] == 4
    assert s["final"] == [lib.CDM_MIG_DONE] * 4 and s["moved"] == 4
    ptes = mach.ptes(r)
    assert all(p & lib.CDM_PTE_PRESENT and pool_of(p) == g for p in ptes)
    assert [bool(p & lib.CDM_PTE_DIRTY) for p in ptes] == [0, 1, 0, 0]
    for i, p in enumerate(ptes):
        assert mach.owner(pfn_of(p)) == (0, 2, i)
        assert mach.frame(pfn_of(p)) == (b"one" + bytes(PAGE - 3) if i == 1 else bytes(PAGE))
    assert (mach.free(a), mach.free(g)) == (8, 4)
    assert r.resident[g] == 4 and r.resident[a] == 0
    assert mach.ctr(a, lib.CDM_PGMIGRATE_SUCCESS) == 1
    assert_no_transient_bits(mach, r)


def test_migrate_target_fills_up(mach):
    a = mach.add_pool(32)
    c = mach.add_pool(3)
    r = mach.region(6)
    data = pattern(8, 6 * PAGE)
    mach.write(r, 0, data, simple_plan(a))
    before = mach.ptes(r)
    s = mach.migrate(r, 0, 6, c)
    assert s["locked"] == 6 and s["got"] == 3
    assert s["alloc"] == [lib.CDM_MIG_MOVE] * 3 + [-errno.ENOMEM] * 3
    assert s["final"] == [lib.CDM_MIG_DONE] * 3 + [-errno.ENOMEM] * 3
    assert s["moved"] == 3
    after = mach.ptes(r)
    assert all(pool_of(p) == c for p in after[:3])
    assert after[3:] == before[3:]  # stayed, same frames, unlocked
    assert_no_transient_bits(mach, r)
    assert mach.read(r, 0, 6 * PAGE) == data
    assert (mach.free(a), mach.free(c)) == (32 - 3, 0)
    assert mach.ctr(a, lib.CDM_PGMIGRATE_SUCCESS) == 3
    # The three that found no room failed, as migrate_pages() counts them.
    assert mach.ctr(a, lib.CDM_PGMIGRATE_FAIL) == 3
    # An absent page that finds no room is unlocked back to absent, and was
    # never a page to migrate: no failure.
    r2 = mach.region(2)
    s = mach.migrate(r2, 0, 2, c, alloc_absent=1)
    assert s["final"] == [-errno.ENOMEM] * 2
    assert mach.ctr(a, lib.CDM_PGMIGRATE_FAIL) + mach.ctr(c, lib.CDM_PGMIGRATE_FAIL) == 3
    assert mach.ptes(r2) == [0, 0]
    assert mach.read(r2, 0, 2 * PAGE, simple_plan(a)) == bytes(2 * PAGE)


@pytest.mark.parametrize("bad", ["free", "owned", "owned_on_target", "outside", "duplicate",
                                 "other_pool", "wrong_target"])
def test_finalize_rejects_bad_destinations(mach, bad):
    """finalize checks every dst as the other steps check their input: a
    frame of the target pool that the migration holds.  A bad one fails its
    page with -EINVAL, the page stays where it was, unlocked, with its data;
    a held frame of another pool goes back to it; nothing else is freed, and
    the accounting holds (the checker agrees).  copy never writes a bad dst."""
    a = mach.add_pool(16)
    c = mach.add_pool(16)
    r = mach.region(4)
    data = pattern(21, 4 * PAGE)
    mach.write(r, 0, data, simple_plan(a))
    if bad == "owned_on_target":
        assert mach.migrate(r, 3, 1, c)["moved"] == 1
    n = 2
    src = ffi.new("uint64_t[]", n)
    dst = ffi.new("uint64_t[]", n)
    st = ffi.new("int32_t[]", n)
    assert lib.cdm_migrate_collect(mach.m, r, 0, n, c, 0, 0, src, st) == n
    assert lib.cdm_migrate_lock(mach.m, r, 0, n, st) == n
    assert lib.cdm_migrate_alloc(mach.m, c, n, st, dst) == n
    given = dst[0]
    target = c
    if bad == "free":
        dst[0] = mach.pool(c).base_pfn + 10                # never handed out
    elif bad in ("owned", "owned_on_target"):
        dst[0] = pfn_of(mach.ptes(r, 3, 1)[0])             # page 3's frame
    elif bad == "outside":
        dst[0] = 0x7777777                                  # in no pool
    elif bad == "duplicate":
        dst[0] = dst[1]
    elif bad == "other_pool":
        rc, (held,) = mach.alloc(a, 1)                      # held, but not on the target
        assert rc == 0
        dst[0] = held
    else:
        target = a                                          # every dst is on another pool
    owned_before = {pfn_of(p): mach.owner(pfn_of(p)) for p in mach.ptes(r)}
    frame3 = mach.frame(pfn_of(mach.ptes(r, 3, 1)[0]))
    lib.cdm_migrate_copy(mach.m, n, st, src, dst)
    assert mach.frame(pfn_of(mach.ptes(r, 3, 1)[0])) == frame3     # not overwritten
    moved = lib.cdm_migrate_finalize(mach.m, r, 0, n, target, dst, st)
    if bad == "wrong_target":
        assert moved == 0 and list(st) == [-errno.EINVAL] * 2
    else:
        assert moved == 1 and list(st) == [-errno.EINVAL, lib.CDM_MIG_DONE]
    assert pool_of(mach.ptes(r, 0, 1)[0]) == a                  # stayed
    assert_no_transient_bits(mach, r)
    assert mach.check() == ""
    for pfn, owner in owned_before.items():
        if pfn != pfn_of(src[1]) or bad == "wrong_target":
            assert mach.owner(pfn) == owner                     # nobody lost a frame
    if bad != "wrong_target":
        mach.pool_free([given])                                 # the target frame the test replaced
    assert mach.check() == ""
    assert mach.read(r, 0, 4 * PAGE) == data
    assert mach.free(a) + mach.free(c) == 32 - 4                # no frame leaked or lost
    assert_accounting(mach, r)


def test_cpu_touch_between_collect_and_lock(mach):
    a = mach.add_pool(16)
    c = mach.add_pool(16)
    r = mach.region(4)
    data = pattern(9, 4 * PAGE)
    mach.write(r, 0, data, simple_plan(a))
    mach.read(r, 0, 4 * PAGE, mark_cpu=1)
    assert mach.pool(a).nr_mapped == 4

    def refault():
        # collect dropped the CPU belief of every collected page ...
        assert mach.pool(a).nr_mapped == 0
        assert all(p & lib.CDM_PTE_MIGRATING for p in mach.ptes(r))
        # ... and the CPU faults page 2 in again before the lock.
        assert mach.read(r, 2 * PAGE, 10, mark_cpu=1) == data[2 * PAGE:2 * PAGE + 10]

    def locked():
        ptes = mach.ptes(r)
        assert [bool(p & lib.CDM_PTE_LOCKED) for p in ptes] == [1, 1, 0, 1]
        assert not ptes[2] & (lib.CDM_PTE_LOCKED | lib.CDM_PTE_MIGRATING)
        assert mach.rw(r, 0, 1)[0] == -errno.EAGAIN
        assert mach.read(r, 2 * PAGE, 4) == data[2 * PAGE:2 * PAGE + 4]

    s = mach.migrate(r, 0, 4, c, between=refault, after_lock=locked)
    assert all(st & lib.CDM_PTE_CPU for st in s["src"])  # the caller must invalidate
    assert s["lock"] == [lib.CDM_MIG_MOVE, lib.CDM_MIG_MOVE, -errno.EBUSY, lib.CDM_MIG_MOVE]
    assert s["locked"] == 3
    assert s["final"] == [lib.CDM_MIG_DONE, lib.CDM_MIG_DONE, -errno.EBUSY, lib.CDM_MIG_DONE]
    ptes = mach.ptes(r)
    assert [pool_of(p) for p in ptes] == [c, c, a, c]
    assert ptes[2] & lib.CDM_PTE_CPU
    assert mach.pool(a).nr_mapped == 1
    assert_no_transient_bits(mach, r)
    assert mach.read(r, 0, 4 * PAGE) == data
    assert_accounting(mach, r)


def test_write_between_collect_and_lock_is_carried(mach):
    a = mach.add_pool(16)
    c = mach.add_pool(16)
    r = mach.region(3)
    mach.write(r, 0, b"\x01" * (3 * PAGE), simple_plan(a))
    s = mach.migrate(r, 0, 3, c,
                     between=lambda: mach.write(r, PAGE + 5, b"late write"))
    assert s["final"] == [lib.CDM_MIG_DONE] * 3
    assert mach.read(r, PAGE, 20) == b"\x01" * 5 + b"late write" + b"\x01" * 5


def test_first_touch_of_placeholder_during_migration(mach):
    a = mach.add_pool(16)
    g = mach.add_pool(16)
    r = mach.region(3)
    s = mach.migrate(r, 0, 3, g, alloc_absent=1,
                     between=lambda: mach.write(r, PAGE, b"cpu", simple_plan(a)))
    assert s["collect"] == [lib.CDM_MIG_ALLOC] * 3
    assert s["final"] == [lib.CDM_MIG_DONE, -errno.EBUSY, lib.CDM_MIG_DONE]
    ptes = mach.ptes(r)
    assert [pool_of(p) for p in ptes] == [g, a, g]
    assert mach.read(r, PAGE, 3) == b"cpu"
    assert (mach.free(a), mach.free(g)) == (15, 14)
    assert_no_transient_bits(mach, r)
    assert_accounting(mach, r)


def test_overlapping_migrations_do_not_unlock_each_other(mach):
    """A page another migration holds is -EBUSY for the second one, whose
    finalize must leave the first migration's lock alone."""
    a = mach.add_pool(16)
    c = mach.add_pool(16)
    d = mach.add_pool(16)
    r = mach.region(4)
    data = pattern(10, 4 * PAGE)
    mach.write(r, 0, data, simple_plan(a))
    n = 4
    src = ffi.new("uint64_t[]", n)
    dst = ffi.new("uint64_t[]", n)
    st = ffi.new("int32_t[]", n)
    # Migration 1 over pages 0-3 (absent pages none), up to its copy.
    assert lib.cdm_migrate_collect(mach.m, r, 0, n, c, 0, 0, src, st) == 4
    assert lib.cdm_migrate_lock(mach.m, r, 0, n, st) == 4
    assert lib.cdm_migrate_alloc(mach.m, c, n, st, dst) == 4
    # Migration 2 over pages 2-3 and, after page 3, an absent page collected by
    # migration 3 (alloc_absent) that is not locked yet.
    assert lib.cdm_region_resize(mach.m, r, 5) == 0
    src3 = ffi.new("uint64_t[]", 1)
    st3 = ffi.new("int32_t[]", 1)
    assert lib.cdm_migrate_collect(mach.m, r, 4, 1, c, 1, 0, src3, st3) == 1
    s2 = mach.migrate(r, 2, 3, d)
    assert s2["final"] == [-errno.EBUSY] * 3
    ptes = mach.ptes(r)
    assert all(p & lib.CDM_PTE_LOCKED for p in ptes[:4]), [hex(p) for p in ptes]
    assert ptes[4] & lib.CDM_PTE_MIGRATING
    assert mach.rw(r, 2 * PAGE, 1)[0] == -errno.EAGAIN
    # Migration 1 and 3 complete normally.
    lib.cdm_migrate_copy(mach.m, n, st, src, dst)
    assert lib.cdm_migrate_finalize(mach.m, r, 0, n, c, dst, st) == 4
    dst3 = ffi.new("uint64_t[]", 1)
    assert lib.cdm_migrate_lock(mach.m, r, 4, 1, st3) == 1
    assert lib.cdm_migrate_alloc(mach.m, c, 1, st3, dst3) == 1
    lib.cdm_migrate_copy(mach.m, 1, st3, src3, dst3)
    assert lib.cdm_migrate_finalize(mach.m, r, 4, 1, c, dst3, st3) == 1
    assert [pool_of(p) for p in mach.ptes(r)] == [c] * 5
    assert mach.read(r, 0, 5 * PAGE) == data + bytes(PAGE)
    assert (mach.free(a), mach.free(c), mach.free(d)) == (16, 11, 16)
    assert_no_transient_bits(mach, r)


@pytest.mark.parametrize("when", ["before_lock", "after_lock"])
def test_truncate_during_migration(mach, when):
    """Truncation while pages are collected or locked: the dropped pages'
    frames are freed once, the migration gives their targets back."""
    a = mach.add_pool(16)
    c = mach.add_pool(16)
    r = mach.region(6, rid=1)
    data = pattern(11, 6 * PAGE)
    mach.write(r, 0, data, simple_plan(a))

    def shrink():
        assert lib.cdm_region_resize(mach.m, r, 3) == 0
        assert mach.free(a) == 16 - 3

    kw = {"between": shrink} if when == "before_lock" else {"after_lock": shrink}
    s = mach.migrate(r, 0, 6, c, **kw)
    assert s["final"][:3] == [lib.CDM_MIG_DONE] * 3
    assert all(st < 0 for st in s["final"][3:]), s["final"]
    assert s["moved"] == 3
    assert r.npages == 3
    assert (mach.free(a), mach.free(c)) == (16, 13)
    assert (r.resident[a], r.resident[c]) == (0, 3)
    assert mach.read(r, 0, 3 * PAGE) == data[:3 * PAGE]
    # Growing back shows fresh zero pages, and the allocators are sound:
    # every frame can be handed out exactly once.
    assert lib.cdm_region_resize(mach.m, r, 6) == 0
    assert mach.ptes(r, 3, 3) == [0, 0, 0]
    assert mach.read(r, 3 * PAGE, 3 * PAGE, simple_plan(a)) == bytes(3 * PAGE)
    rc, rest = mach.alloc(a, 13)
    assert rc == 0
    used = {pfn_of(p) for p in mach.ptes(r)}
    assert len(used | set(rest)) == 6 + 13
    assert mach.alloc(a, 1)[0] == -errno.ENOMEM
    assert_no_transient_bits(mach, r)
    assert_accounting(mach, r)


def test_copy_beside_other_threads(mach):
    """The copy step holds the machine's lock (frames are written only under
    it), and other threads' accesses to other pages wait for it and then
    succeed (cffi releases the GIL); a large batch copies byte-exactly."""
    a = mach.add_pool(4096)
    c = mach.add_pool(4096)
    r = mach.region(2048 + 1)
    data = pattern(12, 2048 * PAGE)
    plan = simple_plan(a)
    mach.write(r, 0, data, plan)
    n = 2048
    src = ffi.new("uint64_t[]", n)
    dst = ffi.new("uint64_t[]", n)
    st = ffi.new("int32_t[]", n)
    assert lib.cdm_migrate_collect(mach.m, r, 0, n, c, 0, 0, src, st) == n
    assert lib.cdm_migrate_lock(mach.m, r, 0, n, st) == n
    assert lib.cdm_migrate_alloc(mach.m, c, n, st, dst) == n
    errors = []
    t = threading.Thread(target=lambda: lib.cdm_migrate_copy(mach.m, n, st, src, dst))
    t.start()
    try:
        for _ in range(50):
            if mach.rw(r, 2048 * PAGE, b"other", plan)[0] != 0:
                errors.append("rw")
    finally:
        t.join()
    assert not errors
    assert lib.cdm_migrate_finalize(mach.m, r, 0, n, c, dst, st) == n
    assert mach.read(r, 0, 2048 * PAGE) == data
    assert mach.read(r, 2048 * PAGE, 5) == b"other"
    assert r.resident[c] == 2048 and r.resident[a] == 1


# ------------------------------------------------------------ wrapping ranges

U64 = (1 << 64) - 1


def test_ranges_that_wrap_around_2_64_are_refused(mach):
    """Every entry point that takes a range, called with first near 2^64 so
    that first + n wraps around to pages (frames, bytes) that exist: none of
    them may touch those, each refuses or cuts the range as cdmcore.h says,
    and the checker agrees with the accounting after each."""
    a = mach.add_pool(16)
    c = mach.add_pool(16)
    base = mach.pool(a).base_pfn
    r = mach.region(4)
    plan = simple_plan(a)
    data = pattern(51, 4 * PAGE)
    mach.write(r, 0, data, plan)
    mach.read(r, 0, 4 * PAGE, mark_cpu=1)
    ptes = mach.ptes(r)
    res = ffi.new("struct cdm_rw_result *")
    first, n = U64 - 1, 4                       # first + n wraps to 2: pages 0 and 1

    def unchanged():
        assert mach.ptes(r) == ptes
        assert mach.check() == ""

    # Pools and regions.
    assert lib.cdm_pool_add(mach.m, U64, 2, 0) == -errno.EINVAL
    assert lib.cdm_pool_add(mach.m, lib.CDM_PTE_PFN_MASK - 1, 2, 0) == -errno.EINVAL
    r2 = mach.region(4)
    for pages in (U64, (1 << 63) + 1, lib.CDM_REGION_MAX_PAGES + 1):   # 2^63 + 1 never returned
        assert lib.cdm_region_resize(mach.m, r2, pages) == -errno.EINVAL
    assert lib.cdm_region_truncate(mach.m, r2, U64) == -errno.EINVAL
    assert r2.npages == 4
    # Gather/scatter, first touch, pins, device ops.
    buf = ffi.new("uint8_t[]", 2 * PAGE)
    for write in (0, 1):
        assert lib.cdm_region_rw(mach.m, r, U64 - PAGE + 1, 2 * PAGE, buf, write, 1, plan.c, res) \
            == -errno.EINVAL
    assert lib.cdm_region_populate(mach.m, r2, U64, 2, plan.c, res) == -errno.EINVAL
    assert mach.ptes(r2) == [0] * 4
    assert lib.cdm_region_pin(mach.m, r, first, n, 1, 0, res) == -errno.ENOENT
    assert lib.cdm_region_pin(mach.m, r, first, n, 0, 0, res) == 0 and res.allocated == 0
    op = ffi.new("struct cdm_op_result *")
    for kind in (lib.CDM_OP_WRITE, lib.CDM_OP_READ):
        assert lib.cdm_device_op(mach.m, r, first, n, kind, 0xee, 1 << a, 0, op) == -errno.EINVAL
    unchanged()
    # Walks.
    out = ffi.new("uint64_t[]", n)
    lib.cdm_region_ptes(mach.m, r, first, n, out)
    assert list(out) == [0] * n
    assert lib.cdm_region_count(mach.m, r, first, n, lib.CDM_PTE_PRESENT) == 0
    assert lib.cdm_region_next_present(mach.m, r, first, U64) == U64
    rf, rl, nxt = ffi.new("uint64_t[]", 4), ffi.new("uint64_t[]", 4), ffi.new("uint64_t *")
    assert lib.cdm_region_flag_runs(mach.m, r, first, n, lib.CDM_PTE_PRESENT, rf, rl, 4, nxt) == 0
    assert nxt[0] == 4
    mirror = ffi.new("uint8_t[]", 4)
    assert lib.cdm_region_mirror_pool(mach.m, r, first, n, a, mirror, 1) == 0
    assert list(mirror) == [0] * 4
    lib.cdm_region_uncache(mach.m, r, first, n)
    present, dirty = ffi.new("uint64_t[]", MAXP), ffi.new("uint64_t[]", MAXP)
    lib.cdm_region_census(mach.m, r, first, n, present, dirty)
    assert sum(present) == 0 and sum(dirty) == 0
    lib.cdm_region_pagemap(mach.m, r, first, n, out, 1)
    assert list(out) == [0] * n
    table, nruns, rp = ffi.new("int32_t[]", [c]), ffi.new("uint64_t *"), ffi.new("int32_t[]", 4)
    assert lib.cdm_region_misfits(mach.m, r, first, n, table, 1, 0, 0, rf, rl, rp, 4, nruns) == 0
    busy = ffi.new("uint64_t *")
    assert lib.cdm_region_poison_pool(mach.m, r, first, n, a, busy) == 0
    unchanged()
    # Migration steps: a migration of pages 0-1 is in flight (locked, targets
    # held); the same steps at first near 2^64 must not take or unlock them.
    src, dst, st = ffi.new("uint64_t[]", 2), ffi.new("uint64_t[]", 2), ffi.new("int32_t[]", 2)
    assert lib.cdm_migrate_collect(mach.m, r, 0, 2, c, 0, 0, src, st) == 2
    assert lib.cdm_migrate_lock(mach.m, r, 0, 2, st) == 2
    assert lib.cdm_migrate_alloc(mach.m, c, 2, st, dst) == 2
    locked = mach.ptes(r)
    wsrc, wst = ffi.new("uint64_t[]", n), ffi.new("int32_t[]", n)
    assert lib.cdm_migrate_collect(mach.m, r, first, n, c, lib.CDM_COLLECT_TAKEOVER, 0, wsrc, wst) == 0
    assert list(wst) == [-errno.EINVAL] * n
    forged = [lib.CDM_MIG_MOVE] * n
    for lock in (lambda s: lib.cdm_migrate_lock(mach.m, r, first, n, s),
                 lambda s: lib.cdm_migrate_lock_src(mach.m, r, first, n, ffi.new("uint64_t[]", [0, 0] + list(src)), s)):
        s = ffi.new("int32_t[]", forged)
        assert lock(s) == 0 and list(s) == [-errno.ENOENT] * n
    wdst, s = ffi.new("uint64_t[]", n), ffi.new("int32_t[]", forged)
    assert lib.cdm_migrate_alloc(mach.m, c, n, s, wdst) == n
    lib.cdm_migrate_copy(mach.m, n, s, ffi.new("uint64_t[]", [0, 0] + list(src)), wdst)
    assert lib.cdm_migrate_finalize(mach.m, r, first, n, c, wdst, s) == 0
    assert list(s) == [-errno.ENOENT] * n                       # no such pages: targets back
    s = ffi.new("int32_t[]", forged)
    assert lib.cdm_migrate_alloc(mach.m, c, n, s, wdst) == n
    lib.cdm_migrate_abort(mach.m, r, first, n, wdst, s)
    assert list(s) == [-errno.EINTR] * n
    assert mach.ptes(r) == locked and mach.check() == ""
    assert mach.free(c) == 16 - 2                               # only the real migration's targets
    lib.cdm_migrate_copy(mach.m, 2, st, src, dst)
    assert lib.cdm_migrate_finalize(mach.m, r, 0, 2, c, dst, st) == 2
    assert mach.read(r, 0, 4 * PAGE) == data
    ptes = mach.ptes(r)
    # Frames: ranges of PFNs from a pool's frame to past 2^64 are cut at its end.
    census = ffi.new("uint64_t[2]")
    lib.cdm_frames_census(mach.m, base + 1, U64, census)
    want = ffi.new("uint64_t[2]")
    lib.cdm_frames_census(mach.m, base + 1, 15, want)
    assert list(census) == list(want) and census[0] == 2       # pages 2, 3 on a: frames 2, 3
    regs, pages = ffi.new("uint32_t[]", 16), ffi.new("uint64_t[]", 16)
    assert lib.cdm_frames_owners(mach.m, base, U64, regs, pages, 16, nxt) == 2
    assert nxt[0] == U64                                        # done, not pfn + n wrapped
    assert lib.cdm_frame_retire(mach.m, base + 12, 0) == 0
    assert lib.cdm_frames_unretire(mach.m, base + 1, U64) == 1
    unchanged()
    # Memory blocks: a block larger than 2^64 - npages is the whole pool.
    z = mach.add_pool(8, base=0)
    assert lib.cdm_pool_set_blocks(mach.m, z, U64) == 0
    assert mach.pool(z).nblocks == 1
    assert lib.cdm_block_isolate(mach.m, z, U64, 1) == -errno.EINVAL
    assert lib.cdm_block_isolate(mach.m, z, 0, 1) == 0
    assert mach.alloc(z, 1)[0] == -errno.ENOMEM
    assert lib.cdm_block_isolate(mach.m, z, 0, 0) == 8
    assert mach.check() == ""


# ------------------------------------------------------------ FUSE notify


def test_fuse_inval_on_non_fuse_fds():
    rfd, wfd = os.pipe()
    try:
        rc = lib.cdm_fuse_inval(wfd, 1, 0, PAGE)
        assert rc < 0
        os.set_blocking(rfd, False)
        with pytest.raises(BlockingIOError):
            os.read(rfd, 64)  # nothing was written into the pipe
        assert lib.cdm_fuse_inval(rfd, 1, 0, PAGE) < 0
    finally:
        os.close(rfd)
        os.close(wfd)
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        assert lib.cdm_fuse_inval(fd, 1, 0, -1) < 0
    finally:
        os.close(fd)
    assert lib.cdm_fuse_inval(fd, 1, 0, PAGE) == -errno.EBADF  # closed
    assert lib.cdm_fuse_inval(-1, 1, 0, PAGE) == -errno.EBADF


def test_fuse_inval_reaches_the_fuse_device():
    """On /dev/fuse itself the message is written: an unmounted session
    refuses it with the kernel's own error, not the core's -EINVAL."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        pytest.skip(f"/dev/fuse: {e.strerror}")
    try:
        rc = lib.cdm_fuse_inval(fd, 1, 0, PAGE)
        assert rc < 0 and rc != -errno.EINVAL
    finally:
        os.close(fd)


def test_migrate_runs_finds_cpu_mapped_runs_of_collected_pages():
    cpu = lib.CDM_PTE_CPU
    src = ffi.new("uint64_t[]", [cpu, cpu, 0, cpu, cpu, cpu, cpu, 0, cpu])
    status = ffi.new("int32_t[]", [lib.CDM_MIG_MOVE, lib.CDM_MIG_ALLOC, lib.CDM_MIG_MOVE,
                                   lib.CDM_MIG_MOVE, -16, lib.CDM_MIG_THERE, lib.CDM_MIG_MOVE,
                                   lib.CDM_MIG_MOVE, lib.CDM_MIG_MOVE])
    start = ffi.new("uint64_t[]", 5)
    length = ffi.new("uint64_t[]", 5)
    n = lib.cdm_migrate_runs(src, status, 9, cpu, start, length)
    # Skipped (-EBUSY) and already-there pages break runs; unmapped pages are not runs.
    assert [(start[i], length[i]) for i in range(n)] == [(0, 2), (3, 1), (6, 1), (8, 1)]


def test_crc32_equals_zlib_at_every_length_and_across_calls():
    import zlib
    rng = random.Random(5)
    for n in (0, 1, 3, 7, 8, 9, 15, 16, 4095, 4096, 4097, 65537):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert lib.cdm_crc32(0, data, n) == zlib.crc32(data), n
        cut = n // 3
        part = lib.cdm_crc32(0, data[:cut], cut)
        assert lib.cdm_crc32(part, data[cut:], n - cut) == zlib.crc32(data), n


def test_crc32_pages_is_zlib_of_the_pages_in_their_order():
    """cdm_crc32_pages reads pages in address order but checksums them in the
    order given: ascending, descending, shuffled, repeated, and past one sort
    chunk (65536 pages)."""
    import zlib
    rng = random.Random(7)
    npages = 64
    mem = ffi.new("uint8_t[]", (npages + 1) * PAGE)
    base = ffi.cast("uintptr_t", mem)
    base = (int(base) + PAGE - 1) // PAGE * PAGE                 # page aligned
    data = rng.randbytes(npages * PAGE)
    ffi.memmove(ffi.cast("uint8_t *", base), data, len(data))
    page = [data[k * PAGE:(k + 1) * PAGE] for k in range(npages)]

    def check(order, start=0):
        ptrs = ffi.new("uint8_t *[]", [ffi.cast("uint8_t *", base + k * PAGE) for k in order])
        want = start
        for k in order:
            want = zlib.crc32(page[k], want)
        assert lib.cdm_crc32_pages(start, ptrs, len(order)) == want, order[:8]

    shuffled = list(range(npages))
    rng.shuffle(shuffled)
    for order in ([], [5], list(range(npages)), list(range(npages))[::2], list(range(npages))[::-1],
                  shuffled, [3, 3, 1, 1, 2], list(range(10)) + [0]):
        check(order)
        check(order, start=zlib.crc32(b"before"))
    check([rng.randrange(npages) for _ in range(65536 + 100)])             # two chunks
    check(list(range(npages)) * 1025 + list(range(npages))[::-1])          # repeats across chunks


def test_device_read_crc_is_zlib_whatever_the_frame_order(mach):
    """Runs of pages on ascending, descending and scattered frames, read whole
    and from every start: the device's CRC is zlib's of the bytes in page order."""
    import zlib
    n = 48
    src = mach.add_pool(n)
    dev = mach.add_pool(n)
    r = mach.region(n)
    data = random.Random(11).randbytes(n * PAGE)
    mach.write(r, 0, data, simple_plan(src))
    # Fresh frames come off the bump pointer in order, so the order pages move
    # in is the order of their frames.
    order = list(range(19, 9, -1)) + list(range(10)) + list(range(47, 39, -1))
    rest = list(range(20, 40))
    random.Random(3).shuffle(rest)
    order += rest
    for i in order:
        assert mach.migrate(r, i, 1, dev)["moved"] == 1
    pfns = [pfn_of(pte) for pte in mach.ptes(r)]
    assert all(pfns[i + 1] == pfns[i] - 1 for i in range(10, 19))       # descending run
    assert all(pfns[i + 1] == pfns[i] - 1 for i in range(40, 47))
    res = ffi.new("struct cdm_op_result *")
    for first in range(n):
        for count in {1, 2, 3, 9, n - first}:
            if first + count > n:
                continue
            res.crc = 0         # a fresh read, not the continuation of the last one
            rc = lib.cdm_device_op(mach.m, r, first, count, lib.CDM_OP_READ, 0, 1 << dev, 0, res)
            assert rc == 0
            want = zlib.crc32(data[first * PAGE:(first + count) * PAGE])
            assert res.crc == want, (first, count)
            assert res.local_bytes == count * PAGE


def test_device_read_crc_across_sort_chunks(mach):
    """A read of more pages than the core sorts at once (65536) on frames out
    of order: still zlib's CRC of the bytes.  The pages are populated, not
    written, so the frames cost no host memory but a few."""
    import zlib
    n = 65536 + 100
    half = n // 2
    p = mach.add_pool(n)
    r = mach.region(n)
    plan = simple_plan(p)
    res = ffi.new("struct cdm_rw_result *")
    # The second half first: the first half lands on the higher frames.
    assert lib.cdm_region_populate(mach.m, r, half, n - half, plan.c, res) == 0
    assert lib.cdm_region_populate(mach.m, r, 0, half, plan.c, res) == 0
    pfns = [pfn_of(pte) for pte in mach.ptes(r, 0, 2)] + [pfn_of(pte) for pte in mach.ptes(r, half, 1)]
    assert pfns[1] == pfns[0] + 1 and pfns[2] < pfns[0]
    marks = {0: b"a", half - 1: b"b", half: b"c", 65535: b"d", 65536: b"e", n - 1: b"f"}
    for page, mark in marks.items():
        mach.write(r, page * PAGE + 7, mark * 100)
    zero = bytes(PAGE)
    want = 0
    for page in range(n):
        data = zero
        if page in marks:
            data = bytes(7) + marks[page] * 100 + bytes(PAGE - 107)
        want = zlib.crc32(data, want)
    out = ffi.new("struct cdm_op_result *")
    assert lib.cdm_device_op(mach.m, r, 0, n, lib.CDM_OP_READ, 0, 1 << p, 0, out) == 0
    assert out.crc == want


def test_duplicated_pages_leave_writes_to_python(mach):
    """Read duplication (issue 15): cdm_region_duplicate copies pages to
    frames the caller holds and marks them CDM_PTE_DUPLICATED in one hold of
    the mutex; cdm_region_serve still serves a READ of such a page but leaves
    a WRITE to Python (which collapses the duplicates first), changing
    nothing; cdm_region_collapse clears the mark; a migration's new entry
    never carries it; private, absent and poisoned pages are not duplicated."""
    a, d, g = mach.add_pool(8), mach.add_pool(8), mach.add_pool(8, flags=lib.CDM_POOL_PRIVATE)
    r = mach.region(8)
    plan = simple_plan(a)
    assert lib.cdm_machine_set_plan(mach.m, 0, plan.c) == 0
    assert lib.cdm_region_set_policies(mach.m, r, 0, 0, ffi.NULL, ffi.NULL, ffi.NULL) == 0
    data = pattern(11, 4 * PAGE)
    mach.write(r, 0, data, plan)
    assert mach.migrate(r, 3, 1, g)["moved"] == 1          # page 3 private, 4-7 absent
    rc, frames = mach.alloc(d, 5)
    assert rc == 0
    dst = ffi.new("uint64_t[]", frames)
    done = ffi.new("uint8_t[]", 5)
    assert lib.cdm_region_duplicate(mach.m, r, 0, 5, dst, done) == 3
    assert list(done) == [1, 1, 1, 0, 0]
    for k in range(3):
        assert mach.frame(frames[k]) == data[k * PAGE:(k + 1) * PAGE]
    ptes = mach.ptes(r)
    assert [bool(p & lib.CDM_PTE_DUPLICATED) for p in ptes] == [True] * 3 + [False] * 5
    assert lib.cdm_region_count(mach.m, r, 0, 8, lib.CDM_PTE_DUPLICATED) == 3
    stats = ffi.new("struct cdm_region_stats *")
    lib.cdm_region_snapshot(mach.m, r, stats)
    assert stats.nr_duplicated == 3 and mach.check() == ""
    # READ served; a WRITE touching a duplicated page is Python's, nothing changed.
    assert serve(mach, r, 0, PAGE, a) == (PAGE, data[:PAGE])
    before = mach.ptes(r), r.served_writes
    assert serve(mach, r, PAGE, 2 * PAGE, a, b"w" * 2 * PAGE)[0] == -errno.EAGAIN
    assert (mach.ptes(r), r.served_writes) == before
    assert mach.read(r, PAGE, PAGE) == data[PAGE:2 * PAGE]
    # Collapse: the mark goes, the WRITE is the router's again.
    assert lib.cdm_region_collapse(mach.m, r, 1, 1) == 1
    assert serve(mach, r, PAGE, PAGE, a, b"w" * PAGE)[0] == PAGE
    assert serve(mach, r, 2 * PAGE, PAGE, a, b"w" * PAGE)[0] == -errno.EAGAIN
    # A migration's new entry has no mark.
    assert mach.migrate(r, 2, 1, d)["moved"] == 1
    assert not mach.ptes(r)[2] & lib.CDM_PTE_DUPLICATED
    assert lib.cdm_region_collapse(mach.m, r, 0, 8) == 1     # page 0's
    assert lib.cdm_region_count(mach.m, r, 0, 8, lib.CDM_PTE_DUPLICATED) == 0
    lib.cdm_region_snapshot(mach.m, r, stats)
    assert stats.nr_duplicated == 0
    # A dst that is not a held frame is refused.
    bad = ffi.new("uint64_t[]", [mach.ptes(r)[0] & lib.CDM_PTE_PFN_MASK])
    one = ffi.new("uint8_t[]", 1)
    assert lib.cdm_region_duplicate(mach.m, r, 0, 1, bad, one) == 0 and one[0] == 0
    mach.pool_free(frames)
    assert mach.check() == ""
