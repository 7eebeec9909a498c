"""``sys/devices/system/cpu`` (SPEC §5): the emulated machine's CPUs as the
config shapes them (``config.CpuSpec``), in the manner of drivers/base/cpu.c,
topology.c and cacheinfo.c.  Formats live in ``cpu_formats``.

The CPU ids are the emulated machine's, whatever the host has.  The host is
consulted only for what the config does not say: which optional attributes its
kernel has (die, cluster, book, drawer, cpu_capacity, the cache policies: an
architecture's set), cache geometry (in ``config``), ``kernel_max`` and
whether cpu0 can go offline.  Ids the kernel derives from the x86 APIC id are
derived from one packed as the CPUID leaves describe it: package, then core,
then thread bits, each field as wide as its largest count needs.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

from ...config import CacheSpec, CpuSpec, host_text
from ...mm.machine import Machine
from .. import cpu_formats as fmt
from ..tree import Attr, Dir, Link, Tree

HOST_CPU = "/sys/devices/system/cpu"
Show = Callable[[], str]

# topology.c's attributes: an id, or a (mask, list) pair over a domain.
TOPOLOGY_IDS = ("physical_package_id", "die_id", "cluster_id", "core_id", "book_id", "drawer_id")
TOPOLOGY_MASKS = {
    # name: the CPUs it holds (x86: cluster = the CPUs sharing an L2, a core's;
    # one die per package; one book and one drawer per machine)
    "thread_siblings": "core", "core_cpus": "core", "cluster_cpus": "core",
    "core_siblings": "package", "package_cpus": "package", "die_cpus": "package",
    "book_siblings": "machine", "drawer_siblings": "machine",
}
TOPOLOGY_ATTRS = frozenset(TOPOLOGY_IDS) | frozenset(TOPOLOGY_MASKS) | {
    f"{name}_list" for name in TOPOLOGY_MASKS}
# What an x86_64 kernel shows (TOPOLOGY_DIE_SYSFS, TOPOLOGY_CLUSTER_SYSFS), for
# a host without a readable cpu0/topology.
X86_TOPOLOGY = TOPOLOGY_ATTRS - {"book_id", "drawer_id", "book_siblings", "book_siblings_list",
                                 "drawer_siblings", "drawer_siblings_list"}
CACHE_ATTRS = frozenset({"id", "level", "type", "size", "ways_of_associativity",
                         "coherency_line_size", "number_of_sets", "physical_line_partition",
                         "shared_cpu_map", "shared_cpu_list"})
CACHE_POLICIES = ("allocation_policy", "write_policy")
# The files of the cpu/ directory the config gives (drivers/base/cpu.c).
CPU_MASKS = ("online", "possible", "present")
CPU_OPTIONAL = ("enabled", "isolated")      # only where the host kernel has them


# --------------------------------------------------------------- the host

def _host_names(path: str) -> Optional[frozenset[str]]:
    try:
        return frozenset(os.listdir(path))
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def topology_names() -> frozenset[str]:
    """topology/'s attributes: the host kernel's set of those topology.c has."""
    host = _host_names(f"{HOST_CPU}/cpu0/topology")
    return host & TOPOLOGY_ATTRS if host else X86_TOPOLOGY


@functools.lru_cache(maxsize=None)
def cache_names() -> frozenset[str]:
    """cache/indexK/'s attributes (the policies go by each cache's own host values)."""
    host = _host_names(f"{HOST_CPU}/cpu0/cache/index0")
    return host & CACHE_ATTRS if host else CACHE_ATTRS


def host_kernel_max() -> Optional[int]:
    text = host_text(f"{HOST_CPU}/kernel_max")
    return int(text) if text and text.isdigit() else None


def cpu0_hotpluggable() -> bool:
    """Whether cpu0 has an ``online`` file: not on x86, whose cpu0 cannot go
    offline (arch_cpu_is_hotpluggable()); as the host's kernel does."""
    return not os.path.isdir(f"{HOST_CPU}/cpu0") or os.path.exists(f"{HOST_CPU}/cpu0/online")


