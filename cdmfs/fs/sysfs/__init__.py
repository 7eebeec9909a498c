"""The emulated machine's sysfs (SPEC §5), a module per directory of the
kernel's: node.py (drivers/base/node.c), memory.py (drivers/base/memory.c),
cpu.py (drivers/base/cpu.c), hugetlb.py (mm/hugetlb_sysfs.c), and device.py
for what the driver core gives every device (uevent, power/).
"""
from __future__ import annotations

import errno

from ...mm.machine import Machine
from ..tree import Attr, Dir, Link, Tree
from . import memory
from .cpu import add_cpus
from .device import sysfs_streq, uevent_store
from .node import NODE_DIR, add_node, add_node_root, add_weighted_interleave, node_masks


def add_bus(tree: Tree, name: str) -> Dir:
    """``sys/bus/NAME/`` as bus_register() makes it for a bus without
    drivers (node): devices/, drivers/, drivers_autoprobe, drivers_probe and
    uevent.  Returns devices/."""
    bus = tree.path(f"sys/bus/{name}")
    devices = tree.dir(bus, "devices")
    tree.dir(bus, "drivers")
    autoprobe = [True]

    def autoprobe_store(text: str) -> None:
        # drivers_autoprobe_store(): '0' first turns it off, anything else on.
        autoprobe[0] = not text.startswith("0")

    def probe_store(text: str) -> None:
        # drivers_probe_store(): a device of the bus by name, or ENODEV; with
        # no driver to bind, probing it succeeds and does nothing.
        if not any(sysfs_streq(text, dev) for dev in devices.children):
            raise OSError(errno.ENODEV, f"no device {text.strip()!r} on bus {name}")

    tree.add(bus, "drivers_autoprobe", Attr(lambda: f"{int(autoprobe[0])}\n", autoprobe_store))
    tree.add(bus, "drivers_probe", Attr(None, probe_store))
    tree.add(bus, "uevent", Attr(None, uevent_store))
    return devices


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
    # debugfs: the core's invariants, checked on demand (root only, as debugfs).
    tree.add(tree.path("sys/kernel/debug/cdmfs"), "check",
             Attr(lambda: f"{m.check() or 'ok'}\n", mode=0o400))
