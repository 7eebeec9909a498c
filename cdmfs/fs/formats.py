"""Kernel text formats: the one place where cdmfs spells out sysfs file contents.

Every function here is pure and returns the *whole* content of one file exactly as
the Linux show function emits it, trailing newline included.  The references are
Linux 6.18 (the host kernel this was checked against, byte for byte, by
``tests/test_formats.py``):

* ``lib/vsprintf.c``  -- ``bitmap_string()`` (``%*pb``) and ``bitmap_list_string()``
  (``%*pbl``); ``lib/bitmap-str.c`` -- ``bitmap_parselist()``.
* ``drivers/base/node.c`` -- ``node_read_meminfo()``, ``node_read_numastat()``,
  ``node_read_vmstat()``, ``node_read_distance()``, ``show_node_state()``,
  ``node_read_cpumap()``.
* ``mm/hugetlb.c`` -- ``hugetlb_report_node_meminfo()``.
* ``drivers/base/memory.c`` -- ``block_size_bytes_show()``, ``phys_index_show()``,
  ``state_show()``, ``valid_zones_show()``.
* ``fs/proc/meminfo.c`` -- ``meminfo_proc_show()``, ``show_val_kb()`` (also the
  padding model for ``device_meminfo``); ``mm/hugetlb.c`` --
  ``hugetlb_report_meminfo()``; ``arch/x86/mm/pat/set_memory.c`` --
  ``arch_report_meminfo()``.
* ``mm/vmstat.c`` -- ``vmstat_text[]`` and ``vmstat_show()`` (``/proc/vmstat``).
* ``mm/hugetlb_sysfs.c`` -- the per-node ``hugepages-<size>kB`` attributes.

Counters are C ``unsigned long`` in the kernel; the functions here accept only
non-negative ``int`` values below 2**64 and raise ``ValueError`` otherwise (a
negative count is an emulator bug, better caught than printed as 18446744073...).
Mappings with keys the format does not have also raise ``ValueError``, so a typo
cannot silently print 0.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping, Optional, Sequence, Tuple

from ..lib.bitmap import (MAX_NR_CPUS, MAX_NUMNODES, cpulist, cpumask, nodelist, parse_cpulist,
                          parse_nodelist)

__all__ = [
    "MAX_NUMNODES",
    "MAX_NR_CPUS",
    "NODE_MEMINFO_KEYS",
    "NODE_MEMINFO_HUGEPAGES_KEYS",
    "NODE_NUMASTAT_KEYS",
    "NODE_VMSTAT_KEYS",
    "PROC_VMSTAT_KEYS",
    "PROC_MEMINFO_KEYS",
    "PROC_MEMINFO_HUGEPAGES_KEYS",
    "nodelist",
    "cpulist",
    "cpumask",
    "parse_nodelist",
    "parse_cpulist",
    "node_meminfo",
    "node_numastat",
    "node_vmstat",
    "node_distance",
    "ulong",
    "hugepages_demote_size",
    "proc_vmstat",
    "proc_meminfo",
    "kv_lines",
    "device_meminfo",
    "block_size_bytes",
    "memory_phys_index",
    "memory_state",
    "memory_valid_zones",
]

_ULONG_MAX = (1 << 64) - 1
_UINT_MAX = (1 << 32) - 1

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _count(name: str, value: object, limit: int = _ULONG_MAX) -> int:
    """Validate one counter value (``%lu``/``%u`` argument)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if value < 0 or value > limit:
        raise ValueError(f"{name}: {value} out of range 0..{limit}")
    return value


def _counter_lines(what: str, counts: Mapping[str, int], keys: Tuple[str, ...]) -> str:
    """``"%s %lu\\n"`` per key, in order, missing keys 0 (numastat, vmstat)."""
    _check_keys(what, counts, keys)
    return "".join(f"{k} {_count(k, counts.get(k, 0))}\n" for k in keys)


def _check_keys(what: str, given: Mapping[str, object], known: Iterable[str]) -> None:
    unknown = set(given) - set(known)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {sorted(unknown)!r}")


# --------------------------------------------------------------------------- #
# drivers/base/node.c
# --------------------------------------------------------------------------- #

