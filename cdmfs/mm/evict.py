"""Oversubscription of device memory (SPEC §7 ``eviction``): when a device's
memory is full, a migration into it first evicts the least recently used
2 MiB chunks of device pages to system RAM, each page by its region's policy
(as a fault-back places it), instead of failing with ENOMEM.

The LRU is kept per pool as chunks (region id, chunk index), touched when
pages migrate in and when the device accesses them; a chunk whose pages have
all left is dropped when eviction comes to it.  Eviction never takes the
pages the migration asking for room is bringing in (no livelock: a kernel
over more than the device's memory keeps the pages of its window and
reaches the rest remotely), pinned pages (collect skips them) or pages under
migration (collected or locked by another mover: skipped too).  Chunks whose
pages prefer to live here (``preferred_location`` advice) go last.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Optional

from .._core import ffi, lib
from ..config import PAGE_SIZE
from .advice import PREFERRED
from .migrate_device import Target, migrate_range

if TYPE_CHECKING:
    from .machine import Machine
    from .region import Region

CHUNK_PAGES = (2 << 20) // PAGE_SIZE        # eviction granule: 2 MiB
MODES = ("lru", "off")


class DeviceLru:
    """The LRU of one device memory pool and its eviction switch."""

    def __init__(self, m: "Machine", pool: int, device: str, coherent: bool, node: Optional[int]):
        self.m = m
        self.pool = pool
        self.device = device
        self.coherent = coherent
        self.node = node                    # a coherent device's node id
        self.mode = "off" if coherent else "lru"
        self.chunks: "OrderedDict[tuple[int, int], None]" = OrderedDict()
        self.target_name = f"node:{node}" if coherent else f"private:{device}"
        # What the device can give back without a copy (its read duplicates):
        # fn(pages wanted) -> pages freed, tried before any chunk is evicted.
        self.reclaimers: list[Callable[[int], int]] = []

    @property
    def enabled(self) -> bool:
        if self.mode != "lru":
            return False
        # A coherent device's memory is a node: its reclaim switch gates it.
        if self.node is not None and not self.m.nodes[self.node].reclaim:
            return False
        return True

    def touch(self, region: "Region", first: int, n: int) -> None:
        """Pages [first, first + n) of region were used (or came in) now."""
        if n <= 0:
            return
        for c in range(first // CHUNK_PAGES, (first + n - 1) // CHUNK_PAGES + 1):
            key = (region.id, c)
            self.chunks[key] = None
            self.chunks.move_to_end(key)

    def forget(self, region: "Region") -> None:
        for key in [k for k in self.chunks if k[0] == region.id]:
            del self.chunks[key]

    def free_pages(self) -> int:
        return lib.cdm_pool_free_pages(self.m.core, self.pool)

    def resident(self, region: "Region", first: int, n: int) -> int:
        """Pages of [first, first + n) in this pool."""
        present = ffi.new("uint64_t[]", lib.CDM_MAX_POOLS)
        dirty = ffi.new("uint64_t[]", lib.CDM_MAX_POOLS)
        lib.cdm_region_census(self.m.core, region.core, first, n, present, dirty)
        return present[self.pool]

    async def make_room(self, need: int, region: "Region", first: int, end: int) -> int:
        """Evicts LRU chunks until need frames are free (or nothing more can
        go), never pages [first, end) of region.  Returns pages evicted."""
        if not self.enabled or self.free_pages() >= need:
            return 0
        for reclaim in self.reclaimers:
            reclaim(need - self.free_pages())
            if self.free_pages() >= need:
                return 0
        evicted = 0
        for avoid_preferred in (True, False):
            for key in list(self.chunks):
                if self.free_pages() >= need:
                    return evicted
                if key not in self.chunks:
                    continue
                rid, c = key
                r = self.m.regions.by_id.get(rid) if self.m.regions is not None else None
                a = c * CHUNK_PAGES
                b = min(a + CHUNK_PAGES, r.npages) if r is not None and not r.removed else a
                if a >= b:
                    del self.chunks[key]
                    continue
                if r is region and a < end and b > first:
                    continue        # the pages being brought in
                if avoid_preferred and r.advice.any(PREFERRED, a, b, self.target_name):
                    continue
                if not self.resident(r, a, b - a):
                    del self.chunks[key]
                    continue
                evicted += await self.evict(r, a, b)
                if key in self.chunks and not self.resident(r, a, b - a):
                    del self.chunks[key]
        return evicted

    async def evict(self, region: "Region", a: int, b: int) -> int:
        """Moves this pool's pages of [a, b) of region to system RAM: each by
        its policy (private memory), or to the first sysram node (a coherent
        node, which a policy may name itself)."""
        m = self.m
        moved = 0
        if self.coherent:
            target = Target(f"node:{m.first_sysram}", m.nodes[m.first_sysram].pool, False)
            moved = (await migrate_range(m, region, a, b - a, target, from_pools=1 << self.pool)).migrated
        else:
            for s, e, policy in region.policy_segments(a, b):
                target = Target("policy", -1, False, plan=m.plan_of(policy, m.default_cpu_node))
                res = await migrate_range(m, region, s, e - s, target, from_pools=1 << self.pool)
                moved += res.migrated
        if moved:
            m.events.emit("evict", device=self.device, region=region, first=a, n=b - a, moved=moved)
        return moved

