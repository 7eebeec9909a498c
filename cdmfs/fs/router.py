"""The C request router (native/router.c) under pyfuse3, behind a switch.

With the router, the daemon does not let libfuse mount: the router opens
/dev/fuse, mounts it with mount(2) and forwards every request to pyfuse3,
which runs unmodified on its end of a socketpair given as the mountpoint
``/dev/fd/N`` (DESIGN §5).  Issue 13, step 1: nothing is served in C yet.

Switched on by ``cdmfs mount --router`` or CDMFS_ROUTER=1 in the daemon's
environment (``cdmfs.mounted()`` and ``cdmfs bench`` pass it on); off by
default.  Needs root (mount(2), and socket buffers beyond net.core.wmem_max).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
from typing import Iterable, Optional

from .._core import ffi, lib

log = logging.getLogger(__name__)

ENV = "CDMFS_ROUTER"
KERNEL_OPTIONS = ("default_permissions", "allow_other")   # passed to mount(2) as they are
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def enabled(flag: Optional[bool] = None) -> bool:
    """Whether to route: the flag when given, else CDMFS_ROUTER (1/yes/on/true)."""
    if flag is not None:
        return flag
    return os.environ.get(ENV, "").strip().lower() in ("1", "yes", "on", "true")


class RouterError(OSError):
    pass


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
        out = ffi.new("struct cdm_router_stats *")
        lib.cdm_router_stats(self._r, out)
        return {name: getattr(out, name) for name, _ in ffi.typeof("struct cdm_router_stats").fields}

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
        p = select.poll()
        p.register(self.fuse_fd, 0)
        gone = any(ev & select.POLLERR for _, ev in p.poll(0))
        lib.cdm_router_free(self._r)
        self._r = None
        if not gone and _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):   # not (or no longer) mounted
                log.warning("router: cannot unmount %s: %s", self.mountpoint, os.strerror(err))
