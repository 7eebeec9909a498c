"""The trace stream: the events of lib/events.py as lines, for every reader.

What ftrace's ``trace_pipe`` is to the kernel's tracepoints: each event an
enabled kind emits becomes one line ::

    TIMESTAMP EVENT key=value key=value ...

TIMESTAMP is CLOCK_MONOTONIC in seconds with six decimals (the clock of
``time.monotonic()`` and of the C core, so lines from both order alike).
EVENT is a kind of ``EVENTS``; its fields follow in the order given there,
every field always present.  A value is written bare when it is a number or a
word without blanks, ``"``, ``\\`` or ``=``; otherwise in double quotes with
``\\"``, ``\\\\`` and ``\\n`` escaped (a region may be named ``my data``).
Where a page lives (``node``, ``from``, ``to``, ``loc``) is a node's number or,
for a device's private memory, the device's name; ``from`` and ``to`` list
every place of a batch, comma-separated, ``-`` for none.

Every reader gets every line from the moment it opened the pipe.  A reader
that falls more than ``CAPACITY`` lines behind loses the oldest and reads
``lost events=N`` in their place.  ``parse_line`` reads a line back: the
tools (``cdmfs trace``, ``plot``, ``top``) and tests use it, so the format has
one writer and one reader.
"""
from __future__ import annotations

import re
import time
from collections import deque
from typing import Any, Callable, Iterable, Optional

from .events import Events

# kind -> (its fields in line order, what it reports).  The documented
# format: tools and users rely on the names and order; add, never rename.
EVENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "cpu_fault": (("region", "pid", "first", "n", "node", "type"),
                  "a READ of a region's data file served (a CPU page fault, its readahead, or "
                  "read()); node: where page first lives now; type: first_touch (placed now), "
                  "fault_back (a device's private page came back), fault (already present)"),
    "writeback": (("region", "pid", "first", "n"),
                  "a WRITE of a region's data file (dirty pages written back, or write())"),
    "numa_hint_fault": (("region", "first", "n", "node", "faults", "local", "migrated"),
                        "NUMA hinting faults of one CPU fault (node: the faulting CPU's)"),
    "device_fault": (("device", "region", "first", "n", "faults"),
                     "a device's fault batch (hmm_range_fault) mapping pages into its page table"),
    "device_op": (("device", "region", "first", "n", "op", "local_bytes", "remote_bytes",
                   "modeled_ns", "wall_ns"),
                  "a device access (kernel) ran over pages first..first+n-1"),
    "counter_notification": (("device", "region", "first", "n"),
                             "a device's access counter crossed its threshold for a granule"),
    "duplicate": (("device", "region", "first", "n", "pages"),
                  "read_mostly: pages duplicated into a device's memory"),
    "collapse": (("region", "first", "n", "pages"),
                 "a write dropped the devices' duplicates of pages"),
    "evict": (("device", "region", "first", "n", "moved"),
              "oversubscription: a device evicted pages from its memory"),
    "migrate": (("region", "first", "n", "from", "to", "moved", "holes", "wall_ns", "modeled_ns"),
                "a migrate_vma batch: pages moved from..to, holes not moved, its wall time and "
                "the time the modeled links would take"),
    "demote": (("region", "first", "n", "from", "to", "moved", "reason"),
               "reclaim moved cold pages to the next slower tier (reason: kswapd or direct)"),
    "promote": (("region", "first", "n", "from", "to", "moved"),
                "NUMA balancing moved hot pages of a slower tier up"),
    "device_offline": (("device", "moved"), "a device evacuated and out of service"),
    "device_online": (("device",), "a device back in service, its memory empty"),
    "memory_online": (("block", "node"), "a memory block onlined"),
    "memory_offline": (("block", "node"), "a memory block offlined, its pages moved first"),
    "poison": (("region", "page", "pfn"), "a page lost with its frame (memory failure)"),
    "link_down": (("device", "poisoned"), "a device's link went down: its memory lost"),
    "region_removed": (("region",), "a region removed (rmdir): its pages freed"),
    "mem_usage": (("loc", "used_kb", "total_kb"),
                  "the memory used at a node or device changed (sampled at most every 10 ms "
                  "while a reader has the pipe open)"),
}

LOST = "lost"       # the line a reader reads in place of the events it lost
CAPACITY = 1 << 16  # lines kept for readers behind

_BARE = re.compile(r'[^\s"\\=]+\Z')
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def quote(value: Any) -> str:
    """A field's value as the line writes it."""
    text = value if isinstance(value, str) else str(value)
    if _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _unquote(text: str) -> str:
    if not text.startswith('"'):
        return text
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text[1:-1])


