"""Tests for cdmfs.fs.formats: byte-for-byte against this host's sysfs, plus tables.

Host comparisons parse one read of a file into values and re-render them, so
counters moving between reads cannot make them flaky.  Missing host files skip.
"""

from __future__ import annotations

import glob
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdmfs.fs import formats as F

NODE_ROOT = "/sys/devices/system/node"
CPU_ROOT = "/sys/devices/system/cpu"


# --------------------------------------------------------------------------- #
# host helpers
# --------------------------------------------------------------------------- #


def _read(path: str) -> str:
    try:
        with open(path, "r") as f:
            return f.read()
    except FileNotFoundError:
        pytest.skip(f"host has no {path}")
    except PermissionError:
        pytest.skip(f"cannot read {path}")


def _host_nodes() -> list:
    paths = sorted(glob.glob(os.path.join(NODE_ROOT, "node[0-9]*")))
    return [p for p in paths if re.fullmatch(r"node\d+", os.path.basename(p))]


def _node_params():
    nodes = _host_nodes()
    if not nodes:
        return [pytest.param(None, marks=pytest.mark.skip(reason="host has no NUMA nodes in sysfs"))]
    return [pytest.param(p, id=os.path.basename(p)) for p in nodes]


def _parse_hex_mask(text: str) -> set:
    """Test-side inverse of %*pb (independent of cdmfs.fs.formats)."""
    body = text.rstrip("\n")
    if body == "":
        return set()
    value = int(body.replace(",", ""), 16)
    return {i for i in range(value.bit_length()) if value >> i & 1}


def _nr_cpu_ids() -> int:
    possible = F.parse_cpulist(_read(os.path.join(CPU_ROOT, "possible")))
    return max(possible) + 1 if possible else 0


# --------------------------------------------------------------------------- #
# host comparisons
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "name",
    ["online", "possible", "has_cpu", "has_memory", "has_normal_memory", "has_generic_initiator"],
)
def test_host_node_state_lists(name):
    text = _read(os.path.join(NODE_ROOT, name))
    assert F.nodelist(F.parse_nodelist(text)) == text


@pytest.mark.parametrize("name", ["online", "possible", "present", "offline", "isolated"])
def test_host_cpu_lists(name):
    text = _read(os.path.join(CPU_ROOT, name))
    assert F.cpulist(F.parse_cpulist(text)) == text


@pytest.mark.parametrize("node", _node_params())
def test_host_meminfo(node):
    text = _read(os.path.join(node, "meminfo"))
    nid = int(os.path.basename(node)[4:])
    kb = {}
    for line in text.splitlines():
        m = re.fullmatch(r"Node (\d+) (\S+):\s+(\d+)( kB)?", line)
        assert m, line
        assert int(m.group(1)) == nid
        assert (m.group(4) is None) == (m.group(2) in F.NODE_MEMINFO_HUGEPAGES_KEYS)
        kb[m.group(2)] = int(m.group(3))
    assert tuple(kb) == F.NODE_MEMINFO_KEYS
    assert F.node_meminfo(nid, kb) == text


@pytest.mark.parametrize("node", _node_params())
def test_host_meminfo_derived_sums_match(node):
    """The sums node_meminfo derives when omitted agree with the kernel's."""
    text = _read(os.path.join(node, "meminfo"))
    nid = int(os.path.basename(node)[4:])
    kb = {}
    for line in text.splitlines():
        m = re.fullmatch(r"Node \d+ (\S+):\s+(\d+)( kB)?", line)
        kb[m.group(1)] = int(m.group(2))
    for derived in ("MemUsed", "Active", "Inactive", "Slab"):
        del kb[derived]
    assert F.node_meminfo(nid, kb) == text


