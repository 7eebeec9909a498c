"""pyfuse3 Operations: inodes, files and dispatch.  Knows entries, not memory policy.

Attribute and transaction files are opened with direct_io so every read
reaches the daemon (no stale page cache); region data files keep the page
cache, because that cache *is* the CPU's page table (DESIGN §1, §2).
"""
from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

import pyfuse3
import trio

from .._core import lib
from ..config import PAGE_SIZE
from ..mm.machine import Machine
from ..mm.region import Region, Regions
from .regions import DataFile, RegionDir, add_region
from .tree import Attr, Dir, Entry, Link, Pipe, Transaction, Tree

log = logging.getLogger(__name__)

ATTR_SIZE = 4096          # what sysfs reports for every attribute
MAX_CONTROL_WRITE = 4096  # a control write is one page at most, as sysfs takes
TIMEOUT = 300.0           # entries and attributes change only through us
# Control requests that wait (migrations, offlining, device access) run at
# most WAITING_RUNS at a time; WAITING_QUEUE more may wait their turn and any
# further one gets EAGAIN, so they never take the readers the kernel's
# write-back and the faults need (daemon.MAX_TASKS).
WAITING_RUNS = 8
WAITING_QUEUE = 1024
INODES = 1 << 20          # statfs's total inodes (more when more exist)
WRITEBACK_MIN_PAGES = 16  # an invalidation this long writes the range back first
RELATIME_NS = 24 * 3600 * 10**9
RENAME_NOREPLACE = 1      # renameat2(2)'s flags
SEEK_DATA, SEEK_HOLE = 3, 4
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
# Handlers pyfuse3 has no slot for: the router's side channel calls them
# (fs/router.py), with the same guard.
SIDE_HANDLERS = ("lseek", "fallocate")
# Handlers that change nothing an attribute shows.  Around every other one
# (and around open/read/release of anything but a plain attribute file) the
# router's attribute cache is told a change began and ended: bytes rendered
# before or meanwhile are not served from C (fs/router.py).
UNCHANGING = frozenset({"lookup", "getattr", "readdir", "opendir", "releasedir", "statfs",
                        "readlink", "flush", "fsync", "fsyncdir", "access", "getxattr",
                        "listxattr", "forget", "lseek"})


class Answer:
    """A transaction's answer, rendered as it is read: a migration's holes or
    a snapshot of a large range never sit in memory whole."""

    def __init__(self, text: Union[str, Iterable[str]]):
        self._chunks: Iterator[str] = iter((text,) if isinstance(text, str) else text)
        self._buf = bytearray()

    def read(self, size: int) -> bytes:
        while len(self._buf) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk.encode()
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out


@dataclass
class OpenFile:
    entry: Entry
    pid: int
    uid: int
    writable: bool
    region: Optional[Region] = None      # the region whose file it is (a reference)
    content: bytes = b""
    state: dict = field(default_factory=dict)
    answer: Optional[Answer] = None      # a transaction's answer, being read
    write_end: Optional[int] = None      # where the last control write ended
    internal: bool = False               # opened by the daemon itself (see open)


def fuse_error(e: BaseException) -> pyfuse3.FUSEError:
    if isinstance(e, OSError) and e.errno:
        return pyfuse3.FUSEError(e.errno)
    return pyfuse3.FUSEError(errno.EINVAL)


def region_of(e: Entry) -> Optional[Region]:
    """The region an entry belongs to (its data file or a control file)."""
    if isinstance(e, (DataFile, RegionDir)):
        return e.region
    if isinstance(e.parent, RegionDir):
        return e.parent.region
    return None


def plain_attr(e: Optional[Entry]) -> bool:
    """An attribute file whose show() only looks (not a region's: opening
    one holds the region)."""
    return isinstance(e, Attr) and region_of(e) is None


def cacheable(e: Entry) -> bool:
    """Whether the router may serve e from its rendered bytes: a plain
    attribute with a show(), rendered whole, that asked to be."""
    return plain_attr(e) and e.cache and e.show is not None and e.read is None and e.size is None


