"""``cdmfs hardware`` and ``cdmfs numastat`` (SPEC §2): the emulated machine in
the layouts of ``numactl --hardware`` and ``numastat``.

Everything here only reads the mount's files (``sys/devices/system/node``,
``regions/NAME/stat``, ``devices/NAME/*``), as the real tools read ``/sys`` and
``/proc``; nothing talks to the daemon.

Layouts, checked against numactl 2.0.16 (Debian ``numactl``; ``numactl.c``
``hardware()``/``print_distances()``, ``numastat.c``) and its real output:

``hardware()``::

    available: 2 nodes (0-1)
    node 0 cpus: 0 1
    node 0 size: 1024 MB
    node 0 free: 1024 MB
    node 1 cpus:
    node 1 size: 1024 MB
    node 1 free: 1024 MB
    node distances:
    node   0   1 
      0:  10  40 
      1:  40  10 
    device cdm0: coherent, node 1, size 1024 MB, free 1024 MB
    device gpu0: private, size 1024 MB, free 1024 MB

Nodes are the ``nodeN`` directories (libnuma's ``numa_nodes_ptr``); the node
list prints like ``%*pbl``; sizes are ``MemTotal``/``MemFree`` of ``nodeN/meminfo``
shifted down to whole MB; the i-th number of ``nodeN/distance`` is the distance to
the i-th node (libnuma's ``parse_numbers``); the trailing blanks of the distance
table are numactl's (``"% 3d "``).  The device lines are cdmfs's own: one per
entry of ``devices/``, ``device NAME:`` then, from whichever of
``devices/NAME/{type,node,meminfo}`` exist, the type, ``node N`` for a coherent
device, and ``size``/``free`` in MB; a coherent device whose node is configured
but not present (no ``nodeN`` directory, so no node in the lines above) shows
``not present`` instead of its node and memory.

``numastat()``, the layouts of ``numastat.c`` (tables of 16-column cells, the
left column left-justified, numbers right-justified, rows folded to the screen
width as numastat folds them; ``width=None`` means no folding, as numastat does
when stdout is not a terminal):

* no option -- the old numastat: ``nodeN`` columns of raw page counts from
  ``nodeN/numastat``, no Total column;
* ``nodes_only`` (``-n``) -- "Per-node numastat info (in MBs):", counts times the
  page size in MB, 2 decimals, ``Node N`` columns and ``Total``;
* ``meminfo`` (``-m``) -- "Per-node system memory usage (in MBs):", the rows
  numastat knows, in its order, from ``nodeN/meminfo`` (keys it does not know are
  skipped without numastat's "Token ... not in hash table." lines);
* ``regions`` -- like ``numastat -p PID``, a region standing for a process:
  "Per-node process memory usage (in MBs) for region NAME" with numastat's rows
  Huge/Heap/Stack/Private (a region's pages are all "Private", as a shared file
  mapping counts in ``numa_maps``), a rule and Total; several regions give
  numastat's one-row-per-process table with a ``Region`` column.  Pages in a
  device's private memory (``private:DEV`` of ``regions/NAME/stat``) are not on
  any node: each device gets an extra column ``private:DEV`` after the node
  columns, and Total counts them too (Total is all of the region's memory).

As numastat does, region tables come first, then ``-m``, then ``-n``; the
numastat counters are shown when neither ``-m`` nor a region is asked for.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Iterable, List, Optional, Sequence

from ..lib import bitmap

PAGE_SIZE = 4096                 # SPEC §3: fixed base page
HUGE_PAGE_SIZE = 2 * 1024 * 1024  # numastat's multiplier for HugePages_* rows
MB = 1024 * 1024
NODE_DIR = os.path.join("sys", "devices", "system", "node")
REGION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)
_NODE_ENTRY = re.compile(r"node([0-9]+)", re.ASCII)

# numastat.c's tables: (token in the file, label in the table)
NUMASTAT_ROWS = (
    ("numa_hit", "Numa_Hit"), ("numa_miss", "Numa_Miss"),
    ("numa_foreign", "Numa_Foreign"), ("interleave_hit", "Interleave_Hit"),
    ("local_node", "Local_Node"), ("other_node", "Other_Node"),
)
MEMINFO_ROWS = (
    "MemTotal", "MemFree", "MemUsed", "HighTotal", "HighFree", "LowTotal", "LowFree",
    "Active", "Inactive", "Active(anon)", "Inactive(anon)", "Active(file)",
    "Inactive(file)", "Unevictable", "Mlocked", "Dirty", "Writeback", "FilePages",
    "Mapped", "AnonPages", "Shmem", "KernelStack", "PageTables", "NFS_Unstable",
    "Bounce", "WritebackTmp", "Slab", "SReclaimable", "SUnreclaim", "AnonHugePages",
    "ShmemHugePages", "ShmemPmdMapped", "HugePages_Total", "HugePages_Free",
    "HugePages_Surp", "KReclaimable",
)
PROCESS_ROWS = ("Huge", "Heap", "Stack", "Private")


class ReportError(Exception):
    """Not a cdmfs mount, or no such region: one line for the CLI."""


# --------------------------------------------------------------------------- #
# reading the mount
# --------------------------------------------------------------------------- #


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _check_mount(mountpoint: str) -> str:
    root = os.path.abspath(mountpoint)
    try:
        st = os.stat(root)  # a dead daemon's mount raises ENOTCONN: the CLI prints it
    except FileNotFoundError:
        raise ReportError(f"{mountpoint}: no such directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ReportError(f"{mountpoint}: not a directory")
    if not (os.path.isfile(os.path.join(root, NODE_DIR, "online"))
            and os.path.isdir(os.path.join(root, "regions"))):
        raise ReportError(f"{mountpoint}: not a cdmfs mount")
    return root


def _nodes(root: str) -> List[int]:
    """The ``nodeN`` directories, ascending (libnuma's and numastat's view)."""
    out = []
    for name in os.listdir(os.path.join(root, NODE_DIR)):
        m = _NODE_ENTRY.fullmatch(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def _node_file(root: str, nid: int, name: str) -> str:
    return _read(os.path.join(root, NODE_DIR, f"node{nid}", name))


def _kv(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = int(parts[1])
    return out


def _meminfo_kb(text: str) -> dict:
    """``{"MemTotal": value, ...}`` from ``Node N Key:  value [kB]`` lines."""
    out = {}
    for line in text.splitlines():
        toks = line.replace(":", " ").split()
        if len(toks) >= 4:
            out[toks[2]] = int(toks[3])
    return out


def _plain_meminfo_kb(text: str) -> dict:
    """``{"MemTotal": kB, ...}`` from ``Key:  value kB`` lines (devices/NAME/meminfo)."""
    out = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and rest.split():
            out[key.strip()] = int(rest.split()[0])
    return out


def _optional(path: str) -> Optional[str]:
    try:
        return _read(path).strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


# --------------------------------------------------------------------------- #
# numactl --hardware
# --------------------------------------------------------------------------- #


def _device_line(root: str, name: str, nodes: Sequence[int]) -> str:
    d = os.path.join(root, "devices", name)
    parts = []
    kind = _optional(os.path.join(d, "type"))
    if kind:
        parts.append(kind)
    node = _optional(os.path.join(d, "node"))
    if node is not None and node.lstrip("-").isdigit() and int(node) >= 0:
        if int(node) not in nodes:
            # Its node is configured but not present (not hot-added yet):
            # numactl shows no such node, nor memory of it.
            return f"device {name}: " + ", ".join(parts + ["not present"])
        parts.append(f"node {int(node)}")
    meminfo = _optional(os.path.join(d, "meminfo"))
    if meminfo is not None:
        kb = _plain_meminfo_kb(meminfo)
        if "MemTotal" in kb:
            parts.append(f"size {kb['MemTotal'] >> 10} MB")
        if "MemFree" in kb:
            parts.append(f"free {kb['MemFree'] >> 10} MB")
    if (_optional(os.path.join(d, "online")) or "").strip() == "0":
        parts.append("offline")
    return f"device {name}:" + (" " + ", ".join(parts) if parts else "")


def hardware(mountpoint: str) -> str:
    """The emulated machine in the layout of ``numactl --hardware``, then one
    line per device."""
    root = _check_mount(mountpoint)
    nodes = _nodes(root)
    out = [f"available: {len(nodes)} nodes ({bitmap.nodelist(nodes).strip()})"]
    distances = {}
    for nid in nodes:
        cpus = sorted(bitmap.parse_cpulist(_node_file(root, nid, "cpulist").strip()))
        kb = _meminfo_kb(_node_file(root, nid, "meminfo"))
        out.append(f"node {nid} cpus:" + "".join(f" {c}" for c in cpus))
        out.append(f"node {nid} size: {kb.get('MemTotal', 0) >> 10} MB")
        out.append(f"node {nid} free: {kb.get('MemFree', 0) >> 10} MB")
        row = [int(x) for x in _node_file(root, nid, "distance").split()]
        distances[nid] = {k: d for k, d in zip(nodes, row)}
    if not nodes or not distances[nodes[-1]].get(nodes[0]):
        out.append("No distance information available.")
    else:
        out.append("node distances:")
        out.append("node " + "".join(f"{k:3d} " for k in nodes))
        for i in nodes:
            out.append(f"{i:3d}: " + "".join(f"{distances[i].get(k, 0):3d} " for k in nodes))
    devdir = os.path.join(root, "devices")
    if os.path.isdir(devdir):
        for name in sorted(os.listdir(devdir)):
            out.append(_device_line(root, name, nodes))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- #
# numastat's tables (numastat.c's vtab and display_table())
# --------------------------------------------------------------------------- #


class _Rep:
    """A cell filled with one repeated character, one less than the column width."""

    def __init__(self, ch: str):
        self.ch = ch


class _Table:
    def __init__(self, header_rows: int, header_cols: int, nrows: int, ncols: int):
        self.header_rows = header_rows
        self.header_cols = header_cols
        self.cells: List[list] = [[None] * ncols for _ in range(nrows)]
        self.width = [16] * ncols
        self.left = [False] * ncols
        self.decimals = [0] * ncols
        self.always_rows: set = set()

    def set(self, row: int, col: int, value) -> None:
        self.cells[row][col] = value

    def add(self, row: int, col: int, value: float) -> None:
        cur = self.cells[row][col]
        self.cells[row][col] = (cur if isinstance(cur, float) else 0.0) + value

    def _text(self, cell, width: int, decimals: int) -> str:
        if cell is None:
            s = ""
        elif isinstance(cell, _Rep):
            s = cell.ch * max(width - 1, 0)
        elif isinstance(cell, float):
            s = f"{cell:.{decimals}f}"
        else:
            s = str(cell)
        return s[:width]

    def auto_width(self, col: int, min_width: int, max_width: int) -> None:
        """numastat's ``auto_set_col_width()``."""
        w = min_width
        for row in self.cells:
            if not isinstance(row[col], _Rep):
                w = max(w, len(self._text(row[col], max_width, self.decimals[col])))
        self.width[col] = min(w + 1, max_width)

    def _cell(self, row: int, col: int) -> str:
        w = self.width[col]
        s = self._text(self.cells[row][col], w, self.decimals[col])
        return s.ljust(w) if self.left[col] else s.rjust(w)

    def render(self, screen_width: Optional[int]) -> List[str]:
        """numastat's ``display_table()`` with zero rows and columns shown."""
        limit = screen_width if screen_width is not None else 10_000_000
        nrows, ncols = len(self.cells), len(self.width)
        hr, hc = self.header_rows, self.header_cols

        def seen(cell) -> bool:
            return cell is not None and not isinstance(cell, _Rep)

        row_seen = [any(seen(self.cells[r][c]) for c in range(hc, ncols)) for r in range(nrows)]
        col_seen = [any(seen(self.cells[r][c]) for r in range(hr, nrows)) for c in range(ncols)]
        if not any(row_seen[hr:]):
            return ["Table has no data."]
        out: List[str] = []
        col = -1
        data_col = hc
        while data_col < ncols:
            if not col_seen[data_col]:
                data_col += 1
                continue
            if col > 0:
                out.append("")
            for row in range(nrows):
                if row >= hr and row not in self.always_rows and not row_seen[row]:
                    continue
                line = "".join(self._cell(row, c) for c in range(hc))
                used = sum(self.width[:hc])
                col = data_col
                while True:
                    if col_seen[col]:
                        line += self._cell(row, col)
                        used += self.width[col]
                    col += 1
                    if col >= ncols or used + self.width[col] > limit:
                        break
                out.append(line)
            data_col = col
        return out


