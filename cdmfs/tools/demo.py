"""``cdmfs demo``: the main job on the embedded default machine, explained.

Mounts in a temporary folder and walks through both designs with a child
program as the CPU side: first touch, migration to gpu0's private memory, CPU
fault-back (with the kernel's read-ahead), migration to the CDM node, the two
devices adding to the data, a last check of every page, and an unmodified
program (numactl's memhog) run on the machine with ``cdmfs run``.  Each step prints
one line saying what happened and why, then where the region's pages are (in
pages) and how much memory each node and device uses (in MiB).  The check at
the end fails the command if a single page is wrong.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Iterator, Optional

from ..client import Mount, Region, mounted

REGION_MIB = 64
PAGE = 4096
ADD = 1000          # what the devices add to every page's first word
READ_BACK = 1024    # pages the CPU reads back from gpu0
MEMHOG_MIB = 16     # what memhog allocates under cdmfs run
WIDTH = 88          # the explanations wrap at this width


class DemoError(Exception):
    """The workload did not see what it wrote: the demo fails."""


# The CPU side runs in a child process, as a user's program would.
# argv: data file, "write" or "check", the value added to every page's word,
# and how many leading pages to look at.  Prints how many pages are wrong.
CHILD = textwrap.dedent("""
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
    add, pages = int(sys.argv[3]), int(sys.argv[4])
    if sys.argv[2] == "write":
        for p in range(pages):
            m[p * 4096:p * 4096 + 8] = p.to_bytes(8, "little")
        m.flush()
    bad = sum(int.from_bytes(m[p * 4096:p * 4096 + 8], "little") != p + add for p in range(pages))
    print(bad)
