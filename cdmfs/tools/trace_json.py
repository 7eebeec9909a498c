"""trace_pipe lines as Chrome trace-event JSON, which the Perfetto UI opens as it is.

The conversion is a pure function of the lines (``cdmfs trace --format text``
output converts the same way later), and streams: an event is written as its
line comes, so a long recording needs no more memory than a short one.

The layout Perfetto shows:

* a process per node (``node 0``) and per device (``gpu0``), in that order,
  and one ``regions`` process with a thread per region;
* on a node or device: ``migrate`` slices (``ph: X``, their wall time) on the
  destination's ``migrations in`` thread, device kernels (``device_op``) as
  slices on the device's ``kernels`` thread, instants (``ph: i``) for faults,
  notifications, evictions, demotions..., and a ``memory used kB`` counter
  track (``ph: C``) from the ``mem_usage`` lines;
* writebacks, collapses and poisonings on their region's thread;
* ``lost events=N`` as a global instant.

Every line becomes exactly one event whose ``cat`` is the line's kind and
whose ``args`` are its fields (numbers as numbers), besides the metadata
naming the tracks; ``mem_usage`` lines are counters, whose args must be the
series (the place is the process, the totals go to ``otherData``).  So
``read_events`` gives back what the lines said, and ``cdmfs plot`` takes
either format.
"""
from __future__ import annotations

import gzip
import json
from typing import IO, Any, Iterable, Iterator, Optional

from ..lib.trace import EVENTS, LOST, parse_line

REGIONS_PID = 1
NODE_PID = 1000         # node N is process 1000 + N
DEVICE_PID = 2000       # the k-th device seen is process 2000 + k
USED = "memory used"    # the counter event: Perfetto names its track "memory used kB"

# kind -> (the field naming its place, the thread on that place's process)
ON_PLACE = {
    "cpu_fault": ("node", "CPU faults"),
    "numa_hint_fault": ("node", "NUMA hinting faults"),
    "device_fault": ("device", "device faults"),
    "device_op": ("device", "kernels"),
    "counter_notification": ("device", "access counters"),
    "duplicate": ("device", "duplicates"),
    "evict": ("device", "evictions"),
    "migrate": ("to", "migrations in"),
    "demote": ("to", "demotions in"),
    "promote": ("to", "promotions in"),
    "device_offline": ("device", "service"),
    "device_online": ("device", "service"),
    "link_down": ("device", "service"),
    "memory_online": ("node", "hotplug"),
    "memory_offline": ("node", "hotplug"),
}
# kinds with a duration: kind -> the field giving it in ns
SLICES = {"migrate": "wall_ns", "device_op": "wall_ns"}
# instants that concern a whole node or device: drawn across its tracks
PROCESS_SCOPE = {"device_offline", "device_online", "link_down", "memory_online", "memory_offline"}


def number(text: str) -> Any:
    """A field's value as JSON: an int when the text is one as Python writes
    it (``007`` stays text, so ``read_events`` gives back the same text)."""
    try:
        value = int(text)
    except ValueError:
        return text
    return value if str(value) == text else text


def is_node(place: str) -> bool:
    return place.isdigit()


def label(place: str) -> str:
    return f"node {place}" if is_node(place) else place


def name_of(kind: str, f: dict[str, str]) -> str:
    """The slice or instant's title in the UI."""
    if kind == "cpu_fault":
        return f.get("type", kind)
    if kind == "device_op":
        return f.get("op", kind)
    if kind in ("migrate", "demote", "promote"):
        return f"{kind} {f.get('from', '-')}→{f.get('to', '-')}"
    return kind