def _system_table(root: str, nodes: Sequence[int], compat: bool, meminfo: bool,
                  width: Optional[int]) -> List[str]:
    """numastat's ``show_info_from_system_file()`` for numastat or meminfo."""
    rows = [(t, t) for t in MEMINFO_ROWS] if meminfo else list(NUMASTAT_ROWS)
    hr = 1 if compat else 2
    ncols = 1 + len(nodes) + (0 if compat else 1)
    t = _Table(hr, 1, hr + len(rows), ncols)
    index = {tok: i for i, (tok, _) in enumerate(rows)}
    for i, (tok, label) in enumerate(rows):
        t.set(hr + i, 0, tok if compat else label)
    t.left[0] = True
    total = 1 + len(nodes)
    for j, nid in enumerate(nodes + ([None] if not compat else [])):
        col = 1 + j
        if nid is None:
            t.set(0, col, "Total")
        else:
            t.set(0, col, f"node{nid}" if compat else f"Node {nid}")
        if not compat:
            t.set(1, col, _Rep("-"))
            t.decimals[col] = 2
        if nid is None:
            break
        if meminfo:
            for line in _node_file(root, nid, "meminfo").splitlines():
                toks = line.replace(":", " ").split()
                if len(toks) < 4 or toks[2] not in index:
                    continue
                value = float(int(toks[3]))
                if toks[2].startswith("HugePages"):
                    value *= HUGE_PAGE_SIZE
                elif len(toks) >= 5 and toks[4] == "kB":
                    value *= 1024
                else:
                    value *= PAGE_SIZE
                value /= MB
                r = hr + index[toks[2]]
                t.set(r, col, value)
                t.add(r, total, value)
        else:
            for tok, value in _kv(_node_file(root, nid, "numastat")).items():
                if tok not in index:
                    continue
                v = float(value) if compat else value * PAGE_SIZE / MB
                r = hr + index[tok]
                t.set(r, col, v)
                if not compat:
                    t.add(r, total, v)
    return t.render(width)


