"""Kernel text formats of ``sys/devices/system/cpu``: the one place where cdmfs
spells out the contents of the CPU files (``formats`` has the node and memory
ones).  Every function is pure and returns a whole file, trailing newline
included, as these show functions of Linux 6.18 print it:

* ``drivers/base/cpu.c`` -- ``show_cpus_attr()`` (``online``, ``possible``,
  ``present``, ``enabled``: ``"%*pbl\\n"``), ``print_cpus_offline()``,
  ``print_cpus_kernel_max()`` (``"%d\\n"``, NR_CPUS - 1),
  ``print_cpus_isolated()``.
* ``drivers/base/core.c`` -- ``online_show()`` of a CPU device (``"%u\\n"``).
* ``drivers/base/topology.c`` -- ``define_id_show_func`` (``"%d\\n"``) and
  ``define_siblings_read_func``: ``cpumap_print_bitmask_to_buf()`` (``"%*pb\\n"``
  over nr_cpu_ids bits) and ``cpumap_print_list_to_buf()`` (``"%*pbl\\n"``).
* ``drivers/base/cacheinfo.c`` -- ``show_one()`` (``"%u\\n"``), ``size_show()``
  (``"%uK\\n"``), ``type_show()``, ``shared_cpu_map_show()``,
  ``shared_cpu_list_show()``.
* ``drivers/base/arch_topology.c`` -- ``cpu_capacity_show()`` (``"%lu\\n"``).
"""
from __future__ import annotations

from typing import Iterable

from ..lib.bitmap import cpulist, cpumask

__all__ = ["cpulist", "cpumask", "cpus_offline", "kernel_max", "cpu_online", "topology_id",
           "cache_uint", "cache_size", "cache_type", "cpu_capacity"]

_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_UINT_MAX = (1 << 32) - 1
CACHE_TYPES = ("Data", "Instruction", "Unified")


def _uint(what: str, value: object, limit: int = _UINT_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"{what}: expected an unsigned int, got {value!r}")
    return value


def cpus_offline(possible: Iterable[int], online: Iterable[int]) -> str:
    """``cpu/offline``: ``"%*pbl\\n"`` of possible & ~online (x86 has no
    ``total_cpus`` beyond nr_cpu_ids to append)."""
    return cpulist(set(possible) - set(online))


def kernel_max(nr_cpus: int) -> str:
    """``cpu/kernel_max``: NR_CPUS - 1, ``"%d\\n"``."""
    return f"{_uint('kernel_max', nr_cpus - 1, _INT_MAX)}\n"


def cpu_online(online: bool) -> str:
    """``cpuN/online``: ``"%u\\n"`` of !dev->offline."""
    return f"{int(bool(online))}\n"


def topology_id(value: int) -> str:
    """``topology/{physical_package_id,die_id,cluster_id,core_id,book_id,drawer_id}``: ``"%d\\n"``."""
    if isinstance(value, bool) or not isinstance(value, int) or not _INT_MIN <= value <= _INT_MAX:
        raise ValueError(f"topology_id: expected an int, got {value!r}")
    return f"{value}\n"


def cache_uint(value: int) -> str:
    """``cache/indexK/{id,level,coherency_line_size,number_of_sets,
    physical_line_partition,ways_of_associativity}``: ``"%u\\n"``."""
    return f"{_uint('cache', value)}\n"


def cache_size(size: int) -> str:
    """``cache/indexK/size``: ``"%uK\\n"`` of size >> 10."""
    return f"{_uint('cache size', size, (_UINT_MAX << 10) | 1023) >> 10}K\n"


def cache_type(kind: str) -> str:
    """``cache/indexK/type``: ``Data``, ``Instruction`` or ``Unified``."""
    if kind not in CACHE_TYPES:
        raise ValueError(f"cache_type: expected one of {CACHE_TYPES}, got {kind!r}")
    return f"{kind}\n"


def cpu_capacity(capacity: int) -> str:
    """``cpuN/cpu_capacity``: ``"%lu\\n"``."""
    return f"{_uint('cpu_capacity', capacity, (1 << 64) - 1)}\n"
