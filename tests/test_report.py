"""cdmfs hardware / cdmfs numastat (SPEC §2): cdmfs/report.py and its CLI.

The reference is the real numactl 2.0.16 (Debian package ``numactl``), whose
output is recorded below as literal strings so that the tests do not need it:

* HOST_* -- ``numactl --hardware`` / ``numastat`` on the development host (one
  NUMA node);
* REAL_SPARSE_* -- the same real tools run, in a private mount namespace, with a
  fresh cdmfs mount of SPARSE_CONFIG's ``sys/devices/system/node`` bind-mounted
  over the host's ``/sys/devices/system/node`` (``unshare -m sh -c 'mount --bind
  MOUNT/sys/devices/system/node /sys/devices/system/node && numactl --hardware'``):
  what numactl itself prints for the emulated 3-node machine.

The same regular expressions parse the host's samples and cdmfs's output, and on
a fresh mount of SPARSE_CONFIG cdmfs must print exactly what the real tools did.
"""
import os
import re
import subprocess
import sys

import pytest

import cdmfs
from cdmfs.tools import report

PAGE = 4096
MB = 1 << 20

# --------------------------------------------------------------------------- #
# recorded output of the real tools
# --------------------------------------------------------------------------- #

# 3 nodes with a hole in the ids (0, 1, 3), one cpu each on the sysram nodes,
# a custom distance matrix.
SPARSE_CONFIG = """
[[node]]
id = 0
kind = "sysram"
size = "1G"
cpus = "0"

[[node]]
id = 1
kind = "sysram"
size = "512M"
cpus = "1"

[[node]]
id = 3
kind = "cdm"
size = "256M"

[[device]]
name = "cdm0"
memory = "node:3"

[[device]]
name = "gpu0"
memory = "private:512M"

[distance]
matrix = [[10, 21, 40], [21, 10, 45], [40, 45, 10]]
"""

# ---- the development host, numactl 2.0.16 ----

# numactl --hardware
HOST_HARDWARE = (
    'available: 1 nodes (0)\n'
    'node 0 cpus: 0 1\n'
    'node 0 size: 12634 MB\n'
    'node 0 free: 11947 MB\n'
    'node distances:\n'
    'node   0 \n'
    '  0:  10 \n'
)

# numastat
HOST_NUMASTAT = (
    '                           node0\n'
    'numa_hit                12552589\n'
    'numa_miss                      0\n'
    'numa_foreign                   0\n'
    'interleave_hit              1134\n'
    'local_node              12552589\n'
    'other_node                     0\n'
)

# numastat -m (numastat's own 'Token ... not in hash table.' lines included)
HOST_NUMASTAT_M = (
    '\n'
    'Per-node system memory usage (in MBs):\n'
    'Token SwapCached not in hash table.\n'
    'Token SecPageTables not in hash table.\n'
    'Token FileHugePages not in hash table.\n'
    'Token FilePmdMapped not in hash table.\n'
    '                          Node 0           Total\n'
    '                 --------------- ---------------\n'
    'MemTotal                12634.20        12634.20\n'
    'MemFree                 11947.97        11947.97\n'
    'MemUsed                   686.23          686.23\n'
    'Active                    178.86          178.86\n'
    'Inactive                  333.53          333.53\n'
    'Active(anon)                0.97            0.97\n'
    'Inactive(anon)             94.99           94.99\n'
    'Active(file)              177.88          177.88\n'
    'Inactive(file)            238.54          238.54\n'
    'Unevictable                12.28           12.28\n'
    'Mlocked                    11.23           11.23\n'
    'Dirty                       0.16            0.16\n'
    'Writeback                   0.00            0.00\n'
    'FilePages                 425.09          425.09\n'
    'Mapped                     20.92           20.92\n'
    'AnonPages                  99.70           99.70\n'
    'Shmem                       8.66            8.66\n'
    'KernelStack                 1.41            1.41\n'
    'PageTables                  2.29            2.29\n'
    'NFS_Unstable                0.00            0.00\n'
    'Bounce                      0.00            0.00\n'
    'WritebackTmp                0.00            0.00\n'
    'Slab                       85.33           85.33\n'
    'SReclaimable               62.93           62.93\n'
    'SUnreclaim                 22.40           22.40\n'
    'AnonHugePages               0.00            0.00\n'
    'ShmemHugePages              0.00            0.00\n'
    'ShmemPmdMapped              0.00            0.00\n'
    'HugePages_Total             0.00            0.00\n'
    'HugePages_Free              0.00            0.00\n'
    'HugePages_Surp              0.00            0.00\n'
    'KReclaimable               62.93           62.93\n'
)

