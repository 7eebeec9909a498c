"""Automatic NUMA balancing: the hinting scanner and the hinting fault
(kernel/sched/fair.c task_numa_work, mm/mprotect.c change_prot_numa,
mm/memory.c do_numa_page, mm/mempolicy.c mpol_misplaced).

Every scan period the scanner takes the next ``scan_size_mb`` of each
region's CPU-mapped pages, marks them in the core (CDM_PTE_NUMA) and
invalidates the CPU's copies -- the emulated PROT_NONE (DESIGN §1).  The
next CPU access of such a page is a FUSE READ that the core leaves to
Python (cdm_region_serve refuses it): the hinting fault.  It notes the
node of the CPU the accessing task runs on and, when

* the page's range policy names a node for it there (``mpol_misplaced``:
  the local node for default/local, the preferred node, the local node
  within a multi-node bind or preferred_many; never a single-node bind or
  interleave), which the placement rule allows (``Machine.placement``),
* both nodes' ``numa_balancing`` switches are on,
* the target has room above its high watermark (``migrate_balanced_pgdat``),
* and the two-access filter passes (the previous hinting fault on the page
  came from the same node, the kernel's ``last_cpupid``),

migrates it there with the migration engine (migrate_vma), before the READ
is answered.  With memory tiering (mode bit 2) a hinting fault on a page of
a lower tier is a promotion candidate instead: hot when the fault came
within ``hot_threshold_ms`` of the scan that unmapped it, promoted to the
fastest tier with room within ``promote_rate_limit_MBps``.

Only pages the CPU is believed to map (CDM_PTE_CPU) whose frames carry no
other mark are hinted.  A hinting fault migrates only pages of its own READ,
which the kernel is filling and so holds no copy of: their CPU belief is
dropped first, so that the migration does not invalidate them (the READ
holds the kernel's lock of its pages: invalidating one of them from its own
handler would wait for ever).
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import trio

from .._core import ffi, lib
from ..config import PAGE_SIZE
from ..lib.sched import cond_resched
from . import mempolicy as mpol
from .migrate import runs
from .migrate_device import migrate_range

if TYPE_CHECKING:
    from .machine import Machine
    from .region import Region

log = logging.getLogger(__name__)

NUMA_BALANCING_DISABLED = 0
NUMA_BALANCING_NORMAL = 1
NUMA_BALANCING_MEMORY_TIERING = 2
NUMA_PERIOD_THRESHOLD = 7           # of 10: hinting faults this local slow the scan down
RUNS = 1024                         # marked runs taken per native call
SCAN_WINDOWS = 64                   # scan windows remembered per region (hint latency)


@dataclass
class Tunables:
    """``sys/kernel/debug/sched/numa_balancing/``, the kernel's defaults."""
    scan_delay_ms: int = 1000
    scan_period_min_ms: int = 1000
    scan_period_max_ms: int = 60000
    scan_size_mb: int = 256
    hot_threshold_ms: int = 1000


def mpol_misplaced(policy: mpol.MemPolicy, local: int) -> Optional[int]:
    """The node a policy wants a page on when a CPU of node local touches
    it (mpol_misplaced's polnid), or None when balancing has no say."""
    mode = policy.mode
    if mode in ("default", "local"):
        return local
    if mode == "preferred":
        return policy.nodes[0]
    if mode in ("bind", "preferred_many"):
        if len(policy.nodes) > 1 and local in policy.nodes:
            return local
        return None
    return None     # interleave: its node comes from the page offset


