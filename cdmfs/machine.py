"""The emulated machine: NUMA nodes and device memory as native pools, regions,
and the allocation plans that policies turn into.

This is the memory manager's root object.  The sys tree, the filesystem and
the devices ask it; it never knows about FUSE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from . import policy as mpol
from ._core import ffi, lib
from .config import PAGE_SIZE, Topology

log = logging.getLogger(__name__)

KB_PER_PAGE = PAGE_SIZE // 1024


@dataclass
class Node:
    """One emulated NUMA node: its configuration and its native pool."""
    spec: object
    pool: int
    isolated: bool
    weight: int = 1                      # weighted_interleave weight (sysfs mempolicy)
    numa_balancing: bool = True
    reclaim: bool = True

    @property
    def id(self) -> int:
        return self.spec.id

    @property
    def online(self) -> bool:
        return self.spec.present


@dataclass
class PrivateMemory:
    """A device's private memory: a pool the CPU cannot map."""
    device: str
    spec: object
    pool: int


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
        self._plans: dict[tuple, _Plan] = {}
        self.regions = None  # set by Regions

    def _add_pool(self, base_pfn: int, npages: int, flags: int) -> int:
        pool = lib.cdm_pool_add(self.core, base_pfn, npages, flags)
        if pool < 0:
            raise OSError(-pool, f"cannot reserve {npages} pages of address space")
        return pool

    # ------------------------------------------------------------ placement

    def placement_changed(self) -> None:
        """Forget cached plans: a node's isolation, weight or state changed."""
        self._plans.clear()

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

    def usable_nodes(self) -> list[int]:
        return [nid for nid, n in self.nodes.items() if n.online]

    def plan(self, policy: mpol.MemPolicy, local: int) -> object:
        """The native allocation plan of a policy for a CPU on node local."""
        key = (policy, local)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(policy, local)
        return plan.cdata

    def placement(self, policy: mpol.MemPolicy, local: int) -> mpol.Placement:
        return mpol.placement(
            policy, local, self.usable_nodes(),
            isolated=lambda n: self.nodes[n].isolated,
            distance=lambda a, b: self.topo.distance[(a, b)],
            weight=lambda n: self.nodes[n].weight)

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
        return _Plan(cdata, table, fallback, pl)

    # ------------------------------------------------------------ accounting

    def pool(self, index: int):
        return self.core.pools[index]

    def node_pages(self, nid: int) -> dict[str, int]:
        """Page counts of a node, as the sys tree shows them."""
        p = self.core.pools[self.nodes[nid].pool]
        total = p.npages if self.nodes[nid].online else 0
        free = lib.cdm_pool_free_pages(self.core, self.nodes[nid].pool) if total else 0
        return {
            "total": total,
            "free": free,
            "anon": p.nr_used,
            "mapped": p.nr_mapped,
            "dirty": p.nr_dirty,
            "mlocked": p.nr_pinned,
        }

    def node_counter(self, nid: int, counter: int) -> int:
        return self.core.pools[self.nodes[nid].pool].counters[counter]
