"""The C request router (native/router.c) under pyfuse3.

With the router, the daemon does not let libfuse mount: the router opens
/dev/fuse, mounts it with mount(2) and forwards every request it does not
serve itself to pyfuse3, which runs unmodified on its end of a socketpair
given as the mountpoint ``/dev/fd/N`` (DESIGN §5).

READ and WRITE of a region's data are served by the router in C
(cdm_region_serve) when the core can: placed pages, a first touch (by the
plans Python publishes: Machine.policy_id, Region.publish_policies) and a
fault-back of device-private pages (logged for Machine.apply_faultbacks);
the Filesystem maps each region's data inode (``map_data``) at mkdir and
unmaps it at rmdir before the native region may be freed.  What the C path
does not do, Python makes up for: the region's cpu_faults/writebacks in
``stat`` add the core's served_reads/served_writes, the data file's
atime/mtime fold in the times of the last served READ/WRITE
(``data_times``), and no ``cpu_fault`` event is emitted for a served READ
(nothing subscribes to it yet).

The side channel: requests pyfuse3 has no handler for (FUSE_LSEEK,
FUSE_FALLOCATE; SIDE_OPCODES) are taken out of pyfuse3's stream by the
router and read here from a second socket (``serve_side``, a trio task of
the daemon); each is decoded, given to the Filesystem's method of the same
name (ops.lseek, ops.fallocate) and answered with cdm_router_reply().

Attribute files (native/attr_cache.c): the Filesystem registers
each attribute file it may cache (``attr_register``, from its GETATTR
answer) and publishes what it renders (``attr_stamp`` before rendering,
``attr_publish`` after); the router answers read-only OPENs, READs, RELEASEs
and GETATTRs of those inodes from the bytes while they are valid: no Python
request that may change anything began or ended since the stamp
(``attr_begin``/``attr_end`` around such requests), and no region data was
served in C since -- or, for that only, the bytes are at most ATTR_BOUND_NS
old.  Stale bytes come back here on the side channel as the OPEN or READ
itself: ``_serve_one`` renders (ops.attr_render), publishes and lets the
router answer (cdm_router_attr_answer).

On by default for root (it needs mount(2), and socket buffers beyond
net.core.wmem_max); other users mount through libfuse as before.
``cdmfs mount --router/--no-router`` or CDMFS_ROUTER=1/0 in the daemon's
environment (``cdmfs.mounted()`` and ``cdmfs bench`` pass it on) choose.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
from typing import Iterable, Optional

from .._core import ffi, lib

log = logging.getLogger(__name__)

ENV = "CDMFS_ROUTER"
# Request threads and how long each stays awake after a request (see
# request_loop in native/router.c); measured defaults, overridden by
# CDMFS_ROUTER_READERS / CDMFS_ROUTER_SPIN_US (cdmfs bench compares them).
READERS, READERS_ENV = 1, "CDMFS_ROUTER_READERS"
SPIN_US, SPIN_ENV = 200, "CDMFS_ROUTER_SPIN_US"
KERNEL_OPTIONS = ("default_permissions", "allow_other")   # passed to mount(2) as they are
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)

# linux/fuse.h
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_FALLOCATE = 43
FUSE_LSEEK = 46
SIDE_OPCODES = (FUSE_LSEEK, FUSE_FALLOCATE)
IN_HEADER = struct.Struct("<IIQQIIIHH")      # fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, ...
LSEEK_IN = struct.Struct("<QqII")            # fuse_lseek_in: fh, offset, whence, padding
LSEEK_OUT = struct.Struct("<q")              # fuse_lseek_out: offset
FALLOCATE_IN = struct.Struct("<QqqII")       # fuse_fallocate_in: fh, offset, length, mode, padding
READ_IN = struct.Struct("<QQII")             # fuse_read_in: fh, offset, size, read_flags
SIDE_BUFSIZE = 1 << 17                       # a side-channel request is small (an IOCTL's data at most)
ATTR_BOUND_NS = 1_000_000                    # staleness tolerated after region data served in C


def enabled(flag: Optional[bool] = None) -> bool:
    """Whether to route: the flag when given, else CDMFS_ROUTER (1/yes/on/true
    or 0/no/off/false), else whether we are root (the router mounts with
    mount(2); other users mount through libfuse's fusermount3)."""
    if flag is not None:
        return flag
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "yes", "on", "true"):
        return True
    if value in ("0", "no", "off", "false"):
        return False
    return os.geteuid() == 0


