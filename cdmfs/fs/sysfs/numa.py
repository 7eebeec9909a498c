"""Automatic placement's controls outside the node directories (SPEC §5,
issue balancing): ``sys/kernel/debug/sched/numa_balancing/`` (the scanner's
tunables, kernel/sched/debug.c), ``sys/kernel/mm/numa/demotion_enabled``
(mm/memory-tiers.c) and ``sys/devices/virtual/memory_tiering/memory_tierN/
nodelist`` (the tiers, rebuilt when the nodes with memory change).
"""
from __future__ import annotations

from ...lib import bitmap
from ...lib.kstrtox import debugfs_u32, kstrtobool
from ...mm.machine import Machine
from ..tree import Attr, Dir, Tree

SCHED_TUNABLES = ("scan_delay_ms", "scan_period_min_ms", "scan_period_max_ms", "scan_size_mb",
                  "hot_threshold_ms")


def tunable(m: Machine, name: str) -> Attr:
    tun = m.balancing.tun

    def store(text: str) -> None:
        setattr(tun, name, debugfs_u32(text))
        m.balancing.changed()
    # debugfs: root's alone, as the mount's other debugfs files.
    return Attr(lambda: f"{getattr(tun, name)}\n", store, mode=0o600)


def demotion_enabled(m: Machine) -> Attr:
    def store(text: str) -> None:
        m.tiers.demotion_enabled = kstrtobool(text)
        m.balancing.changed()
    return Attr(lambda: "true\n" if m.tiers.demotion_enabled else "false\n", store)


def add_memory_tiers(tree: Tree, d: Dir, m: Machine) -> None:
    """``memory_tierN/nodelist`` for every tier now: tiers that emptied go,
    new ones come, the others stay (their nodelist reads the tier now)."""
    tiers = m.tiers.tiers
    for name in [n for n in d.children if n.startswith("memory_tier")]:
        if int(name[len("memory_tier"):]) not in tiers:
            tree.remove(d.children[name])
    for tier in sorted(tiers):
        if f"memory_tier{tier}" not in d.children:
            t = tree.add(d, f"memory_tier{tier}", Dir())
            tree.add(t, "nodelist", Attr(lambda tier=tier: bitmap.nodelist(m.tiers.tiers.get(tier, ()))))


def build(tree: Tree, m: Machine) -> None:
    sched = tree.path("sys/kernel/debug/sched/numa_balancing")
    for name in SCHED_TUNABLES:
        tree.add(sched, name, tunable(m, name))
    tree.add(tree.path("sys/kernel/mm/numa"), "demotion_enabled", demotion_enabled(m))
    tiering = tree.path("sys/devices/virtual/memory_tiering")
    add_memory_tiers(tree, tiering, m)
    for kind in ("node_registered", "memory_online", "memory_offline"):
        m.events.subscribe(kind, lambda **_: add_memory_tiers(tree, tiering, m))