# numastat -n
HOST_NUMASTAT_N = (
    '\n'
    'Per-node numastat info (in MBs):\n'
    '                          Node 0           Total\n'
    '                 --------------- ---------------\n'
    'Numa_Hit                49034.32        49034.32\n'
    'Numa_Miss                   0.00            0.00\n'
    'Numa_Foreign                0.00            0.00\n'
    'Interleave_Hit              4.43            4.43\n'
    'Local_Node              49034.32        49034.32\n'
    'Other_Node                  0.00            0.00\n'
)

# numastat -p PID
HOST_NUMASTAT_P = (
    '\n'
    'Per-node process memory usage (in MBs) for PID 11634 (bash)\n'
    '                           Node 0           Total\n'
    '                  --------------- ---------------\n'
    'Huge                         0.00            0.00\n'
    'Heap                         0.30            0.30\n'
    'Stack                        0.02            0.02\n'
    'Private                      3.75            3.75\n'
    '----------------  --------------- ---------------\n'
    'Total                        4.06            4.06\n'
)

# numastat -p PID -p PID
HOST_NUMASTAT_P2 = (
    '\n'
    'Per-node process memory usage (in MBs)\n'
    'PID                               Node 0           Total\n'
    '-----------------------  --------------- ---------------\n'
    '11615 (memfd:sealed-91)             1.04            1.04\n'
    '11634 (bash)                        4.06            4.06\n'
    '-----------------------  --------------- ---------------\n'
    'Total                               5.10            5.10\n'
)


# ---- the real tools over a fresh SPARSE_CONFIG mount's sysfs ----

# numactl --hardware
REAL_SPARSE_HARDWARE = (
    'available: 3 nodes (0-1,3)\n'
    'node 0 cpus: 0\n'
    'node 0 size: 1024 MB\n'
    'node 0 free: 1024 MB\n'
    'node 1 cpus: 1\n'
    'node 1 size: 512 MB\n'
    'node 1 free: 512 MB\n'
    'node 3 cpus:\n'
    'node 3 size: 256 MB\n'
    'node 3 free: 256 MB\n'
    'node distances:\n'
    'node   0   1   3 \n'
    '  0:  10  21  40 \n'
    '  1:  21  10  45 \n'
    '  3:  40  45  10 \n'
)

# numastat
REAL_SPARSE_NUMASTAT = (
    '                           node0           node1           node3\n'
    'numa_hit                       0               0               0\n'
    'numa_miss                      0               0               0\n'
    'numa_foreign                   0               0               0\n'
    'interleave_hit                 0               0               0\n'
    'local_node                     0               0               0\n'
    'other_node                     0               0               0\n'
)

# numastat -n
REAL_SPARSE_NUMASTAT_N = (
    '\n'
    'Per-node numastat info (in MBs):\n'
    '                          Node 0          Node 1          Node 3           Total\n'
    '                 --------------- --------------- --------------- ---------------\n'
    'Numa_Hit                    0.00            0.00            0.00            0.00\n'
    'Numa_Miss                   0.00            0.00            0.00            0.00\n'
    'Numa_Foreign                0.00            0.00            0.00            0.00\n'
    'Interleave_Hit              0.00            0.00            0.00            0.00\n'
    'Local_Node                  0.00            0.00            0.00            0.00\n'
    'Other_Node                  0.00            0.00            0.00            0.00\n'
)

# NUMASTAT_WIDTH=50 numastat -n (folded)
REAL_SPARSE_NUMASTAT_N_50 = (
    '\n'
    'Per-node numastat info (in MBs):\n'
    '                          Node 0          Node 1\n'
    '                 --------------- ---------------\n'
    'Numa_Hit                    0.00            0.00\n'
    'Numa_Miss                   0.00            0.00\n'
    'Numa_Foreign                0.00            0.00\n'
    'Interleave_Hit              0.00            0.00\n'
    'Local_Node                  0.00            0.00\n'
    'Other_Node                  0.00            0.00\n'
    '\n'
    '                          Node 3           Total\n'
    '                 --------------- ---------------\n'
    'Numa_Hit                    0.00            0.00\n'
    'Numa_Miss                   0.00            0.00\n'
    'Numa_Foreign                0.00            0.00\n'
    'Interleave_Hit              0.00            0.00\n'
    'Local_Node                  0.00            0.00\n'
    'Other_Node                  0.00            0.00\n'
)

