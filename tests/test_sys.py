"""The sys/ tree through a real mount (SPEC §4, §5): kernel formats compared with
this host's own sysfs, node masks, distances, HMAT access figures, links,
permissions, the writable switches, and hwloc reading the tree as its root.

Everything is read and written the way a user would: ``cat``, ``ls -l``,
``readlink``, ``echo ... > file`` through ``sh -c``, and plain Python file I/O.
Two machines are mounted once per module: the embedded default and a custom
three-node config.  No test asserts anything about timing.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess

import pytest

import cdmfs
from cdmfs.fs import formats

HOST_NODE = "/sys/devices/system/node"
HOST_CPU = "/sys/devices/system/cpu"
NODE = "sys/devices/system/node"
CPU = "sys/devices/system/cpu"
WEIGHTS = "sys/kernel/mm/mempolicy/weighted_interleave"
MASKS = ("possible", "online", "has_cpu", "has_memory", "has_normal_memory",
         "has_generic_initiator", "has_coherent_device")
ACCESS = ("read_bandwidth", "write_bandwidth", "read_latency", "write_latency")
# vm events the kernel keeps machine-wide only (/proc/vmstat), never per node.
VM_EVENTS = ["pgfault", "pgmigrate_success", "pgmigrate_fail", "pgalloc_normal", "pgfree"]
TIMEOUT = 60  # a hung mount must not hang the run; no test asserts on time

# Three nodes: two sysram with one CPU each around a CDM node, a device on the
# CDM node, a non-default distance matrix and HMAT figures for CPU -> node 1.
CUSTOM_CONFIG = """
block_size = "128M"

[[node]]
id = 0
kind = "sysram"
size = "256M"
cpus = "0"

[[node]]
id = 1
kind = "cdm"
size = "256M"

[[node]]
id = 2
kind = "sysram"
size = "256M"
cpus = "1"

[[device]]
name = "acc0"
memory = "node:1"

[distance]
matrix = [[10, 30, 21], [30, 10, 35], [21, 35, 10]]

[[access]]
initiator = "cpu"
target = "node:1"
read_latency = 250
write_latency = 300
read_bandwidth = 50000
write_bandwidth = 45000
"""


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def host_read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        pytest.skip(f"host has no readable {path}: {e.strerror}")


def host_online_cpus() -> set:
    try:
        with open(f"{HOST_CPU}/online") as f:
            return formats.parse_cpulist(f.read())
    except OSError:
        return set(range(os.cpu_count() or 1))


def run(*cmd: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT)


def sh(script: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return run("sh", "-c", script, cwd=cwd)


def cat(path: str) -> str:
    """The file's content as ``cat`` prints it."""
    done = run("cat", path)
    assert done.returncode == 0, f"cat {path}: {done.stderr}"
    return done.stdout


def readlink(path: str) -> str:
    done = run("readlink", path)
    assert done.returncode == 0, f"readlink {path}: {done.stderr}"
    return done.stdout.rstrip("\n")


def py_read(path: str) -> str:
    with open(path) as f:
        return f.read()


def py_write(path: str, data: bytes) -> int:
    """One write() of data, as echo does; returns the write's result."""
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def shell_write_fails_einval(path: str, word: str) -> None:
    """``echo WORD > path`` fails: a non-zero exit from sh, and the shell names
    the error (bash's and coreutils' echo print strerror; dash's says I/O error)."""
    done = sh(f"echo {word} > {path}")
    assert done.returncode != 0, f"echo {word!r} > {path} succeeded"
    assert done.stderr, "the shell printed no error"
    loud = run("bash", "-c", f"echo {word} > {path}") if shutil.which("bash") else \
        sh(f"env echo {word} > {path}")
    assert loud.returncode != 0
    assert "Invalid argument" in loud.stderr, loud.stderr


def py_write_fails_einval(path: str, data: bytes) -> None:
    with pytest.raises(OSError) as e:
        py_write(path, data)
    assert e.value.errno == errno.EINVAL, f"write {data!r} to {path}: {e.value}"


MEMINFO_RE = re.compile(r"^Node \d+ (\S+):\s+(\d+)( kB)?$")


def meminfo_layout(text: str) -> list:
    """[(key, number, has_kB, column where the number ends)] per line."""
    out = []
    for line in text.splitlines():
        m = MEMINFO_RE.match(line)
        assert m, f"meminfo line not in the kernel's format: {line!r}"
        out.append((m.group(1), m.group(2), bool(m.group(3)), m.end(2)))
    return out


def keys_of(text: str) -> list:
    out = []
    for line in text.splitlines():
        assert re.fullmatch(r"[a-z_]+ \d+", line), f"not a 'key value' line: {line!r}"
        out.append(line.split()[0])
    return out


def cpumask_bits(text: str) -> set:
    value = int(text.strip().replace(",", ""), 16)
    return {i for i in range(value.bit_length()) if value >> i & 1}


# --------------------------------------------------------------------------- #
# the two machines
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def default_mount():
    """The embedded default machine (SPEC §3), unmounted at module end."""
    with cdmfs.mounted() as m:
        yield m


@pytest.fixture(scope="module")
def custom_mount():
    """CUSTOM_CONFIG (its CPUs 0 and 1 are the emulated machine's, on any host)."""
    with cdmfs.mounted(CUSTOM_CONFIG) as m:
        yield m


