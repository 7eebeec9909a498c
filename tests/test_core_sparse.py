"""Unit tests of the native core's populated index (native/pagetable.c).

A region's page table is reserved for the whole file, up to 2^34 entries
(64 TiB), and mostly never written.  Every walk over a range must cost time
and host memory by the pages present, not by the range: these tests drive the
walks over a 64 TiB region holding three pages and check their answers, and
that they neither fault in nor map the untouched table (a walk that read it
would take 2^25 page faults, and the process's VmPTE would grow by 256 MiB).
Also: the index follows pages that come and go, the migration hole runs, and
device reads cut into calls.
"""
import errno
import mmap
import random
import resource
import struct
import zlib

import pytest

from cdmfs._core import ffi, lib
from test_core import Machine, proc_status_kib
from test_core import Plan as CorePlan

PAGE = lib.CDM_PAGE_SIZE
MAXP = lib.CDM_MAX_POOLS
CHUNK = lib.CDM_CHUNK_PAGES
TIB64 = 2 ** 34                     # pages of a 64 TiB region
MAP_NORESERVE = 0x4000              # Linux; not exported by Python 3.11's mmap


def vm_pte_kib() -> int:
    return proc_status_kib("VmPTE")


def minor_faults() -> int:
    """Page faults this process took without I/O: one for every page of a
    page table a walk touches for the first time (the untouched parts of the
    table read as the zero page: 2^25 faults for the table of 64 TiB, 2^16
    with huge zero pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


WALK_FAULTS = 1024          # page faults all the walks of three pages may take (they take ~20)


def pfn_of(pte):
    return pte & lib.CDM_PTE_PFN_MASK


def pool_of(pte):
    return (pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT


def one_pool_plan(pool):
    """A struct cdm_plan placing every page in one pool."""
    return CorePlan([pool], {pool: [pool]}, local=pool)


class Core(Machine):
    """test_core's machine, with the page-number helpers these tests use."""

    def free_region(self, r):
        self.regions.remove(r)
        lib.cdm_region_free(self.m, r)

    def write_page(self, r, page, data, pool):
        Machine.write(self, r, page * PAGE, data, one_pool_plan(pool))

    def populate(self, r, first, n, pool):
        plan = one_pool_plan(pool)
        res = ffi.new("struct cdm_rw_result *")
        rc = lib.cdm_region_populate(self.m, r, first, n, plan.c, res)
        assert rc == 0, (rc, res.page)

    def next_present(self, r, first, end):
        return lib.cdm_region_next_present(self.m, r, first, end)

    def flag_runs(self, r, first, n, flag, max_runs=16):
        rf = ffi.new("uint64_t[]", max(max_runs, 1))
        rl = ffi.new("uint64_t[]", max(max_runs, 1))
        nxt = ffi.new("uint64_t *")
        k = lib.cdm_region_flag_runs(self.m, r, first, n, flag, rf, rl, max_runs, nxt)
        return [(rf[i], rl[i]) for i in range(k)], nxt[0]

    def count(self, r, first, n, flag):
        return lib.cdm_region_count(self.m, r, first, n, flag)

    def census(self, r, first, n):
        present = ffi.new("uint64_t[]", MAXP)
        dirty = ffi.new("uint64_t[]", MAXP)
        lib.cdm_region_census(self.m, r, first, n, present, dirty)
        return list(present), list(dirty)

    def pagemap(self, r, first, n, show_pfn=1):
        out = ffi.new("uint64_t[]", max(n, 1))
        ffi.memmove(out, b"\xff" * (8 * n), 8 * n)   # every entry must be written
        lib.cdm_region_pagemap(self.m, r, first, n, out, show_pfn)
        return bytes(ffi.buffer(out, 8 * n))

    def pin(self, r, first, n, pin):
        res = ffi.new("struct cdm_rw_result *")
        rc = lib.cdm_region_pin(self.m, r, first, n, pin, 0, res)
        return rc, res.allocated

    def free_stack(self, pool):
        p = self.pool(pool)
        return [p.free_stack[k] for k in range(p.nfree_stack)]


@pytest.fixture
def core():
    c = Core()
    yield c
    c.close()


