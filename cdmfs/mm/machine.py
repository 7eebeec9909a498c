"""The emulated machine: NUMA nodes and device memory as native pools, regions,
and the allocation plans that policies turn into (mm/page_alloc.c's part).

This is the memory manager's root object.  The drivers, the sys tree and the
filesystem ask it; it knows none of them.  What it needs from above it takes
as hooks: ``cpu_unmap`` (the filesystem invalidates the CPU's copies) and
``mmu_notifiers`` (each device drops its mirrored entries); what it tells the
world goes out as ``events``.
"""
from __future__ import annotations

import errno
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Optional

from .. import config
from .._core import ffi, lib
from ..config import PAGE_SIZE, Topology
from ..lib.events import Events
from ..lib.sched import cond_resched
from . import mempolicy as mpol
from . import vmscan
from .evict import DeviceLru
from .memory_hotplug import MemoryHotplug
from .memory_tiers import MemoryTiers
from .migrate_device import Target
from .numa_balancing import NUMA_BALANCING_NORMAL, NumaBalancing
from .trace import MachineTrace

if TYPE_CHECKING:
    from .region import Region

log = logging.getLogger(__name__)

KB_PER_PAGE = PAGE_SIZE // 1024
POPULATE_CHUNK = 1 << 16     # pages allocated per native call (a few ms at most)
FAULTBACK_BATCH = 64         # fault-back log entries taken per native call
# Where a fault-back sends pages: each by its range's policy, as a first touch.
POLICY_TARGET = Target("policy", -1, False)


@dataclass
class Node:
    """One emulated NUMA node: its configuration and its native pool."""
    spec: object
    pool: int
    isolated: bool
    weight: int = 1                      # weighted_interleave weight (sysfs mempolicy)
    numa_balancing: bool = True
    reclaim: bool = True
    # Kept by memory hotplug (memory blocks): frames in online blocks, and the
    # free frames of the blocks that are not online (not in MemFree).
    online_pages: int = 0
    hidden_free: int = 0
    # Node events Python counts (pgpromote_*, pgdemote_*, pgsteal_*): node vmstat.
    events: Counter = field(default_factory=Counter)

    @property
    def id(self) -> int:
        return self.spec.id

    @property
    def online(self) -> bool:
        """Whether the node has online memory (N_MEMORY)."""
        return self.online_pages > 0


@dataclass
class PrivateMemory:
    """A device's private memory: a pool the CPU cannot map."""
    device: str
    spec: object
    pool: int


@dataclass
class PageMap:
    """A device's memory as the memory manager knows it (struct dev_pagemap):
    its owner, its pool (its CDM node's, or its private memory), and whether
    the device is in service.  The device itself is the driver's."""
    owner: str
    spec: config.DeviceSpec
    pool: int
    online: bool = True


@dataclass
class _Plan:
    """A native struct cdm_plan and the arrays it points into (kept alive here)."""
    cdata: object
    table: object
    fallback: object
    placement: mpol.Placement = field(repr=False)