def _kv(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        k, v = line.split(" ")
        out[k] = int(v)
    return out


@pytest.mark.parametrize("node", _node_params())
def test_host_numastat(node):
    text = _read(os.path.join(node, "numastat"))
    c = _kv(text)
    assert tuple(c) == F.NODE_NUMASTAT_KEYS
    assert F.node_numastat(c) == text


@pytest.mark.parametrize("node", _node_params())
def test_host_vmstat(node):
    text = _read(os.path.join(node, "vmstat"))
    v = _kv(text)
    assert tuple(v) == F.NODE_VMSTAT_KEYS
    # the kernel's lines, nothing more: vm events are machine-wide (/proc/vmstat)
    assert F.node_vmstat(v) == text
    with pytest.raises(ValueError):
        F.node_vmstat(dict(v, pgfault=7))


def test_host_proc_vmstat():
    """/proc/vmstat: the node items first, in the node vmstat's order, then
    the rest; re-rendered from one read, byte for byte."""
    text = _read("/proc/vmstat")
    v = {}
    for line in text.splitlines():
        k, n = line.split(" ")
        v[k] = int(n)
    assert tuple(v) == F.PROC_VMSTAT_KEYS
    assert F.PROC_VMSTAT_KEYS[:len(F.NODE_VMSTAT_KEYS)] == F.NODE_VMSTAT_KEYS
    assert F.proc_vmstat(v) == text


def test_host_proc_meminfo():
    """/proc/meminfo re-rendered from one read, byte for byte: show_val_kb()'s
    padding, the HugePages_* counts, VmallocTotal wider than %8lu."""
    text = _read("/proc/meminfo")
    kb = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\S+):\s+(\d+)( kB)?", line)
        assert m, line
        assert bool(m.group(3)) == (m.group(1) not in F.PROC_MEMINFO_HUGEPAGES_KEYS), line
        kb[m.group(1)] = int(m.group(2))
    assert tuple(kb) == F.PROC_MEMINFO_KEYS
    assert F.proc_meminfo(kb) == text


@pytest.mark.parametrize("node", _node_params())
def test_host_distance(node):
    text = _read(os.path.join(node, "distance"))
    online = sorted(F.parse_nodelist(_read(os.path.join(NODE_ROOT, "online"))))
    row = [int(x) for x in text.split()]
    assert len(row) == len(online)
    assert F.node_distance(row, online) == text
    if online and online[0] == 0:
        assert F.node_distance(row) == text


@pytest.mark.parametrize("node", _node_params())
def test_host_cpumap_cpulist(node):
    cpumap = _read(os.path.join(node, "cpumap"))
    cpulist_text = _read(os.path.join(node, "cpulist"))
    cpus = _parse_hex_mask(cpumap)
    assert F.parse_cpulist(cpulist_text) == cpus
    assert F.cpumask(cpus, _nr_cpu_ids()) == cpumap
    assert F.cpulist(cpus) == cpulist_text


def _topology_files(suffix_pairs):
    out = []
    for cpu in sorted(glob.glob(os.path.join(CPU_ROOT, "cpu[0-9]*", "topology"))):
        for mask_name, list_name in suffix_pairs:
            m, l = os.path.join(cpu, mask_name), os.path.join(cpu, list_name)
            if os.path.exists(m) and os.path.exists(l):
                out.append(pytest.param(m, l, id=f"{cpu.split('/')[-2]}-{mask_name}"))
    return out or [pytest.param(None, None, marks=pytest.mark.skip(reason="no cpu topology files"))]


@pytest.mark.parametrize(
    "mask_path,list_path",
    _topology_files(
        [
            ("thread_siblings", "thread_siblings_list"),
            ("core_cpus", "core_cpus_list"),
            ("core_siblings", "core_siblings_list"),
            ("package_cpus", "package_cpus_list"),
            ("die_cpus", "die_cpus_list"),
        ]
    ),
)
def test_host_topology_masks(mask_path, list_path):
    """More %*pb / %*pbl samples from the host (same cpumap_print_to_pagebuf)."""
    mask = _read(mask_path)
    lst = _read(list_path)
    cpus = _parse_hex_mask(mask)
    assert F.cpumask(cpus, _nr_cpu_ids()) == mask
    assert F.cpulist(cpus) == lst


