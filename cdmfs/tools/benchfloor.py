"""The floor under every cdmfs figure: a pyfuse3 filesystem on trio that does
nothing but answer, mounted by ``cdmfs bench`` as a reference.

``dN`` (any N) is a file whose READs return zeros and whose WRITEs are
dropped, kept in the page cache like a region's data (a new N, a cold cache);
``attr`` is a small direct_io file like a sysfs attribute.  What cdmfs costs above these is cdmfs; what these cost
above a C FUSE filesystem (bindfs) is pyfuse3 and trio.

    python -m cdmfs.tools.benchfloor MOUNTPOINT SIZE
"""
from __future__ import annotations

import errno
import stat
import sys

import pyfuse3
import trio

ATTR, DATA = 2, 16     # data files dN are inodes DATA + N
ATTR_TEXT = b"Node 1 MemTotal:        1048576 kB\n" * 36


class Floor(pyfuse3.Operations):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = stat.S_IFDIR | 0o755 if inode == pyfuse3.ROOT_INODE else stat.S_IFREG | 0o644
        a.st_size = self.size if inode >= DATA else 4096
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b"attr":
            return await self.getattr(ATTR)
        if name[:1] == b"d" and name[1:].isdigit():
            return await self.getattr(DATA + int(name[1:]))
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and inode >= DATA:
            self.size = attr.st_size
        return await self.getattr(inode)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=inode >= DATA, direct_io=inode == ATTR)

    async def read(self, fh, off, size):
        if fh == ATTR:
            return ATTR_TEXT[off:off + size]
        return bytes(max(0, min(size, self.size - off)))

    async def write(self, fh, off, buf):
        return len(buf)

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)


def main() -> None:
    mountpoint, size = sys.argv[1], int(sys.argv[2])
    pyfuse3.init(Floor(size), mountpoint, set(pyfuse3.default_options) | {"fsname=cdmfs-floor"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
