"""Memory tiers (mm/memory-tiers.c): nodes grouped by abstract distance,
each node's demotion target in the next slower tier.

The abstract distance of a node comes from its access figures as the
kernel derives it from HMAT (``mt_perf_to_adistance``): DRAM -- a node
with CPUs, or the CPU's figures to system RAM -- is MEMTIER_ADISTANCE_DRAM
(576), slower memory is scaled by its latency and bandwidth against DRAM's;
a tier spans MEMTIER_CHUNK_SIZE (128) of it and is named after
``adistance >> MEMTIER_CHUNK_BITS`` (DRAM: ``memory_tier4``).

Isolated (CDM) nodes are in their tier for the sysfs view, but never a
demotion or promotion target: no implicit allocation goes there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .machine import Machine

MEMTIER_CHUNK_BITS = 7
MEMTIER_CHUNK_SIZE = 1 << MEMTIER_CHUNK_BITS
MEMTIER_ADISTANCE_DRAM = (4 * MEMTIER_CHUNK_SIZE) + (MEMTIER_CHUNK_SIZE >> 1)


def adistance(m: "Machine", nid: int) -> int:
    """The abstract distance of node nid, from the CPU's access figures to
    it against those to system RAM (mt_perf_to_adistance)."""
    spec = m.nodes[nid].spec
    if spec.cpus or spec.kind == "sysram":
        return MEMTIER_ADISTANCE_DRAM
    dram = m.topo.access_of("cpu", f"node:{m.first_sysram}")
    perf = m.topo.access_of("cpu", f"node:{nid}")
    lat = (perf.read_latency + perf.write_latency) / max(dram.read_latency + dram.write_latency, 1)
    bw = (dram.read_bandwidth + dram.write_bandwidth) / max(perf.read_bandwidth + perf.write_bandwidth, 1)
    return int(MEMTIER_ADISTANCE_DRAM * lat * bw)


class MemoryTiers:
    """The tiers of a machine and the demotion targets, recomputed when the
    nodes with memory change (``refresh``)."""

    def __init__(self, m: "Machine"):
        self.m = m
        self.demotion_enabled = False       # sys/kernel/mm/numa/demotion_enabled
        self.tiers: dict[int, list[int]] = {}
        self.tier_of: dict[int, int] = {}
        self.refresh()

    def refresh(self) -> None:
        m = self.m
        self.tiers = {}
        for nid in m.memory_nodes():
            tier = adistance(m, nid) >> MEMTIER_CHUNK_BITS
            self.tiers.setdefault(tier, []).append(nid)
        self.tier_of = {nid: t for t, nodes in self.tiers.items() for nid in nodes}

    def top_tier(self) -> Optional[int]:
        return min(self.tiers) if self.tiers else None

    def is_toptier(self, nid: int) -> bool:
        """node_is_toptier(): in the fastest tier (or no tier at all)."""
        t = self.tier_of.get(nid)
        return t is None or t == self.top_tier()

    def demotion_target(self, nid: int) -> Optional[int]:
        """next_demotion_node(): the nearest node of the next slower tier
        that has a node which is not isolated; None for the slowest."""
        tier = self.tier_of.get(nid)
        if tier is None:
            return None
        m = self.m
        usable = set(m.usable_nodes())
        for t in sorted(x for x in self.tiers if x > tier):
            nodes = [n for n in self.tiers[t] if n in usable and not m.nodes[n].isolated]
            if nodes:
                return min(nodes, key=lambda n: (m.topo.distance[(nid, n)], n))
        return None

    def promotion_order(self) -> list[int]:
        """Nodes a page may be promoted to, fastest tier first (not isolated)."""
        m = self.m
        usable = set(m.usable_nodes())
        return [n for t in sorted(self.tiers) for n in self.tiers[t]
                if n in usable and not m.nodes[n].isolated]