def host_cpu_capacity() -> Optional[int]:
    """cpu0's cpu_capacity if the host kernel shows one: every emulated CPU has it
    (a symmetric machine)."""
    text = host_text(f"{HOST_CPU}/cpu0/cpu_capacity")
    return int(text) if text and text.isdigit() else None


# --------------------------------------------------------------- the masks

def cpu_masks(m: Machine) -> dict[str, frozenset[int]]:
    """cpu/{online,possible,present}, from the config."""
    spec = m.topo.cpu
    return {"online": spec.online, "possible": spec.possible, "present": spec.present}


def nr_cpu_ids(m: Machine) -> int:
    """The kernel's nr_cpu_ids: the last possible CPU + 1 (cpumask widths)."""
    return m.topo.cpu.nr_cpu_ids


# --------------------------------------------------------------- topology

def _count_order(n: int) -> int:
    """get_count_order(): the bits that hold n values."""
    return (n - 1).bit_length()


class Layout:
    """A CPU's ids and sibling sets, as arch/x86 derives them for topology.c and
    cacheinfo.c; sets hold online CPUs only (the kernel builds the sibling maps
    as CPUs come online)."""

    def __init__(self, spec: CpuSpec):
        self.spec = spec
        self.smt_bits = _count_order(spec.threads_per_core)
        self.core_bits = _count_order(spec.cores_per_package)
        self.nr = spec.nr_cpu_ids
        online = spec.online
        self.domains: dict[str, dict[tuple, frozenset[int]]] = {"core": {}, "package": {}}
        for cpu, p in spec.place.items():
            if cpu in online:
                self.domains["core"].setdefault((p.package, p.core), set()).add(cpu)
                self.domains["package"].setdefault((p.package,), set()).add(cpu)
        for sets in self.domains.values():
            for key in sets:
                sets[key] = frozenset(sets[key])
        self.machine = frozenset(c for c in spec.place if c in online)

    def apicid(self, cpu: int) -> int:
        p = self.spec.place[cpu]
        return (p.package << (self.smt_bits + self.core_bits)) | (p.core << self.smt_bits) | p.thread

    def cpus(self, cpu: int, domain: str) -> frozenset[int]:
        """The online CPUs of cpu's core, package or machine."""
        p = self.spec.place[cpu]
        if domain == "core":
            return self.domains["core"][(p.package, p.core)]
        if domain == "package":
            return self.domains["package"][(p.package,)]
        return self.machine

    # topology.c's ids, one function each (x86's topology_*_id()).
    def physical_package_id(self, cpu: int) -> int:
        return self.spec.place[cpu].package

    def die_id(self, cpu: int) -> int:
        return 0                                   # one die per package

    def cluster_id(self, cpu: int) -> int:
        # topo.l2c_id: the APIC id with the bits of the threads sharing the L2 cleared
        return self.apicid(cpu) & ~((1 << self.smt_bits) - 1)

    def core_id(self, cpu: int) -> int:
        return self.spec.place[cpu].core

    def book_id(self, cpu: int) -> int:
        return 0

    def drawer_id(self, cpu: int) -> int:
        return 0

    def cache_id(self, cpu: int, cache: CacheSpec) -> int:
        # get_cache_id(): the APIC id without the bits of the CPUs sharing the cache
        shift = self.smt_bits + (self.core_bits if cache.shared == "package" else 0)
        return self.apicid(cpu) >> shift


def topology_attrs(lay: Layout, cpu: int) -> dict[str, Show]:
    """cpuN/topology/: every attribute the host kernel has, from the config."""
    out: dict[str, Show] = {}
    for name in TOPOLOGY_IDS:
        out[name] = lambda name=name: fmt.topology_id(getattr(lay, name)(cpu))
    for name, domain in TOPOLOGY_MASKS.items():
        cpus = lay.cpus(cpu, domain)
        out[name] = lambda cpus=cpus: fmt.cpumask(cpus, lay.nr)
        out[f"{name}_list"] = lambda cpus=cpus: fmt.cpulist(cpus)
    names = topology_names()
    return {name: show for name, show in sorted(out.items()) if name in names}


