"""Long-term pins (mm/gup.c, FOLL_LONGTERM): a pinned page leaves device
memory first (to system RAM), then never migrates until unpinned.
"""
from __future__ import annotations

import errno
from collections import defaultdict
from typing import TYPE_CHECKING

import trio

from .._core import ffi, lib
from . import migrate

if TYPE_CHECKING:
    from .machine import Machine
    from .region import Region


def device_pools(m: "Machine") -> int:
    """Pools of device memory (cdm nodes, private memory), a bit each."""
    mask = m.private_pools_mask()
    for node in m.nodes.values():
        if node.spec.kind == "cdm":
            mask |= 1 << node.pool
    return mask


def pages_in(m: "Machine", region: "Region", first: int, n: int, mask: int) -> list[int]:
    core = m.core
    out = []
    for s, k in region.present_spans(first, first + n):
        ptes = ffi.new("uint64_t[]", k)
        lib.cdm_region_ptes(core, region.core, s, k, ptes)
        for i, pte in enumerate(ptes):
            if pte & lib.CDM_PTE_PRESENT and not pte & lib.CDM_PTE_POISONED \
                    and mask >> ((pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT) & 1:
                out.append(s + i)
    return out


async def pin(m: "Machine", region: "Region", first: int, n: int) -> int:
    """A long-term pin of pages [first, first + n): absent pages are
    faulted in, pages in device memory go to system RAM first
    (FOLL_LONGTERM); then none of them migrates.  Returns pages pinned."""
    deny = device_pools(m)
    res = ffi.new("struct cdm_rw_result *")
    order = migrate.orderer(m, None, sysram_only=True, stay=False)
    for _ in range(migrate.MAX_PASSES):
        try:
            await m.populate(region, first, n)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise OSError(errno.ENOMEM, "no memory to fault the range in") from e
        failed = []
        by_pool: dict[int, list[int]] = defaultdict(list)
        for p in pages_in(m, region, first, n, deny):
            pte = ffi.new("uint64_t[1]")
            lib.cdm_region_ptes(m.core, region.core, p, 1, pte)
            by_pool[(pte[0] & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT].append(p)
        for pool, pages in by_pool.items():
            failed += (await migrate.move_pages(m, region, pages, pool, order))[1]
        rc = lib.cdm_region_pin(m.core, region.core, first, n, 1, deny, res)
        if rc == 0:
            return res.allocated
        if rc == -errno.EIO:
            raise OSError(errno.EIO, f"page {res.page} is poisoned")
        if rc == -errno.EREMOTE and any(err == errno.ENOMEM for _, err in failed):
            raise OSError(errno.ENOMEM, "no system RAM left to pin device memory into")
        if rc == -errno.EAGAIN or region.migrations:
            await region.wait_unlocked()
        else:
            await trio.sleep(0.001)
    raise OSError(errno.EBUSY, "the pages kept moving")


def unpin(m: "Machine", region: "Region", first: int, n: int) -> int:
    res = ffi.new("struct cdm_rw_result *")
    lib.cdm_region_pin(m.core, region.core, first, n, 0, 0, res)
    return res.allocated


def pinned_ranges(m: "Machine", region: "Region") -> list[tuple[int, int]]:
    """Runs of pinned pages: (first, count), found by the core's walk of
    the populated parts of the page table."""
    if not region.snapshot().nr_pinned:
        return []
    core = m.core
    lo = ffi.new("uint64_t[]", migrate.OWNER_BATCH)
    length = ffi.new("uint64_t[]", migrate.OWNER_BATCH)
    nxt = ffi.new("uint64_t *")
    out: list[tuple[int, int]] = []
    start = 0
    while start < region.npages:
        count = lib.cdm_region_flag_runs(core, region.core, start, region.npages - start,
                                         lib.CDM_PTE_PINNED, lo, length, migrate.OWNER_BATCH, nxt)
        for a, k in zip(ffi.unpack(lo, count), ffi.unpack(length, count)):
            if out and out[-1][0] + out[-1][1] == a:
                out[-1] = (out[-1][0], out[-1][1] + k)
            else:
                out.append((a, k))
        if nxt[0] <= start:
            break
        start = nxt[0]
    return out
