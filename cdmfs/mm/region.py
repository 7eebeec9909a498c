"""Regions: application memory whose pages live on emulated nodes.

A region's ``data`` file is the memory; the host page cache of that file is
the CPU's page table (DESIGN §1).  ``fault`` serves a FUSE READ (a CPU fault,
first touch allocating by policy), ``writeback`` a FUSE WRITE.  Each is one
native call per request (one per policy range it spans); Python only handles
the rare outcomes (a page under migration, a page in device memory, no memory
left).

Per-range policies (``mbind``) are kept as the kernel keeps VMA policies: a
sorted list of non-overlapping page ranges, split and merged as mbind(2)
splits and merges VMAs; pages outside every range follow the region's policy.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import functools
import heapq
import logging
import os
import re
from typing import Callable, Iterator, Optional, Sequence

import trio

from .._core import ffi, lib
from ..config import PAGE_SIZE
from . import mempolicy as mpol
from . import migrate_device as migrate
from .advice import PREFERRED, Advice, PrefetchStats
from .machine import Machine

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_REGION_SIZE = 1 << 46            # 64 TiB of address space per region
SCAN_PAGES = 1 << 16                 # pages per native scan call (the machine lock is held)
MAX_MBIND_RANGES = 65530             # as vm.max_map_count bounds a process's VMAs
# What one user other than root may hold on a shared mount: regions, and the
# address space they span together (their page tables are reserved by it).
USER_MAX_REGIONS = 1024
# The reverse map keeps a frame's owner as (region id + 1) in 24 bits.
MAX_REGION_ID = (1 << 24) - 2
USER_MAX_SPACE = MAX_REGION_SIZE
SEEK_DATA, SEEK_HOLE = 3, 4       # lseek(2)
DIRECT_RECLAIM_TRIES = 16         # reclaim rounds a fault may run before it fails


class Region:
    """A region's memory and its lifetime.

    Every open file of the region and every operation in flight on it holds
    a reference (``get``/``put``, or ``with region.hold()``).  Removing the
    region (rmdir) frees its pages at once and takes it out of every lookup;
    the native region itself goes with the last reference, so no native call
    in flight ever sees it freed, and whatever comes later gets ENOENT.
    """

    def __init__(self, machine: Machine, name: str, rid: int, owner: int = 0):
        self.machine = machine
        self.name = name
        self.id = rid
        self.owner = owner              # the uid that created it
        self._core = lib.cdm_region_new(machine.core, rid)
        if self._core == ffi.NULL:
            raise MemoryError("cannot allocate a region")
        self.refs = 0
        self.removed = False
        # The mmap lock's part here: policy changes of the region (policy,
        # mbind with its moves and strict check) happen one at a time.
        self.policy_lock = trio.Lock()
        self.size = 0
        self._policy = mpol.DEFAULT
        # mbind ranges: (first page, end page, policy), sorted, disjoint, none
        # of them ``default``; _starts mirrors the first pages for bisect.
        self.ranges: list[tuple[int, int, mpol.MemPolicy]] = []
        self._starts: list[int] = []
        self.opens = 0                  # open data files (a mapping holds one)
        self.cpu_faults = 0             # READ requests: CPU faults (with fault-around)
        self.writebacks = 0             # WRITE requests: write-back and write()
        self.device_faults = 0
        self.migrated_pages = 0
        self.invalidations = 0
        self.migrations = 0             # migrations under way
        self.advice = Advice()          # usermode hints (advise), by page range
        self.prefetch = PrefetchStats()
        self._res = ffi.new("struct cdm_rw_result *")
        self._fault_type = "fault"       # what the READ being served did (its trace line)
        self._unlocked = trio.Event()
        self.publish_policies()
        # Pages in device-private memory must come back before the CPU sees
        # them; the migration engine installs the handler (fault-back).
        self.faultback: Optional[Callable] = None
        # The process whose memory this is (cdmfs run), 0 for none; the region
        # goes when it has ended and the data file is closed (fs/ops.py).
        self.owner_pid = 0
        self.owner_gone = False
        self.owner_watch: object = None     # the live watch's token

    @property
    def npages(self) -> int:
        """Pages of the file: its size rounded up.  Kept from the size Python
        set, not read from the native region outside its lock."""
        return -(-self.size // PAGE_SIZE)

    # -------------------------------------------------------------- lifetime

    def get(self) -> None:
        """Takes a reference; ENOENT once the region has been removed."""
        if self.removed:
            raise OSError(errno.ENOENT, f"region {self.name} was removed")
        self.refs += 1

    def put(self) -> None:
        """Drops a reference; the last one of a removed region frees it."""
        self.refs -= 1
        self._free_if_unused()

    def _free_if_unused(self) -> None:
        if self.removed and self.refs == 0 and self._core is not None:
            core, self._core = self._core, None
            lib.cdm_region_free(self.machine.core, core)
            # Fault-backs the router logged for it go before its id is reused.
            self.machine.apply_faultbacks()
            self.machine.regions.release_id(self.id)

    @property
    def core(self):
        """The native region; ENOENT once freed, never a dangling pointer."""
        if self._core is None:
            raise OSError(errno.ENOENT, f"region {self.name} was removed")
        return self._core

    def snapshot(self):
        """A snapshot of the native region (struct cdm_region_stats: size,
        pages per pool, pinned and poisoned counts), copied under the core's
        lock in one call."""
        out = ffi.new("struct cdm_region_stats *")
        lib.cdm_region_snapshot(self.machine.core, self.core, out)
        return out

    def pages_placed(self) -> int:
        """Pages holding a frame anywhere (a node or device memory): what
        ``st_blocks`` counts, as tmpfs counts its pages."""
        if self.removed:
            return 0
        return sum(self.snapshot().resident)

    @contextlib.contextmanager
    def hold(self) -> Iterator["Region"]:
        """A reference for the duration of an operation."""
        self.get()
        try:
            yield self
        finally:
            self.put()

    def policy_at(self, page: int) -> mpol.MemPolicy:
        """The policy that places page: its mbind range's, else the region's."""
        if self._starts:
            k = bisect.bisect_right(self._starts, page) - 1
            if k >= 0 and page < self.ranges[k][1]:
                return self.ranges[k][2]
        return self.policy

    def policy_segments(self, first: int, end: int) -> list[tuple[int, int, mpol.MemPolicy]]:
        """[first, end) cut at the mbind range boundaries: (first, end, policy)
        for every range and every gap between them (the region's policy)."""
        if not self._starts:
            return [(first, end, self.policy)] if first < end else []
        out = []
        pos = first
        k = max(bisect.bisect_right(self._starts, first) - 1, 0)
        for s, e, pol in self.ranges[k:]:
            if s >= end:
                break
            if e <= pos:
                continue
            if s > pos:
                out.append((pos, s, self.policy))
                pos = s
            pos_end = min(e, end)
            out.append((pos, pos_end, pol))
            pos = pos_end
        if pos < end:
            out.append((pos, end, self.policy))
        return out

    def set_range_policy(self, first: int, end: int, policy: Optional[mpol.MemPolicy]) -> None:
        """Gives pages [first, end) their own policy (None or ``default``: the
        region's again), splitting the ranges it cuts and merging neighbours
        with an equal policy, as mbind_range() splits and merges VMAs."""
        kept = []
        for s, e, pol in self.ranges:
            if e <= first or s >= end:
                kept.append((s, e, pol))
                continue
            if s < first:
                kept.append((s, first, pol))
            if e > end:
                kept.append((end, e, pol))
        if policy is not None and policy.mode != "default" and first < end:
            kept.append((first, end, policy))
        if len(kept) > MAX_MBIND_RANGES:
            raise OSError(errno.ENOMEM, f"more than {MAX_MBIND_RANGES} policy ranges")
        kept.sort(key=lambda r: r[0])
        merged: list[tuple[int, int, mpol.MemPolicy]] = []
        for r in kept:
            if merged and merged[-1][1] == r[0] and merged[-1][2] == r[2]:
                merged[-1] = (merged[-1][0], r[1], r[2])
            else:
                merged.append(r)
        self.ranges = merged
        self._starts = [r[0] for r in merged]
        self.publish_policies()

    @property
    def policy(self) -> mpol.MemPolicy:
        """The region's own policy: pages outside every mbind range."""
        return self._policy

    @policy.setter
    def policy(self, policy: mpol.MemPolicy) -> None:
        self._policy = policy
        self.publish_policies()

    def cpu_preferred_segments(self, first: int, end: int) -> list[tuple[int, int, Optional[str]]]:
        """[first, end) cut by preferred_location advice: (s, e, node) where
        the advice names a node the CPU maps ("node:N"), else (s, e, None)."""
        return [(s, e, v if isinstance(v, str) and v.startswith("node:") else None)
                for s, e, v in self.advice.segments(PREFERRED, first, end)]

    def publish_policies(self) -> None:
        """Tells the core which policy places each page, so that the
        router's first touches and fault-backs are placed in C
        (cdm_region_set_policies).  Pages whose preferred_location advice
        names a node get no policy there: their fault-back is Python's
        (fault_back takes them to that node)."""
        if self._core is None:
            return
        m = self.machine
        ranges = [(s, e, m.policy_id(p)) for s, e, p in self.ranges]
        preferred = [(s, e) for s, e, v in self.advice.kinds.get(PREFERRED, ())
                     if isinstance(v, str) and v.startswith("node:")]
        if preferred:
            ranges = _overlay(ranges, preferred, -1)
        n = len(ranges)
        rc = lib.cdm_region_set_policies(
            m.core, self._core, m.policy_id(self._policy), n,
            ffi.new("uint64_t[]", [r[0] for r in ranges]) if n else ffi.NULL,
            ffi.new("uint64_t[]", [r[1] for r in ranges]) if n else ffi.NULL,
            ffi.new("int32_t[]", [r[2] for r in ranges]) if n else ffi.NULL)
        if rc:
            # The core then has no ranges: Python places every first touch.
            log.warning("region %s: the core cannot take its policy ranges: %s",
                        self.name, os.strerror(-rc))

    # -------------------------------------------------------------- CPU side

    async def fault(self, off: int, size: int, pid: int) -> bytearray:
        """Bytes for a FUSE READ: a CPU fault (or read()) of [off, off+size)."""
        if off >= self.size:
            return bytearray()
        size = min(size, self.size - off)
        buf = bytearray(size)
        balancing = self.machine.balancing
        if balancing.hinting:
            # Pages the NUMA scanner unmapped: this READ is their hinting fault.
            first = off // PAGE_SIZE
            await balancing.numa_hint_fault(self, first, (off + size - 1) // PAGE_SIZE + 1 - first, pid)
        self._fault_type = "fault"
        await self._rw(off, size, ffi.from_buffer(buf), 0, pid)
        self.cpu_faults += 1
        events = self.machine.events
        if events.wants("cpu_fault"):
            first = off // PAGE_SIZE
            pte = ffi.new("uint64_t *")
            lib.cdm_region_ptes(self.machine.core, self.core, first, 1, pte)
            events.emit("cpu_fault", region=self, pid=pid, first=first,
                        n=(off + size - 1) // PAGE_SIZE + 1 - first,
                        node=self.machine.trace.location_of(pte[0]), type=self._fault_type)
        return buf

    async def writeback(self, off: int, data: bytes, pid: int) -> int:
        """A FUSE WRITE: write-back of dirty CPU pages, or write()."""
        if off + len(data) > self.size:
            # write() past the end grows the file, as on tmpfs.
            await self.truncate(off + len(data))
        await self._rw(off, len(data), ffi.from_buffer(data), 1, pid)
        self.writebacks += 1
        if self.machine.events.wants("writeback"):
            first = off // PAGE_SIZE
            self.machine.events.emit("writeback", region=self, pid=pid, first=first,
                                     n=(off + len(data) - 1) // PAGE_SIZE + 1 - first)
        return len(data)

    async def _rw(self, off: int, size: int, buf, write: int, pid: int) -> None:
        if not self._starts:
            await self._rw_plan(off, size, buf, write, pid, self.policy)
            return
        # A request that spans several policy ranges: one call per range.
        end = off + size
        segs = self.policy_segments(off // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1)
        runs: list[list] = []
        for s, e, pol in segs:
            if runs and runs[-1][2] == pol:
                runs[-1][1] = e
            else:
                runs.append([s, e, pol])
        for s, e, pol in runs:
            a, b = max(off, s * PAGE_SIZE), min(end, e * PAGE_SIZE)
            await self._rw_plan(a, b - a, buf + (a - off), write, pid, pol)

    async def _rw_plan(self, off: int, size: int, buf, write: int, pid: int,
                       policy: mpol.MemPolicy) -> None:
        """One native gather/scatter of [off, off + size), allocating by policy."""
        m = self.machine
        res = self._res
        reclaims = 0
        while True:
            plan = m.plan(policy, m.local_node(pid))
            if write and m.duplicates:
                # Read duplicates go before the write, with no await between.
                m.collapse_duplicates(self, off // PAGE_SIZE, (off + size - 1) // PAGE_SIZE + 1 - off // PAGE_SIZE)
            rc = lib.cdm_region_rw(m.core, self.core, off, size, buf, write, 1, plan, res)
            if rc == 0:
                if res.allocated and self._fault_type == "fault":
                    self._fault_type = "first_touch"
                return
            page = res.page
            if rc == -errno.EAGAIN:
                await self.wait_unlocked()
            elif rc == -errno.EREMOTE and self.faultback is not None:
                self._fault_type = "fault_back"
                await self.faultback(self, off // PAGE_SIZE, (off + size - 1) // PAGE_SIZE + 1, pid)
            elif rc == -errno.ENOSPC and reclaims < DIRECT_RECLAIM_TRIES and \
                    await self._direct_reclaim(policy, pid, size):
                reclaims += 1       # the lower tier took cold pages: try again
            elif rc == -errno.ENOSPC:
                log.info("region %s: no memory for page %d under %s", self.name, page, policy)
                # A fault that cannot allocate dies with SIGBUS (EIO), write() gets ENOSPC.
                raise OSError(errno.ENOSPC if write else errno.EIO, "no memory left on any allowed node")
            elif rc == -errno.EIO:
                raise OSError(errno.EIO, f"page {page} is poisoned")
            else:
                raise OSError(-rc, f"page {page}: {errno.errorcode.get(-rc, rc)}")

    async def _direct_reclaim(self, policy: mpol.MemPolicy, pid: int, size: int) -> int:
        m = self.machine
        return await m.direct_reclaim(policy, m.local_node(pid), -(-size // PAGE_SIZE))

    async def wait_unlocked(self) -> None:
        """Waits until the migration holding a page of this region finishes."""
        await self._unlocked.wait()

    def wake_waiters(self) -> None:
        """Called when a migration unlocks pages."""
        self._unlocked.set()
        self._unlocked = trio.Event()

    # -------------------------------------------------------------- size

    def resize(self, size: int) -> None:
        """truncate(2): grows with zero pages, shrinking frees pages; the page
        the end cuts reads zero past it.  EAGAIN, changing nothing, while a
        migration holds that page locked (see ``truncate``, which waits)."""
        if size < 0 or size > MAX_REGION_SIZE:
            raise OSError(errno.EINVAL, f"size must be 0..{MAX_REGION_SIZE}")
        if self.removed:
            raise OSError(errno.ENOENT, f"region {self.name} was removed")
        if size > self.size:
            self.machine.regions.may_grow(self, size)
        # A shrink during a migration is allowed, as truncate(2) is: the
        # migration's lock and finalize steps skip the pages that went away
        # (-ENOENT) and give their target frames back.  The zeroing of the
        # page the end cuts happens in the core, under its lock, in the call.
        old = self.npages
        cut = min(size, self.size)
        if cut % PAGE_SIZE and self.machine.duplicates:
            # The page the (old or new) end cuts gets zeroed past it: a write.
            self.machine.collapse_duplicates(self, cut // PAGE_SIZE, 1)
        rc = lib.cdm_region_truncate(self.machine.core, self.core, size)
        if rc:
            raise OSError(-rc, "cannot resize the page table" if rc == -errno.ENOMEM
                          else f"cannot resize: {errno.errorcode.get(-rc, rc)}")
        self.size = size
        npages = self.npages
        if npages < old:
            self.machine.invalidate_devices(self, npages, old - npages)
            self.advice.truncate(npages)
            if self.ranges:
                # mbind ranges stay inside the file.
                self.set_range_policy(npages, max(old, self.ranges[-1][1]), None)

    async def truncate(self, size: int) -> None:
        """``resize``, waiting for a migration that holds the page the new
        end cuts (truncate(2) waits on a folio a migration has locked)."""
        while True:
            try:
                self.resize(size)
                return
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise
            await self.wait_unlocked()

    # -------------------------------------------------------------- lseek, fallocate

    def seek(self, offset: int, whence: int) -> int:
        """lseek(2) SEEK_DATA/SEEK_HOLE on the data file: a page is data if
        its entry is not zero (present anywhere, poisoned, a migration's
        placeholder), a hole if never touched or freed.  ENXIO at or past
        the end, or no data after offset; a hole always at the end."""
        size = self.size
        if offset < 0 or offset >= size:
            raise OSError(errno.ENXIO, "offset past the end")
        page, npages = offset // PAGE_SIZE, self.npages
        if whence == SEEK_DATA:
            p = lib.cdm_region_next_present(self.machine.core, self.core, page, npages)
            if p >= npages:
                raise OSError(errno.ENXIO, "no data past the offset")
            return max(offset, p * PAGE_SIZE)
        if whence == SEEK_HOLE:
            p = lib.cdm_region_next_absent(self.machine.core, self.core, page, npages)
            return min(max(offset, p * PAGE_SIZE), size)
        raise OSError(errno.EINVAL, f"whence {whence}")

    async def fallocate(self, off: int, length: int, keep_size: bool = False) -> None:
        """fallocate(2) mode 0 (MADV_POPULATE_WRITE's placement): the absent
        pages of [off, off + length) are placed now by the range's policy;
        the file grows to off + length unless keep_size (pages past the end
        are not placed then: the file has none).  ENOSPC if memory runs out:
        the size is put back, pages placed meanwhile stay (a chunk of
        Machine.populate at a time, each all or nothing)."""
        if off < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad range")
        end = off + length
        if end > MAX_REGION_SIZE:
            raise OSError(errno.EFBIG, "past the largest region")
        with self.hold():
            old = self.size
            grew = end > old and not keep_size
            if grew:
                await self.truncate(end)
            first, last = off // PAGE_SIZE, min(-(-end // PAGE_SIZE), self.npages)
            if first >= last:
                return
            try:
                await self.machine.populate(self, first, last - first)
            except OSError:
                if grew and self.size == end:
                    try:
                        await self.truncate(old)
                    except OSError:
                        log.warning("region %s: cannot put the size back to %d", self.name, old)
                raise

    async def punch(self, off: int, length: int) -> None:
        """fallocate(2) FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (and
        MADV_REMOVE): the whole pages of [off, off + length) are freed, the
        partial pages at its edges zeroed, as tmpfs punches.  The CPU's
        copies go first, then the devices' mirrors, then the pages, in the
        core under its lock (cdm_region_punch; a migration holding a page
        of the range is waited for)."""
        if off < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad range")
        m = self.machine
        with self.hold():
            while True:
                end = min(off + length, self.size)
                if off >= end:
                    return
                first = off // PAGE_SIZE
                n = -(-end // PAGE_SIZE) - first
                await m.cpu_unmap(self, first, n)
                m.invalidate_devices(self, first, n)
                rc = lib.cdm_region_punch(m.core, self.core, off, end - off)
                if rc == 0:
                    return
                if rc != -errno.EAGAIN:
                    raise OSError(-rc, f"cannot punch: {errno.errorcode.get(-rc, rc)}")
                await self.wait_unlocked()

    # -------------------------------------------------------------- mbind

    async def mbind(self, first: int, n: int, policy: mpol.MemPolicy, move: bool = False,
                    strict: bool = False) -> int:
        """mbind(2) of pages [first, first + n): the range takes policy
        (``default``: the region's policy again).  ``move`` migrates the pages
        that do not fit it; ``strict`` then raises EIO if some still do not.
        As Linux (6.7 and later) does, the policy stays applied and the pages
        that moved stay moved when the call fails with EIO; ``strict`` is
        ignored for ``default``.  Returns the pages migrated."""
        async with self.policy_lock:
            return await self._mbind(first, n, policy, move, strict)

    async def _mbind(self, first: int, n: int, policy: mpol.MemPolicy, move: bool, strict: bool) -> int:
        end = first + n
        self.set_range_policy(first, end, policy)
        local = self.machine.default_cpu_node
        moved = 0
        for s, e, pol in self.policy_segments(first, end):
            if move:
                moved += await self._move_misfits(s, e - s, pol, local)
            if strict and policy.mode != "default" and self.misfits(s, e - s, pol, local):
                raise OSError(errno.EIO, f"pages of [{s}, {e}) do not follow {pol}")
        return moved

    def _fit(self, policy: mpol.MemPolicy, local: int) -> tuple[list[list[int]], int]:
        """Where a policy wants its pages: the pool tables to move misfits to,
        in order of preference (page i wants pool table[i % len(table)]), and
        the pools where a page fits wherever it is (a bit per pool)."""
        m = self.machine
        pl = m.placement(policy, local)
        usable = set(m.usable_nodes())
        named = set(policy.nodes)
        mode = policy.mode
        if pl.interleave:
            # As queue_folio_required() does: a page on any node of the
            # nodemask stays; only the others go, each to its interleave slot.
            mask = 0
            for nid in named & usable:
                mask |= 1 << m.nodes[nid].pool
            return [[m.nodes[nid].pool for nid in pl.table]], mask
        if mode in ("bind", "preferred_many"):
            order = [nid for nid in pl.fallback[pl.table[0]] if nid in named]
            fit = named & usable
        else:   # preferred, default, local: the one node they name or the local one
            order = [nid for nid in pl.table if nid in usable]
            fit = set(order)
        mask = 0
        for nid in fit:
            mask |= 1 << m.nodes[nid].pool
        return [[m.nodes[nid].pool] for nid in order] or [[]], mask

    def present_spans(self, first: int, end: int) -> Iterator[tuple[int, int]]:
        """(start, count) spans of at most SCAN_PAGES that cover every page
        of [first, end) holding something; the untouched parts between are
        skipped by the core, so a walk costs by the pages present."""
        s = first
        while s < end:
            s = lib.cdm_region_next_present(self.machine.core, self.core, s, end)
            if s >= end:
                return
            k = min(SCAN_PAGES, end - s)
            yield s, k
            s += k

    def _misfit_scan(self, first: int, n: int, table: Sequence[int], fit: int, runs: int = 0):
        """(misfit pages, [(first, count, wanted pool)] runs) of [first, first + n)."""
        m = self.machine
        skip = m.private_pools_mask()
        ctable = ffi.new("int32_t[]", list(table) or [-1])
        nruns = ffi.new("uint64_t *")
        rf = ffi.new("uint64_t[]", runs) if runs else ffi.NULL
        rl = ffi.new("uint64_t[]", runs) if runs else ffi.NULL
        rp = ffi.new("int32_t[]", runs) if runs else ffi.NULL
        count = 0
        out: list[tuple[int, int, int]] = []
        for s, k in self.present_spans(first, first + n):
            count += lib.cdm_region_misfits(m.core, self.core, s, k, ctable, len(table), fit, skip,
                                            rf, rl, rp, runs, nruns)
            out += [(rf[j], rl[j], rp[j]) for j in range(nruns[0])]
        return count, out

    def misfits(self, first: int, n: int, policy: mpol.MemPolicy, local: int) -> int:
        """Pages of [first, first + n) on a node where policy does not want
        them (absent, poisoned and device-private pages are not counted)."""
        tables, fit = self._fit(policy, local)
        return self._misfit_scan(first, n, tables[0], fit)[0]

    async def _move_misfits(self, first: int, n: int, policy: mpol.MemPolicy, local: int) -> int:
        """Migrates the pages of [first, first + n) that do not fit policy:
        to its node (bind, preferred_many: the nearest allowed node first,
        then the next for the pages that found no room) or, interleaved, each
        to its interleave node by page offset."""
        m = self.machine
        tables, fit = self._fit(policy, local)
        node_pools = sum(1 << node.pool for node in m.nodes.values())
        targets = {}
        for nid, node in m.nodes.items():
            try:
                targets[node.pool] = dataclasses.replace(m.node_target(nid), device_memory=False)
            except (OSError, ValueError):
                pass    # offline: no page goes there
        moved = 0
        for table in tables:
            if not table:
                break
            nomem = False
            for s, k in self.present_spans(first, first + n):
                _, runs = self._misfit_scan(s, k, table, fit, runs=k)
                runs = [r for r in runs if r[2] in targets]
                if not runs:
                    continue
                lo, hi = runs[0][0], runs[-1][0] + runs[-1][1]
                if len(runs) > 1 and m.cpu_mapped(self, lo, hi - lo):
                    # One invalidation for the whole span rather than one a run.
                    await m.cpu_unmap(self, lo, hi - lo)
                for rs, rn, pool in runs:
                    res = await migrate.migrate_range(m, self, rs, rn, targets[pool],
                                                      from_pools=node_pools & ~fit)
                    moved += res.migrated
                    nomem |= errno.ENOMEM in res.errors()
            if not nomem:
                break
        return moved

    # -------------------------------------------------------------- views

    def census(self, first: int, end: int) -> tuple[list[int], list[int]]:
        """Pages of [first, end) per pool: (present, dirty)."""
        present = ffi.new("uint64_t[]", lib.CDM_MAX_POOLS)
        dirty = ffi.new("uint64_t[]", lib.CDM_MAX_POOLS)
        for s, k in self.present_spans(first, end):
            lib.cdm_region_census(self.machine.core, self.core, s, k, present, dirty)
        return list(present), list(dirty)

    def pagemap(self, first: int = 0, n: Optional[int] = None, show_pfn: bool = True) -> bytes:
        """``pagemap`` entries of pages [first, first + n), 8 bytes each;
        without show_pfn the frame field (PFN, or swap type and offset) reads
        as 0 (the flags stay).  See cdm_region_pagemap in native/cdmcore.h."""
        if n is None:
            n = max(self.npages - first, 0)
        if n <= 0:
            return b""
        out = ffi.new("uint64_t[]", n)
        lib.cdm_region_pagemap(self.machine.core, self.core, first, n, out, int(show_pfn))
        return ffi.buffer(out)[:]

    def stat(self) -> list[tuple[str, object]]:
        """The ``stat`` file: SPEC §6."""
        m = self.machine
        s = self.snapshot()         # one native call for the whole file
        items: list[tuple[str, object]] = [("size", self.size), ("pages", self.npages)]
        items += [(f"N{nid}", s.resident[n.pool]) for nid, n in m.nodes.items()]
        items += [(f"private:{name}", s.resident[p.pool]) for name, p in m.private.items()]
        items += [
            # READs and WRITEs the router served in C are counted by the core.
            ("cpu_faults", self.cpu_faults + s.served_reads),
            ("device_faults", self.device_faults),
            ("migrated_pages", self.migrated_pages),
            ("invalidations", self.invalidations),
            ("writebacks", self.writebacks + s.served_writes),
            ("pinned", s.nr_pinned),
            ("poisoned", s.nr_poisoned),
            ("duplicated", s.nr_duplicated),
            ("prefetch_requested", self.prefetch.requested),
            ("prefetch_migrated", self.prefetch.migrated),
            ("prefetch_skipped", self.prefetch.skipped),
            ("prefetch_active", self.prefetch.active),
            ("prefetch_done", self.prefetch.done),
        ]
        return items


def _overlay(ranges: list[tuple[int, int, int]], over: list[tuple[int, int]],
             value: int) -> list[tuple[int, int, int]]:
    """Sorted disjoint (s, e, id) ranges with the sorted disjoint spans of
    over set to value (gaps included), still sorted and disjoint."""
    cuts = sorted({x for s, e, _ in ranges for x in (s, e)} | {x for s, e in over for x in (s, e)})
    out: list[tuple[int, int, int]] = []
    i = j = 0
    for a, b in zip(cuts, cuts[1:]):
        while i < len(ranges) and ranges[i][1] <= a:
            i += 1
        while j < len(over) and over[j][1] <= a:
            j += 1
        if j < len(over) and over[j][0] <= a:
            v = value
        elif i < len(ranges) and ranges[i][0] <= a:
            v = ranges[i][2]
        else:
            continue
        if out and out[-1][1] == a and out[-1][2] == v:
            out[-1] = (out[-1][0], b, v)
        else:
            out.append((a, b, v))
    return out


class Regions:
    """The regions of a mount, by name."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.by_name: dict[str, Region] = {}
        self.by_id: dict[int, Region] = {}
        self._next_id = 0
        self._free_ids: list[int] = []      # ids of freed regions, reused smallest first
        machine.regions = self

    def create(self, name: str, owner: int = 0) -> Region:
        if not NAME_RE.match(name):
            raise OSError(errno.EINVAL, "region names are 1-64 of [A-Za-z0-9_.-]")
        if name in self.by_name:
            raise OSError(errno.EEXIST, f"region {name} exists")
        if owner and sum(r.owner == owner for r in self.by_name.values()) >= USER_MAX_REGIONS:
            raise OSError(errno.EDQUOT, f"a user may hold at most {USER_MAX_REGIONS} regions")
        if self._free_ids:
            rid = heapq.heappop(self._free_ids)
        elif self._next_id <= MAX_REGION_ID:
            rid = self._next_id
            self._next_id += 1
        else:
            raise OSError(errno.ENOSPC, f"at most {MAX_REGION_ID + 1} regions exist at once")
        try:
            region = Region(self.machine, name, rid, owner)
        except BaseException:
            heapq.heappush(self._free_ids, rid)
            raise
        region.faultback = functools.partial(migrate.fault_back, self.machine)
        self.by_name[name] = region
        self.by_id[rid] = region
        return region

    def rename(self, old: str, new: str) -> None:
        """rename(2) of a region: device requests and every view use the new
        name from now on.  ENOTEMPTY when new names another region (its
        directory is never empty), as rename over a full directory gives."""
        if not NAME_RE.match(new):
            raise OSError(errno.EINVAL, "region names are 1-64 of [A-Za-z0-9_.-]")
        if new in self.by_name:
            raise OSError(errno.ENOTEMPTY, f"region {new} exists")
        region = self.by_name.pop(old)
        region.name = new
        self.by_name[new] = region

    def release_id(self, rid: int) -> None:
        """A freed region's id may name a new region (never while the old one
        exists: the reverse map would name both)."""
        heapq.heappush(self._free_ids, rid)

    def may_grow(self, region: Region, size: int) -> None:
        """EDQUOT if region growing to size would take its owner (not root)
        past USER_MAX_SPACE of address space."""
        if not region.owner:
            return
        others = sum(r.size for r in self.by_name.values() if r.owner == region.owner and r is not region)
        if others + size > USER_MAX_SPACE:
            raise OSError(errno.EDQUOT, f"a user's regions may span at most {USER_MAX_SPACE >> 40} TiB")

    def remove(self, name: str) -> Region:
        """rmdir: EBUSY while data is open or mapped; else the region leaves
        every lookup and its pages are freed now, the native region with its
        last reference."""
        region = self.by_name[name]
        if region.opens:
            raise OSError(errno.EBUSY, f"region {name} is open or mapped")
        region.resize(0)
        del self.by_name[name]
        del self.by_id[region.id]
        region.removed = True
        self.machine.events.emit("region_removed", region=region)
        region._free_if_unused()
        return region
