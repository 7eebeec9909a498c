"""sys/devices/system/cpu from the config's [cpu] table (SPEC §3, §5; issue 12):
hwloc reads a configured 40-CPU, 2-package machine off a host of any size, the
files have the host kernel's names and formats, masks agree with lists, and a
bad [cpu] key is refused at mount with a message naming it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

import cdmfs
from cdmfs.fs import formats

HOST_CPU = "/sys/devices/system/cpu"
CPU = "sys/devices/system/cpu"
NODE = "sys/devices/system/node"
TIMEOUT = 60

# Two sysram nodes of 20 CPUs, two threads a core, and a CDM node.
MACHINE40 = """
block_size = "128M"
[[node]]
id = 0
kind = "sysram"
size = "512M"
cpus = "0-19"
[[node]]
id = 1
kind = "sysram"
size = "512M"
cpus = "20-39"
[[node]]
id = 2
kind = "cdm"
size = "512M"
[[device]]
name = "cdm0"
memory = "node:2"
[cpu]
threads_per_core = 2
"""

# One node, two packages of 4 cores (no SMT), cache sizes given; and a node
# whose memory is absent: its CPUs are possible, not present.
PACKAGES = """
block_size = "128M"
[[node]]
id = 0
kind = "sysram"
size = "256M"
cpus = "0-7"
[[node]]
id = 1
kind = "sysram"
size = "256M"
cpus = "8-11"
present = false
[cpu]
cores_per_package = 4
l1d_size = "48K"
l2_size = "2M"
l3_size = "64M"
"""

# What the host's cpu0/ has and the mount deliberately does not, with why.
CPU_DIR_LACKS = {
    "uevent": "no udev in the emulated machine (node/ and memory/ have none either)",
    "hotplug": "no CPU hotplug state machine: CPUs are online or not as configured",
    "power": "no runtime PM of CPU devices",
    "subsystem": "no sys/bus/cpu in the mount",
    "driver": "no processor driver binding",
    "firmware_node": "no ACPI tables",
    "of_node": "no device tree",
    "crash_notes": "no kexec", "crash_notes_size": "no kexec",
    "cpufreq": "no frequency scaling", "cpuidle": "no idle states",
    "acpi_cppc": "no ACPI CPPC", "thermal_throttle": "no thermal sensors",
    "microcode": "no microcode", "regs": "no ARM id registers", "msr": "no MSRs",
}
TOPOLOGY_LACKS = {"ppin": "a package's serial number: the emulated packages have none (admin-only)"}
SYSTEM_CPU_LACKS = {
    "cpufreq": "no frequency scaling", "cpuidle": "no idle states",
    "intel_pstate": "no frequency scaling", "amd_pstate": "no frequency scaling",
    "hotplug": "no CPU hotplug state machine", "power": "no runtime PM",
    "modalias": "no CPU features to match drivers against", "uevent": "no udev",
    "smt": "no SMT control (threads_per_core is fixed at mount)",
    "vulnerabilities": "no speculation mitigations", "microcode": "no microcode",
    "umwait_control": "no UMWAIT", "nohz_full": "no nohz_full= (isolated: no isolcpus=)",
}


def run(*cmd: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=TIMEOUT, env=env)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def hwloc(m, tool: str, *args: str) -> str:
    """A hwloc tool's stdout with the mount as its root; it must say nothing on stderr."""
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed (Debian: hwloc-nox)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWLOC_")}
    env["HWLOC_FSROOT"] = m.path
    done = run(exe, *args, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout


def mask_bits(text: str) -> set:
    value = int(text.strip().replace(",", ""), 16)
    return {i for i in range(value.bit_length()) if value >> i & 1}


def mask_re(nr_cpu_ids: int) -> str:
    """``%*pb`` over nr_cpu_ids bits: the first group as wide as its bits need."""
    first = ((nr_cpu_ids % 32 or 32) + 3) // 4
    groups = (nr_cpu_ids + 31) // 32
    return rf"[0-9a-f]{{{first}}}" + rf"(,[0-9a-f]{{8}}){{{groups - 1}}}\n"


@pytest.fixture(scope="module")
def m40():
    with cdmfs.mounted(MACHINE40) as m:
        yield m


@pytest.fixture(scope="module")
def packages():
    with cdmfs.mounted(PACKAGES) as m:
        yield m


def cpu_dir(m, cpu: int) -> str:
    return os.path.join(m.path, CPU, f"cpu{cpu}")


# --------------------------------------------------------------------------- #
# hwloc
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind, count", [("package", 2), ("core", 20), ("pu", 40), ("numanode", 3)])
def test_hwloc_calc_counts(m40, kind, count):
    assert hwloc(m40, "hwloc-calc", "--number-of", kind, "all") == f"{count}\n"


def test_lstopo_xml_is_the_configured_machine(m40):
    root = ET.fromstring(hwloc(m40, "lstopo-no-graphics", "--of", "xml"))
    parent = {child: p for p in root.iter() for child in p}
    objs = lambda t: [o for o in root.iter("object") if o.get("type") == t]

    def ancestors(o):
        while o in parent:
            o = parent[o]
            yield o

    packages, cores, pus = objs("Package"), objs("Core"), objs("PU")
    assert sorted(int(p.get("os_index")) for p in packages) == [0, 1]
    assert len(cores) == 20
    assert sorted(int(p.get("os_index")) for p in pus) == list(range(40))
    for core in cores:
        threads = [o for o in core if o.get("type") == "PU"]
        assert len(threads) == 2
        a, b = sorted(int(t.get("os_index")) for t in threads)
        assert b == a + 1 and a % 2 == 0
    for pu in pus:
        # no PU hangs outside a core
        assert any(o.get("type") == "Core" for o in ancestors(pu))
        pkg = next(o for o in ancestors(pu) if o.get("type") == "Package")
        assert int(pkg.get("os_index")) == int(pu.get("os_index")) // 20
    nodes = {int(n.get("os_index")): n for n in objs("NUMANode")}
    assert sorted(nodes) == [0, 1, 2]
    for nid in (0, 1):
        # each CPU node's memory hangs under its package, sized as configured
        pkg = next(o for o in ancestors(nodes[nid]) if o.get("type") in ("Package", "Machine"))
        assert pkg.get("type") == "Package" and int(pkg.get("os_index")) == nid
        assert int(nodes[nid].get("local_memory")) == 512 << 20
    # the caches: an L3 per package, an L2, L1d, L1i per core, the sizes of cpu0's files
    sizes = {}
    for k in range(4):
        d = os.path.join(cpu_dir(m40, 0), "cache", f"index{k}")
        sizes[(read(f"{d}/level").strip(), read(f"{d}/type").strip())] = \
            int(read(f"{d}/size").strip().rstrip("K")) << 10
    for t, n, key in (("L3Cache", 2, ("3", "Unified")), ("L2Cache", 20, ("2", "Unified")),
                      ("L1Cache", 20, ("1", "Data")), ("L1iCache", 20, ("1", "Instruction"))):
        caches = objs(t)
        assert len(caches) == n, t
        assert {int(c.get("cache_size")) for c in caches} == {sizes[key]}, t


def test_lstopo_console(m40):
    text = hwloc(m40, "lstopo-no-graphics", "--of", "console")
    assert len(re.findall(r"^\s*Package L#\d+", text, re.M)) == 2
    assert len(re.findall(r"Core L#\d+", text)) == 20
    assert len(re.findall(r"PU L#\d+ \(P#\d+\)", text)) == 40


def test_hwloc_configured_packages_and_caches(packages):
    assert hwloc(packages, "hwloc-calc", "--number-of", "package", "all") == "2\n"
    assert hwloc(packages, "hwloc-calc", "--number-of", "core", "all") == "8\n"
    assert hwloc(packages, "hwloc-calc", "--number-of", "pu", "all") == "8\n"
    root = ET.fromstring(hwloc(packages, "lstopo-no-graphics", "--of", "xml"))
    size = lambda t: {int(o.get("cache_size")) for o in root.iter("object") if o.get("type") == t}
    assert size("L1Cache") == {48 << 10}
    assert size("L2Cache") == {2 << 20}
    assert size("L3Cache") == {64 << 20}


# --------------------------------------------------------------------------- #
# the files: names as the host's kernel has them, formats, consistency
# --------------------------------------------------------------------------- #


def host_names(path: str) -> set:
    if not os.path.isdir(path):
        pytest.skip(f"host has no {path}")
    return set(os.listdir(path))


def test_topology_keys_are_the_hosts(m40):
    host = host_names(f"{HOST_CPU}/cpu0/topology")
    for cpu in (0, 1, 39):
        ours = set(os.listdir(os.path.join(cpu_dir(m40, cpu), "topology")))
        assert ours <= host, ours - host
        assert host - ours <= set(TOPOLOGY_LACKS), host - ours


def test_cache_keys_are_the_hosts(m40):
    host = host_names(f"{HOST_CPU}/cpu0/cache/index0")
    host_idx = {n for n in host_names(f"{HOST_CPU}/cpu0/cache") if n.startswith("index")}
    ours_idx = set(os.listdir(os.path.join(cpu_dir(m40, 0), "cache")))
    assert ours_idx == {"index0", "index1", "index2", "index3"}
    assert host_names(f"{HOST_CPU}/cpu0/cache") - ours_idx - host_idx <= {"uevent"}
    for cpu in (0, 39):
        for k in range(4):
            ours = set(os.listdir(os.path.join(cpu_dir(m40, cpu), "cache", f"index{k}")))
            assert ours <= host | {"allocation_policy", "write_policy"}, ours - host
            assert host - ours <= {"uevent"}, host - ours


def test_cpu_dir_keys_are_the_hosts(m40):
    host = host_names(f"{HOST_CPU}/cpu0")
    ours = set(os.listdir(cpu_dir(m40, 0)))
    host = {re.sub(r"^node\d+$", "nodeN", n) for n in host}
    ours = {re.sub(r"^node\d+$", "nodeN", n) for n in ours}
    assert ours <= host, ours - host
    assert host - ours <= set(CPU_DIR_LACKS), host - ours
    if os.path.isdir(f"{HOST_CPU}/cpu1"):
        host1 = {re.sub(r"^node\d+$", "nodeN", n) for n in os.listdir(f"{HOST_CPU}/cpu1")}
        ours1 = {re.sub(r"^node\d+$", "nodeN", n) for n in os.listdir(cpu_dir(m40, 1))}
        assert ours1 <= host1 and host1 - ours1 <= set(CPU_DIR_LACKS), host1 ^ ours1


def test_system_cpu_files(m40):
    d = os.path.join(m40.path, CPU)
    for name in ("online", "possible", "present"):
        assert read(os.path.join(d, name)) == "0-39\n", name
    assert read(os.path.join(d, "offline")) == "\n"
    kernel_max = int(read(os.path.join(d, "kernel_max")))
    assert kernel_max >= 39
    if os.path.exists(f"{HOST_CPU}/kernel_max"):
        assert kernel_max == max(39, int(read(f"{HOST_CPU}/kernel_max")))
    assert sorted(int(n[3:]) for n in os.listdir(d) if re.fullmatch(r"cpu\d+", n)) == list(range(40))
    host = {n for n in host_names(HOST_CPU) if not re.fullmatch(r"cpu\d+", n)}
    ours = {n for n in os.listdir(d) if not re.fullmatch(r"cpu\d+", n)}
    assert ours <= host, ours - host
    assert host - ours <= set(SYSTEM_CPU_LACKS), host - ours


def test_masks_lists_and_ids_agree(m40):
    nr = 40
    mask = re.compile(mask_re(nr))
    core_of, pkg_of, seen_cores = {}, {}, {}
    for cpu in range(40):
        t = os.path.join(cpu_dir(m40, cpu), "topology")
        sets = {}
        for name in os.listdir(t):
            if name.endswith("_list") or name.endswith("_id"):
                continue
            text = read(f"{t}/{name}")
            assert mask.fullmatch(text), (cpu, name, text)
            listed = read(f"{t}/{name}_list")
            assert re.fullmatch(r"(\d+(-\d+)?)(,\d+(-\d+)?)*\n", listed), (cpu, name, listed)
            assert mask_bits(text) == formats.parse_cpulist(listed), (cpu, name)
            assert listed == formats.cpulist(mask_bits(text)), (cpu, name)
            assert cpu in mask_bits(text), (cpu, name)
            sets[name] = frozenset(mask_bits(text))
        assert sets["thread_siblings"] == sets["core_cpus"] == frozenset({cpu & ~1, cpu | 1})
        assert sets["core_siblings"] == sets["package_cpus"] == frozenset(range(cpu // 20 * 20, cpu // 20 * 20 + 20))
        if "die_cpus" in sets:
            assert sets["die_cpus"] == sets["package_cpus"]
            assert read(f"{t}/die_id") == "0\n"
        if "cluster_cpus" in sets:
            assert sets["cluster_cpus"] == sets["core_cpus"]
        pkg = int(read(f"{t}/physical_package_id"))
        core = int(read(f"{t}/core_id"))
        assert pkg == cpu // 20 and core == cpu % 20 // 2
        seen_cores.setdefault((pkg, core), set()).add(cpu)
        core_of[cpu], pkg_of[cpu] = sets["core_cpus"], sets["package_cpus"]
        # the node link, and the node's cpulist agrees with the package
        nid = cpu // 20
        link = os.path.join(cpu_dir(m40, cpu), f"node{nid}")
        assert os.readlink(link) == f"../../node/node{nid}"
        assert os.path.samefile(link, os.path.join(m40.path, NODE, f"node{nid}"))
        assert formats.parse_cpulist(read(os.path.join(m40.path, NODE, f"node{nid}", "cpulist"))) == pkg_of[cpu]
    assert all(cpus == core_of[min(cpus)] for cpus in seen_cores.values())


def test_caches_agree_with_topology(m40):
    ids: dict = {}
    mask = re.compile(mask_re(40))
    for cpu in range(40):
        t = os.path.join(cpu_dir(m40, cpu), "topology")
        core = formats.parse_cpulist(read(f"{t}/core_cpus_list"))
        package = formats.parse_cpulist(read(f"{t}/package_cpus_list"))
        for k, (level, kind, shared) in enumerate(
                (("1", "Data", core), ("1", "Instruction", core), ("2", "Unified", core),
                 ("3", "Unified", package))):
            d = os.path.join(cpu_dir(m40, cpu), "cache", f"index{k}")
            assert read(f"{d}/level") == f"{level}\n" and read(f"{d}/type") == f"{kind}\n"
            assert mask.fullmatch(read(f"{d}/shared_cpu_map"))
            assert mask_bits(read(f"{d}/shared_cpu_map")) == shared
            assert formats.parse_cpulist(read(f"{d}/shared_cpu_list")) == shared
            size = read(f"{d}/size")
            assert re.fullmatch(r"\d+K\n", size)
            ways, line, sets, part = (int(read(f"{d}/{n}")) for n in (
                "ways_of_associativity", "coherency_line_size", "number_of_sets",
                "physical_line_partition"))
            assert ways * line * sets * part == int(size[:-2]) << 10
            ids.setdefault((k, int(read(f"{d}/id"))), set()).add(frozenset(shared))
    # One id per cache instance: the CPUs with an id share one cache.
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len([key for key in ids if key[0] == 3]) == 2
    assert len([key for key in ids if key[0] == 2]) == 20


def test_cache_sizes_default_to_the_hosts(m40):
    folder = f"{HOST_CPU}/cpu0/cache"
    if not os.path.isdir(folder):
        pytest.skip("host has no cpu0/cache")
    host = {}
    for name in os.listdir(folder):
        if name.startswith("index"):
            d = f"{folder}/{name}"
            host[(read(f"{d}/level"), read(f"{d}/type"))] = read(f"{d}/size")
    for k in range(4):
        d = os.path.join(cpu_dir(m40, 0), "cache", f"index{k}")
        key = (read(f"{d}/level"), read(f"{d}/type"))
        if key in host:
            assert read(f"{d}/size") == host[key], key


def test_configured_caches_and_absent_node(packages):
    d = os.path.join(packages.path, CPU)
    assert read(f"{d}/possible") == "0-11\n"
    assert read(f"{d}/present") == read(f"{d}/online") == "0-7\n"
    assert read(f"{d}/offline") == "8-11\n"
    assert sorted(n for n in os.listdir(d) if re.fullmatch(r"cpu\d+", n)) == [f"cpu{c}" for c in range(8)]
    for cpu in range(8):
        t = os.path.join(d, f"cpu{cpu}", "topology")
        assert read(f"{t}/physical_package_id") == f"{cpu // 4}\n"
        assert read(f"{t}/core_id") == f"{cpu % 4}\n"
        assert read(f"{t}/thread_siblings_list") == f"{cpu}\n"
        assert read(f"{t}/package_cpus_list") == f"{cpu // 4 * 4}-{cpu // 4 * 4 + 3}\n"
        # masks over nr_cpu_ids = 12 bits
        assert read(f"{t}/package_cpus") == ("00f\n" if cpu < 4 else "0f0\n")
    c = os.path.join(d, "cpu5", "cache")
    assert read(f"{c}/index0/size") == "48K\n"
    assert read(f"{c}/index2/size") == "2048K\n"
    assert read(f"{c}/index3/size") == "65536K\n"
    assert read(f"{c}/index3/shared_cpu_list") == "4-7\n"
    assert read(f"{c}/index3/id") == "1\n"


# --------------------------------------------------------------------------- #
# a bad [cpu] is refused at mount, naming the key
# --------------------------------------------------------------------------- #

NODE0 = '[[node]]\nid = 0\nsize = "64M"\ncpus = "0-7"\n'


@pytest.mark.parametrize("toml, key", [
    (NODE0 + "[cpu]\nthread_per_core = 2\n", "cpu.thread_per_core"),
    (NODE0 + "[cpu]\nthreads_per_core = 3\n", "cpu.threads_per_core"),
    (NODE0 + "[cpu]\nthreads_per_core = 0\n", "cpu.threads_per_core"),
    (NODE0 + '[cpu]\nthreads_per_core = "2"\n', "cpu.threads_per_core"),
    (NODE0 + "[cpu]\ncores_per_package = 3\n", "cpu.cores_per_package"),
    (NODE0 + "[cpu]\ncores_per_package = 0\n", "cpu.cores_per_package"),
    (NODE0 + '[[node]]\nid = 1\nsize = "64M"\ncpus = "8-11"\n[cpu]\ncores_per_package = 6\n',
     "cpu.cores_per_package"),
    (NODE0 + '[cpu]\nl2_size = "1000"\n', "cpu.l2_size"),
    (NODE0 + '[cpu]\nl3_size = "33000"\n', "cpu.l3_size"),
    (NODE0 + "[cpu]\nl1d_size = true\n", "cpu.l1d_size"),
    ("cpu = 2\n" + NODE0, "cpu"),
])
def test_bad_cpu_config_is_refused_at_mount(toml, key):
    with pytest.raises(RuntimeError) as e:
        with cdmfs.mounted(toml):
            pass
    assert str(e.value).startswith(f"cdmfs: {key}:"), str(e.value)