class Converter:
    """Turns lines into trace events, one ``feed`` at a time; ``names`` may
    give a place a longer title (``{"1": "node 1 (CDM, cdm0's memory)"}``)."""

    def __init__(self, names: Optional[dict[str, str]] = None):
        self.names = dict(names or {})
        self.pids: dict[str, int] = {}          # place -> pid
        self.tids: dict[tuple[int, str], int] = {}
        self.lanes: dict[tuple[int, str], list[float]] = {}     # end time of each lane's last slice
        self.devices = 0
        self.totals: dict[str, int] = {}        # place -> total kB, the last mem_usage said
        self.last_sample: dict[str, int] = {}   # place -> ts of its last counter sample
        self.regions_named = False
        self.events = 0

    # -- tracks ---------------------------------------------------------
    def _meta(self, name: str, pid: int, tid: int, args: dict) -> dict:
        return {"name": name, "ph": "M", "ts": 0, "pid": pid, "tid": tid, "args": args}

    def _process(self, place: str, out: list[dict]) -> int:
        pid = self.pids.get(place)
        if pid is None:
            if is_node(place):
                pid, order = NODE_PID + int(place), int(place)
            else:
                pid, order = DEVICE_PID + self.devices, 1000 + self.devices
                self.devices += 1
            self.pids[place] = pid
            out.append(self._meta("process_name", pid, 0, {"name": self.names.get(place, label(place))}))
            out.append(self._meta("process_sort_index", pid, 0, {"sort_index": order}))
        return pid

    def _regions(self, out: list[dict]) -> int:
        if not self.regions_named:
            self.regions_named = True
            out.append(self._meta("process_name", REGIONS_PID, 0, {"name": "regions"}))
            out.append(self._meta("process_sort_index", REGIONS_PID, 0, {"sort_index": 100000}))
        return REGIONS_PID

    def _thread(self, pid: int, name: str, out: list[dict]) -> int:
        # tids unique across processes: Perfetto takes a tid for a Linux one
        tid = self.tids.get((pid, name))
        if tid is None:
            tid = pid * 100 + sum(1 for p, _ in self.tids if p == pid) + 1
            self.tids[(pid, name)] = tid
            out.append(self._meta("thread_name", pid, tid, {"name": name}))
            out.append(self._meta("thread_sort_index", pid, tid, {"sort_index": tid}))
        return tid

    def _lane(self, pid: int, thread: str, start: float, end: float, out: list[dict]) -> int:
        """A thread for a slice: slices on one thread must nest, and two
        migrations may overlap without nesting, so the second goes to a
        second lane (``migrations in #2``)."""
        lanes = self.lanes.setdefault((pid, thread), [])
        for i, busy_until in enumerate(lanes):
            if busy_until <= start:
                lanes[i] = end
                break
        else:
            lanes.append(end)
            i = len(lanes) - 1
        return self._thread(pid, thread if i == 0 else f"{thread} #{i + 1}", out)

    # -- events ---------------------------------------------------------
    def feed(self, line: str) -> list[dict]:
        """The trace events of one line (metadata first when it names a new
        track); nothing for a blank line."""
        if not line.strip():
            return []
        ts_s, kind, fields = parse_line(line)
        ts = round(ts_s * 1e6)      # microseconds, as the format counts
        out: list[dict] = []
        args = {k: number(v) for k, v in fields.items()}
        self.events += 1
        if kind == "mem_usage":
            place = fields.get("loc", "?")
            pid = self._process(place, out)
            total = number(fields.get("total_kb", "0"))
            if isinstance(total, int) and self.totals.get(place) != total:
                self.totals[place] = total
                out.append(self._meta("process_labels", pid, 0, {"labels": f"{total // 1024} MiB"}))
            # A sample cdmfs trace took itself may follow a line stamped a
            # moment earlier: a counter's samples stay in order.
            ts = max(ts, self.last_sample.get(place, ts))
            self.last_sample[place] = ts
            out.append({"name": USED, "cat": kind, "ph": "C", "ts": ts, "pid": pid, "tid": 0,
                        "args": {"kB": number(fields.get("used_kb", "0"))}})
            return out
        if kind == LOST:
            out.append({"name": "lost events", "cat": kind, "ph": "i", "s": "g", "ts": ts,
                        "pid": self._regions(out), "tid": 0, "args": args})
            return out
        where = ON_PLACE.get(kind)
        place = fields.get(where[0], "-") if where else "-"
        if where and place not in ("-", "") and "," not in place:
            pid = self._process(place, out)
            thread = where[1]
        elif where and "," in place:
            # a batch that went to several places (interleave): on the first
            pid = self._process(place.split(",")[0], out)
            thread = where[1]
        else:
            # no place (writeback, collapse, poison, a migration that moved
            # nothing): the region's thread, or an "other" one
            pid = self._regions(out)
            thread = fields.get("region", "other")
        event: dict[str, Any] = {"name": name_of(kind, fields), "cat": kind, "ts": ts, "pid": pid}
        dur_field = SLICES.get(kind)
        if dur_field is not None and isinstance(args.get(dur_field), int):
            # the line is written when the work is done: the slice ends there
            dur = max(args[dur_field] / 1000, 0.0)
            event.update(ph="X", ts=ts - dur, dur=dur)
            event["tid"] = self._lane(pid, thread, ts - dur, ts, out)
        else:
            event.update(ph="i", s="p" if kind in PROCESS_SCOPE else "t")
            event["tid"] = self._thread(pid, thread, out)
        event["args"] = args
        out.append(event)
        return out

    def other_data(self) -> dict:
        """What ``read_events`` needs besides the events: each process's place
        and the places' total memory."""
        return {"cdmfs_places": {str(pid): place for place, pid in self.pids.items()},
                "cdmfs_total_kb": dict(self.totals), "cdmfs_names": dict(self.names)}