def test_host_block_size_bytes():
    text = _read("/sys/devices/system/memory/block_size_bytes")
    assert F.block_size_bytes(int(text, 16)) == text


def test_host_proc_meminfo_padding_for_device_meminfo():
    """device_meminfo pads like /proc/meminfo's MemTotal/MemFree lines."""
    text = _read("/proc/meminfo")
    lines = text.splitlines(keepends=True)[:2]
    total = int(re.fullmatch(r"MemTotal:\s+(\d+) kB\n", lines[0]).group(1))
    free = int(re.fullmatch(r"MemFree:\s+(\d+) kB\n", lines[1]).group(1))
    out = F.device_meminfo(total, free)
    assert out.splitlines(keepends=True)[:2] == lines


def test_spec_vmstat_keys_present():
    for key in ("nr_free_pages", "nr_anon_pages", "numa_hit", "numa_miss", "pgpromote_success"):
        assert key in F.NODE_VMSTAT_KEYS
    assert [k for k in F.NODE_VMSTAT_KEYS if k.startswith("pgdemote_")]
    # SPEC §5: machine-wide events live in proc/vmstat, as in the kernel.
    for key in ("pgfault", "pgmigrate_success", "pgmigrate_fail", "numa_hint_faults",
                "numa_pages_migrated", "pgalloc_normal", "pgfree"):
        assert key not in F.NODE_VMSTAT_KEYS and key in F.PROC_VMSTAT_KEYS
    for keys in (F.NODE_VMSTAT_KEYS, F.PROC_VMSTAT_KEYS, F.PROC_MEMINFO_KEYS):
        assert len(set(keys)) == len(keys)


# --------------------------------------------------------------------------- #
# nodelist / parse_nodelist
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "ids,text",
    [
        ([], "\n"),
        ([0], "0\n"),
        ([0, 1], "0-1\n"),
        ([0, 1, 3], "0-1,3\n"),
        ([3, 1, 0, 1], "0-1,3\n"),
        ([0, 2, 4], "0,2,4\n"),
        ([1, 2, 3, 5, 7, 8], "1-3,5,7-8\n"),
        (range(0, 64), "0-63\n"),
        ([1023], "1023\n"),
        ([5, 6, 7, 100, 101], "5-7,100-101\n"),
    ],
)
def test_nodelist_table(ids, text):
    assert F.nodelist(ids) == text
    assert F.parse_nodelist(text) == set(ids)
    assert F.cpulist(ids) == text


@pytest.mark.parametrize("bad", [[-1], [0, -5], ["1"], [1.0], [True]])
def test_nodelist_bad(bad):
    with pytest.raises(ValueError):
        F.nodelist(bad)


@pytest.mark.parametrize(
    "text,ids",
    [
        ("", set()),
        ("\n", set()),
        ("0", {0}),
        ("0\n", {0}),
        ("0-1,3", {0, 1, 3}),
        ("0-1,3\n", {0, 1, 3}),
        ("5-5", {5}),
        ("007", {7}),
        ("3,1", {1, 3}),
        ("0-2,1-3", {0, 1, 2, 3}),
        ("1023", {1023}),
    ],
)
def test_parse_nodelist_table(text, ids):
    assert F.parse_nodelist(text) == ids


@pytest.mark.parametrize(
    "bad",
    [
        ",",
        "0,",
        ",0",
        "0,,1",
        "3-1",
        "a",
        "0x1",
        "-1",
        "-",
        "1-",
        "-1-2",
        "1--2",
        "1-2-3",
        "+1",
        " 1",
        "1 ",
        "1\n\n",
        "\n1",
        "1\r\n",
        "0-1\n3",
        "1.0",
        "\u0663",  # ARABIC-INDIC DIGIT THREE: isdigit() but not ASCII
        "1024",  # >= MAX_NUMNODES
        "0-4294967295",
    ],
)
def test_parse_nodelist_bad(bad):
    with pytest.raises(ValueError):
        F.parse_nodelist(bad)