def expect_default() -> dict:
    cpus = host_online_cpus()
    return {
        "nodes": [0, 1],
        "masks": {"possible": "0-1", "online": "0-1", "has_cpu": "0", "has_memory": "0-1",
                  "has_normal_memory": "0", "has_generic_initiator": "",
                  "has_coherent_device": "1"},
        "distance": {0: [10, 40], 1: [40, 10]},
        "memtotal_kb": {0: 1048576, 1: 1048576},
        # read_bandwidth, write_bandwidth, read_latency, write_latency (SPEC §3)
        "access": {0: (100000, 100000, 80, 80), 1: (32000, 32000, 400, 400)},
        "initiators": {0: [0], 1: [0]},
        "cpus": {0: cpus, 1: set()},
        "isolated": {0: "0", 1: "1"},
    }


def expect_custom() -> dict:
    return {
        "nodes": [0, 1, 2],
        "masks": {"possible": "0-2", "online": "0-2", "has_cpu": "0,2", "has_memory": "0-2",
                  "has_normal_memory": "0,2", "has_generic_initiator": "",
                  "has_coherent_device": "1"},
        "distance": {0: [10, 30, 21], 1: [30, 10, 35], 2: [21, 35, 10]},
        "memtotal_kb": {0: 262144, 1: 262144, 2: 262144},
        "access": {0: (100000, 100000, 80, 80), 1: (50000, 45000, 250, 300),
                   2: (100000, 100000, 80, 80)},
        # access0 holds the nearest CPU nodes: node 1 is at 30 from node 0, 35 from 2.
        "initiators": {0: [0], 1: [0], 2: [2]},
        "cpus": {0: {0}, 1: set(), 2: {1}},
        "isolated": {0: "0", 1: "1", 2: "0"},
    }


@pytest.fixture(params=["default", "custom"])
def machine(request):
    """(mount, what SPEC and the config say it shows), for each machine."""
    if request.param == "default":
        return request.getfixturevalue("default_mount"), expect_default()
    return request.getfixturevalue("custom_mount"), expect_custom()


def node_dir(m, nid: int) -> str:
    return os.path.join(m.path, NODE, f"node{nid}")


# --------------------------------------------------------------------------- #
# 1. formats, against the host's files
# --------------------------------------------------------------------------- #


def test_meminfo_matches_host_line_for_line(machine):
    m, want = machine
    host = meminfo_layout(host_read(f"{HOST_NODE}/node0/meminfo"))
    for nid in want["nodes"]:
        ours = meminfo_layout(cat(os.path.join(node_dir(m, nid), "meminfo")))
        assert [k for k, *_ in ours] == [k for k, *_ in host], f"node{nid}: key order"
        for (key, _, kb, end), (hkey, hnum, hkb, hend) in zip(ours, host):
            assert kb == hkb, f"node{nid} {key}: kB unit differs from the host"
            # The kernel pads to %8lu kB / %5u; a host number wider than that
            # pushes its own column right, so compare only where it fits.
            if len(hnum) <= (8 if hkb else 5):
                assert end == hend, f"node{nid} {key}: number ends at column {end}, host {hend}"


def test_meminfo_values(machine):
    m, want = machine
    for nid in want["nodes"]:
        info = m.node(nid).meminfo
        assert info["MemTotal"] == want["memtotal_kb"][nid]
        assert info["MemUsed"] == info["MemTotal"] - info["MemFree"]
        assert 0 <= info["MemFree"] <= info["MemTotal"]
        assert info["HugePages_Total"] == info["HugePages_Free"] == info["HugePages_Surp"] == 0
        # The lines of a node name that node.
        text = py_read(os.path.join(node_dir(m, nid), "meminfo"))
        assert all(line.startswith(f"Node {nid} ") for line in text.splitlines())


def test_default_nodes_are_one_gib(default_mount):
    for nid in (0, 1):
        line = cat(os.path.join(node_dir(default_mount, nid), "meminfo")).splitlines()[0]
        assert line == f"Node {nid} MemTotal:        1048576 kB"


def test_numastat_keys_equal_host(machine):
    m, want = machine
    host = keys_of(host_read(f"{HOST_NODE}/node0/numastat"))
    for nid in want["nodes"]:
        assert keys_of(cat(os.path.join(node_dir(m, nid), "numastat"))) == host


def test_vmstat_keys_equal_host(machine):
    """The node vmstat is the kernel's, key for key: no vm events, which the
    kernel keeps machine-wide (they are in proc/vmstat)."""
    m, want = machine
    host = keys_of(host_read(f"{HOST_NODE}/node0/vmstat"))
    for nid in want["nodes"]:
        keys = keys_of(cat(os.path.join(node_dir(m, nid), "vmstat")))
        assert keys == host
        for key in ("nr_free_pages", "nr_anon_pages", "numa_hit", "numa_miss",
                    "pgpromote_success", "pgdemote_kswapd"):
            assert key in keys
        assert not set(VM_EVENTS) & set(keys)


def test_free_pages_agree_with_meminfo(machine):
    m, want = machine
    for nid in want["nodes"]:
        assert m.node(nid).vmstat["nr_free_pages"] * 4 == m.node(nid).meminfo["MemFree"]


