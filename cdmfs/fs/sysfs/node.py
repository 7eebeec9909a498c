"""``sys/devices/system/node`` and the memory policy files (SPEC §5): one
show/store function per attribute, in the manner of drivers/base/node.c.
Formats live in ``formats``.

A node directory holds what drivers/base/node.c gives it (cpulist, cpumap,
distance, meminfo, numastat, vmstat, compact, the cpuK and memoryB links,
access0/ of HMAT), what the driver core gives every device (uevent, power/,
the subsystem link) and hugetlb's hugepages/; then the CDM switches of SPEC
§5 that no kernel has (isolated, numa_balancing) -- and ``reclaim``, which
the kernel also has, write-only, as proactive reclaim (``echo 1G >
reclaim``), but which SPEC makes the CDM discussion's 0/1 switch.
"""
from __future__ import annotations

from typing import Callable

from ..._core import lib
from ...mm.machine import KB_PER_PAGE, Machine
from .. import formats
from .cpu import nr_cpu_ids
from .device import add_device_files
from .hugetlb import add_node_hstates
from ..tree import Attr, Dir, Link, Tree

NODE_DIR = "devices/system/node"


def parse_bool01(text: str) -> bool:
    """A ``0``/``1`` write, as the CDM switches take it."""
    word = text.strip()
    if word not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return word == "1"


def parse_uint(text: str, lo: int, hi: int) -> int:
    word = text.strip()
    if not word.isdigit() or not lo <= int(word) <= hi:
        raise ValueError(f"expected an integer {lo}..{hi}")
    return int(word)


# ----------------------------------------------------------- node masks

def online_nodes(m: Machine) -> list[int]:
    """N_ONLINE: nodes with online memory, and CPU nodes (a CPU node whose
    memory is all offline stays online, as a memoryless node does)."""
    return [nid for nid, n in m.nodes.items() if n.online or (n.spec.cpus and n.spec.present)]


def node_masks(m: Machine) -> dict[str, Callable[[], str]]:
    """sys/devices/system/node/{possible,online,has_*}: node_state masks."""
    memory = lambda: [nid for nid, n in m.nodes.items() if n.online]
    return {
        "possible": lambda: formats.nodelist(m.nodes),
        "online": lambda: formats.nodelist(online_nodes(m)),
        "has_cpu": lambda: formats.nodelist(n for n in online_nodes(m) if m.nodes[n].spec.cpus),
        "has_memory": lambda: formats.nodelist(memory()),
        # CDM memory is ZONE_MOVABLE only: not "normal" memory; nor is sysram
        # memory onlined as online_movable.
        "has_normal_memory": lambda: formats.nodelist(m.hotplug.normal_nodes()),
        "has_generic_initiator": lambda: formats.nodelist(()),
        "has_coherent_device": lambda: formats.nodelist(
            n for n in memory() if m.nodes[n].spec.kind == "cdm"),
    }


# ----------------------------------------------------------- per node

def meminfo_kb(p: dict[str, int]) -> dict[str, int]:
    """The meminfo lines the emulator has numbers for, in kB, from a node's
    page counts (Machine.node_stats) or their sum over the machine: region
    pages are active anonymous memory, pinned ones mlocked."""
    return {key: pages * KB_PER_PAGE for key, pages in {
        "MemTotal": p["total"],
        "MemFree": p["free"],
        "Active": p["anon"],
        "Active(anon)": p["anon"],
        "Unevictable": p["mlocked"],
        "Mlocked": p["mlocked"],
        "Dirty": p["dirty"],
        "Mapped": p["mapped"],
        "AnonPages": p["anon"],
    }.items()}


def node_meminfo(m: Machine, nid: int) -> str:
    return formats.node_meminfo(nid, meminfo_kb(m.node_pages(nid)))


