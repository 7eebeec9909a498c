"""The lifecycle of memory and devices (SPEC §5 ``memory/``, §6.3 ``pin``, §7
``online``/``inject``): the CDM design's first requirement is that a device
can be taken out of service at any time, its data migrated away, and that its
memory may vanish with a link error or throw ECC errors.

* **Memory blocks** (drivers/base/memory.c): every node is cut into blocks of
  ``block_size``; a block is online (in a zone, Normal or Movable) or offline.
  Offlining one isolates it in the allocator, migrates every page off it (to
  other blocks of its node first, then by the region's policy and the CDM
  isolation rules, as offline_pages() does), checks it is empty and takes it
  out of MemTotal.  A node without online memory leaves ``has_memory``.
* **Hot-add**: a node configured with ``present = false`` has a pool but no
  blocks until ``probe`` adds them, onlined by ``auto_online_blocks``.
* **Device offline** (HMM's migrate_device_range): every page in the device's
  memory goes to system RAM by its region's policy; then the device refuses
  accesses (ENODEV) and is no target any more.  Online brings it back empty.
* **Long-term pins** (FOLL_LONGTERM): pages leave device memory first, then
  never migrate.
* **Memory failure** (mm/memory-failure.c): a poisoned frame's page loses its
  data (a CPU access gets SIGBUS, read() and device accesses EIO) and the frame
  is retired for good; soft offline moves the data first.  Link loss poisons a
  device's whole memory at once.

The native core keeps the allocator exact (isolated blocks and pools,
retired frames, the reverse map); this module decides what moves where.
Every operation that changes the machine's memory runs under one lock, as
the kernel's device_hotplug_lock serializes them.
"""
from __future__ import annotations

import errno
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import trio

from . import formats, migrate
from ._core import ffi, lib
from .config import PAGE_SIZE

if TYPE_CHECKING:
    from .devices import Device
    from .machine import Machine, Target
    from .region import Region
    from .tree import Tree

log = logging.getLogger(__name__)

# memory/state and auto_online_blocks words (online_type_to_str[] in memory.c).
ONLINE_TYPES = ("offline", "online", "online_kernel", "online_movable")
ADVICE = ("pin", "unpin")
INJECT = ("link_down", "ecc", "fail_alloc")
MAX_PASSES = 200            # evacuation passes before giving up with EBUSY
OWNER_BATCH = 1 << 16       # reverse-map entries per native call

MEMORY_DIR = "sys/devices/system/memory"
NODE_DIR = "sys/devices/system/node"


@dataclass
class Block:
    """One memory block (struct memory_block): ``memory<id>``."""
    id: int                 # phys_index: physical address / block size
    nid: int
    pool: int
    index: int              # block number within its pool
    first_pfn: int
    npages: int
    present: bool
    online: bool = False
    zone: str = ""          # while online: "Normal" or "Movable"
    going_offline: bool = False
    hidden_free: int = 0    # free frames while not online (kept out of MemFree)
    taken_by: Optional[str] = None   # the device whose offlining took it down


def runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs of consecutive pages."""
    out: list[list[int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return [(a, n) for a, n in out]


def parse_address(text: str) -> int:
    """A physical address, decimal or 0x (kstrtoull(buf, 0))."""
    word = text.strip()
    try:
        if "_" in word:
            raise ValueError(word)
        value = int(word, 0)
    except ValueError:
        raise ValueError(f"expected a physical address, got {word!r}") from None
    if not 0 <= value < 1 << 64:
        raise ValueError("address out of range")
    return value


def parse_bool01(text: str) -> bool:
    word = text.strip()
    if word not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return word == "1"


class Lifecycle:
    """Memory blocks and the lifecycle operations of one machine."""

    def __init__(self, m: "Machine"):
        self.m = m
        self.block_size = m.topo.block_size
        self.block_pages = self.block_size // PAGE_SIZE
        self.blocks: dict[int, Block] = {}
        self.auto_online = "online"
        self.lock = trio.Lock()
        self.link_lost: set[str] = set()     # devices whose memory a link loss poisoned
        self.tree: Optional["Tree"] = None
        bp = self.block_pages
        for nid, node in m.nodes.items():
            spec = node.spec
            rc = lib.cdm_pool_set_blocks(m.core, node.pool, bp)
            if rc:
                raise OSError(-rc, f"node {nid}: cannot cut its memory into blocks")
            for k in range((spec.npages + bp - 1) // bp):
                b = Block(spec.base_pfn // bp + k, nid, node.pool, k, spec.base_pfn + k * bp,
                          min(bp, spec.npages - k * bp), spec.present)
                if spec.present:
                    b.online = True
                    b.zone = self.default_zone(b)
                else:
                    lib.cdm_block_isolate(m.core, node.pool, k, 1)
                    b.hidden_free = b.npages
                self.blocks[b.id] = b
            # The CDM discussion: no automatic balancing or reclaim on device memory.
            node.numa_balancing = node.reclaim = spec.kind == "sysram"
            self._refresh(nid)

    # ------------------------------------------------------------ queries

    def kind(self, b: Block) -> str:
        return self.m.nodes[b.nid].spec.kind

    def default_zone(self, b: Block) -> str:
        """The zone ``online`` picks: Movable for cdm memory, Normal otherwise."""
        return "Movable" if self.kind(b) == "cdm" else "Normal"

    def node_blocks(self, nid: int) -> list[Block]:
        return [b for b in self.blocks.values() if b.nid == nid]

    def block_of_pfn(self, pfn: int) -> Optional[Block]:
        b = self.blocks.get(pfn // self.block_pages)
        return b if b is not None and b.first_pfn <= pfn < b.first_pfn + b.npages else None

    def normal_nodes(self) -> list[int]:
        """N_NORMAL_MEMORY: nodes with an online block in ZONE_NORMAL."""
        return sorted({b.nid for b in self.blocks.values() if b.online and b.zone == "Normal"})

    def registered_nodes(self) -> list[int]:
        """Nodes with a nodeN directory: present from the start, or hot-added
        (they keep it when their memory goes offline, as the kernel keeps a
        node registered until its memory is removed)."""
        present = {b.nid for b in self.blocks.values() if b.present}
        return [nid for nid, n in self.m.nodes.items() if n.spec.present or nid in present]

    def device_of_node(self, nid: int) -> Optional["Device"]:
        owner = self.m.pool_owner.get(self.m.nodes[nid].pool)
        return self.m.devices[owner] if owner is not None else None

    def regions_by_id(self) -> dict[int, "Region"]:
        regions = self.m.regions
        # A removed region has no pages left (rmdir frees them at once).
        return {r.id: r for r in regions.by_name.values()} if regions is not None else {}

    def _refresh(self, nid: int) -> None:
        node = self.m.nodes[nid]
        blocks = self.node_blocks(nid)
        node.online_pages = sum(b.npages for b in blocks if b.online)
        node.hidden_free = sum(b.hidden_free for b in blocks if not b.online)
        self.m.placement_changed()

    def _census(self, pfn: int, n: int) -> tuple[int, int]:
        """(used, retired) frames of [pfn, pfn + n)."""
        out = ffi.new("uint64_t[2]")
        lib.cdm_frames_census(self.m.core, pfn, n, out)
        return out[0], out[1]

    def _owners(self, pfn: int, n: int) -> dict[int, list[int]]:
        """The pages living on frames [pfn, pfn + n): region id -> sorted pages."""
        core = self.m.core
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

    def _pinned_in(self, pfn: int, n: int) -> bool:
        """Whether a pinned page lives on frames [pfn, pfn + n)."""
        m = self.m
        pool = lib.cdm_pfn_pool(m.core, pfn)
        if pool < 0 or not m.pool(pool).nr_pinned:
            return False
        regions = self.regions_by_id()
        for rid, pages in self._owners(pfn, n).items():
            region = regions.get(rid)
            if region is None or not region.core.nr_pinned:
                continue
            for first, count in runs(pages):
                ptes = ffi.new("uint64_t[]", count)
                lib.cdm_region_ptes(m.core, region.core, first, count, ptes)
                for pte in ptes:
                    if pte & lib.CDM_PTE_PINNED and pfn <= pte & lib.CDM_PTE_PFN_MASK < pfn + n:
                        return True
        return False

    # ------------------------------------------------------------ where pages go

    def _node_target(self, nid: int) -> "Target":
        from .machine import Target
        # device_memory=False: moving what exists, never allocating absent pages.
        return Target(f"node:{nid}", self.m.nodes[nid].pool, False)

    def _orderer(self, home: Optional[int], sysram_only: bool, stay: bool):
        """A function (region, page) -> the targets to try for a page that
        must leave its frame: its own node first when ``stay`` (other blocks),
        then the nodes its policy falls back to, then any node that takes
        implicit allocations, by distance from ``home`` (offline_pages()
        takes any node with memory; the CDM rules keep isolated nodes out
        unless the policy names them).  ``sysram_only``: system RAM only."""
        m = self.m
        usable = set(m.usable_nodes())
        start = home if home is not None else m.default_cpu_node
        extra = sorted((n for n in m.nodes if not m.nodes[n].isolated),
                       key=lambda n: (m.topo.distance[(start, n)], n))
        placements: dict = {}
        cache: dict = {}

        def allowed(nid: int) -> bool:
            return nid in usable and (not sysram_only or m.nodes[nid].spec.kind == "sysram")

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
                got = cache[key] = tuple(self._node_target(n) for n in seen)
            return got
        return order

    async def _move_pages(self, region: "Region", pages: list[int], pool: int,
                          order: Callable) -> tuple[int, list[tuple[int, int]]]:
        """Migrates pages of region that live in pool, each to the first of
        its targets with room.  Returns (moved, [(page, errno)] not moved);
        pages that turned out gone (truncated, poisoned) are not reported."""
        m = self.m
        groups: dict[tuple, list[int]] = defaultdict(list)
        for p in pages:
            groups[order(region, p)].append(p)
        moved = 0
        failed: list[tuple[int, int]] = []
        for targets, remaining in groups.items():
            for target in targets:
                nomem = []
                for first, n in runs(remaining):
                    res = await migrate.migrate_range(m, region, first, n, target, from_pools=1 << pool)
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

    async def _evacuate(self, pfn: int, n: int, order: Callable) -> int:
        """Moves every page off frames [pfn, pfn + n) (isolated beforehand, so
        nothing new lands there).  Returns the pages moved; EBUSY for a pinned
        page or pages that stay busy, ENOMEM when they have nowhere to go."""
        m = self.m
        pool = lib.cdm_pfn_pool(m.core, pfn)
        total = 0
        for attempt in range(MAX_PASSES):
            owners = self._owners(pfn, n)
            if not owners:
                if not self._census(pfn, n)[0]:
                    return total
                await trio.sleep(0.005)      # a migration is finishing into it
                continue
            regions = self.regions_by_id()
            progress = nomem = False
            for rid, pages in owners.items():
                region = regions.get(rid)
                if region is None:
                    continue
                moved, failed = await self._move_pages(region, pages, pool, order)
                total += moved
                progress |= moved > 0
                for page, err in failed:
                    if err == errno.ENOMEM:
                        nomem = True
                    elif err == errno.EBUSY and self._page_pinned(region, page):
                        raise OSError(errno.EBUSY, f"page {page} of region {region.name} is pinned")
            if not progress:
                if nomem:
                    raise OSError(errno.ENOMEM, "no memory left for the pages that must move")
                await trio.sleep(min(0.001 * (attempt + 1), 0.05))
        raise OSError(errno.EBUSY, "pages stayed busy")

    def _page_pinned(self, region: "Region", page: int) -> bool:
        if region.removed:
            return False
        pte = ffi.new("uint64_t[1]")
        lib.cdm_region_ptes(self.m.core, region.core, page, 1, pte)
        return bool(pte[0] & lib.CDM_PTE_PINNED)

    # ------------------------------------------------------------ blocks

    def _online(self, b: Block, zone: str) -> None:
        lib.cdm_block_isolate(self.m.core, b.pool, b.index, 0)
        b.online, b.zone, b.hidden_free, b.taken_by = True, zone, 0, None
        self._refresh(b.nid)

    def _offlined(self, b: Block, taken_by: Optional[str] = None) -> None:
        """Marks an isolated, empty block offline."""
        used, retired = self._census(b.first_pfn, b.npages)
        b.online, b.zone, b.going_offline, b.taken_by = False, "", False, taken_by
        b.hidden_free = b.npages - used - retired

    def _zone_for(self, b: Block, word: str) -> str:
        if word == "online_kernel":
            if self.kind(b) == "cdm":
                raise ValueError("cdm memory is ZONE_MOVABLE only")
            return "Normal"
        if word == "online_movable":
            return "Movable"
        return self.default_zone(b)

    async def online_block(self, b: Block, word: str = "online", strict: bool = True) -> None:
        zone = self._zone_for(b, word)
        async with self.lock:
            if b.online:
                if strict:      # device_online() of an online device: EINVAL
                    raise ValueError(f"memory{b.id} is already online")
                return
            dev = self.device_of_node(b.nid)
            if dev is not None and not dev.online:
                raise OSError(errno.ENODEV, f"its device {dev.name} is offline")
            self._online(b, zone)
            self._ensure_node_dir(b.nid)
            log.info("memory%d online (%s)", b.id, zone)

    async def offline_block(self, b: Block, strict: bool = True) -> None:
        async with self.lock:
            if not b.online:
                if strict:
                    raise ValueError(f"memory{b.id} is already offline")
                return
            await self._offline_blocks([b], home=b.nid, sysram_only=False, stay=True)
            log.info("memory%d offline", b.id)

    async def _offline_blocks(self, blocks: list[Block], home: Optional[int], sysram_only: bool,
                              stay: bool, taken_by: Optional[str] = None) -> None:
        """offline_pages() of blocks: pinned check, isolate, migrate, verify, offline."""
        m = self.m
        for b in blocks:
            if self._pinned_in(b.first_pfn, b.npages):
                raise OSError(errno.EBUSY, f"memory{b.id} holds a pinned page")
        for b in blocks:
            lib.cdm_block_isolate(m.core, b.pool, b.index, 1)
            b.going_offline = True
        try:
            order = self._orderer(home, sysram_only, stay)
            for b in blocks:
                await self._evacuate(b.first_pfn, b.npages, order)
        except BaseException:
            for b in blocks:
                lib.cdm_block_isolate(m.core, b.pool, b.index, 0)
                b.going_offline = False
            raise
        for b in blocks:
            self._offlined(b, taken_by)
        for nid in {b.nid for b in blocks}:
            self._refresh(nid)

    def state_show(self, b: Block) -> str:
        return formats.memory_state("going-offline" if b.going_offline else
                                    "online" if b.online else "offline")

    async def state_store(self, b: Block, text: str) -> None:
        word = text.strip()
        if word not in ONLINE_TYPES:
            raise ValueError(f"expected one of {', '.join(ONLINE_TYPES)}")
        if word == "offline":
            await self.offline_block(b)
        else:
            await self.online_block(b, word)

    async def online_store(self, b: Block, text: str) -> None:
        """The device core's ``online``: 1/0, a no-op when already there."""
        if parse_bool01(text):
            await self.online_block(b, "online", strict=False)
        else:
            await self.offline_block(b, strict=False)

    def valid_zones(self, b: Block) -> str:
        """valid_zones_show(): the zone of an online block; for an offline
        one the default zone first, then the others it could go to."""
        if b.online:
            return formats.memory_valid_zones([b.zone])
        return formats.memory_valid_zones(["Movable"] if self.kind(b) == "cdm" else ["Normal", "Movable"])

    def auto_online_store(self, text: str) -> None:
        word = text.strip()
        if word not in ONLINE_TYPES:
            raise ValueError(f"expected one of {', '.join(ONLINE_TYPES)}")
        self.auto_online = word

    async def probe_store(self, text: str) -> None:
        """Memory hot-add of the block at a physical address (probe_store())."""
        addr = parse_address(text)
        if addr % self.block_size:
            raise ValueError("the address is not block aligned")
        b = self.blocks.get(addr // self.block_size)
        if b is None:
            raise ValueError("no configured memory at that address")
        async with self.lock:
            if b.present:
                raise OSError(errno.EEXIST, f"memory{b.id} is already present")
            b.present = True
            b.hidden_free = b.npages
            self._add_block_files(b)
            log.info("memory%d added (node %d)", b.id, b.nid)
            dev = self.device_of_node(b.nid)
            if self.auto_online != "offline" and (dev is None or dev.online):
                try:
                    zone = self._zone_for(b, self.auto_online)
                except ValueError:
                    zone = None     # online_kernel for cdm memory: stays offline
                if zone is not None:
                    self._online(b, zone)
            self._ensure_node_dir(b.nid)

    # ------------------------------------------------------------ devices

    async def device_offline(self, dev: "Device") -> None:
        """Evacuates the device's memory to system RAM (migrate_device_range),
        then takes it out of service.  EBUSY, and nothing changed, if a
        pinned page is there."""
        m = self.m
        async with self.lock:
            if not dev.online:
                return
            pool = m.pool(dev.pool)
            if pool.nr_pinned:
                raise OSError(errno.EBUSY, f"a pinned page is in {dev.name}'s memory")
            node = dev.spec.node if dev.spec.coherent else None
            blocks = [b for b in self.node_blocks(node) if b.online] if node is not None else []
            dev.online = False
            lib.cdm_pool_isolate(m.core, dev.pool, 1)
            m.placement_changed()
            for b in blocks:
                lib.cdm_block_isolate(m.core, b.pool, b.index, 1)
                b.going_offline = True
            try:
                order = self._orderer(node, sysram_only=True, stay=False)
                moved = await self._evacuate(pool.base_pfn, pool.npages, order)
            except BaseException:
                for b in blocks:
                    lib.cdm_block_isolate(m.core, b.pool, b.index, 0)
                    b.going_offline = False
                lib.cdm_pool_isolate(m.core, dev.pool, 0)
                dev.online = True
                m.placement_changed()
                raise
            for b in blocks:
                self._offlined(b, taken_by=dev.name)
            if node is not None:
                self._refresh(node)
            dev.mirrors.clear()
            log.info("device %s offline: %d pages moved to system RAM", dev.name, moved)

    async def device_online(self, dev: "Device") -> None:
        """Back in service, its memory empty (after a link loss, fresh)."""
        m = self.m
        async with self.lock:
            if dev.online:
                return
            pool = m.pool(dev.pool)
            if dev.name in self.link_lost:
                lib.cdm_frames_unretire(m.core, pool.base_pfn, pool.npages)
                self.link_lost.discard(dev.name)
            lib.cdm_pool_isolate(m.core, dev.pool, 0)
            if dev.spec.coherent:
                for b in self.node_blocks(dev.spec.node):
                    if b.taken_by == dev.name:
                        self._online(b, self.default_zone(b))
                    elif not b.online and b.present:
                        self._offlined(b)       # a link loss's frames came back
                self._refresh(dev.spec.node)
            dev.online = True
            dev.mirrors.clear()
            m.placement_changed()
            log.info("device %s online", dev.name)

    async def device_online_store(self, dev: "Device", text: str) -> None:
        if parse_bool01(text):
            await self.device_online(dev)
        else:
            await self.device_offline(dev)

    async def link_down(self, dev: "Device") -> None:
        """The device's link is lost: every page in its memory is poisoned at
        once, the device goes offline.  Pages elsewhere are untouched."""
        m = self.m
        async with self.lock:
            dev.online = False
            self.link_lost.add(dev.name)
            lib.cdm_pool_isolate(m.core, dev.pool, 1)
            m.placement_changed()
            coherent = dev.spec.coherent
            blocks = [b for b in self.node_blocks(dev.spec.node) if b.online] if coherent else []
            for b in blocks:
                lib.cdm_block_isolate(m.core, b.pool, b.index, 1)
            pool = m.pool(dev.pool)
            busy = ffi.new("uint64_t *")
            poisoned = 0
            for attempt in range(MAX_PASSES):
                owners = self._owners(pool.base_pfn, pool.npages)
                if not owners and not self._census(pool.base_pfn, pool.npages)[0]:
                    break
                regions = self.regions_by_id()
                waiting = None
                for rid, pages in owners.items():
                    region = regions.get(rid)
                    if region is None or region.removed:     # removed meanwhile: no pages left
                        continue
                    lo, n = pages[0], pages[-1] + 1 - pages[0]
                    cached = [run for run in runs(pages) if coherent and m.cpu_mapped(region, *run)]
                    poisoned += lib.cdm_region_poison_pool(m.core, region.core, lo, n, dev.pool, busy)
                    if busy[0]:
                        waiting = region
                    m.invalidate_devices(region, lo, n)
                    for run in cached:
                        await self._drop_cpu_copies(region, *run)
                if waiting is not None:
                    await waiting.wait_unlocked()
                elif not owners:
                    await trio.sleep(0.005)
            for b in blocks:
                self._offlined(b, taken_by=dev.name)
            if coherent:
                self._refresh(dev.spec.node)
            dev.mirrors.clear()
            log.warning("device %s: link down, %d pages lost", dev.name, poisoned)

    async def inject_store(self, dev: "Device", text: str) -> None:
        """``link_down`` | ``ecc ADDRESS`` | ``fail_alloc N``."""
        words = text.split()
        if not words or words[0] not in INJECT:
            raise ValueError(f"expected one of {', '.join(INJECT)}")
        m = self.m
        pool = m.pool(dev.pool)
        if words[0] == "link_down":
            if len(words) != 1:
                raise ValueError("link_down takes no argument")
            await self.link_down(dev)
        elif words[0] == "ecc":
            if len(words) != 2:
                raise ValueError("expected ecc ADDRESS")
            addr = parse_address(words[1])
            if not pool.base_pfn <= addr // PAGE_SIZE < pool.base_pfn + pool.npages:
                raise ValueError(f"address outside {dev.name}'s memory")
            await self.hard_offline(addr)
        else:
            if len(words) != 2 or not words[1].isdigit():
                raise ValueError("expected fail_alloc N")
            count = int(words[1])
            if count >= 1 << 64:
                raise ValueError("N out of range")
            pool.fail_alloc = count

    # ------------------------------------------------------------ memory failure

    def _check_pfn(self, addr: int) -> int:
        pfn = addr // PAGE_SIZE
        if lib.cdm_pfn_pool(self.m.core, pfn) < 0:
            raise ValueError("no memory at that address")
        b = self.block_of_pfn(pfn)
        if b is not None and not b.online:
            raise OSError(errno.ENXIO, "memory outside kernel control (offline)")
        return pfn

    async def hard_offline(self, addr: int) -> None:
        """memory_failure(): the frame is poisoned; its page's data is lost."""
        pfn = self._check_pfn(addr)
        m = self.m
        rid = ffi.new("uint32_t *")
        page = ffi.new("uint64_t *")
        async with self.lock:
            for _ in range(MAX_PASSES):
                if lib.cdm_pfn_owner(m.core, pfn, rid, page) == -errno.ENOENT:
                    rc = lib.cdm_frame_retire(m.core, pfn, lib.CDM_FRAME_POISONED)
                    if rc == 1:     # a migration's copy just took it: let it land
                        lib.cdm_frames_unretire(m.core, pfn, 1)
                        await trio.sleep(0.001)
                        continue
                    return
                region = self.regions_by_id().get(rid[0])
                if region is None:
                    await trio.sleep(0.001)
                    continue
                p = page[0]
                private = m.pool(lib.cdm_pfn_pool(m.core, pfn)).flags & lib.CDM_POOL_PRIVATE
                rc = lib.cdm_page_poison(m.core, region.core, p, pfn)
                if rc == -errno.EAGAIN:
                    await region.wait_unlocked()
                    continue
                if rc:
                    continue        # the page moved meanwhile: look again
                m.invalidate_devices(region, p, 1)
                if not private:     # a device-private page is never in the page cache
                    await self._drop_cpu_copies(region, p, 1)
                log.warning("pfn %#x: page %d of region %s poisoned", pfn, p, region.name)
                return
            raise OSError(errno.EBUSY, "the page kept moving")

    async def soft_offline(self, addr: int) -> None:
        """soft_offline_page(): the data moves to another frame (its node
        first), the frame is retired."""
        pfn = self._check_pfn(addr)
        m = self.m
        pool = lib.cdm_pfn_pool(m.core, pfn)
        rid = ffi.new("uint32_t *")
        page = ffi.new("uint64_t *")
        async with self.lock:
            for _ in range(MAX_PASSES):
                rc = lib.cdm_frame_retire(m.core, pfn, 0)
                if rc in (0, -errno.EALREADY):
                    return          # a free frame retired now, or one retired already
                # Used: retired once its page leaves; collect moves it even
                # within its own pool.
                if lib.cdm_pfn_owner(m.core, pfn, rid, page) == -errno.ENOENT:
                    lib.cdm_frames_unretire(m.core, pfn, 1)
                    await trio.sleep(0.001)     # a migration's copy: let it land
                    continue
                region = self.regions_by_id().get(rid[0])
                if region is None:
                    lib.cdm_frames_unretire(m.core, pfn, 1)
                    await trio.sleep(0.001)
                    continue
                p = page[0]
                _, failed = await self._move_pages(region, [p], pool, self._soft_order(pool))
                if lib.cdm_pfn_owner(m.core, pfn, rid, page) == -errno.ENOENT:
                    return          # moved (or freed): the frame is retired
                lib.cdm_frames_unretire(m.core, pfn, 1)
                errs = {err for _, err in failed}
                if errno.EBUSY in errs and self._page_pinned(region, p):
                    raise OSError(errno.EBUSY, "the page is pinned")
                if errno.ENOMEM in errs:
                    raise OSError(errno.ENOMEM, "no free frame to move the page to")
                if region.migrations:
                    await region.wait_unlocked()
                else:
                    await trio.sleep(0.001)
            raise OSError(errno.EBUSY, "the page kept moving")

    def _soft_order(self, pool: int) -> Callable:
        m = self.m
        nid = m.pool_node.get(pool)
        if nid is not None:
            return self._orderer(nid, sysram_only=False, stay=True)
        from .machine import Target
        name = m.pool_owner[pool]
        own = Target(f"private:{name}", pool, False)
        sysram = self._orderer(None, sysram_only=True, stay=False)
        return lambda region, page: (own,) + sysram(region, page)

    async def _drop_cpu_copies(self, region: "Region", first: int, n: int) -> None:
        """Drops the CPU's copies of poisoned pages so that the next access
        faults, gets EIO and dies with SIGBUS.  The first invalidation writes
        dirty copies back; that WRITE fails (EIO) and leaves the copy cached,
        clean; the second drops it."""
        await self.m.cpu_unmap(region, first, n)
        await self.m.cpu_unmap(region, first, n)

    async def hard_offline_store(self, text: str) -> None:
        await self.hard_offline(parse_address(text))

    async def soft_offline_store(self, text: str) -> None:
        await self.soft_offline(parse_address(text))

    # ------------------------------------------------------------ pins

    def device_pools(self) -> int:
        """Pools of device memory (cdm nodes, private memory), a bit each."""
        m = self.m
        mask = m.private_pools_mask()
        for node in m.nodes.values():
            if node.spec.kind == "cdm":
                mask |= 1 << node.pool
        return mask

    def _pages_in(self, region: "Region", first: int, n: int, mask: int) -> list[int]:
        core = self.m.core
        out = []
        for s, k in region.present_spans(first, first + n):
            ptes = ffi.new("uint64_t[]", k)
            lib.cdm_region_ptes(core, region.core, s, k, ptes)
            for i, pte in enumerate(ptes):
                if pte & lib.CDM_PTE_PRESENT and not pte & lib.CDM_PTE_POISONED \
                        and mask >> ((pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT) & 1:
                    out.append(s + i)
        return out

    async def pin(self, region: "Region", first: int, n: int) -> int:
        """A long-term pin of pages [first, first + n): absent pages are
        faulted in, pages in device memory go to system RAM first
        (FOLL_LONGTERM); then none of them migrates.  Returns pages pinned."""
        m = self.m
        deny = self.device_pools()
        res = ffi.new("struct cdm_rw_result *")
        order = self._orderer(None, sysram_only=True, stay=False)
        for _ in range(MAX_PASSES):
            try:
                await m.populate(region, first, n)
            except OSError as e:
                raise OSError(errno.ENOMEM, "no memory to fault the range in") from e
            failed = []
            by_pool: dict[int, list[int]] = defaultdict(list)
            for p in self._pages_in(region, first, n, deny):
                pte = ffi.new("uint64_t[1]")
                lib.cdm_region_ptes(m.core, region.core, p, 1, pte)
                by_pool[(pte[0] & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT].append(p)
            for pool, pages in by_pool.items():
                failed += (await self._move_pages(region, pages, pool, order))[1]
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

    def unpin(self, region: "Region", first: int, n: int) -> int:
        res = ffi.new("struct cdm_rw_result *")
        lib.cdm_region_pin(self.m.core, region.core, first, n, 0, 0, res)
        return res.allocated

    def pinned_ranges(self, region: "Region") -> list[tuple[int, int]]:
        """Runs of pinned pages: (first, count), found by the core's walk of
        the populated parts of the page table."""
        if not region.core.nr_pinned:
            return []
        core = self.m.core
        lo = ffi.new("uint64_t[]", OWNER_BATCH)
        length = ffi.new("uint64_t[]", OWNER_BATCH)
        nxt = ffi.new("uint64_t *")
        out: list[tuple[int, int]] = []
        start = 0
        while start < region.npages:
            count = lib.cdm_region_flag_runs(core, region.core, start, region.npages - start,
                                             lib.CDM_PTE_PINNED, lo, length, OWNER_BATCH, nxt)
            for a, k in zip(ffi.unpack(lo, count), ffi.unpack(length, count)):
                if out and out[-1][0] + out[-1][1] == a:
                    out[-1] = (out[-1][0], out[-1][1] + k)
                else:
                    out.append((a, k))
            if nxt[0] <= start:
                break
            start = nxt[0]
        return out

    async def advise_store(self, region: "Region", text: str) -> None:
        """``START LENGTH ADVICE`` (SPEC §6.3): ``pin`` or ``unpin`` for now."""
        from .regionfiles import parse_range
        words = text.split()
        if len(words) != 3:
            raise ValueError("expected START LENGTH ADVICE")
        first, n = parse_range(region, words[0], words[1])
        if words[2] not in ADVICE:
            raise ValueError(f"unknown advice {words[2]!r} (expected {' or '.join(ADVICE)})")
        if words[2] == "pin":
            await self.pin(region, first, n)
        else:
            self.unpin(region, first, n)

    def advise_show(self, region: "Region") -> str:
        return "".join(f"{a * PAGE_SIZE} {k * PAGE_SIZE} pin\n" for a, k in self.pinned_ranges(region))

    # ------------------------------------------------------------ sys tree

    def _ensure_node_dir(self, nid: int) -> None:
        """nodeN appears once it has memory (a hot-added memory-only node)."""
        if self.tree is None:
            return
        from . import sysfs
        tree = self.tree
        nodes = tree.path(NODE_DIR)
        d = nodes.children.get(f"node{nid}")
        if d is None:
            sysfs.add_node(tree, nodes, self.m, nid)
            tree.add(tree.path("sys/bus/node/devices"), f"node{nid}",
                     _link(f"../../../devices/system/node/node{nid}"))
            d = nodes.children[f"node{nid}"]
            for b in self.node_blocks(nid):
                if b.present:
                    tree.add(d, f"memory{b.id}", _link(f"../../memory/memory{b.id}"))

    def _add_block_files(self, b: Block) -> None:
        from .tree import Attr, Dir
        tree = self.tree
        if tree is None:
            return
        d = tree.add(tree.path(MEMORY_DIR), f"memory{b.id}", Dir())
        tree.add(d, "phys_index", Attr(lambda: formats.memory_phys_index(b.id)))
        tree.add(d, "state", Attr(lambda: self.state_show(b), lambda t: self.state_store(b, t)))
        tree.add(d, "online", Attr(lambda: f"{int(b.online)}\n", lambda t: self.online_store(b, t)))
        tree.add(d, "valid_zones", Attr(lambda: self.valid_zones(b)))
        tree.add(d, "removable", Attr(lambda: "1\n"))
        tree.add(d, "phys_device", Attr(lambda: "0\n"))
        tree.add(d, f"node{b.nid}", _link(f"../../node/node{b.nid}"))
        tree.add(tree.path("sys/bus/memory/devices"), f"memory{b.id}",
                 _link(f"../../../devices/system/memory/memory{b.id}"))
        node_dir = tree.path(NODE_DIR).children.get(f"node{b.nid}")
        if node_dir is not None and f"memory{b.id}" not in node_dir.children:
            tree.add(node_dir, f"memory{b.id}", _link(f"../../memory/memory{b.id}"))


def _link(target: str):
    from .tree import Link
    return Link(target)


def build(tree: "Tree", m: "Machine") -> None:
    """Adds sys/devices/system/memory and the devices' online/inject files."""
    from .tree import Attr
    lc = m.lifecycle
    lc.tree = tree
    mem = tree.path(MEMORY_DIR)
    tree.add(mem, "block_size_bytes", Attr(lambda: formats.block_size_bytes(lc.block_size)))
    tree.add(mem, "auto_online_blocks", Attr(lambda: f"{lc.auto_online}\n", lc.auto_online_store))
    tree.add(mem, "probe", Attr(None, lc.probe_store))
    tree.add(mem, "soft_offline_page", Attr(None, lc.soft_offline_store))
    tree.add(mem, "hard_offline_page", Attr(None, lc.hard_offline_store))
    tree.path("sys/bus/memory/devices")
    for b in sorted(lc.blocks.values(), key=lambda b: b.id):
        if b.present:
            lc._add_block_files(b)
    devices = tree.dir(tree.root, "devices")
    for dev in m.devices.values():
        d = devices.children[dev.name]
        tree.add(d, "online", Attr(lambda dev=dev: f"{int(dev.online)}\n",
                                   lambda t, dev=dev: lc.device_online_store(dev, t)))
        tree.add(d, "inject", Attr(None, lambda t, dev=dev: lc.inject_store(dev, t)))
