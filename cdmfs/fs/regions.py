"""The files of ``regions/NAME/`` (SPEC §6): one show/store per file."""
from __future__ import annotations

import errno
import stat
from typing import Callable, Optional

from ..config import PAGE_SIZE
from ..mm import advice as adv
from ..mm import gup
from ..mm import mempolicy as mpol
from ..mm import migrate_device as migrate
from ..mm.machine import Machine
from ..mm.region import Region
from . import formats
from .tree import Attr, Dir, Entry, Transaction, Tree, walk

ADVICE = ("pin", "unpin", "remove", "preferred_location:TARGET", "accessed_by:DEVICE", "read_mostly",
          "prefetch:TARGET", "unset:ADVICE")


class DataFile(Entry):
    """``data``: the region's memory, served through the page cache."""

    def __init__(self, region: Region):
        self.mode = stat.S_IFREG | 0o644
        self.region = region


class RegionDir(Dir):
    def __init__(self, region: Region):
        super().__init__()
        self.region = region


def parse_range(region: Region, start: str, length: str) -> tuple[int, int]:
    """START LENGTH in bytes (decimal or 0x), page aligned, inside the file:
    the first page and the page count."""
    try:
        a, n = int(start, 0), int(length, 0)
    except ValueError:
        raise ValueError("START and LENGTH are byte counts (decimal or 0x hex)") from None
    if a < 0 or n <= 0 or a % PAGE_SIZE or n % PAGE_SIZE:
        raise ValueError(f"START and LENGTH must be page aligned ({PAGE_SIZE}) and LENGTH positive")
    if a + n > region.npages * PAGE_SIZE:
        raise ValueError("range beyond the end of the region")
    return a // PAGE_SIZE, n // PAGE_SIZE


async def migrate_request(m: Machine, region: Region, state: dict, text: str) -> None:
    """``START LENGTH TARGET``: migrate_vma / move_pages of the range."""
    words = text.split()
    if len(words) != 3:
        raise ValueError("expected START LENGTH TARGET")
    first, n = parse_range(region, words[0], words[1])
    target = m.target(words[2])
    state["result"] = await migrate.migrate_range(m, region, first, n, target)


async def policy_store(m: Machine, region: Region, text: str) -> None:
    policy = mpol.parse(text, list(m.nodes), memory_nodes=m.memory_nodes())
    async with region.policy_lock:      # not in the middle of an mbind's moves
        region.policy = policy


MBIND_FLAGS = ("move", "strict")


async def mbind_request(m: Machine, region: Region, text: str) -> None:
    """``START LENGTH POLICY [move] [strict]``: mbind(2) of the range.  Parsed
    whole first: a bad request (EINVAL) changes nothing."""
    words = text.split()
    if len(words) < 3:
        raise ValueError("expected START LENGTH POLICY [move] [strict]")
    first, n = parse_range(region, words[0], words[1])
    policy = mpol.parse(words[2], list(m.nodes), memory_nodes=m.memory_nodes())
    flags = words[3:]
    for flag in flags:
        if flag not in MBIND_FLAGS:
            raise ValueError(f"unknown mbind flag {flag!r} (expected move or strict)")
    await region.mbind(first, n, policy, move="move" in flags, strict="strict" in flags)


def numa_maps(region: Region) -> str:
    """The ``numa_maps`` file: a /proc/PID/numa_maps line per policy range
    (show_numa_map() in fs/proc/task_mmu.c), the file offset as address."""
    m = region.machine
    lines = []
    for s, e, pol in region.policy_segments(0, region.npages):
        present, dirty = region.census(s, e)
        words = [f"{s * PAGE_SIZE:08x}", mpol.kernel_str(pol)]
        nodes = [(nid, present[node.pool]) for nid, node in sorted(m.nodes.items())]
        private = [(name, present[p.pool]) for name, p in m.private.items()]
        anon = sum(c for _, c in nodes)
        ndirty = sum(dirty[node.pool] for node in m.nodes.values())
        if anon or any(c for _, c in private):
            if anon:
                words.append(f"anon={anon}")
            if ndirty:
                words.append(f"dirty={ndirty}")
            words += [f"N{nid}={c}" for nid, c in nodes if c]
            words += [f"private:{name}={c}" for name, c in private if c]
            words.append(f"kernelpagesize_kB={PAGE_SIZE // 1024}")
        lines.append(" ".join(words) + "\n")
    return "".join(lines)


def mbind_text(region: Region) -> str:
    """The ``mbind`` file: ``START LENGTH POLICY`` per range, in bytes (decimal)."""
    return "".join(f"{s * PAGE_SIZE} {(e - s) * PAGE_SIZE} {pol}\n" for s, e, pol in region.ranges)