def test_cpumap_cpulist_distance_have_host_shape(machine):
    m, want = machine
    host_map = host_read(f"{HOST_NODE}/node0/cpumap")
    host_list = host_read(f"{HOST_NODE}/node0/cpulist")
    host_dist = host_read(f"{HOST_NODE}/node0/distance")
    map_re = re.compile(r"[0-9a-f]+(,[0-9a-f]{8})*\n")
    list_re = re.compile(r"(\d+(-\d+)?(,\d+(-\d+)?)*)?\n")
    dist_re = re.compile(r"\d+( \d+)*\n")
    assert map_re.fullmatch(host_map) and list_re.fullmatch(host_list) and dist_re.fullmatch(host_dist)
    for nid in want["nodes"]:
        d = node_dir(m, nid)
        cpumap, cpulist, distance = (cat(os.path.join(d, f)) for f in ("cpumap", "cpulist", "distance"))
        assert map_re.fullmatch(cpumap), cpumap
        # Printed over nr_cpu_ids bits, as the host prints its own mask.
        assert len(cpumap) == len(host_map), (cpumap, host_map)
        assert list_re.fullmatch(cpulist), cpulist
        assert dist_re.fullmatch(distance), distance
        assert formats.parse_cpulist(cpulist) == cpumask_bits(cpumap) == want["cpus"][nid]


def test_every_node_file_reads_in_a_kernel_format(machine):
    """cat of every attribute under sys/devices/system/node succeeds and parses."""
    m, want = machine
    nodelist = r"(\d+(-\d+)?(,\d+(-\d+)?)*)?\n"
    shapes = {
        **{name: nodelist for name in MASKS},
        "meminfo": r"(Node \d+ \S+:\s+\d+( kB)?\n)+",
        "numastat": r"([a-z_]+ \d+\n)+",
        "vmstat": r"([a-z_]+ \d+\n)+",
        "cpumap": r"[0-9a-f]+(,[0-9a-f]{8})*\n",
        "cpulist": nodelist,
        "distance": r"\d+( \d+)*\n",
        "isolated": r"[01]\n",
        "numa_balancing": r"[01]\n",
        "reclaim": r"[01]\n",
        **{name: r"\d+\n" for name in ACCESS},
        **{name: r"0\n" for name in ("nr_hugepages", "free_hugepages", "surplus_hugepages",
                                      "runtime_active_time", "runtime_suspended_time")},
        "demote_size": r"2048kB\n",
        "uevent": r"",
        "control": r"auto\n|on\n",
        "runtime_status": r"unsupported\n",
    }
    seen = set()
    stack = [os.path.join(m.path, NODE)]
    while stack:
        for e in os.scandir(stack.pop()):
            if e.is_symlink():
                continue
            if e.is_dir():
                stack.append(e.path)
                continue
            if not os.stat(e.path).st_mode & 0o444:
                continue  # write-only, like the kernel's probe files
            if e.name == "autosuspend_delay_ms":
                # EIO without autosuspend, as the host's node0/power has it
                done = run("cat", e.path)
                assert done.returncode != 0 and "Input/output error" in done.stderr, done
                seen.add(e.name)
                continue
            text = cat(e.path)
            seen.add(e.name)
            if e.name in shapes:
                assert re.fullmatch(shapes[e.name], text), f"{e.path}: {text!r}"
            else:
                assert text.endswith("\n"), f"{e.path}: {text!r}"
    assert set(shapes) - {"numa_balancing", "reclaim"} <= seen


# --------------------------------------------------------------------------- #
# 2. masks, distances, access figures, links, cpus
# --------------------------------------------------------------------------- #


def test_node_masks(machine):
    m, want = machine
    d = os.path.join(m.path, NODE)
    for name in MASKS:
        assert cat(os.path.join(d, name)) == want["masks"][name] + "\n", name
    assert m.nodes == want["nodes"]


def test_node_dirs_are_the_online_nodes(machine):
    m, want = machine
    names = run("ls", os.path.join(m.path, NODE)).stdout.split()
    assert sorted(n for n in names if re.fullmatch(r"node\d+", n)) == [f"node{i}" for i in want["nodes"]]


def test_distance_rows_match_config(machine):
    m, want = machine
    for nid in want["nodes"]:
        row = cat(os.path.join(node_dir(m, nid), "distance"))
        assert row == " ".join(map(str, want["distance"][nid])) + "\n"


def test_access0_figures(machine):
    m, want = machine
    for nid in want["nodes"]:
        d = os.path.join(node_dir(m, nid), "access0", "initiators")
        got = tuple(int(cat(os.path.join(d, name))) for name in ACCESS)
        assert got == want["access"][nid], f"node{nid}"


def test_access0_initiator_links(machine):
    m, want = machine
    for nid in want["nodes"]:
        d = os.path.join(node_dir(m, nid), "access0", "initiators")
        links = sorted(n for n in os.listdir(d) if os.path.islink(os.path.join(d, n)))
        assert links == [f"node{i}" for i in want["initiators"][nid]]
        for i in want["initiators"][nid]:
            link = os.path.join(d, f"node{i}")
            assert readlink(link) == f"../../../node{i}"
            resolved = run("readlink", "-f", link).stdout.strip()
            assert resolved == os.path.realpath(node_dir(m, i))
            assert os.path.isfile(os.path.join(link, "meminfo"))
        # and ls -l shows them as links
        listing = run("ls", "-l", d).stdout
        for i in want["initiators"][nid]:
            assert re.search(rf"^l\S+ .* node{i} -> \.\./\.\./\.\./node{i}$", listing, re.M), listing


def test_node_cpu_links(machine):
    m, want = machine
    cpu_root = os.path.realpath(os.path.join(m.path, CPU))
    for nid in want["nodes"]:
        d = node_dir(m, nid)
        links = {n for n in os.listdir(d) if re.fullmatch(r"cpu\d+", n)}
        assert links == {f"cpu{c}" for c in want["cpus"][nid]}
        for c in want["cpus"][nid]:
            link = os.path.join(d, f"cpu{c}")
            assert os.path.islink(link)
            assert readlink(link) == f"../../cpu/cpu{c}"
            assert os.path.realpath(link) == os.path.join(cpu_root, f"cpu{c}")
            assert os.path.isdir(link)
            # and the CPU points back at its node
            back = os.path.join(link, f"node{nid}")
            assert os.path.islink(back)
            assert os.path.realpath(back) == os.path.realpath(d)