#: Lines of ``nodeN/meminfo`` in the order ``node_read_meminfo()`` prints them on
#: the reference x86_64 kernel (CONFIG_TRANSPARENT_HUGEPAGE=y, CONFIG_HUGETLB_PAGE=y;
#: no CONFIG_HIGHMEM -> no HighTotal/HighFree/LowTotal/LowFree, no
#: CONFIG_SHADOW_CALL_STACK -> no ShadowCallStack, no CONFIG_UNACCEPTED_MEMORY ->
#: no Unaccepted).  The last three come from ``hugetlb_report_node_meminfo()``.
NODE_MEMINFO_KEYS: Tuple[str, ...] = (
    "MemTotal",
    "MemFree",
    "MemUsed",
    "SwapCached",
    "Active",
    "Inactive",
    "Active(anon)",
    "Inactive(anon)",
    "Active(file)",
    "Inactive(file)",
    "Unevictable",
    "Mlocked",
    "Dirty",
    "Writeback",
    "FilePages",
    "Mapped",
    "AnonPages",
    "Shmem",
    "KernelStack",
    "PageTables",
    "SecPageTables",
    "NFS_Unstable",
    "Bounce",
    "WritebackTmp",
    "KReclaimable",
    "Slab",
    "SReclaimable",
    "SUnreclaim",
    "AnonHugePages",
    "ShmemHugePages",
    "ShmemPmdMapped",
    "FileHugePages",
    "FilePmdMapped",
    "HugePages_Total",
    "HugePages_Free",
    "HugePages_Surp",
)

#: The meminfo lines that are page counts (``%5u``, no ``kB``), not kB values.
NODE_MEMINFO_HUGEPAGES_KEYS: Tuple[str, ...] = (
    "HugePages_Total",
    "HugePages_Free",
    "HugePages_Surp",
)


def _meminfo_derived(kb: Mapping[str, int]) -> dict:
    """The sums node_read_meminfo() computes itself, for keys the caller omitted."""
    g = lambda k: kb.get(k, 0)  # noqa: E731
    derived = {
        "MemUsed": g("MemTotal") - g("MemFree"),
        "Active": g("Active(anon)") + g("Active(file)"),
        "Inactive": g("Inactive(anon)") + g("Inactive(file)"),
        "Slab": g("SReclaimable") + g("SUnreclaim"),
        # KReclaimable = SReclaimable + NR_KERNEL_MISC_RECLAIMABLE (0 here)
        "KReclaimable": g("SReclaimable"),
    }
    return {k: v for k, v in derived.items() if k not in kb}


def node_meminfo(nid: int, kb: Mapping[str, int]) -> str:
    """``nodeN/meminfo`` -- ``node_read_meminfo()`` + ``hugetlb_report_node_meminfo()``.

    Each kB line is ``"Node %d <Key>:<pad>%8lu kB\\n"`` where ``<Key>:`` is padded
    with spaces to 16 columns (the kernel's literal format strings, e.g.
    ``"Node %d MemTotal:       %8lu kB\\n"``); the ``HugePages_*`` lines are
    ``"Node %d HugePages_Total: %5u\\n"`` -- key padded to 17 columns, ``%5u``
    and no unit.  Values are taken from ``kb`` (kB, or pages for HugePages_*);
    keys not given print 0, except the kernel's own sums, which are derived when
    omitted: MemUsed = MemTotal - MemFree, Active/Inactive = (anon) + (file),
    Slab = SReclaimable + SUnreclaim, KReclaimable = SReclaimable.
    """
    _count("nid", nid, _UINT_MAX >> 1)
    _check_keys("node_meminfo", kb, NODE_MEMINFO_KEYS)
    values = dict(kb)
    values.update(_meminfo_derived(kb))
    row = [values.get(key, 0) for key in NODE_MEMINFO_KEYS]
    # One check over the row, not one call per value: this file is read often.
    if not all(type(v) is int for v in row) or min(row) < 0 or max(row) > _ULONG_MAX \
            or max(row[-len(NODE_MEMINFO_HUGEPAGES_KEYS):]) > _UINT_MAX:
        for key, v in zip(NODE_MEMINFO_KEYS, row):
            _count(key, v, _UINT_MAX if key in NODE_MEMINFO_HUGEPAGES_KEYS else _ULONG_MAX)
    return _node_meminfo_text(nid, tuple(row))


@functools.lru_cache(maxsize=64)
def _node_meminfo_text(nid: int, row: Tuple[int, ...]) -> str:
    # Between two reads the counters rarely change: render each state once.
    return _NODE_MEMINFO_TEMPLATE.format(nid, *row)


