"""cdmfs run: Debian's numactl 2.0.16 binaries, as they are, on the emulated
machine (SPEC §10): numactl --hardware, numactl as a launcher (the policy
survives exec), memhog, migratepages, migspeed, and hwloc-ls."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from test_run import ANON_C, cc, numa_maps_counts, read, region_dir, run_cmd, start  # noqa: F401

pytestmark = pytest.mark.skipif(shutil.which("numactl") is None, reason="numactl is not installed")


def out(cmd: list[str]) -> str:
    return subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, timeout=120).stdout


def without_free(text: str) -> list[str]:
    """The layout without the lines that move with the memory in use."""
    return [line for line in text.splitlines() if " free: " not in line and not line.startswith("device ")]


def test_numactl_hardware_is_cdmfs_hardware(mnt):
    ours = out(run_cmd(mnt, "--", "numactl", "--hardware"))
    theirs = out([sys.executable, "-m", "cdmfs", "hardware", mnt.path])
    assert ours.startswith("available: 2 nodes (0-1)\n")
    assert without_free(ours) == without_free(theirs)
    frees = re.findall(r"node (\d) free: (\d+) MB", ours)
    assert [n for n, _ in frees] == ["0", "1"] and all(0 < int(mb) <= 1024 for _, mb in frees)


@pytest.mark.parametrize("opt, policy, nodes", [
    ("--membind=1", "bind:1", {"N1"}),
    ("--interleave=all", "interleave:0-1", {"N0", "N1"}),
    ("--preferred=1", "prefer:1", {"N1"}),
    ("--localalloc", "local", {"N0"}),
    ("--preferred-many=1", "prefer (many):1", {"N1"}),
])
def test_numactl_launches_with_its_policy(mnt, cc, opt, policy, nodes):
    """numactl sets the policy and execs the program: the kernel keeps the
    task policy across exec, and so does cdmfs run (the same pid, its region
    taken over)."""
    exe = cc("anon", ANON_C)
    p = start(mnt, "--", "numactl", opt, exe, "4")
    pid = int(p.stdout.readline().split()[0])
    try:
        text = read(os.path.join(region_dir(mnt, pid), "numa_maps"))
        first = text.splitlines()[0]
        assert first.startswith(f"00000000 {policy} anon="), text
        counts = numa_maps_counts(text)
        assert {k for k, v in counts.items() if k.startswith("N") and v} == nodes, text
        assert counts["anon"] >= (4 << 20) // 4096
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        assert p.wait(60) == 0


def test_numactl_show_after_exec(mnt):
    """numactl --membind=1 numactl --show: the second numactl reads the
    policy the first one set, through get_mempolicy, after exec."""
    text = out(run_cmd(mnt, "--", "numactl", "--membind=1", "numactl", "--show"))
    assert re.search(r"^membind: 1\s*$", text, re.M), text
    assert re.search(r"^nodebind: ", text, re.M)
    text = out(run_cmd(mnt, "--interleave=0,1", "--", "numactl", "--show"))
    assert re.search(r"^policy: interleave\s*$", text, re.M), text
    assert re.search(r"^interleavemask: 0 1\s*$", text, re.M), text


def test_numactl_refuses_a_node_that_does_not_exist(mnt):
    r = subprocess.run(run_cmd(mnt, "--", "numactl", "--membind=2", "true"), stderr=subprocess.PIPE, text=True)
    assert r.returncode != 0


def test_memhog_membind_1_allocates_on_node_1(mnt):
    """memhog 16M membind 1: node 1 counts the pages (numastat numa_hit)."""
    stat = os.path.join(mnt.path, "sys/devices/system/node/node1/numastat")

    def hits() -> int:
        return int(re.search(r"numa_hit (\d+)", read(stat)).group(1))
    before = hits()
    r = subprocess.run(run_cmd(mnt, "--", "memhog", "16M", "membind", "1"), stdout=subprocess.PIPE,
                       text=True, timeout=120)
    assert r.returncode == 0
    assert hits() - before >= (16 << 20) // 4096


def test_migratepages_moves_another_process(mnt, cc):
    exe = cc("anon", ANON_C)
    p = start(mnt, "--", exe, "4")
    pid = int(p.stdout.readline().split()[0])
    try:
        numa_maps = os.path.join(region_dir(mnt, pid), "numa_maps")
        before = numa_maps_counts(read(numa_maps))
        assert before["N0"] >= (4 << 20) // 4096 and not before.get("N1")
        r = subprocess.run(run_cmd(mnt, "--", "migratepages", str(pid), "0", "1"), timeout=120)
        assert r.returncode == 0
        after = numa_maps_counts(read(numa_maps))
        assert not after.get("N0") and after["N1"] == before["N0"]
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        assert p.wait(60) == 0          # its bytes survived the move


def test_migspeed(mnt):
    text = out(run_cmd(mnt, "--", "migspeed", "-p", "256", "0", "1"))
    assert re.match(r"1\.0 Mbyte migrated in [\d.]+ secs\. [\d.]+ Mbytes/second", text), text


@pytest.mark.skipif(shutil.which("hwloc-ls") is None, reason="hwloc is not installed")
def test_hwloc_ls_sees_the_emulated_nodes(mnt):
    text = out(run_cmd(mnt, "--", "hwloc-ls"))
    assert re.findall(r"NUMANode L#\d \(P#(\d) (\d+)MB\)", text) == [("0", "1024"), ("1", "1024")], text
