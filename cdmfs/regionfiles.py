"""The files of ``regions/NAME/`` (SPEC §6): one show/store per file."""
from __future__ import annotations

import stat

from . import formats
from . import policy as mpol
from .machine import Machine
from .region import Region
from .tree import Attr, Dir, Entry, Tree


class DataFile(Entry):
    """``data``: the region's memory, served through the page cache."""

    def __init__(self, region: Region):
        self.mode = stat.S_IFREG | 0o644
        self.region = region


class RegionDir(Dir):
    def __init__(self, region: Region):
        super().__init__()
        self.region = region


def policy_store(m: Machine, region: Region, text: str) -> None:
    region.policy = mpol.parse(text, list(m.nodes))


def add_region(tree: Tree, parent: Dir, m: Machine, region: Region) -> RegionDir:
    d = tree.add(parent, region.name, RegionDir(region))
    tree.add(d, "data", DataFile(region))
    tree.add(d, "policy", Attr(lambda: f"{region.policy}\n", lambda text: policy_store(m, region, text)))
    tree.add(d, "stat", Attr(lambda: formats.kv_lines(region.stat())))
    return d
