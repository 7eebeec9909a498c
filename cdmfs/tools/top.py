"""``cdmfs top``: a live view of a mount's memory, redrawn every second.

Used/total bars per node and device (their ``meminfo``), the rates of CPU
faults, migrations, demotions, promotions, NUMA hinting faults, device
faults and evictions (deltas of ``proc/vmstat`` and the devices' ``stat``),
and a placement strip per region: a row of cells, each a slice of the
region's pages, marked with the place most of its sampled pages are in.

The strip samples the region's ``pagemap`` (at most ``SAMPLES`` entries a
cell, in one read per cell, or one read for a region of up to
``WHOLE_PAGES`` pages): its cost follows the screen, not the region's size.
Frames are root's to see; for anyone else the strip is drawn from the
region's ``stat`` counts, in proportion.

On a terminal: rich's Live on the alternate screen, ``q`` (or Ctrl-C) quits;
the terminal's settings come back on exit.  Anywhere else (a pipe, a file,
``--once``) it prints one plain snapshot, its rates over ``--interval``.
"""
from __future__ import annotations

import os
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from ..client import PM_PRESENT, PM_SWAP, SWP_HWPOISON, pagemap_pfn, pagemap_swap_type
from . import places as mp
from .plot import colours

SAMPLES = 16            # pagemap entries read per strip cell
WHOLE_PAGES = 1 << 17   # a region up to this many pages: its pagemap in one read (1 MiB)
MAX_REGIONS = 12        # regions shown (the largest)
POISONED = "poisoned"