# numastat -m
REAL_SPARSE_NUMASTAT_M = (
    '\n'
    'Per-node system memory usage (in MBs):\n'
    'Token SwapCached not in hash table.\n'
    'Token SecPageTables not in hash table.\n'
    'Token FileHugePages not in hash table.\n'
    'Token FilePmdMapped not in hash table.\n'
    'Token SwapCached not in hash table.\n'
    'Token SecPageTables not in hash table.\n'
    'Token FileHugePages not in hash table.\n'
    'Token FilePmdMapped not in hash table.\n'
    'Token SwapCached not in hash table.\n'
    'Token SecPageTables not in hash table.\n'
    'Token FileHugePages not in hash table.\n'
    'Token FilePmdMapped not in hash table.\n'
    '                          Node 0          Node 1          Node 3           Total\n'
    '                 --------------- --------------- --------------- ---------------\n'
    'MemTotal                 1024.00          512.00          256.00         1792.00\n'
    'MemFree                  1024.00          512.00          256.00         1792.00\n'
    'MemUsed                     0.00            0.00            0.00            0.00\n'
    'Active                      0.00            0.00            0.00            0.00\n'
    'Inactive                    0.00            0.00            0.00            0.00\n'
    'Active(anon)                0.00            0.00            0.00            0.00\n'
    'Inactive(anon)              0.00            0.00            0.00            0.00\n'
    'Active(file)                0.00            0.00            0.00            0.00\n'
    'Inactive(file)              0.00            0.00            0.00            0.00\n'
    'Unevictable                 0.00            0.00            0.00            0.00\n'
    'Mlocked                     0.00            0.00            0.00            0.00\n'
    'Dirty                       0.00            0.00            0.00            0.00\n'
    'Writeback                   0.00            0.00            0.00            0.00\n'
    'FilePages                   0.00            0.00            0.00            0.00\n'
    'Mapped                      0.00            0.00            0.00            0.00\n'
    'AnonPages                   0.00            0.00            0.00            0.00\n'
    'Shmem                       0.00            0.00            0.00            0.00\n'
    'KernelStack                 0.00            0.00            0.00            0.00\n'
    'PageTables                  0.00            0.00            0.00            0.00\n'
    'NFS_Unstable                0.00            0.00            0.00            0.00\n'
    'Bounce                      0.00            0.00            0.00            0.00\n'
    'WritebackTmp                0.00            0.00            0.00            0.00\n'
    'Slab                        0.00            0.00            0.00            0.00\n'
    'SReclaimable                0.00            0.00            0.00            0.00\n'
    'SUnreclaim                  0.00            0.00            0.00            0.00\n'
    'AnonHugePages               0.00            0.00            0.00            0.00\n'
    'ShmemHugePages              0.00            0.00            0.00            0.00\n'
    'ShmemPmdMapped              0.00            0.00            0.00            0.00\n'
    'HugePages_Total             0.00            0.00            0.00            0.00\n'
    'HugePages_Free              0.00            0.00            0.00            0.00\n'
    'HugePages_Surp              0.00            0.00            0.00            0.00\n'
    'KReclaimable                0.00            0.00            0.00            0.00\n'
)


# --------------------------------------------------------------------------- #
# parsers: one set of regular expressions for the real tools and for cdmfs
# --------------------------------------------------------------------------- #

HW_AVAILABLE = re.compile(r"available: (\d+) nodes \(([0-9,-]*)\)")
HW_CPUS = re.compile(r"node (\d+) cpus:((?: \d+)*)")
HW_SIZE = re.compile(r"node (\d+) size: (\d+) MB")
HW_FREE = re.compile(r"node (\d+) free: (\d+) MB")
HW_DIST_TITLE = re.compile(r"node distances:")
HW_DIST_HEAD = re.compile(r"node ((?:[ \d]{2}\d )+)")       # "% 3d " per node
HW_DIST_ROW = re.compile(r"([ \d]{2}\d): ((?:[ \d]{2}\d )+)")
HW_DEVICE = re.compile(r"device ([A-Za-z0-9_.-]+):((?: \S.*)?)")  # cdmfs's own lines

NS_TITLE = re.compile(
    r"Per-node (?:(?:numastat info|system memory usage) \(in MBs\):"
    r"|process memory usage \(in MBs\)(?: for (?:PID \d+ \(.*\)|region [A-Za-z0-9_.-]+))?)")
NS_TOKEN = re.compile(r"Token \S+ not in hash table\.")      # numastat's own noise
NS_COMPAT_HEAD = re.compile(r" {16}((?: +node\d+)+)")
NS_COMPAT_ROW = re.compile(r"(numa_hit|numa_miss|numa_foreign|interleave_hit|local_node|other_node)"
                           r" +(\d+(?: +\d+)*)")