def _region_stat(root: str, name: str) -> dict:
    if not REGION_NAME.fullmatch(name) or name in (".", ".."):
        raise ReportError(f"bad region name {name!r}")
    try:
        return _kv(_read(os.path.join(root, "regions", name, "stat")))
    except (FileNotFoundError, NotADirectoryError):
        raise ReportError(f"no region {name!r} in {root}") from None


def _region_tables(root: str, nodes: Sequence[int], names: Sequence[str],
                   width: Optional[int]) -> List[str]:
    """numastat's ``show_process_info()``, a region standing for a process."""
    stats = [(n, _region_stat(root, n)) for n in names]
    devices: List[str] = []
    for _, st in stats:
        for key in st:
            if key.startswith("private:") and key not in devices:
                devices.append(key)
    columns = [f"Node {n}" for n in nodes] + devices + ["Total"]
    keys = [f"N{n}" for n in nodes] + devices
    single = len(stats) == 1
    data_rows = len(PROCESS_ROWS) if single else len(stats)
    hr = 2
    t = _Table(hr, 1, hr + data_rows + 2, 1 + len(columns))
    total_row = hr + data_rows + 1
    total_col = len(columns)
    t.left[0] = True
    if single:
        for i, label in enumerate(PROCESS_ROWS):
            t.set(hr + i, 0, label)
    else:
        t.set(0, 0, "Region")
        t.set(1, 0, _Rep("-"))
    t.set(total_row, 0, "Total")
    for j, label in enumerate(columns):
        t.set(0, 1 + j, label)
        t.set(1, 1 + j, _Rep("-"))
        t.decimals[1 + j] = 2
    for r in range(hr, hr + data_rows + 2):
        for c in range(1, 1 + len(columns)):
            t.set(r, c, 0.0)
    out: List[str] = []
    if not single:
        out += ["", "Per-node process memory usage (in MBs)"]
    for i, (name, st) in enumerate(stats):
        row = hr + (PROCESS_ROWS.index("Private") if single else i)
        if single:
            out += ["", f"Per-node process memory usage (in MBs) for region {name}"]
        else:
            t.set(row, 0, name)
        for j, key in enumerate(keys):
            mb = st.get(key, 0) * PAGE_SIZE / MB
            for r, c in ((row, 1 + j), (row, total_col), (total_row, 1 + j), (total_row, total_col)):
                t.add(r, c, mb)
    t.auto_width(0, 16, 24)
    t.always_rows.add(total_row - 1)
    for c in range(1 + len(columns)):
        t.set(total_row - 1, c, _Rep("-"))
    return out + t.render(width)


