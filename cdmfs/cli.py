"""The ``cdmfs`` command (SPEC §2).  Failures print one line and exit 1."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from . import config, daemon

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class CliError(Exception):
    """A failure to report as one line."""


def cmd_mount(args: argparse.Namespace) -> None:
    topo = config.load(args.config)
    if args.foreground:
        daemon.check_mountpoint(args.mountpoint)
        logging.basicConfig(level=args.log_level or "WARNING", format="cdmfs %(levelname)s %(name)s: %(message)s")
        daemon.serve(args.mountpoint, topo, args.allow_other)
    else:
        daemon.start(args.mountpoint, topo, args.allow_other, args.log_level)


def cmd_umount(args: argparse.Namespace) -> None:
    daemon.umount(args.mountpoint)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run
    run(quick=args.quick, json_path=args.json)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run
    run()


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


def cmd_numastat(args: argparse.Namespace) -> None:
    from . import report
    try:
        text = report.numastat(args.mountpoint, meminfo=args.m, nodes_only=args.n,
                               regions=args.regions, width=report.terminal_width())
    except report.ReportError as e:
        raise CliError(str(e)) from None
    sys.stdout.write(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdmfs", description=(
        "Coherent device memory and HMM, emulated in user space as a FUSE filesystem."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount the emulated machine")
    m.add_argument("mountpoint")
    m.add_argument("--config", metavar="FILE", help="topology TOML (default: the embedded one)")
    m.add_argument("--foreground", action="store_true", help="serve in this process")
    m.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    m.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                   help="log to stderr at this level (default: warnings only, none once daemonized)")
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

    d = sub.add_parser("demo", help="mount in a temporary folder and run a short workload")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="measure against in-run references (tmpfs, memcpy, host sysfs)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sizes")
    b.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, config.ConfigError, daemon.MountError, OSError) as e:
        print(f"cdmfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