""")


def cpu(data: str, mode: str, add: int, pages: int) -> int:
    """Runs the CPU side over the first ``pages`` pages; returns how many of
    them do not hold their page number + add."""
    out = subprocess.run([sys.executable, "-c", CHILD, data, mode, str(add), str(pages)],
                         capture_output=True, text=True)
    if out.returncode:
        raise DemoError(f"the CPU side failed: {out.stderr.strip().splitlines()[-1:]}")
    return int(out.stdout)


def mib(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def size(kb: int) -> str:
    return f"{kb // 1024} MiB" if kb % 1024 == 0 else f"{mib(kb)} MiB"


def say(text: str) -> None:
    print(textwrap.fill(text, width=WIDTH, subsequent_indent="  "))


def step(text: str) -> None:
    print(textwrap.fill(text, width=WIDTH, subsequent_indent="   "))
    sys.stdout.flush()


class Demo:
    def __init__(self, m: Mount, r: Region):
        self.m, self.r = m, r
        self.n = 0

    def pages(self) -> dict[str, int]:
        st = self.r.stat
        return {"node0": st["N0"], "node1": st["N1"], "gpu0": st["private:gpu0"]}

    def step(self, what: str) -> None:
        """One step: what happened and why, then placement and usage."""
        self.n += 1
        step(f"{self.n}. {what}")
        p = self.pages()
        used = {"node0": self.m.node(0).meminfo["MemUsed"], "node1": self.m.node(1).meminfo["MemUsed"],
                "gpu0": self.m.device("gpu0").meminfo["MemUsed"]}
        print("   pages: " + "  ".join(f"{k} {v:>5}" for k, v in p.items())
              + "   MiB used: " + "  ".join(f"{k} {mib(v):>4}" for k, v in used.items()))
        sys.stdout.flush()


@contextlib.contextmanager
def recording(m: Mount, path: Optional[str]) -> Iterator[None]:
    """``--trace FILE``: ``cdmfs trace`` records the mount meanwhile, from
    before the first step to after the last.  In a process of its own: the
    demo's own reads of the region fault with Python's lock held, and a
    recorder sharing it would read the pipe late (its memory samples too)."""
    if path is None:
        yield
        return
    recorder = subprocess.Popen([sys.executable, "-m", "cdmfs", "trace", m.path, "-o", path],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    enabled = os.path.join(m.path, "sys/kernel/tracing/events/enable")
    deadline = time.monotonic() + 30
    # Recording once every switch is on (cdmfs trace opens the pipe first).
    while recorder.poll() is None and read_text(enabled) != "1\n":
        if time.monotonic() > deadline:
            recorder.kill()
            raise DemoError("cannot record the trace: cdmfs trace did not start")
        time.sleep(0.01)
    if recorder.poll() is not None:
        raise DemoError(f"cannot record the trace: {recorder.stderr.read().strip()}")
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        _, err = recorder.communicate()
    if recorder.returncode:
        raise DemoError(f"recording the trace failed: {err.strip()}")
    print(f"trace written to {path}; open it in https://ui.perfetto.dev or draw it: cdmfs plot {path} -o OUT.png")


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def run(trace: Optional[str] = None) -> None:
    size_b = REGION_MIB << 20
    pages = size_b // PAGE
    half = size_b // 2
    with mounted() as m, recording(m, trace):
        node0, node1 = m.node(0).meminfo["MemTotal"], m.node(1).meminfo["MemTotal"]
        gpu_kb = m.device("gpu0").meminfo["MemTotal"]
        print("cdmfs demo on the embedded default machine:")
        print(f"  node 0  system RAM, {size(node0)}, with the CPUs")
        print(f"  node 1  coherent device memory (CDM), {size(node1)}: device cdm0's memory, which the")
        print("          CPU maps like any node's; isolated from implicit allocation")
        print(f"  gpu0    device-private memory (HMM), {size(gpu_kb)}: the CPU cannot map it")
        print(f"mounted at {m.path}" + (f", daemon log in {m.log_file}" if m.log_file else ""))
        r = m.region("demo", size_b)
        d = Demo(m, r)
        say(f"region demo: {REGION_MIB} MiB, {pages} pages of 4 KiB. After each step: where its pages are, "
            "in pages, and the memory each node and device uses, in MiB.")

        d.step("created: nothing touched yet, so no page is placed")

        bad = cpu(r.data, "write", 0, pages)
        if bad:
            raise DemoError(f"{bad} pages did not hold what the CPU wrote")
        d.step(f"a child program wrote all {pages} pages through mmap: each first-touch fault placed its "
               "page on node 0, the CPU's node (default policy); node 1 got none: it is isolated")

        res = r.migrate(0, half, "gpu0")
        d.step(f"migrated the first half to gpu0 (migrate_vma): {res['migrated']} pages moved, "
               f"{res['skipped']} skipped; the CPU's mappings of them were invalidated")

        before, stat0 = d.pages(), r.stat
        bad = cpu(r.data, "check", 0, READ_BACK)
        if bad:
            raise DemoError(f"{bad} of the {READ_BACK} pages read back are wrong")
        back = d.pages()["node0"] - before["node0"]
        faults = r.stat["cpu_faults"] - stat0["cpu_faults"]
        ahead = back - READ_BACK
        why = (f", {ahead} more than read: the kernel reads ahead, each of the {faults} faults "
               f"asked for {back // max(faults, 1)} pages" if ahead > 0 else "")
        d.step(f"the CPU read the first {READ_BACK} pages: the CPU cannot map gpu0's memory, so each fault "
               f"migrated pages back to node 0; {back} pages came back{why}")

        res = r.migrate(half, half, "node:1")
        d.step(f"migrated the second half to node 1, cdm0's memory: {res['migrated']} pages moved, "
               f"{res['skipped']} skipped; the CPU maps them where they are now")

        gpu = m.device("gpu0").access("add", "demo", 0, half, ADD)
        d.step(f"gpu0 added {ADD} to every page of the first half: it faulted on the {gpu['faults']} "
               f"pages not in its memory and migrated them in (fault policy migrate): "
               f"{gpu['migrated']} pages migrated, {gpu['modeled_ns'] / 1e6:.2f} ms modeled")

        cdm = m.device("cdm0").access("add", "demo", half, half, ADD)
        d.step(f"cdm0 added {ADD} to every page of the second half where it lies (fault policy remote): "
               f"they are on node 1, its own memory, so {cdm['local_bytes'] >> 20} MiB local, "
               f"{cdm['remote_bytes'] >> 20} MiB remote, {cdm['migrated']} pages migrated, "
               f"{cdm['modeled_ns'] / 1e6:.2f} ms modeled")

        bad = cpu(r.data, "check", ADD, pages)
        d.step(f"the CPU read every page: gpu0's {half // PAGE} pages faulted back to node 0, "
               "node 1's were read in place (coherent memory: no migration)")
        print(f"verification: {pages - bad} of {pages} pages correct (each holds its page number + {ADD})")
        if bad:
            raise DemoError(f"{bad} of {pages} pages do not hold what the devices wrote")
        r.remove()
        unmodified_program(m, d.n + 1)
    print("unmounted; the demo passed")


def unmodified_program(m: Mount, n: int) -> None:
    """memhog, as Debian ships it, under ``cdmfs run --membind 1``: its
    malloc()ed memory lands in a region of its own on node 1, counted in
    node 1's numastat, and goes with the process."""
    if shutil.which("memhog") is None:
        step(f"{n}. (skipped: numactl's memhog is not installed; apt-get install numactl)")
        return
    before = [m.node(nid).numastat["numa_hit"] for nid in (0, 1)]
    res = subprocess.run([sys.executable, "-m", "cdmfs", "run", m.path, "--membind", "1", "--",
                          "memhog", f"{MEMHOG_MIB}M"], capture_output=True, text=True)
    if res.returncode != 0:
        raise DemoError(f"memhog under cdmfs run failed: {res.stderr.strip()}")
    hits = [m.node(nid).numastat["numa_hit"] - b for nid, b in zip((0, 1), before)]
    step(f"{n}. memhog, numactl's own tool, unmodified, ran under cdmfs run --membind 1 and "
        f"wrote {MEMHOG_MIB} MiB it got from malloc(): its memory was a region of the mount "
        f"named after its pid, and {hits[1]} pages were allocated on node 1, {hits[0]} on node 0 "
        f"(numastat numa_hit); the region went with the process")
    left = [name for name in m.regions if name != "demo"]
    if left:
        raise DemoError(f"regions left behind by memhog: {left}")
