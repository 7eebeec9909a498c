"""Migration of region pages between nodes and device memory (SPEC §6.2).

The steps of HMM's migrate_vma (mm/migrate_device.c), one native call each,
over batches of pages:

    collect     lock the pages that can move; the rest are holes
    unmap       invalidate the CPU's copies (the kernel writes dirty ones back)
    lock        pages the CPU faulted in again meanwhile become holes
    alloc       target frames, in a batch
    copy        in C, GIL released, on the trio thread: a 2 MiB copy takes
                less time than handing it to a worker thread and back
    finalize    swap the page-table entries, free the sources, unlock

A page that cannot move is skipped, never fatal: the result lists it with
the reason.  Devices' page tables lose the pages that moved.
"""
from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator


from .._core import ffi, lib
from ..lib.sched import cond_resched

if TYPE_CHECKING:
    from .machine import Machine
    from .region import Region

BATCH = 512                 # pages per step: 2 MiB, the size of a PMD
ALL_POOLS = (1 << 64) - 1   # from_pools: any pool


@dataclass(frozen=True)
class Target:
    """Where a migration sends pages: a node, a device's private memory, or
    (``plan``) wherever a policy places each page."""
    name: str               # "node:1", "private:gpu0" or "policy"
    pool: int               # -1 for a policy
    device_memory: bool     # a device's memory (its CDM node or private): may allocate
    plan: object = None     # a policy's native plan (machine._Plan): pages go by it


@dataclass
class MigrateResult:
    requested: int = 0
    migrated: int = 0
    skipped: int = 0
    # Skipped pages as runs (first, last, errno): a migration of an untouched
    # gigabyte is one run, not a quarter of a million lines.
    holes: list[tuple[int, int, int]] = field(default_factory=list)

    def skip(self, first: int, last: int, err: int) -> None:
        """Pages [first, last] were skipped with err; merges with the last run."""
        self.skipped += last - first + 1
        if self.holes and self.holes[-1][1] + 1 == first and self.holes[-1][2] == err:
            self.holes[-1] = (self.holes[-1][0], last, err)
        else:
            self.holes.append((first, last, err))

    def errors(self) -> set[int]:
        return {err for _, _, err in self.holes}

    def lines(self) -> Iterator[str]:
        """The ``migrate`` file's answer (SPEC §6.2), a line at a time."""
        yield f"requested {self.requested}\nmigrated {self.migrated}\nskipped {self.skipped}\n"
        for first, last, err in self.holes:
            name = errno.errorcode.get(err, str(err))
            yield f"page {first} -{name}\n" if first == last else f"pages {first}-{last} -{name}\n"


async def migrate_range(m: "Machine", region: "Region", first: int, npages: int, target: "Target",
                        from_pools: int = 0, takeover: bool = False) -> MigrateResult:
    """Moves pages [first, first + npages) of region to target.

    Untouched pages are allocated on the target only if it is device memory
    (a device may allocate when the CPU page table is empty); otherwise they
    are holes with ENOENT, found in bulk: the work is by the pages present,
    not by the length of the range.  ``from_pools`` limits the move to pages
    in those pools (a bit per pool; 0: any).
    """
    result = MigrateResult(requested=npages)
    end = first + npages
    if region.removed:          # a mover that looked it up before the rmdir
        result.skip(first, end - 1, errno.ENOENT)
        return result
    with region.hold():
        others = _other_private_pools(m, target)
        if others:
            # migrate_vma collects only the device-private pages of its own
            # pgmap: another device's come back to RAM first, as a CPU access
            # would fault them, and move on from there.
            try:
                await fault_back(m, region, first, end, 0, from_pools=others)
            except OSError:
                pass        # no RAM to bring them to: they stay where they are
            from_pools = (from_pools or ALL_POOLS) & ~others
        lru = m.evictors.get(target.pool) if target.pool >= 0 else None
        # Dirty CPU pages are written back once for the whole range, in large
        # WRITEs, rather than by each batch's invalidation.
        written = npages > BATCH and lib.cdm_region_count(m.core, region.core, first, npages, lib.CDM_PTE_CPU) > 0
        if written:
            await m.cpu_write_back(region, first, npages)
        start = first
        while start < end:
            if lru is not None and lru.enabled:
                # Oversubscription: room for this batch first, by eviction.
                k = min(BATCH, end - start)
                if lru.free_pages() < k:
                    await lru.make_room(k - lru.resident(region, start, k), region, first, end)
            absent_err = _absent_error(m, target)
            if absent_err:
                present = lib.cdm_region_next_present(m.core, region.core, start, end)
                if present > start:
                    result.skip(start, present - 1, absent_err)
                    start = present
                    continue
            n = min(BATCH, end - start)
            await _migrate_batch(m, region, start, n, target, from_pools, takeover, result, not written)
            start += n
            await cond_resched()
    return result


def _other_private_pools(m: "Machine", target: "Target") -> int:
    """The private pools of devices other than target's (a bit per pool);
    0 unless target is a device's private memory."""
    private = m.private_pools_mask()
    if target.pool < 0 or not private & (1 << target.pool):
        return 0
    return private & ~(1 << target.pool)


def _absent_error(m: "Machine", target: "Target") -> int:
    """Why an untouched page cannot go to target (0: it can be allocated there)."""
    if not target.device_memory:
        return errno.ENOENT
    if not lib.cdm_pool_free_pages(m.core, target.pool):
        return errno.ENOMEM
    return 0


