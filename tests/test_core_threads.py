"""The native core called from two threads at once (cffi releases the GIL
around every call), as the daemon will call it.

Pending MADV_DONTNEED drops of freed frames must never outlive the machine's
mutex: a drop left pending by one thread and issued later zeroes a frame that
another thread has been given and written meanwhile.  Then rw, populate,
migrations and the allocator run concurrently on one machine; each test ends
with the invariant checker (cdm_machine_check) and the data read back.
"""
import concurrent.futures
import errno
import os
import random
import shutil
import subprocess
import threading

import pytest

from cdmfs._core import ffi, lib
from test_core import PAGE, mach, pattern, simple_plan  # noqa: F401 (mach is a fixture)

FILL = 20000   # more frees than the resident window holds


class OtherThread:
    """Runs calls on one dedicated OS thread (its own per-thread state)."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def __call__(self, fn, *args):
        return self.pool.submit(fn, *args).result(timeout=60)

    def close(self):
        self.pool.shutdown(wait=True)


@pytest.fixture
def other():
    t = OtherThread()
    yield t
    t.close()


def page_pattern(k):
    return (k.to_bytes(4, "little") + b"\xa5\x5a\xc3\x3c") * (PAGE // 8)


def fill_and_free(mach, pool):
    """FILL pages written, then freed: the newest CDM_RESIDENT_FREE_PAGES frees
    stay resident (stale), the older ones are dropped."""
    plan = simple_plan(pool)
    r = mach.region(FILL)
    mach.write(r, 0, b"\x77" * (FILL * PAGE), plan)
    assert lib.cdm_region_resize(mach.m, r, 0) == 0
    assert mach.pool(pool).nfree_stack == FILL
    return r


def unretire_pushes_the_window(mach, pool):
    """Retires a free frame that was dropped long ago, then gives it back: its
    push moves the resident window down by one, and the frame pushed out of it
    is dropped."""
    oldest = mach.pool(pool).free_stack[0] + mach.pool(pool).base_pfn
    assert lib.cdm_frame_retire(mach.m, oldest, 0) == 0
    assert lib.cdm_frames_unretire(mach.m, oldest, 1) == 1


def block_release_pushes_the_window(mach, pool):
    """Isolates a memory block of frames dropped long ago, then releases it:
    its frames go back on the free stack and push stale ones out of the window."""
    oldest = mach.pool(pool).free_stack[0]
    block = oldest // mach.pool(pool).block_pages
    assert lib.cdm_block_isolate(mach.m, pool, block, 1) == 0
    assert lib.cdm_block_isolate(mach.m, pool, block, 0) > 0


@pytest.mark.parametrize("push", [unretire_pushes_the_window, block_release_pushes_the_window])
def test_pending_drops_never_outlive_the_lock(mach, other, push):
    """Thread A frees frames out of the resident window; thread B then gets
    every frame and writes it; any later call of A that flushes must not zero
    B's pages."""
    a = mach.add_pool(FILL)
    assert lib.cdm_pool_set_blocks(mach.m, a, 1024) == 0
    plan = simple_plan(a)
    old = fill_and_free(mach, a)
    other(push, mach, a)                      # thread A
    r = mach.region(FILL)                     # thread B: every frame, written
    data = b"".join(page_pattern(k) for k in range(FILL))
    mach.write(r, 0, data, plan)
    assert mach.free(a) == 0
    out = ffi.new("uint64_t[]", 1)
    other(lib.cdm_region_ptes, mach.m, old, 0, 1, out)   # thread A: any call that flushes
    got = mach.read(r, 0, FILL * PAGE)
    lost = [k for k in range(FILL) if got[k * PAGE:(k + 1) * PAGE] != data[k * PAGE:(k + 1) * PAGE]]
    assert not lost, f"{len(lost)} pages lost their data, first page {lost[0]}"


# ------------------------------------------------------------- the checker


def corrupt_nr_used(mach, pool, r):
    p = mach.pool(pool)
    p.nr_used += 1
    return lambda: setattr(p, "nr_used", p.nr_used - 1), "nr_used"


def corrupt_rmap(mach, pool, r):
    p = mach.pool(pool)
    f = (r.pte[3] & lib.CDM_PTE_PFN_MASK) - p.base_pfn
    old = p.rmap[f]
    p.rmap[f] = 0
    return lambda: p.rmap.__setitem__(f, old), "used frames without owner"


def corrupt_free_stack_twice(mach, pool, r):
    p = mach.pool(pool)
    old = p.free_stack[0]
    p.free_stack[0] = p.free_stack[1]
    return lambda: p.free_stack.__setitem__(0, old), "twice on the free stack"


def corrupt_free_stack_lost(mach, pool, r):
    p = mach.pool(pool)
    p.nfree_stack -= 1
    p.nresident -= 1

    def undo():
        p.nfree_stack += 1
        p.nresident += 1
    return undo, "not on the free stack"


