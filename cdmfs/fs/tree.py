"""The entries of the mount: directories, attributes, links, and the inode table.

An ``Attr`` is a sysfs attribute in the kernel's DEVICE_ATTR_RO/RW style: a
``show`` that returns the whole file and, if writable, a ``store`` that parses
and applies a write whole or raises (ValueError -> EINVAL, OSError -> its errno).
A ``Transaction`` file keeps state per open file: a write makes a request, a
read on the same open file returns its result (SPEC §6, §7); the result may
be a string or an iterable of strings, rendered as it is read.
"""
from __future__ import annotations

import stat
from typing import Callable, Iterable, Iterator, Optional, Union

Show = Callable[[], Union[str, bytes]]
Store = Callable[[str], None]
# read(offset, size, privileged) -> bytes: a binary file read by slices
Read = Callable[[int, int, bool], bytes]
Response = Callable[[dict], Union[str, Iterable[str]]]


class Entry:
    mode: int = 0
    inode: int = 0
    parent: Optional["Dir"] = None
    name: str = ""
    uid: Optional[int] = None       # owner; None: the user who mounted
    gid: Optional[int] = None
    # [atime, mtime, ctime] in ns once one has moved; None: the mount's time
    times: Optional[list[int]] = None


class Dir(Entry):
    def __init__(self, mode: int = 0o755):
        self.mode = stat.S_IFDIR | mode
        self.children: dict[str, Entry] = {}


class Attr(Entry):
    """A sysfs attribute; mode 0444 without a store, 0644 with one.  A binary
    attribute too large to render whole (pagemap) gives ``read`` instead of
    ``show``: only the slice asked for is built.  ``cache=False``: its content
    changes without any request (the router never serves it from bytes)."""

    def __init__(self, show: Optional[Show], store: Optional[Store] = None, mode: Optional[int] = None,
                 size: Optional[Callable[[], int]] = None, read: Optional[Read] = None,
                 cache: bool = True):
        if mode is None:
            mode = (0o444 if show or read else 0) | (0o200 if store else 0)
        self.mode = stat.S_IFREG | mode
        self.show = show
        self.store = store
        self.size = size
        self.read = read
        # Whether the router may serve it from its rendered bytes (fs/router.py):
        # not for content that moves without a request (the router's own counters).
        self.cache = cache

    @property
    def readable(self) -> bool:
        return self.show is not None or self.read is not None


class Transaction(Entry):
    """A request/response file: ``request(state, text)`` on write, ``response(state)`` on read."""

    def __init__(self, request: Callable[[dict, str], object], response: Response,
                 mode: int = 0o644):
        self.mode = stat.S_IFREG | mode
        self.request = request
        self.response = response


class Pipe(Entry):
    """A stream read as it is written (tracefs' trace_pipe): each open gets
    its reader, ``open_reader(flags)``, whose ``async read(size, pid)`` waits
    for data."""

    def __init__(self, open_reader: Callable[[int], object], mode: int = 0o400):
        self.mode = stat.S_IFREG | mode
        self.open_reader = open_reader


class Link(Entry):
    def __init__(self, target: str):
        self.mode = stat.S_IFLNK | 0o777
        self.target = target


class Tree:
    """Inode numbers for entries; the root is inode 1 (pyfuse3.ROOT_INODE)."""

    def __init__(self):
        self.root = Dir()
        self.root.inode = 1
        self.inodes: dict[int, Entry] = {1: self.root}
        self._next = 2

    def add(self, parent: Dir, name: str, entry: Entry) -> Entry:
        entry.inode = self._next
        self._next += 1
        entry.parent = parent
        entry.name = name
        parent.children[name] = entry
        self.inodes[entry.inode] = entry
        return entry

    def dir(self, parent: Dir, name: str) -> Dir:
        """The subdirectory ``name`` of parent, made if missing."""
        child = parent.children.get(name)
        if child is None:
            child = self.add(parent, name, Dir())
        assert isinstance(child, Dir)
        return child

    def path(self, path: str) -> Dir:
        """The directory at a slash-separated path from the root, made if missing."""
        d = self.root
        for part in path.strip("/").split("/"):
            d = self.dir(d, part)
        return d

    def rename(self, entry: Entry, name: str) -> None:
        """Gives entry a new name in its directory (the name is free)."""
        parent = entry.parent
        assert parent is not None and name not in parent.children
        del parent.children[entry.name]
        entry.name = name
        parent.children[name] = entry

    def remove(self, entry: Entry) -> None:
        """Removes an entry and everything below it."""
        for e in list(walk(entry)):
            self.inodes.pop(e.inode, None)
        if entry.parent is not None:
            del entry.parent.children[entry.name]


def walk(entry: Entry) -> Iterator[Entry]:
    yield entry
    if isinstance(entry, Dir):
        for child in entry.children.values():
            yield from walk(child)