def numastat(mountpoint: str, meminfo: bool = False, nodes_only: bool = False,
             regions: Iterable[str] = (), width: Optional[int] = None) -> str:
    """The tables of ``numastat`` (no option), ``numastat -m`` (``meminfo``),
    ``numastat -n`` (``nodes_only``) and ``numastat -p`` (one per region name,
    or one table for several); ``width`` folds the columns as numastat does on a
    terminal that wide (None: never)."""
    root = _check_mount(mountpoint)
    regions = list(regions)
    nodes = _nodes(root)
    if not nodes:
        raise ReportError(f"{mountpoint}: no nodes under {NODE_DIR}")
    compat = not (meminfo or nodes_only or regions)
    out: List[str] = []
    if regions:
        out += _region_tables(root, nodes, regions, width)
    if meminfo:
        out += ["", "Per-node system memory usage (in MBs):"]
        out += _system_table(root, nodes, False, True, width)
    if nodes_only or (not regions and not meminfo):
        if not compat:
            out += ["", "Per-node numastat info (in MBs):"]
        out += _system_table(root, nodes, compat, False, width)
    return "\n".join(out) + "\n"


def terminal_width() -> Optional[int]:
    """The width numastat folds to: ``NUMASTAT_WIDTH``, else the terminal's
    when stdout is one, else None (no folding, as numastat does for a pipe)."""
    import shutil
    import sys
    env = os.environ.get("NUMASTAT_WIDTH")
    if env is not None:
        try:
            width = int(env)
        except ValueError:
            width = 80
        if not 1 <= width <= 10_000_000:
            width = 80
    elif sys.stdout.isatty():
        width = shutil.get_terminal_size((80, 24)).columns
    else:
        return None
    return max(width, 32)
