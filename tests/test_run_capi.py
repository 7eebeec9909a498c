"""The seeds' headline use case end to end: an unmodified-looking program
malloc()s a buffer under ``cdmfs run``, a "library" runs a kernel on a
device through the C API (libcdmfs), and the CPU reads the results back --
every byte checked, the pages' whereabouts checked from outside."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import cdmfs
from cdmfs.tools import capi

HERE = os.path.dirname(os.path.abspath(__file__))
NPAGES = 256


@pytest.fixture(scope="module")
def mnt():
    with cdmfs.mounted() as m:
        yield m


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("mallocdevice") / "mallocdevice")
    cmd = f"cc -O2 -Wall -o {exe} {HERE}/c/mallocdevice.c {capi.cflags()} {capi.libs()}"
    subprocess.run(cmd, shell=True, check=True)
    return exe


def run_scenario(m, prog, device: str, *target: str) -> tuple[dict, dict]:
    """Runs the program; returns its printed lines (key -> rest) and the
    region's numa_maps counts while the pages are where the kernel left them."""
    p = subprocess.Popen([sys.executable, "-m", "cdmfs", "run", m.path, "--", prog, device, str(NPAGES),
                          *target], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out = {}
    try:
        while "after_kernel" not in out:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            key, _, rest = line.strip().partition(" ")
            out[key] = rest
        regions = [r for r in m.regions if r.isdigit()]
        assert len(regions) == 1, regions
        with open(os.path.join(m.path, "regions", regions[0], "numa_maps")) as f:
            counts = {}
            for key, value in re.findall(r"\b(N\d+|private:\w+)=(\d+)", f.read()):
                counts[key] = counts.get(key, 0) + int(value)
        rest, err = p.communicate("go\n", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    for line in rest.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value
    assert "ok" in out
    return out, counts


def test_malloc_to_gpu0_and_back(mnt, prog):
    """gpu0's kernel faults the malloc()ed pages into its private memory;
    the CPU's reads fault them back to node 0."""
    out, counts = run_scenario(mnt, prog, "gpu0")
    assert out["before"] == "node:0"
    faults, migrated = map(int, out["kernel"].split())
    assert faults > 0 and migrated == NPAGES
    assert counts.get("private:gpu0", 0) >= NPAGES
    assert out["after_kernel"] == "gpu0"
    assert out["after_cpu"] == "node:0"
    assert not [r for r in mnt.regions if r.isdigit()]     # gone with the process


def test_malloc_to_cdm0_in_place(mnt, prog):
    """Migrated to cdm0's node first, the buffer is reached where it lies:
    cdm0's kernel migrates nothing, and the CPU reads node 1 in place."""
    out, counts = run_scenario(mnt, prog, "cdm0", "cdm0")
    assert out["before"] == "node:0"
    assert out["kernel"].split()[1] == "0"
    assert counts.get("N1", 0) >= NPAGES
    assert out["after_kernel"] == "node:1" and out["after_cpu"] == "node:1"
