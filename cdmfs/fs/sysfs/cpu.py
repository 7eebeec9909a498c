"""``sys/devices/system/cpu``: the host's CPUs as the emulated nodes hold
them (online, possible, present, topology, node links).
"""
from __future__ import annotations

import functools
import os
from typing import Callable

from ...mm.machine import Machine
from .. import formats
from ..tree import Attr, Dir, Link, Tree

HOST_CPU = "/sys/devices/system/cpu"


def _host_read(path: str, fallback: str) -> Callable[[], str]:
    def show() -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return fallback
    return show


@functools.lru_cache(maxsize=None)
def _host_cpus(name: str) -> frozenset[int]:
    """The host's cpu/{possible,present} (empty if unreadable)."""
    try:
        with open(f"{HOST_CPU}/{name}") as f:
            return frozenset(formats.parse_cpulist(f.read()))
    except (OSError, ValueError):
        return frozenset()


def cpu_masks(m: Machine) -> dict[str, frozenset[int]]:
    """cpu/{online,possible,present}, mirrored from the host: the CPUs of the
    emulated nodes are online, the host's present/possible ones stay present/
    possible (a host CPU that no node has is present but offline)."""
    online = frozenset(m.cpu_node)
    present = _host_cpus("present") | online
    return {"online": online, "possible": _host_cpus("possible") | present, "present": present}


def nr_cpu_ids(m: Machine) -> int:
    """The kernel's nr_cpu_ids: the last possible CPU + 1 (cpumask widths)."""
    return max(cpu_masks(m)["possible"]) + 1


def add_cpus(tree: Tree, m: Machine) -> None:
    """sys/devices/system/cpu: mirrored from the host, plus the emulated node links."""
    d = tree.path("sys/devices/system/cpu")
    masks = cpu_masks(m)
    for name, cpus in masks.items():
        tree.add(d, name, Attr(lambda text=formats.cpulist(cpus): text))
    tree.add(d, "kernel_max", Attr(_host_read(f"{HOST_CPU}/kernel_max", f"{nr_cpu_ids(m) - 1}\n")))
    for cpu in sorted(masks["present"]):
        c = tree.add(d, f"cpu{cpu}", Dir())
        if cpu not in m.cpu_node:
            # Offline, as the kernel shows it: no topology, no node.
            tree.add(c, "online", Attr(lambda: "0\n"))
            continue
        tree.add(c, "online", Attr(lambda: "1\n"))
        tree.add(c, f"node{m.cpu_node[cpu]}", Link(f"../../node/node{m.cpu_node[cpu]}"))
        topo = tree.add(c, "topology", Dir())
        host = f"{HOST_CPU}/cpu{cpu}/topology"
        names = sorted(os.listdir(host)) if os.path.isdir(host) else []
        for name in names:
            tree.add(topo, name, Attr(_host_read(f"{host}/{name}", "0\n")))
