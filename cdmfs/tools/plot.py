"""``cdmfs plot``: a picture of a trace (``cdmfs trace``, JSON or text).

Above, a region's placement over time: time across, page offset down, a
colour per node and device.  Below, the memory each node and device uses,
from the ``mem_usage`` lines.

The placement is rebuilt from the events alone, at a bounded resolution: the
region's pages go into at most ``MAX_ROWS`` rows, each row keeping how many
of its pages are where (a count per place), and time into ``columns``.  An
event touching pages first..first+n-1 changes the counts of the rows it
covers, in proportion to how much of each row it covers; a column shows each
row's most common place.  So the work follows the events and the picture's
size, never the region's size.

What the lines tell and what they do not (the picture is as exact as they are):

* ``cpu_fault`` first_touch/fault_back places its pages at ``node`` (the
  node of its first page: an interleaved batch is drawn on that node);
  ``fault`` (already present) only teaches where page ``first`` is, if the
  trace had not said so yet.
* ``migrate``, ``demote``, ``promote`` move pages from the places of ``from``
  to those of ``to``.  When a batch moved fewer pages than its range
  (``moved`` < ``n``), which ones stayed (holes) is not in the line: the
  rows give up ``moved`` pages in proportion to what they hold in ``from``.
  Several ``to`` places share the moved pages evenly (interleave).
* ``evict``: its pages move by the ``migrate`` lines eviction writes too; the
  line itself changes nothing here.  ``duplicate`` makes copies: the
  original stays where it is.
* ``poison`` loses a page; ``link_down`` loses every page in the device.
* A region removed is not an event: its pages stay in the picture (the
  used-memory curves below show the memory going).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Optional

from .trace_json import read_events, read_names

MAX_ROWS = 512
COLUMNS = 800
NODE_COLOURS = ("#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#8c564b", "#7f7f7f")
DEVICE_COLOURS = ("#ff7f0e", "#d62728", "#e377c2", "#bcbd22", "#ffbb78", "#ff9896")
UNPLACED = "#f0f0f0"
POISONED = "#000000"
MOVERS = ("migrate", "demote", "promote")


class PlotError(Exception):
    """A failure to report as one line."""


def place_order(places: Iterable[str]) -> list[str]:
    """Nodes by number, then devices by name: the legend's and colours' order."""
    ps = set(places) - {"-", ""}
    return sorted((p for p in ps if p.isdigit()), key=int) + sorted(p for p in ps if not p.isdigit())


def colours(places: Iterable[str]) -> dict[str, str]:
    """The colour of each place of a trace (``#rrggbb``): node N by its number,
    devices in name order; stable for a given set of places."""
    out = {}
    devices = 0
    for p in place_order(places):
        if p.isdigit():
            out[p] = NODE_COLOURS[int(p) % len(NODE_COLOURS)]
        else:
            out[p] = DEVICE_COLOURS[devices % len(DEVICE_COLOURS)]
            devices += 1
    return out


def place_title(p: str, names: Optional[dict[str, str]] = None) -> str:
    if names and p in names:
        return names[p]
    return f"node {p}" if p.isdigit() else p


def split(places: str) -> list[str]:
    return [p for p in places.split(",") if p and p != "-"]


class Placement:
    """Where a region's pages are, a row of page counts per place."""

    def __init__(self, pages: int, places: list[str]):
        import numpy as np
        self.np = np
        self.pages = max(pages, 1)
        self.bucket = math.ceil(self.pages / MAX_ROWS)
        self.rows = math.ceil(self.pages / self.bucket)
        self.index = {p: i + 1 for i, p in enumerate(places)}   # 0: not placed
        self.poisoned = len(places) + 1
        self.counts = np.zeros((self.rows, len(places) + 2))
        sizes = np.full(self.rows, float(self.bucket))
        sizes[-1] = self.pages - self.bucket * (self.rows - 1)
        self.counts[:, 0] = sizes
        self.sizes = sizes

    def _cover(self, first: int, n: int):
        """(row slice, the fraction of each of its rows that [first, first+n) covers)."""
        np = self.np
        a, b = max(first, 0), min(first + n, self.pages)
        if a >= b:
            return None, None
        r0, r1 = a // self.bucket, (b - 1) // self.bucket + 1
        starts = np.arange(r0, r1) * self.bucket
        ends = np.minimum(starts + self.bucket, self.pages)
        overlap = np.minimum(ends, b) - np.maximum(starts, a)
        return slice(r0, r1), overlap / self.sizes[r0:r1]

    def move(self, first: int, n: int, to: list[str], sources: Optional[list[int]] = None,
             limit: Optional[int] = None) -> None:
        """Moves the pages of [first, first+n) in ``sources`` (place indexes;
        every place without) to the places ``to`` (evenly), at most ``limit``."""
        rows, frac = self._cover(first, n)
        if rows is None or not to:
            return
        block = self.counts[rows]
        cols = sources if sources is not None else list(range(block.shape[1]))
        taken = block[:, cols] * frac[:, None]
        total = taken.sum()
        if limit is not None and total > limit > 0:
            taken *= limit / total
        elif limit == 0:
            return
        block[:, cols] -= taken
        share = taken.sum(axis=1) / len(to)
        for p in to:
            block[:, self.index_of(p)] += share
        self.counts[rows] = block

    def index_of(self, p: str) -> int:
        return self.poisoned if p == "poisoned" else self.index[p]

    def clear(self) -> None:
        """Every page not placed (the region was removed)."""
        self.counts[:] = 0
        self.counts[:, 0] = self.sizes

    def lose_device(self, device: str) -> None:
        i = self.index.get(device)
        if i is not None:
            self.counts[:, self.poisoned] += self.counts[:, i]
            self.counts[:, i] = 0

    def column(self):
        """Each row's most common place (0: not placed); a row that lost a
        page shows it: one page lost matters more than a majority."""
        col = self.counts.argmax(axis=1)
        col[self.counts[:, self.poisoned] >= 0.5] = self.poisoned
        return col


def apply(pl: Placement, kind: str, f: dict[str, str]) -> None:
    """One event's effect on the region's placement (see the module's notes)."""
    def num(key: str, default: int = 0) -> int:
        try:
            return int(f.get(key, default))
        except ValueError:
            return default
    if kind == "cpu_fault":
        node = f.get("node", "-")
        if node not in pl.index:
            return
        if f.get("type") in ("first_touch", "fault_back"):
            pl.move(num("first"), num("n"), [node])
        else:
            pl.move(num("first"), 1, [node], sources=[0])
    elif kind in MOVERS:
        to = [p for p in split(f.get("to", "-")) if p in pl.index]
        src = [pl.index[p] for p in split(f.get("from", "-")) if p in pl.index]
        n, moved = num("n"), num("moved", num("n"))
        if not to or moved <= 0:
            return
        if moved >= n:
            pl.move(num("first"), n, to)
        else:
            pl.move(num("first"), n, to, sources=src or None, limit=moved)
    elif kind == "poison":
        pl.move(num("page"), 1, ["poisoned"])
    elif kind == "region_removed":
        pl.clear()


def region_of(f: dict[str, str]) -> Optional[str]:
    return f.get("region")


def extent(events: list, region: str) -> int:
    """Pages of the region the trace shows (it never says the region's size)."""
    end = 0
    for _, kind, f in events:
        if f.get("region") != region:
            continue
        try:
            if kind == "poison":
                end = max(end, int(f["page"]) + 1)
            elif "first" in f:
                end = max(end, int(f["first"]) + int(f.get("n", 1)))
        except (KeyError, ValueError):
            pass
    return end


def load(path: str) -> list:
    try:
        events = list(read_events(path))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, UnicodeDecodeError):
        raise PlotError(f"{path} is not a trace (cdmfs trace writes one)") from None
    except OSError as e:
        if e.strerror is None:      # a damaged .gz
            raise PlotError(f"{path} is not a trace (cdmfs trace writes one)") from None
        raise PlotError(f"cannot read {path}: {e.strerror}") from None
    if not events:
        raise PlotError(f"{path} holds no events")
    return events