class RouterError(OSError):
    pass


def tuning() -> tuple[int, int]:
    """(readers, spin_us): the defaults, or the environment's."""
    try:
        return (int(os.environ.get(READERS_ENV, READERS)), int(os.environ.get(SPIN_ENV, SPIN_US)))
    except ValueError:
        raise RouterError(errno.EINVAL, f"router: {READERS_ENV} and {SPIN_ENV} take numbers") from None


class Router:
    """Mounts mountpoint with the options pyfuse3.init would have been given
    (``fsname=``, ``subtype=``, default_permissions, allow_other) and starts
    the router's threads.  ``mountpoint_arg`` is what to give pyfuse3.init."""

    def __init__(self, mountpoint: str, options: Iterable[str]):
        fsname, subtype, kernel = "fuse", "", []
        for opt in sorted(options):
            key, _, value = opt.partition("=")
            if key == "fsname":
                fsname = value
            elif key == "subtype":
                subtype = value
            elif opt in KERNEL_OPTIONS:
                kernel.append(opt)
            else:
                raise RouterError(errno.EINVAL, f"mount option {opt!r} is not supported with the router")
        self.mountpoint = os.path.realpath(mountpoint)
        self._r = lib.cdm_router_new()
        if self._r == ffi.NULL:
            raise MemoryError("cannot allocate the router")
        rc = lib.cdm_router_mount(self._r, os.fsencode(self.mountpoint), fsname.encode(),
                                  subtype.encode(), ",".join(kernel).encode())
        if rc < 0:
            lib.cdm_router_free(self._r)
            self._r = None
            raise RouterError(-rc, f"router: cannot mount {mountpoint}: {os.strerror(-rc)}")
        self.fuse_fd = lib.cdm_router_fuse_fd(self._r)
        self.event_fd = lib.cdm_router_event_fd(self._r)
        self._python_fd: Optional[int] = lib.cdm_router_python_fd(self._r)
        self.side_fd = lib.cdm_router_side_fd(self._r)
        self._attrs = lib.cdm_router_attrs(self._r)
        self._stamp = ffi.new("uint64_t[3]")
        lib.cdm_attr_set_bound(self._attrs, ATTR_BOUND_NS)
        for opcode in SIDE_OPCODES:
            lib.cdm_router_route(self._r, opcode, 1)
        readers, spin_us = tuning()
        if lib.cdm_router_tune(self._r, readers, spin_us) < 0:
            self.close()
            raise RouterError(errno.EINVAL, f"router: {READERS_ENV} must be 1..{lib.CDM_ROUTER_MAX_READERS}"
                              f" and {SPIN_ENV} 0..{lib.CDM_ROUTER_MAX_SPIN_US}")
        rc = lib.cdm_router_start(self._r)
        if rc < 0:
            self.close()
            raise RouterError(-rc, f"router: cannot start its threads: {os.strerror(-rc)}")
        log.info("router mounted %s (/dev/fuse fd %d, pyfuse3 on fd %d)",
                 self.mountpoint, self.fuse_fd, self._python_fd)

    @property
    def mountpoint_arg(self) -> str:
        """pyfuse3.init's mountpoint: libfuse takes the descriptor as mounted
        and owns it from then on."""
        return f"/dev/fd/{self._python_fd}"

    def handed_over(self) -> None:
        """pyfuse3.init succeeded: libfuse closes the descriptor, not us."""
        self._python_fd = None

    @property
    def state(self) -> int:
        return lib.cdm_router_state(self._r)

    def init_params(self) -> dict[str, int]:
        out = ffi.new("struct cdm_router_init *")
        lib.cdm_router_init_params(self._r, out)
        return {name: getattr(out, name) for name, _ in ffi.typeof("struct cdm_router_init").fields}

    def stats(self) -> dict[str, int]:
        """The router's counters, then the attribute cache's (prefixed attr_)."""
        out = ffi.new("struct cdm_router_stats *")
        lib.cdm_router_stats(self._r, out)
        stats = {name: getattr(out, name) for name, _ in ffi.typeof("struct cdm_router_stats").fields}
        aout = ffi.new("struct cdm_attr_stats *")
        lib.cdm_attr_stats(self._attrs, aout)
        stats.update((f"attr_{name}", getattr(aout, name))
                     for name, _ in ffi.typeof("struct cdm_attr_stats").fields)
        return stats

    # ------------------------------------------------------------ attribute files

    def attr_register(self, nodeid: int, mode: int, uid: int, gid: int, size: int,
                      times: tuple[int, int, int]) -> None:
        if self._r is not None:
            lib.cdm_attr_register(self._attrs, nodeid, mode, uid, gid, size, *times)

    def attr_stamp(self):
        """Taken before rendering; give it to attr_publish."""
        if self._r is None:
            return 0, 0, 0
        lib.cdm_attr_stamp(self._attrs, self._stamp)
        return self._stamp[0], self._stamp[1], self._stamp[2]

    def attr_publish(self, nodeid: int, stamp, data: bytes) -> int:
        if self._r is None:
            return -errno.ENODEV
        return lib.cdm_attr_publish(self._attrs, nodeid, stamp, data, len(data))

    def attr_begin(self) -> None:
        if self._r is not None:
            lib.cdm_attr_begin(self._attrs)

    def attr_end(self) -> None:
        if self._r is not None:
            lib.cdm_attr_end(self._attrs)

    def _answer_attr(self, ops, msg: bytes, opcode: int, unique: int, nodeid: int) -> None:
        """An attribute file's OPEN or READ whose bytes were stale: render,
        publish, and let the router answer from them; content too long for
        the page cache is answered here."""
        try:
            data = ops.attr_render(nodeid)
        except OSError as e:
            self.reply(unique, e.errno or errno.EIO)
            return
        except Exception:       # a bug in a show function: this request fails, not the daemon
            log.exception("router: rendering inode %d failed", nodeid)
            self.reply(unique, errno.EIO)
            return
        rc = lib.cdm_router_attr_answer(self._r, msg, len(msg))
        if rc != -errno.EAGAIN:
            return
        if opcode == FUSE_READ and len(msg) >= IN_HEADER.size + READ_IN.size:
            _, offset, size, _ = READ_IN.unpack_from(msg, IN_HEADER.size)
            self.reply(unique, 0, data[offset:offset + size])
        else:
            self.reply(unique, errno.EIO)

    async def watch(self) -> None:
        """Returns when the router has ended (unmounted, the connection
        aborted, or Python's end closed): the caller ends pyfuse3's loop."""
        import trio
        await trio.lowlevel.wait_readable(self.event_fd)
        try:
            os.read(self.event_fd, 8)
        except BlockingIOError:
            pass
        state = self.state
        log.info("router ended (state %#x): %s", state,
                 "unmounted" if state & lib.CDM_ROUTER_UNMOUNTED else
                 "pyfuse3's end closed" if state & lib.CDM_ROUTER_PYTHON_GONE else "failed")

    async def serve_side(self, ops) -> None:
        """Serves the side channel until the router shuts it (stop): each
        request in a task of its own, as pyfuse3 serves its own (a punch
        waits for the kernel's write-back, served meanwhile)."""
        import trio
        fd = self.side_fd
        os.set_blocking(fd, False)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    msg = os.read(fd, SIDE_BUFSIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError as e:
                    log.warning("router: side channel: %s", e)
                    return
                if not msg:
                    return
                nursery.start_soon(self._serve_one, ops, msg)

    async def _serve_one(self, ops, msg: bytes) -> None:
        import pyfuse3
        if len(msg) < IN_HEADER.size:
            return
        _, opcode, unique, nodeid = IN_HEADER.unpack_from(msg)[:4]
        body = msg[IN_HEADER.size:]
        if opcode in (FUSE_OPEN, FUSE_READ):
            self._answer_attr(ops, msg, opcode, unique, nodeid)
            return
        data, err = b"", 0
        try:
            if opcode == FUSE_LSEEK and len(body) >= LSEEK_IN.size:
                fh, offset, whence, _ = LSEEK_IN.unpack_from(body)
                data = LSEEK_OUT.pack(await ops.lseek(nodeid, fh, offset, whence))
            elif opcode == FUSE_FALLOCATE and len(body) >= FALLOCATE_IN.size:
                fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body)
                await ops.fallocate(nodeid, fh, offset, length, mode)
            else:
                err = errno.EINVAL if opcode in SIDE_OPCODES else errno.ENOSYS
        except pyfuse3.FUSEError as e:
            err = e.errno
        except Exception:       # never_fatal wraps the handlers; this is a bug here
            log.exception("router: side-channel request %d failed", opcode)
            err = errno.EIO
        self.reply(unique, err, b"" if err else data)

    def map_data(self, nodeid: int, machine_core, region_core) -> None:
        """READs and WRITEs of nodeid are offered to the core first."""
        if self._r is None:
            return
        rc = lib.cdm_router_map_data(self._r, nodeid, machine_core, region_core)
        if rc < 0:
            raise OSError(-rc, f"router: cannot map inode {nodeid}")

    def unmap_data(self, nodeid: int) -> None:
        """Takes nodeid out; when it returns the router no longer uses the
        region (waits for a copy in flight, which holds no lock Python takes)."""
        if self._r is not None:
            lib.cdm_router_unmap_data(self._r, nodeid)

    def data_times(self, nodeid: int) -> tuple[int, int]:
        """(read_ns, write_ns) of the last READ/WRITE of nodeid served in C
        since the last call (0: none)."""
        if self._r is None:
            return 0, 0
        out = ffi.new("uint64_t[2]")
        if lib.cdm_router_data_times(self._r, nodeid, out, out + 1) < 0:
            return 0, 0
        return out[0], out[1]

    def reply(self, unique: int, error: int, data: bytes = b"") -> int:
        """Answers a side-channel request (cdm_router_reply): 0, or -errno
        (-ENOENT: nobody waits for it any longer)."""
        if self._r is None:
            return -errno.ENODEV
        return lib.cdm_router_reply(self._r, unique, error, data, len(data))

    def close(self) -> None:
        """Stops the router, closes /dev/fuse and, as libfuse's
        fuse_kern_unmount() does, unmounts lazily unless the connection is
        gone already (unmounted, or aborted)."""
        if self._r is None:
            return
        if self._python_fd is not None:
            os.close(self._python_fd)
            self._python_fd = None
        lib.cdm_router_stop(self._r)
        init, stats = self.init_params(), self.stats()
        log.info("router: INIT %d.%d (kernel %d.%d), max_write %d, max_pages %d, max_readahead %d; "
                 "%d requests, %d replies, %d notifications, %d without reply, %d failed by the router, "
                 "%d writes refused", init["major"], init["minor"], init["kernel_major"], init["kernel_minor"],
                 init["max_write"], init["max_pages"], init["max_readahead"], stats["requests"],
                 stats["replies"], stats["notifications"], stats["no_reply"], stats["failed"],
                 stats["write_errors"])
        log.info("router: attribute files: %d opens answered (%d keeping the kernel's copy), %d READs, "
                 "%d GETATTRs; %d OPENs and %d READs rendered by Python, %d invalidations",
                 stats["attr_opens"], stats["attr_kept"], stats["attr_reads"], stats["attr_getattrs"],
                 stats["attr_open_misses"], stats["attr_read_misses"], stats["attr_invalidations"])
        p = select.poll()
        p.register(self.fuse_fd, 0)
        gone = any(ev & select.POLLERR for _, ev in p.poll(0))
        lib.cdm_router_free(self._r)
        self._r = None
        if not gone and _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):   # not (or no longer) mounted
                log.warning("router: cannot unmount %s: %s", self.mountpoint, os.strerror(err))