COLUMN = r"(?:Node \d+|private:[A-Za-z0-9_.-]+|Total)"
NS_HEAD = re.compile(rf"(PID|Region)? +({COLUMN}(?: +{COLUMN})*)")
NS_RULE = re.compile(r"-* +-+(?: -+)*")
NS_ROW = re.compile(r"(\S(?:.*?\S)?) +(\d+\.\d\d(?: +\d+\.\d\d)*)")


def parse_nodelist(text):
    out = []
    for piece in filter(None, text.split(",")):
        lo, _, hi = piece.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def parse_hardware(text):
    """numactl --hardware's lines, each matched whole, in order."""
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    m = HW_AVAILABLE.fullmatch(lines.pop(0))
    assert m, text
    nodes = parse_nodelist(m.group(2))
    assert int(m.group(1)) == len(nodes)
    hw = {"nodes": nodes, "cpus": {}, "size": {}, "free": {}, "distance": {}, "devices": {}}
    for nid in nodes:
        for rx, key in ((HW_CPUS, "cpus"), (HW_SIZE, "size"), (HW_FREE, "free")):
            m = rx.fullmatch(lines.pop(0))
            assert m and int(m.group(1)) == nid, text
            hw[key][nid] = [int(c) for c in m.group(2).split()] if key == "cpus" else int(m.group(2))
    assert HW_DIST_TITLE.fullmatch(lines.pop(0))
    m = HW_DIST_HEAD.fullmatch(lines.pop(0))
    assert m and [int(x) for x in m.group(1).split()] == nodes
    for nid in nodes:
        m = HW_DIST_ROW.fullmatch(lines.pop(0))
        assert m and int(m.group(1)) == nid
        row = [int(x) for x in m.group(2).split()]
        assert len(row) == len(nodes)
        hw["distance"][nid] = dict(zip(nodes, row))
    for line in lines:
        m = HW_DEVICE.fullmatch(line)
        assert m, line
        hw["devices"][m.group(1)] = m.group(2).strip()
    return hw


def parse_numastat(text):
    """numastat's tables: [{"title", "first", "columns", "rows": {label: [values]}}].

    Every line must match; every line of a table section has the same length (the
    fixed-width cells); a folded table is joined back into one."""
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    tables = []
    i = 0
    while i < len(lines):
        if lines[i] == "":
            i += 1
            continue
        title = None
        if NS_TITLE.fullmatch(lines[i]):
            title = lines[i]
            i += 1
        while i < len(lines) and NS_TOKEN.fullmatch(lines[i]):
            i += 1
        table = {"title": title, "first": None, "columns": [], "rows": {}}
        while True:                       # one section per fold
            section = []
            while i < len(lines) and lines[i] != "" and not NS_TITLE.fullmatch(lines[i]):
                section.append(lines[i])
                i += 1
            assert section, text
            assert len({len(l) for l in section}) == 1, section
            if title is None:             # the old numastat: raw page counts
                m = NS_COMPAT_HEAD.fullmatch(section[0])
                assert m, section[0]
                cols = m.group(1).split()
                assert len(section[0]) == 16 * (1 + len(cols))
                for line in section[1:]:
                    m = NS_COMPAT_ROW.fullmatch(line)
                    assert m, line
                    vals = [int(v) for v in m.group(2).split()]
                    assert len(vals) == len(cols)
                    table["rows"].setdefault(m.group(1), []).extend(vals)
            else:
                m = NS_HEAD.fullmatch(section[0])
                assert m, section[0]
                table["first"] = m.group(1)
                cols = re.findall(COLUMN, m.group(2))
                assert NS_RULE.fullmatch(section[1]), section[1]
                for line in section[2:]:
                    if NS_RULE.fullmatch(line):
                        continue
                    m = NS_ROW.fullmatch(line)
                    assert m, line
                    vals = [float(v) for v in m.group(2).split()]
                    assert len(vals) == len(cols), line
                    table["rows"].setdefault(m.group(1), []).extend(vals)
            table["columns"] += cols
            # a blank line then a head line without a title: the next fold
            if (title is not None and i + 1 < len(lines) and lines[i] == ""
                    and NS_HEAD.fullmatch(lines[i + 1]) and not NS_TITLE.fullmatch(lines[i + 1])):
                i += 1
                continue
            if (title is None and i + 1 < len(lines) and lines[i] == ""
                    and NS_COMPAT_HEAD.fullmatch(lines[i + 1])):
                i += 1
                continue
            break
        tables.append(table)
    return tables


