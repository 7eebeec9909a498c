"""Moving pages that must leave their frames (mm/migrate.c's migrate_pages()):
what memory offlining, device offlining, memory failure and long-term pins
share.  Where a page may go is the placement of its policy (mempolicy), plus,
for a page that must leave, any node that takes implicit allocations, as
offline_pages() does; the moves themselves are migrate_vma batches.
"""
from __future__ import annotations

import errno
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import trio

from .._core import ffi, lib
from .migrate_device import Target, migrate_range

if TYPE_CHECKING:
    from .machine import Machine
    from .region import Region

MAX_PASSES = 200            # evacuation passes before giving up with EBUSY
OWNER_BATCH = 1 << 16       # reverse-map entries per native call


def runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs of consecutive pages."""
    out: list[list[int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return [(a, n) for a, n in out]


def regions_by_id(m: "Machine") -> dict[int, "Region"]:
    regions = m.regions
    # A removed region has no pages left (rmdir frees them at once).
    return {r.id: r for r in regions.by_name.values()} if regions is not None else {}


def frames_census(m: "Machine", pfn: int, n: int) -> tuple[int, int]:
    """(used, retired) frames of [pfn, pfn + n)."""
    out = ffi.new("uint64_t[2]")
    lib.cdm_frames_census(m.core, pfn, n, out)
    return out[0], out[1]


def frame_owners(m: "Machine", pfn: int, n: int) -> dict[int, list[int]]:
    """The pages living on frames [pfn, pfn + n): region id -> sorted pages."""
    core = m.core
    rid = ffi.new("uint32_t[]", OWNER_BATCH)
    page = ffi.new("uint64_t[]", OWNER_BATCH)
    nxt = ffi.new("uint64_t *")
    out: dict[int, list[int]] = defaultdict(list)
    start, end = pfn, pfn + n
    while start < end:
        count = lib.cdm_frames_owners(core, start, end - start, rid, page, OWNER_BATCH, nxt)
        for r, p in zip(ffi.unpack(rid, count), ffi.unpack(page, count)):
            out[r].append(p)
        if nxt[0] <= start:
            break
        start = nxt[0]
    for pages in out.values():
        pages.sort()
    return out


def pinned_in(m: "Machine", pfn: int, n: int) -> bool:
    """Whether a pinned page lives on frames [pfn, pfn + n)."""
    pool = lib.cdm_pfn_pool(m.core, pfn)
    if pool < 0 or not m.pool_stats(pool).nr_pinned:
        return False
    regions = regions_by_id(m)
    for rid, pages in frame_owners(m, pfn, n).items():
        region = regions.get(rid)
        if region is None or not region.snapshot().nr_pinned:
            continue
        for first, count in runs(pages):
            ptes = ffi.new("uint64_t[]", count)
            lib.cdm_region_ptes(m.core, region.core, first, count, ptes)
            for pte in ptes:
                if pte & lib.CDM_PTE_PINNED and pfn <= pte & lib.CDM_PTE_PFN_MASK < pfn + n:
                    return True
    return False


def page_pinned(m: "Machine", region: "Region", page: int) -> bool:
    if region.removed:
        return False
    pte = ffi.new("uint64_t[1]")
    lib.cdm_region_ptes(m.core, region.core, page, 1, pte)
    return bool(pte[0] & lib.CDM_PTE_PINNED)


def move_target(m: "Machine", nid: int) -> "Target":
    # device_memory=False: moving what exists, never allocating absent pages.
    return Target(f"node:{nid}", m.nodes[nid].pool, False)


def orderer(m: "Machine", home: Optional[int], sysram_only: bool, stay: bool,
            leave: bool = False):
    """A function (region, page) -> the targets to try for a page that
    must leave its frame: its own node first when ``stay`` (other blocks),
    then the nodes its policy falls back to, then any node that takes
    implicit allocations, by distance from ``home`` (offline_pages()
    takes any node with memory; the CDM rules keep isolated nodes out
    unless the policy names them).  ``sysram_only``: system RAM only.
    ``leave``: never ``home`` while another node can take the page, as
    do_migrate_range() clears the page's node from its nodemask unless no
    other node has memory."""
    usable = set(m.usable_nodes())
    start = home if home is not None else m.default_cpu_node
    extra = sorted((n for n in m.nodes if not m.nodes[n].isolated),
                   key=lambda n: (m.topo.distance[(start, n)], n))
    placements: dict = {}
    cache: dict = {}

    def takes(nid: int) -> bool:
        return nid in usable and (not sysram_only or m.nodes[nid].spec.kind == "sysram")

    leave_home = leave and any(n != home and takes(n) for n in extra)

    def allowed(nid: int) -> bool:
        return takes(nid) and not (leave_home and nid == home)

    def order(region: "Region", page: int) -> tuple:
        policy = region.policy_at(page)
        pl = placements.get(policy)
        if pl is None:
            pl = placements[policy] = m.placement(policy, m.default_cpu_node)
        intended = pl.table[page % len(pl.table)]
        key = (policy, intended)
        got = cache.get(key)
        if got is None:
            nodes = ([home] if stay and home is not None else []) + list(pl.fallback.get(intended, ())) + extra
            seen: list[int] = []
            for n in nodes:
                if n not in seen and allowed(n):
                    seen.append(n)
            got = cache[key] = tuple(move_target(m, n) for n in seen)
        return got
    return order


async def move_pages(m: "Machine", region: "Region", pages: list[int], pool: int,
                      order: Callable) -> tuple[int, list[tuple[int, int]]]:
    """Migrates pages of region that live in pool, each to the first of
    its targets with room.  Returns (moved, [(page, errno)] not moved);
    pages that turned out gone (truncated, poisoned) are not reported."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for p in pages:
        groups[order(region, p)].append(p)
    moved = 0
    failed: list[tuple[int, int]] = []
    for targets, remaining in groups.items():
        for target in targets:
            nomem = []
            for first, n in runs(remaining):
                res = await migrate_range(m, region, first, n, target, from_pools=1 << pool)
                moved += res.migrated
                for lo, hi, err in res.holes:
                    if err == errno.ENOMEM:
                        nomem += range(lo, hi + 1)
                    elif err not in (errno.ENOENT, errno.EIO, errno.EINVAL):
                        failed += [(page, err) for page in range(lo, hi + 1)]
            remaining = nomem
            if not remaining:
                break
        failed += [(p, errno.ENOMEM) for p in remaining]
    return moved, failed