def corrupt_resident(mach, pool, r):
    r.resident[pool] -= 1
    return lambda: r.resident.__setitem__(pool, r.resident[pool] + 1), "resident"


def corrupt_nr_dirty(mach, pool, r):
    p = mach.pool(pool)
    p.nr_dirty += 2
    return lambda: setattr(p, "nr_dirty", p.nr_dirty - 2), "nr_dirty"


def corrupt_pinned_bit(mach, pool, r):
    r.pte[5] |= lib.CDM_PTE_PINNED
    return lambda: r.pte.__setitem__(5, r.pte[5] & ~lib.CDM_PTE_PINNED), "nr_pinned"


def corrupt_chunk_mark(mach, pool, r):
    old = r.chunks[0]
    r.chunks[0] &= ~1
    return lambda: r.chunks.__setitem__(0, old), "not marked"


def corrupt_summary(mach, pool, r):
    old = r.summary[0]
    r.summary[0] = 0
    return lambda: r.summary.__setitem__(0, old), "summary"


def corrupt_used_flag(mach, pool, r):
    p = mach.pool(pool)
    f = (r.pte[7] & lib.CDM_PTE_PFN_MASK) - p.base_pfn
    old = p.fflags[f]
    p.fflags[f] = old & ~lib.CDM_FRAME_USED
    return lambda: p.fflags.__setitem__(f, old), "free frame %d has owner" % f


def corrupt_two_pages_one_frame(mach, pool, r):
    old = r.pte[9]
    r.pte[9] = r.pte[8]
    return lambda: r.pte.__setitem__(9, old), "region 0 page 9"


def corrupt_pte_new(mach, pool, r):
    r.pte[2] |= 1 << 48
    return lambda: r.pte.__setitem__(2, r.pte[2] & ~(1 << 48)), "PTE_NEW"


@pytest.mark.parametrize("corrupt", [
    corrupt_nr_used, corrupt_rmap, corrupt_free_stack_twice, corrupt_free_stack_lost,
    corrupt_resident, corrupt_nr_dirty, corrupt_pinned_bit, corrupt_chunk_mark,
    corrupt_summary, corrupt_used_flag, corrupt_two_pages_one_frame, corrupt_pte_new])
def test_checker_reports_corruption(mach, corrupt):
    a = mach.add_pool(64)
    r = mach.region(40)
    mach.write(r, 0, pattern(1, 16 * PAGE), simple_plan(a))
    assert lib.cdm_region_resize(mach.m, r, 12) == 0     # 4 frames on the free stack
    assert mach.check() == ""
    undo, what = corrupt(mach, a, r)
    msg = mach.check()
    assert what in msg, msg
    undo()
    assert mach.check() == ""


def test_checker_counts_a_migration_in_flight(mach):
    """Between alloc and finalize the targets are used frames without owner:
    nr_held counts them, so the check holds mid-migration too."""
    a = mach.add_pool(64)
    c = mach.add_pool(64)
    r = mach.region(16)
    mach.write(r, 0, pattern(2, 16 * PAGE), simple_plan(a))
    checks = []
    mach.migrate(r, 0, 16, c, after_lock=lambda: checks.append(mach.check()))
    assert mach.pool(c).nr_held == 0
    n = 8
    src = ffi.new("uint64_t[]", n)
    dst = ffi.new("uint64_t[]", n)
    st = ffi.new("int32_t[]", n)
    assert lib.cdm_migrate_collect(mach.m, r, 0, n, a, 0, 0, src, st) == n
    assert lib.cdm_migrate_lock(mach.m, r, 0, n, st) == n
    assert lib.cdm_migrate_alloc(mach.m, a, n, st, dst) == n
    assert mach.pool(a).nr_held == n
    checks.append(mach.check())
    lib.cdm_migrate_abort(mach.m, r, 0, n, dst, st)
    assert mach.pool(a).nr_held == 0
    assert checks == ["", ""]
    assert mach.read(r, 0, 16 * PAGE) == pattern(2, 16 * PAGE)


# ----------------------------------------------------- two threads at once


def run_both(*workers):
    """Runs each worker on its own thread, started together; re-raises the
    first error."""
    errors = []
    start = threading.Barrier(len(workers))

    def run(work):
        try:
            start.wait(timeout=30)
            work()
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    if errors:
        raise errors[0]