#: The kernel's literal format strings, one per line, with the node id as {0}.
_NODE_MEMINFO_TEMPLATE = "".join(
    f"Node {{0}} {key + ':':<17}{{{i}:5d}}\n" if key in NODE_MEMINFO_HUGEPAGES_KEYS
    else f"Node {{0}} {key + ':':<16}{{{i}:8d}} kB\n"
    for i, key in enumerate(NODE_MEMINFO_KEYS, 1))
assert NODE_MEMINFO_KEYS[-len(NODE_MEMINFO_HUGEPAGES_KEYS):] == NODE_MEMINFO_HUGEPAGES_KEYS


#: ``nodeN/numastat`` lines, in ``node_read_numastat()`` order (page counts).
#: Note the names differ from the same counters in vmstat: interleave_hit,
#: local_node, other_node are numa_interleave, numa_local, numa_other there.
NODE_NUMASTAT_KEYS: Tuple[str, ...] = (
    "numa_hit",
    "numa_miss",
    "numa_foreign",
    "interleave_hit",
    "local_node",
    "other_node",
)


def node_numastat(c: Mapping[str, int]) -> str:
    """``nodeN/numastat`` -- ``node_read_numastat()``: six ``"%s %lu\\n"`` lines.

    Keys are :data:`NODE_NUMASTAT_KEYS`; missing ones print 0.
    """
    return _counter_lines("node_numastat", c, NODE_NUMASTAT_KEYS)


#: ``nodeN/vmstat`` lines in ``node_read_vmstat()`` order on the reference kernel:
#: the zone stat items (summed over the node's zones), the NUMA event items,
#: then the node stat items.  Like the kernel, cdmfs gives the THP items
#: (nr_anon_transparent_hugepages, nr_shmem_hugepages, nr_file_hugepages, ...)
#: in huge pages, all other nr_* in base pages.
NODE_VMSTAT_KEYS: Tuple[str, ...] = (
    # enum zone_stat_item
    "nr_free_pages",
    "nr_free_pages_blocks",
    "nr_zone_inactive_anon",
    "nr_zone_active_anon",
    "nr_zone_inactive_file",
    "nr_zone_active_file",
    "nr_zone_unevictable",
    "nr_zone_write_pending",
    "nr_mlock",
    "nr_zspages",
    "nr_free_cma",
    # enum numa_stat_item
    "numa_hit",
    "numa_miss",
    "numa_foreign",
    "numa_interleave",
    "numa_local",
    "numa_other",
    # enum node_stat_item
    "nr_inactive_anon",
    "nr_active_anon",
    "nr_inactive_file",
    "nr_active_file",
    "nr_unevictable",
    "nr_slab_reclaimable",
    "nr_slab_unreclaimable",
    "nr_isolated_anon",
    "nr_isolated_file",
    "workingset_nodes",
    "workingset_refault_anon",
    "workingset_refault_file",
    "workingset_activate_anon",
    "workingset_activate_file",
    "workingset_restore_anon",
    "workingset_restore_file",
    "workingset_nodereclaim",
    "nr_anon_pages",
    "nr_mapped",
    "nr_file_pages",
    "nr_dirty",
    "nr_writeback",
    "nr_shmem",
    "nr_shmem_hugepages",
    "nr_shmem_pmdmapped",
    "nr_file_hugepages",
    "nr_file_pmdmapped",
    "nr_anon_transparent_hugepages",
    "nr_vmscan_write",
    "nr_vmscan_immediate_reclaim",
    "nr_dirtied",
    "nr_written",
    "nr_throttled_written",
    "nr_kernel_misc_reclaimable",
    "nr_foll_pin_acquired",
    "nr_foll_pin_released",
    "nr_kernel_stack",
    "nr_page_table_pages",
    "nr_sec_page_table_pages",
    "nr_iommu_pages",
    "nr_swapcached",
    "pgpromote_success",
    "pgpromote_candidate",
    "pgpromote_candidate_nrl",
    "pgdemote_kswapd",
    "pgdemote_direct",
    "pgdemote_khugepaged",
    "pgdemote_proactive",
    "nr_hugetlb",
    "nr_balloon_pages",
    "nr_kernel_file_pages",
)

def node_vmstat(v: Mapping[str, int]) -> str:
    """``nodeN/vmstat`` -- ``node_read_vmstat()``: ``"%s %lu\\n"`` per item.

    The kernel's :data:`NODE_VMSTAT_KEYS` in order; missing keys print 0.  A
    node has no vm events: pgfault, pgmigrate_success, ... are machine-wide,
    in :func:`proc_vmstat` only, as in the kernel.
    """
    return _counter_lines("node_vmstat", v, NODE_VMSTAT_KEYS)