def test_parse_cpulist():
    assert F.parse_cpulist("0-1,3\n") == {0, 1, 3}
    assert F.parse_cpulist("1024-1025") == {1024, 1025}  # beyond MAX_NUMNODES
    assert F.parse_cpulist("") == set()
    with pytest.raises(ValueError):
        F.parse_cpulist(str(F.MAX_NR_CPUS))
    with pytest.raises(ValueError):
        F.parse_cpulist("0,,1")


def test_parse_nodelist_limit():
    assert F.parse_nodelist("0-3", limit=4) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        F.parse_nodelist("4", limit=4)
    with pytest.raises(ValueError):
        F.parse_nodelist("2-4", limit=4)
    with pytest.raises(ValueError):
        F.parse_nodelist(b"0")  # type: ignore[arg-type]


@given(st.sets(st.integers(min_value=0, max_value=F.MAX_NUMNODES - 1), max_size=64))
def test_nodelist_roundtrip(ids):
    text = F.nodelist(ids)
    assert text.endswith("\n") and text.count("\n") == 1
    assert F.parse_nodelist(text) == ids


# --------------------------------------------------------------------------- #
# cpumask
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "cpus,nr,text",
    [
        (set(), 0, "\n"),
        ({0, 1}, 2, "3\n"),
        (set(), 2, "0\n"),
        ({0}, 1, "1\n"),
        ({3}, 4, "8\n"),
        ({4}, 5, "10\n"),  # 5-bit chunk: 2 hex digits
        (set(), 8, "00\n"),
        ({0, 7}, 8, "81\n"),
        (set(), 32, "00000000\n"),
        ({31}, 32, "80000000\n"),
        ({0}, 32, "00000001\n"),
        ({32}, 33, "1,00000000\n"),
        ({0}, 33, "0,00000001\n"),
        ({0, 39}, 40, "80,00000001\n"),
        ({0}, 64, "00000000,00000001\n"),
        ({63}, 64, "80000000,00000000\n"),
        (set(range(256)), 256, ",".join(["ffffffff"] * 8) + "\n"),
        ({0, 35, 70}, 72, "40,00000008,00000001\n"),
        ({1, 0, 1}, 2, "3\n"),
    ],
)
def test_cpumask_table(cpus, nr, text):
    assert F.cpumask(cpus, nr) == text
    assert _parse_hex_mask(text) == set(cpus)


@pytest.mark.parametrize(
    "cpus,nr",
    [({2}, 2), ({0}, 0), ({-1}, 4), (set(), -1), ({0}, True), ({"0"}, 4), (set(), 2.0)],
)
def test_cpumask_bad(cpus, nr):
    with pytest.raises(ValueError):
        F.cpumask(cpus, nr)


@given(st.integers(min_value=0, max_value=300).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0)), max_size=40) if n else st.just(set()))
))
def test_cpumask_shape(arg):
    nr, cpus = arg
    text = F.cpumask(cpus, nr)
    assert _parse_hex_mask(text) == cpus
    groups = text[:-1].split(",") if nr else []
    assert len(groups) == (nr + 31) // 32
    if groups:
        assert all(len(g) == 8 for g in groups[1:])
        assert len(groups[0]) == ((nr % 32 or 32) + 3) // 4


# --------------------------------------------------------------------------- #
# node files
# --------------------------------------------------------------------------- #