def format_line(ts_ns: int, kind: str, values: Iterable[Any]) -> str:
    """One event's line (with its newline); values in EVENTS[kind]'s order."""
    names = EVENTS[kind][0] if kind in EVENTS else ("events",)
    fields = " ".join(f"{k}={quote(v)}" for k, v in zip(names, values))
    return f"{ts_ns // 1_000_000_000}.{ts_ns % 1_000_000_000 // 1000:06d} {kind} {fields}\n"


def parse_line(line: str) -> tuple[float, str, dict[str, str]]:
    """(seconds, kind, {field: text}) of a line ``format_line`` wrote."""
    ts, kind, rest = (line.rstrip("\n").split(" ", 2) + [""])[:3]
    return float(ts), kind, {k: _unquote(v) for k, v in _FIELD.findall(rest)}


def location_list(places: Iterable[str]) -> str:
    """``from``/``to``: the places of a batch, comma-separated; ``-`` for none."""
    return ",".join(places) or "-"


class TraceBuffer:
    """The lines since the oldest reader's position, up to CAPACITY; each
    reader keeps its own sequence number."""

    def __init__(self, capacity: int = CAPACITY):
        self.lines: deque[str] = deque(maxlen=capacity)
        self.end = 0            # sequence number of the next line

    @property
    def start(self) -> int:
        return self.end - len(self.lines)

    def append(self, line: str) -> None:
        self.lines.append(line)
        self.end += 1

    def read(self, seq: int, size: int) -> tuple[bytes, int]:
        """Whole lines from seq, at most size bytes but at least one line if
        any (the caller keeps what a short read leaves of it), and the next seq."""
        out: list[bytes] = []
        if seq < self.start:
            lost = self.start - seq
            out.append(format_line(_now_ns(), LOST, (lost,)).encode())
            seq = self.start
        used = sum(len(b) for b in out)
        while seq < self.end:
            b = self.lines[seq - self.start].encode()
            if out and used + len(b) > size:
                break
            out.append(b)
            used += len(b)
            seq += 1
        return b"".join(out), seq


def _now_ns() -> int:
    return time.monotonic_ns()


Render = Callable[[str, Any], Any]


class Tracer:
    """The enabled kinds of one machine's events, written to a TraceBuffer.

    A kind is subscribed to while enabled and only then: with every kind off
    an emit costs what it did without tracing (a dictionary look-up).
    ``render(field, value)`` turns a mover's field (a Region, a Target...)
    into what the line shows; the layer that knows those objects gives it.
    ``before_line`` runs before each line is written: the machine's chance to
    flush events the C core logged earlier, so lines stay in time order.
    ``on_line`` is told after each line (readers waiting wake up)."""

    def __init__(self, events: Events, render: Render,
                 before_line: Optional[Callable[[], None]] = None,
                 on_enable: Optional[Callable[[str, bool], None]] = None):
        self.events = events
        self.render = render
        self.before_line = before_line
        self.on_enable = on_enable
        self.buffer = TraceBuffer()
        self.enabled: dict[str, Callable[..., None]] = {}
        self.on_line: list[Callable[[], None]] = []
        self._in_flush = False

    def is_enabled(self, kind: str) -> bool:
        return kind in self.enabled

    def enable(self, kind: str, on: bool) -> None:
        if kind not in EVENTS:
            raise ValueError(f"no event {kind}")
        if on == (kind in self.enabled):
            return
        if on:
            fn = self._writer(kind)
            self.enabled[kind] = fn
            self.events.subscribe(kind, fn)
        else:
            self.events.unsubscribe(kind, self.enabled.pop(kind))
        if self.on_enable is not None:
            self.on_enable(kind, on)

    def _writer(self, kind: str) -> Callable[..., None]:
        names = EVENTS[kind][0]
        render = self.render

        def write(ts_ns: Optional[int] = None, **fields: Any) -> None:
            if ts_ns is None:
                self.flush_before()
                ts_ns = _now_ns()
            self.append(format_line(ts_ns, kind, (render(k, fields.get(k, "-")) for k in names)))
        return write

    def flush_before(self) -> None:
        if self.before_line is not None and not self._in_flush:
            self._in_flush = True
            try:
                self.before_line()
            finally:
                self._in_flush = False

    def append(self, line: str) -> None:
        self.buffer.append(line)
        for fn in self.on_line:
            fn()