def test_bus_node_devices_links(machine):
    m, want = machine
    bus = os.path.join(m.path, "sys/bus/node/devices")
    assert sorted(os.listdir(bus)) == sorted(f"node{i}" for i in want["nodes"])
    for nid in want["nodes"]:
        link = os.path.join(bus, f"node{nid}")
        assert readlink(link) == f"../../../devices/system/node/node{nid}"
        assert run("readlink", "-f", link).stdout.strip() == os.path.realpath(node_dir(m, nid))
        assert cat(os.path.join(link, "distance")) == cat(os.path.join(node_dir(m, nid), "distance"))


def test_cpu_masks_mirror_host(default_mount):
    # cpus = "all": the host's CPUs, with the host's present and possible ones.
    d = os.path.join(default_mount.path, CPU)
    for name in ("online", "possible", "present", "offline"):
        assert cat(os.path.join(d, name)) == host_read(f"{HOST_CPU}/{name}"), name


def test_custom_cpu_masks_are_the_configured_cpus(custom_mount):
    # Explicit cpulists: the config's CPUs, whatever the host has.
    d = os.path.join(custom_mount.path, CPU)
    for name in ("online", "possible", "present"):
        assert cat(os.path.join(d, name)) == "0-1\n", name
    assert cat(os.path.join(d, "offline")) == "\n"
    assert sorted(n for n in os.listdir(d) if re.fullmatch(r"cpu\d+", n)) == ["cpu0", "cpu1"]
    assert cat(os.path.join(d, "cpu1", "online")) == "1\n"
    # cpu0 has an online file where the host's has one (not on x86).
    assert os.path.exists(os.path.join(d, "cpu0", "online")) == os.path.exists(f"{HOST_CPU}/cpu0/online")


def test_cpu_topology_is_one_package_per_cpu_node(machine):
    """No [cpu] table: a package per CPU node, a thread per core; the host's
    set of topology attributes (tests/test_cpu_topology.py has the rest)."""
    m, want = machine
    cpu_nodes = [nid for nid in want["nodes"] if want["cpus"][nid]]
    host = f"{HOST_CPU}/cpu0/topology"
    for pkg, nid in enumerate(cpu_nodes):
        cpus = sorted(want["cpus"][nid])
        for core, cpu in enumerate(cpus):
            ours = os.path.join(m.path, CPU, f"cpu{cpu}", "topology")
            if os.path.isdir(host):
                assert sorted(os.listdir(ours)) == sorted(os.listdir(host))
            assert cat(os.path.join(ours, "physical_package_id")) == f"{pkg}\n"
            assert cat(os.path.join(ours, "core_id")) == f"{core}\n"
            assert cat(os.path.join(ours, "thread_siblings_list")) == f"{cpu}\n"
            assert cat(os.path.join(ours, "package_cpus_list")) == formats.cpulist(cpus)


# --------------------------------------------------------------------------- #
# 3. permissions
# --------------------------------------------------------------------------- #

RW_NODE_ATTRS = {"isolated", "numa_balancing", "reclaim", "uevent", "control", "autosuspend_delay_ms",
                 "nr_hugepages", "demote_size"}
WO_NODE_ATTRS = {"compact", "demote"}


def test_attribute_modes_and_owner(machine):
    m, want = machine
    uid, gid = os.getuid(), os.getgid()
    checked = 0
    for root, dirs, files in os.walk(os.path.join(m.path, "sys")):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            assert (st.st_uid, st.st_gid) == (uid, gid), path
            if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
                continue
            assert stat.S_ISREG(st.st_mode), path
            mode = stat.S_IMODE(st.st_mode)
            rel = os.path.relpath(path, m.path)
            if rel.startswith(NODE + "/") or rel.startswith(CPU + "/"):
                expected = 0o444
                if rel.startswith(NODE + "/"):
                    expected = 0o644 if name in RW_NODE_ATTRS else 0o200 if name in WO_NODE_ATTRS else 0o444
                assert mode == expected, f"{rel}: {oct(mode)}"
            elif rel.startswith(WEIGHTS + "/"):
                assert mode == 0o644, f"{rel}: {oct(mode)}"
            elif rel.startswith("sys/kernel/tracing/"):  # tracefs' TRACE_MODE_READ/WRITE
                assert mode in (0o440, 0o640), f"{rel}: {oct(mode)}"
            elif rel.startswith("sys/kernel/debug/"):   # debugfs: root's alone
                assert mode in (0o400, 0o600, 0o200), f"{rel}: {oct(mode)}"
            else:  # sysfs modes only: read-only, read-write, write-only
                assert mode in (0o444, 0o644, 0o200), f"{rel}: {oct(mode)}"
            checked += 1
    assert checked > 20


def test_ls_l_shows_sysfs_modes(machine):
    m, want = machine
    for nid in want["nodes"]:
        listing = run("ls", "-l", node_dir(m, nid)).stdout
        assert re.search(r"^-r--r--r-- .* meminfo$", listing, re.M), listing
        assert re.search(r"^-rw-r--r-- .* isolated$", listing, re.M), listing
    listing = run("ls", "-l", os.path.join(m.path, WEIGHTS)).stdout
    for nid in want["nodes"]:
        assert re.search(rf"^-rw-r--r-- .* node{nid}$", listing, re.M), listing


