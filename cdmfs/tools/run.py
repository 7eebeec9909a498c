"""``cdmfs run MOUNTPOINT [placement] [--min-size SIZE] -- COMMAND [ARGS]``
(SPEC §10): runs an unmodified program on the emulated machine.

The command runs with the interposer (``libcdmfs_run.so``, built from
native/preload/) and mimalloc in ``LD_PRELOAD``: its anonymous memory, the
malloc heap included, becomes a region of the mount named after its pid, and
the NUMA system calls act on that region.  The placement options are
numactl's and set the task policy the program starts with, as ``numactl``
would before exec.  Exit status: the command's (128 + N if a signal N ended
it), 127 if it cannot be run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

from ..lib import bitmap, kstrtox

LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "libcdmfs_run.so")
# The heap: mimalloc calls mmap/munmap through the PLT (glibc's malloc does
# not: its __mmap and __sbrk are internal), and gives back memory by mapping
# over it, which the interposer handles as it handles any MAP_FIXED.
ALLOCATORS = ("libmimalloc.so.2",)
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")

# set_mempolicy(2) modes, as the interposer's CDMFS_RUN_MEMPOLICY carries them.
MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL, MPOL_PREFERRED_MANY = 1, 2, 3, 4, 5
REGION_GONE_TIMEOUT = 5.0


class RunError(Exception):
    """A failure to report as one line."""


def find_allocator() -> str:
    for d in LIB_DIRS:
        for name in ALLOCATORS:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    raise RunError("mimalloc is not installed (Debian: apt-get install libmimalloc2.0)")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def parse_nodes(mount: str, text: str) -> tuple[int, ...]:
    """A numactl node list: ``all``, ``0-1,3``, ``!0`` (all but), against the
    emulated nodes with memory."""
    sysnode = os.path.join(mount, "sys/devices/system/node")
    with_memory = bitmap.parse_nodelist(_read(os.path.join(sysnode, "has_memory")) or "")
    possible = bitmap.parse_nodelist(_read(os.path.join(sysnode, "possible")))
    invert = text.startswith("!")
    body = text[1:] if invert else text
    if body == "all":
        nodes = list(with_memory)
    else:
        try:
            nodes = bitmap.parse_nodelist(body)
        except ValueError:
            raise RunError(f"bad node list {text!r}") from None
        missing = sorted(set(nodes) - set(possible))
        if missing:
            raise RunError(f"node {missing[0]} does not exist on {mount}")
    if invert:
        nodes = [n for n in with_memory if n not in nodes]
    if not set(nodes) & set(with_memory):
        raise RunError(f"no node of {text!r} has memory on {mount}")
    return tuple(sorted(nodes))


def policy_env(args, mount: str) -> Optional[str]:
    """The task policy the placement options ask for, as MODE:FLAGS:NODES."""
    def fmt(mode: int, nodes: Sequence[int] = ()) -> str:
        return f"{mode}:0:{bitmap.nodelist(nodes).strip() if nodes else ''}"
    if args.membind:
        return fmt(MPOL_BIND, parse_nodes(mount, args.membind))
    if args.interleave:
        return fmt(MPOL_INTERLEAVE, parse_nodes(mount, args.interleave))
    if args.preferred is not None:
        nodes = parse_nodes(mount, args.preferred)
        if len(nodes) != 1:
            raise RunError("--preferred takes one node")
        return fmt(MPOL_PREFERRED, nodes)
    if args.preferred_many:
        return fmt(MPOL_PREFERRED_MANY, parse_nodes(mount, args.preferred_many))
    if args.localalloc:
        return fmt(MPOL_LOCAL)
    return None


def run(args) -> int:
    mount = os.path.abspath(args.mountpoint)
    if not os.path.isdir(os.path.join(mount, "regions")) or \
            not os.path.isdir(os.path.join(mount, "sys/devices/system/node")):
        raise RunError(f"{args.mountpoint} is not a cdmfs mount")
    if not args.command:
        raise RunError("no command given (cdmfs run MOUNTPOINT [OPTIONS] -- COMMAND [ARGS])")
    if not os.path.exists(LIB):
        raise RunError(f"the interposer {LIB} is not built (pip install -e .)")
    env = dict(os.environ)
    preload = [LIB, find_allocator()]
    if env.get("LD_PRELOAD"):
        preload.append(env["LD_PRELOAD"])
    env["LD_PRELOAD"] = " ".join(preload)
    env["CDMFS_RUN_MOUNT"] = mount
    # mimalloc otherwise counts nodes with access("/sys/.../nodeN") at its
    # first allocation and leaves errno at ENOENT, which programs that check
    # errno after a libnuma call (migspeed) take for a failure; placement is
    # the policy's business, not the allocator's.
    env.setdefault("MIMALLOC_USE_NUMA_NODES", "1")
    try:
        env["CDMFS_RUN_MIN_SIZE"] = str(kstrtox.memparse(args.min_size) if args.min_size else 0)
    except ValueError:
        raise RunError(f"bad size {args.min_size!r}") from None
    env["CDMFS_RUN_FAULT_AROUND"] = "1" if args.fault_around else "0"
    env.pop("CDMFS_RUN_MEMPOLICY", None)
    pol = policy_env(args, mount)
    if pol:
        env["CDMFS_RUN_MEMPOLICY"] = pol
    try:
        child = subprocess.Popen(args.command, env=env)
    except OSError as e:
        print(f"cdmfs: cannot run {args.command[0]}: {e.strerror}", file=sys.stderr)
        return 127

    # The command gets the signals a shell's foreground job gets.
    def forward(sig, frame):
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        status = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    # The daemon removes the region once the kernel has released the
    # process's mappings; a script that runs next sees it gone.
    region = os.path.join(mount, "regions", str(child.pid))
    deadline = time.monotonic() + REGION_GONE_TIMEOUT
    while os.path.exists(region) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 128 - status if status < 0 else status
