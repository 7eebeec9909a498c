"""``MOUNT/proc/``: the emulated machine's machine-wide procfs files (SPEC §4),
``vmstat`` (mm/vmstat.c) and ``meminfo`` (fs/proc/meminfo.c), in the kernel's
formats (``formats.proc_vmstat``, ``formats.proc_meminfo``).

Both are sums over the machine, as the kernel's are: the node items over
every node, the vm events (pgfault, pgalloc_*, pgfree, pgmigrate_*) over
the pools where the core counts them.  A read takes one snapshot per pool
(``Machine.node_stats`` per node, ``Machine.pool_stats`` per device-private
pool), so the numbers of one pool agree with each other.

What the emulator does not model reads 0: it has no page cache, swap, slab
or kernel of its own, no huge pages.  NUMA balancing and reclaim by demotion
count their events in Python (mm/numa_balancing.py, mm/vmscan.py).

``sys/kernel/numa_balancing`` and ``numa_balancing_promote_rate_limit_MBps``
are the sysctls of the automatic placement; ``zoneinfo`` shows each node's
zone with its watermarks (mm/vmstat.c zoneinfo_show_print()).
"""
from __future__ import annotations

from collections import Counter

from .._core import lib
from ..lib.kstrtox import INT_MAX, proc_dointvec
from ..mm.machine import KB_PER_PAGE, Machine
from . import formats
from .sysfs.node import NODE_EVENTS, meminfo_kb, vmstat_values
from .tree import Attr, Tree

#: vm events Python counts machine-wide (NumaBalancing.events, vmscan).
PY_EVENTS = ("numa_pte_updates", "numa_hint_faults", "numa_hint_faults_local",
             "numa_pages_migrated", "pgsteal_kswapd", "pgsteal_direct", "pgsteal_anon",
             "pgscan_kswapd", "pgscan_direct", "pgscan_anon")

#: vm events the core counts per pool, by their /proc/vmstat names.
EVENTS = {
    "pgfault": lib.CDM_PGFAULT,
    "pgmigrate_success": lib.CDM_PGMIGRATE_SUCCESS,
    "pgmigrate_fail": lib.CDM_PGMIGRATE_FAIL,
}

#: vm.overcommit_ratio's default (mm/util.c): CommitLimit is this share of RAM.
OVERCOMMIT_RATIO = 50

#: The default huge page size (HPAGE_PMD_SIZE on x86_64), in kB.
HUGEPAGESIZE_KB = 2048


def zone_of(m: Machine, nid: int) -> str:
    """The zone a node's pages are allocated from, for pgalloc_<zone>: CDM
    memory is ZONE_MOVABLE only (SPEC §5), other memory onlines to Normal
    by default.  A node is counted in one zone: the core does not keep its
    counters per memory block."""
    return "movable" if m.nodes[nid].spec.kind == "cdm" else "normal"


def vmstat(m: Machine) -> str:
    """``/proc/vmstat``: the node vmstat items summed over the nodes, and the
    vm events.  pgalloc_* and pgfree count the frames of nodes only: device-
    private pages come from the driver's own allocator, not the page
    allocator, in the kernel as here.  pgfault and pgmigrate_* count on
    every pool (a migration's pages are counted on the pool they left)."""
    v: Counter = Counter()
    for nid in m.nodes:
        pages, c = m.node_stats(nid)
        v.update(vmstat_values(pages, c))
        v[f"pgalloc_{zone_of(m, nid)}"] += c[lib.CDM_PGALLOC]
        v["pgfree"] += c[lib.CDM_PGFREE]
        for name, index in EVENTS.items():
            v[name] += c[index]
        events = m.nodes[nid].events
        for name in NODE_EVENTS:
            v[name] += events[name]
    for name in PY_EVENTS:
        v[name] += m.balancing.events[name]
    for priv in m.private.values():
        c = m.pool_stats(priv.pool).counters
        for name, index in EVENTS.items():
            v[name] += c[index]
    return formats.proc_vmstat(v)