class JsonWriter:
    """Writes the JSON file as events come: ``{"traceEvents": [`` now, each
    event on its own line, the rest at ``close`` (also after Ctrl-C)."""

    def __init__(self, out: IO[str], names: Optional[dict[str, str]] = None):
        self.out = out
        self.conv = Converter(names)
        self.first = True
        out.write('{"traceEvents": [\n')

    def line(self, line: str) -> None:
        for ev in self.conv.feed(line):
            self.out.write(("" if self.first else ",\n") + json.dumps(ev, separators=(",", ":")))
            self.first = False

    def close(self) -> None:
        tail = {"displayTimeUnit": "ms", "otherData": self.conv.other_data()}
        self.out.write("\n],\n" + json.dumps(tail)[1:] + "\n")
        self.out.flush()


def convert(lines: Iterable[str], names: Optional[dict[str, str]] = None) -> dict:
    """The whole trace as a dict (what the JSON file holds)."""
    conv = Converter(names)
    events = [ev for line in lines for ev in conv.feed(line)]
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": conv.other_data()}


def open_text(path: str, mode: str = "r") -> IO[str]:
    """A trace file as text: gzip-compressed when its name ends in .gz
    (written so; Perfetto opens those too) or its bytes say so (read)."""
    if "w" in mode:
        if path.endswith(".gz"):
            return gzip.open(path, "wt", encoding="utf-8")
        return open(path, "w", encoding="utf-8")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_json(path: str) -> bool:
    with open_text(path) as f:
        return f.read(64).lstrip().startswith("{")


def read_events(path: str) -> Iterator[tuple[float, str, dict[str, str]]]:
    """The lines of a trace file, JSON or text, as ``parse_line`` gives them
    ``(seconds, kind, {field: text})``, in the file's order."""
    if _is_json(path):
        yield from _json_events(path)
        return
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield parse_line(line)


def read_names(path: str) -> dict[str, str]:
    """The places' titles a JSON trace recorded (``node 1 (CDM, cdm0's
    memory)``); none for a text trace."""
    try:
        if not _is_json(path):
            return {}
        with open_text(path) as f:
            doc = json.load(f)
        return dict(doc.get("otherData", {}).get("cdmfs_names", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _json_events(path: str) -> Iterator[tuple[float, str, dict[str, str]]]:
    with open_text(path) as f:
        doc = json.load(f)
    other = doc.get("otherData", {}) if isinstance(doc, dict) else {}
    places = {int(pid): place for pid, place in other.get("cdmfs_places", {}).items()}
    totals = other.get("cdmfs_total_kb", {})
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    for ev in events:
        kind = ev.get("cat")
        if ev.get("ph") == "M" or (kind not in EVENTS and kind != LOST):
            continue
        ts = ev["ts"] + (ev.get("dur", 0) if ev.get("ph") == "X" else 0)
        if kind == "mem_usage":
            loc = places.get(ev["pid"], "?")
            fields = {"loc": loc, "used_kb": str(ev["args"].get("kB", 0)),
                      "total_kb": str(totals.get(loc, 0))}
        else:
            fields = {k: str(v) for k, v in ev.get("args", {}).items()}
        yield round(ts) / 1e6, kind, fields