def node_distance(row: Sequence[int], ids: Optional[Sequence[int]] = None) -> str:
    """``nodeN/distance`` -- ``node_read_distance()``: ``"10 20\\n"``.

    ``row`` holds the distances to each online node in ascending id order.  The
    kernel prints ``"%s%d"`` with the separator chosen by ``i ? " " : ""`` on
    the *node id*, not on "first item": when node 0 is offline the line starts
    with a space.  Pass the online ids as ``ids`` to get that exactly; without
    ``ids`` node 0 is assumed online (plain space-joined list).
    """
    if ids is None:
        ids = range(len(row))
    if len(ids) != len(row):
        raise ValueError("node_distance: row and ids differ in length")
    out = []
    for i, d in zip(ids, row):
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"node_distance: bad distance {d!r}")
        out.append(f"{' ' if i else ''}{d}")
    return "".join(out) + "\n"


def ulong(n: int) -> str:
    """A single ``"%lu\\n"`` value (``sysfs_emit(buf, "%lu\\n", n)``): the
    per-node ``nr_hugepages``, ``free_hugepages``, ``surplus_hugepages``
    (mm/hugetlb_sysfs.c) and the ``power/runtime_*_time`` attributes."""
    return f"{_count('value', n)}\n"


def hugepages_demote_size(kb: int) -> str:
    """``hugepages-<size>kB/demote_size`` -- ``demote_size_show()``:
    ``"%lukB\\n"``, the size huge pages of this size demote to (``2048kB``)."""
    return f"{_count('demote_size', kb)}kB\n"


# --------------------------------------------------------------------------- #
# fs/proc: /proc/vmstat and /proc/meminfo
# --------------------------------------------------------------------------- #

#: ``/proc/vmstat`` lines in ``vmstat_text[]`` order on the reference kernel:
#: the node vmstat's items (zone, NUMA and node stat items, the order of
#: :data:`NODE_VMSTAT_KEYS`), the global writeback thresholds and memmap
#: counters, the vm events (``enum vm_event_item``), and the deprecated
#: ``nr_unstable`` that ``vmstat_show()`` appends, always 0.
PROC_VMSTAT_KEYS: Tuple[str, ...] = NODE_VMSTAT_KEYS + (
    "nr_dirty_threshold",
    "nr_dirty_background_threshold",
    "nr_memmap_pages",
    "nr_memmap_boot_pages",
    "pgpgin",
    "pgpgout",
    "pswpin",
    "pswpout",
    "pgalloc_dma",
    "pgalloc_dma32",
    "pgalloc_normal",
    "pgalloc_movable",
    "pgalloc_device",
    "allocstall_dma",
    "allocstall_dma32",
    "allocstall_normal",
    "allocstall_movable",
    "allocstall_device",
    "pgskip_dma",
    "pgskip_dma32",
    "pgskip_normal",
    "pgskip_movable",
    "pgskip_device",
    "pgfree",
    "pgactivate",
    "pgdeactivate",
    "pglazyfree",
    "pgfault",
    "pgmajfault",
    "pglazyfreed",
    "pgrefill",
    "pgreuse",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "pgsteal_khugepaged",
    "pgsteal_proactive",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgscan_khugepaged",
    "pgscan_proactive",
    "pgscan_direct_throttle",
    "pgscan_anon",
    "pgscan_file",
    "pgsteal_anon",
    "pgsteal_file",
    "zone_reclaim_success",
    "zone_reclaim_failed",
    "pginodesteal",
    "slabs_scanned",
    "kswapd_inodesteal",
    "kswapd_low_wmark_hit_quickly",
    "kswapd_high_wmark_hit_quickly",
    "pageoutrun",
    "pgrotated",
    "drop_pagecache",
    "drop_slab",
    "oom_kill",
    "numa_pte_updates",
    "numa_huge_pte_updates",
    "numa_hint_faults",
    "numa_hint_faults_local",
    "numa_pages_migrated",
    "pgmigrate_success",
    "pgmigrate_fail",
    "thp_migration_success",
    "thp_migration_fail",
    "thp_migration_split",
    "compact_migrate_scanned",
    "compact_free_scanned",
    "compact_isolated",
    "compact_stall",
    "compact_fail",
    "compact_success",
    "compact_daemon_wake",
    "compact_daemon_migrate_scanned",
    "compact_daemon_free_scanned",
    "htlb_buddy_alloc_success",
    "htlb_buddy_alloc_fail",
    "unevictable_pgs_culled",
    "unevictable_pgs_scanned",
    "unevictable_pgs_rescued",
    "unevictable_pgs_mlocked",
    "unevictable_pgs_munlocked",
    "unevictable_pgs_cleared",
    "unevictable_pgs_stranded",
    "thp_fault_alloc",
    "thp_fault_fallback",
    "thp_fault_fallback_charge",
    "thp_collapse_alloc",
    "thp_collapse_alloc_failed",
    "thp_file_alloc",
    "thp_file_fallback",
    "thp_file_fallback_charge",
    "thp_file_mapped",
    "thp_split_page",
    "thp_split_page_failed",
    "thp_deferred_split_page",
    "thp_underused_split_page",
    "thp_split_pmd",
    "thp_scan_exceed_none_pte",
    "thp_scan_exceed_swap_pte",
    "thp_scan_exceed_share_pte",
    "thp_split_pud",
    "thp_zero_page_alloc",
    "thp_zero_page_alloc_failed",
    "thp_swpout",
    "thp_swpout_fallback",
    "balloon_inflate",
    "balloon_deflate",
    "balloon_migrate",
    "swap_ra",
    "swap_ra_hit",
    "swpin_zero",
    "swpout_zero",
    "ksm_swpin_copy",
    "cow_ksm",
    "zswpin",
    "zswpout",
    "zswpwb",
    "direct_map_level2_splits",
    "direct_map_level3_splits",
    "direct_map_level2_collapses",
    "direct_map_level3_collapses",
    "nr_unstable",
)