def cache_attrs(lay: Layout, cpu: int, cache: CacheSpec) -> dict[str, Show]:
    """cpuN/cache/indexK/: cacheinfo's attributes of one cache."""
    shared = lay.cpus(cpu, cache.shared)
    out: dict[str, Show] = {
        "id": lambda: fmt.cache_uint(lay.cache_id(cpu, cache)),
        "level": lambda: fmt.cache_uint(cache.level),
        "type": lambda: fmt.cache_type(cache.type),
        "size": lambda: fmt.cache_size(cache.size),
        "ways_of_associativity": lambda: fmt.cache_uint(cache.ways),
        "coherency_line_size": lambda: fmt.cache_uint(cache.line_size),
        "number_of_sets": lambda: fmt.cache_uint(cache.sets),
        "physical_line_partition": lambda: fmt.cache_uint(cache.partitions),
        "shared_cpu_map": lambda: fmt.cpumask(shared, lay.nr),
        "shared_cpu_list": lambda: fmt.cpulist(shared),
    }
    names = cache_names()
    out = {name: show for name, show in sorted(out.items()) if name in names}
    for name in CACHE_POLICIES:
        text = getattr(cache, name)
        if text is not None:
            out[name] = lambda text=text: f"{text}\n"
    return out


# --------------------------------------------------------------- the tree

def add_cpu(tree: Tree, d: Dir, m: Machine, lay: Layout, cpu: int) -> None:
    """cpuN/ of a present CPU: online, and for an online one its node link,
    topology/ and cache/ (the kernel adds those as a CPU comes up)."""
    c = tree.add(d, f"cpu{cpu}", Dir())
    online = cpu in m.topo.cpu.online
    if cpu != 0 or cpu0_hotpluggable():
        tree.add(c, "online", Attr(lambda: fmt.cpu_online(online)))
    if not online:
        return
    nid = m.cpu_node[cpu]
    tree.add(c, f"node{nid}", Link(f"../../node/node{nid}"))
    capacity = host_cpu_capacity()
    if capacity is not None:
        tree.add(c, "cpu_capacity", Attr(lambda: fmt.cpu_capacity(capacity)))
    topo = tree.add(c, "topology", Dir())
    for name, show in topology_attrs(lay, cpu).items():
        tree.add(topo, name, Attr(show))
    caches = tree.add(c, "cache", Dir())
    for k, cache in enumerate(m.topo.cpu.caches):
        index = tree.add(caches, f"index{k}", Dir())
        for name, show in cache_attrs(lay, cpu, cache).items():
            tree.add(index, name, Attr(show))


def add_cpus(tree: Tree, m: Machine) -> None:
    """sys/devices/system/cpu: the masks, kernel_max, and a cpuN/ per present CPU."""
    d = tree.path("sys/devices/system/cpu")
    spec = m.topo.cpu
    for name, cpus in cpu_masks(m).items():
        tree.add(d, name, Attr(lambda cpus=cpus: fmt.cpulist(cpus)))
    tree.add(d, "offline", Attr(lambda: fmt.cpus_offline(spec.possible, spec.online)))
    nr_cpus = max(host_kernel_max() or 0, spec.nr_cpu_ids - 1) + 1
    tree.add(d, "kernel_max", Attr(lambda: fmt.kernel_max(nr_cpus)))
    for name in CPU_OPTIONAL:
        if os.path.exists(f"{HOST_CPU}/{name}"):
            # enabled: the present CPUs (x86 enables each as it is found);
            # isolated: none, the emulated kernel has no isolcpus=.
            cpus = spec.present if name == "enabled" else frozenset()
            tree.add(d, name, Attr(lambda cpus=cpus: fmt.cpulist(cpus)))
    lay = Layout(spec)
    for cpu in sorted(spec.present):
        add_cpu(tree, d, m, lay, cpu)
