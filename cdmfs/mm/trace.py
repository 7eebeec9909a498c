"""The machine's trace stream: the Tracer of lib/trace.py fed with what only
the machine knows.

The C core serves most CPU faults without Python (the router); while
``cpu_fault`` or ``writeback`` is enabled it records them in its trace ring,
and ``drain`` turns the records into the same events Python's own faults
emit, before any later line is written, so lines stay in time order.
``sample`` adds ``mem_usage`` lines: each node's and device memory's used
kilobytes, when they changed.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._core import ffi, lib
from ..config import PAGE_SIZE, transfer_ns
from ..lib.trace import LOST, Tracer, format_line, location_list

if TYPE_CHECKING:
    from .machine import Machine

TAKE_BATCH = 1024
# The core's record kinds, as a cpu_fault's type (or a writeback).
_TYPES = {lib.CDM_TRACE_FIRST_TOUCH: "first_touch", lib.CDM_TRACE_FAULT: "fault",
          lib.CDM_TRACE_FAULT_BACK: "fault_back"}
# What the core records for each event kind enabled.
_CORE_MASKS = {
    "cpu_fault": (1 << lib.CDM_TRACE_FIRST_TOUCH) | (1 << lib.CDM_TRACE_FAULT)
    | (1 << lib.CDM_TRACE_FAULT_BACK),
    "writeback": 1 << lib.CDM_TRACE_WRITEBACK,
}


def render(field: str, value: Any) -> Any:
    """A mover's field as a line shows it: a region or device by its name."""
    return getattr(value, "name", value)


class MachineTrace:
    """The machine's Tracer, and what turns the core's records and the
    pools' figures into its events."""

    def __init__(self, m: "Machine"):
        self.m = m
        self.tracer = Tracer(m.events, render, before_line=self.drain, on_enable=self._on_enable)
        self._recs = ffi.new("struct cdm_trace_rec[]", TAKE_BATCH)
        self._lost = ffi.new("uint64_t *")
        self._used: dict[str, int] = {}
        self._from = ffi.new("uint64_t *")
        self._to = ffi.new("uint64_t *")
        self._core_mask = 0
        # A region going away: its records in the ring still name it.
        self._gone: dict[int, str] = {}
        m.events.subscribe("region_removed", self._region_removed)

    def location(self, pool: int) -> str:
        """Where a page of pool lives, as lines name it: a node's number, or
        the device whose private memory the pool is."""
        nid = self.m.pool_node.get(pool)
        return str(nid) if nid is not None else self.m.pool_owner.get(pool, f"pool{pool}")

    def location_of(self, pte: int) -> str:
        """Where the page of a present page-table entry lives."""
        return self.location((pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT)

    def places(self, mask: int) -> str:
        """``from``/``to`` of a bit per pool."""
        return location_list(self.location(p) for p in range(mask.bit_length()) if mask >> p & 1)

    def modeled_ns(self, device_moves: dict[str, int]) -> int:
        """The time the device links take to move pages in (+) and out (-):
        what the device's figures to system RAM say."""
        topo = self.m.topo
        ns = 0
        for dev, pages in device_moves.items():
            fig = topo.access_of(dev, f"node:{self.m.first_sysram}")
            ns += transfer_ns(abs(pages) * PAGE_SIZE, fig.read_bandwidth if pages > 0 else fig.write_bandwidth)
        return ns

    def migrate_fields(self, src, dst, status, n: int, device_moves: dict[str, int],
                       began_ns: int) -> dict[str, Any]:
        """The fields a migrate line adds to the event's own: where the
        batch's pages came from and went to, its holes and times."""
        holes = lib.cdm_migrate_places(self.m.core, src, dst, status, n, self._from, self._to)
        return {"from": self.places(self._from[0]), "to": self.places(self._to[0]), "holes": holes,
                "wall_ns": time.monotonic_ns() - began_ns, "modeled_ns": self.modeled_ns(device_moves)}

    def _on_enable(self, kind: str, on: bool) -> None:
        if kind in _CORE_MASKS:
            mask = 0
            for k, bits in _CORE_MASKS.items():
                if self.tracer.is_enabled(k):
                    mask |= bits
            rc = lib.cdm_machine_trace(self.m.core, mask)
            if rc:
                raise OSError(-rc, "the core cannot record faults")
            self.drain()            # what the core recorded under the old mask
            self._core_mask = mask
        if kind == "mem_usage" and on:
            self.show_usage()

    def _region_removed(self, region) -> None:
        if self._core_mask:
            self._gone[region.id] = region.name
            try:
                self.drain()
            finally:
                self._gone.clear()

    def drain(self) -> None:
        """Emits the faults and write-backs the core served since the last drain."""
        if not self._core_mask:
            return          # the core records nothing: no need to take its lock per line
        m = self.m
        regions = m.regions.by_id if m.regions is not None else {}
        emit = m.events.emit
        while n := lib.cdm_machine_take_trace(m.core, self._recs, TAKE_BATCH, self._lost):
            for r in self._recs[0:n]:
                region = regions.get(r.region)
                name = region.name if region is not None else self._gone.get(r.region, f"#{r.region}")
                if r.kind == lib.CDM_TRACE_WRITEBACK:
                    emit("writeback", ts_ns=r.ts_ns, region=name, pid=r.pid, first=r.first, n=r.n)
                else:
                    emit("cpu_fault", ts_ns=r.ts_ns, region=name, pid=r.pid, first=r.first, n=r.n,
                         node=self.location(r.pool), type=_TYPES[r.kind])
        if self._lost[0]:
            self.tracer.append(format_line(time.monotonic_ns(), LOST, (self._lost[0],)))

    def show_usage(self) -> None:
        """The next sample reports every place, changed or not (a new reader
        starts with every place's figures)."""
        self._used.clear()

    def sample(self) -> None:
        """mem_usage lines for the places whose used memory changed."""
        if not self.tracer.is_enabled("mem_usage"):
            return
        kb = PAGE_SIZE // 1024
        for nid, node in self.m.nodes.items():
            pages = self.m.node_pages(nid)
            self._report(str(nid), (pages["total"] - pages["free"]) * kb, pages["total"] * kb)
        for name, mem in self.m.private.items():
            s = self.m.pool_stats(mem.pool)
            self._report(name, s.nr_used * kb, s.npages * kb)

    def _report(self, loc: str, used_kb: int, total_kb: int) -> None:
        if self._used.get(loc) != used_kb:
            self._used[loc] = used_kb
            self.m.events.emit("mem_usage", loc=loc, used_kb=used_kb, total_kb=total_kb)