# (title, how the figure is taken from a sample): the rates shown
RATES = (
    ("CPU faults", lambda s: s.vm.get("pgfault", 0)),
    ("migrated", lambda s: s.vm.get("pgmigrate_success", 0)),
    ("demoted", lambda s: sum(v for k, v in s.vm.items() if k.startswith("pgdemote_"))),
    ("promoted", lambda s: s.vm.get("pgpromote_success", 0)),
    ("NUMA hints", lambda s: s.vm.get("numa_hint_faults", 0)),
    ("device faults", lambda s: sum(d.get("faults", 0) for d in s.dev.values())),
    ("evicted", lambda s: sum(d.get("evicted_bytes", 0) for d in s.dev.values()) // 4096),
)


class TopError(Exception):
    """A failure to report as one line."""


@dataclass
class Memory:
    name: str           # place ("0", "gpu0") or device name (a coherent device)
    title: str
    used_kb: int
    total_kb: int


@dataclass
class RegionView:
    name: str
    pages: int
    counts: dict[str, int]      # place -> pages, from its stat
    strip: list[Optional[str]]  # a place per cell (None: not placed)
    exact: bool                 # sampled from pagemap (else from counts)


@dataclass
class Sample:
    t: float
    memory: list[Memory]
    vm: dict[str, int]
    dev: dict[str, dict[str, int]]
    regions: list[RegionView] = field(default_factory=list)
    hidden: int = 0             # regions not shown


# -- reading the mount ---------------------------------------------------------

def check_mount(mountpoint: str) -> None:
    if not os.path.isdir(os.path.join(mountpoint, "regions")) or \
            not os.path.isdir(os.path.join(mountpoint, mp.NODE_DIR)):
        raise TopError(f"{mountpoint} is not a cdmfs mount")


def symbols(names: list[str]) -> dict[str, str]:
    """One character per place, for the strips: a node's digit, a device's
    first letter (or the next free one)."""
    out: dict[str, str] = {}
    used = set()
    for p in names:
        cands = ([p] if p.isdigit() and len(p) == 1 else []) + list(p.lower()) + list("abcdefghijklmnopqrstuvwxyz")
        sym = next(c for c in cands if c not in used and c.isalnum())
        out[p] = sym
        used.add(sym)
    return out


def decode(entry: int, frames: mp.FrameMap) -> Optional[str]:
    """The place of a pagemap entry; None for a page not placed."""
    if entry & PM_PRESENT:
        return frames.node(pagemap_pfn(entry))
    if entry & PM_SWAP:
        if pagemap_swap_type(entry) == SWP_HWPOISON:
            return POISONED
        return frames.device(pagemap_pfn(entry))
    return None


def majority(found: list[Optional[str]]) -> Optional[str]:
    if POISONED in found:
        return POISONED         # a lost page matters more than a majority
    placed = [p for p in found if p is not None]
    if not placed:
        return None
    return max(set(placed), key=placed.count)


def sample_strip(path: str, pages: int, cells: int, frames: mp.FrameMap) -> list[Optional[str]]:
    """A place per cell of the region's pages, from SAMPLES pagemap entries a cell."""
    if pages <= 0:
        return []
    cells = min(cells, pages)
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = None
        if pages <= WHOLE_PAGES:
            whole = os.pread(fd, pages * 8, 0)
        out = []
        for c in range(cells):
            a, b = c * pages // cells, (c + 1) * pages // cells
            if whole is not None:
                step = max((b - a) // SAMPLES, 1)
                idx = range(a, b, step)
                entries = [int.from_bytes(whole[8 * i:8 * i + 8], "little") for i in idx]
            else:
                start = max(a + (b - a) // 2 - SAMPLES // 2, a)
                n = min(SAMPLES, b - start)
                data = os.pread(fd, n * 8, start * 8)
                entries = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]
            out.append(majority([decode(e, frames) for e in entries]))
        return out
    finally:
        os.close(fd)


def proportional_strip(counts: dict[str, int], pages: int, cells: int) -> list[Optional[str]]:
    """A strip from counts alone (no frames to see): each place's share, in order."""
    cells = min(cells, max(pages, 1))
    out: list[Optional[str]] = []
    for p, n in counts.items():
        out += [p] * round(n * cells / max(pages, 1))
    return (out + [None] * cells)[:cells]


def region_counts(path: str) -> dict[str, int]:
    """place -> pages, from a region's stat (``N0``, ``private:gpu0``)."""
    out = {}
    for k, v in mp.kv(path).items():
        if k[:1] == "N" and k[1:].isdigit():
            out[k[1:]] = v
        elif k.startswith("private:"):
            out[k[len("private:"):]] = v
        elif k == "poisoned" and v:
            out[POISONED] = v
    return out


def take(mountpoint: str, cells: int, frames: Optional[mp.FrameMap]) -> Sample:
    places = mp.places(mountpoint)
    memory = []
    for p in places:
        info = mp.meminfo(p.meminfo)
        memory.append(Memory(p.name, p.title, info.get("MemUsed", 0), info.get("MemTotal", 0)))
    dev = {}
    for d in mp.devices(mountpoint):
        dev[d.name] = mp.kv(os.path.join(mountpoint, "devices", d.name, "stat"))
        if d.kind != "private":
            info = mp.meminfo(os.path.join(mountpoint, "devices", d.name, "meminfo"))
            memory.append(Memory(d.name, f"{d.name} (coherent, node {d.node})",
                                 info.get("MemUsed", 0), info.get("MemTotal", 0)))
    s = Sample(time.monotonic(), memory, mp.kv(os.path.join(mountpoint, "proc/vmstat")), dev)
    base = os.path.join(mountpoint, "regions")
    try:
        names = os.listdir(base)
    except OSError:
        names = []
    sized = []
    for name in names:
        try:
            sized.append((os.stat(os.path.join(base, name, "data")).st_size, name))
        except OSError:
            continue        # gone meanwhile, or not ours to see
    sized.sort(key=lambda x: (-x[0], x[1]))
    s.hidden = max(len(sized) - MAX_REGIONS, 0)
    for size, name in sorted(sized[:MAX_REGIONS], key=lambda x: x[1]):
        pages = -(-size // 4096)
        counts = region_counts(os.path.join(base, name, "stat"))
        strip, exact = None, False
        if frames is not None:
            try:
                strip, exact = sample_strip(os.path.join(base, name, "pagemap"), pages, cells, frames), True
            except OSError:
                strip = None
        if strip is None:
            strip = proportional_strip(counts, pages, cells)
        s.regions.append(RegionView(name, pages, counts, strip, exact))
    return s


def rates(before: Optional[Sample], now: Sample) -> list[tuple[str, Optional[float]]]:
    """(title, per second) of each RATE; None without a sample before."""
    if before is None or now.t <= before.t:
        return [(title, None) for title, _ in RATES]
    dt = now.t - before.t
    return [(title, max(fn(now) - fn(before), 0) / dt) for title, fn in RATES]


# -- drawing ---------------------------------------------------------------------

def mib(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def render(mountpoint: str, s: Sample, r: list[tuple[str, Optional[float]]], width: int, live: bool):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    names = [m.name for m in s.memory if m.name.isdigit()] + \
        [m.name for m in s.memory if not m.name.isdigit() and m.title.endswith("private memory)")]
    colour = colours(names)
    sym = symbols(names)
    bar_w = max(min(width - 60, 40), 10)

    head = Text(f"cdmfs top  {mountpoint}  {time.strftime('%H:%M:%S')}", style="bold")
    if live:
        head.append("   q quits", style="dim")

    mem = Table(title="memory", title_justify="left", box=None, pad_edge=False, show_edge=False)
    mem.add_column("node / device", no_wrap=True)
    mem.add_column("used", no_wrap=True)
    mem.add_column("MiB used / total", justify="right", no_wrap=True)
    mem.add_column("%", justify="right")
    for m in s.memory:
        frac = m.used_kb / m.total_kb if m.total_kb else 0.0
        filled = round(frac * bar_w)
        bar = Text("█" * filled, style=colour.get(m.name, "white"))
        bar.append("░" * (bar_w - filled), style="dim")
        mem.add_row(m.title, bar, f"{mib(m.used_kb)} / {mib(m.total_kb)}", f"{100 * frac:.0f}")

    rt = Table(title="per second (migrated, demoted, promoted, evicted: pages)", title_justify="left", box=None, pad_edge=False,
               show_edge=False)
    for title, _ in r:
        rt.add_column(title, justify="right", no_wrap=True)
    rt.add_row(*("-" if v is None else f"{v:,.0f}" for _, v in r))

    parts = [head, Text(""), mem, Text(""), rt, Text("")]
    if s.regions:
        reg = Table(title="regions (each cell a slice of the pages; its mark: where most of them are)",
                    title_justify="left", box=None, pad_edge=False, show_edge=False)
        reg.add_column("region", no_wrap=True)
        reg.add_column("MiB", justify="right")
        reg.add_column("placement", no_wrap=True)
        reg.add_column("pages", no_wrap=False)
        for v in s.regions:
            strip = Text()
            for p in v.strip:
                if p is None:
                    strip.append("·", style="dim")
                elif p == POISONED:
                    strip.append("X", style="bold white on red")
                else:
                    strip.append(sym.get(p, "?"), style=f"bold white on {colour.get(p, 'grey50')}")
            where = "  ".join(f"{'node ' + p if p.isdigit() else p} {n}" for p, n in v.counts.items() if n)
            reg.add_row(v.name, f"{v.pages * 4 / 1024:.1f}", strip,
                        (where or "none placed") + ("" if v.exact else "  (in proportion)"))
        parts.append(reg)
        if s.hidden:
            parts.append(Text(f"... and {s.hidden} smaller regions", style="dim"))
        legend = Text("marks: ")
        for p in names:
            legend.append(f" {sym[p]} ", style=f"bold white on {colour[p]}")
            legend.append(f" {'node ' + p if p.isdigit() else p}  ")
        legend.append("·", style="dim")
        legend.append(" not placed  ")
        legend.append("X", style="bold white on red")
        legend.append(" poisoned")
        parts.append(legend)
    else:
        parts.append(Text("no regions", style="dim"))
    return Group(*parts)


# -- running ---------------------------------------------------------------------

def strip_cells(width: int) -> int:
    return max(min(width // 2 - 10, 64), 8)


def frame_map(mountpoint: str) -> Optional[mp.FrameMap]:
    if os.geteuid() != 0:
        return None         # frames read as 0: the strips come from the counts
    try:
        return mp.FrameMap(mountpoint)
    except (OSError, ValueError):
        return None


def snapshot(mountpoint: str, interval: float = 1.0, width: int = 100) -> None:
    """One plain snapshot on stdout, its rates over ``interval`` seconds."""
    from rich.console import Console
    check_mount(mountpoint)
    frames = frame_map(mountpoint)
    first = take(mountpoint, strip_cells(width), frames)
    time.sleep(interval)
    now = take(mountpoint, strip_cells(width), frames)
    console = Console(width=width, color_system=None, highlight=False)
    with console.capture() as text:
        console.print(render(mountpoint, now, rates(first, now), width, live=False))
    # rich pads its tables' cells to the width: plain lines end at their text
    sys.stdout.write("".join(line.rstrip() + "\n" for line in text.get().splitlines()))


class Keys:
    """The terminal in cbreak mode (a key at a time, no echo) while it lasts."""

    def __init__(self):
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.saved = None

    def __enter__(self) -> "Keys":
        if self.fd is not None:
            import termios
            import tty
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def wait(self, timeout: float) -> str:
        """A key pressed within timeout seconds ('' for none)."""
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return os.read(self.fd, 32).decode(errors="replace") if ready else ""


def live(mountpoint: str, interval: float = 1.0) -> None:
    """Redraws every ``interval`` seconds until ``q`` or Ctrl-C."""
    from rich.console import Console
    from rich.live import Live
    check_mount(mountpoint)
    # The terminal's own size, followed as it changes: an exported COLUMNS
    # or LINES (a shell's, a test runner's) would pin rich's.
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    console = Console(_environ=environ)
    frames = frame_map(mountpoint)
    before = None
    with Keys() as keys, Live(console=console, screen=True, auto_refresh=False) as view:
        while True:
            width = console.size.width
            try:
                now = take(mountpoint, strip_cells(width), frames)
            except FileNotFoundError:
                raise TopError(f"{mountpoint} is no longer a cdmfs mount") from None
            view.update(render(mountpoint, now, rates(before, now), width, live=True), refresh=True)
            before = now
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                key = keys.wait(left)
                if "q" in key.lower():
                    return


def run(mountpoint: str, once: bool = False, interval: float = 1.0) -> None:
    if once or not sys.stdout.isatty():
        snapshot(mountpoint, interval)
    else:
        try:
            live(mountpoint, interval)
        except KeyboardInterrupt:
            pass
