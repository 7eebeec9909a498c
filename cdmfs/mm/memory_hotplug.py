"""Memory hotplug (mm/memory_hotplug.c, drivers/base/memory.c's block states):
the CDM design's first requirement is that a device can be taken out of
service at any time, its data migrated away.

* **Memory blocks**: every node is cut into blocks of ``block_size``; a block
  is online (in a zone, Normal or Movable) or offline.  Offlining one isolates
  it in the allocator, migrates every page off it (to other blocks of its node
  first, then by the region's policy and the CDM isolation rules, as
  offline_pages() does), checks it is empty and takes it out of MemTotal.  A
  node without online memory leaves ``has_memory``.
* **Hot-add**: a node configured with ``present = false`` has a pool but no
  blocks until ``add_memory`` adds them, onlined by ``auto_online``.
* **Device memory offline** (HMM's migrate_device_range): every page in a
  device's memory goes to system RAM by its region's policy; then the memory
  takes no page and is no target.  Online brings it back empty.

The native core keeps the allocator exact (isolated blocks and pools, retired
frames, the reverse map); this module decides what moves where.  Every
operation that changes the machine's memory runs under one lock, as the
kernel's device_hotplug_lock serializes them; memory failure and long-term
pins take it too.  What appears (a block, a node's memory) is told through
the machine's events, for the sys tree to show.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import trio

from .._core import lib
from ..config import PAGE_SIZE
from . import migrate

if TYPE_CHECKING:
    from .machine import Machine, PageMap

log = logging.getLogger(__name__)

# memory/state and auto_online_blocks words (online_type_to_str[] in memory.c).
ONLINE_TYPES = ("offline", "online", "online_kernel", "online_movable")


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


class MemoryHotplug:
    """Memory blocks and the hotplug operations of one machine."""

    def __init__(self, m: "Machine"):
        self.m = m
        self.block_size = m.topo.block_size
        self.block_pages = self.block_size // PAGE_SIZE
        self.blocks: dict[int, Block] = {}
        self.auto_online = "online"
        self.lock = trio.Lock()
        self.link_lost: set[str] = set()     # devices whose memory a link loss poisoned
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
            node.numa_balancing = node.reclaim = spec.kind != "cdm"
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

    def pgmap_of_node(self, nid: int) -> Optional["PageMap"]:
        """The device whose memory node nid is (a CDM node), if any."""
        owner = self.m.pool_owner.get(self.m.nodes[nid].pool)
        return self.m.pgmaps[owner] if owner is not None else None

    def _refresh(self, nid: int) -> None:
        node = self.m.nodes[nid]
        blocks = self.node_blocks(nid)
        node.online_pages = sum(b.npages for b in blocks if b.online)
        node.hidden_free = sum(b.hidden_free for b in blocks if not b.online)
        self.m.placement_changed()

    # ------------------------------------------------------------ blocks

    def _online(self, b: Block, zone: str) -> None:
        lib.cdm_block_isolate(self.m.core, b.pool, b.index, 0)
        b.online, b.zone, b.hidden_free, b.taken_by = True, zone, 0, None
        self._refresh(b.nid)

    def _offlined(self, b: Block, taken_by: Optional[str] = None) -> None:
        """Marks an isolated, empty block offline."""
        used, retired = migrate.frames_census(self.m, b.first_pfn, b.npages)
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
            dev = self.pgmap_of_node(b.nid)
            if dev is not None and not dev.online:
                raise OSError(errno.ENODEV, f"its device {dev.owner} is offline")
            self._online(b, zone)
            self.m.events.emit("node_registered", nid=b.nid)
            log.info("memory%d online (%s)", b.id, zone)
            self.m.events.emit("memory_online", block=f"memory{b.id}", node=b.nid)

    async def offline_block(self, b: Block, strict: bool = True) -> None:
        async with self.lock:
            if not b.online:
                if strict:
                    raise ValueError(f"memory{b.id} is already offline")
                return
            await self._offline_blocks([b], home=b.nid, sysram_only=False, stay=False, leave=True)
            log.info("memory%d offline", b.id)
            self.m.events.emit("memory_offline", block=f"memory{b.id}", node=b.nid)

    async def _offline_blocks(self, blocks: list[Block], home: Optional[int], sysram_only: bool,
                              stay: bool, taken_by: Optional[str] = None, leave: bool = False) -> None:
        """offline_pages() of blocks: pinned check, isolate, migrate, verify, offline."""
        m = self.m
        for b in blocks:
            if migrate.pinned_in(self.m, b.first_pfn, b.npages):
                raise OSError(errno.EBUSY, f"memory{b.id} holds a pinned page")
        for b in blocks:
            lib.cdm_block_isolate(m.core, b.pool, b.index, 1)
            b.going_offline = True
        try:
            order = migrate.orderer(self.m, home, sysram_only, stay, leave)
            for b in blocks:
                await migrate.evacuate(self.m, b.first_pfn, b.npages, order)
        except BaseException:
            for b in blocks:
                lib.cdm_block_isolate(m.core, b.pool, b.index, 0)
                b.going_offline = False
            raise
        for b in blocks:
            self._offlined(b, taken_by)
        for nid in {b.nid for b in blocks}:
            self._refresh(nid)

    async def add_memory(self, addr: int) -> None:
        """Memory hot-add of the block at a physical address (add_memory(),
        as the ``probe`` file asks)."""
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
            self.m.events.emit("memory_added", block=b)
            log.info("memory%d added (node %d)", b.id, b.nid)
            dev = self.pgmap_of_node(b.nid)
            if self.auto_online != "offline" and (dev is None or dev.online):
                try:
                    zone = self._zone_for(b, self.auto_online)
                except ValueError:
                    zone = None     # online_kernel for cdm memory: stays offline
                if zone is not None:
                    self._online(b, zone)
            self.m.events.emit("node_registered", nid=b.nid)

    # ------------------------------------------------------------ device memory

    async def offline_device_memory(self, dev: "PageMap") -> bool:
        """Evacuates a device's memory to system RAM (migrate_device_range),
        then takes it out of service.  EBUSY, and nothing changed, if a
        pinned page is there.  Whether it was online."""
        m = self.m
        async with self.lock:
            if not dev.online:
                return False
            pool = m.pool_stats(dev.pool)
            if pool.nr_pinned:
                raise OSError(errno.EBUSY, f"a pinned page is in {dev.owner}'s memory")
            node = dev.spec.node if dev.spec.coherent else None
            blocks = [b for b in self.node_blocks(node) if b.online] if node is not None else []
            dev.online = False
            lib.cdm_pool_isolate(m.core, dev.pool, 1)
            m.placement_changed()
            for b in blocks:
                lib.cdm_block_isolate(m.core, b.pool, b.index, 1)
                b.going_offline = True
            try:
                order = migrate.orderer(self.m, node, sysram_only=True, stay=False)
                moved = await migrate.evacuate(self.m, pool.base_pfn, pool.npages, order)
            except BaseException:
                for b in blocks:
                    lib.cdm_block_isolate(m.core, b.pool, b.index, 0)
                    b.going_offline = False
                lib.cdm_pool_isolate(m.core, dev.pool, 0)
                dev.online = True
                m.placement_changed()
                raise
            for b in blocks:
                self._offlined(b, taken_by=dev.owner)
            if node is not None:
                self._refresh(node)
            log.info("device %s offline: %d pages moved to system RAM", dev.owner, moved)
            m.events.emit("device_offline", device=dev.owner, moved=moved)
            return True

    async def online_device_memory(self, dev: "PageMap") -> bool:
        """A device's memory back in service, empty (after a link loss, fresh).
        Whether it was offline."""
        m = self.m
        async with self.lock:
            if dev.online:
                return False
            pool = m.pool_stats(dev.pool)
            if dev.owner in self.link_lost:
                lib.cdm_frames_unretire(m.core, pool.base_pfn, pool.npages)
                self.link_lost.discard(dev.owner)
            lib.cdm_pool_isolate(m.core, dev.pool, 0)
            if dev.spec.coherent:
                for b in self.node_blocks(dev.spec.node):
                    if b.taken_by == dev.owner:
                        self._online(b, self.default_zone(b))
                    elif not b.online and b.present:
                        self._offlined(b)       # a link loss's frames came back
                self._refresh(dev.spec.node)
            dev.online = True
            m.placement_changed()
            log.info("device %s online", dev.owner)
            m.events.emit("device_online", device=dev.owner)
            return True
