"""``cdmfs demo``: the main job on the embedded default machine.

Mounts in a temporary folder, runs a short workload in a child program and
prints where the pages are after each step, then unmounts.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from .client import Mount, mounted

REGION_MB = 64
PAGE = 4096

# The CPU side runs in a child process, as a user's program would.
CHILD_TOUCH = textwrap.dedent("""
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
    for off in range(0, len(m), 4096):
        m[off:off + 8] = (off // 4096).to_bytes(8, "little")
    m.flush()
    bad = sum(int.from_bytes(m[o:o + 8], "little") != o // 4096 for o in range(0, len(m), 4096))
    print(bad)
""")


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

        step("a child program first-touches every page (default policy: local node 0)")
        out = subprocess.run([sys.executable, "-c", CHILD_TOUCH, r.data], capture_output=True, text=True)
        if out.returncode or out.stdout.strip() != "0":
            raise RuntimeError(f"workload failed: {out.stderr.strip() or out.stdout.strip()}")
        print(placement(m, "demo"))
        print("the CDM node stayed empty: it is isolated from implicit allocation")
        r.remove()
    print("\nunmounted")
