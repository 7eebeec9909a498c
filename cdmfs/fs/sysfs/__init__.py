"""The emulated machine's sysfs (SPEC §5), a module per directory of the
kernel's: node.py (drivers/base/node.c), memory.py (drivers/base/memory.c),
cpu.py (drivers/base/cpu.c), hugetlb.py (mm/hugetlb_sysfs.c), and device.py
for what the driver core gives every device (uevent, power/).
"""
from __future__ import annotations

from ...mm.machine import Machine
from ..tree import Attr, Link, Tree
from . import memory, numa
from .cpu import add_cpus
from .device import add_bus
from .node import NODE_DIR, add_node, add_node_root, add_weighted_interleave, node_masks


def build(tree: Tree, m: Machine) -> None:
    """Adds sys/ for machine m to tree."""
    nodes = tree.path(f"sys/{NODE_DIR}")
    for name, show in node_masks(m).items():
        tree.add(nodes, name, Attr(show))
    add_node_root(tree, nodes)
    bus = add_bus(tree, "node")
    for nid in m.nodes:
        if m.nodes[nid].online:
            add_node(tree, nodes, m, nid)
            tree.add(bus, f"node{nid}", Link(f"../../../{NODE_DIR}/node{nid}"))
    add_cpus(tree, m)
    add_weighted_interleave(tree, m)
    memory.build(tree, m)
    numa.build(tree, m)
    # debugfs: the core's invariants, checked on demand (root only, as debugfs).
    tree.add(tree.path("sys/kernel/debug/cdmfs"), "check",
             Attr(lambda: f"{m.check() or 'ok'}\n", mode=0o400))