def test_node_meminfo_defaults_and_padding():
    out = F.node_meminfo(2, {"MemTotal": 1048576, "MemFree": 1000000, "AnonPages": 12})
    lines = out.splitlines(keepends=True)
    assert len(lines) == len(F.NODE_MEMINFO_KEYS)
    assert lines[0] == "Node 2 MemTotal:        1048576 kB\n"
    assert lines[1] == "Node 2 MemFree:         1000000 kB\n"
    assert lines[2] == "Node 2 MemUsed:           48576 kB\n"
    assert "Node 2 AnonPages:            12 kB\n" in lines
    assert "Node 2 Inactive(anon):        0 kB\n" in lines
    assert "Node 2 SecPageTables:         0 kB\n" in lines
    assert lines[-3:] == [
        "Node 2 HugePages_Total:     0\n",
        "Node 2 HugePages_Free:      0\n",
        "Node 2 HugePages_Surp:      0\n",
    ]


def test_node_meminfo_wide_values_and_hugepages():
    out = F.node_meminfo(
        10,
        {"MemTotal": 123456789, "MemFree": 0, "HugePages_Total": 123456, "HugePages_Surp": 3},
    )
    assert out.startswith("Node 10 MemTotal:       123456789 kB\n")
    assert "Node 10 MemUsed:        123456789 kB\n" in out
    assert out.endswith(
        "Node 10 HugePages_Total: 123456\nNode 10 HugePages_Free:      0\nNode 10 HugePages_Surp:      3\n"
    )


def test_node_meminfo_derived_and_explicit():
    out = F.node_meminfo(
        0,
        {"Active(anon)": 1, "Active(file)": 2, "Inactive(anon)": 4, "Inactive(file)": 8,
         "SReclaimable": 16, "SUnreclaim": 32},
    )
    assert "Node 0 Active:                3 kB\n" in out
    assert "Node 0 Inactive:             12 kB\n" in out
    assert "Node 0 Slab:                 48 kB\n" in out
    assert "Node 0 KReclaimable:         16 kB\n" in out
    # explicit values win over derived ones
    out = F.node_meminfo(0, {"MemTotal": 10, "MemFree": 4, "MemUsed": 5})
    assert "Node 0 MemUsed:               5 kB\n" in out


@pytest.mark.parametrize(
    "nid,kb",
    [
        (0, {"Memtotal": 1}),
        (0, {"MemTotal": -1}),
        (0, {"MemTotal": 1.5}),
        (0, {"MemTotal": 1 << 64}),
        (0, {"MemTotal": 1, "MemFree": 2}),  # derived MemUsed negative
        (0, {"HugePages_Total": 1 << 32}),
        (-1, {}),
    ],
)
def test_node_meminfo_bad(nid, kb):
    with pytest.raises(ValueError):
        F.node_meminfo(nid, kb)


def test_node_numastat():
    assert F.node_numastat({}) == (
        "numa_hit 0\nnuma_miss 0\nnuma_foreign 0\ninterleave_hit 0\nlocal_node 0\nother_node 0\n"
    )
    out = F.node_numastat({"numa_hit": 5, "other_node": 18446744073709551615})
    assert out.startswith("numa_hit 5\n")
    assert out.endswith("other_node 18446744073709551615\n")
    for bad in ({"numa_interleave": 1}, {"numa_hit": -1}, {"numa_hit": "5"}):
        with pytest.raises(ValueError):
            F.node_numastat(bad)


def test_node_vmstat():
    out = F.node_vmstat({"nr_free_pages": 42, "nr_kernel_file_pages": 3})
    lines = out.splitlines()
    assert len(lines) == len(F.NODE_VMSTAT_KEYS)
    assert lines[0] == "nr_free_pages 42"
    assert lines[-1] == "nr_kernel_file_pages 3"
    assert [ln.split()[0] for ln in lines] == list(F.NODE_VMSTAT_KEYS)
    for bad in ({"interleave_hit": 1}, {"pgfault": 3}, {"pgmigrate_success": 1}, {"nr_free_pages": -2}):
        with pytest.raises(ValueError):
            F.node_vmstat(bad)