def check_totals(table):
    """The Total column (where there is one) adds up the others, to rounding."""
    if "Total" not in table["columns"]:
        return
    t = table["columns"].index("Total")
    for label, vals in table["rows"].items():
        others = vals[:t] + vals[t + 1:]
        assert abs(sum(others) - vals[t]) <= 0.01 * len(others), (label, vals)


def check_process_layout(text, columns):
    """numastat -p's fixed layout: a 17-column label (16 + gutter), 16-column cells."""
    lines = text.splitlines()
    n = len(columns)
    assert lines[2] == " " * 17 + "".join(c.rjust(16) for c in columns)
    assert lines[3] == " " * 17 + (" " + "-" * 15) * n
    assert lines[-2] == "-" * 16 + " " + (" " + "-" * 15) * n
    assert lines[-1].startswith("Total" + " " * 12) and len(lines[-1]) == 17 + 16 * n


def strip_devices(text):
    return "".join(l + "\n" for l in text.splitlines() if not l.startswith("device "))


def strip_tokens(text):
    return "".join(l + "\n" for l in text.splitlines() if not NS_TOKEN.fullmatch(l))


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def default_mount():
    with cdmfs.mounted() as m:
        yield m


@pytest.fixture(scope="module")
def sparse_mount():
    """SPARSE_CONFIG, never written to: its output must stay the recorded one."""
    with cdmfs.mounted(config=SPARSE_CONFIG) as m:
        yield m