def test_read_only_attributes_refuse_writes(machine):
    m, want = machine
    targets = [os.path.join(node_dir(m, want["nodes"][-1]), "meminfo"),
               os.path.join(node_dir(m, 0), "distance"),
               os.path.join(node_dir(m, 0), "access0", "initiators", "read_bandwidth"),
               os.path.join(m.path, NODE, "has_memory"),
               os.path.join(m.path, CPU, "online")]
    for path in targets:
        before = cat(path)
        done = sh(f"echo 1 > {path}")
        assert done.returncode != 0, path
        assert "Permission denied" in done.stderr or "rror" in done.stderr, done.stderr
        with pytest.raises(PermissionError):
            py_write(path, b"1\n")
        assert cat(path) == before, path


def test_no_new_files_in_sys(default_mount):
    d = os.path.join(default_mount.path, NODE)
    done = sh(f"echo 1 > {d}/newfile")
    assert done.returncode != 0
    assert not os.path.exists(os.path.join(d, "newfile"))


# --------------------------------------------------------------------------- #
# 4. isolated
# --------------------------------------------------------------------------- #


def test_isolated_defaults(machine):
    m, want = machine
    for nid in want["nodes"]:
        assert cat(os.path.join(node_dir(m, nid), "isolated")) == want["isolated"][nid] + "\n"


def test_isolated_toggle_leaves_masks(machine):
    m, want = machine
    masks_dir = os.path.join(m.path, NODE)
    masks = {name: cat(os.path.join(masks_dir, name)) for name in MASKS}
    path = os.path.join(node_dir(m, 1), "isolated")
    try:
        done = sh(f"echo 0 > {path}")
        assert done.returncode == 0, done.stderr
        assert cat(path) == "0\n"
        assert not m.node(1).isolated
        assert {name: cat(os.path.join(masks_dir, name)) for name in MASKS} == masks
        done = sh(f"echo 1 > {path}")
        assert done.returncode == 0, done.stderr
        assert cat(path) == "1\n"
        # A sysram node can be isolated too, and that is no mask change either.
        other = os.path.join(node_dir(m, 0), "isolated")
        assert py_write(other, b"1\n") == 2
        assert py_read(other) == "1\n"
        assert {name: cat(os.path.join(masks_dir, name)) for name in MASKS} == masks
        assert py_write(other, b"0\n") == 2
    finally:
        py_write(path, b"1\n")
        for nid in want["nodes"]:
            py_write(os.path.join(node_dir(m, nid), "isolated"), want["isolated"][nid].encode() + b"\n")
    assert cat(path) == "1\n"


@pytest.mark.parametrize("nid", [0, 1])
def test_isolated_rejects_bad_writes(default_mount, nid):
    path = os.path.join(node_dir(default_mount, nid), "isolated")
    before = cat(path)
    try:
        for data in (b"2\n", b"abc\n", b"\n", b"-1\n", b"10\n", b"yes\n"):
            py_write_fails_einval(path, data)
            assert cat(path) == before, data
        for word in ("2", "abc", "-1", "''"):
            shell_write_fails_einval(path, word)
            assert cat(path) == before, word
        # echo with no word writes just "\n": empty, refused.
        assert sh(f"echo > {path}").returncode != 0
        assert cat(path) == before
        # Opening with O_TRUNC and writing nothing changes nothing.
        assert sh(f": > {path}").returncode == 0
        assert cat(path) == before
    finally:
        py_write(path, before.encode())
    assert cat(path) == before


# --------------------------------------------------------------------------- #
# 5. weighted interleave weights
# --------------------------------------------------------------------------- #


def test_weights_default_to_one(machine):
    m, want = machine
    d = os.path.join(m.path, WEIGHTS)
    assert sorted(os.listdir(d)) == sorted(f"node{i}" for i in want["nodes"])
    for nid in want["nodes"]:
        assert cat(os.path.join(d, f"node{nid}")) == "1\n"


def test_weights_accept_1_to_255(machine):
    m, want = machine
    path = os.path.join(m.path, WEIGHTS, f"node{want['nodes'][-1]}")
    try:
        for value in (1, 2, 17, 128, 255):
            done = sh(f"echo {value} > {path}")
            assert done.returncode == 0, done.stderr
            assert cat(path) == f"{value}\n"
        assert py_write(path, b"42\n") == 3
        assert py_read(path) == "42\n"
        # Only that node's weight changed.
        for nid in want["nodes"][:-1]:
            assert cat(os.path.join(m.path, WEIGHTS, f"node{nid}")) == "1\n"
    finally:
        py_write(path, b"1\n")
    assert cat(path) == "1\n"


def test_weights_reject_out_of_range(default_mount):
    path = os.path.join(default_mount.path, WEIGHTS, "node1")
    try:
        py_write(path, b"7\n")
        for data in (b"0\n", b"256\n", b"x\n", b"\n", b"-1\n", b"1.5\n", b"1000\n"):
            py_write_fails_einval(path, data)
            assert cat(path) == "7\n", data
        for word in ("0", "256", "x"):
            shell_write_fails_einval(path, word)
            assert cat(path) == "7\n", word
    finally:
        py_write(path, b"1\n")
    assert cat(path) == "1\n"


# --------------------------------------------------------------------------- #
# 6. hwloc with the mount as its sysfs root
# --------------------------------------------------------------------------- #


