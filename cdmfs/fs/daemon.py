"""Mounting, serving and unmounting (SPEC §2 ``mount``/``umount``)."""
from __future__ import annotations

import ctypes
import errno
import logging
import logging.handlers
import os
import signal
from typing import Callable, Optional

from ..config import Topology

log = logging.getLogger(__name__)

# pyfuse3 worker tasks.  pyfuse3 answers a request from the task that read
# it, so a request that waits (a migration whose invalidation waits for the
# kernel's write-back WRITEs, a fault waiting for that migration) keeps its
# task, and a new reader starts only while fewer than max_tasks exist: with
# 16, sixteen waiting requests left nobody reading /dev/fuse and the whole
# mount hung.  The tasks therefore follow the requests in flight (each one a
# process blocked on the mount, or one of the kernel's max_background), and
# the daemon bounds the waiting work itself (ops.WAITING_RUNS/WAITING_QUEUE).
MIN_TASKS = 2
MAX_TASKS = 4096

LOG_BYTES = 1 << 20          # a log file rotates at 1 MiB, keeping one old file
LOG_FORMAT = "%(asctime)s cdmfs[%(process)d] %(levelname)s %(name)s: %(message)s"


class MountError(Exception):
    """A mount or unmount that cannot be done; the message is one line."""


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def is_mounted(path: str) -> bool:
    """Whether path is a mount point, also for a stale FUSE mount (stat would fail)."""
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(_unescape(line.split()[1]) == path for line in f)


def default_log_file(mountpoint: str) -> str:
    """Where a mount's daemon logs unless told otherwise: /run/cdmfs/ for
    root, the user's runtime directory otherwise, one file per mount point
    (``/mnt/cdm`` logs to ``mnt-cdm.log``)."""
    if os.getuid() == 0:
        folder = "/run/cdmfs"
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cdmfs-{os.getuid()}"
        folder = os.path.join(runtime, "cdmfs")
    name = os.path.realpath(mountpoint).strip("/").replace("/", "-") or "root"
    return os.path.join(folder, f"{name}.log")


def setup_logging(log_file: str, level: Optional[str], to_stderr: bool) -> None:
    """Logs to log_file (bounded: rotated at LOG_BYTES) and, when asked, to stderr."""
    os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
    handlers: list[logging.Handler] = [
        logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_BYTES, backupCount=1)]
    if to_stderr:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=level or "WARNING", format=LOG_FORMAT, handlers=handlers, force=True)


def drop_empty_log(log_file: str) -> None:
    """A clean run that logged nothing leaves no file behind."""
    try:
        if os.path.getsize(log_file) == 0:
            os.unlink(log_file)
    except OSError:
        pass


def check_mountpoint(path: str) -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist (load the fuse module, or run where FUSE is available)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is not accessible to this user")
    if is_mounted(path):
        raise MountError(f"{path} is already a mount point")
    if not os.path.isdir(path):
        raise MountError(f"mount point {path} does not exist or is not a directory")
    if os.listdir(path):
        raise MountError(f"mount point {path} is not empty")


def daemon_pid(mountpoint: str) -> int:
    """The pid of the cdmfs daemon serving mountpoint (LookupError if none)."""
    want = os.fsencode(str(mountpoint))
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"cdmfs" in b" ".join(argv) and b"mount" in argv and want in argv:
            return int(pid)
    raise LookupError(f"no cdmfs daemon serves {mountpoint}")