def numastat_values(c: list[int]) -> dict[str, int]:
    """A node's numastat counters by their numastat names."""
    return {
        "numa_hit": c[lib.CDM_NUMA_HIT],
        "numa_miss": c[lib.CDM_NUMA_MISS],
        "numa_foreign": c[lib.CDM_NUMA_FOREIGN],
        "interleave_hit": c[lib.CDM_INTERLEAVE_HIT],
        "local_node": c[lib.CDM_LOCAL_NODE],
        "other_node": c[lib.CDM_OTHER_NODE],
    }


def node_numastat(m: Machine, nid: int) -> str:
    return formats.node_numastat(numastat_values(m.node_stats(nid)[1]))


def vmstat_values(p: dict[str, int], c: list[int]) -> dict[str, int]:
    """The node vmstat items the emulator counts, from one snapshot (page
    counts and event counters).  No vm events: the kernel keeps pgfault,
    pgmigrate_* and the rest machine-wide, in /proc/vmstat (see proc.py)."""
    return {
        "nr_free_pages": p["free"],
        "nr_zone_active_anon": p["anon"],
        "nr_zone_unevictable": p["mlocked"],
        "nr_zone_write_pending": p["dirty"],
        "nr_mlock": p["mlocked"],
        "numa_hit": c[lib.CDM_NUMA_HIT],
        "numa_miss": c[lib.CDM_NUMA_MISS],
        "numa_foreign": c[lib.CDM_NUMA_FOREIGN],
        "numa_interleave": c[lib.CDM_INTERLEAVE_HIT],
        "numa_local": c[lib.CDM_LOCAL_NODE],
        "numa_other": c[lib.CDM_OTHER_NODE],
        "nr_active_anon": p["anon"],
        "nr_unevictable": p["mlocked"],
        "nr_anon_pages": p["anon"],
        "nr_mapped": p["mapped"],
        "nr_dirty": p["dirty"],
    }


#: Node stat items Python counts (Node.events): promotion and demotion.
NODE_EVENTS = ("pgpromote_success", "pgpromote_candidate", "pgdemote_kswapd", "pgdemote_direct")


def node_vmstat(m: Machine, nid: int) -> str:
    v = vmstat_values(*m.node_stats(nid))
    events = m.nodes[nid].events
    v.update({k: events[k] for k in NODE_EVENTS})
    return formats.node_vmstat(v)


def node_distance(m: Machine, nid: int) -> str:
    # One entry per node that has a nodeN directory (libnuma reads the k-th
    # entry as the k-th node): a node whose memory went offline keeps both.
    online = m.hotplug.registered_nodes()
    return formats.node_distance([m.topo.distance[(nid, o)] for o in online], online)


def node_cpulist(m: Machine, nid: int) -> str:
    return formats.nodelist(m.nodes[nid].spec.cpus)


def node_cpumap(m: Machine, nid: int) -> str:
    return formats.cpumask(m.nodes[nid].spec.cpus, nr_cpu_ids(m))


def node_isolated_show(m: Machine, nid: int) -> str:
    return f"{int(m.nodes[nid].isolated)}\n"


def node_isolated_store(m: Machine, nid: int, text: str) -> None:
    m.nodes[nid].isolated = parse_bool01(text)
    m.placement_changed()


def node_switch(m: Machine, nid: int, name: str) -> Attr:
    """``nodeN/numa_balancing``, ``nodeN/reclaim``: per-node switches of the
    CDM discussion, stored for the automatic placement that honours them."""
    def store(text: str) -> None:
        setattr(m.nodes[nid], name, parse_bool01(text))
        m.balancing.changed()
    return Attr(lambda: f"{int(getattr(m.nodes[nid], name))}\n", store)


def best_initiators(m: Machine, nid: int) -> list[int]:
    """CPU nodes nearest to a memory node: the kernel's access0 class."""
    cpu_nodes = [n for n, node in m.nodes.items() if node.spec.cpus and node.online]
    if not cpu_nodes:
        return []
    best = min(m.topo.distance[(c, nid)] for c in cpu_nodes)
    return [c for c in cpu_nodes if m.topo.distance[(c, nid)] == best]


def compact_store(text: str) -> None:
    """``compact_store()``: any write compacts the node's zones.  Emulated
    memory has no fragmentation to undo (every frame is a 4 KiB page): it
    does nothing, and succeeds as the kernel's does."""