def test_rw_populate_migrate_on_two_ranges(mach):
    """Two threads write, populate, migrate back and forth (collect, lock,
    alloc, copy, finalize) and read their own half of one region; a third
    checks the invariants meanwhile."""
    half = 1024
    a = mach.add_pool(4 * half)
    c = mach.add_pool(4 * half)
    g = mach.add_pool(4 * half, flags=lib.CDM_POOL_PRIVATE)
    r = mach.region(2 * half)
    plans = {a: simple_plan(a), c: simple_plan(c)}
    final = {}
    done = threading.Event()

    def worker(k):
        def work():
            first = k * half
            rnd = random.Random(k)
            data = bytearray(half * PAGE)
            for it in range(12):
                pool = (a, c)[it % 2]
                # A few unaligned writes, then the whole range read back.
                for _ in range(8):
                    off = rnd.randrange(half * PAGE - 3 * PAGE)
                    chunk = rnd.randbytes(rnd.randrange(1, 3 * PAGE))
                    mach.write(r, first * PAGE + off, chunk, plans[pool], mark_cpu=it & 1)
                    data[off:off + len(chunk)] = chunk
                res = ffi.new("struct cdm_rw_result *")
                rc = lib.cdm_region_populate(mach.m, r, first, half, plans[pool].c, res)
                assert rc == 0, (rc, res.page)
                lib.cdm_region_uncache(mach.m, r, first, half)
                target = (c, g, a)[it % 3]
                s = mach.migrate(r, first, half, target, alloc_absent=1)
                assert all(st in (lib.CDM_MIG_DONE, lib.CDM_MIG_THERE) for st in s["final"]), s["final"]
                if target == g:     # device-private: bring it back before the CPU reads
                    s = mach.migrate(r, first, half, pool)
                    assert all(st in (lib.CDM_MIG_DONE, lib.CDM_MIG_THERE) for st in s["final"])
                assert mach.read(r, first * PAGE, half * PAGE) == bytes(data)
            final[k] = bytes(data)
        return work

    left = [2]
    lock = threading.Lock()

    def finishing(work):
        def run():
            try:
                work()
            finally:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return run

    def checker():
        while True:
            finished = done.is_set()
            msg = mach.check()
            assert msg == "", msg
            if finished:
                break

    run_both(finishing(worker(0)), finishing(worker(1)), checker)
    assert mach.read(r, 0, half * PAGE) == final[0]
    assert mach.read(r, half * PAGE, half * PAGE) == final[1]


def test_alloc_free_on_one_pool(mach):
    """Two threads allocate, tag, check and free frames of one pool, more than
    the resident window, and retire and give back frames meanwhile: no frame
    is handed out twice or loses its bytes."""
    pool = mach.add_pool(48000)
    base = mach.pool(pool).base_pfn

    def worker(k):
        def work():
            rnd = random.Random(k)
            for it in range(40):
                n = rnd.randrange(1, 12000)
                rc, pfns = mach.alloc(pool, n)
                if rc:
                    assert rc == -errno.ENOMEM
                    continue
                tags = {}
                for pfn in pfns:
                    addr = lib.cdm_pfn_addr(mach.m, pfn)
                    assert bytes(ffi.buffer(addr, 8)) == bytes(8), "a new frame reads as zeros"
                    tag = (k << 60 | it << 32 | pfn).to_bytes(8, "little")
                    ffi.memmove(addr, tag, 8)
                    ffi.memmove(addr + PAGE - 8, tag, 8)
                    tags[pfn] = tag
                pfn = base + rnd.randrange(48000)
                if lib.cdm_frame_retire(mach.m, pfn, 0) >= 0:
                    assert lib.cdm_frames_unretire(mach.m, pfn, 1) == 1
                for pfn, tag in tags.items():
                    addr = lib.cdm_pfn_addr(mach.m, pfn)
                    assert bytes(ffi.buffer(addr, 8)) == tag
                    assert bytes(ffi.buffer(addr + PAGE - 8, 8)) == tag
                mach.pool_free(pfns)
        return work

    run_both(worker(0), worker(1))
    assert mach.pool(pool).nr_used == 0 and mach.pool(pool).nr_held == 0
    assert mach.check() == ""


# ------------------------------------------------------- ThreadSanitizer

NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "native")


@pytest.fixture(scope="module")
def tsan_build(tmp_path_factory):
    """build(name) -> tests/c/NAME.c linked with the core's sources, built
    with -fsanitize=thread (skipped where the compiler cannot)."""
    import sys
    sys.path.insert(0, NATIVE)
    try:
        from build_core import SOURCES
    finally:
        sys.path.pop(0)
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("tsan")

    def build(name):
        exe = str(out / name)
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = ["cc", "-g", "-O1", "-fsanitize=thread", "-pthread", "-I", NATIVE,
               "-o", exe, os.path.join(here, "c", f"{name}.c")]
        cmd += [os.path.join(NATIVE, src) for src in SOURCES] + ["-ldeflate"]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode:
            pytest.skip(f"no ThreadSanitizer build: {built.stderr[-300:]}")
        return exe
    return build


def test_pool_lookups_are_race_free_under_tsan(tsan_build):
    """Lookups by PFN and by pool index read the number of pools and the
    pools it counts; another thread adding a pool writes them.  Both under
    the mutex: ThreadSanitizer sees no race."""
    exe = tsan_build("core_race")
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66"))
    races = [line for line in run.stderr.splitlines() if line.startswith("SUMMARY: ThreadSanitizer")]
    assert not races, "\n".join(sorted(set(races)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("found ")