def daemon_rss(mountpoint: str) -> int:
    """Resident bytes of the daemon serving mountpoint."""
    with open(f"/proc/{daemon_pid(mountpoint)}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def fuse_device_fd() -> int:
    """The daemon's /dev/fuse descriptor (pyfuse3 does not export it)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    raise MountError("no /dev/fuse descriptor after mounting")


def serve(mountpoint: str, topo: Topology, allow_other: bool = False,
          ready: Optional[Callable[[], None]] = None, use_router: Optional[bool] = None) -> None:
    """Mounts and serves until unmounted or signalled (SIGINT/SIGTERM unmount cleanly).
    use_router: mount through the C router (fs/router.py); None: as
    CDMFS_ROUTER says, else for root only (router.enabled)."""
    import pyfuse3
    import trio

    from ..drivers import dmirror
    from ..mm.machine import Machine
    from ..mm.region import Regions
    from . import devices, proc, router, sysfs, tracing
    from .ops import Filesystem
    from .tree import Tree

    machine = Machine(topo)
    regions = Regions(machine)
    tree = Tree()
    sysfs.build(tree, machine)
    proc.build(tree, machine)
    tracing.build(tree, machine.trace)
    devices.build(tree, machine, dmirror.probe(machine))
    ops = Filesystem(machine, tree, regions)
    ops.mountpoint = os.path.realpath(mountpoint)
    options = set(pyfuse3.default_options) | {"fsname=cdmfs", "subtype=cdmfs"}
    if allow_other:
        options.add("allow_other")
    rt: Optional[router.Router] = None
    if router.enabled(use_router):
        # The router mounts; libfuse takes its socket as already mounted.
        try:
            rt = router.Router(mountpoint, options)
        except OSError as e:
            raise MountError(str(e)) from None
    try:
        pyfuse3.init(ops, rt.mountpoint_arg if rt else mountpoint, options)
    except RuntimeError as e:
        if rt:
            rt.close()
        raise MountError(f"cannot mount {mountpoint}: {e}") from None
    if rt:
        rt.handed_over()
        ops.fuse_fd = rt.fuse_fd
        ops.routed = True
        ops.router = rt
        # debugfs: the router's counters (served_reads, served_writes...), root only.
        from .tree import Attr
        tree.add(tree.path("sys/kernel/debug/cdmfs"), "router",
                 Attr(lambda: "".join(f"{k} {v}\n" for k, v in rt.stats().items()), mode=0o400,
                      cache=False))
    else:
        ops.fuse_fd = fuse_device_fd()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for sig in signals:
                        log.info("signal %d: unmounting", sig)
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signal)
            ops.machine.background = nursery       # prefetches run here
            if rt:
                # While background work runs, attributes it changes (meminfo,
                # a device's stat) are not served from the router's cache.
                ops.machine.background_hooks.append(
                    lambda begin: rt.attr_begin() if begin else rt.attr_end())
            if rt:
                async def on_router_end() -> None:
                    # Unmounted (the router read ENODEV): pyfuse3's loop
                    # would otherwise wait on its socket for ever.
                    await rt.watch()
                    pyfuse3.terminate()
                nursery.start_soon(on_router_end)
                # FUSE_LSEEK, FUSE_FALLOCATE: pyfuse3 has no handlers.
                nursery.start_soon(rt.serve_side, ops)
            # The kernel's threads of automatic placement: the NUMA hinting
            # scanner (task_numa_work) and kswapd (reclaim by demotion);
            # cancelled with the nursery at unmount.
            nursery.start_soon(machine.balancing.run)
            nursery.start_soon(machine.kswapd.run)
            if ready:
                ready()
            await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException:
        log.critical("the daemon is ending on an error", exc_info=True)
        raise
    finally:
        ops.fuse_fd = None
        try:
            # With the router, libfuse does not unmount ("/dev/fd/N" was
            # mounted by someone else); it closes its end of the socket.
            pyfuse3.close(unmount=rt is None)
        except Exception:  # already unmounted from outside
            pass
        if rt:
            rt.close()


def start(mountpoint: str, topo: Topology, allow_other: bool = False,
          log_level: Optional[str] = None, log_file: Optional[str] = None,
          use_router: Optional[bool] = None) -> int:
    """Forks a daemon that serves the mount; returns its pid once the mount answers.

    The daemon detaches from the terminal and from this process's output (so
    ``$(cdmfs mount ...)`` returns) and logs to log_file; with an explicit
    log_level it also keeps stderr for its log."""
    check_mountpoint(mountpoint)
    log_file = log_file or default_log_file(mountpoint)
    try:
        setup_logging(log_file, log_level, to_stderr=False)
    except OSError as e:
        raise MountError(f"cannot open the log file {log_file}: {e.strerror}") from None
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            if log_level is None:
                os.dup2(devnull, 2)
            setup_logging(log_file, log_level, to_stderr=log_level is not None)

            def ready() -> None:
                os.write(wfd, b"ok\n")
                os.close(wfd)
            serve(mountpoint, topo, allow_other, ready, use_router)
            logging.shutdown()
            drop_empty_log(log_file)
            os._exit(0)
        except BaseException as e:  # report anything before ready, then die
            log.critical("the daemon ends: %s", e, exc_info=True)
            logging.shutdown()
            try:
                os.write(wfd, f"{e}\n".encode())
            except OSError:
                pass
            os._exit(1)
    os.close(wfd)
    with os.fdopen(rfd) as r:
        answer = r.read().strip()
    if not answer.startswith("ok"):
        os.waitpid(pid, 0)
        raise MountError(answer or "the daemon died while mounting")
    return pid


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def umount(mountpoint: str) -> None:
    """Unmounts, also a stale mount whose daemon died."""
    if not is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    path = os.fsencode(os.path.realpath(mountpoint))
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY:
        raise MountError(f"{mountpoint} is busy (a process has a file open or mapped, or its cwd there)")
    if _libc.umount2(path, MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot unmount {mountpoint}: {os.strerror(err)}")