def choose_region(events: list, region: Optional[str]) -> str:
    """The region asked for, else the busiest: the most pages in its events
    (a thousand one-page faults weigh less than a 64 MiB migration)."""
    counts: Counter = Counter()
    for _, _, f in events:
        if "region" in f:
            n = f.get("n", "1")
            counts[f["region"]] += int(n) if n.isdigit() else 1
    if region is not None:
        if region not in counts:
            names = sorted(counts)
            known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") \
                if names else "none"
            raise PlotError(f"no region {region!r} in the trace (its regions: {known})")
        return region
    if not counts:
        raise PlotError("the trace has no region events to draw")
    return counts.most_common(1)[0][0]


def placement_image(events: list, region: str, places: list[str], t0: float, t1: float,
                    columns: int = COLUMNS):
    """The rows x columns array of place indexes, and the region's page count."""
    import numpy as np
    pages = extent(events, region)
    pl = Placement(pages, places)
    img = np.zeros((pl.rows, columns), dtype=int)
    span = max(t1 - t0, 1e-9)
    col = 0
    for ts, kind, f in events:
        if ts > t1:
            break
        if kind == "link_down":
            here = min(int((ts - t0) / span * columns), columns - 1)
            img[:, col:here] = pl.column()[:, None]
            col = max(col, here)
            pl.lose_device(f.get("device", ""))
            continue
        if f.get("region") != region:
            continue
        here = min(int((ts - t0) / span * columns), columns - 1)
        if here > col:
            img[:, col:here] = pl.column()[:, None]
            col = here
        apply(pl, kind, f)
    img[:, col:] = pl.column()[:, None]
    return img, pages


