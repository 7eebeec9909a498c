"""Where memory lives on a mount, read from its files as a user would.

A place is what the trace lines call it: a node's number (``"0"``) or a
device's name for its private memory (``"gpu0"``); a coherent device's memory
is its node.  ``cdmfs trace`` titles its tracks with these, ``cdmfs top``
draws their bars and decodes pagemap frames into them.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Optional

from ..client import MEMORY_DIR, NODE_DIR
from ..client import _read as read


def meminfo(path: str) -> dict[str, int]:
    """A meminfo file, a node's (``Node 0 MemTotal: ... kB``) or a device's, in kB."""
    out = {}
    try:
        text = read(path)
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        words = value.split()
        if key and words and words[0].isdigit():
            out[key.split()[-1]] = int(words[0])
    return out


def kv(path: str) -> dict[str, int]:
    """A ``key value`` file (vmstat, a device's stat); {} if unreadable."""
    out = {}
    try:
        text = read(path)
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if value.lstrip("-").isdigit():
            out[key.strip()] = int(value)
    return out


@dataclass
class Place:
    name: str           # as the trace names it: "0", "gpu0"
    title: str          # "node 1 (CDM, cdm0's memory)"
    meminfo: str        # its meminfo file


@dataclass
class Device:
    name: str
    kind: str           # "private" or "coherent"
    node: Optional[int]  # a coherent device's node


def nodes(mountpoint: str) -> list[int]:
    names = os.listdir(os.path.join(mountpoint, NODE_DIR))
    return sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())


def devices(mountpoint: str) -> list[Device]:
    out = []
    base = os.path.join(mountpoint, "devices")
    for name in sorted(os.listdir(base)):
        try:
            kind = read(os.path.join(base, name, "type")).strip()
            node = int(read(os.path.join(base, name, "node")).strip())
        except (OSError, ValueError):
            continue
        out.append(Device(name, kind, node if node >= 0 else None))
    return out


def places(mountpoint: str) -> list[Place]:
    """Nodes by number, then the devices with private memory."""
    devs = devices(mountpoint)
    owners = {d.node: d.name for d in devs if d.kind != "private" and d.node is not None}
    out = []
    for nid in nodes(mountpoint):
        what = f"CDM, {owners[nid]}'s memory" if nid in owners else "system RAM"
        out.append(Place(str(nid), f"node {nid} ({what})",
                         os.path.join(mountpoint, NODE_DIR, f"node{nid}", "meminfo")))
    for d in devs:
        if d.kind == "private":
            out.append(Place(d.name, f"{d.name} (device-private memory)",
                             os.path.join(mountpoint, "devices", d.name, "meminfo")))
    return out


class FrameMap:
    """Which place a frame (PFN) is in: node memory by its memory blocks,
    device-private memory by the device's ``resource`` range."""

    def __init__(self, mountpoint: str):
        block_bytes = int(read(os.path.join(mountpoint, MEMORY_DIR, "block_size_bytes")).strip(), 16)
        self.block_pages = block_bytes // 4096
        self.block_node: dict[int, str] = {}
        for nid in nodes(mountpoint):
            d = os.path.join(mountpoint, NODE_DIR, f"node{nid}")
            for n in os.listdir(d):
                if n.startswith("memory") and n[6:].isdigit():
                    self.block_node[int(n[6:])] = str(nid)
        ranges = []
        for dev in devices(mountpoint):
            if dev.kind == "private":
                try:
                    a, b = (int(w, 16) for w in read(os.path.join(mountpoint, "devices", dev.name,
                                                                    "resource")).split())
                except (OSError, ValueError):
                    continue
                ranges.append((a // 4096, b // 4096, dev.name))
        ranges.sort()
        self.starts = [r[0] for r in ranges]
        self.ranges = ranges

    def node(self, pfn: int) -> Optional[str]:
        return self.block_node.get(pfn // self.block_pages)

    def device(self, pfn: int) -> Optional[str]:
        i = bisect.bisect_right(self.starts, pfn) - 1
        if i >= 0 and self.ranges[i][0] <= pfn <= self.ranges[i][1]:
            return self.ranges[i][2]
        return None