class Machine:
    def __init__(self, topo: Topology):
        self.topo = topo
        self.core = ffi.gc(lib.cdm_machine_new(), lib.cdm_machine_free)
        self.nodes: dict[int, Node] = {}
        self.private: dict[str, PrivateMemory] = {}
        for spec in topo.nodes:
            pool = self._add_pool(spec.base_pfn, spec.npages, 0)
            self.nodes[spec.id] = Node(spec, pool, spec.isolated)
        for dev in topo.devices:
            if not dev.coherent:
                pool = self._add_pool(dev.base_pfn, dev.private_size // PAGE_SIZE, lib.CDM_POOL_PRIVATE)
                self.private[dev.name] = PrivateMemory(dev.name, dev, pool)
        self.pool_node = {n.pool: nid for nid, n in self.nodes.items()}
        self.cpu_node = {cpu: n.id for n in topo.nodes for cpu in n.cpus}
        cpu_nodes = sorted({n for n in self.cpu_node.values()})
        # With one CPU node, every fault is local to it: no need to ask the host.
        self.only_cpu_node: Optional[int] = cpu_nodes[0] if len(cpu_nodes) == 1 else None
        self.default_cpu_node = cpu_nodes[0]
        # Migrations run on a CPU of this node (the daemon is the kernel's
        # migrating task): their target pages are local there in numastat.
        lib.cdm_machine_set_cpu_pool(self.core, self.nodes[self.default_cpu_node].pool)
        # The router's first touches look the faulting CPU's node up in the core.
        ncpus = max(self.cpu_node, default=-1) + 1
        default_pool = self.nodes[self.default_cpu_node].pool
        pools = [self.nodes[self.cpu_node[c]].pool if c in self.cpu_node else default_pool
                 for c in range(ncpus)]
        rc = lib.cdm_machine_set_cpu_nodes(self.core, default_pool, ncpus,
                                           ffi.new("int32_t[]", pools) if pools else ffi.NULL)
        if rc:
            raise OSError(-rc, "cannot give the core the CPUs' nodes")
        self._plans: dict[tuple, _Plan] = {}
        # Policies numbered for the core (its copies of their plans); see policy_id.
        self._policy_ids: dict[mpol.MemPolicy, int] = {}
        self.regions = None  # set by Regions
        self.first_sysram = next(n.id for n in topo.nodes if n.kind == "sysram")
        self.pgmaps: dict[str, PageMap] = {}
        self.pool_owner: dict[int, str] = {}      # pool -> the device whose memory it is
        for dev in topo.devices:
            pool = self.nodes[dev.node].pool if dev.coherent else self.private[dev.name].pool
            self.pgmaps[dev.name] = PageMap(dev.name, dev, pool)
            self.pool_owner[pool] = dev.name
        # Oversubscription: each device memory's LRU and eviction switch.
        self.evictors: dict[int, DeviceLru] = {
            pm.pool: DeviceLru(self, pm.pool, name, pm.spec.coherent,
                               pm.spec.node if pm.spec.coherent else None)
            for name, pm in self.pgmaps.items()}
        self.events = Events()
        self.trace = MachineTrace(self)
        # mmu_interval_notifier: fn(region, first, npages) drops a mirror's entries.
        self.mmu_notifiers: list[Callable[["Region", int, int], None]] = []
        self.cpu_unmapper: Optional[Callable[["Region", int, int, bool], Awaitable[None]]] = None
        self.cpu_writer: Optional[Callable[["Region", int, int], Awaitable[None]]] = None
        self.hotplug = MemoryHotplug(self)
        self.tiers = MemoryTiers(self)
        for kind in ("node_registered", "memory_online", "memory_offline", "device_offline",
                     "device_online"):
            self.events.subscribe(kind, lambda **_: self.tiers.refresh())
        # As a distribution kernel (NUMA_BALANCING_DEFAULT_ENABLED): on when
        # the machine has more than one node.
        self.balancing = NumaBalancing(self, NUMA_BALANCING_NORMAL if len(self.nodes) > 1 else 0)
        self.kswapd = vmscan.Kswapd(self)
        self._faultbacks = ffi.new("struct cdm_faultback[]", FAULTBACK_BATCH)
        self._applying = False
        # Where background work runs (prefetch): a trio nursery the daemon
        # gives; without one it runs to completion at once.
        self.background = None
        # Told True when background work starts (synchronously, within the
        # request that starts it) and False when it ends: what a view cached
        # from outside (the router's attribute cache) must know, since that
        # work changes what attributes show without any request.
        self.background_hooks: list[Callable[[bool], None]] = []
        # Read duplication: pages duplicated in devices' memory (all of them),
        # and each device's way to free its duplicates of a range.
        self.duplicates = 0
        self.duplicate_droppers: list[Callable[["Region", int, int], int]] = []
        self.events.subscribe("migrate", self._lru_on_migrate)
        self.events.subscribe("region_removed", self._lru_forget)

    def _lru_on_migrate(self, region: "Region", first: int, n: int, target: Target, moved: int,
                        device_moves: dict[str, int], **_) -> None:
        lru = self.evictors.get(target.pool)
        if lru is not None and device_moves.get(lru.device, 0) > 0:
            lru.touch(region, first, n)

    def _lru_forget(self, region: "Region") -> None:
        for lru in self.evictors.values():
            lru.forget(region)

    async def cpu_unmap(self, region: "Region", first: int, npages: int, write_back: bool = True) -> None:
        """Invalidates the CPU's copies of pages (the host page cache's, which
        only the filesystem can reach: it installs ``cpu_unmapper``);
        write_back=False when the caller wrote them back already."""
        if self.cpu_unmapper is not None:
            await self.cpu_unmapper(region, first, npages, write_back)

    async def cpu_write_back(self, region: "Region", first: int, npages: int) -> None:
        """Writes the CPU's dirty copies of pages back without dropping them
        (the filesystem's ``cpu_writer``)."""
        if self.cpu_writer is not None:
            await self.cpu_writer(region, first, npages)

    async def spawn(self, fn: Callable[..., Awaitable[object]], *args) -> None:
        """Runs fn(*args) in the background (the daemon's nursery), or now;
        background_hooks hear of it before this returns and after it ends."""
        for hook in self.background_hooks:
            hook(True)

        async def run() -> None:
            try:
                await fn(*args)
            finally:
                for hook in self.background_hooks:
                    hook(False)
        if self.background is not None:
            self.background.start_soon(run)
        else:
            await run()

    def collapse_duplicates(self, region: "Region", first: int, npages: int) -> int:
        """Before a write of pages [first, first + npages): every device's
        read-only duplicate of them goes, and their mark (which makes the
        router leave a WRITE to Python).  Synchronous: the caller writes
        with no await in between.  Returns duplicates dropped."""
        if not self.duplicates or region.removed:
            return 0
        dropped = sum(drop(region, first, npages) for drop in self.duplicate_droppers)
        if dropped:
            lib.cdm_region_collapse(self.core, region.core, first, npages)
            self.events.emit("collapse", region=region, first=first, n=npages, pages=dropped)
        return dropped

    def check(self) -> str:
        """The core's invariant checker over every live region: "" when the
        allocator, the page tables and every counter agree, else the first
        violation (debugfs ``cdmfs/check`` asks for it)."""
        cores = [r.core for r in self.regions.by_name.values()] if self.regions is not None else []
        msg = ffi.new("char[]", 512)
        rc = lib.cdm_machine_check(self.core, ffi.new("struct cdm_region *[]", cores) if cores else ffi.NULL,
                                   len(cores), msg, 512)
        return "" if rc == 0 else ffi.string(msg).decode(errors="replace")

    def cpu_mapped(self, region: "Region", first: int, npages: int) -> int:
        return lib.cdm_region_count(self.core, region.core, first, npages, lib.CDM_PTE_CPU)

    def invalidate_devices(self, region: "Region", first: int, npages: int) -> None:
        for notify in self.mmu_notifiers:
            notify(region, first, npages)

    def apply_faultbacks(self) -> None:
        """Finishes the fault-backs the router served in C: for each, the
        devices drop their entries of the range and count the pages that
        left their memory, and the region counts them, as after Python's
        own fault-back (migrate_device.fault_back).  Called before Python
        serves any request, so nothing it shows is behind the core."""
        if self._applying:
            return
        self._applying = True
        try:
            out = self._faultbacks
            while n := lib.cdm_machine_take_faultbacks(self.core, out, FAULTBACK_BATCH):
                for e in out[0:n]:
                    region = self.regions.by_id.get(e.region) if self.regions is not None else None
                    if region is None:
                        continue        # removed since: its mirrors went with it
                    region.migrated_pages += e.moved
                    self.invalidate_devices(region, e.first, e.n)
                    dev = self.pool_owner.get(e.pool)
                    moves = {dev: -e.moved} if dev else {}
                    traced = {"from": self.trace.location(e.pool), "to": self.trace.location(e.to),
                              "holes": 0, "wall_ns": 0,
                              "modeled_ns": self.trace.modeled_ns(moves)} \
                        if self.trace.tracer.is_enabled("migrate") else {}
                    self.events.emit("migrate", region=region, first=e.first, n=e.n,
                                     target=POLICY_TARGET, moved=e.moved, device_moves=moves,
                                     **traced)
        finally:
            self._applying = False

    # ------------------------------------------------------------ targets

    def target(self, text: str) -> Target:
        """A migration target: ``N``, ``node:N``, ``DEV`` or ``private:DEV``.
        ValueError if there is no such target, ENODEV if it is offline."""
        word = text.strip()
        kind, sep, arg = word.partition(":")
        if not sep:
            kind, arg = ("node", word) if word.isdigit() else ("private", word)
        if kind == "node" and arg.isdigit() and int(arg) in self.nodes:
            node = self.nodes[int(arg)]
            if not node.online:
                raise OSError(errno.ENODEV, f"node {arg} is offline")
            owner = self.pool_owner.get(node.pool)
            if owner is not None and not self.pgmaps[owner].online:
                raise OSError(errno.ENODEV, f"device {owner} is offline")
            return Target(f"node:{arg}", node.pool, owner is not None)
        if kind == "private" and arg in self.private:
            if not self.pgmaps[arg].online:
                raise OSError(errno.ENODEV, f"device {arg} is offline")
            return Target(f"private:{arg}", self.private[arg].pool, True)
        raise ValueError(f"no migration target {word!r} (a node id, node:N, or a device's private memory)")

    def node_target(self, nid: int) -> Target:
        return self.target(f"node:{nid}")

    def private_pools_mask(self) -> int:
        mask = 0
        for p in self.private.values():
            mask |= 1 << p.pool
        return mask

    def device_resident(self, region: "Region") -> dict[str, int]:
        """Pages of region in each device's memory (one snapshot)."""
        resident = region.snapshot().resident
        return {name: resident[d.pool] for name, d in self.pgmaps.items()}

    async def populate(self, region: "Region", first: int, npages: int) -> None:
        """Allocates absent pages by the region's policy without a CPU fault
        (a device's first touch of memory the CPU never touched), a chunk at
        a time so that a large range does not hold up other requests."""
        res = ffi.new("struct cdm_rw_result *")
        with region.hold():
            for seg_start, seg_end, policy in region.policy_segments(first, first + npages):
                for start in range(seg_start, seg_end, POPULATE_CHUNK):
                    end = min(start + POPULATE_CHUNK, seg_end)
                    while True:
                        plan = self.plan(policy, self.default_cpu_node)
                        rc = lib.cdm_region_populate(self.core, region.core, start, end - start, plan, res)
                        if rc == 0:
                            break
                        if rc == -errno.EAGAIN:
                            await region.wait_unlocked()
                            continue
                        raise OSError(errno.ENOSPC if rc == -errno.ENOSPC else -rc,
                                      "no memory for the device's first touch")
                    await cond_resched()

    def _add_pool(self, base_pfn: int, npages: int, flags: int) -> int:
        pool = lib.cdm_pool_add(self.core, base_pfn, npages, flags)
        if pool < 0:
            raise OSError(-pool, f"cannot reserve {npages} pages of address space")
        return pool

    # ------------------------------------------------------------ placement

    def placement_changed(self) -> None:
        """Forget cached plans: a node's isolation, weight or state changed."""
        self._plans.clear()
        lib.cdm_machine_clear_plans(self.core)

    def policy_id(self, policy: mpol.MemPolicy) -> int:
        """The number under which the core keeps policy's plans (first touch
        served in C), or -1.  The core has room for CDM_MAX_POLICIES: when
        they are all taken, they are numbered again from the policies the
        regions use now (each region republishes its ranges)."""
        pid = self._policy_ids.get(policy)
        if pid is not None:
            return pid
        if len(self._policy_ids) >= lib.CDM_MAX_POLICIES:
            if getattr(self, "_renumbering", False):
                return -1
            self._renumber_policies()
            pid = self._policy_ids.get(policy)
            if pid is not None:
                return pid
            if len(self._policy_ids) >= lib.CDM_MAX_POLICIES:
                return -1
        pid = self._policy_ids[policy] = len(self._policy_ids)
        for local in self.cpu_nodes():     # published now: even the first touch is C's
            plan = self._plans.get((policy, local))
            if plan is None:
                self.plan_of(policy, local)
            else:
                lib.cdm_machine_set_plan(self.core, pid, plan.cdata)
        return pid

    def _renumber_policies(self) -> None:
        self._renumbering = True
        try:
            self._policy_ids.clear()
            lib.cdm_machine_clear_plans(self.core)
            for region in list(self.regions.by_name.values()) if self.regions else []:
                region.publish_policies()
        finally:
            self._renumbering = False

    def cpu_nodes(self) -> list[int]:
        """Nodes with CPUs."""
        return sorted(set(self.cpu_node.values()))

    def local_node(self, pid: int) -> int:
        """The node of the CPU a process last ran on (the faulting CPU)."""
        if self.only_cpu_node is not None:
            return self.only_cpu_node
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            cpu = int(stat[stat.rindex(b")") + 2:].split()[36])
        except (OSError, ValueError, IndexError):
            return self.default_cpu_node
        return self.cpu_node.get(cpu, self.default_cpu_node)

    def watermarks(self) -> dict[int, vmscan.Watermarks]:
        """Each node's min, low, high and promo watermarks, in pages."""
        return vmscan.watermarks(self)

    async def direct_reclaim(self, policy: mpol.MemPolicy, local: int, want: int) -> int:
        """Every node policy allows a CPU of node local is full: reclaim by
        demotion from them, nearest first (try_to_free_pages).  Returns the
        pages freed (0: nothing could go)."""
        pl = self.placement(policy, local)
        nodes = list(dict.fromkeys(n for t in pl.table for n in pl.fallback.get(t, ())))
        return await self.kswapd.direct_reclaim(nodes, want)

    def memory_nodes(self) -> list[int]:
        """N_MEMORY: nodes with online memory."""
        return [nid for nid, n in self.nodes.items() if n.online]

    def usable_nodes(self) -> list[int]:
        """Nodes that can take pages: online memory, and not the memory of a
        device that is offline (or going offline)."""
        return [nid for nid, n in self.nodes.items() if n.online
                and (n.pool not in self.pool_owner or self.pgmaps[self.pool_owner[n.pool]].online)]

    def plan(self, policy: mpol.MemPolicy, local: int) -> object:
        """The native allocation plan of a policy for a CPU on node local."""
        return self.plan_of(policy, local).cdata

    def plan_of(self, policy: mpol.MemPolicy, local: int) -> _Plan:
        """The plan with the arrays it points into: what a caller keeps
        across awaits (the cache may drop it meanwhile)."""
        key = (policy, local)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(policy, local)
            pid = self._policy_ids.get(policy)
            if pid is not None:
                lib.cdm_machine_set_plan(self.core, pid, plan.cdata)
        return plan

    def placement(self, policy: mpol.MemPolicy, local: int) -> mpol.Placement:
        return mpol.placement(
            policy, local, self.usable_nodes(),
            isolated=lambda n: self.nodes[n].isolated,
            distance=lambda a, b: self.topo.distance[(a, b)],
            weight=lambda n: self.nodes[n].weight,
            sysram=lambda n: self.nodes[n].spec.kind == "sysram")

    def _make_plan(self, policy: mpol.MemPolicy, local: int) -> _Plan:
        pl = self.placement(policy, local)
        npools = lib.CDM_MAX_POOLS
        table = ffi.new("int32_t[]", [self.nodes[n].pool for n in pl.table])
        fallback = ffi.new("int32_t[]", npools * npools)
        ffi.memmove(fallback, b"\xff" * (4 * npools * npools), 4 * npools * npools)
        for nid, order in pl.fallback.items():
            row = self.nodes[nid].pool * npools
            for k, n in enumerate(order):
                fallback[row + k] = self.nodes[n].pool
        cdata = ffi.new("struct cdm_plan *")
        cdata.local = self.nodes[local].pool
        cdata.interleave = int(pl.interleave)
        cdata.ntable = len(pl.table)
        cdata.table = table
        cdata.fallback = fallback
        if policy.mode == "preferred_many":
            cdata.first_pools = sum(1 << self.nodes[n].pool for n in policy.nodes)
            cdata.spill = self.nodes[local].pool
        return _Plan(cdata, table, fallback, pl)

    # ------------------------------------------------------------ accounting

    def pool_stats(self, index: int):
        """A snapshot of a pool (struct cdm_pool_stats: geometry, flags, page
        counts, event counters), copied under the core's lock in one call;
        Python never reads the live struct cdm_pool."""
        out = ffi.new("struct cdm_pool_stats *")
        rc = lib.cdm_pool_snapshot(self.core, index, out)
        if rc:
            raise OSError(-rc, f"no pool {index}")
        return out

    def node_stats(self, nid: int) -> tuple[dict[str, int], list[int]]:
        """Page counts of a node, as the sys tree shows them, and its event
        counters (indexed by CDM_*): one snapshot, so a meminfo, vmstat or
        numastat read is one native call and its numbers agree."""
        node = self.nodes[nid]
        s = self.pool_stats(node.pool)
        total = node.online_pages
        free = max(s.nr_free - node.hidden_free, 0) if total else 0
        pages = {
            "total": total,
            "free": free,
            "anon": s.nr_used,
            "mapped": s.nr_mapped,
            "dirty": s.nr_dirty,
            "mlocked": s.nr_pinned,
        }
        return pages, list(s.counters)

    def node_pages(self, nid: int) -> dict[str, int]:
        """Page counts of a node, as the sys tree shows them."""
        return self.node_stats(nid)[0]