async def _migrate_batch(m: "Machine", region: "Region", first: int, n: int, target: "Target",
                         from_pools: int, takeover: bool, result: MigrateResult,
                         write_back: bool = True) -> None:
    src = ffi.new("uint64_t[]", n)
    dst = ffi.new("uint64_t[]", n)
    status = ffi.new("int32_t[]", n)
    began = time.monotonic_ns()
    region.migrations += 1
    try:
        flags = (lib.CDM_COLLECT_ALLOC_ABSENT if target.device_memory else 0) | \
            (lib.CDM_COLLECT_TAKEOVER if takeover else 0)
        lib.cdm_migrate_collect(m.core, region.core, first, n, target.pool, flags, from_pools, src, status)
        try:
            mapped = lib.cdm_migrate_count(src, status, n, lib.CDM_PTE_CPU)
            if mapped:
                for start, count in [(0, n)] if mapped == n else cpu_runs(src, status, n):
                    await m.cpu_unmap(region, first + start, count, write_back)
            lib.cdm_migrate_lock_src(m.core, region.core, first, n, src, status)
            if target.plan is not None:
                got = lib.cdm_migrate_alloc_plan(m.core, first, n, target.plan.cdata, status, dst)
            else:
                got = lib.cdm_migrate_alloc(m.core, target.pool, n, status, dst)
            if got:
                lib.cdm_migrate_copy(m.core, n, status, src, dst)
        except BaseException:
            lib.cdm_migrate_abort(m.core, region.core, first, n, dst, status)
            raise
        # Taken here, not before the awaits above: another migration of this
        # region may finish meanwhile, and its moves are not ours to count.
        before = m.device_resident(region)
        moved = lib.cdm_migrate_finalize(m.core, region.core, first, n, target.pool, dst, status)
    finally:
        region.migrations -= 1
        region.wake_waiters()
    if moved:
        region.migrated_pages += moved
        after = m.device_resident(region)
        m.invalidate_devices(region, first, n)
        # The devices count what came into and left their memory, and the
        # one that received pages maps them, as test_hmm maps what it migrated.
        device_moves = {d: after[d] - before[d] for d in after if after[d] != before[d]}
        traced = m.trace.migrate_fields(src, dst, status, n, device_moves, began) \
            if m.trace.tracer.is_enabled("migrate") else {}
        m.events.emit("migrate", region=region, first=first, n=n, target=target, moved=moved,
                      device_moves=device_moves, **traced)
    result.migrated += moved
    skip_holes(result, status, n, first)


def cpu_runs(src, status, n: int) -> list[tuple[int, int]]:
    """(offset, length) runs of the collected pages the CPU is believed to map:
    the only ones to invalidate.  Invalidating the whole batch would also wait
    on the page-cache folio of a CPU fault in flight on a device-private page
    of the batch, and that fault's fault-back waits for this migration to
    unlock the page: a deadlock (seen with CPU threads faulting while ranges
    migrated between node 0, node 1 and gpu0)."""
    start = ffi.new("uint64_t[]", n // 2 + 1)
    length = ffi.new("uint64_t[]", n // 2 + 1)
    count = lib.cdm_migrate_runs(src, status, n, lib.CDM_PTE_CPU, start, length)
    return [(start[r], length[r]) for r in range(count)]


def skip_holes(result: MigrateResult, status, n: int, first: int) -> None:
    """Adds the runs of pages a batch skipped to result."""
    lo = ffi.new("uint64_t[]", n)
    hi = ffi.new("uint64_t[]", n)
    err = ffi.new("int32_t[]", n)
    for k in range(lib.cdm_migrate_hole_runs(status, n, lo, hi, err)):
        result.skip(first + lo[k], first + hi[k], -err[k])


async def fault_back(m: "Machine", region: "Region", first: int, end: int, pid: int,
                     from_pools: int = 0) -> None:
    """A CPU access to device-private pages of [first, end): bring them to
    system RAM under the region's policy (the migrate_to_ram callback), or
    to the node their preferred_location advice names (the CPU maps it: the
    pages go where they should live rather than where the policy would put
    a new page; by the policy if that node is full or offline).
    ``from_pools``: only those devices' pages (0: every device's)."""
    private = from_pools or m.private_pools_mask()
    for start, stop, policy in region.policy_segments(first, end):
        # Each page by the policy, as a first touch would place it: its own
        # interleave slot, then that slot's fallback.
        by_policy = Target("policy", -1, False, plan=m.plan_of(policy, m.local_node(pid)))
        for s, e, node in region.cpu_preferred_segments(start, stop):
            target = by_policy
            if node is not None:
                try:
                    target = m.target(node)
                except (OSError, ValueError):
                    pass
            # takeover: pages another migration has collected but not locked
            # come back too; that migration may be invalidating the very
            # pages whose READ is waiting here (it would never finish).
            res = await migrate_range(m, region, s, e - s, target, from_pools=private, takeover=True)
            errs = res.errors()
            if errno.ENOMEM in errs and target is not by_policy:
                res = await migrate_range(m, region, s, e - s, by_policy, from_pools=private, takeover=True)
                errs = res.errors()
            if errno.EBUSY in errs:
                # Held by another migration: let it finish, the caller retries.
                # It may have finished while this one awaited its own steps:
                # wait only if a page of the span is still held, or the wake-up
                # is already gone and this waits for an unrelated migration.
                if lib.cdm_region_count(m.core, region.core, s, e - s,
                                        lib.CDM_PTE_LOCKED | lib.CDM_PTE_MIGRATING):
                    await region.wait_unlocked()
                return
            if errno.ENOMEM in errs:
                # Direct reclaim: demoting cold pages makes room (the caller retries).
                if await m.direct_reclaim(policy, m.local_node(pid), e - s):
                    return
                raise OSError(errno.EIO, "no system memory left to fault device-private pages back to")