def chunk_marked(r, page):
    c = page // CHUNK
    return bool(r.chunks[c // 64] >> (c % 64) & 1)


def assert_index_exact_over(r, first, end, present_pages):
    """Chunk marks of [first, end) are set exactly for the chunks holding
    present_pages (no stale ones left), and the summary agrees with them."""
    for c in range(first // CHUNK, (end + CHUNK - 1) // CHUNK):
        want = any(c * CHUNK <= p < (c + 1) * CHUNK for p in present_pages)
        assert chunk_marked(r, c * CHUNK) == want, c
    for w in range(first // CHUNK // 64, (end + 64 * CHUNK - 1) // (64 * CHUNK)):
        assert bool(r.summary[w // 64] >> (w % 64) & 1) == (r.chunks[w] != 0), w


def pagemap_entry(pte, show_pfn=True):
    """The pagemap entry of a page table entry, as the kernel's
    pte_to_pagemap_entry() writes it for an anonymous page mapped once: no
    PM_FILE; device-private and poisoned pages are pfn swap entries,
    swp_type | PFN << MAX_SWAPFILES_SHIFT."""
    shift = lib.CDM_MAX_SWAPFILES_SHIFT
    if pte & lib.CDM_PTE_POISONED:
        frame, flags = lib.CDM_SWP_HWPOISON | pfn_of(pte) << shift, lib.CDM_PM_SWAP
    elif pte & lib.CDM_PTE_PRIVATE:
        frame, flags = lib.CDM_SWP_DEVICE_WRITE | pfn_of(pte) << shift, lib.CDM_PM_SWAP
    else:
        frame, flags = pfn_of(pte), lib.CDM_PM_PRESENT | lib.CDM_PM_MMAP_EXCLUSIVE
    return (frame if show_pfn else 0) | flags


def expected_pagemap(first, n, entries):
    """pagemap bytes of [first, first + n): entries {page: pte}, zeros elsewhere."""
    return b"".join(struct.pack("<Q", pagemap_entry(entries[i]) if i in entries else 0)
                    for i in range(first, first + n))


def test_pagemap_constants_are_the_kernels():
    """fs/proc/task_mmu.c's PM_* bits, and include/linux/swap.h's swap types
    with DEVICE_PRIVATE, MIGRATION, MEMORY_FAILURE and PTE markers (v6.15 on):
    MAX_SWAPFILES = 32 - 3 - 3 - 1 - 1."""
    assert lib.CDM_PM_PFN_MASK == (1 << 55) - 1
    assert (lib.CDM_PM_MMAP_EXCLUSIVE, lib.CDM_PM_FILE) == (1 << 56, 1 << 61)
    assert (lib.CDM_PM_SWAP, lib.CDM_PM_PRESENT) == (1 << 62, 1 << 63)
    assert (lib.CDM_MAX_SWAPFILES_SHIFT, lib.CDM_MAX_SWAPFILES) == (5, 24)
    assert (lib.CDM_SWP_HWPOISON, lib.CDM_SWP_DEVICE_WRITE) == (24, 28)


def test_pagemap_of_each_kind_of_page(core):
    """Present, device-private, poisoned and untouched pages, with and
    without show_pfn, bit for bit."""
    a = core.add_pool(16)
    g = core.add_pool(16, flags=lib.CDM_POOL_PRIVATE)
    r = core.region(8)
    core.write(r, 0, b"p" * (3 * PAGE), one_pool_plan(a))
    assert core.migrate(r, 1, 1, g)["final"] == [lib.CDM_MIG_DONE]
    pte = core.ptes(r, 0, 3)
    assert lib.cdm_page_poison(core.m, r, 2, pfn_of(pte[2])) == 0
    pfn = [pfn_of(p) for p in pte]
    assert all(pfn) and len(set(pfn)) == 3
    want = [(1 << 63) | (1 << 56) | pfn[0],                      # present, exclusive
            (1 << 62) | pfn[1] << 5 | 28,                         # SWP_DEVICE_WRITE
            (1 << 62) | pfn[2] << 5 | 24] + [0] * 5               # SWP_HWPOISON; untouched
    assert core.pagemap(r, 0, 8) == struct.pack("<8Q", *want)
    hidden = [e & ~((1 << 55) - 1) for e in want]                 # flags only
    assert hidden[:3] == [(1 << 63) | (1 << 56), 1 << 62, 1 << 62]
    assert core.pagemap(r, 0, 8, show_pfn=0) == struct.pack("<8Q", *hidden)
    assert [pagemap_entry(p) for p in core.ptes(r, 0, 3)] == want[:3]


# ------------------------------------------------------------- 64 TiB region


def test_walks_of_a_64tib_region_cost_by_the_pages_present(core):
    """Three pages in a 64 TiB region: every walk answers exactly, and all of
    them together fault in fewer than WALK_FAULTS pages and map under 4 MiB
    of host page tables (the walks that read every entry took 2^25 faults and
    256 MiB each); so does freeing the region."""
    a = core.add_pool(1024)
    b = core.add_pool(1024)
    r = core.region(TIB64)
    assert r.npages == TIB64 and r.cap == TIB64
    mid = TIB64 // 2 + 12345                   # 57 pages into its chunk
    first_page, last_page = 0, TIB64 - 1
    pages = (first_page, mid, last_page)
    data = {p: bytes([k + 1]) * PAGE for k, p in enumerate(pages)}
    core.write_page(r, first_page, data[first_page], a)
    core.write_page(r, mid, data[mid], b)
    core.write_page(r, last_page, data[last_page], a)
    pte = {p: core.ptes(r, p, 1)[0] for p in pages}
    assert all(pte[p] & lib.CDM_PTE_PRESENT for p in pages)
    assert [pool_of(pte[p]) for p in pages] == [a, b, a]
    mirror_map = mmap.mmap(-1, TIB64, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    mirror = ffi.from_buffer(mirror_map)

    pte_before = vm_pte_kib()
    faults_before = minor_faults()

    # census
    present, dirty = core.census(r, 0, TIB64)
    assert (present[a], present[b], sum(present)) == (2, 1, 3)
    assert (dirty[a], dirty[b], sum(dirty)) == (2, 1, 3)
    present, _ = core.census(r, 1, TIB64 - 2)       # starting and ending inside chunks
    assert (present[a], present[b]) == (0, 1)

    # pagemap: slices around each page, across chunk edges and past the end
    for first, n in ((0, 600), (mid - 100, 200), (mid - 57, 1), (TIB64 - 520, 530),
                     (TIB64 // 4, 4096)):
        want = expected_pagemap(first, n, {p: pte[p] for p in pages})
        assert core.pagemap(r, first, n) == want, (first, n)
    assert core.ptes(r, TIB64 - 3, 5) == [0, 0, pte[last_page], 0, 0]
    assert core.ptes(r, mid - 1, 3) == [0, pte[mid], 0]

    # misfits: a policy that wants everything on a
    table = ffi.new("int32_t[]", [a])
    rf = ffi.new("uint64_t[]", 4)
    rl = ffi.new("uint64_t[]", 4)
    rp = ffi.new("int32_t[]", 4)
    nruns = ffi.new("uint64_t *")
    count = lib.cdm_region_misfits(core.m, r, 0, TIB64, table, 1, 0, 0, rf, rl, rp, 4, nruns)
    assert count == 1 and nruns[0] == 1 and (rf[0], rl[0], rp[0]) == (mid, 1, a)
    count = lib.cdm_region_misfits(core.m, r, 0, TIB64, table, 1, 0, 1 << b, rf, rl, rp, 4, nruns)
    assert count == 0 and nruns[0] == 0

    # count
    assert core.count(r, 0, TIB64, lib.CDM_PTE_PRESENT) == 3
    assert core.count(r, 0, TIB64, lib.CDM_PTE_DIRTY) == 3
    assert core.count(r, 0, TIB64, lib.CDM_PTE_CPU) == 0
    assert core.count(r, 1, TIB64, lib.CDM_PTE_PRESENT) == 2   # n past the end is clipped

    # next_present
    far = 2 ** 40
    assert core.next_present(r, 0, TIB64) == 0
    assert core.next_present(r, 1, TIB64) == mid
    assert core.next_present(r, 1, far) == mid
    assert core.next_present(r, mid, TIB64) == mid
    assert core.next_present(r, mid + 1, TIB64) == last_page
    assert core.next_present(r, 1, mid) == mid                 # none in [1, mid): end
    assert core.next_present(r, mid + 1, last_page) == last_page  # none: end
    assert core.next_present(r, last_page + 1, far) == far      # past the end: end
    assert core.next_present(r, 5, 5) == 5

    # pins and flag_runs
    assert core.pin(r, mid, 1, 1) == (0, 1)
    assert core.pin(r, last_page, 1, 1) == (0, 1)
    assert core.pool(a).nr_pinned == 1 and core.pool(b).nr_pinned == 1 and r.nr_pinned == 2
    assert core.flag_runs(r, 0, TIB64, lib.CDM_PTE_PINNED) == ([(mid, 1), (last_page, 1)], TIB64)
    assert core.flag_runs(r, 0, TIB64, lib.CDM_PTE_PRESENT) == (
        [(0, 1), (mid, 1), (last_page, 1)], TIB64)
    runs, nxt = core.flag_runs(r, 0, TIB64, lib.CDM_PTE_PINNED, max_runs=1)
    assert (runs, nxt) == ([(mid, 1)], last_page)
    assert core.flag_runs(r, nxt, TIB64 - nxt, lib.CDM_PTE_PINNED, max_runs=1) == (
        [(last_page, 1)], TIB64)
    assert core.flag_runs(r, 0, far, lib.CDM_PTE_PINNED, max_runs=0) == ([], mid)
    assert core.flag_runs(r, 1, mid - 1, lib.CDM_PTE_PRESENT) == ([], mid)
    assert core.pin(r, 0, TIB64, 0) == (0, 2)                   # the unpin walk
    assert core.pool(a).nr_pinned == 0 and core.pool(b).nr_pinned == 0 and r.nr_pinned == 0
    assert core.count(r, 0, TIB64, lib.CDM_PTE_PINNED) == 0

    # mirror_pool: entries only where the pool's pages are
    assert lib.cdm_region_mirror_pool(core.m, r, 0, TIB64, a, mirror, 7) == 2
    assert lib.cdm_region_mirror_pool(core.m, r, 0, TIB64, b, mirror, 9) == 1
    assert (mirror_map[0], mirror_map[mid], mirror_map[last_page]) == (7, 9, 7)
    assert mirror_map[1] == 0 and mirror_map[mid + 1] == 0 and mirror_map[last_page - 1] == 0

    # poison_pool: the link to b is lost
    busy = ffi.new("uint64_t *")
    assert lib.cdm_region_poison_pool(core.m, r, 0, TIB64, b, busy) == 1 and busy[0] == 0
    assert lib.cdm_region_poison_pool(core.m, r, 0, TIB64, b, busy) == 0
    poisoned = core.ptes(r, mid, 1)[0]
    assert poisoned & lib.CDM_PTE_POISONED and not poisoned & lib.CDM_PTE_PRESENT
    assert pfn_of(poisoned) == pfn_of(pte[mid])
    assert r.nr_poisoned == 1 and r.resident[b] == 0
    assert core.pool(b).nr_used == 0 and core.pool(b).nr_retired == 1
    present, _ = core.census(r, 0, TIB64)
    assert (present[a], present[b]) == (2, 0)
    assert core.pagemap(r, mid, 1) == struct.pack("<Q", (24 | pfn_of(pte[mid]) << 5)
                                                  | lib.CDM_PM_SWAP)     # SWP_HWPOISON
    assert core.next_present(r, 1, TIB64) == mid                # a poisoned entry counts

    # shrink past the last page: exactly it is freed, and it was the last one freed
    used, pgfree = core.pool(a).nr_used, core.pool(a).counters[lib.CDM_PGFREE]
    assert lib.cdm_region_resize(core.m, r, TIB64 - 1) == 0
    assert r.npages == TIB64 - 1
    assert core.pool(a).nr_used == used - 1
    assert core.pool(a).counters[lib.CDM_PGFREE] == pgfree + 1
    assert r.resident[a] == 1
    assert core.free_stack(a)[-1] == pfn_of(pte[last_page]) - core.pool(a).base_pfn
    assert not chunk_marked(r, last_page)
    assert core.next_present(r, mid + 1, far) == far
    assert core.ptes(r, 0, 1) == [pte[0]]

    faults = minor_faults() - faults_before
    grown = vm_pte_kib() - pte_before
    print(f"\n64 TiB region, three pages: walks took {faults} page faults, VmPTE grew {grown} KiB")
    assert faults < WALK_FAULTS, f"the walks took {faults} page faults: they read the untouched table"
    assert grown < 4 * 1024, f"VmPTE grew by {grown} KiB"

    # free of the whole region (its table is unmapped after: VmPTE cannot tell)
    faults_before = minor_faults()
    core.free_region(r)
    faults = minor_faults() - faults_before
    assert faults < WALK_FAULTS, f"freeing took {faults} page faults: it read the untouched table"
    assert core.pool(a).nr_used == 0 and lib.cdm_pool_free_pages(core.m, a) == 1024
    assert core.pool(b).nr_used == 0 and lib.cdm_pool_free_pages(core.m, b) == 1024 - 1
    assert vm_pte_kib() - pte_before < 4 * 1024
    del mirror
    mirror_map.close()


def test_index_survives_growth_by_steps(core):
    """The index is grown with the page table (mremap): marks made at a small
    size are still there at 64 TiB, and new ones work at every size."""
    a = core.add_pool(64)
    r = core.region(1)
    core.populate(r, 0, 1, a)
    marks = [0]
    size = 1
    while size < TIB64:
        size = min(size * 32, TIB64)
        assert lib.cdm_region_resize(core.m, r, size) == 0
        core.populate(r, size - 1, 1, a)
        marks.append(size - 1)
        assert r.cap >= size
    assert core.count(r, 0, TIB64, lib.CDM_PTE_PRESENT) == len(marks)
    found, pos = [], 0
    while (pos := core.next_present(r, pos, TIB64)) < TIB64:
        found.append(pos)
        pos += 1
    assert found == marks


# --------------------------------------------------------- the index itself


def test_chunk_freed_by_a_shrink_is_skipped(core):
    a = core.add_pool(64)
    r = core.region(64 * CHUNK + 10)
    core.populate(r, 5, 1, a)
    core.populate(r, CHUNK + 188, 1, a)            # alone in chunk 1
    core.populate(r, 64 * CHUNK + 3, 1, a)         # alone in chunk 64: summary word 1
    assert chunk_marked(r, CHUNK) and chunk_marked(r, 64 * CHUNK)
    assert r.summary[0] == 0b11
    # Shrinking into chunk 1 frees its page: the chunk is found empty at once.
    assert lib.cdm_region_resize(core.m, r, CHUNK + 100) == 0
    assert core.pool(a).nr_used == 1
    assert_index_exact_over(r, 0, r.cap, [5])
    assert core.next_present(r, 6, CHUNK + 100) == CHUNK + 100
    # Grown again, the old pages are gone and stay unmarked.
    assert lib.cdm_region_resize(core.m, r, 64 * CHUNK + 10) == 0
    assert core.next_present(r, 6, r.npages) == r.npages
    assert core.ptes(r, CHUNK + 188, 1) == [0]
    # A chunk the new end cuts keeps its mark for the pages it still holds.
    core.populate(r, 2 * CHUNK, 1, a)
    core.populate(r, 2 * CHUNK + 1, 1, a)
    assert lib.cdm_region_resize(core.m, r, 2 * CHUNK + 1) == 0
    assert_index_exact_over(r, 0, r.cap, [5, 2 * CHUNK])
    assert core.next_present(r, 6, r.npages) == 2 * CHUNK


def test_stale_mark_is_cleared_by_a_walk(core):
    """A migration's placeholder marks its chunk; an abort zeroes it in place.
    The mark is then stale: walks still answer right, and the first walk
    over the whole chunk clears it."""
    a = core.add_pool(64)
    r = core.region(8 * CHUNK)
    core.populate(r, 3, 1, a)
    page = 5 * CHUNK + 17
    src = ffi.new("uint64_t[]", 1)
    st = ffi.new("int32_t[]", 1)
    assert lib.cdm_migrate_collect(core.m, r, page, 1, a, lib.CDM_COLLECT_ALLOC_ABSENT, 0,
                                   src, st) == 1
    assert st[0] == lib.CDM_MIG_ALLOC
    assert core.next_present(r, 4, r.npages) == page          # the placeholder counts
    assert core.flag_runs(r, 0, r.npages, lib.CDM_PTE_MIGRATING) == ([(page, 1)], r.npages)
    lib.cdm_migrate_abort(core.m, r, page, 1, ffi.NULL, st)
    assert st[0] == -errno.EINTR and core.ptes(r, page, 1) == [0]
    assert chunk_marked(r, page)                               # stale
    # A walk over part of the chunk leaves the mark; over all of it clears it.
    assert core.count(r, 5 * CHUNK + 1, CHUNK, lib.CDM_PTE_PRESENT) == 0
    assert chunk_marked(r, page)
    assert core.next_present(r, 4, r.npages) == r.npages
    assert_index_exact_over(r, 0, r.cap, [3])


@pytest.mark.parametrize("walk", ["census", "pagemap", "count", "misfits", "mirror", "poison",
                                  "unpin", "uncache", "flag_runs"])
def test_every_walk_clears_stale_marks(core, walk):
    a = core.add_pool(64)
    r = core.region(4 * CHUNK)
    core.populate(r, 2 * CHUNK + 9, 1, a)
    assert lib.cdm_region_resize(core.m, r, 2 * CHUNK) == 0    # chunk 2 wholly gone
    assert_index_exact_over(r, 0, r.cap, [])
    assert lib.cdm_region_resize(core.m, r, 4 * CHUNK) == 0
    page = CHUNK + 40
    src = ffi.new("uint64_t[]", 1)
    st = ffi.new("int32_t[]", 1)
    lib.cdm_migrate_collect(core.m, r, page, 1, a, lib.CDM_COLLECT_ALLOC_ABSENT, 0, src, st)
    lib.cdm_migrate_abort(core.m, r, page, 1, ffi.NULL, st)
    assert chunk_marked(r, page)
    n = r.npages
    if walk == "census":
        core.census(r, 0, n)
    elif walk == "pagemap":
        assert core.pagemap(r, 0, n) == bytes(8 * n)
    elif walk == "count":
        core.count(r, 0, n, lib.CDM_PTE_PRESENT)
    elif walk == "misfits":
        table = ffi.new("int32_t[]", [a])
        out = [ffi.new("uint64_t[]", 1), ffi.new("uint64_t[]", 1), ffi.new("int32_t[]", 1)]
        lib.cdm_region_misfits(core.m, r, 0, n, table, 1, 0, 0, *out, 1, ffi.new("uint64_t *"))
    elif walk == "mirror":
        lib.cdm_region_mirror_pool(core.m, r, 0, n, a, ffi.new("uint8_t[]", n), 1)
    elif walk == "poison":
        lib.cdm_region_poison_pool(core.m, r, 0, n, a, ffi.new("uint64_t *"))
    elif walk == "unpin":
        core.pin(r, 0, n, 0)
    elif walk == "uncache":
        lib.cdm_region_uncache(core.m, r, 0, n)
    else:
        core.flag_runs(r, 0, n, lib.CDM_PTE_PRESENT)
    assert_index_exact_over(r, 0, r.cap, [])


def test_shrink_frees_last_page_first(core):
    """Truncation pushes the frames last page first, so that the free stack
    hands them out again in address order."""
    a = core.add_pool(64)
    r = core.region(2 ** 24)
    pages = [5, 600, 601, 70000, 2 ** 21 + 3, 2 ** 24 - 1]
    for p in pages:
        core.populate(r, p, 1, a)
    frames = [pfn_of(core.ptes(r, p, 1)[0]) - core.pool(a).base_pfn for p in pages]
    assert frames == sorted(frames)
    assert lib.cdm_region_resize(core.m, r, 0) == 0
    assert core.free_stack(a)[-len(pages):] == frames[::-1]
    assert_index_exact_over(r, 0, r.cap, [])
    assert core.pool(a).nr_used == 0


def test_walks_agree_with_a_model(core):
    """Random clusters of pages over 2^22 entries (two summary words), random
    truncations and regrowth: every walk agrees with a set of the pages."""
    rng = random.Random(20)
    a = core.add_pool(4096)
    b = core.add_pool(4096)
    n = 2 ** 22
    r = core.region(n)
    model = {}                                  # page -> pool
    for step in range(60):
        op = rng.random()
        if op < 0.7:
            # A cluster, often across a chunk or summary-word edge.
            edge = rng.choice([CHUNK, 64 * CHUNK, 1])
            base = rng.randrange(r.npages // edge) * edge
            lo = max(0, base - rng.randrange(1, 5))
            hi = min(r.npages, base + rng.randrange(1, 5))
            pool = rng.choice([a, b])
            for p in range(lo, hi):
                if p not in model:
                    core.populate(r, p, 1, pool)
                    model[p] = pool
        elif op < 0.85:
            size = rng.randrange(r.npages + 1)
            assert lib.cdm_region_resize(core.m, r, size) == 0
            model = {p: q for p, q in model.items() if p < size}
        else:
            assert lib.cdm_region_resize(core.m, r, n) == 0
        npages = r.npages
        pages = sorted(model)
        assert core.count(r, 0, n, lib.CDM_PTE_PRESENT) == len(pages)
        present, _ = core.census(r, 0, n)
        assert (present[a], present[b]) == (sum(q == a for q in model.values()),
                                            sum(q == b for q in model.values()))
        for _ in range(10):
            start = rng.randrange(npages + 2)
            want = next((p for p in pages if p >= start), n + 7)
            assert core.next_present(r, start, n + 7) == want, (step, start)
        # flag_runs: runs of consecutive pages, a few at a time
        runs, pos = [], 0
        while True:
            got, pos = core.flag_runs(r, pos, n - pos, lib.CDM_PTE_PRESENT, max_runs=3)
            runs += got
            if len(got) < 3:
                break
        assert pos == npages
        want_runs = []
        for p in pages:
            if want_runs and sum(want_runs[-1]) == p:
                want_runs[-1] = (want_runs[-1][0], want_runs[-1][1] + 1)
            else:
                want_runs.append((p, 1))
        assert runs == want_runs, step
        if pages:
            p = rng.choice(pages)
            first = max(0, p - rng.randrange(CHUNK))
            k = rng.randrange(1, 2 * CHUNK)
            got = core.ptes(r, first, k)
            assert [i for i, e in enumerate(got) if e] == [q - first for q in pages
                                                           if first <= q < first + k]
        assert core.pool(a).nr_used + core.pool(b).nr_used == len(pages)
    # Truncation leaves no stale mark, and a walk clears any other.
    core.count(r, 0, n, lib.CDM_PTE_PRESENT)
    assert_index_exact_over(r, 0, r.npages - r.npages % CHUNK, list(model))


# ---------------------------------------------------------- migration holes


def test_hole_runs_group_consecutive_skips_by_errno():
    E = errno
    MOVE, THERE = lib.CDM_MIG_MOVE, lib.CDM_MIG_THERE
    status = [MOVE, -E.EBUSY, -E.EBUSY, -E.ENOMEM, THERE, -E.EBUSY, -E.EBUSY, -E.EBUSY,
              lib.CDM_MIG_DONE, -E.EIO, -E.EIO, MOVE, -E.ENOENT]
    n = len(status)
    st = ffi.new("int32_t[]", status)
    rf = ffi.new("uint64_t[]", n)
    rl = ffi.new("uint64_t[]", n)
    err = ffi.new("int32_t[]", n)
    k = lib.cdm_migrate_hole_runs(st, n, rf, rl, err)
    assert [(rf[i], rl[i], err[i]) for i in range(k)] == [
        (1, 2, -E.EBUSY), (3, 3, -E.ENOMEM), (5, 7, -E.EBUSY), (9, 10, -E.EIO), (12, 12, -E.ENOENT)]
    # The same holes as cdm_migrate_holes, page by page.
    idx = ffi.new("uint64_t[]", n)
    herr = ffi.new("int32_t[]", n)
    h = lib.cdm_migrate_holes(st, n, idx, herr)
    assert [(idx[i], herr[i]) for i in range(h)] == [
        (p, err[i]) for i in range(k) for p in range(rf[i], rl[i] + 1)]
    assert lib.cdm_migrate_hole_runs(st, 0, rf, rl, err) == 0
    every = ffi.new("int32_t[]", [-E.EBUSY] * 5)
    assert lib.cdm_migrate_hole_runs(every, 5, rf, rl, err) == 1 and (rf[0], rl[0]) == (0, 4)
    apart = ffi.new("int32_t[]", [-E.EBUSY, MOVE, -E.EBUSY, -E.EBUSY])   # same errno, not adjacent
    assert lib.cdm_migrate_hole_runs(apart, 4, rf, rl, err) == 2
    assert [(rf[i], rl[i]) for i in range(2)] == [(0, 0), (2, 3)]
    none = ffi.new("int32_t[]", [MOVE, THERE, MOVE])
    assert lib.cdm_migrate_hole_runs(none, 3, rf, rl, err) == 0


# ------------------------------------------------------------- device ops


def test_device_read_crc_continues_across_calls(core):
    a = core.add_pool(64)
    r = core.region(40)
    data = random.Random(9).randbytes(40 * PAGE)
    for p in range(40):
        core.write_page(r, p, data[p * PAGE:(p + 1) * PAGE], a)
    own = 1 << a

    def op(first, n, crc, kind=lib.CDM_OP_READ, arg=0):
        res = ffi.new("struct cdm_op_result *")
        res.crc = crc
        rc = lib.cdm_device_op(core.m, r, first, n, kind, arg, own, 0, res)
        return rc, res

    rc, whole = op(0, 40, 0)
    assert rc == 0 and whole.crc == zlib.crc32(data)
    for cut in (1, 13, 39):
        rc, one = op(0, cut, 0)
        assert rc == 0 and one.crc == zlib.crc32(data[:cut * PAGE])
        rc, two = op(cut, 40 - cut, one.crc)
        assert rc == 0 and two.crc == whole.crc, cut
        assert one.local_bytes + two.local_bytes == 40 * PAGE      # the rest starts from 0
    # Three calls, the middle one in the middle of nowhere special.
    crc = 0
    for first, n in ((0, 7), (7, 20), (27, 13)):
        rc, res = op(first, n, crc)
        assert rc == 0
        crc = res.crc
    assert crc == whole.crc
    # An op that fails, and one that reads nothing, leave the CRC as given.
    rc, res = op(38, 5, 0x1234)
    assert rc == -errno.EIO and res.page == 40 and res.crc == 0x1234
    rc, res = op(0, 0, 0x5678)
    assert rc == 0 and res.crc == 0x5678
    rc, res = op(0, 2, 0x9abc, kind=lib.CDM_OP_TOUCH)
    assert rc == 0 and res.crc == 0x9abc and res.local_bytes == 2 * PAGE


def test_next_absent_of_a_64tib_region_costs_by_the_pages_present(core):
    a = core.add_pool(4 * CHUNK)
    r = core.region(TIB64)
    mid = TIB64 // 2 + 12345
    for p in range(mid, mid + 2 * CHUNK + 3):      # spans three chunks
        core.populate(r, p, 1, a)
    core.populate(r, TIB64 - 1, 1, a)
    faults = minor_faults()
    absent = lambda first, end: lib.cdm_region_next_absent(core.m, r, first, end)
    assert absent(0, TIB64) == 0
    assert absent(mid, TIB64) == mid + 2 * CHUNK + 3
    assert absent(mid + CHUNK, mid + CHUNK + 5) == mid + CHUNK + 5      # none: end
    assert absent(TIB64 - 1, TIB64) == TIB64                            # none: npages
    assert absent(TIB64 - 1, 2 * TIB64) == TIB64
    assert absent(TIB64 + 5, 2 * TIB64) == TIB64                        # past the end
    assert core.next_present(r, mid + 2 * CHUNK + 3, TIB64) == TIB64 - 1
    assert minor_faults() - faults < WALK_FAULTS


def test_punch_frees_whole_pages_and_zeroes_the_edges(core):
    a = core.add_pool(64)
    r = core.region(3 * CHUNK)
    data = bytes(range(256)) * (PAGE // 256)
    for p in list(range(0, 10)) + [CHUNK + 1, 2 * CHUNK + 7]:
        core.write_page(r, p, data, a)
    assert core.pin(r, 4, 1, 1) == (0, 1)
    used = core.pool(a).nr_used
    # [2 pages + 100, 8 pages + 10): pages 3-7 freed (a pinned one too, as
    # truncation frees it), 2 and 8 zeroed past/before the edges.
    assert lib.cdm_region_punch(core.m, r, 2 * PAGE + 100, 6 * PAGE - 90) == 0
    ptes = core.ptes(r, 0, 10)
    assert [i for i in range(10) if not ptes[i]] == [3, 4, 5, 6, 7]
    assert r.nr_pinned == 0 and core.pool(a).nr_pinned == 0
    assert core.pool(a).nr_used == used - 5
    assert core.read(r, 2 * PAGE, PAGE) == data[:100] + b"\0" * (PAGE - 100)
    assert core.read(r, 8 * PAGE, PAGE) == b"\0" * 10 + data[10:]
    assert lib.cdm_region_next_absent(core.m, r, 0, r.npages) == 3
    assert core.next_present(r, 3, r.npages) == 8
    assert core.check() == ""
    # A whole chunk's pages punched: its mark goes; past the end, nothing.
    assert lib.cdm_region_punch(core.m, r, CHUNK * PAGE, CHUNK * PAGE) == 0
    assert not chunk_marked(r, CHUNK)
    assert lib.cdm_region_punch(core.m, r, 3 * CHUNK * PAGE, PAGE) == 0
    assert lib.cdm_region_punch(core.m, r, 0, 0) == 0
    # Inside one page: zeroed, kept.
    assert lib.cdm_region_punch(core.m, r, 9 * PAGE + 1, 2) == 0
    assert core.read(r, 9 * PAGE, 4) == data[:1] + b"\0\0" + data[3:4]
    assert core.check() == ""


def test_punch_refuses_pages_a_migration_holds(core):
    a = core.add_pool(16)
    r = core.region(8)
    for p in range(8):
        core.write_page(r, p, b"m" * PAGE, a)
    for bit in (lib.CDM_PTE_LOCKED, lib.CDM_PTE_MIGRATING):
        r.pte[5] |= bit
        before = core.ptes(r)
        assert lib.cdm_region_punch(core.m, r, 0, 8 * PAGE) == -errno.EAGAIN
        assert core.ptes(r) == before                  # nothing changed
        r.pte[5] &= ~bit
    assert lib.cdm_region_punch(core.m, r, 0, 8 * PAGE) == 0
    assert core.ptes(r) == [0] * 8 and core.pool(a).nr_used == 0