def proc_vmstat(v: Mapping[str, int]) -> str:
    """``/proc/vmstat`` -- ``vmstat_show()``: ``"%s %lu\\n"`` per item of
    :data:`PROC_VMSTAT_KEYS`, in order; missing keys print 0."""
    return _counter_lines("proc_vmstat", v, PROC_VMSTAT_KEYS)


#: ``/proc/meminfo`` lines in ``meminfo_proc_show()`` order on the reference
#: x86_64 kernel (CONFIG_ZSWAP, CONFIG_TRANSPARENT_HUGEPAGE,
#: CONFIG_HUGETLB_PAGE, CONFIG_MEMORY_BALLOON; no CONFIG_HIGHMEM, no
#: CONFIG_CMA, no CONFIG_UNACCEPTED_MEMORY), with ``hugetlb_report_meminfo()``
#: and x86's ``arch_report_meminfo()`` (DirectMap*) at the end.
PROC_MEMINFO_KEYS: Tuple[str, ...] = (
    "MemTotal",
    "MemFree",
    "MemAvailable",
    "Buffers",
    "Cached",
    "SwapCached",
    "Active",
    "Inactive",
    "Active(anon)",
    "Inactive(anon)",
    "Active(file)",
    "Inactive(file)",
    "Unevictable",
    "Mlocked",
    "SwapTotal",
    "SwapFree",
    "Zswap",
    "Zswapped",
    "Dirty",
    "Writeback",
    "AnonPages",
    "Mapped",
    "Shmem",
    "KReclaimable",
    "Slab",
    "SReclaimable",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "SecPageTables",
    "NFS_Unstable",
    "Bounce",
    "WritebackTmp",
    "CommitLimit",
    "Committed_AS",
    "VmallocTotal",
    "VmallocUsed",
    "VmallocChunk",
    "Percpu",
    "AnonHugePages",
    "ShmemHugePages",
    "ShmemPmdMapped",
    "FileHugePages",
    "FilePmdMapped",
    "Balloon",
    "HugePages_Total",
    "HugePages_Free",
    "HugePages_Rsvd",
    "HugePages_Surp",
    "Hugepagesize",
    "Hugetlb",
    "DirectMap4k",
    "DirectMap2M",
    "DirectMap1G",
)

#: The meminfo lines that are page counts, not kB values: the kernel's
#: ``"HugePages_Total:   %5lu\\n"`` and its three siblings.
PROC_MEMINFO_HUGEPAGES_KEYS: Tuple[str, ...] = (
    "HugePages_Total",
    "HugePages_Free",
    "HugePages_Rsvd",
    "HugePages_Surp",
)