def test_proc_vmstat():
    out = F.proc_vmstat({"nr_free_pages": 5, "pgmigrate_success": 7, "pgalloc_movable": 2})
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(F.PROC_VMSTAT_KEYS)
    assert lines[0] == "nr_free_pages 5"
    assert "pgmigrate_success 7" in lines and "pgalloc_movable 2" in lines
    assert lines[-1] == "nr_unstable 0"           # vmstat_show()'s deprecated tail
    for bad in ({"interleave_hit": 1}, {"pgfault": -1}, {"pgfault": "1"}):
        with pytest.raises(ValueError):
            F.proc_vmstat(bad)


def test_proc_meminfo():
    out = F.proc_meminfo({"MemTotal": 2097152, "HugePages_Total": 3, "Hugepagesize": 2048,
                          "VmallocTotal": 34359738367})
    lines = out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == list(F.PROC_MEMINFO_KEYS)
    assert lines[0] == "MemTotal:        2097152 kB"
    assert lines[1] == "MemFree:               0 kB"
    assert "HugePages_Total:       3" in lines
    assert "Hugepagesize:       2048 kB" in lines
    assert "VmallocTotal:   34359738367 kB" in lines    # wider than %8lu: pushes on
    for bad in ({"MemUsed": 1}, {"MemTotal": -1}, {"MemTotal": 1.0}):
        with pytest.raises(ValueError):
            F.proc_meminfo(bad)


def test_hugepages_attrs():
    assert F.ulong(0) == "0\n"
    assert F.hugepages_demote_size(2048) == "2048kB\n"
    with pytest.raises(ValueError):
        F.ulong(-1)


def test_node_distance():
    assert F.node_distance([10, 20]) == "10 20\n"
    assert F.node_distance([10]) == "10\n"
    assert F.node_distance([]) == "\n"
    assert F.node_distance([20, 10, 40], [0, 1, 2]) == "20 10 40\n"
    # kernel quirk: separator keyed on node id, so offline node 0 -> leading space
    assert F.node_distance([10, 20], [1, 3]) == " 10 20\n"
    with pytest.raises(ValueError):
        F.node_distance([10, 20], [0])
    with pytest.raises(ValueError):
        F.node_distance(["10"])


# --------------------------------------------------------------------------- #
# misc
# --------------------------------------------------------------------------- #


def test_kv_lines():
    assert F.kv_lines([]) == ""
    assert F.kv_lines([("faults", 3), ("name", "gpu0"), ("on", True), ("off", False)]) == (
        "faults 3\nname gpu0\non 1\noff 0\n"
    )
    assert F.kv_lines(iter([("a", 1)])) == "a 1\n"
    for bad in ([("", 1)], [("a b", 1)], [("a\n", 1)], [(1, 1)], [("a", "x\ny")]):
        with pytest.raises(ValueError):
            F.kv_lines(bad)


def test_device_meminfo():
    assert F.device_meminfo(1048576, 1000000) == (
        "MemTotal:        1048576 kB\n"
        "MemFree:         1000000 kB\n"
        "MemUsed:           48576 kB\n"
    )
    assert F.device_meminfo(0, 0) == (
        "MemTotal:              0 kB\nMemFree:               0 kB\nMemUsed:               0 kB\n"
    )
    assert F.device_meminfo(123456789, 1).startswith("MemTotal:       123456789 kB\n")
    for bad in ((1, 2), (-1, 0), (1, -1), (1.0, 0)):
        with pytest.raises(ValueError):
            F.device_meminfo(*bad)


@pytest.mark.parametrize(
    "n,text",
    [(0x8000000, "8000000\n"), (1, "1\n"), (0x10000000, "10000000\n"), (0xABCDEF, "abcdef\n")],
)
def test_block_size_bytes(n, text):
    assert F.block_size_bytes(n) == text


@pytest.mark.parametrize("bad", [0, -1, 1.0, "8000000"])
def test_block_size_bytes_bad(bad):
    with pytest.raises(ValueError):
        F.block_size_bytes(bad)
