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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING


from ._core import ffi, lib

if TYPE_CHECKING:
    from .machine import Machine, Target
    from .region import Region

BATCH = 512                 # pages per step: 2 MiB, the size of a PMD


@dataclass
class MigrateResult:
    requested: int = 0
    migrated: int = 0
    holes: list[tuple[int, int]] = field(default_factory=list)   # (page, errno)

    @property
    def skipped(self) -> int:
        return len(self.holes)

    def text(self) -> str:
        """The ``migrate`` file's answer."""
        lines = [f"requested {self.requested}", f"migrated {self.migrated}", f"skipped {self.skipped}"]
        lines += [f"page {page} -{errno.errorcode.get(err, str(err))}" for page, err in self.holes]
        return "\n".join(lines) + "\n"

    def add(self, other: "MigrateResult") -> None:
        self.requested += other.requested
        self.migrated += other.migrated
        self.holes += other.holes


async def migrate_range(m: "Machine", region: "Region", first: int, npages: int, target: "Target",
                        from_pools: int = 0, takeover: bool = False) -> MigrateResult:
    """Moves pages [first, first + npages) of region to target.

    Untouched pages are allocated on the target only if it is device memory
    (a device may allocate when the CPU page table is empty); otherwise they
    are holes with ENOENT.  ``from_pools`` limits the move to pages in those
    pools (a bit per pool; 0: any).
    """
    result = MigrateResult()
    for start in range(first, first + npages, BATCH):
        n = min(BATCH, first + npages - start)
        result.add(await _migrate_batch(m, region, start, n, target, from_pools, takeover))
    return result


async def _migrate_batch(m: "Machine", region: "Region", first: int, n: int, target: "Target",
                         from_pools: int, takeover: bool = False) -> MigrateResult:
    src = ffi.new("uint64_t[]", n)
    dst = ffi.new("uint64_t[]", n)
    status = ffi.new("int32_t[]", n)
    region.migrations += 1
    try:
        flags = (lib.CDM_COLLECT_ALLOC_ABSENT if target.device_memory else 0) | \
            (lib.CDM_COLLECT_TAKEOVER if takeover else 0)
        lib.cdm_migrate_collect(m.core, region.core, first, n, target.pool, flags, from_pools, src, status)
        try:
            mapped = lib.cdm_migrate_count(src, status, n, lib.CDM_PTE_CPU)
            if mapped:
                for start, count in [(0, n)] if mapped == n else cpu_runs(src, status, n):
                    await m.cpu_unmap(region, first + start, count)
            lib.cdm_migrate_lock_src(m.core, region.core, first, n, src, status)
            if lib.cdm_migrate_alloc(m.core, target.pool, n, status, dst):
                lib.cdm_migrate_copy(m.core, n, status, src, dst)
        except BaseException:
            lib.cdm_migrate_abort(m.core, region.core, first, n, dst, status)
            raise
        # Taken here, not before the awaits above: another migration of this
        # region may finish meanwhile, and its moves are not ours to count.
        before = m.device_resident(region)
        moved = lib.cdm_migrate_finalize(m.core, region.core, first, n, dst, status)
    finally:
        region.migrations -= 1
        region.wake_waiters()
    if moved:
        region.migrated_pages += moved
        m.account_device_moves(region, before)
        m.invalidate_devices(region, first, n)
        owner = m.pool_owner.get(target.pool)
        if owner is not None:
            m.devices[owner].map_own(region, first, n)
    return MigrateResult(n, moved, holes(status, n, first))


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


def holes(status, n: int, first: int) -> list[tuple[int, int]]:
    """(page, errno) of every skipped page of a batch."""
    idx = ffi.new("uint64_t[]", n)
    err = ffi.new("int32_t[]", n)
    count = lib.cdm_migrate_holes(status, n, idx, err)
    return [(first + idx[k], -err[k]) for k in range(count)]


async def fault_back(m: "Machine", region: "Region", first: int, end: int, pid: int) -> None:
    """A CPU access to device-private pages of [first, end): bring them to
    system RAM under the region's policy (the migrate_to_ram callback)."""
    private = m.private_pools_mask()
    for start, stop, _ in region.policy_segments(first, end):
        for nid in m.fault_back_order(region, start, pid):
            # takeover: pages another migration has collected but not locked
            # come back too; that migration may be invalidating the very
            # pages whose READ is waiting here (it would never finish).
            res = await migrate_range(m, region, start, stop - start, m.node_target(nid),
                                      from_pools=private, takeover=True)
            errs = {err for _, err in res.holes}
            if errno.EBUSY in errs:
                # Held by another migration: let it finish, the caller retries.
                # It may have finished while this one awaited its own steps:
                # wait only if a page of the span is still held, or the wake-up
                # is already gone and this waits for an unrelated migration.
                if lib.cdm_region_count(m.core, region.core, start, stop - start,
                                        lib.CDM_PTE_LOCKED | lib.CDM_PTE_MIGRATING):
                    await region.wait_unlocked()
                return
            if errno.ENOMEM not in errs:
                break       # every private page moved (absent ones are the caller's)
        else:
            raise OSError(errno.EIO, "no system memory left to fault device-private pages back to")