class NumaBalancing:
    """The machine's automatic placement by hinting faults."""

    def __init__(self, m: "Machine", mode: int):
        self.m = m
        self.mode = mode                    # proc/sys/kernel/numa_balancing
        self.promote_rate_limit_mbps = 65536
        self.tun = Tunables()
        self.events: Counter = Counter()    # machine-wide vm events (proc/vmstat)
        self.hinting = False                # pages have been marked: READs may be hint faults
        self._offset: dict[int, int] = {}   # region id -> next page to scan
        self._windows: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
        # last_cpupid's node, kept only for misplaced pages awaiting their
        # second hinting fault: region id -> page -> node.
        self._last: dict[int, dict[int, int]] = defaultdict(dict)
        self._promoted: dict[int, tuple[float, int]] = {}   # node -> (window start, pages)
        # Nodes a promotion found full: kswapd balances them to the promo watermark.
        self.promote_pressure: set[int] = set()
        self._changed = trio.Event()
        self.period_ms = self.tun.scan_period_min_ms
        self._faults = [0, 0]               # hinting faults since the last pass: local, all
        m.events.subscribe("region_removed", self._forget)

    # ------------------------------------------------------------ controls

    def set_mode(self, mode: int) -> None:
        if not 0 <= mode <= 3:
            raise ValueError("numa_balancing is 0-3")
        self.mode = mode
        if not mode:
            self._last.clear()
        self.changed()

    def changed(self) -> None:
        """A control changed: the scanner looks again now, from the
        shortest period."""
        self.period_ms = self.tun.scan_period_min_ms
        self._changed.set()
        self._changed = trio.Event()

    def _forget(self, region: "Region") -> None:
        self._offset.pop(region.id, None)
        self._windows.pop(region.id, None)
        self._last.pop(region.id, None)

    # ------------------------------------------------------------ scanner

    def scan_pools(self) -> int:
        """The pools whose pages the scanner hints (a bit per pool): the
        nodes with the switch on -- in tiering-only mode, those below the
        top tier -- when a page there could go somewhere at all."""
        m = self.m
        if not self.mode:
            return 0
        usable = [n for n in m.usable_nodes() if m.nodes[n].numa_balancing]
        if len(usable) < 2:
            return 0        # nowhere to go: nothing to learn
        tiering_only = self.mode == NUMA_BALANCING_MEMORY_TIERING
        pools = 0
        for nid in usable:
            if tiering_only and m.tiers.is_toptier(nid):
                continue
            pools |= 1 << m.nodes[nid].pool
        return pools

    async def run(self) -> None:
        """task_numa_work for every region, each scan period, for as long as
        the machine is mounted (cancelled at unmount)."""
        await self._sleep(self.tun.scan_delay_ms)
        while True:
            hinted = 0
            if self.scan_pools():
                try:
                    hinted = await self.scan()
                except OSError as e:
                    log.info("NUMA balancing scan: %s", e)
            if hinted:
                self._adapt_period()
            await self._sleep(self.period_ms)

    async def _sleep(self, ms: int) -> None:
        with trio.move_on_after(max(ms, 1) / 1000):
            await self._changed.wait()

    def _adapt_period(self) -> None:
        """update_task_scan_period, simply: after a pass that hinted pages,
        mostly local faults (or none) slow the scanner down, others bring it
        back to the minimum.  A pass with nothing to hint changes nothing."""
        local, total = self._faults
        self._faults = [0, 0]
        lo, hi = self.tun.scan_period_min_ms, max(self.tun.scan_period_max_ms, self.tun.scan_period_min_ms)
        if total and local * 10 < total * NUMA_PERIOD_THRESHOLD:
            self.period_ms = lo
        else:
            self.period_ms = min(max(self.period_ms * 2, lo), hi)

    async def scan(self) -> int:
        """One pass: the next window of every region.  Returns pages hinted."""
        m = self.m
        pools = self.scan_pools()
        window = (self.tun.scan_size_mb << 20) // PAGE_SIZE
        if not pools or not window or m.regions is None:
            return 0
        total = 0
        for region in list(m.regions.by_name.values()):
            if region.removed:
                continue
            with region.hold():
                total += await self._scan_region(region, pools, window)
            await cond_resched()
        return total

    async def _scan_region(self, region: "Region", pools: int, window: int) -> int:
        m = self.m
        npages = region.npages
        start = self._offset.get(region.id, 0)
        if start >= npages:
            start = 0
        nxt = ffi.new("uint64_t *")
        marked = lib.cdm_region_numa_mark(m.core, region.core, start, npages - start, pools, window, nxt)
        end = nxt[0]
        self._offset[region.id] = end if end < npages else 0
        if not marked:
            return 0
        self.hinting = True
        self.events["numa_pte_updates"] += marked
        windows = self._windows[region.id]
        windows.append((start, end, time.monotonic()))
        del windows[:-SCAN_WINDOWS]
        # change_prot_numa's PROT_NONE: the CPU's copies of the marked pages go.
        rf = ffi.new("uint64_t[]", RUNS)
        rl = ffi.new("uint64_t[]", RUNS)
        pos = start
        while pos < end:
            n = lib.cdm_region_flag_runs(m.core, region.core, pos, end - pos, lib.CDM_PTE_NUMA,
                                         rf, rl, RUNS, nxt)
            for k in range(n):
                await m.cpu_unmap(region, rf[k], rl[k])
            if nxt[0] <= pos:
                break
            pos = nxt[0]
        return marked

    # ------------------------------------------------------------ hinting fault

    def _scanned_at(self, region: "Region", page: int) -> Optional[float]:
        for s, e, t in reversed(self._windows.get(region.id, ())):
            if s <= page < e:
                return t
        return None

    def _room(self, nid: int, n: int) -> bool:
        """migrate_balanced_pgdat: the target stays above its high watermark."""
        m = self.m
        wm = m.watermarks().get(nid)
        free = m.node_pages(nid)["free"]
        return free >= n + (wm.high if wm else 0)

    def _allowed(self, policy: mpol.MemPolicy, local: int, target: int) -> bool:
        """The placement rule: target is a node policy may place a page on."""
        pl = self.m.placement(policy, local)
        return any(target in pl.fallback.get(n, ()) for n in pl.table)

    def _rate_ok(self, nid: int, n: int) -> bool:
        """numa_promotion_rate_limit: at most promote_rate_limit_MBps of
        candidates per node per second."""
        now = time.monotonic()
        start, pages = self._promoted.get(nid, (now, 0))
        if now - start >= 1.0:
            start, pages = now, 0
        limit = (self.promote_rate_limit_mbps << 20) // PAGE_SIZE
        if pages + n > limit:
            self._promoted[nid] = (start, pages)
            return False
        self._promoted[nid] = (start, pages + n)
        return True

    def _target(self, region: "Region", page: int, src: int, local: int, now: float) -> Optional[int]:
        """Where a hinted page goes (None: it stays): do_numa_page's
        numa_migrate_check and should_numa_migrate_memory."""
        m = self.m
        nodes = m.nodes
        if not nodes[src].numa_balancing:
            return None
        policy = region.policy_at(page)
        if self.mode & NUMA_BALANCING_MEMORY_TIERING and not m.tiers.is_toptier(src):
            scanned = self._scanned_at(region, page)
            if scanned is None or (now - scanned) * 1000 >= self.tun.hot_threshold_ms:
                return None
            # The fastest tier with room, the accessing CPU's node first.
            tier = m.tiers.tier_of
            order = sorted((n for n in m.tiers.promotion_order()
                            if tier.get(n, 1 << 30) < tier.get(src, 0) and nodes[n].numa_balancing
                            and self._allowed(policy, local, n)),
                           key=lambda n: (tier[n], n != local, m.topo.distance[(local, n)], n))
            if not order:
                return None
            nodes[order[0]].events["pgpromote_candidate"] += 1
            for nid in order:
                if self._room(nid, 1):
                    return nid if self._rate_ok(nid, 1) else None
            self.promote_pressure.add(order[0])     # kswapd makes room up to promo
            return None
        if not self.mode & NUMA_BALANCING_NORMAL:
            return None
        target = mpol_misplaced(policy, local)
        last = self._last[region.id]
        if target is None or target == src:
            last.pop(page, None)    # well placed: only misplaced pages are remembered
            return None
        prev = last.get(page)
        last[page] = local
        if prev != local:
            return None     # the two-access filter: twice from the same node
        if target not in nodes or not nodes[target].numa_balancing or nodes[target].isolated \
                and target not in policy.nodes:
            return None
        if not self._allowed(policy, local, target) or not self._room(target, 1):
            return None
        return target

    async def numa_hint_fault(self, region: "Region", first: int, n: int, pid: int) -> None:
        """The hinting faults of a READ of pages [first, first + n): taken
        once (cdm_region_numa_take), counted, and the pages that should
        move migrated before the READ is answered."""
        m = self.m
        out = ffi.new("uint64_t[]", n)
        if not lib.cdm_region_numa_take(m.core, region.core, first, n, out):
            return
        local = m.local_node(pid)
        now = time.monotonic()
        moves: dict[tuple[int, int], list[int]] = defaultdict(list)
        faults = local_faults = 0
        for k in range(n):
            pte = out[k]
            if not pte & lib.CDM_PTE_NUMA:
                continue
            src = m.pool_node.get((pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT)
            if src is None:
                continue
            faults += 1
            local_faults += src == local
            target = self._target(region, first + k, src, local, now)
            if target is not None:
                moves[(src, target)].append(first + k)
        if self.mode:       # marks left by reclaim's aging alone are not sampling
            self.events["numa_hint_faults"] += faults
            self.events["numa_hint_faults_local"] += local_faults
        self._faults[0] += local_faults
        self._faults[1] += faults
        migrated = 0
        for (src, target), pages in moves.items():
            try:
                tgt = m.node_target(target)
            except (OSError, ValueError):
                continue
            for s, c in runs(pages):
                # This READ is the kernel filling these pages: it holds no copy
                # of them (a write-back during the scanner's invalidation may
                # have left the belief set).  Forgotten, the migration does not
                # invalidate them -- which would wait for this very READ.
                lib.cdm_region_uncache(m.core, region.core, s, c)
                res = await migrate_range(m, region, s, c, tgt, from_pools=1 << m.nodes[src].pool)
                migrated += res.migrated
                if res.migrated and not m.tiers.is_toptier(src) and m.tiers.is_toptier(target):
                    m.nodes[target].events["pgpromote_success"] += res.migrated
                    m.events.emit("promote", region=region, first=s, n=c, moved=res.migrated,
                                  **{"from": src, "to": target})
                for page in range(s, s + c):
                    self._last[region.id].pop(page, None)
        self.events["numa_pages_migrated"] += migrated
        m.events.emit("numa_hint_fault", region=region, first=first, n=n, node=local,
                      faults=faults, local=local_faults, migrated=migrated)