def lstopo(m, *args: str) -> str:
    exe = shutil.which("lstopo-no-graphics")
    if exe is None:
        pytest.skip("lstopo-no-graphics is not installed (Debian: hwloc-nox)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWLOC_")}
    env["HWLOC_FSROOT"] = m.path
    done = subprocess.run([exe, "--of", "console", *args], capture_output=True, text=True,
                          env=env, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def memattrs(text: str) -> dict:
    """{attribute name: {node P#: (value, initiator text)}} of ``lstopo -p --memattrs``."""
    out: dict = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"Memory attribute #\d+ name `(\w+)'", line)
        if head:
            current = out.setdefault(head.group(1), {})
            continue
        row = re.match(r"\s+NUMANode P#(\d+) = (\d+)(.*)$", line)
        if row and current is not None:
            current[int(row.group(1))] = (int(row.group(2)), row.group(3))
    return out


def test_lstopo_shows_every_node_with_its_size(machine):
    m, want = machine
    text = lstopo(m)
    sizes = {int(p): int(mb) for p, mb in re.findall(r"NUMANode L#\d+ \(P#(\d+) (\d+)MB\)", text)}
    assert sizes == {nid: kb // 1024 for nid, kb in want["memtotal_kb"].items()}, text
    if want["nodes"] == [0, 1]:
        assert "(P#0 1024MB)" in text and "(P#1 1024MB)" in text


def test_lstopo_memattrs_show_access_figures(machine):
    m, want = machine
    attrs = memattrs(lstopo(m, "-p", "--memattrs"))
    for nid in want["nodes"]:
        rbw, wbw, rlat, wlat = want["access"][nid]
        assert attrs["ReadBandwidth"][nid][0] == rbw, nid
        assert attrs["WriteBandwidth"][nid][0] == wbw, nid
        assert attrs["ReadLatency"][nid][0] == rlat, nid
        assert attrs["WriteLatency"][nid][0] == wlat, nid
        if rbw == wbw:
            assert attrs["Bandwidth"][nid][0] == rbw, nid
        if rlat == wlat:
            assert attrs["Latency"][nid][0] == rlat, nid
        assert attrs["Capacity"][nid][0] == want["memtotal_kb"][nid] * 1024
        # The figures are from the node's access0 initiators' CPUs.
        cpus = set().union(*(want["cpus"][i] for i in want["initiators"][nid]))
        mask = sum(1 << c for c in cpus)
        found = re.search(r"from cpuset 0x([0-9a-f,x]+)", attrs["ReadBandwidth"][nid][1])
        assert found, attrs["ReadBandwidth"][nid]
        assert int(found.group(1).replace(",", "").replace("0x", ""), 16) == mask


def test_lstopo_default_bandwidths(default_mount):
    attrs = memattrs(lstopo(default_mount, "-p", "--memattrs"))
    assert attrs["Bandwidth"][0][0] == 100000
    assert attrs["Bandwidth"][1][0] == 32000


# --------------------------------------------------------------------------- #
# 7. the rest of a node directory: drivers/base/node.c, the driver core
#    (uevent, power/, subsystem), hugetlb's hugepages/, HMAT's access0/
# --------------------------------------------------------------------------- #

#: What a host's node directory may hold that the emulated one lacks, and why.
NODE_LACKS = {
    "access1": "HMAT's CPU-only access class: every emulated initiator is a CPU node, so "
               "class 1 would repeat class 0, and the emulator registers class 0 only",
    "memory_side_cache": "HMAT memory-side caches: the emulated memory has none",
    "x86": "SGX enclave memory (x86/sgx_total_bytes): the emulated machine has none",
}
#: What the emulated node directory holds that a host's may lack, and why.
NODE_EXTRAS = {
    "access0": "HMAT access class 0 with SPEC §3's figures (a host without HMAT has none)",
    "isolated": "SPEC §5: the CDM node's switch against implicit allocation",
    "numa_balancing": "SPEC §5: the per-node switch for automatic placement",
}
#: Same name, other meaning: the kernel's nodeN/reclaim is write-only proactive
#: reclaim (echo 1G > reclaim); SPEC §5 makes it the 0/1 switch of the CDM
#: discussion, read-write.
NODE_DIFFERS = {"reclaim"}


def config_free(names) -> set:
    """Names of a node directory without the cpuK and memoryB links, which
    follow the machine, not the kernel's layout."""
    return {n for n in names if not re.fullmatch(r"(cpu|memory)\d+", n)}


def host_dir(path: str) -> list:
    if not os.path.isdir(path):
        pytest.skip(f"host has no {path}")
    return os.listdir(path)


def tree_modes(root: str) -> dict:
    """{relative path: (kind, mode)} of everything under root, links not followed."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            out[os.path.relpath(path, root)] = (kind, stat.S_IMODE(st.st_mode))
    return out


def test_node_dir_keys_against_host(machine):
    """Every node directory holds what the host's node0 holds, but for the
    allow-listed names (each with its reason), and nothing else but SPEC's."""
    m, want = machine
    host = config_free(host_dir(f"{HOST_NODE}/node0"))
    for nid in want["nodes"]:
        ours = config_free(os.listdir(node_dir(m, nid)))
        assert host - ours <= set(NODE_LACKS), f"node{nid} lacks {sorted(host - ours - set(NODE_LACKS))}"
        assert ours - host <= set(NODE_EXTRAS), f"node{nid} has {sorted(ours - host - set(NODE_EXTRAS))}"
    # The node subsystem's root too: its masks, uevent and power/.
    root = {n for n in os.listdir(os.path.join(m.path, NODE)) if not re.fullmatch(r"node\d+", n)}
    host_root = {n for n in host_dir(HOST_NODE) if not re.fullmatch(r"node\d+", n)}
    assert root - host_root == {"has_coherent_device"}
    assert host_root <= root


def test_node_subtrees_and_modes_equal_host(machine):
    """hugepages/ and power/ hold the host's files with the host's modes, and
    every attribute the host's node0 also has carries the host's mode."""
    m, want = machine
    host = tree_modes(f"{HOST_NODE}/node0")
    if not host:
        pytest.skip("host has no node0")
    for nid in want["nodes"]:
        ours = tree_modes(node_dir(m, nid))
        for sub in ("hugepages", "power"):
            h = {k: v for k, v in host.items() if k.split("/")[0] == sub}
            o = {k: v for k, v in ours.items() if k.split("/")[0] == sub}
            if h:
                assert o == h, f"node{nid}/{sub}"
        for rel, (kind, mode) in ours.items():
            if rel in host and rel.split("/")[0] not in NODE_DIFFERS and kind != "l":
                assert (kind, mode) == host[rel], f"node{nid}/{rel}: {oct(mode)}, host {oct(host[rel][1])}"
        assert ours["compact"] == ("f", 0o200)
        assert ours["reclaim"] == ("f", 0o644)     # SPEC's switch (NODE_DIFFERS)


def test_subsystem_link_and_bus_node(machine):
    m, want = machine
    bus = os.path.join(m.path, "sys/bus/node")
    for nid in want["nodes"]:
        link = os.path.join(node_dir(m, nid), "subsystem")
        assert readlink(link) == "../../../../bus/node"
        assert os.path.realpath(link) == os.path.realpath(bus)
        assert os.path.realpath(os.path.join(link, "devices", f"node{nid}")) == os.path.realpath(node_dir(m, nid))
    host = tree_modes("/sys/bus/node") if os.path.isdir("/sys/bus/node") else None
    if host is not None:
        strip = lambda t: {k: v for k, v in t.items() if not k.startswith("devices/")}  # noqa: E731
        assert strip(tree_modes(bus)) == strip(host)
    assert cat(os.path.join(bus, "drivers_autoprobe")) == "1\n"
    assert py_write(os.path.join(bus, "drivers_probe"), b"node0\n") == 6
    with pytest.raises(OSError) as e:
        py_write(os.path.join(bus, "drivers_probe"), b"node9\n")
    assert e.value.errno == errno.ENODEV


def test_memory_block_dirs_and_bus_memory_equal_host(default_mount):
    """memoryB/ holds the host's files with the host's modes (its nodeN link
    follows the machine), uevent and power/ included, and subsystem is
    sys/bus/memory, laid out as the host's."""
    m = default_mount
    host_block = "/sys/devices/system/memory/memory0"
    if not os.path.isdir(host_block):
        pytest.skip("host has no memory0")
    ours = os.path.join(m.path, "sys/devices/system/memory/memory0")
    strip = lambda t: {k: v for k, v in t.items() if not re.fullmatch(r"node\d+", k)}  # noqa: E731
    assert strip(tree_modes(ours)) == strip(tree_modes(host_block))
    assert readlink(os.path.join(ours, "subsystem")) == "../../../../bus/memory"
    assert cat(os.path.join(ours, "uevent")) == cat(os.path.join(host_block, "uevent"))
    bus = os.path.join(m.path, "sys/bus/memory")
    no_devices = lambda t: {k: v for k, v in t.items() if not k.startswith("devices/")}  # noqa: E731
    assert no_devices(tree_modes(bus)) == no_devices(tree_modes("/sys/bus/memory"))


def test_hugepages_read_zero(machine):
    m, want = machine
    for nid in want["nodes"]:
        d = os.path.join(node_dir(m, nid), "hugepages")
        assert sorted(os.listdir(d)) == ["hugepages-1048576kB", "hugepages-2048kB"]
        for size in ("2048kB", "1048576kB"):
            for name in ("nr_hugepages", "free_hugepages", "surplus_hugepages"):
                assert cat(os.path.join(d, f"hugepages-{size}", name)) == "0\n"
        assert cat(os.path.join(d, "hugepages-1048576kB", "demote_size")) == "2048kB\n"
        assert not os.path.exists(os.path.join(d, "hugepages-2048kB", "demote_size"))
        # and the node's meminfo agrees: no huge pages
        info = m.node(nid).meminfo
        assert info["HugePages_Total"] == info["HugePages_Free"] == info["HugePages_Surp"] == 0


def test_nr_hugepages_write_allocates_nothing(default_mount):
    """A well-formed count is taken, as the kernel takes it where no huge
    page can be allocated (set_max_huge_pages() returns success), and the
    file reads 0 after; a malformed one is EINVAL, past ULONG_MAX ERANGE."""
    d = os.path.join(node_dir(default_mount, 0), "hugepages")
    for size in ("2048kB", "1048576kB"):
        path = os.path.join(d, f"hugepages-{size}", "nr_hugepages")
        for data in (b"4\n", b"0\n", b"+2\n", b"18446744073709551615\n"):
            assert py_write(path, data) == len(data), data
            assert cat(path) == "0\n"
        for data in (b"-1\n", b"abc\n", b"\n", b"1 \n", b"0x10\n", b"1.5\n"):
            py_write_fails_einval(path, data)
        with pytest.raises(OSError) as e:
            py_write(path, b"18446744073709551616\n")
        assert e.value.errno == errno.ERANGE
        assert sh(f"echo 8 > {path}").returncode == 0
        assert cat(path) == "0\n"
    assert default_mount.node(0).meminfo["HugePages_Total"] == 0


def test_demote_and_demote_size(default_mount):
    d = os.path.join(node_dir(default_mount, 1), "hugepages", "hugepages-1048576kB")
    for data in (b"2048kB\n", b"2M\n", b"2097152\n", b"0x200000\n"):
        assert py_write(os.path.join(d, "demote_size"), data) == len(data), data
        assert cat(os.path.join(d, "demote_size")) == "2048kB\n"
    for data in (b"1G\n", b"4096\n", b"x\n", b"\n"):
        py_write_fails_einval(os.path.join(d, "demote_size"), data)
    assert py_write(os.path.join(d, "demote"), b"1\n") == 2   # nothing free to demote
    py_write_fails_einval(os.path.join(d, "demote"), b"one\n")
    with pytest.raises(PermissionError):
        py_read(os.path.join(d, "demote"))


def test_compact_is_write_only(default_mount):
    path = os.path.join(node_dir(default_mount, 0), "compact")
    assert sh(f"echo 1 > {path}").returncode == 0
    assert py_write(path, b"anything\n") == 9       # compact_store() takes any write
    with pytest.raises(PermissionError):
        py_read(path)


def test_uevent(default_mount):
    for d in (node_dir(default_mount, 0), os.path.join(node_dir(default_mount, 1), "access0"),
              os.path.join(default_mount.path, NODE)):
        path = os.path.join(d, "uevent")
        assert cat(path) == ""                      # as the host's node0/uevent
        for data in (b"add\n", b"change", b"change 12345678-9abc-def0-1234-56789abcdef0\n",
                     b"online 12345678-9abc-def0-1234-56789abcdef0 A=1 B=x\n"):
            assert py_write(path, data) == len(data), data
        for data in (b"bogus\n", b"\n", b"add notauuid\n", b"Add\n",
                     b"add 12345678-9abc-def0-1234-56789abcdef0 =x\n"):
            py_write_fails_einval(path, data)
        assert cat(path) == ""
    bus = os.path.join(default_mount.path, "sys/bus/node/uevent")
    assert py_write(bus, b"add\n") == 4
    py_write_fails_einval(bus, b"nope\n")


def test_power(default_mount):
    for d in (node_dir(default_mount, 0), os.path.join(node_dir(default_mount, 0), "access0"),
              os.path.join(default_mount.path, NODE)):
        p = os.path.join(d, "power")
        assert cat(os.path.join(p, "runtime_status")) == "unsupported\n"
        assert cat(os.path.join(p, "runtime_active_time")) == "0\n"
        assert cat(os.path.join(p, "runtime_suspended_time")) == "0\n"
        control = os.path.join(p, "control")
        assert cat(control) == "auto\n"
        try:
            assert py_write(control, b"on\n") == 3
            assert cat(control) == "on\n"
            assert cat(os.path.join(p, "runtime_status")) == "unsupported\n"
            py_write_fails_einval(control, b"off\n")
            py_write_fails_einval(control, b"on \n")
            assert cat(control) == "on\n"
        finally:
            py_write(control, b"auto")
        assert cat(control) == "auto\n"
        with pytest.raises(OSError) as e:
            py_read(os.path.join(p, "autosuspend_delay_ms"))
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            py_write(os.path.join(p, "autosuspend_delay_ms"), b"100\n")
        assert e.value.errno == errno.EIO


def test_access0_targets_links(machine):
    """register_memory_node_under_compute_node(): a memory node's nearest
    CPU node lists it in access0/targets, as the memory node lists that CPU
    node in access0/initiators; every access0 has both groups."""
    m, want = machine
    for nid in want["nodes"]:
        acc = os.path.join(node_dir(m, nid), "access0")
        assert sorted(os.listdir(acc)) == ["initiators", "power", "targets", "uevent"]
        d = os.path.join(acc, "targets")
        expected = [f"node{t}" for t in want["nodes"] if nid in want["initiators"][t]]
        assert sorted(os.listdir(d)) == expected, f"node{nid}"
        for name in expected:
            link = os.path.join(d, name)
            assert readlink(link) == f"../../../{name}"
            assert os.path.realpath(link) == os.path.realpath(os.path.join(m.path, NODE, name))
            # and the target names this node among its initiators
            assert os.path.islink(os.path.join(link, "access0", "initiators", f"node{nid}"))
    if want["nodes"] == [0, 1]:
        assert sorted(os.listdir(os.path.join(node_dir(m, 0), "access0", "targets"))) == ["node0", "node1"]
        assert os.listdir(os.path.join(node_dir(m, 1), "access0", "targets")) == []


def test_kstrtox():
    """The kernel's parsers, as the stores above use them."""
    from cdmfs.lib.kstrtox import kstrtoul, memparse
    assert kstrtoul("12\n") == 12 and kstrtoul("+7") == 7 and kstrtoul("0") == 0
    for bad in ("", "\n", "-1", " 1", "1 ", "1\n\n", "0x1", "1e3"):
        with pytest.raises(ValueError):
            kstrtoul(bad)
    with pytest.raises(OSError):
        kstrtoul(str(1 << 64))
    assert kstrtoul("0x1f", 16) == 31 and kstrtoul("017", 0) == 15 and kstrtoul("0x10", 0) == 16
    assert memparse("2M") == memparse("2048kB") == memparse("0x200000") == 2 << 20
    assert memparse("1G\n") == 1 << 30 and memparse("010") == 8 and memparse("x") == 0