async def evacuate(m: "Machine", pfn: int, n: int, order: Callable) -> int:
    """Moves every page off frames [pfn, pfn + n) (isolated beforehand, so
    nothing new lands there).  Returns the pages moved; EBUSY for a pinned
    page or pages that stay busy, ENOMEM when they have nowhere to go."""
    pool = lib.cdm_pfn_pool(m.core, pfn)
    total = 0
    for attempt in range(MAX_PASSES):
        owners = frame_owners(m, pfn, n)
        if not owners:
            if not frames_census(m, pfn, n)[0]:
                return total
            await trio.sleep(0.005)      # a migration is finishing into it
            continue
        regions = regions_by_id(m)
        progress = nomem = False
        for rid, pages in owners.items():
            region = regions.get(rid)
            if region is None:
                continue
            moved, failed = await move_pages(m, region, pages, pool, order)
            total += moved
            progress |= moved > 0
            for page, err in failed:
                if err == errno.ENOMEM:
                    nomem = True
                elif err == errno.EBUSY and page_pinned(m, region, page):
                    raise OSError(errno.EBUSY, f"page {page} of region {region.name} is pinned")
        if not progress:
            if nomem:
                raise OSError(errno.ENOMEM, "no memory left for the pages that must move")
            await trio.sleep(min(0.001 * (attempt + 1), 0.05))
    raise OSError(errno.EBUSY, "pages stayed busy")