def meminfo(m: Machine) -> str:
    """``/proc/meminfo``: the nodes' memory summed (device-private memory is
    not RAM: ZONE_DEVICE pages are in no MemTotal).  MemAvailable is MemFree
    (no page cache or reclaimable slab to add); CommitLimit is
    ``vm_commit_limit()`` with no swap and no huge pages; Committed_AS counts
    the pages regions hold, as tmpfs charges its pages to the commitment
    when it allocates them (shmem_acct_blocks())."""
    total: Counter = Counter()
    for nid in m.nodes:
        total.update(m.node_pages(nid))
    kb = meminfo_kb(total)
    kb["MemAvailable"] = kb["MemFree"]
    kb["CommitLimit"] = total["total"] * OVERCOMMIT_RATIO // 100 * KB_PER_PAGE
    kb["Committed_AS"] = kb["AnonPages"]
    kb["Hugepagesize"] = HUGEPAGESIZE_KB
    return formats.proc_meminfo(kb)


def zoneinfo(m: Machine) -> str:
    """``/proc/zoneinfo``: one populated zone per online node (Normal, or
    Movable for CDM memory), its node's stats, its watermarks and sizes."""
    wmarks = m.watermarks()
    out = []
    for nid, node in m.nodes.items():
        if not node.online:
            continue
        pages, c = m.node_stats(nid)
        v = vmstat_values(pages, c)
        v.update({k: node.events[k] for k in NODE_EVENTS})
        wm = wmarks[nid]
        keys = formats.NODE_VMSTAT_KEYS
        zone_keys = keys[:keys.index("numa_hit")]
        numa_keys = keys[keys.index("numa_hit"):keys.index("nr_inactive_anon")]
        node_keys = keys[keys.index("nr_inactive_anon"):]
        lines = [f"Node {nid}, zone {zone_of(m, nid).capitalize():>8}", "  per-node stats"]
        lines += [f"      {k:<12} {v.get(k, 0)}" for k in node_keys]
        spanned = node.spec.npages
        lines += [f"  pages free     {pages['free']}",
                  "        boost    0",
                  f"        min      {wm.min}",
                  f"        low      {wm.low}",
                  f"        high     {wm.high}",
                  f"        promo    {wm.promo}",
                  f"        spanned  {spanned}",
                  f"        present  {pages['total']}",
                  f"        managed  {pages['total']}",
                  "        cma      0",
                  "        protection: (0, 0, 0, 0, 0)"]
        lines += [f"      {k:<12} {v.get(k, 0)}" for k in zone_keys + numa_keys]
        lines += ["  pagesets",
                  "  node_unreclaimable:  0",
                  f"  start_pfn:           {node.spec.base_pfn}"]
        out.append("\n".join(lines) + "\n")
    return "".join(out)


def sysctl(tree: Tree, d, name: str, get, put, lo: int, hi: int) -> None:
    """A sysctl integer file (proc_dointvec_minmax): EINVAL outside [lo, hi]."""
    tree.add(d, name, Attr(lambda: f"{get()}\n", lambda text: put(proc_dointvec(text, lo, hi))))


def build(tree: Tree, m: Machine) -> None:
    """Adds proc/ for machine m to tree."""
    d = tree.path("proc")
    tree.add(d, "meminfo", Attr(lambda: meminfo(m)))
    tree.add(d, "vmstat", Attr(lambda: vmstat(m)))
    tree.add(d, "zoneinfo", Attr(lambda: zoneinfo(m)))
    kernel = tree.path("proc/sys/kernel")
    bal = m.balancing

    def set_rate(v: int) -> None:
        bal.promote_rate_limit_mbps = v
    sysctl(tree, kernel, "numa_balancing", lambda: bal.mode, bal.set_mode, 0, 3)
    sysctl(tree, kernel, "numa_balancing_promote_rate_limit_MBps",
           lambda: bal.promote_rate_limit_mbps, set_rate, 0, INT_MAX)