def access_dir(tree: Tree, d: Dir) -> Dir:
    """``nodeN/access0/``, made on first use as node_init_node_access()
    makes it: a device with the groups ``initiators`` and ``targets`` (both
    present, maybe empty), its uevent and power/."""
    acc = d.children.get("access0")
    if acc is None:
        acc = tree.add(d, "access0", Dir())
        tree.add(acc, "initiators", Dir())
        tree.add(acc, "targets", Dir())
        add_device_files(tree, acc)
    assert isinstance(acc, Dir)
    return acc


def link_accesses(tree: Tree, nodes: Dir, m: Machine) -> None:
    """register_memory_node_under_compute_node() for every memory node and
    each of its nearest CPU nodes whose directories exist: the target's
    ``access0/initiators/nodeI`` and the initiator's ``access0/targets/nodeM``.
    Adds only the links missing (a hot-added node links in after the rest)."""
    for name, target in list(nodes.children.items()):
        if not (name.startswith("node") and name[4:].isdigit() and isinstance(target, Dir)):
            continue
        mem = int(name[4:])
        for cpu in best_initiators(m, mem):
            init = nodes.children.get(f"node{cpu}")
            if not isinstance(init, Dir):
                continue
            for group, d, other in (("initiators", target, cpu), ("targets", init, mem)):
                g = access_dir(tree, d).children[group]
                assert isinstance(g, Dir)
                if f"node{other}" not in g.children:
                    tree.add(g, f"node{other}", Link(f"../../../node{other}"))


def add_node(tree: Tree, nodes: Dir, m: Machine, nid: int) -> None:
    d = tree.add(nodes, f"node{nid}", Dir())
    for name, show in {
        "cpulist": node_cpulist,
        "cpumap": node_cpumap,
        "distance": node_distance,
        "meminfo": node_meminfo,
        "numastat": node_numastat,
        "vmstat": node_vmstat,
    }.items():
        tree.add(d, name, Attr(lambda show=show: show(m, nid)))
    tree.add(d, "compact", Attr(None, compact_store))
    add_device_files(tree, d)
    tree.add(d, "subsystem", Link("../../../../bus/node"))
    add_node_hstates(tree, d)
    tree.add(d, "isolated", Attr(lambda: node_isolated_show(m, nid),
                                 lambda text: node_isolated_store(m, nid, text)))
    for switch in ("numa_balancing", "reclaim"):
        tree.add(d, switch, node_switch(m, nid, switch))
    for cpu in sorted(m.nodes[nid].spec.cpus):
        tree.add(d, f"cpu{cpu}", Link(f"../../cpu/cpu{cpu}"))
    # HMAT access class 0: the figures of the nearest CPU initiator
    # (node_set_perf_attrs()), on every node with memory.
    init = access_dir(tree, d).children["initiators"]
    assert isinstance(init, Dir)
    fig = m.topo.access_of("cpu", f"node:{nid}")
    for name, value in (("read_bandwidth", fig.read_bandwidth), ("read_latency", fig.read_latency),
                        ("write_bandwidth", fig.write_bandwidth), ("write_latency", fig.write_latency)):
        tree.add(init, name, Attr(lambda value=value: f"{value}\n"))
    link_accesses(tree, nodes, m)


def add_node_root(tree: Tree, nodes: Dir) -> None:
    """``sys/devices/system/node`` is itself a device (the node subsystem's
    root): its uevent and power/."""
    add_device_files(tree, nodes)


# ----------------------------------------------------------- mempolicy

def add_weighted_interleave(tree: Tree, m: Machine) -> None:
    d = tree.path("sys/kernel/mm/mempolicy/weighted_interleave")
    for nid in m.nodes:
        def store(text: str, nid: int = nid) -> None:
            m.nodes[nid].weight = parse_uint(text, 1, 255)
            m.placement_changed()
        tree.add(d, f"node{nid}", Attr(lambda nid=nid: f"{m.nodes[nid].weight}\n", store))