def never_fatal(cls: type) -> type:
    """Wraps every request handler of cls so that no request can end the
    daemon: pyfuse3 ends its loop on any exception but FUSEError, so anything
    unexpected (MemoryError included) fails that one request with EIO and is
    logged with its traceback.  Each request first applies the fault-backs
    the router served in C (Machine.apply_faultbacks): nothing Python shows
    or decides is behind the core's page tables."""
    def guard(name: str, handler):
        @functools.wraps(handler)
        async def guarded(self, *args):
            rt = self.router
            changes = rt is not None and self._changes(name, args)
            if changes:
                rt.attr_begin()
            try:
                self.machine.apply_faultbacks()
                return await handler(self, *args)
            except pyfuse3.FUSEError:
                raise
            except Exception:
                try:
                    log.exception("%s failed; the request gets EIO", name)
                except Exception:       # no memory even to log: still answer
                    pass
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                if changes:
                    rt.attr_end()
        return guarded

    for name, handler in list(vars(cls).items()):
        if inspect.iscoroutinefunction(handler) and (hasattr(pyfuse3.Operations, name)
                                                      or name in SIDE_HANDLERS):
            setattr(cls, name, guard(name, handler))
    return cls


@never_fatal
class Filesystem(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, machine: Machine, tree: Tree, regions: Regions):
        super().__init__()
        self.machine = machine
        self.tree = tree
        self.regions = regions
        self.regions_dir = tree.dir(tree.root, "regions")
        # Like /tmp: anyone may create a region, only its owner (or root) remove it.
        self.regions_dir.mode = stat.S_IFDIR | 0o1777
        tree.dir(tree.root, "devices")
        self.files: dict[int, OpenFile] = {}
        self.data_inodes: dict[int, int] = {}      # region id -> inode of its data
        self._next_fh = 1
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mount_ns = time.time_ns()
        self.fuse_fd: Optional[int] = None
        self.mountpoint: Optional[str] = None   # where it is mounted (set by the daemon)
        # Mounted through the router (fs/router.py): INIT lost
        # FUSE_AUTO_INVAL_DATA there, so a data file's mtime may move.
        self.routed = False
        self.router = None      # fs/router.Router when routed: serves placed data in C
        self.attr_registered: set[int] = set()   # inodes the router's attribute cache knows
        self.waiting = trio.CapacityLimiter(WAITING_RUNS)
        # An invalidation blocks its thread until the kernel's write-back is
        # served; trio's shared pool (40) must not be what bounds them.
        self.unmap_threads = trio.CapacityLimiter(WAITING_QUEUE)
        machine.cpu_unmapper = self.cpu_unmap
        machine.cpu_writer = self.cpu_write_back

    # ------------------------------------------------------------ inodes

    def _entry(self, inode: int) -> Entry:
        try:
            return self.tree.inodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _fold_served_times(self, e: Entry) -> None:
        """The READs and WRITEs of a data file the router served in C move
        its times as Python's would have (write: mtime and ctime; read:
        atime under relatime)."""
        if self.router is None or not isinstance(e, DataFile):
            return
        read_ns, write_ns = self.router.data_times(e.inode)
        if not (read_ns or write_ns):
            return
        times = e.times = e.times or [self.mount_ns] * 3
        if write_ns > times[1]:
            times[1] = times[2] = max(write_ns, times[2])
        if read_ns > times[0] and (times[0] <= max(times[1], times[2]) or
                                   read_ns - times[0] > RELATIME_NS):
            times[0] = read_ns

    def _changes(self, name: str, args: tuple) -> bool:
        """Whether handler name with args may change what an attribute shows."""
        if name in UNCHANGING:
            return False
        if name == "open":
            return not plain_attr(self.tree.inodes.get(args[0]))
        if name in ("read", "release"):
            of = self.files.get(args[0])
            # A pipe's read waits for lines that change no attribute.
            return of is None or not (plain_attr(of.entry) or isinstance(of.entry, Pipe))
        return True

    def _attr_stamp(self, e: Entry):
        """The router's stamp before rendering e, if its cache knows e."""
        if self.router is None or e.inode not in self.attr_registered:
            return None
        return self.router.attr_stamp()

    def attr_render(self, inode: int) -> bytes:
        """Renders an attribute file the router serves and publishes it (the
        router's side channel: its bytes were stale)."""
        e = self.tree.inodes.get(inode)
        if not isinstance(e, Attr) or e.show is None:
            raise OSError(errno.ENOENT, "no such attribute")
        stamp = self._attr_stamp(e)
        try:
            text = e.show()
        except (OSError, ValueError) as err:
            raise OSError(fuse_error(err).errno, str(err)) from None
        data = text.encode() if isinstance(text, str) else bytes(text)
        if stamp is not None:
            self.router.attr_publish(inode, stamp, data)
        return data

    def _attrs(self, e: Entry) -> pyfuse3.EntryAttributes:
        self._fold_served_times(e)
        a = pyfuse3.EntryAttributes()
        a.st_ino = e.inode
        a.st_mode = e.mode
        # As sysfs: a directory has 2 links plus one per subdirectory.
        a.st_nlink = 2 + sum(isinstance(c, Dir) for c in e.children.values()) if isinstance(e, Dir) else 1
        a.st_uid = self.uid if e.uid is None else e.uid
        a.st_gid = self.gid if e.gid is None else e.gid
        a.st_blksize = PAGE_SIZE
        if isinstance(e, DataFile):
            a.st_size = e.region.size
            a.st_blocks = e.region.pages_placed() * (PAGE_SIZE // 512)
        elif isinstance(e, Attr):
            a.st_size = e.size() if e.size else ATTR_SIZE
        elif isinstance(e, Transaction):
            a.st_size = ATTR_SIZE
        elif isinstance(e, Link):
            a.st_size = len(e.target)
        else:
            a.st_size = 0
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = e.times or (self.mount_ns,) * 3
        a.attr_timeout = a.entry_timeout = TIMEOUT
        if self.router is not None and isinstance(e, Attr) and \
                (e.times is not None or e.inode not in self.attr_registered) and cacheable(e):
            # The router answers its OPEN, READ, RELEASE and GETATTR from now on.
            self.attr_registered.add(e.inode)
            self.router.attr_register(e.inode, a.st_mode, a.st_uid, a.st_gid, a.st_size,
                                      (a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns))
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._entry(parent_inode)
        if not isinstance(parent, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        name = os.fsdecode(name)
        if name == ".":
            return self._attrs(parent)
        if name == "..":
            return self._attrs(parent.parent or parent)
        child = parent.children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(child)

    async def getattr(self, inode, ctx=None):
        return self._attrs(self._entry(inode))

    def _touch(self, e: Entry, atime: bool = False, mtime: bool = False, ctime: bool = False) -> None:
        """Moves e's times to now, as tmpfs does on a change."""
        now = time.time_ns()
        times = e.times = e.times or [self.mount_ns] * 3
        for k, moved in enumerate((atime, mtime, ctime)):
            if moved:
                times[k] = now

    def _accessed(self, e: Entry) -> None:
        """relatime: a read moves atime only past an older mtime or ctime,
        or once a day."""
        times = e.times
        if times is None or times[0] <= max(times[1], times[2]) or \
                time.time_ns() - times[0] > RELATIME_NS:
            self._touch(e, atime=True)

    async def setattr(self, inode, attr, fields, fh, ctx):
        e = self._entry(inode)
        self._fold_served_times(e)      # before times given here replace them
        if fields.update_size:
            if not isinstance(e, DataFile):
                # sysfs attributes ignore O_TRUNC; only data has a size.
                if attr.st_size != 0:
                    raise pyfuse3.FUSEError(errno.EINVAL)
            else:
                try:
                    await e.region.truncate(attr.st_size)
                except OSError as err:
                    raise fuse_error(err) from None
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and isinstance(e, DataFile):
            self._touch(e, mtime=True, ctime=True)
        if fields.update_atime or fields.update_mtime:
            # utimensat(2): the times given (UTIME_NOW arrives as now), ctime now.
            self._touch(e, ctime=True)
            if fields.update_atime:
                e.times[0] = attr.st_atime_ns
            if fields.update_mtime:
                e.times[1] = attr.st_mtime_ns
        if fields.update_ctime:
            self._touch(e)
            e.times[2] = attr.st_ctime_ns
        return self._attrs(e)

    async def readlink(self, inode, ctx):
        e = self._entry(inode)
        if not isinstance(e, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(e.target)

    async def opendir(self, inode, ctx):
        if not isinstance(self._entry(inode), Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        d = self._entry(fh)
        for i, (name, child) in enumerate(list(d.children.items())):
            if i < start_id:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(child), i + 1):
                return

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        pages = [self.machine.node_pages(n) for n in self.machine.nodes]
        s.f_bsize = s.f_frsize = PAGE_SIZE
        s.f_blocks = sum(p["total"] for p in pages)
        s.f_bfree = s.f_bavail = sum(p["free"] for p in pages)
        # Inodes as tmpfs counts them: used + free = total, never negative.
        used = len(self.tree.inodes)
        s.f_files = max(INODES, used)
        s.f_ffree = s.f_favail = s.f_files - used
        s.f_namemax = 64
        return s

    # ------------------------------------------------------------ regions

    async def mkdir(self, parent_inode, name, mode, ctx):
        if parent_inode != self.regions_dir.inode:
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            region = self.regions.create(os.fsdecode(name), owner=ctx.uid)
        except OSError as e:
            raise fuse_error(e) from None
        log.info("region %s created by uid %d", region.name, ctx.uid)
        d = add_region(self.tree, self.regions_dir, self.machine, region, ctx.uid, ctx.gid,
                       watch=self.watch_owner)
        self.data_inodes[region.id] = d.children["data"].inode
        if self.router is not None:
            self.router.map_data(d.children["data"].inode, self.machine.core, region.core)
        self._touch(self.regions_dir, mtime=True, ctime=True)
        return self._attrs(d)

    async def rmdir(self, parent_inode, name, ctx):
        if parent_inode != self.regions_dir.inode:
            raise pyfuse3.FUSEError(errno.EPERM)
        entry = self.regions_dir.children.get(os.fsdecode(name))
        if not isinstance(entry, RegionDir):
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._remove_region(entry)

    def _remove_region(self, entry: RegionDir) -> None:
        """rmdir of a region's directory (EBUSY, as FUSEError, while its
        data is open or mapped)."""
        ino = self.data_inodes.get(entry.region.id)
        if self.router is not None and ino is not None:
            # Before the native region can be freed: the router stops using it.
            self.router.unmap_data(ino)
        try:
            self.regions.remove(entry.region.name)
        except OSError as e:
            if self.router is not None and ino is not None and not entry.region.removed:
                self.router.map_data(ino, self.machine.core, entry.region.core)
            raise fuse_error(e) from None
        self.tree.remove(entry)
        self.data_inodes.pop(entry.region.id, None)
        self._touch(self.regions_dir, mtime=True, ctime=True)
        log.info("region %s removed", entry.region.name)

    # ------------------------------------------------------------ owned regions (cdmfs run)

    def watch_owner(self, region: Region, pid: int) -> None:
        """Ties region to process pid (its ``owner_pid``): once the process
        has ended -- exit, exec's failure, kill -9 -- and the kernel has
        released its mappings of the data file, the region is removed, as
        the kernel frees a process's anonymous memory.  The watch is a
        pidfd; writing another pid moves it (a fork child taking over the
        snapshot its parent made)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            raise OSError(e.errno, f"no process {pid}") from None
        region.owner_pid = pid
        region.owner_gone = False
        token = object()
        region.owner_watch = token

        async def watch() -> None:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            if region.owner_watch is token and not region.removed:
                log.info("region %s: process %d ended", region.name, pid)
                region.owner_gone = True
                self._reap(region)
        trio.lowlevel.spawn_system_task(watch, name=f"owner {pid} of region {region.name}")

    def _reap(self, region: Region) -> None:
        """Removes a region whose owner has ended, now or at the last release
        of its data (the kernel releases a dead process's mappings after it
        is gone)."""
        if region.removed or not region.owner_gone or region.opens:
            return
        entry = self.regions_dir.children.get(region.name)
        if not isinstance(entry, RegionDir) or entry.region is not region:
            return
        try:
            self._remove_region(entry)
        except pyfuse3.FUSEError as e:
            log.warning("region %s of ended process %d: cannot remove it (errno %d)",
                        region.name, region.owner_pid, e.errno)
            return
        # Nobody's rmdir: the kernel's cached dentry must go too.
        try:
            pyfuse3.invalidate_entry_async(self.regions_dir.inode, os.fsencode(region.name),
                                           deleted=entry.inode)
        except Exception:   # the mount is going away
            log.debug("region %s: cannot invalidate its entry", region.name, exc_info=True)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        """A region's directory may take a new name within regions/ (its
        owner or root, the directory being sticky); nothing else moves."""
        if parent_inode_old != self.regions_dir.inode or parent_inode_new != self.regions_dir.inode:
            raise pyfuse3.FUSEError(errno.EPERM if parent_inode_old == parent_inode_new else errno.EXDEV)
        entry = self.regions_dir.children.get(os.fsdecode(name_old))
        if not isinstance(entry, RegionDir):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if ctx.uid not in (0, entry.region.owner):
            raise pyfuse3.FUSEError(errno.EPERM)
        if flags & ~RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)     # exchange, whiteout: not for regions
        new = os.fsdecode(name_new)
        if new == entry.name:
            return
        if new in self.regions_dir.children:
            raise pyfuse3.FUSEError(errno.EEXIST if flags & RENAME_NOREPLACE else errno.ENOTEMPTY)
        try:
            self.regions.rename(entry.name, new)
        except OSError as e:
            raise fuse_error(e) from None
        log.info("region %s renamed %s", entry.name, new)
        self.tree.rename(entry, new)
        self._touch(entry, ctime=True)
        self._touch(self.regions_dir, mtime=True, ctime=True)
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EACCES)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # ------------------------------------------------------------ files

    async def open(self, inode, flags, ctx):
        e = self._entry(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if isinstance(e, Dir):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if isinstance(e, Attr):
            # As kernfs does: no store means no write, even for root; no show, no read.
            if writable and e.store is None:
                raise pyfuse3.FUSEError(errno.EACCES)
            if (flags & os.O_ACCMODE) != os.O_WRONLY and not e.readable:
                raise pyfuse3.FUSEError(errno.EACCES)
        if isinstance(e, Pipe):
            if writable:
                raise pyfuse3.FUSEError(errno.EACCES)
            fh = self._next_fh
            self._next_fh += 1
            self.files[fh] = OpenFile(e, ctx.pid, ctx.uid, False, state={"reader": e.open_reader(flags)})
            return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=True)
        region = region_of(e)
        if region is not None:
            try:
                region.get()
            except OSError as err:
                raise fuse_error(err) from None
        of = OpenFile(e, ctx.pid, ctx.uid, writable, region)
        if isinstance(e, DataFile):
            if flags & os.O_TRUNC and writable:
                # libfuse enables atomic O_TRUNC: the truncation is ours to do.
                try:
                    await e.region.truncate(0)
                except OSError as err:
                    region.put()
                    raise fuse_error(err) from None
            # The daemon's own descriptor (the range write-back before an
            # invalidation) does not hold the region open: rmdir may go on.
            of.internal = os.path.exists(f"/proc/self/task/{ctx.pid}")
            if not of.internal:
                e.region.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = of
        if isinstance(e, DataFile):
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def release(self, fh):
        of = self.files.pop(fh, None)
        if of is None or of.region is None:
            return
        if isinstance(of.entry, DataFile) and not of.internal:
            of.region.opens -= 1
        of.region.put()
        if of.region.owner_gone:
            self._reap(of.region)

    async def flush(self, fh):
        # Nothing to do on close(): ENOSYS tells the kernel never to ask again,
        # which saves every close() a round trip.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh, datasync):
        pass   # a WRITE has already landed in the page's frame

    def _open_file(self, fh: int) -> OpenFile:
        of = self.files[fh]
        if of.region is not None and of.region.removed:
            # A control file held open across rmdir: the region is gone.
            raise pyfuse3.FUSEError(errno.ENOENT)
        return of

    async def read(self, fh, off, size):
        of = self._open_file(fh)
        e = of.entry
        try:
            if isinstance(e, DataFile):
                self._accessed(e)
                return await e.region.fault(off, size, of.pid)
            if isinstance(e, Pipe):
                return await of.state["reader"].read(size, of.pid)
            of.write_end = None
            if isinstance(e, Transaction):
                # A stream: the answer reads from its start after a request,
                # whatever the descriptor's offset; lseek(0) reads it again.
                if of.answer is None or off == 0:
                    of.answer = Answer(e.response(of.state))
                return of.answer.read(size)
            if e.read is not None:
                return e.read(off, size, of.uid == 0)
            if off == 0 or not of.content:
                stamp = self._attr_stamp(e)
                text = e.show()
                of.content = text.encode() if isinstance(text, str) else bytes(text)
                if stamp is not None:
                    self.router.attr_publish(e.inode, stamp, of.content)
            return of.content[off:off + size]
        except (OSError, ValueError) as err:
            raise fuse_error(err) from None

    async def write(self, fh, off, buf):
        of = self._open_file(fh)
        e = of.entry
        if isinstance(e, DataFile):
            # Without the router mtime stays: the kernel (auto_inval_data,
            # which pyfuse3 cannot turn off) drops the whole page cache --
            # every CPU mapping of the region -- when it sees a data file's
            # mtime change.  The router takes the flag out of INIT's reply.
            try:
                n = await e.region.writeback(off, buf, of.pid)
            except OSError as err:
                raise fuse_error(err) from None
            if self.routed:
                self._touch(e, mtime=True, ctime=True)
            return n
        # All or nothing: a control write is one WRITE of at most a page.  A
        # longer one, or a piece continuing the previous write, changes nothing.
        continues = off > 0 and off == of.write_end
        of.write_end = off + len(buf)
        if len(buf) > MAX_CONTROL_WRITE or continues:
            log.info("write to %s refused: %d bytes at offset %d", e.name, len(buf), off)
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            text = buf.decode("ascii")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        try:
            if isinstance(e, Transaction):
                of.answer = None
                result = e.request(of.state, text)
            elif isinstance(e, Attr) and e.store is not None:
                result = e.store(text)
            else:
                raise pyfuse3.FUSEError(errno.EACCES)
            if hasattr(result, "__await__"):
                # A request or store that waits (migration, offlining).
                if self.waiting.statistics().tasks_waiting >= WAITING_QUEUE:
                    result.close()
                    raise OSError(errno.EAGAIN, "too many waiting requests; try again")
                async with self.waiting:
                    await result
        except (OSError, ValueError) as err:
            log.info("write %r to %s: %s", text.strip(), e.name, err)
            raise fuse_error(err) from None
        of.content = b""
        return len(buf)

    # ------------------------------------------------------------ side channel (router)

    async def lseek(self, inode, fh, offset, whence):
        """FUSE_LSEEK (the kernel sends only SEEK_DATA and SEEK_HOLE): a
        region's data has holes where pages were never touched (or were
        punched); any other file is data up to its size."""
        e = self._entry(inode)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            if isinstance(e, DataFile):
                with e.region.hold():
                    return e.region.seek(offset, whence)
        except OSError as err:
            raise fuse_error(err) from None
        size = self._attrs(e).st_size
        if offset < 0 or offset >= size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return offset if whence == SEEK_DATA else size

    async def fallocate(self, inode, fh, offset, length, mode):
        """FUSE_FALLOCATE on a region's data: mode 0 (with or without
        FALLOC_FL_KEEP_SIZE) places the range's absent pages now, growing
        the file unless KEEP_SIZE; PUNCH_HOLE | KEEP_SIZE frees the range's
        pages.  Other modes, and other files, EOPNOTSUPP (as tmpfs)."""
        e = self._entry(inode)
        if not isinstance(e, DataFile):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        try:
            if mode & ~FALLOC_FL_KEEP_SIZE == 0:
                await e.region.fallocate(offset, length, keep_size=bool(mode & FALLOC_FL_KEEP_SIZE))
            elif mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                await e.region.punch(offset, length)
            else:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        except OSError as err:
            raise fuse_error(err) from None
        # As tmpfs (file_modified): only mounted through the router, which
        # is the only way a FALLOCATE gets here.
        self._touch(e, mtime=True, ctime=True)

    # ------------------------------------------------------------ CPU page table

    async def cpu_unmap(self, region: Region, first: int, npages: int, write_back: bool = True) -> None:
        """mmu_notifier invalidate of pages [first, first+npages): the host
        kernel writes back dirty pages (WRITEs we serve meanwhile), unmaps and
        drops them; the next CPU access faults.  Runs in a thread that serves
        no requests, since the write blocks on those WRITEs (DESIGN §2).
        write_back=False: the caller wrote the range back already
        (cpu_write_back), so no descriptor is opened for it here."""
        ino = self.data_inodes.get(region.id)
        if ino is None or self.fuse_fd is None or region.removed:
            return
        with region.hold():
            # Forget the belief first: a fault racing the invalidation sets it again.
            lib.cdm_region_uncache(self.machine.core, region.core, first, npages)
            rc = await trio.to_thread.run_sync(self._write_back_and_invalidate, region, ino, first,
                                               npages, write_back, limiter=self.unmap_threads)
            if rc not in (0, -errno.ENOENT):
                raise OSError(-rc, "invalidating the CPU's copies failed")
            region.invalidations += 1

    async def cpu_write_back(self, region: Region, first: int, npages: int) -> None:
        """Writes the dirty CPU pages of [first, first+npages) back (what a
        migration of many batches does once, before the invalidation of each)."""
        ino = self.data_inodes.get(region.id)
        if ino is None or region.removed:
            return
        with region.hold():
            await trio.to_thread.run_sync(self._write_back, region, ino, first, npages,
                                          limiter=self.unmap_threads)

    def _write_back_and_invalidate(self, region: Region, ino: int, first: int, npages: int,
                                   write_back: bool) -> int:
        """In a worker thread: the range written back (unless the caller did),
        then invalidated."""
        if write_back:
            self._write_back(region, ino, first, npages)
        return lib.cdm_fuse_inval(self.fuse_fd, ino, first * PAGE_SIZE, npages * PAGE_SIZE)

    def _write_back(self, region: Region, ino: int, first: int, npages: int) -> None:
        """In a worker thread.  The kernel's invalidation writes each dirty
        page back in a WRITE of its own (fuse_launder_folio); a range
        write-back first sends them in WRITEs of up to max_pages (a few times
        faster for a batch of dirty pages).  It needs a descriptor of the
        data file: opened through the mount, checked to be this inode, and
        skipped (the invalidation launders instead) if anything is amiss."""
        if not self.mountpoint or npages < WRITEBACK_MIN_PAGES:
            return
        path = os.path.join(self.mountpoint, "regions", region.name, "data")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if st.st_ino == ino and st.st_dev == os.stat(self.mountpoint).st_dev:
                lib.cdm_fuse_writeback(fd, first * PAGE_SIZE, npages * PAGE_SIZE)
        finally:
            os.close(fd)
