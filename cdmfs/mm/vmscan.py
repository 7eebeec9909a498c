"""Watermarks and reclaim by demotion (mm/page_alloc.c's
__setup_per_zone_wmarks, mm/vmscan.c's kswapd and demote_folio_list).

Each node is one zone (Normal, or Movable for CDM memory).  The watermarks
are the kernel's: ``min_free_kbytes`` from the size of low memory
(``init_per_zone_wmark_min``), shared out by the zones' sizes; low and high
are min plus one and two times max(min / 4, managed * watermark_scale_factor
/ 10000); promo (memory tiering) is min plus three times that.  A Movable
zone's min is managed / 1024, between 32 and 128 pages, as for a zone that
is not low memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import PAGE_SIZE

if TYPE_CHECKING:
    from .machine import Machine

WATERMARK_SCALE_FACTOR = 10      # vm.watermark_scale_factor
MIN_FREE_KBYTES_MIN, MIN_FREE_KBYTES_MAX = 128, 262144
SWAP_CLUSTER_MAX = 32


@dataclass(frozen=True)
class Watermarks:
    min: int
    low: int
    high: int
    promo: int


def movable(m: "Machine", nid: int) -> bool:
    return m.nodes[nid].spec.kind == "cdm"


def min_free_kbytes(lowmem_kbytes: int) -> int:
    """calculate_min_free_kbytes(): int_sqrt(lowmem_kbytes * 16), clamped."""
    v = math.isqrt(lowmem_kbytes * 16)
    return max(MIN_FREE_KBYTES_MIN, min(v, MIN_FREE_KBYTES_MAX))


def watermarks(m: "Machine") -> dict[int, Watermarks]:
    """Every online node's watermarks, in pages."""
    managed = {nid: n.online_pages for nid, n in m.nodes.items()}
    lowmem = sum(p for nid, p in managed.items() if not movable(m, nid))
    min_pages = min_free_kbytes(lowmem * PAGE_SIZE // 1024) * 1024 // PAGE_SIZE
    out = {}
    for nid, pages in managed.items():
        if movable(m, nid):
            wmin = max(SWAP_CLUSTER_MAX, min(pages // 1024, 128))
        else:
            wmin = min_pages * pages // lowmem if lowmem else 0
        delta = max(wmin // 4, pages * WATERMARK_SCALE_FACTOR // 10000)
        out[nid] = Watermarks(wmin, wmin + delta, wmin + 2 * delta, wmin + 3 * delta)
    return out
