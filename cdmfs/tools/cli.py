"""The ``cdmfs`` command (SPEC §2).  Failures print one line and exit 1."""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import Optional, Sequence

from .. import config
from ..fs import daemon, router

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class CliError(Exception):
    """A failure to report as one line."""


def cmd_mount(args: argparse.Namespace) -> None:
    topo = config.load(args.config)
    log_file = args.log_file or daemon.default_log_file(args.mountpoint)
    if args.foreground:
        daemon.check_mountpoint(args.mountpoint)
        daemon.setup_logging(log_file, args.log_level, to_stderr=True)
        daemon.serve(args.mountpoint, topo, args.allow_other, use_router=args.router)
        logging.shutdown()
        daemon.drop_empty_log(log_file)
    else:
        daemon.start(args.mountpoint, topo, args.allow_other, args.log_level, log_file,
                     use_router=args.router)
        print(f"mounted {args.mountpoint}, log in {log_file}")


def cmd_umount(args: argparse.Namespace) -> None:
    daemon.umount(args.mountpoint)
    print(f"unmounted {args.mountpoint}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run
    run(quick=args.quick, json_path=args.json)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoError, run
    try:
        run(trace=args.trace)
    except DemoError as e:
        raise CliError(f"the demo failed: {e}") from None


def cmd_trace(args: argparse.Namespace) -> int:
    from . import trace
    fmt = args.format or trace.default_format(args.output)
    try:
        if args.convert:
            if args.mountpoint or args.seconds is not None or args.command:
                raise CliError("cdmfs trace --convert FILE -o OUT takes no MOUNTPOINT, --seconds or COMMAND")
            n = trace.convert_file(args.convert, args.output)
            print(f"{n} events converted to {args.output}")
            return 0
        if args.mountpoint is None:
            raise CliError("cdmfs trace: give MOUNTPOINT (or --convert FILE)")
        if args.seconds is not None and args.command:
            raise CliError("cdmfs trace: give --seconds or a COMMAND, not both")
        if args.seconds is not None and not args.seconds > 0:
            raise CliError(f"cdmfs trace: --seconds must be positive, not {args.seconds:g}")
        trace.stop_on_signals()
        status, n = trace.record(args.mountpoint, args.output, fmt, seconds=args.seconds,
                                 command=args.command or None, events=args.events)
    except trace.TraceError as e:
        raise CliError(str(e)) from None
    print(f"{n} events recorded to {args.output}")
    return status


def cmd_plot(args: argparse.Namespace) -> None:
    from . import plot
    if args.width < 200 or args.height < 200:
        raise CliError("cdmfs plot: --width and --height are at least 200 pixels")
    try:
        region = plot.plot(args.file, args.output, args.region, args.width, args.height)
    except plot.PlotError as e:
        raise CliError(str(e)) from None
    print(f"region {region} drawn to {args.output}")


def cmd_top(args: argparse.Namespace) -> None:
    from . import top
    if not args.interval > 0:
        raise CliError(f"cdmfs top: --interval must be positive, not {args.interval:g}")
    try:
        top.run(args.mountpoint, once=args.once, interval=args.interval)
    except top.TopError as e:
        raise CliError(str(e)) from None


def cmd_capi(args: argparse.Namespace) -> None:
    from . import capi
    if args.paths:
        capi.cflags()                   # fails with a message if they are missing
        print(f"{capi.header()}\n{capi.library()}")
        return
    both = not (args.cflags or args.libs)
    words = ([capi.cflags()] if args.cflags or both else []) + ([capi.libs()] if args.libs or both else [])
    print(" ".join(words))


class _IntermixedParser(argparse.ArgumentParser):
    """Lets options and positionals mix, as getopt does (``numastat MNT -m REGION``)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def cmd_hardware(args: argparse.Namespace) -> None:
    from . import report
    try:
        text = report.hardware(args.mountpoint)
    except report.ReportError as e:
        raise CliError(str(e)) from None
    sys.stdout.write(text)


def cmd_run(args: argparse.Namespace) -> int:
    from . import run
    if args.cflags or args.libs:
        # How to build a program against the C API it can use meanwhile.
        args.paths = False
        cmd_capi(args)
        return 0
    if args.mountpoint is None:
        raise CliError("cdmfs run: give MOUNTPOINT (or --cflags/--libs)")
    try:
        status = run.run(args)
    except run.RunError as e:
        raise CliError(str(e)) from None
    return status


def cmd_numastat(args: argparse.Namespace) -> None:
    from . import report
    try:
        text = report.numastat(args.mountpoint, meminfo=args.m, nodes_only=args.n,
                               regions=args.regions, width=report.terminal_width())
    except report.ReportError as e:
        raise CliError(str(e)) from None
    sys.stdout.write(text)


def _mib(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB"


def _used_kb(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemUsed:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def cmd_device(args: argparse.Namespace) -> None:
    """Takes a device out of service (its memory evacuated to system RAM) or
    back in.  The write to devices/NAME/online returns when the evacuation is
    done; meanwhile, on a terminal, the device's meminfo shows the progress."""
    import os
    import threading
    d = os.path.join(args.mountpoint, "devices", args.name)
    if not os.path.isdir(os.path.join(args.mountpoint, "devices")):
        raise CliError(f"{args.mountpoint} is not a cdmfs mount")
    if not os.path.isfile(os.path.join(d, "online")):
        raise CliError(f"no device {args.name!r} in {args.mountpoint}")
    meminfo = os.path.join(d, "meminfo")
    value = "1" if args.state == "online" else "0"
    start_kb = _used_kb(meminfo) or 0
    error: list[OSError] = []

    def write() -> None:
        try:
            fd = os.open(os.path.join(d, "online"), os.O_WRONLY)
            try:
                os.write(fd, f"{value}\n".encode())
            finally:
                os.close(fd)
        except OSError as e:
            error.append(e)

    tty = sys.stderr.isatty()
    worker = threading.Thread(target=write, daemon=True)
    worker.start()
    shown = 0       # width of the progress line on the terminal
    while worker.is_alive():
        worker.join(0.1)
        if tty and value == "0" and worker.is_alive():
            left = _used_kb(meminfo)
            if left is not None:
                done = start_kb - left
                pct = 100 * done // start_kb if start_kb else 100
                line = f"{args.name}: evacuating {_mib(done)} of {_mib(start_kb)} to system RAM ({pct}%)"
                sys.stderr.write(f"\r{line:<{shown}}")
                sys.stderr.flush()
                shown = max(shown, len(line))
    if shown:
        sys.stderr.write("\r" + " " * shown + "\r")    # the result line takes its place
    if error:
        e = error[0]
        reason = {errno.EBUSY: "a page in its memory is pinned or stays busy",
                  errno.ENOMEM: "system RAM has no room for its memory"}.get(e.errno, e.strerror)
        raise CliError(f"cannot take {args.name} {args.state}: {reason}")
    # The outcome goes to stdout, terminal or not; only the progress is for a terminal.
    if value == "0":
        print(f"{args.name}: offline, {_mib(start_kb)} moved to system RAM")
    else:
        print(f"{args.name}: online")


BENCH_EPILOG = f"""\
Each row is a median beside a reference measured in the same run on this machine:
  tmpfs                     CPU first touch on the kernel's own shared memory
  bindfs                    the same on bindfs over that tmpfs: a FUSE filesystem in C
                            (its rows are left out when bindfs is not installed)
  pyfuse3 floor             cdmfs.tools.benchfloor: pyfuse3 on trio answering each request
                            and doing nothing else, the floor of a Python FUSE daemon
  memcpy                    memcpy of the same size, for migration and device reads
  host node0/meminfo        the host's sysfs (/sys/devices/system/node/node0/meminfo),
                            for attribute reads; also bindfs over a copy of it and the
                            floor's small attribute file
  cdmfs random first touch  cdmfs's own first-touch rate, for fault-back from gpu0
  router defaults           cdmfs random first touch with the router's default settings
                            ({router.READERS} reader, {router.SPIN_US} us spin), for the rows of other settings
                            (CDMFS_ROUTER_READERS, CDMFS_ROUTER_SPIN_US; as root)
  without the router        a mount with CDMFS_ROUTER=0 (every request in Python), for
                            a control request that Python serves either way (as root)
  NUMA balancing off        the same first touch on a two-node machine with NUMA
                            balancing off, alternating with it on in one mount
  tracing off               the same first touch or migration with no trace event on, for
                            the rows with every event on and a reader of trace_pipe
  bytes touched             for the daemon's memory growth with a 1 TiB CDM node
ratio = median / reference: for faults/s and MB/s higher is better (1.00x matches
the reference); for us (latency) and MiB (memory) lower is better.
"""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("cdmfs")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """--version, reading the package metadata only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {version()}")
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdmfs", description=(
        "Coherent device memory and HMM, emulated in user space as a FUSE filesystem."))
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount the emulated machine")
    m.add_argument("mountpoint")
    m.add_argument("--config", metavar="FILE", help="topology TOML (default: the embedded one)")
    m.add_argument("--foreground", action="store_true", help="serve in this process")
    m.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    m.add_argument("--router", action=argparse.BooleanOptionalAction, default=None,
                   help="serve through the C request router (the default for root; "
                        "also CDMFS_ROUTER=1/0)")
    m.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                   help="log at this level (default: warnings); also to stderr when given")
    m.add_argument("--log-file", metavar="FILE",
                   help="the daemon's log (default: /run/cdmfs/MOUNT.log for root, else in $XDG_RUNTIME_DIR)")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount (also a stale mount)")
    u.add_argument("mountpoint")
    u.set_defaults(func=cmd_umount)

    h = sub.add_parser("hardware", help="the emulated machine, as numactl --hardware shows one")
    h.add_argument("mountpoint")
    h.set_defaults(func=cmd_hardware)

    n = sub.add_parser("numastat", help="per-node tables, as numastat shows them")
    n.add_argument("mountpoint")
    n.add_argument("-m", action="store_true", help="meminfo-like per-node memory usage (MB)")
    n.add_argument("-n", action="store_true", help="the numastat counters in MB, with a Total column")
    n.add_argument("regions", nargs="*", metavar="REGION",
                   help="per-node memory of these regions, like numastat -p")
    n.set_defaults(func=cmd_numastat)
    n.__class__ = _IntermixedParser

    dv = sub.add_parser("device", help="take a device out of service (evacuating its memory) or back in")
    dv.add_argument("mountpoint")
    dv.add_argument("name", help="the device (as in MOUNT/devices)")
    dv.add_argument("state", choices=("online", "offline"))
    dv.set_defaults(func=cmd_device)

    c = sub.add_parser("capi", help="how to build a C program against the C API (cdmfs.h, libcdmfs.so)",
                       description="Prints the compiler and linker flags of the C API: "
                                   "cc prog.c $(cdmfs capi --cflags) $(cdmfs capi --libs)")
    c.add_argument("--cflags", action="store_true", help="the compiler flags (-I the folder of cdmfs.h)")
    c.add_argument("--libs", action="store_true", help="the linker flags (-L, run path, -lcdmfs)")
    c.add_argument("--paths", action="store_true", help="the header's and the library's paths, one a line")
    c.set_defaults(func=cmd_capi)
    r = sub.add_parser("run", help="run a program with its memory and NUMA calls on the emulated machine",
                       description="Runs COMMAND with its anonymous memory (the malloc heap included) in a "
                       "region of the mount named after its pid, and its NUMA system calls on the emulated "
                       "machine. The placement options are numactl's: the task policy COMMAND starts with.")
    r.add_argument("mountpoint", nargs="?")
    r.add_argument("--cflags", action="store_true",
                   help="print the compiler flags of the C API (cdmfs.h) and exit")
    r.add_argument("--libs", action="store_true", help="print the linker flags of the C API (libcdmfs.so) and exit")
    pl = r.add_mutually_exclusive_group()
    pl.add_argument("--membind", "-m", metavar="NODES", help="allocate only on NODES (MPOL_BIND)")
    pl.add_argument("--preferred", "-p", metavar="NODE", help="allocate on NODE first (MPOL_PREFERRED)")
    pl.add_argument("--interleave", "-i", metavar="NODES", help="interleave over NODES (MPOL_INTERLEAVE)")
    pl.add_argument("--localalloc", "-l", action="store_true", help="allocate on the CPU's node (MPOL_LOCAL)")
    pl.add_argument("--preferred-many", metavar="NODES", help="allocate on NODES first (MPOL_PREFERRED_MANY)")
    r.add_argument("--min-size", metavar="SIZE",
                   help="anonymous mappings smaller than SIZE stay in host memory (default 0: all go)")
    r.add_argument("--fault-around", action="store_true",
                   help="let a fault read around (faster; pages near a fault are placed early, by the "
                   "policy of that moment); default: one page a fault, as anonymous memory")
    r.add_argument("command", nargs="*", metavar="-- COMMAND [ARGS]")
    r.set_defaults(func=cmd_run)
    r.__class__ = _IntermixedParser

    d = sub.add_parser("demo", help="mount in a temporary folder and run a short workload")
    d.add_argument("--trace", metavar="FILE",
                   help="record the run's events to FILE (Chrome trace JSON; the lines if FILE ends in .txt)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("trace", help="record the mount's events (trace_pipe) for Perfetto, or as lines",
                       description="Records MOUNT/sys/kernel/tracing/trace_pipe to FILE: Chrome trace-event "
                       "JSON, which https://ui.perfetto.dev opens as it is, or the lines (--format text). "
                       "Stops after --seconds, when COMMAND ends (exiting with its status), or on Ctrl-C.")
    t.add_argument("mountpoint", nargs="?")
    t.add_argument("-o", "--output", metavar="FILE", required=True, help="the file to write")
    t.add_argument("--format", choices=("json", "text"),
                   help="json (the default) or text, the lines as trace_pipe gives them (default for .txt)")
    t.add_argument("--seconds", type=float, metavar="N", help="record for N seconds")
    t.add_argument("--events", metavar="KIND,...", help="only these kinds (default: every one)")
    t.add_argument("--convert", metavar="FILE", help="convert a text trace FILE to JSON (no mount)")
    t.add_argument("command", nargs="*", metavar="-- COMMAND [ARGS]")
    t.set_defaults(func=cmd_trace)
    t.__class__ = _IntermixedParser

    pt = sub.add_parser("plot", help="draw a trace: a region's placement over time and memory used",
                        description="Draws a trace (cdmfs trace, JSON or text) as a PNG: a region's "
                        "placement over time (time across, page offset down, a colour per node and device) "
                        "above the memory each node and device uses.")
    pt.add_argument("file", metavar="FILE")
    pt.add_argument("-o", "--output", metavar="OUT.png", required=True)
    pt.add_argument("--region", metavar="NAME", help="the region to draw (default: the busiest, by the pages its events touch)")
    pt.add_argument("--width", type=int, default=1200, help="pixels (default 1200)")
    pt.add_argument("--height", type=int, default=800, help="pixels (default 800)")
    pt.set_defaults(func=cmd_plot)

    tp = sub.add_parser("top", help="a live view of memory: usage, rates, where each region's pages are",
                        description="Redraws every second: used/total per node and device, fault, migration, "
                        "demotion and eviction rates, a placement strip per region. q quits. Not on a "
                        "terminal (or with --once) it prints one snapshot.")
    tp.add_argument("mountpoint")
    tp.add_argument("--once", action="store_true", help="print one plain snapshot and exit")
    tp.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between redraws (default 1)")
    tp.set_defaults(func=cmd_top)

    b = sub.add_parser("bench", help="measure against in-run references (tmpfs, bindfs, pyfuse3, memcpy, sysfs)",
                       description="The benchmark table: cdmfs's figures beside references taken in the same run.",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sizes")
    b.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    if argv and argv[0] in ("run", "trace") and "--" in argv:
        # Everything after the first "--" is the command, word for word
        # (argparse would drop a "--" of the command's own).
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = p.parse_args(argv)
    if command is not None:
        if args.command:
            p.error(f"cdmfs {argv[0]}: give the command after --")
        args.command = command
    if args.command is None:        # `cdmfs` alone: the help, as git and ip give theirs
        p.print_help()
        return 0
    try:
        status = args.func(args)
    except (CliError, config.ConfigError, daemon.MountError, OSError) as e:
        print(f"cdmfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