def pagemap_read(region: Region, off: int, size: int, privileged: bool) -> bytes:
    """A slice of ``pagemap``: only the entries asked for are built.  As the
    kernel does without CAP_SYS_ADMIN, the frame field (PFN, or swap type and
    offset) reads as 0 to everyone but root."""
    if off % 8 or size % 8:
        raise OSError(errno.EINVAL, "pagemap is read in whole 8-byte entries")
    first = off // 8
    n = min(size // 8, max(region.npages - first, 0))
    with region.hold():
        return region.pagemap(first, n, show_pfn=privileged)


def parse_advice(m: Machine, word: str) -> tuple[str, object]:
    """An ADVICE word: (what, argument), checked whole.  ValueError for an
    unknown advice, target or device; ENODEV for an offline target."""
    kind, sep, arg = word.partition(":")
    if kind in ("pin", "unpin", "remove", adv.READ_MOSTLY) and not sep:
        return kind, None
    if kind in (adv.PREFERRED, "prefetch") and sep:
        pgmap = m.pgmaps.get(arg)
        if pgmap is not None and pgmap.spec.coherent:
            arg = f"node:{pgmap.spec.node}"        # a coherent device: its node
        return kind, m.target(arg)
    if kind == adv.ACCESSED_BY and sep:
        if arg not in m.pgmaps:
            raise ValueError(f"no device {arg!r}")
        return kind, arg
    if kind == "unset" and sep:
        what, sep2, dev = arg.partition(":")
        if what in (adv.PREFERRED, adv.READ_MOSTLY) and not sep2:
            return kind, what
        if what == adv.ACCESSED_BY and (not sep2 or dev in m.pgmaps):
            return kind, arg
        raise ValueError(f"cannot unset {arg!r} (preferred_location, accessed_by[:DEVICE], read_mostly)")
    raise ValueError(f"unknown advice {word!r} (expected one of {', '.join(ADVICE)})")


async def advise_store(m: Machine, region: Region, text: str) -> None:
    """``START LENGTH ADVICE`` (SPEC §6.3), parsed whole first: a bad request
    (EINVAL) changes nothing."""
    words = text.split()
    if len(words) != 3:
        raise ValueError("expected START LENGTH ADVICE")
    first, n = parse_range(region, words[0], words[1])
    what, arg = parse_advice(m, words[2])
    end = first + n
    if what == "pin":
        await gup.pin(m, region, first, n)
    elif what == "unpin":
        gup.unpin(m, region, first, n)
    elif what == "remove":
        # madvise(MADV_REMOVE): the range's pages are freed and read zero.
        await region.punch(first * PAGE_SIZE, n * PAGE_SIZE)
    elif what == "prefetch":
        # Returns at once; the region's stat shows progress and completion.
        await m.spawn(adv.prefetch, m, region, first, n, arg)
    elif what == adv.PREFERRED:
        region.advice.set(adv.PREFERRED, first, end, arg.name)
    elif what == adv.ACCESSED_BY:
        region.advice.set(f"{adv.ACCESSED_BY}:{arg}", first, end, True)
    elif what == adv.READ_MOSTLY:
        region.advice.set(adv.READ_MOSTLY, first, end, True)
    else:
        region.advice.unset(arg, first, end)
    if what not in ("pin", "unpin", "remove", "prefetch"):
        region.publish_policies()       # preferred_location: the core leaves those fault-backs to Python
    m.events.emit("advise", region=region, first=first, n=n, what=what, arg=arg)


def advise_show(m: Machine, region: Region) -> str:
    """Every advice of the region, a line per range: ``START LENGTH ADVICE...``."""
    pins = [(a, a + k, "pin") for a, k in gup.pinned_ranges(m, region)]
    return "".join(f"{a * PAGE_SIZE} {(b - a) * PAGE_SIZE} {' '.join(words)}\n"
                   for a, b, words in region.advice.listing(pins))


def owner_pid_store(region: Region, watch: Callable[[Region, int], None], text: str) -> None:
    """``owner_pid``: a process the region belongs to (``cdmfs run``); the
    region goes once that process has ended and its data is closed."""
    try:
        pid = int(text.strip(), 10)
    except ValueError:
        raise ValueError("expected a process id") from None
    if pid <= 0:
        raise ValueError("expected a process id")
    watch(region, pid)


def add_region(tree: Tree, parent: Dir, m: Machine, region: Region, uid: int = 0, gid: int = 0,
               watch: Optional[Callable[[Region, int], None]] = None) -> RegionDir:
    """The files of a region, owned by its creator: the directory 0700 and
    data 0600, as a process's memory is its own.  watch(region, pid) ties
    the region's life to a process (``owner_pid``)."""
    d = tree.add(parent, region.name, RegionDir(region))
    tree.add(d, "data", DataFile(region))
    tree.add(d, "policy", Attr(lambda: f"{region.policy}\n", lambda text: policy_store(m, region, text)))
    tree.add(d, "stat", Attr(lambda: formats.kv_lines(region.stat())))
    tree.add(d, "mbind", Transaction(lambda state, text: mbind_request(m, region, text),
                                     lambda state: mbind_text(region)))
    tree.add(d, "numa_maps", Attr(lambda: numa_maps(region)))
    tree.add(d, "pagemap", Attr(None, size=lambda: region.npages * 8,
                                read=lambda off, size, privileged: pagemap_read(region, off, size, privileged)))
    tree.add(d, "migrate", Transaction(lambda state, text: migrate_request(m, region, state, text),
                                       lambda state: state["result"].lines() if "result" in state else ""))
    tree.add(d, "advise", Attr(lambda: advise_show(m, region), lambda text: advise_store(m, region, text)))
    if watch is not None:
        tree.add(d, "owner_pid", Attr(lambda: f"{region.owner_pid}\n",
                                      lambda text: owner_pid_store(region, watch, text)))
    for entry in walk(d):
        entry.uid, entry.gid = uid, gid
    d.mode = stat.S_IFDIR | 0o700
    d.children["data"].mode = stat.S_IFREG | 0o600
    return d
