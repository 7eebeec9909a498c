"""The emulated devices (SPEC §7), in the manner of Linux's lib/test_hmm.c.

A device mirrors the process address space: its page table (one byte a page
per region: none, read, write, kept sparse in chunks so that it costs memory
by the pages mirrored, not by the region's size) fills on device faults and
loses pages when they migrate, get truncated, poisoned or faulted back by the
CPU.  A device
fault under ``migrate`` moves the pages into device memory (allocating there
if the CPU never touched them); under ``remote`` the device reaches them where
they lie.  Every access sees what a CPU access would see at that moment: CPU
copies are invalidated first, so dirty data is written back before the device
reads, and again after a device write, so the CPU's next access faults.
"""
from __future__ import annotations

import dataclasses
import errno
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from .._core import ffi, lib
from ..config import PAGE_SIZE, DeviceSpec, transfer_ns
from ..lib.sched import cond_resched
from ..mm import advice as adv
from ..mm import memory_failure
from ..mm.evict import MODES as EVICTION_MODES
from ..mm import migrate_device as migrate
from ..mm.machine import Machine, PageMap
from ..mm.migrate_device import Target

if TYPE_CHECKING:
    from ..mm.region import Region

# Device page-table entries: one byte a page.
PT_NONE, PT_READ, PT_WRITE = 0, 1, 2
MAP_READ = bytes([PT_READ, PT_READ, PT_WRITE]) + bytes(253)      # none/read -> read
MAP_WRITE = bytes([PT_WRITE] * 3) + bytes(253)

OPS = {"read": lib.CDM_OP_READ, "write": lib.CDM_OP_WRITE, "add": lib.CDM_OP_ADD,
       "touch": lib.CDM_OP_TOUCH}
