"""Watermarks and reclaim by demotion (mm/page_alloc.c's
__setup_per_zone_wmarks, mm/vmscan.c's kswapd and demote_folio_list).

Each node is one zone (Normal, or Movable for CDM memory).  The watermarks
are the kernel's: ``min_free_kbytes`` from the size of low memory
(``init_per_zone_wmark_min``), shared out by the zones' sizes; low and high
are min plus one and two times max(min / 4, managed * watermark_scale_factor
/ 10000); promo (memory tiering) is min plus three times that.  A Movable
zone's min is managed / 1024, between 32 and 128 pages, as for a zone that
is not low memory.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import trio

from .._core import ffi, lib
from ..config import PAGE_SIZE
from .migrate import runs
from .migrate_device import migrate_range

if TYPE_CHECKING:
    from .machine import Machine

WATERMARK_SCALE_FACTOR = 10      # vm.watermark_scale_factor
MIN_FREE_KBYTES_MIN, MIN_FREE_KBYTES_MAX = 128, 262144
SWAP_CLUSTER_MAX = 32


@dataclass(frozen=True)
class Watermarks:
    min: int
    low: int
    high: int
    promo: int


def movable(m: "Machine", nid: int) -> bool:
    return m.nodes[nid].spec.kind == "cdm"


def min_free_kbytes(lowmem_kbytes: int) -> int:
    """calculate_min_free_kbytes(): int_sqrt(lowmem_kbytes * 16), clamped."""
    v = math.isqrt(lowmem_kbytes * 16)
    return max(MIN_FREE_KBYTES_MIN, min(v, MIN_FREE_KBYTES_MAX))


def watermarks(m: "Machine") -> dict[int, Watermarks]:
    """Every online node's watermarks, in pages."""
    managed = {nid: n.online_pages for nid, n in m.nodes.items()}
    lowmem = sum(p for nid, p in managed.items() if not movable(m, nid))
    min_pages = min_free_kbytes(lowmem * PAGE_SIZE // 1024) * 1024 // PAGE_SIZE
    out = {}
    for nid, pages in managed.items():
        if movable(m, nid):
            wmin = max(SWAP_CLUSTER_MAX, min(pages // 1024, 128))
        else:
            wmin = min_pages * pages // lowmem if lowmem else 0
        delta = max(wmin // 4, pages * WATERMARK_SCALE_FACTOR // 10000)
        out[nid] = Watermarks(wmin, wmin + delta, wmin + 2 * delta, wmin + 3 * delta)
    return out


# ---------------------------------------------------------------- reclaim

KSWAPD_INTERVAL = 0.05      # seconds between kswapd's looks at the watermarks
SCAN_BATCH = 1 << 14        # page-table entries copied per native call


class Kswapd:
    """kswapd and direct reclaim by demotion, over an approximate LRU.

    The LRU is a second-chance clock per node over the pages present there
    (a walk of the regions' populated page tables, by the pages present).
    A page's referenced bit is the CPU's mapping of it: a page the CPU maps
    and that carries no NUMA hinting mark was accessed since it was last
    unmapped (a fault mapped it); giving it its second chance is clearing
    that bit, i.e. unmapping it with a hinting mark, as the NUMA scanner
    does (and the scanner's marks age pages just the same).  A page that is
    not CPU-mapped, or still marked, is cold: it demotes first.  An aged
    page gets ``hot_threshold_ms`` (the time within which a hinting fault
    makes a page hot for promotion too) before the clock may take it.
    """

    def __init__(self, m: "Machine"):
        self.m = m
        self._hand: dict[int, tuple[int, int]] = {}    # node -> (region id, page)
        self._aged: dict[int, float] = {}               # node -> when its pages were last aged

    def age_seconds(self) -> float:
        """How long an aged page has to be referenced again."""
        return self.m.balancing.tun.hot_threshold_ms / 1000

    def can_demote(self, nid: int) -> Optional[int]:
        """The demotion target of nid, if reclaim may demote from it now."""
        m = self.m
        node = m.nodes[nid]
        if not (m.tiers.demotion_enabled and node.reclaim and node.online):
            return None
        target = m.tiers.demotion_target(nid)
        if target is None or not m.nodes[target].reclaim:
            return None     # the CDM switch gates every automatic move to or from a node
        return target

    async def run(self) -> None:
        """kswapd: every node with reclaim on that falls below its low
        watermark demotes its coldest pages until it is above high."""
        m = self.m
        while True:
            idle = True     # a round that demoted nothing waits for the aged pages
            for nid in list(m.nodes):
                if self.can_demote(nid) is None:
                    continue
                wm = m.watermarks()[nid]
                free = m.node_pages(nid)["free"]
                # Memory tiering: a promotion that found the node full asks
                # for room up to the promo watermark (pgdat_balanced).
                promo = nid in m.balancing.promote_pressure
                if free < wm.low or (promo and free < wm.promo):
                    m.balancing.promote_pressure.discard(nid)
                    if await self.shrink_node(nid, (wm.promo if promo else wm.high) - free, direct=False):
                        idle = False
            await trio.sleep(KSWAPD_INTERVAL if not idle else max(KSWAPD_INTERVAL, self.age_seconds() / 2))

    async def direct_reclaim(self, nodes: "list[int]", want: int) -> int:
        """A fault found every allowed node full: the first of nodes that may
        demote gives up to want pages (at least SWAP_CLUSTER_MAX) of its
        coldest, unmapped ones.  Returns the pages freed."""
        for nid in nodes:
            if self.can_demote(nid) is not None:
                got = await self.shrink_node(nid, max(want, SWAP_CLUSTER_MAX), direct=True)
                if got:
                    return got
        return 0

    def _regions(self, nid: int):
        m = self.m
        regions = sorted(m.regions.by_id.items()) if m.regions is not None else []
        rid0, page0 = self._hand.get(nid, (0, 0))
        k = next((i for i, (rid, _) in enumerate(regions) if rid >= rid0), 0)
        order = regions[k:] + regions[:k]
        for rid, region in order:
            yield region, (page0 if rid == rid0 else 0)
        if order and page0:
            yield order[0][1], 0        # the part before the hand, last

    def _victims(self, nid: int, want: int, age: bool):
        """Up to want cold pages on nid as {region: [pages]} in clock order,
        and the referenced pages the walk passed, {region: [pages]}.  Without
        age (direct reclaim), every CPU-mapped page counts as referenced."""
        m = self.m
        pool = m.nodes[nid].pool
        victims: dict = {}
        referenced: dict = {}
        found = 0
        skip = (lib.CDM_PTE_PINNED | lib.CDM_PTE_LOCKED | lib.CDM_PTE_MIGRATING
                | lib.CDM_PTE_POISONED | lib.CDM_PTE_PRIVATE)
        for region, start in self._regions(nid):
            if region.removed:
                continue
            for s, k in region.present_spans(start, region.npages):
                k = min(k, SCAN_BATCH)
                out = ffi.new("uint64_t[]", k)
                lib.cdm_region_ptes(m.core, region.core, s, k, out)
                for i, pte in enumerate(ffi.unpack(out, k)):
                    if not pte & lib.CDM_PTE_PRESENT or pte & skip or \
                            (pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT != pool:
                        continue
                    if pte & lib.CDM_PTE_CPU and (not pte & lib.CDM_PTE_NUMA or not age):
                        # Referenced; or, for direct reclaim (in a fault's
                        # handler), CPU-mapped at all: moving it would unmap
                        # it from there, never done (see numa_balancing).
                        referenced.setdefault(region, []).append(s + i)
                        continue
                    victims.setdefault(region, []).append(s + i)
                    found += 1
                    if found >= want:
                        self._hand[nid] = (region.id, s + i + 1)
                        return victims, referenced
        self._hand[nid] = (0, 0)
        return victims, referenced

    async def shrink_node(self, nid: int, want: int, direct: bool) -> int:
        """Demotes up to want of nid's coldest pages to its demotion target
        (those whose policy lets them go there).  Returns the pages moved."""
        m = self.m
        target = self.can_demote(nid)
        if target is None or want <= 0:
            return 0
        victims, referenced = self._victims(nid, want, age=not direct)
        scanned = sum(map(len, victims.values())) + sum(map(len, referenced.values()))
        kind = "direct" if direct else "kswapd"
        m.balancing.events[f"pgscan_{kind}"] += scanned
        m.balancing.events["pgscan_anon"] += scanned
        moved = 0
        local = nid if m.nodes[nid].spec.cpus else m.default_cpu_node
        try:
            tgt = m.node_target(target)
        except (OSError, ValueError):
            return 0
        pool = m.nodes[nid].pool
        for region, pages in victims.items():
            if region.removed:
                continue
            with region.hold():
                for s, c in runs(pages):
                    for a, b, policy in region.policy_segments(s, s + c):
                        if not _allowed(m, policy, local, target):
                            continue
                        res = await migrate_range(m, region, a, b - a, tgt, from_pools=1 << pool)
                        if res.migrated:
                            moved += res.migrated
                            m.events.emit("demote", region=region, first=a, n=b - a,
                                          moved=res.migrated, reason=kind,
                                          **{"from": nid, "to": target})
        if moved:
            m.nodes[nid].events[f"pgdemote_{kind}"] += moved
            m.balancing.events[f"pgsteal_{kind}"] += moved
            m.balancing.events["pgsteal_anon"] += moved
        if not direct and moved < want:
            now = time.monotonic()
            if now - self._aged.get(nid, 0.0) >= self.age_seconds():
                # Second chance: the referenced pages lose their bit (unmapped
                # with a hinting mark); those not touched again go next time.
                self._aged[nid] = now
                await self._age(referenced, pool, want - moved)
        return moved

    async def _age(self, referenced: dict, pool: int, budget: int) -> None:
        m = self.m
        nxt = ffi.new("uint64_t *")
        for region, pages in referenced.items():
            if region.removed or budget <= 0:
                continue
            with region.hold():
                for s, c in runs(pages):
                    marked = lib.cdm_region_numa_mark(m.core, region.core, s, c, 1 << pool, c, nxt)
                    if marked:
                        m.balancing.hinting = True
                        await m.cpu_unmap(region, s, c)
                        budget -= marked
                    if budget <= 0:
                        break


def _allowed(m: "Machine", policy, local: int, target: int) -> bool:
    """The placement rule: target is a node policy may place a page on."""
    pl = m.placement(policy, local)
    return any(target in pl.fallback.get(n, ()) for n in pl.table)
