"""Usermode hints (SPEC §6.3, issue 15): the advice of CUDA's cudaMemAdvise
and AMD's SVM attributes, kept per region as page ranges, split and merged
as mbind(2) splits and merges VMAs; and prefetch, an asynchronous migration.

    preferred_location:TARGET   where the pages should live
    accessed_by:DEVICE          the device keeps a mapping wherever they are
    read_mostly                 read duplication

Each kind is a sorted list of disjoint (first, end, value) ranges; a range
costs one entry whatever its length, so advice over terabytes is cheap and
every lookup is a bisection.  The memory manager and the devices consult it;
what each advice does is theirs (eviction avoids a preferred location, a
device fault migrates into it or maps remotely, ...).
"""
from __future__ import annotations

import bisect
import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from .migrate_device import MigrateResult, Target, migrate_range

if TYPE_CHECKING:
    from .machine import Machine
    from .region import Region

log = logging.getLogger(__name__)

PREFERRED = "preferred_location"
ACCESSED_BY = "accessed_by"
READ_MOSTLY = "read_mostly"
MAX_RANGES = 65530          # per kind, as vm.max_map_count bounds VMAs


class Advice:
    """The advice ranges of one region: kind -> sorted [(first, end, value)].
    Kinds are ``preferred_location`` (value: a target name),
    ``accessed_by:DEVICE`` and ``read_mostly`` (value: True)."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[tuple[int, int, object]]] = {}

    def set(self, kind: str, first: int, end: int, value: object) -> None:
        """Pages [first, end) take value for kind (None: the advice goes)."""
        kept = []
        for s, e, v in self.kinds.get(kind, ()):
            if e <= first or s >= end:
                kept.append((s, e, v))
                continue
            if s < first:
                kept.append((s, first, v))
            if e > end:
                kept.append((end, e, v))
        if value is not None and first < end:
            kept.append((first, end, value))
        if len(kept) > MAX_RANGES:
            raise OSError(errno.ENOMEM, f"more than {MAX_RANGES} advice ranges")
        kept.sort(key=lambda r: r[0])
        merged: list[tuple[int, int, object]] = []
        for r in kept:
            if merged and merged[-1][1] == r[0] and merged[-1][2] == r[2]:
                merged[-1] = (merged[-1][0], r[1], r[2])
            else:
                merged.append(r)
        if merged:
            self.kinds[kind] = merged
        else:
            self.kinds.pop(kind, None)

    def unset(self, prefix: str, first: int, end: int) -> None:
        """Removes advice of kind prefix (``accessed_by`` names every device's)."""
        for kind in [k for k in self.kinds if k == prefix or k.startswith(prefix + ":")]:
            self.set(kind, first, end, None)

    def spans(self, kind: str, first: int, end: int) -> list[tuple[int, int, object]]:
        """The ranges of kind that meet [first, end), cut to it."""
        ranges = self.kinds.get(kind)
        if not ranges:
            return []
        k = max(bisect.bisect_right(ranges, first, key=lambda r: r[0]) - 1, 0)
        out = []
        for s, e, v in ranges[k:]:
            if s >= end:
                break
            if e > first:
                out.append((max(s, first), min(e, end), v))
        return out

    def segments(self, kind: str, first: int, end: int) -> Iterator[tuple[int, int, object]]:
        """[first, end) cut by kind's ranges: (s, e, value or None), covering it."""
        pos = first
        for s, e, v in self.spans(kind, first, end):
            if s > pos:
                yield pos, s, None
            yield s, e, v
            pos = e
        if pos < end:
            yield pos, end, None

    def any(self, kind: str, first: int, end: int, value: object = None) -> bool:
        """Whether a page of [first, end) has kind (with value, if given)."""
        return any(value is None or v == value for _, _, v in self.spans(kind, first, end))

    def devices_accessing(self) -> list[str]:
        return [k.split(":", 1)[1] for k in self.kinds if k.startswith(ACCESSED_BY + ":")]

    def truncate(self, npages: int) -> None:
        """The advice stays inside the file."""
        for kind in list(self.kinds):
            self.set(kind, npages, max(npages, self.kinds[kind][-1][1]), None)

    def listing(self, extra: Optional[list[tuple[int, int, str]]] = None) -> list[tuple[int, int, list[str]]]:
        """Every advice as (first, end, words): the ranges cut at every
        boundary of every kind, neighbours with the same words merged.
        extra: more (first, end, word) ranges (pins)."""
        items: list[tuple[int, int, str]] = list(extra or [])
        for kind, ranges in self.kinds.items():
            for s, e, v in ranges:
                items.append((s, e, kind if v is True else f"{kind}:{v}"))
        if not items:
            return []
        bounds = sorted({b for s, e, _ in items for b in (s, e)})
        out: list[tuple[int, int, list[str]]] = []
        # A sweep over the boundaries: the words in force between each two.
        starts = sorted(items, key=lambda r: r[0])
        active: list[tuple[int, int, str]] = []
        j = 0
        for a, b in zip(bounds, bounds[1:]):
            while j < len(starts) and starts[j][0] <= a:
                active.append(starts[j])
                j += 1
            active = [r for r in active if r[1] > a]
            words = sorted(w for _, _, w in active)
            if not words:
                continue
            if out and out[-1][1] == a and out[-1][2] == words:
                out[-1] = (out[-1][0], b, words)
            else:
                out.append((a, b, words))
        return out


# ---------------------------------------------------------------- prefetch

@dataclass
class PrefetchStats:
    requested: int = 0          # pages asked for, over every prefetch
    migrated: int = 0
    skipped: int = 0
    active: int = 0             # prefetches under way
    done: int = 0               # prefetches finished


async def prefetch(m: "Machine", region: "Region", first: int, n: int, target: Target) -> MigrateResult:
    """cudaMemPrefetchAsync: migrates [first, first + n) to target; its
    progress (pages migrated so far) and completion show in the region's
    ``stat``.  Device memory that is full evicts (oversubscription)."""
    st = region.prefetch
    st.requested += n
    st.active += 1
    result = MigrateResult(requested=n)
    try:
        # A piece at a time, so that stat shows the progress as it goes.
        step = 1 << 12
        for start in range(first, first + n, step):
            if region.removed:
                break
            k = min(step, first + n - start)
            res = await migrate_range(m, region, start, k, target)
            st.migrated += res.migrated
            st.skipped += res.skipped
            result.migrated += res.migrated
            result.skipped += res.skipped
            result.holes += res.holes
    except Exception:           # a background task must not take the daemon down
        log.exception("prefetch of region %s [%d, +%d) to %s failed", region.name, first, n, target.name)
    finally:
        st.active -= 1
        st.done += 1
    return result