def cli(*args, check=True):
    env = dict(os.environ)
    env.pop("NUMASTAT_WIDTH", None)
    r = subprocess.run([sys.executable, "-m", "cdmfs", *args], capture_output=True, text=True,
                       env=env, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def touch(path, pages, first=0):
    fd = os.open(path, os.O_RDWR)
    try:
        for p in range(first, first + pages):
            os.pwrite(fd, b"\xa5", p * PAGE)
    finally:
        os.close(fd)


def new_region(mount, name, size):
    d = os.path.join(mount.path, "regions", name)
    os.mkdir(d)
    os.truncate(os.path.join(d, "data"), size)
    return os.path.join(d, "data")


# --------------------------------------------------------------------------- #
# the recorded samples parse
# --------------------------------------------------------------------------- #


def test_host_samples_parse():
    hw = parse_hardware(HOST_HARDWARE)
    assert hw["nodes"] == [0] and hw["cpus"][0] == [0, 1]
    assert hw["size"][0] == 12634 and hw["free"][0] == 11947
    assert hw["distance"] == {0: {0: 10}} and hw["devices"] == {}

    (t,) = parse_numastat(HOST_NUMASTAT)
    assert t["title"] is None and t["columns"] == ["node0"]
    assert t["rows"]["numa_hit"] == [12552589] and t["rows"]["interleave_hit"] == [1134]

    (t,) = parse_numastat(HOST_NUMASTAT_N)
    assert t["columns"] == ["Node 0", "Total"] and t["rows"]["Interleave_Hit"] == [4.43, 4.43]
    assert list(t["rows"]) == ["Numa_Hit", "Numa_Miss", "Numa_Foreign", "Interleave_Hit",
                               "Local_Node", "Other_Node"]

    (t,) = parse_numastat(HOST_NUMASTAT_M)
    assert t["columns"] == ["Node 0", "Total"] and t["rows"]["MemTotal"] == [12634.20, 12634.20]
    assert len(t["rows"]) == 32

    (t,) = parse_numastat(HOST_NUMASTAT_P)
    assert t["title"].endswith("for PID 11634 (bash)") and t["first"] is None
    assert list(t["rows"]) == ["Huge", "Heap", "Stack", "Private", "Total"]
    assert t["rows"]["Total"] == [4.06, 4.06]

    (t,) = parse_numastat(HOST_NUMASTAT_P2)
    assert t["first"] == "PID" and t["rows"]["11634 (bash)"] == [4.06, 4.06]

    for text in (HOST_NUMASTAT_N, HOST_NUMASTAT_M, HOST_NUMASTAT_P, HOST_NUMASTAT_P2):
        for t in parse_numastat(text):
            check_totals(t)


def test_real_tools_on_cdmfs_samples_parse():
    hw = parse_hardware(REAL_SPARSE_HARDWARE)
    assert hw["nodes"] == [0, 1, 3]
    assert hw["cpus"] == {0: [0], 1: [1], 3: []}
    assert hw["size"] == {0: 1024, 1: 512, 3: 256} == hw["free"]
    assert hw["distance"][1] == {0: 21, 1: 10, 3: 45}
    (t,) = parse_numastat(REAL_SPARSE_NUMASTAT)
    assert t["columns"] == ["node0", "node1", "node3"]
    (t,) = parse_numastat(REAL_SPARSE_NUMASTAT_N)
    assert t["columns"] == ["Node 0", "Node 1", "Node 3", "Total"]
    (folded,) = parse_numastat(REAL_SPARSE_NUMASTAT_N_50)
    assert folded == t
    (t,) = parse_numastat(REAL_SPARSE_NUMASTAT_M)
    assert t["rows"]["MemTotal"] == [1024.0, 512.0, 256.0, 1792.0]


# --------------------------------------------------------------------------- #
# cdmfs hardware
# --------------------------------------------------------------------------- #


def test_hardware_default(default_mount):
    path = default_mount.path
    text = report.hardware(path)
    hw = parse_hardware(text)
    node_dir = os.path.join(path, "sys/devices/system/node")
    host_cpus = parse_nodelist(open(os.path.join(node_dir, "node0/cpulist")).read().strip())
    assert hw["nodes"] == [0, 1]
    assert hw["cpus"] == {0: host_cpus, 1: []}
    assert "node 1 cpus:\n" in text                  # numactl's line for a cpuless node
    assert hw["size"] == {0: 1024, 1: 1024}
    assert hw["distance"] == {0: {0: 10, 1: 40}, 1: {0: 40, 1: 10}}
    # one line per entry of devices/, whatever that directory holds today
    devdir = os.path.join(path, "devices")
    names = sorted(os.listdir(devdir)) if os.path.isdir(devdir) else []
    assert sorted(hw["devices"]) == names
    for name, desc in hw["devices"].items():
        d = os.path.join(devdir, name)
        if os.path.exists(os.path.join(d, "type")):
            kind = open(os.path.join(d, "type")).read().strip()
            assert desc.startswith(kind)
            if kind == "coherent" and os.path.exists(os.path.join(d, "node")):
                assert f"node {open(os.path.join(d, 'node')).read().strip()}" in desc
        if os.path.exists(os.path.join(d, "meminfo")):
            assert "size 1024 MB" in desc

    r = cli("hardware", path)
    assert r.stdout == text and r.stderr == ""


def test_hardware_matches_real_numactl(sparse_mount):
    text = report.hardware(sparse_mount.path)
    assert strip_devices(text) == REAL_SPARSE_HARDWARE
    hw = parse_hardware(text)
    assert hw["distance"] == parse_hardware(REAL_SPARSE_HARDWARE)["distance"]
    assert cli("hardware", sparse_mount.path).stdout == text


# --------------------------------------------------------------------------- #
# cdmfs numastat
# --------------------------------------------------------------------------- #


def test_numastat_matches_real_numastat(sparse_mount):
    p = sparse_mount.path
    assert report.numastat(p) == REAL_SPARSE_NUMASTAT
    assert report.numastat(p, nodes_only=True) == REAL_SPARSE_NUMASTAT_N
    assert report.numastat(p, nodes_only=True, width=50) == REAL_SPARSE_NUMASTAT_N_50
    assert report.numastat(p, meminfo=True) == strip_tokens(REAL_SPARSE_NUMASTAT_M)
    assert report.numastat(p, meminfo=True, nodes_only=True) == (
        strip_tokens(REAL_SPARSE_NUMASTAT_M) + REAL_SPARSE_NUMASTAT_N)
    assert cli("numastat", p).stdout == REAL_SPARSE_NUMASTAT
    assert cli("numastat", p, "-n").stdout == REAL_SPARSE_NUMASTAT_N
    assert cli("numastat", p, "-m").stdout == strip_tokens(REAL_SPARSE_NUMASTAT_M)
    env = dict(os.environ, NUMASTAT_WIDTH="50")
    r = subprocess.run([sys.executable, "-m", "cdmfs", "numastat", "-n", p], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.stdout == REAL_SPARSE_NUMASTAT_N_50


def test_numastat_counts_move_with_touched_pages(default_mount):
    p = default_mount.path
    data = new_region(default_mount, "r", 1 << 20)
    (compat0,) = parse_numastat(report.numastat(p))
    (n0,) = parse_numastat(report.numastat(p, nodes_only=True))
    (m0,) = parse_numastat(report.numastat(p, meminfo=True))
    (r0,) = parse_numastat(report.numastat(p, regions=["r"]))
    assert r0["rows"]["Total"] == [0.0] * len(r0["columns"])

    touch(data, 64)                               # 64 pages = 0.25 MB, first touch from the CPU

    (compat,) = parse_numastat(report.numastat(p))
    assert compat["columns"] == ["node0", "node1"]
    hit = compat["rows"]["numa_hit"]
    assert hit[0] - compat0["rows"]["numa_hit"][0] == 64
    assert compat["rows"]["local_node"][0] - compat0["rows"]["local_node"][0] == 64
    assert hit[1] == compat0["rows"]["numa_hit"][1]

    (n,) = parse_numastat(report.numastat(p, nodes_only=True))
    assert n["columns"] == ["Node 0", "Node 1", "Total"]
    assert abs(n["rows"]["Numa_Hit"][0] - n0["rows"]["Numa_Hit"][0] - 0.25) < 0.011
    assert n["rows"]["Numa_Hit"][0] == round(hit[0] * PAGE / MB, 2)
    check_totals(n)

    (m,) = parse_numastat(report.numastat(p, meminfo=True))
    assert abs(m["rows"]["MemUsed"][0] - m0["rows"]["MemUsed"][0] - 0.25) < 0.011
    assert m["rows"]["MemTotal"] == [1024.0, 1024.0, 2048.0]
    check_totals(m)

    text = report.numastat(p, regions=["r"])
    (t,) = parse_numastat(text)
    assert t["title"] == "Per-node process memory usage (in MBs) for region r"
    assert t["columns"][:2] == ["Node 0", "Node 1"] and t["columns"][-1] == "Total"
    assert "private:gpu0" in t["columns"]          # device-private memory: its own column
    private = dict(zip(t["columns"], t["rows"]["Private"]))
    assert private == {**{c: 0.0 for c in t["columns"]}, "Node 0": 0.25, "Total": 0.25}
    assert t["rows"]["Total"] == t["rows"]["Private"]
    assert t["rows"]["Huge"] == t["rows"]["Heap"] == t["rows"]["Stack"] == [0.0] * len(t["columns"])
    # the layout of numastat -p: a 17-column label (16 + gutter) then 16-column cells
    check_process_layout(text, t["columns"])
    check_process_layout(HOST_NUMASTAT_P, ["Node 0", "Total"])
    check_totals(t)

    assert cli("numastat", p, "r").stdout == text
    both = cli("numastat", p, "-m", "-n", "r").stdout
    assert [x["title"] for x in parse_numastat(both)] == [
        "Per-node process memory usage (in MBs) for region r",
        "Per-node system memory usage (in MBs):", "Per-node numastat info (in MBs):"]


def test_numastat_several_regions(default_mount):
    p = default_mount.path
    a = new_region(default_mount, "ra", 1 << 20)
    b = new_region(default_mount, "region-with-a-long-name.x", 1 << 20)
    touch(a, 32)
    touch(b, 96)
    text = report.numastat(p, regions=["ra", "region-with-a-long-name.x"])
    (t,) = parse_numastat(text)
    assert t["title"] == "Per-node process memory usage (in MBs)" and t["first"] == "Region"
    assert t["rows"]["ra"][0] == 0.12 and t["rows"]["ra"][-1] == 0.12   # 32 pages = 0.125 MB
    # numastat cuts a label to the column's 24 characters, gutter included
    assert t["rows"]["region-with-a-long-name."][0] == 0.38            # 0.375 MB
    assert t["rows"]["Total"][0] == 0.5
    check_totals(t)
    assert cli("numastat", p, "ra", "region-with-a-long-name.x").stdout == text


def test_errors(default_mount, tmp_path):
    for args in (("hardware", str(tmp_path)), ("numastat", str(tmp_path)),
                 ("numastat", str(tmp_path / "missing")),
                 ("numastat", default_mount.path, "no-such-region"),
                 ("numastat", default_mount.path, "-n", "../r")):
        r = cli(*args, check=False)
        assert r.returncode == 1, args
        assert r.stdout == ""
        assert r.stderr.startswith("cdmfs: ") and r.stderr.count("\n") == 1, r.stderr
    with pytest.raises(report.ReportError, match="not a cdmfs mount"):
        report.hardware(str(tmp_path))
    with pytest.raises(report.ReportError, match="no region"):
        report.numastat(default_mount.path, regions=["nope"])


def fake_mount(tmp_path, nodes=(0,)):
    """A tree laid out like a mount: nodeN of 2048 MB (1024 free), CPUs 0-3 on
    node 0; cdm0 coherent on node 1, gpu0 private, each 1024 MB (512 free)."""
    node = tmp_path / "sys/devices/system/node"
    node.mkdir(parents=True)
    (node / "online").write_text(",".join(map(str, nodes)) + "\n")
    for nid in nodes:
        (node / f"node{nid}").mkdir()
        (node / f"node{nid}/cpulist").write_text("0-3\n" if nid == 0 else "\n")
        (node / f"node{nid}/distance").write_text(" ".join("10" if o == nid else "40" for o in nodes) + "\n")
        (node / f"node{nid}/meminfo").write_text(
            f"Node {nid} MemTotal:        2097152 kB\nNode {nid} MemFree:         1048576 kB\n")
    (tmp_path / "regions").mkdir()
    meminfo = "MemTotal:        1048576 kB\nMemFree:          524288 kB\nMemUsed:          524288 kB\n"
    for name, kind, nid in (("cdm0", "coherent", "1"), ("gpu0", "private", "-1")):
        d = tmp_path / "devices" / name
        d.mkdir(parents=True)
        (d / "type").write_text(kind + "\n")
        (d / "node").write_text(nid + "\n")
        (d / "meminfo").write_text(meminfo)
    (tmp_path / "devices/bare").mkdir()        # no files yet: just its name
    return str(tmp_path)


def test_device_lines_from_devices_files(tmp_path):
    """SPEC §7's devices/NAME/{type,node,meminfo}, on a tree laid out like a mount."""
    text = report.hardware(fake_mount(tmp_path, nodes=(0, 1)))
    assert text == (
        "available: 2 nodes (0-1)\n"
        "node 0 cpus: 0 1 2 3\n"
        "node 0 size: 2048 MB\n"
        "node 0 free: 1024 MB\n"
        "node 1 cpus:\n"
        "node 1 size: 2048 MB\n"
        "node 1 free: 1024 MB\n"
        "node distances:\n"
        "node   0   1 \n"
        "  0:  10  40 \n"
        "  1:  40  10 \n"
        "device bare:\n"
        "device cdm0: coherent, node 1, size 1024 MB, free 512 MB\n"
        "device gpu0: private, size 1024 MB, free 512 MB\n")
    assert parse_hardware(text)["devices"] == {
        "bare": "", "cdm0": "coherent, node 1, size 1024 MB, free 512 MB",
        "gpu0": "private, size 1024 MB, free 512 MB"}


def test_device_line_of_an_absent_node(tmp_path):
    """A coherent device whose node has no nodeN directory: numactl shows no node
    1, so neither does the device line, nor memory of it."""
    text = report.hardware(fake_mount(tmp_path, nodes=(0,)))
    assert text.endswith(
        "  0:  10 \n"
        "device bare:\n"
        "device cdm0: coherent, not present\n"
        "device gpu0: private, size 1024 MB, free 512 MB\n"), text


ABSENT_CONFIG = """
block_size = "4M"
[[node]]
id = 0
kind = "sysram"
size = "8M"
cpus = "0-3"
[[node]]
id = 1
kind = "cdm"
size = "8M"
present = false
[[device]]
name = "cdm0"
memory = "node:1"
[[device]]
name = "gpu0"
memory = "private:8M"
"""


def test_hardware_before_and_after_hot_add():
    """A configured node that is not present yet: `cdmfs hardware` shows what
    numactl --hardware shows, and the device's node once probe adds it."""
    with cdmfs.mounted(ABSENT_CONFIG) as m:
        before = report.hardware(m.path)
        assert before == (
            "available: 1 nodes (0)\n"
            "node 0 cpus: 0 1 2 3\n"
            "node 0 size: 8 MB\n"
            "node 0 free: 8 MB\n"
            "node distances:\n"
            "node   0 \n"
            "  0:  10 \n"
            "device cdm0: coherent, not present\n"
            "device gpu0: private, size 8 MB, free 8 MB\n")
        assert "node 1" not in before
        assert cli("hardware", m.path).stdout == before
        m.probe(8 << 20)                                 # node 1's first block
        after = parse_hardware(report.hardware(m.path))
        assert after["nodes"] == [0, 1]
        assert after["size"][1] == 4
        assert after["devices"]["cdm0"].startswith("coherent, node 1, size ")
        # The device's memory is its node's: one 4 MiB block of the 8 configured.
        assert m.device("cdm0").meminfo["MemTotal"] == m.node(1).meminfo["MemTotal"] == 4096
        assert after["devices"]["cdm0"] == "coherent, node 1, size 4 MB, free 4 MB"