def usage_curves(events: list) -> dict[str, tuple[list[float], list[float], int]]:
    """place -> (times, used MiB, total kB) from the mem_usage lines."""
    out: dict[str, tuple[list[float], list[float], int]] = {}
    for ts, kind, f in events:
        if kind != "mem_usage":
            continue
        try:
            used, total = int(f["used_kb"]), int(f.get("total_kb", 0))
        except (KeyError, ValueError):
            continue
        times, values, _ = out.get(f.get("loc", "?"), ([], [], 0))
        times.append(ts)
        values.append(used / 1024)
        out[f.get("loc", "?")] = (times, values, total)
    return out


def plot(path: str, out: str, region: Optional[str] = None, width: int = 1200, height: int = 800) -> str:
    """Draws the trace at ``path`` into the PNG ``out``; returns the region drawn."""
    events = load(path)
    region = choose_region(events, region)
    events.sort(key=lambda e: e[0])
    # From the trace's start to a little after the region's last event (its
    # removal, where the trace saw it): what comes after is other regions'
    # (cdmfs demo's trace goes on with memhog's region).
    t0 = events[0][0]
    last = max(ts for ts, _, f in events if f.get("region") == region)
    t1 = min(events[-1][0], last + 0.05 * (last - t0))
    if t1 <= t0:
        t1 = t0 + 1e-3
    seen = set()
    for _, kind, f in events:
        for key in ("node", "loc", "to", "from"):
            if key in f:
                seen.update(split(f[key]))
    curves = usage_curves(events)
    seen.update(curves)
    places = place_order(seen)
    colour = colours(places)
    img, pages = placement_image(events, region, places, t0, t1)
    names = read_names(path)

    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    palette = [UNPLACED] + [colour[p] for p in places] + [POISONED]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(width / 100, height / 100), dpi=100,
                                      gridspec_kw={"height_ratios": (3, 1)}, layout="constrained")
    top.imshow(img, aspect="auto", interpolation="nearest", cmap=ListedColormap(palette),
               vmin=0, vmax=len(palette) - 1, extent=(0, t1 - t0, pages, 0))
    top.set_ylabel("page offset (4 KiB pages)")
    lost = sum(int(f.get("events", 0)) for _, kind, f in events if kind == "lost" and f.get("events", "").isdigit())
    top.set_title(f"region {region}: where its {pages} pages are over time"
                  + (f"\n({lost} events lost by a slow reader: the picture may be wrong)" if lost else ""))
    present = set(img.ravel().tolist())
    handles = [Patch(color=palette[i], label=lbl) for i, lbl in
               [(0, "not placed")] + [(k + 1, place_title(p, names)) for k, p in enumerate(places)]
               + [(len(palette) - 1, "poisoned")] if i in present]
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="placement")

    drawn = [p for p in places if p in curves]
    for k, p in enumerate(drawn):
        times, values, total = curves[p]
        shown = [i for i, t in enumerate(times) if t <= t1] or [0]
        xs = [times[i] - t0 for i in shown] + [t1 - t0]
        ys = [values[i] for i in shown] + [values[shown[-1]]]
        what = f" of {total / 1024:.0f} MiB" if total else ""
        # the first drawn the widest: two places using as much both show
        bottom.step(xs, ys, where="post", color=colour[p], linewidth=1.5 + (len(drawn) - 1 - k),
                    label=f"{place_title(p)}{what}")
    bottom.set_ylabel("memory used (MiB)")
    bottom.set_xlabel("time (s) since the trace's first event")
    bottom.set_xlim(0, t1 - t0)
    bottom.grid(True, alpha=0.3)
    if curves:
        bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), title="used")
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise PlotError(f"cannot write {out}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return region
