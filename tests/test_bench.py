"""``cdmfs bench --quick``: every row measured, beside its reference, in one run.

No figure is compared with a target here (speed is for the bench to show, not
for a timed test); the test checks that every row is there, measured, and
written the same way to the table and to --json."""
import json
import math
import os
import shutil
import subprocess
import sys

ROWS = [
    "CPU first touch, random 4 KiB",
    "CPU first touch, sequential",
    "CPU fault-back from gpu0, random 4 KiB",
    "migrate sysram -> gpu0, 64 MiB, one request (2 MiB batches), not CPU-mapped",
    "migrate sysram -> gpu0, 64 MiB, a request per 2 MiB, not CPU-mapped",
    "migrate sysram -> gpu0, 64 MiB, one request (2 MiB batches), mapped and dirty",
    "gpu0 read of 64 MiB in its own memory",
    "read sys/.../node1/meminfo (open, read, close)",
    "daemon RSS growth after touching",
    "CPU first touch, random 4 KiB, 64 MiB, 2 nodes, NUMA balancing on",
    "CPU first touch, random 4 KiB, 64 MiB, every trace event on",
    "migrate sysram -> gpu0, 64 MiB, not CPU-mapped, every trace event on",
]


def test_bench_quick_prints_every_row_with_its_reference(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "cdmfs", "bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    for name in ROWS:
        assert any(r["name"].startswith(name) for r in rows), name
    refs = {r["reference"] for r in rows}
    assert {"tmpfs", "memcpy", "pyfuse3 floor", "bytes touched", "tracing off"} <= refs
    if shutil.which("bindfs"):             # installed by the README's test command
        assert {"bindfs", "bindfs, same bytes"} <= refs
    if os.path.exists("/sys/devices/system/node/node0/meminfo"):
        assert "host node0/meminfo" in refs
    for r in rows:
        assert r["min"] <= r["median"] <= r["max"], r
        assert r["median"] > 0 and r["reference_median"] > 0, r
        assert math.isclose(r["ratio"], r["median"] / r["reference_median"]), r
        # The table shows the same figures.
        line = next(line for line in done.stdout.splitlines()
                    if line.startswith(r["name"]) and f"({r['reference']})" in line)
        assert f"{r['median']:.1f}" in line and f"{r['ratio']:.2f}x" in line
    # The daemon grows by about the bytes touched on a 1 TiB node, not by the node.
    rss = next(r for r in rows if r["name"].startswith("daemon RSS"))
    assert rss["median"] < 1.1 * rss["reference_median"] + 64, rss
