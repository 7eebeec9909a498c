"""``cdmfs demo``: the main job on the embedded default machine.

Mounts in a temporary folder and walks through both designs with a child
program as the CPU side: first touch, migration to gpu0's private memory, CPU
fault-back, migration to the CDM node, a device kernel adding to the data.
Prints where the pages are after each step, then unmounts.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from .client import Mount, mounted

REGION_MB = 64
PAGE = 4096

# The CPU side runs in a child process, as a user's program would.
# argv: data file, "write" or "check", the value added to every page's word,
# and how many leading pages to look at.
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


def cpu(data: str, mode: str, add: int, pages: int) -> None:
    """Runs the CPU side; fails loudly if any page does not hold what it should."""
    out = subprocess.run([sys.executable, "-c", CHILD, data, mode, str(add), str(pages)],
                         capture_output=True, text=True)
    if out.returncode or out.stdout.strip() != "0":
        raise RuntimeError(f"workload failed: {out.stderr.strip() or out.stdout.strip() + ' pages wrong'}")


def placement(m: Mount, region: str) -> str:
    """One line: pages of the region per node and device, and node usage."""
    st = m.region(region).stat
    where = "  ".join(f"{k}={v}" for k, v in st.items() if k.startswith(("N", "private:")))
    used = "  ".join(f"node{n} {m.node(n).meminfo['MemUsed'] // 1024} MB used" for n in m.nodes)
    return f"{where:<40} | {used}"


def step(title: str) -> None:
    print(f"\n== {title}")
    sys.stdout.flush()


def run() -> None:
    print("cdmfs demo: node 0 sysram, node 1 CDM (device cdm0, isolated), gpu0 private memory")
    with mounted() as m:
        print(f"mounted at {m.path}")
        r = m.region("demo", REGION_MB << 20)
        step(f"a {REGION_MB} MiB region, nothing touched yet")
        print(placement(m, "demo"))

        pages = (REGION_MB << 20) // PAGE
        size = REGION_MB << 20
        half = size // 2

        step("a child program first-touches every page (default policy: local node 0)")
        cpu(r.data, "write", 0, pages)
        print(placement(m, "demo"))
        print("the CDM node stayed empty: it is isolated from implicit allocation")

        step("migrate the first half to gpu0's private memory (migrate_vma)")
        res = r.migrate(0, half, "gpu0")
        print(f"migrated {res['migrated']} pages, skipped {res['skipped']}")
        print(placement(m, "demo"))

        step("the CPU reads the first 1024 pages again: each fault migrates its page back")
        cpu(r.data, "check", 0, 1024)
        print(placement(m, "demo"))

        step("migrate the second half to the CDM node (node 1, device cdm0's memory)")
        res = r.migrate(half, half, "node:1")
        print(f"migrated {res['migrated']} pages, skipped {res['skipped']}")
        print(placement(m, "demo"))

        step("gpu0 adds 1000 to every page (device faults migrate pages it lacks into gpu0)")
        gpu = m.device("gpu0")
        out = gpu.access("add", "demo", 0, half, 1000)
        print(f"gpu0: {out['faults']} device faults, {out['migrated']} pages migrated, "
              f"{out['modeled_ns'] / 1e6:.2f} ms modeled")
        cdm = m.device("cdm0")
        out = cdm.access("add", "demo", half, half, 1000)
        print(f"cdm0: {out['local_bytes'] >> 20} MiB local, {out['remote_bytes'] >> 20} MiB remote, "
              f"{out['modeled_ns'] / 1e6:.2f} ms modeled (coherent: accessed in place)")
        print(placement(m, "demo"))

        step("the CPU checks every page: +1000 everywhere (CDM pages read in place)")
        cpu(r.data, "check", 1000, pages)
        print(placement(m, "demo"))
        r.remove()
    print("\nunmounted")