def proc_meminfo(kb: Mapping[str, int]) -> str:
    """``/proc/meminfo`` -- ``meminfo_proc_show()``.

    Each kB line is ``show_val_kb()``: the key and its colon padded to 16
    columns, ``%8lu`` (wider numbers push on, as VmallocTotal's does) and
    `` kB``; the ``HugePages_*`` lines are the key padded to 19 columns and
    ``%5lu``, no unit.  Values from ``kb`` (kB; pages for HugePages_*); keys
    not given print 0.
    """
    _check_keys("proc_meminfo", kb, PROC_MEMINFO_KEYS)
    out = []
    for key in PROC_MEMINFO_KEYS:
        v = _count(key, kb.get(key, 0))
        if key in PROC_MEMINFO_HUGEPAGES_KEYS:
            out.append(f"{key + ':':<19}{v:5d}\n")
        else:
            out.append(f"{key + ':':<16}{v:8d} kB\n")
    return "".join(out)


# --------------------------------------------------------------------------- #
# cdmfs's own files and drivers/base/memory.c
# --------------------------------------------------------------------------- #


def kv_lines(items: Iterable[Tuple[str, object]]) -> str:
    """``"key value\\n"`` per item, in the given order (cdmfs's own stat files).

    The style of vmstat/numastat.  ``bool`` values print as ``1``/``0``; other
    values with ``str()``.  Keys must be non-empty without whitespace, and values
    must not contain whitespace other than inner spaces (no newlines).
    """
    out = []
    for key, value in items:
        if not isinstance(key, str) or not key or any(ch.isspace() for ch in key):
            raise ValueError(f"kv_lines: bad key {key!r}")
        text = str(int(value)) if isinstance(value, bool) else str(value)
        if "\n" in text or "\r" in text:
            raise ValueError(f"kv_lines: value for {key!r} contains a newline")
        out.append(f"{key} {text}\n")
    return "".join(out)


def device_meminfo(total_kb: int, free_kb: int) -> str:
    """``devices/NAME/meminfo``: MemTotal, MemFree, MemUsed = total - free (kB).

    No kernel file has exactly these lines; the padding is /proc/meminfo's
    (``fs/proc/meminfo.c`` ``show_val_kb()``: the key with its colon padded to 16
    columns, then ``%8lu kB``), e.g. ``"MemTotal:       16384000 kB\\n"`` -- the
    ``nodeN/meminfo`` lines without the ``"Node N "`` prefix.
    """
    total = _count("MemTotal", total_kb)
    free = _count("MemFree", free_kb)
    if free > total:
        raise ValueError(f"device_meminfo: free {free} > total {total}")
    return "".join(
        f"{k + ':':<16}{v:8d} kB\n"
        for k, v in (("MemTotal", total), ("MemFree", free), ("MemUsed", total - free))
    )


def block_size_bytes(n: int) -> str:
    """``memory/block_size_bytes`` -- ``block_size_bytes_show()``: ``"%lx\\n"``.

    Lowercase hex without ``0x``: 128 MiB -> ``"8000000\\n"``.
    """
    _count("block_size_bytes", n)
    if n == 0:
        raise ValueError("block_size_bytes: must be positive")
    return f"{n:x}\n"


def memory_phys_index(block: int) -> str:
    """``memoryB/phys_index`` -- ``phys_index_show()``: ``"%08lx\\n"``, the
    block number (physical address / block size)."""
    return f"{_count('phys_index', block):08x}\n"


_MEMORY_STATES = ("online", "offline", "going-offline")


def memory_state(state: str) -> str:
    """``memoryB/state`` -- ``state_show()``: ``online``, ``offline`` or
    ``going-offline`` (while offline_pages() migrates the block's pages)."""
    if state not in _MEMORY_STATES:
        raise ValueError(f"memory_state: unknown state {state!r}")
    return state + "\n"


_ZONES = ("DMA", "DMA32", "Normal", "Movable", "Device")


def memory_valid_zones(zones: Sequence[str]) -> str:
    """``memoryB/valid_zones`` -- ``valid_zones_show()``: the zone of an online
    block; for an offline one the default zone first, then the other zones it
    could be onlined to, space separated (``"Normal Movable\\n"``)."""
    if not zones or any(z not in _ZONES for z in zones) or len(set(zones)) != len(zones):
        raise ValueError(f"memory_valid_zones: bad zones {zones!r}")
    return " ".join(zones) + "\n"
