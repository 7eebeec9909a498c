"""Bitmaps as the kernel prints and parses them: node and cpu lists (``%*pbl``,
``bitmap_parselist()``) and cpumasks (``%*pb``), after ``lib/vsprintf.c`` and
``lib/bitmap-str.c``.  Every layer uses them (the topology's cpu lists, memory
policies' node lists, sysfs files), so they live at the bottom.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Set

#: MAX_NUMNODES of the reference kernel (CONFIG_NODES_SHIFT=10 on x86_64 distro
#: configs): the bitmap size ``nodelist_parse()`` hands to ``bitmap_parselist()``,
#: so the largest node id a write may name is MAX_NUMNODES - 1.
MAX_NUMNODES = 1 << 10

#: Upper bound for cpu ids in parsed cpu lists: the largest NR_CPUS x86_64
#: allows (CONFIG_MAXSMP), so any host's cpu list parses.
MAX_NR_CPUS = 1 << 13


def _bit_ids(ids: Iterable[int], what: str) -> List[int]:
    """Sorted, de-duplicated, validated list of bit numbers."""
    out = set()
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{what}: expected int ids, got {i!r}")
        if i < 0:
            raise ValueError(f"{what}: negative id {i}")
        out.add(i)
    return sorted(out)




def nodelist(ids: Iterable[int]) -> str:
    """``"%*pbl\\n"`` -- ``bitmap_list_string()`` as used by ``show_node_state()``.

    Runs of consecutive ids print as ``a-b`` (a run of two too: ``0-1``), single
    ids as ``a``, comma separated, ascending; an empty set prints ``"\\n"``.
    Duplicates and order in ``ids`` do not matter; negative ids raise ValueError.
    """
    bits = _bit_ids(ids, "nodelist")
    parts: List[str] = []
    i = 0
    while i < len(bits):
        j = i
        while j + 1 < len(bits) and bits[j + 1] == bits[j] + 1:
            j += 1
        parts.append(str(bits[i]) if i == j else f"{bits[i]}-{bits[j]}")
        i = j + 1
    return ",".join(parts) + "\n"


def cpulist(cpus: Iterable[int]) -> str:
    """``nodeN/cpulist`` and ``cpu/{online,possible,present}``: ``"%*pbl\\n"``.

    Same format as :func:`nodelist` (``cpumap_print_to_pagebuf(true, ...)``).
    """
    return nodelist(cpus)


def cpumask(cpus: Iterable[int], nr_cpu_ids: int) -> str:
    """``"%*pb\\n"`` over ``nr_cpu_ids`` bits -- ``bitmap_string()`` (lib/vsprintf.c).

    As ``node_read_cpumap()`` -> ``cpumap_print_to_pagebuf(false, ...)`` prints
    ``nodeN/cpumap``: lowercase hex in 32-bit chunks, most significant first,
    separated by ``,``.  Every chunk is zero padded to 8 digits except the first
    (most significant) one, which covers only ``nr_cpu_ids % 32`` bits (32 if that
    is 0) and is zero padded to ``DIV_ROUND_UP(chunksz, 4)`` digits.  Examples:
    nr_cpu_ids=2, {0,1} -> ``"3\\n"``; nr_cpu_ids=40, {0,39} -> ``"80,00000001\\n"``;
    nr_cpu_ids=0 -> ``"\\n"``.  A cpu outside ``0..nr_cpu_ids-1`` raises
    ValueError (the kernel would silently not print it).
    """
    if isinstance(nr_cpu_ids, bool) or not isinstance(nr_cpu_ids, int) or nr_cpu_ids < 0:
        raise ValueError(f"cpumask: bad nr_cpu_ids {nr_cpu_ids!r}")
    mask = 0
    for c in _bit_ids(cpus, "cpumask"):
        if c >= nr_cpu_ids:
            raise ValueError(f"cpumask: cpu {c} >= nr_cpu_ids {nr_cpu_ids}")
        mask |= 1 << c
    chunks: List[str] = []
    chunksz = nr_cpu_ids % 32 or 32
    base = ((nr_cpu_ids + 31) // 32 - 1) * 32  # ALIGN(nr_bits, 32) - 32
    while base >= 0:
        val = (mask >> base) & ((1 << chunksz) - 1)
        width = (chunksz + 3) // 4
        chunks.append(f"{val:0{width}x}")
        base -= 32
        chunksz = 32
    return ",".join(chunks) + "\n"


_RANGE_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)


def parse_nodelist(text: str, *, limit: int = MAX_NUMNODES) -> Set[int]:
    """Inverse of :func:`nodelist`: parse ``"0-1,3"`` (one trailing ``\\n`` allowed).

    A subset of the kernel's ``bitmap_parselist()`` (what ``nodelist_parse()``
    uses for writes): comma-separated pieces, each ``N`` or ``A-B`` with
    ``A <= B``, decimal ASCII digits.  ``""``/``"\\n"`` is the empty set (the
    kernel accepts it too; it is what ``nodelist(())`` prints).  Raises
    ValueError on empty pieces (``"0,"``, ``"0,,1"``), reversed ranges, signs,
    spaces, non-digits, and ids ``>= limit`` (the kernel's ``-ERANGE``; the
    default is MAX_NUMNODES).  Stricter than the kernel, which also skips
    whitespace/extra commas and knows ``N`` and ``A-B:G/S`` group syntax.
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_nodelist: expected str, got {type(text).__name__}")
    if text.endswith("\n"):
        text = text[:-1]
    out: Set[int] = set()
    if text == "":
        return out
    for piece in text.split(","):
        m = _RANGE_RE.fullmatch(piece)
        if m is None:
            raise ValueError(f"parse_nodelist: bad piece {piece!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"parse_nodelist: reversed range {piece!r}")
        if hi >= limit:
            raise ValueError(f"parse_nodelist: id {hi} >= limit {limit}")
        out.update(range(lo, hi + 1))
    return out


def parse_cpulist(text: str, *, limit: int = MAX_NR_CPUS) -> Set[int]:
    """Parse a cpu list (``"0-3,8"``, ``cpu/online``): :func:`parse_nodelist`'s
    rules with a cpu-sized bound (the kernel's ``cpulist_parse()`` bounds by
    ``nr_cpumask_bits``); use this, not parse_nodelist, for cpus.
    """
    return parse_nodelist(text, limit=limit)