# The device's DMA between the pages and a buffer of the daemon (test_hmm's
# bounce buffer): what HMM_DMIRROR_READ, WRITE and the read-backs of
# MIGRATE_TO_DEV and EXCLUSIVE do with the bytes.  Not ops of the access file
# on their own: their bytes go through a bounce range of the region.
COPY_OPS = {"copyout": lib.CDM_OP_COPYOUT, "copyin": lib.CDM_OP_COPYIN}
NATIVE_OPS = {**OPS, **COPY_OPS}
WRITE_OPS = ("write", "add", "copyin")
FAULT_POLICIES = ("migrate", "remote")
COUNTER_GRANULES = {"64K": (64 << 10) // PAGE_SIZE, "2M": (2 << 20) // PAGE_SIZE,
                    "16M": (16 << 20) // PAGE_SIZE}
COUNTER_GRANULES_BY_PAGES = {v: k for k, v in COUNTER_GRANULES.items()}
MAX_COUNTER_THRESHOLD = 1 << 32
READ_MOSTLY_KEY = adv.READ_MOSTLY
MIRROR_CHUNK = 1 << 12      # pages per chunk of a device page table
OP_CHUNK = 1 << 12          # pages per native device op: 16 MiB, a few ms at most
READ_RETRIES = 3            # reads again after CPU stores raced them, at most this often
STAT_KEYS = ("faults", "fault_batches", "migrated_to", "migrated_from", "local_bytes",
             "remote_bytes", "invalidations", "modeled_ns", "truncated_accesses",
             "counter_notifications", "counter_migrations", "evictions", "evicted_bytes",
             "duplicated")


@dataclass
class AccessResult:
    bytes: int = 0
    faults: int = 0
    migrated: int = 0
    local_bytes: int = 0
    remote_bytes: int = 0
    modeled_ns: int = 0
    crc32: int | None = None

    def text(self) -> str:
        line = (f"ok bytes={self.bytes} faults={self.faults} migrated={self.migrated} "
                f"local_bytes={self.local_bytes} remote_bytes={self.remote_bytes} "
                f"modeled_ns={self.modeled_ns}")
        if self.crc32 is not None:
            line += f" crc32=0x{self.crc32:08x}"
        return line + "\n"


class Mirror:
    """A device's page table of one region: a byte a page (PT_*), in chunks
    of MIRROR_CHUNK pages that exist only where something is mapped."""

    def __init__(self) -> None:
        self.chunks: dict[int, bytearray] = {}

    def _spans(self, first: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, start, stop) of [first, end) cut at chunk boundaries."""
        pos = first
        while pos < end:
            c = pos // MIRROR_CHUNK
            stop = min(end, (c + 1) * MIRROR_CHUNK)
            yield c, pos - c * MIRROR_CHUNK, stop - c * MIRROR_CHUNK
            pos = stop

    def _chunk(self, c: int) -> bytearray:
        chunk = self.chunks.get(c)
        if chunk is None:
            chunk = self.chunks[c] = bytearray(MIRROR_CHUNK)
        return chunk

    def unmapped(self, first: int, end: int) -> int:
        """Pages of [first, end) the device has no entry for."""
        count = 0
        for c, a, b in self._spans(first, end):
            chunk = self.chunks.get(c)
            count += b - a if chunk is None else chunk.count(PT_NONE, a, b)
        return count

    def count(self, first: int, end: int, value: int) -> int:
        """Pages of [first, end) whose entry is value (not PT_NONE)."""
        return sum(chunk.count(value, a, b) for c, a, b in self._spans(first, end)
                   if (chunk := self.chunks.get(c)) is not None)

    def runs(self, first: int, end: int, value: int) -> Iterator[tuple[int, int]]:
        """[s, e) runs of pages of [first, end) whose entry is value, found
        by bytes.find over the chunks that exist (not a page at a time)."""
        mark = bytes([value])
        for c, a, b in self._spans(first, end):
            chunk = self.chunks.get(c)
            if chunk is None:
                continue
            base = c * MIRROR_CHUNK
            pos = chunk.find(mark, a, b)
            while pos >= 0:
                stop = b - len(chunk[pos:b].lstrip(mark))
                yield base + pos, base + stop
                pos = chunk.find(mark, stop, b)

    def map(self, first: int, end: int, table: bytes) -> None:
        """Entries of [first, end) become table[entry] (MAP_READ, MAP_WRITE)."""
        for c, a, b in self._spans(first, end):
            chunk = self._chunk(c)
            chunk[a:b] = chunk[a:b].translate(table)

    def clear(self, first: int, end: int) -> bool:
        """Drops the entries of [first, end); whether any was there.  Walks
        the chunks that exist, not the range (a truncation of terabytes)."""
        lo, hi = first // MIRROR_CHUNK, (end - 1) // MIRROR_CHUNK
        if hi - lo + 1 > len(self.chunks):
            keys = [c for c in self.chunks if lo <= c <= hi]
        else:
            keys = [c for c in range(lo, hi + 1) if c in self.chunks]
        dropped = False
        for c in keys:
            chunk = self.chunks[c]
            a, b = max(first - c * MIRROR_CHUNK, 0), min(end - c * MIRROR_CHUNK, MIRROR_CHUNK)
            if chunk.count(PT_NONE, a, b) != b - a:
                dropped = True
                chunk[a:b] = bytes(b - a)
            if not any(chunk):
                del self.chunks[c]
        return dropped

    def set(self, page: int, value: int) -> None:
        self._chunk(page // MIRROR_CHUNK)[page % MIRROR_CHUNK] = value

    def entry(self, page: int) -> int:
        chunk = self.chunks.get(page // MIRROR_CHUNK)
        return PT_NONE if chunk is None else chunk[page % MIRROR_CHUNK]


@dataclass
class Device:
    machine: Machine
    spec: DeviceSpec
    pgmap: PageMap                          # its memory, as the memory manager knows it
    fault_policy: str = ""
    stats: dict = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))
    mirrors: dict = field(default_factory=dict)   # region id -> Mirror
    # Access counters: a threshold (0: off), the granule in pages, and the
    # count of each granule touched since its last notification.
    counter_threshold: int = 0
    counter_granule: int = 0
    access_counts: dict = field(default_factory=dict)  # (region id, granule) -> accesses
    # Read duplication: region id -> {page: PFN of the device's read-only copy}.
    dups: dict = field(default_factory=dict)
    # Device-exclusive access (make_device_exclusive): region id -> Mirror
    # whose PT_WRITE entries are the pages the device holds exclusively.
    exclusive: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fault_policy:
            self.fault_policy = "remote" if self.spec.coherent else "migrate"

    @property
    def pool(self) -> int:
        return self.pgmap.pool

    @property
    def lru(self):
        """Its memory's LRU and eviction switch (mm/evict.py)."""
        return self.machine.evictors[self.pool]

    @property
    def eviction(self) -> str:
        return self.lru.mode

    def set_eviction(self, mode: str) -> None:
        if mode not in EVICTION_MODES:
            raise ValueError(f"expected one of {', '.join(EVICTION_MODES)}")
        self.lru.mode = mode

    @property
    def online(self) -> bool:
        return self.pgmap.online

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return "coherent" if self.spec.coherent else "private"

    @property
    def own_target(self) -> str:
        return f"node:{self.spec.node}" if self.spec.coherent else f"private:{self.name}"

    def target(self) -> "Target":
        return self.machine.target(self.own_target)

    # ------------------------------------------------------------ page table

    def mirror(self, region: "Region") -> Mirror:
        pt = self.mirrors.get(region.id)
        if pt is None:
            pt = self.mirrors[region.id] = Mirror()
        return pt

    def invalidate(self, region: "Region", first: int, n: int) -> None:
        """mmu_notifier: drop the device's entries of pages [first, first + n).
        Pages it is ``accessed_by`` are mapped again where they are now."""
        pt = self.mirrors.get(region.id)
        if pt is not None and n > 0 and pt.clear(first, first + n):
            self.stats["invalidations"] += 1
        marks = self.exclusive.get(region.id)
        if marks is not None and n > 0:
            marks.clear(first, first + n)
        if region.id in self.dups and self.drop_duplicates(region, first, n) and not region.removed:
            lib.cdm_region_collapse(self.machine.core, region.core, first, n)
        if self.accessed_key in region.advice.kinds:
            for s, e, _ in region.advice.spans(self.accessed_key, first, first + n):
                self.map_reachable(region, s, e - s)

    @property
    def accessed_key(self) -> str:
        return f"{adv.ACCESSED_BY}:{self.name}"

    def map_reachable(self, region: "Region", first: int, n: int) -> int:
        """Maps the present pages of [first, first + n) the device can reach
        where they lie (any node; private memory only its own): what
        ``accessed_by`` keeps mapped.  Costs the pages present."""
        if region.removed:
            return 0
        pt = self.mirror(region)
        mapped = 0
        for s, k in region.present_spans(first, first + n):
            ptes = ffi.new("uint64_t[]", k)
            lib.cdm_region_ptes(self.machine.core, region.core, s, k, ptes)
            for j in range(k):
                pte = ptes[j]
                if not pte & lib.CDM_PTE_PRESENT or pte & lib.CDM_PTE_POISONED:
                    continue
                if pte & lib.CDM_PTE_PRIVATE and \
                        (pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT != self.pool:
                    continue
                pt.set(s + j, PT_WRITE)
                mapped += 1
        return mapped

    def on_advise(self, region: "Region", first: int, n: int, what: str, arg: object) -> None:
        """accessed_by:DEV maps the range's pages now; unsetting it drops the
        remote entries (the device's next access faults as usual)."""
        if what == adv.ACCESSED_BY and arg == self.name:
            self.map_reachable(region, first, n)
        elif what == "unset" and arg == adv.READ_MOSTLY and region.id in self.dups:
            # Duplication ends: the duplicates go, and their read-only
            # entries, so that the next access faults as the policy says.
            self.collapse_mine(region, first, n)
        elif what == "unset" and arg in (adv.ACCESSED_BY, self.accessed_key):
            pt = self.mirrors.get(region.id)
            if pt is not None:
                pt.clear(first, first + n)
                self.map_own(region, first, n)

    def map_own(self, region: "Region", first: int, n: int) -> None:
        """Maps the pages of [first, first + n) that live in this device's
        memory, as test_hmm maps what it migrated to itself."""
        pt = self.mirror(region)
        for c, a, b in pt._spans(first, first + n):
            chunk = pt._chunk(c)
            base = c * MIRROR_CHUNK
            lib.cdm_region_mirror_pool(self.machine.core, region.core, base + a, b - a, self.pool,
                                       ffi.from_buffer(chunk) - base, PT_WRITE)
            if not any(chunk):
                del pt.chunks[c]

    def forget(self, region: "Region") -> None:
        self.mirrors.pop(region.id, None)
        self.exclusive.pop(region.id, None)
        self._free_region_dups(region.id)
        for key in [k for k in self.access_counts if k[0] == region.id]:
            del self.access_counts[key]

    # ------------------------------------------------------------ read duplication

    def _duplicate(self, region: "Region", first: int, n: int) -> int:
        """read_mostly: the pages of [first, first + n) under the advice that
        lie on a node (not in this device's memory) get a read-only duplicate
        in its memory, the CPU keeping its copy.  Duplicates take free memory
        only: they never evict pages (and are the first thing eviction takes
        back), so fewer pages are duplicated when memory is short.  Returns
        pages duplicated."""
        m = self.machine
        spans = region.advice.spans(READ_MOSTLY_KEY, first, first + n)
        if not spans or region.removed:
            return 0
        # No await from here on: the candidates stay what they are.
        dups = self.dups.setdefault(region.id, {})
        pages = []
        for s, e, _ in spans:
            for ps, k in region.present_spans(s, e):
                ptes = ffi.new("uint64_t[]", k)
                lib.cdm_region_ptes(m.core, region.core, ps, k, ptes)
                for j in range(k):
                    pte = ptes[j]
                    if pte & lib.CDM_PTE_PRESENT and not pte & (lib.CDM_PTE_PRIVATE | lib.CDM_PTE_POISONED) \
                            and (pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT != self.pool \
                            and ps + j not in dups:
                        pages.append(ps + j)
        count = min(len(pages), self.lru.free_pages())
        if not count:
            if not dups:
                del self.dups[region.id]
            return 0
        pages = pages[:count]
        frames = ffi.new("uint64_t[]", count)
        if lib.cdm_pool_alloc(m.core, self.pool, count, frames):
            return 0
        done = ffi.new("uint8_t[]", count)
        # cdm_region_duplicate takes a dst per page of a range: runs of pages.
        made = 0
        k = 0
        while k < count:
            j = k
            while j + 1 < count and pages[j + 1] == pages[j] + 1:
                j += 1
            made += lib.cdm_region_duplicate(m.core, region.core, pages[k], j - k + 1, frames + k, done + k)
            k = j + 1
        unused = [frames[k] for k in range(count) if not done[k]]
        if unused:
            lib.cdm_pool_free(m.core, ffi.new("uint64_t[]", unused), len(unused))
        for k in range(count):
            if done[k]:
                dups[pages[k]] = frames[k]
        self.stats["duplicated"] += made
        m.duplicates += made
        if made:
            m.events.emit("duplicate", device=self.name, region=region, first=first, n=n, pages=made)
        return made

    def collapse_mine(self, region: "Region", first: int, n: int) -> None:
        """Collapses the duplicates of [first, first + n) (every device's)
        and drops this device's entries of the pages it had duplicated."""
        mine = self.dups.get(region.id, {})
        pages = [p for p in range(first, first + n) if p in mine] if n <= len(mine) \
            else [p for p in mine if first <= p < first + n]
        self.machine.collapse_duplicates(region, first, n)
        pt = self.mirrors.get(region.id)
        if pt is not None:
            for p in pages:
                pt.set(p, PT_NONE)

    def drop_duplicates(self, region: "Region", first: int, n: int) -> int:
        """Frees this device's duplicates of [first, first + n).  The caller
        clears the pages' mark (Machine.collapse_duplicates)."""
        d = self.dups.get(region.id)
        if not d:
            return 0
        end = first + n
        pages = [p for p in d if first <= p < end] if len(d) <= n else [p for p in range(first, end) if p in d]
        if not pages:
            return 0
        frames = [d.pop(p) for p in pages]
        if not d:
            del self.dups[region.id]
        lib.cdm_pool_free(self.machine.core, ffi.new("uint64_t[]", frames), len(frames))
        self.stats["duplicated"] -= len(pages)
        self.machine.duplicates -= len(pages)
        return len(pages)

    def reclaim_duplicates(self, need: int) -> int:
        """Full memory: gives back up to need pages of read duplicates (at
        least one run), collapsed like any write would; the pages are read
        where they are again.  Returns pages freed."""
        m = self.machine
        freed = 0
        for rid in list(self.dups):
            region = m.regions.by_id.get(rid) if m.regions is not None else None
            if region is None or region.removed:
                freed += len(self.dups.get(rid, ()))
                self._free_region_dups(rid)
                continue
            pages = sorted(self.dups.get(rid, ()))
            k = 0
            while k < len(pages) and freed < need:
                j = k
                while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1 and j + 1 - k < need - freed:
                    j += 1
                before = self.stats["duplicated"]
                self.collapse_mine(region, pages[k], j - k + 1)
                freed += before - self.stats["duplicated"]
                k = j + 1
            if freed >= need:
                break
        return freed

    def drop_all_duplicates(self) -> None:
        """Every duplicate goes (the device leaves service, or its memory is lost)."""
        m = self.machine
        for rid in list(self.dups):
            region = m.regions.by_id.get(rid) if m.regions is not None else None
            if region is None or region.removed:
                self._free_region_dups(rid)
            else:
                m.collapse_duplicates(region, 0, region.npages)

    def _free_region_dups(self, rid: int) -> None:
        d = self.dups.pop(rid, None)
        if d:
            lib.cdm_pool_free(self.machine.core, ffi.new("uint64_t[]", list(d.values())), len(d))
            self.stats["duplicated"] -= len(d)
            self.machine.duplicates -= len(d)

    # ------------------------------------------------------------ access counters

    def counters_text(self) -> str:
        if not self.counter_threshold:
            return "0\n"
        return f"{self.counter_threshold} {COUNTER_GRANULES_BY_PAGES[self.counter_granule]}\n"

    def set_counters(self, text: str) -> None:
        """``0`` (off) or ``THRESHOLD GRANULARITY``: parsed whole, a bad one
        changes nothing; any change starts every counter from zero."""
        words = text.split()
        if words == ["0"]:
            threshold, granule = 0, 0
        elif len(words) == 2 and words[0].isdigit() and words[1] in COUNTER_GRANULES:
            threshold, granule = int(words[0]), COUNTER_GRANULES[words[1]]
            if not 1 <= threshold <= MAX_COUNTER_THRESHOLD:
                raise ValueError(f"THRESHOLD must be 1..{MAX_COUNTER_THRESHOLD}")
        else:
            raise ValueError(f"expected 0 or THRESHOLD GRANULARITY ({', '.join(COUNTER_GRANULES)})")
        self.counter_threshold, self.counter_granule = threshold, granule
        self.access_counts.clear()

    async def _count_accesses(self, region: "Region", first: int, n: int, res: AccessResult) -> None:
        """Volta-style access counters: every page the access touched outside
        the device's memory counts one access to its granule; a granule that
        reaches the threshold notifies the driver, which migrates it in and
        starts its counter again.  Costs a census per granule touched."""
        m = self.machine
        gp = self.counter_granule
        present = ffi.new("uint64_t[]", lib.CDM_MAX_POOLS)
        dirty = ffi.new("uint64_t[]", lib.CDM_MAX_POOLS)
        end = min(first + n, region.npages)
        if end <= first:
            return
        for g in range(first // gp, (end - 1) // gp + 1):
            a, b = max(first, g * gp), min(end, (g + 1) * gp)
            ffi.memmove(present, bytes(8 * lib.CDM_MAX_POOLS), 8 * lib.CDM_MAX_POOLS)
            lib.cdm_region_census(m.core, region.core, a, b - a, present, dirty)
            remote = sum(present) - present[self.pool]
            mine = self.dups.get(region.id)
            if mine and remote > 0:
                remote -= sum(1 for p in range(a, b) if p in mine)     # read from its duplicates
            if remote <= 0:
                continue
            key = (region.id, g)
            count = self.access_counts.get(key, 0) + remote
            if count < self.counter_threshold:
                self.access_counts[key] = count
                continue
            self.access_counts.pop(key, None)
            self.stats["counter_notifications"] += 1
            m.events.emit("counter_notification", device=self.name, region=region, first=g * gp, n=gp)
            moved = await self._counter_migrate(region, g * gp, min((g + 1) * gp, region.npages))
            if moved:
                self.stats["counter_migrations"] += 1
                res.migrated += moved
                res.modeled_ns += transfer_ns(moved * PAGE_SIZE, self.remote_figures().read_bandwidth)

    async def _counter_migrate(self, region: "Region", a: int, b: int) -> int:
        """Moves the granule's pages into the device's memory, subject to the
        switches (a coherent node's ``numa_balancing``, and the source nodes'),
        the ranges' policies (a ``bind`` without the device's node keeps its
        pages), advice (pages preferring elsewhere stay) and pins (skipped).
        Untouched pages are not allocated."""
        m = self.machine
        if not self.online or a >= b:
            return 0
        if self.spec.coherent and not m.nodes[self.spec.node].numa_balancing:
            return 0
        from_pools = sum(1 << node.pool for node in m.nodes.values() if node.numa_balancing)
        target = dataclasses.replace(self.target(), device_memory=False)
        moved = 0
        for ps, pe, policy in region.policy_segments(a, b):
            if self.spec.coherent and policy.mode == "bind" and self.spec.node not in policy.nodes:
                continue
            for s, e, pref in region.advice.segments(adv.PREFERRED, ps, pe):
                if pref is not None and pref != self.own_target:
                    continue
                moved += (await migrate.migrate_range(m, region, s, e - s, target,
                                                      from_pools=from_pools)).migrated
        return moved

    # ------------------------------------------------------------ access

    async def access(self, region: "Region", first: int, n: int, op: str, arg: int,
                     for_write: bool = False) -> AccessResult:
        """A device kernel touching pages [first, first + n) of region.  A range
        truncated under the access fails with EFAULT, a region removed under
        it with ENOENT, whatever step noticed.  An access that began inside
        the region and ends with part of its range gone counts in
        ``truncated_accesses``, however it ended (a truncation after its last
        device op leaves it the bytes it read)."""
        inside = not region.removed and first + n <= region.npages
        began = time.monotonic_ns()
        try:
            with region.hold():
                res = await self._access(region, first, n, op, arg, for_write)
            self.machine.events.emit("device_op", device=self.name, region=region, first=first, n=n,
                                     op=op, local_bytes=res.local_bytes, remote_bytes=res.remote_bytes,
                                     modeled_ns=res.modeled_ns, wall_ns=time.monotonic_ns() - began)
            return res
        except OSError:
            if region.removed:
                raise OSError(errno.ENOENT, f"region {region.name} was removed during the access") from None
            if first + n > region.npages:
                raise OSError(errno.EFAULT, "the range was truncated during the access") from None
            raise
        finally:
            if inside and (region.removed or first + n > region.npages):
                self.stats["truncated_accesses"] += 1

    async def _access(self, region: "Region", first: int, n: int, op: str, arg: int,
                      for_write: bool = False) -> AccessResult:
        """for_write: the pages are faulted and mapped writable whatever op
        does with them (make_device_exclusive's FOLL_WRITE)."""
        if not self.online:
            raise OSError(errno.ENODEV, f"device {self.name} is offline")
        m = self.machine
        pt = self.mirror(region)
        res = AccessResult(bytes=n * PAGE_SIZE)
        writing = op in WRITE_OPS
        if op in COPY_OPS:
            # arg is the address of the bounce buffer: placed so that page p's
            # bytes are at arg + p * PAGE_SIZE whatever chunk of the range runs.
            arg = (arg - first * PAGE_SIZE) & 0xFFFFFFFFFFFFFFFF
        if writing and region.id in self.dups:
            # The writer's copy wins: its duplicates are collapsed (everyone's
            # are) and its read-only entries dropped, so that the write
            # faults them in as any write would.
            self.collapse_mine(region, first, n)
        res.faults = pt.unmapped(first, first + n)
        if for_write:
            # A read entry is no write permission: those pages fault too.
            res.faults = n - pt.count(first, first + n, PT_WRITE)
        window = self._fault_window(n) if res.faults else 0
        if res.faults:
            self.stats["faults"] += res.faults
            self.stats["fault_batches"] += 1
            m.events.emit("device_fault", device=self.name, region=region, first=first, n=n,
                          faults=res.faults)
            region.device_faults += res.faults
            res.modeled_ns += self.remote_figures().read_latency
            if not window:
                await self._fault(region, first, n, res, reading=not (writing or for_write))
        # Coherence: take the CPU's dirty copies back before the device looks.
        if m.cpu_mapped(region, first, n):
            await m.cpu_unmap(region, first, n)
        step = window or OP_CHUNK
        table = MAP_WRITE if writing or for_write else MAP_READ
        for attempt in range(READ_RETRIES):
            crc = cpu_pages = res.local_bytes = res.remote_bytes = 0
            # The kernel runs in chunks that yield in between: a device reading
            # a gigabyte must not hold up everyone else's requests.  A kernel
            # over more than its memory (oversubscription) faults a window at
            # a time, so that eviction makes room for each window in turn.
            for start in range(first, first + n, step):
                k = min(step, first + n - start)
                if window and pt.unmapped(start, start + k):
                    await self._fault(region, start, k, res, reading=not writing)
                    if m.cpu_mapped(region, start, k):
                        await m.cpu_unmap(region, start, k)
                out = await self._run_chunk(region, start, k, op, arg, crc, res)
                if window:
                    pt.map(start, min(start + k, region.npages), table)
                    self.lru.touch(region, start, k)
                crc = out.crc
                cpu_pages += out.cpu_pages
                res.local_bytes += out.local_bytes
                res.remote_bytes += out.remote_bytes
                await cond_resched()
            if not cpu_pages:
                break
            # The CPU faulted pages in meanwhile: a write's bytes must reach its
            # next access; a read may have missed stores it made since, so it
            # takes them back and reads again (a few times at most).
            await m.cpu_unmap(region, first, n)
            if writing:
                break
        # A truncation after the last device op took pages of the range away:
        # the device keeps no entry past the end.
        if not window:
            pt.map(first, min(first + n, region.npages), table)
            self.lru.touch(region, first, n)
        own_fig, remote_fig = self.own_figures(), self.remote_figures()
        res.modeled_ns += transfer_ns(res.local_bytes, own_fig.write_bandwidth if writing else own_fig.read_bandwidth)
        res.modeled_ns += transfer_ns(res.remote_bytes, remote_fig.write_bandwidth if writing else remote_fig.read_bandwidth)
        if op == "read":
            res.crc32 = crc
        if not writing and READ_MOSTLY_KEY in region.advice.kinds:
            dup = self._duplicate(region, first, n)
            res.modeled_ns += transfer_ns(dup * PAGE_SIZE, remote_fig.read_bandwidth)
        if self.counter_threshold:
            await self._count_accesses(region, first, n, res)
        for key in ("local_bytes", "remote_bytes", "modeled_ns"):
            self.stats[key] += getattr(res, key)
        return res

    async def _run_chunk(self, region: "Region", first: int, n: int, op: str, arg: int, crc: int,
                         res: AccessResult):
        """One chunk of a kernel: a read takes the pages this device holds a
        duplicate of from the duplicate (local), the others by a native op."""
        dups = self.dups.get(region.id)
        if op not in ("read", "touch") or not dups:
            return await self._op_chunk(region, first, n, op, arg, crc, res)
        m = self.machine
        total = ffi.new("struct cdm_op_result *")
        total.crc = crc
        pos, end = first, first + n
        while pos < end:
            dups = self.dups.get(region.id) or {}
            e = pos
            if pos in dups:
                # Read at once, with no await between the lookup and the
                # bytes: a write collapses the duplicates before it writes.
                while e < end and e in dups:
                    e += 1
                frames = ffi.new("uint8_t *[]", [lib.cdm_pfn_addr(m.core, dups[p]) for p in range(pos, e)])
                if op == "read":
                    total.crc = lib.cdm_crc32_pages(total.crc, frames, e - pos)
                total.local_bytes += (e - pos) * PAGE_SIZE
                total.cpu_pages += lib.cdm_region_count(m.core, region.core, pos, e - pos, lib.CDM_PTE_CPU)
            else:
                while e < end and e not in dups:
                    e += 1
                out = await self._op_chunk(region, pos, e - pos, op, arg, total.crc, res)
                total.crc = out.crc
                total.local_bytes += out.local_bytes
                total.remote_bytes += out.remote_bytes
                total.cpu_pages += out.cpu_pages
            pos = e
        return total

    async def _op_chunk(self, region: "Region", first: int, n: int, op: str, arg: int, crc: int,
                        res: AccessResult):
        """One native device op over [first, first + n), the CRC continuing
        from crc; pages that moved or went meanwhile are brought back first."""
        m = self.machine
        out = ffi.new("struct cdm_op_result *")
        own = 1 << self.pool
        private_ok = own if not self.spec.coherent else 0
        if op in COPY_OPS:
            arg += first * PAGE_SIZE          # this chunk's place in the bounce buffer
        for _ in range(64):
            out.crc = crc
            if op in WRITE_OPS and m.duplicates:
                # A write collapses every duplicate first, with no await
                # before it writes: no reader ever sees a stale copy.
                m.collapse_duplicates(region, first, n)
            rc = lib.cdm_device_op(m.core, region.core, first, n, NATIVE_OPS[op], arg & 0xFFFFFFFFFFFFFFFF,
                                   own, private_ok, out)
            if rc == 0:
                return out
            if rc == -errno.EAGAIN:
                await region.wait_unlocked()
            elif rc == -errno.EREMOTE:
                # Another device's private pages: back to RAM first, as the CPU would.
                await migrate.fault_back(m, region, first, first + n, 0,
                                         from_pools=m.private_pools_mask() & ~own)
            elif rc == -errno.ENOENT:
                await self._fault(region, first, n, res, reading=op not in WRITE_OPS)     # truncated and regrown meanwhile
            else:
                raise OSError(-rc, f"page {out.page}: {errno.errorcode.get(-rc, rc)}")
        raise OSError(errno.EAGAIN, "pages kept moving under the device")

    def _fault_window(self, n: int) -> int:
        """Pages a kernel over n pages faults at a time: all of them (0),
        unless they would not fit its memory and eviction may make room."""
        if self.fault_policy != "migrate" or not self.lru.enabled:
            return 0
        total = self.machine.pool_stats(self.pool).npages
        window = max(migrate.BATCH, min(OP_CHUNK, total // 4 // migrate.BATCH * migrate.BATCH))
        return window if n > window else 0

    async def _fault(self, region: "Region", first: int, n: int, res: AccessResult,
                     reading: bool = False) -> None:
        """Device fault on pages [first, first + n): batched, as HMM does."""
        m = self.machine
        evicted = self.stats["evicted_bytes"]
        for s, e, pref in region.advice.segments(adv.PREFERRED, first, first + n):
            # preferred_location: pages that prefer this device's memory come
            # in whatever the fault policy; pages that prefer somewhere else
            # are reached where they lie.
            move = pref == self.own_target if pref is not None else self.fault_policy == "migrate"
            if not move:
                continue
            for a, b, rm in region.advice.segments(adv.READ_MOSTLY, s, e):
                if rm and reading:
                    continue        # read_mostly: a read duplicates, it does not migrate
                moved = await migrate.migrate_range(m, region, a, b - a, self.target())
                res.migrated += moved.migrated
                res.modeled_ns += transfer_ns(moved.migrated * PAGE_SIZE, self.remote_figures().read_bandwidth)
        # Evictions it caused: the chunks went back over the link.
        res.modeled_ns += transfer_ns(self.stats["evicted_bytes"] - evicted,
                                      self.remote_figures().write_bandwidth)
            # Pages that could not move (device memory full, pinned) are reached remotely.
        # Whatever is still absent is a first touch by the device, by the region's policy.
        await m.populate(region, first, n)

    def own_figures(self):
        return self.machine.topo.access_of(self.name, self.own_target)

    def remote_figures(self):
        return self.machine.topo.access_of(self.name, f"node:{self.machine.first_sysram}")

    # ------------------------------------------------------------ test_hmm's bounce buffer

    async def _bounce(self, region: "Region", first: int, n: int, buf, op: str) -> None:
        """The bounce range [first, first + n) of the region (offsets the
        caller set aside, which no program mapping uses) to or from buf, as
        the CPU side of the ioctl copies it: copyout fills buf from it,
        copyin writes buf into it.  Not a device access (no faults, no page
        table, no counters)."""
        m = self.machine
        if op == "copyin":
            await m.populate(region, first, n)          # placed by the region's policy
        elif m.cpu_mapped(region, first, n):
            await m.cpu_write_back(region, first, n)    # the program's pwrite, if cached
        out = ffi.new("struct cdm_op_result *")
        with region.hold():
            for _ in range(64):
                rc = lib.cdm_device_op(m.core, region.core, first, n, COPY_OPS[op],
                                       int(ffi.cast("uintptr_t", ffi.from_buffer(buf))), 0, 0, out)
                if rc != -errno.EAGAIN:
                    break
                await region.wait_unlocked()
        if rc:
            raise OSError(-rc, f"bounce page {out.page}: {errno.errorcode.get(-rc, rc)}")
        if op == "copyin":
            # The program reads the bounce range next: no stale copy of it may stay cached.
            await m.cpu_unmap(region, first, n, write_back=False)

    async def copy_out(self, region: "Region", first: int, n: int, bounce: int,
                       mode: str = "") -> AccessResult:
        """HMM_DMIRROR_READ: the device reads [first, first + n), faulting
        what it has not mapped, and its bytes land in the bounce range at
        page ``bounce``.  mode ``mapped``: only pages already in its page
        table (the read-back after MIGRATE_TO_DEV: ENOENT, changing nothing,
        if one is not); ``exclusive``: make_device_exclusive first (pages
        faulted writable and held exclusively until the CPU's next access)."""
        if mode == "mapped":
            pt = self.mirrors.get(region.id)
            if pt is None or pt.unmapped(first, first + n):
                raise OSError(errno.ENOENT, "a page is not in the device's page table")
        buf = bytearray(n * PAGE_SIZE)
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
        res = await self.access(region, first, n, "copyout", base, for_write=mode == "exclusive")
        if mode == "exclusive":
            await self._make_exclusive(region, first, n)
        await self._bounce(region, bounce, n, buf, "copyin")
        return res

    async def copy_in(self, region: "Region", first: int, n: int, bounce: int) -> AccessResult:
        """HMM_DMIRROR_WRITE: the bytes of the bounce range at page
        ``bounce`` written by the device into [first, first + n), faulting
        (for write) what it has not mapped writable."""
        buf = bytearray(n * PAGE_SIZE)
        await self._bounce(region, bounce, n, buf, "copyout")
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
        return await self.access(region, first, n, "copyin", base, for_write=True)

    # ------------------------------------------------------------ exclusive access

    async def _make_exclusive(self, region: "Region", first: int, n: int) -> None:
        """make_device_exclusive: the CPU loses its copies of the pages (its
        dirty bytes written back; no write-back counts as an access), and
        the device marks them exclusive.  The
        CPU's next access of a page is a FUSE fault, which sets the page's
        CPU belief (CDM_PTE_CPU): that is the access that revokes it."""
        m = self.machine
        await m.cpu_unmap(region, first, n)
        # The invalidation's write-backs of dirty pages (WRITEs) set the CPU
        # belief again; the host holds no copy of the range now.
        lib.cdm_region_uncache(m.core, region.core, first, n)
        marks = self.exclusive.get(region.id)
        if marks is None:
            marks = self.exclusive[region.id] = Mirror()
        marks.map(first, min(first + n, region.npages), MAP_WRITE)

    def revoke_touched(self, region: "Region", first: int, n: int) -> int:
        """The exclusive pages of [first, first + n) the CPU has accessed
        since lose their mark and the device's entry (the mmu notifier the
        CPU's fault on a device-exclusive entry runs).  Returns the pages
        still exclusive."""
        marks = self.exclusive.get(region.id)
        if marks is None:
            return 0
        m = self.machine
        left = 0
        pt = self.mirrors.get(region.id)
        for s, e in list(marks.runs(first, min(first + n, region.npages), PT_WRITE)):
            touched = lib.cdm_region_count(m.core, region.core, s, e - s, lib.CDM_PTE_CPU)
            if not touched:
                left += e - s
                continue
            ptes = ffi.new("uint64_t[]", e - s)
            lib.cdm_region_ptes(m.core, region.core, s, e - s, ptes)
            for j in range(e - s):
                if ptes[j] & lib.CDM_PTE_CPU:
                    marks.set(s + j, PT_NONE)
                    if pt is not None:
                        pt.set(s + j, PT_NONE)
                else:
                    left += 1
        if not marks.chunks:
            del self.exclusive[region.id]
        return left

    # ------------------------------------------------------------ snapshot

    def snapshot(self, region: "Region", first: int, n: int, cpu: bool = False) -> Iterator[str]:
        """One ``PAGE FLAGS`` line a page, after test_hmm's HMM_DMIRROR_SNAPSHOT,
        rendered a chunk at a time as the answer is read.  cpu: the CPU's
        page table as hmm_range_fault() sees it, whatever the device mapped
        (a page on a node is ``zero`` until written, ``write`` after); the
        caller has written the CPU's dirty copies back (snapshot_cpu)."""
        m = self.machine
        pt = self.mirror(region)
        for start in range(first, first + n, MIRROR_CHUNK):
            k = min(MIRROR_CHUNK, first + n - start)
            ptes = ffi.new("uint64_t[]", k)
            with region.hold():
                lib.cdm_region_ptes(m.core, region.core, start, k, ptes)
                npages = region.npages
            yield "".join(f"{start + j} {self._flag(ptes[j], start + j, npages, pt, cpu)}\n"
                          for j in range(k))

    async def snapshot_cpu(self, region: "Region", first: int, n: int) -> Iterator[str]:
        """snapshot(cpu=True) once the CPU's dirty bytes have reached the
        pages (a page the program wrote through its mapping is ``write``):
        its copies are invalidated, which writes every dirty one back (a
        range write-back skips small ranges); its next access faults."""
        if self.machine.cpu_mapped(region, first, n):
            await self.machine.cpu_unmap(region, first, n)
        return self.snapshot(region, first, n, cpu=True)

    def _flag(self, pte: int, i: int, npages: int, pt: Mirror, cpu: bool = False) -> str:
        if i >= npages or pte & lib.CDM_PTE_POISONED:
            return "error"
        if not pte & lib.CDM_PTE_PRESENT:
            return "none"
        pool = (pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT
        owner = self.machine.pool_owner.get(pool)
        if pte & lib.CDM_PTE_PRIVATE:
            return "private-local" if owner == self.name else "private-remote"
        if owner is not None:
            return "coherent-local" if owner == self.name else "coherent-remote"
        if cpu:
            return "write" if pte & lib.CDM_PTE_DIRTY else "zero"
        entry = pt.entry(i)
        if entry == PT_NONE:
            return "none"
        if not pte & lib.CDM_PTE_DIRTY:
            return "zero"
        return "write" if entry == PT_WRITE else "read"

    # ------------------------------------------------------------ lifecycle

    async def set_online(self, online: bool) -> None:
        """Out of service (its memory evacuated to system RAM; EBUSY, and no
        change, if a pinned page is there) or back in, its memory empty."""
        hp = self.machine.hotplug
        if not online:
            self.drop_all_duplicates()
        changed = await (hp.online_device_memory(self.pgmap) if online
                         else hp.offline_device_memory(self.pgmap))
        if changed:
            self.mirrors.clear()

    async def link_down(self) -> None:
        """The link is lost: every page in its memory is poisoned at once."""
        self.drop_all_duplicates()
        await memory_failure.link_down(self.machine.hotplug, self.pgmap)
        self.mirrors.clear()

    async def ecc(self, addr: int) -> None:
        """An uncorrectable error at a physical address of its memory."""
        pool = self.machine.pool_stats(self.pool)
        if not pool.base_pfn <= addr // PAGE_SIZE < pool.base_pfn + pool.npages:
            raise ValueError(f"address outside {self.name}'s memory")
        await memory_failure.hard_offline(self.machine.hotplug, addr)

    def fail_alloc(self, count: int) -> None:
        """The next count allocations from its memory fail (fault injection)."""
        lib.cdm_pool_fail_alloc(self.machine.core, self.pool, count)

    # ------------------------------------------------------------ events

    def on_migrate(self, region: "Region", first: int, n: int, target: Target, moved: int,
                   device_moves: dict[str, int], **_) -> None:
        """Counts what came into and left its memory; maps what came in."""
        delta = device_moves.get(self.name, 0)
        if delta > 0:
            self.stats["migrated_to"] += delta
        elif delta < 0:
            self.stats["migrated_from"] -= delta
        if target.pool == self.pool:
            self.map_own(region, first, n)

    def on_evict(self, device: str, region: "Region", first: int, n: int, moved: int) -> None:
        if device == self.name:
            self.stats["evictions"] += 1
            self.stats["evicted_bytes"] += moved * PAGE_SIZE


def probe(m: Machine) -> dict[str, Device]:
    """The devices of the machine's topology, each mirroring the regions it
    touches: they drop entries on the memory manager's invalidations and
    follow its migrations."""
    devices = {}
    for spec in m.topo.devices:
        dev = devices[spec.name] = Device(m, spec, m.pgmaps[spec.name])
        m.mmu_notifiers.append(dev.invalidate)
        m.events.subscribe("migrate", dev.on_migrate)
        m.events.subscribe("region_removed", dev.forget)
        m.events.subscribe("evict", dev.on_evict)
        m.events.subscribe("advise", dev.on_advise)
        m.duplicate_droppers.append(dev.drop_duplicates)
        dev.lru.reclaimers.append(dev.reclaim_duplicates)
    return devices
