"""The emulated machine's topology: TOML parsing, validation, the embedded default.

SPEC §3.  A bad config is refused with a ConfigError whose message starts with
the offending key (``node[1].size: ...``), so the CLI can print it as one line.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Optional

from .lib import bitmap

PAGE_SIZE = 4096

DEFAULT_CONFIG = """\
page_size = 4096
block_size = "128M"

[[node]]
id = 0
kind = "sysram"
size = "1G"
cpus = "all"

[[node]]
id = 1
kind = "cdm"
size = "1G"
isolated = true

[[device]]
name = "cdm0"
memory = "node:1"

[[device]]
name = "gpu0"
memory = "private:1G"
"""

# The machine of Linux's HMM selftest (lib/test_hmm.c): /dev/hmm_dmirror0 and
# 1 are device-private devices, 2 and 3 device-coherent ones, each with a
# node of its own; under `cdmfs run` the interposer binds /dev/hmm_dmirrorN
# to the device dmirrorN (README: "Running test_hmm programs").
HMM_TEST_CONFIG = """\
page_size = 4096
block_size = "128M"

[[node]]
id = 0
kind = "sysram"
size = "2G"
cpus = "all"

[[node]]
id = 1
kind = "cdm"
size = "512M"
isolated = true

[[node]]
id = 2
kind = "cdm"
size = "512M"
isolated = true

[[device]]
name = "dmirror0"
memory = "private:512M"

[[device]]
name = "dmirror1"
memory = "private:512M"

[[device]]
name = "dmirror2"
memory = "node:1"

[[device]]
name = "dmirror3"
memory = "node:2"
"""

# Embedded topologies, by the name --config takes in place of a file.
TOPOLOGIES = {"hmm-test": HMM_TEST_CONFIG}

HOST_CPU = "/sys/devices/system/cpu"

# The caches every emulated CPU has (SPEC §3 [cpu]): (config key, level, type,
# what shares it).  L1d, L1i and L2 belong to a core, L3 to a package.
CACHES = (
    ("l1d_size", 1, "Data", "core"),
    ("l1i_size", 1, "Instruction", "core"),
    ("l2_size", 2, "Unified", "core"),
    ("l3_size", 3, "Unified", "package"),
)
# A cache's geometry where the host's cpu0 has no such cache: (size, ways, line size).
DEFAULT_CACHE_GEOMETRY = {
    (1, "Data"): (32 << 10, 8, 64),
    (1, "Instruction"): (32 << 10, 8, 64),
    (2, "Unified"): (1 << 20, 16, 64),
    (3, "Unified"): (32 << 20, 16, 64),
}
CPU_KEYS = {"threads_per_core", "cores_per_package", *(key for key, *_ in CACHES)}

# Default access figures (SPEC §3): (latency ns, bandwidth MB/s).
CPU_TO_SYSRAM = (80, 100_000)
CPU_TO_CDM = (400, 32_000)
DEVICE_TO_OWN = (100, 1_000_000)
DEVICE_TO_OTHER = (600, 32_000)

DISTANCE_LOCAL = 10
DISTANCE_SYSRAM = 20
DISTANCE_CDM = 40

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.I)
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """A config the emulator refuses; the message names the key."""


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a string with a K/M/G/T suffix."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    else:
        raise ConfigError(f"{key}: expected a size like 4096, \"64M\" or \"1G\", got {value!r}")
    if size <= 0:
        raise ConfigError(f"{key}: size must be positive, got {value!r}")
    if size % PAGE_SIZE:
        raise ConfigError(f"{key}: {value!r} is not a whole number of pages ({PAGE_SIZE} bytes)")
    return size


@dataclass(frozen=True)
class NodeSpec:
    id: int
    kind: str                   # "sysram" | "cdm" | "memory" (CPU-less, not isolated: CXL)
    size: int                   # bytes
    cpus: frozenset[int]
    isolated: bool
    present: bool
    base_pfn: int = 0           # set by the layout: first frame's PFN

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    node: Optional[int]         # coherent: its CDM node
    private_size: int           # private: bytes of device-private memory, else 0
    base_pfn: int = 0           # private: first frame's PFN

    @property
    def coherent(self) -> bool:
        return self.node is not None


@dataclass(frozen=True)
class Access:
    """HMAT-style figures of one initiator (``cpu`` or a device) to one target."""
    read_latency: int
    write_latency: int
    read_bandwidth: int
    write_bandwidth: int


def transfer_ns(nbytes: int, bandwidth_mbps: int) -> int:
    """Modeled time of moving nbytes at a bandwidth in MB/s (1 MB/s = 1 byte/us)."""
    return nbytes * 1000 // bandwidth_mbps


@dataclass(frozen=True)
class CacheSpec:
    """One cache of every CPU, as cacheinfo describes it (drivers/base/cacheinfo.c)."""
    level: int
    type: str                   # "Data" | "Instruction" | "Unified"
    size: int                   # bytes
    ways: int                   # ways_of_associativity
    line_size: int              # coherency_line_size
    partitions: int             # physical_line_partition
    sets: int                   # number_of_sets
    shared: str                 # "core" | "package": the CPUs that share it
    allocation_policy: Optional[str] = None   # only where the host shows one
    write_policy: Optional[str] = None


@dataclass(frozen=True)
class CpuPlace:
    """Where a CPU sits: its package, its core in the package, its thread in the core."""
    package: int
    core: int
    thread: int


@dataclass(frozen=True)
class CpuSpec:
    """The emulated machine's CPUs (SPEC §3 ``[cpu]``, §5 ``sys/devices/system/cpu``).

    ``place`` has every configured CPU; ``possible``/``present`` add the host's
    for a node with ``cpus = "all"`` (a host CPU that is present but offline
    stays so).  The ids are the emulated machine's, whatever the host has."""
    threads_per_core: int
    cores_per_package: int      # the most cores a package has
    place: dict[int, CpuPlace]
    caches: tuple[CacheSpec, ...]
    possible: frozenset[int]
    present: frozenset[int]
    online: frozenset[int]

    @property
    def nr_cpu_ids(self) -> int:
        """The kernel's nr_cpu_ids: the last possible CPU + 1 (cpumask widths)."""
        return max(self.possible) + 1 if self.possible else 1


@dataclass
class Topology:
    page_size: int
    block_size: int
    nodes: list[NodeSpec]
    devices: list[DeviceSpec]
    distance: dict[tuple[int, int], int]
    access: dict[tuple[str, str], Access] = field(default_factory=dict)
    cpu: Optional[CpuSpec] = None

    def node(self, nid: int) -> NodeSpec:
        return next(n for n in self.nodes if n.id == nid)

    def device(self, name: str) -> DeviceSpec:
        return next(d for d in self.devices if d.name == name)

    @property
    def nr_cpu_ids(self) -> int:
        if self.cpu is not None:
            return self.cpu.nr_cpu_ids
        cpus = [c for n in self.nodes for c in n.cpus]
        return max(cpus) + 1 if cpus else 1

    def access_of(self, initiator: str, target: str) -> Access:
        """Figures for initiator (``cpu`` or a device name) reaching target
        (``node:N`` or ``private:DEV``), the configured ones or the defaults."""
        if (initiator, target) in self.access:
            return self.access[(initiator, target)]
        if initiator == "cpu":
            kind = self.node(int(target.split(":")[1])).kind if target.startswith("node:") else "cdm"
            lat, bw = CPU_TO_SYSRAM if kind == "sysram" else CPU_TO_CDM
        else:
            dev = self.device(initiator)
            own = f"node:{dev.node}" if dev.coherent else f"private:{dev.name}"
            lat, bw = DEVICE_TO_OWN if target == own else DEVICE_TO_OTHER
        return Access(lat, lat, bw, bw)


def host_cpus() -> frozenset[int]:
    """The host's online CPUs."""
    try:
        with open(f"{HOST_CPU}/online") as f:
            return frozenset(bitmap.parse_cpulist(f.read()))
    except (OSError, ValueError):
        return frozenset(range(os.cpu_count() or 1))


def host_text(path: str) -> Optional[str]:
    """A host file's text, stripped; None where the host has no such file."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _host_cpulist(name: str) -> frozenset[int]:
    """The host's cpu/{possible,present} (empty if unreadable)."""
    try:
        return frozenset(bitmap.parse_cpulist(host_text(f"{HOST_CPU}/{name}") or ""))
    except ValueError:
        return frozenset()


def host_caches() -> dict[tuple[int, str], dict[str, str]]:
    """The caches of the host's cpu0: {(level, type): {attribute: text}}."""
    out: dict[tuple[int, str], dict[str, str]] = {}
    folder = f"{HOST_CPU}/cpu0/cache"
    try:
        names = sorted((n for n in os.listdir(folder) if re.fullmatch(r"index\d+", n)),
                       key=lambda n: int(n[5:]))
    except OSError:
        return out
    for name in names:
        attrs = {}
        for attr in ("level", "type", "size", "ways_of_associativity", "coherency_line_size",
                     "physical_line_partition", "number_of_sets", "allocation_policy",
                     "write_policy"):
            text = host_text(f"{folder}/{name}/{attr}")
            if text is not None:
                attrs[attr] = text
        if attrs.get("level", "").isdigit() and "type" in attrs:
            out.setdefault((int(attrs["level"]), attrs["type"]), attrs)
    return out


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}{key}: unknown key (expected one of {', '.join(sorted(allowed))})")


def _int(table: dict, key: str, where: str, default: Any = None) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
    return value


def _bool(table: dict, key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")
    return value


def _round_up(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def parse(text: str) -> Topology:
    """A validated topology from TOML text."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: not valid TOML: {e}") from None
    _check_keys(doc, {"page_size", "block_size", "node", "device", "distance", "access", "cpu"}, "")
    page_size = _int(doc, "page_size", "", PAGE_SIZE)
    if page_size != PAGE_SIZE:
        raise ConfigError(f"page_size: only {PAGE_SIZE} is supported, got {page_size}")
    block_size = parse_size(doc.get("block_size", "128M"), "block_size")
    if block_size & (block_size - 1):
        raise ConfigError(f"block_size: must be a power of two, got {doc.get('block_size')!r}")

    nodes = _parse_nodes(doc.get("node", []))
    devices = _parse_devices(doc.get("device", []), nodes)
    nodes, devices = _layout(nodes, devices, block_size)
    distance = _parse_distance(doc.get("distance"), nodes)
    access = _parse_access(doc.get("access", []), nodes, devices)
    host_all = any(isinstance(t, dict) and t.get("cpus") == "all" for t in doc.get("node", []))
    cpu = _parse_cpu(doc.get("cpu", {}), nodes, host_all)
    return Topology(page_size, block_size, nodes, devices, distance, access, cpu)


def _parse_nodes(raw: Any) -> list[NodeSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("node: at least one [[node]] is needed")
    nodes: list[NodeSpec] = []
    seen_cpus: dict[int, int] = {}
    for i, t in enumerate(raw):
        where = f"node[{i}]."
        _check_keys(t, {"id", "kind", "size", "cpus", "isolated", "present"}, where)
        nid = _int(t, "id", where)
        if not 0 <= nid < 64:
            raise ConfigError(f"{where}id: must be 0..63, got {nid}")
        if any(n.id == nid for n in nodes):
            raise ConfigError(f"{where}id: node {nid} is defined twice")
        kind = t.get("kind", "sysram")
        if kind not in ("sysram", "cdm", "memory"):
            raise ConfigError(f"{where}kind: expected \"sysram\", \"cdm\" or \"memory\", got {kind!r}")
        if "size" not in t:
            raise ConfigError(f"{where}size: missing")
        size = parse_size(t["size"], f"{where}size")
        cpus_raw = t.get("cpus", "")
        if kind in ("cdm", "memory") and cpus_raw not in ("", None):
            raise ConfigError(f"{where}cpus: a {kind} node has no CPUs")
        if cpus_raw == "all":
            cpus = host_cpus()
        elif isinstance(cpus_raw, str):
            try:
                cpus = frozenset(bitmap.parse_cpulist(cpus_raw)) if cpus_raw.strip() else frozenset()
            except ValueError:
                raise ConfigError(f"{where}cpus: expected a cpulist like \"0-3,8\" or \"all\", got {cpus_raw!r}") from None
        else:
            raise ConfigError(f"{where}cpus: expected a cpulist string or \"all\", got {cpus_raw!r}")
        for c in cpus:
            if c in seen_cpus:
                raise ConfigError(f"{where}cpus: cpu {c} already belongs to node {seen_cpus[c]}")
            seen_cpus[c] = nid
        isolated = _bool(t, "isolated", where, kind == "cdm")
        present = _bool(t, "present", where, True)
        nodes.append(NodeSpec(nid, kind, size, cpus, isolated, present))
    if not any(n.kind == "sysram" and n.present for n in nodes):
        raise ConfigError("node: at least one present sysram node is needed")
    if not seen_cpus:
        raise ConfigError("node: no node has CPUs (give a sysram node cpus = \"all\")")
    return sorted(nodes, key=lambda n: n.id)


def _parse_devices(raw: Any, nodes: list[NodeSpec]) -> list[DeviceSpec]:
    if not isinstance(raw, list):
        raise ConfigError("device: expected [[device]] tables")
    devices: list[DeviceSpec] = []
    for i, t in enumerate(raw):
        where = f"device[{i}]."
        _check_keys(t, {"name", "memory"}, where)
        name = t.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == "cpu":
            raise ConfigError(f"{where}name: expected a name of [A-Za-z0-9_.-], got {name!r}")
        if any(d.name == name for d in devices):
            raise ConfigError(f"{where}name: device {name!r} is defined twice")
        memory = t.get("memory")
        if not isinstance(memory, str) or ":" not in memory:
            raise ConfigError(f"{where}memory: expected \"node:N\" or \"private:SIZE\", got {memory!r}")
        kind, _, arg = memory.partition(":")
        if kind == "node":
            if not arg.isdigit() or not any(n.id == int(arg) for n in nodes):
                raise ConfigError(f"{where}memory: node {arg} does not exist")
            node = next(n for n in nodes if n.id == int(arg))
            if node.kind != "cdm":
                raise ConfigError(f"{where}memory: node {arg} is sysram, a device's node must be cdm")
            if any(d.node == node.id for d in devices):
                raise ConfigError(f"{where}memory: node {arg} already belongs to another device")
            devices.append(DeviceSpec(name, node.id, 0))
        elif kind == "private":
            devices.append(DeviceSpec(name, None, parse_size(arg, f"{where}memory")))
        else:
            raise ConfigError(f"{where}memory: expected \"node:N\" or \"private:SIZE\", got {memory!r}")
    return devices


def _layout(nodes: list[NodeSpec], devices: list[DeviceSpec], block_size: int):
    """Physical addresses: nodes in id order from 0, each on a block boundary;
    device-private ranges after them (SPEC §5)."""
    addr = 0
    placed_nodes = []
    for n in nodes:
        addr = _round_up(addr, block_size)
        placed_nodes.append(NodeSpec(n.id, n.kind, n.size, n.cpus, n.isolated, n.present, addr // PAGE_SIZE))
        addr += n.size
    placed_devices = []
    for d in devices:
        if d.coherent:
            placed_devices.append(d)
            continue
        addr = _round_up(addr, block_size)
        placed_devices.append(DeviceSpec(d.name, None, d.private_size, addr // PAGE_SIZE))
        addr += d.private_size
    return placed_nodes, placed_devices


def _parse_distance(raw: Any, nodes: list[NodeSpec]) -> dict[tuple[int, int], int]:
    ids = [n.id for n in nodes]
    if raw is None:
        kinds = {n.id: n.kind for n in nodes}

        def default(a: int, b: int) -> int:
            if a == b:
                return DISTANCE_LOCAL
            return DISTANCE_CDM if "cdm" in (kinds[a], kinds[b]) else DISTANCE_SYSRAM
        return {(a, b): default(a, b) for a in ids for b in ids}
    if not isinstance(raw, dict):
        raise ConfigError("distance: expected a [distance] table")
    _check_keys(raw, {"matrix"}, "distance.")
    matrix = raw.get("matrix")
    if (not isinstance(matrix, list) or len(matrix) != len(ids)
            or any(not isinstance(row, list) or len(row) != len(ids) for row in matrix)):
        raise ConfigError(f"distance.matrix: expected {len(ids)} rows of {len(ids)} integers (nodes {ids})")
    out = {}
    for i, a in enumerate(ids):
        for j, b in enumerate(ids):
            v = matrix[i][j]
            if not isinstance(v, int) or isinstance(v, bool) or not 10 <= v <= 255:
                raise ConfigError(f"distance.matrix: entry [{i}][{j}] must be an integer 10..255, got {v!r}")
            if (i == j) != (v == DISTANCE_LOCAL):
                raise ConfigError(f"distance.matrix: entry [{i}][{j}]: only a node's own distance is {DISTANCE_LOCAL}")
            out[(a, b)] = v
    return out


def _parse_access(raw: Any, nodes: list[NodeSpec], devices: list[DeviceSpec]) -> dict:
    if not isinstance(raw, list):
        raise ConfigError("access: expected [[access]] tables")
    out = {}
    names = {d.name for d in devices}
    targets = {f"node:{n.id}" for n in nodes} | {f"private:{d.name}" for d in devices if not d.coherent}
    keys = ("read_latency", "write_latency", "read_bandwidth", "write_bandwidth")
    for i, t in enumerate(raw):
        where = f"access[{i}]."
        _check_keys(t, {"initiator", "target", *keys}, where)
        ini = t.get("initiator")
        if ini != "cpu" and ini not in names:
            raise ConfigError(f"{where}initiator: expected \"cpu\" or a device name, got {ini!r}")
        tgt = t.get("target")
        if tgt not in targets:
            raise ConfigError(f"{where}target: expected one of {', '.join(sorted(targets))}, got {tgt!r}")
        values = []
        for k in keys:
            v = _int(t, k, where, 1)
            if v <= 0:
                raise ConfigError(f"{where}{k}: must be positive, got {v}")
            values.append(v)
        out[(ini, tgt)] = Access(*values)
    return out


def _parse_cpu(raw: Any, nodes: list[NodeSpec], host_all: bool) -> CpuSpec:
    """[cpu]: how the configured CPUs group into cores and packages, and their
    caches.  Each CPU node's CPUs, in id order, make its cores (threads_per_core
    consecutive ids each); the cores make packages, one per CPU node unless
    cores_per_package says how many a package has."""
    if not isinstance(raw, dict):
        raise ConfigError("cpu: expected a [cpu] table")
    where = "cpu."
    _check_keys(raw, CPU_KEYS, where)
    threads = _int(raw, "threads_per_core", where, 1)
    if not 1 <= threads <= 64:
        raise ConfigError(f"{where}threads_per_core: must be 1..64, got {threads}")
    per_package = raw.get("cores_per_package")
    if per_package is not None:
        per_package = _int(raw, "cores_per_package", where)
        if per_package < 1:
            raise ConfigError(f"{where}cores_per_package: must be positive, got {per_package}")

    cores: list[tuple[int, list[int]]] = []        # (node, its CPUs), in node order
    for n in nodes:
        cpus = sorted(n.cpus)
        if len(cpus) % threads:
            raise ConfigError(f"{where}threads_per_core: node {n.id} has {len(cpus)} CPUs, "
                              f"not a whole number of cores of {threads} threads")
        cores += [(n.id, cpus[i:i + threads]) for i in range(0, len(cpus), threads)]

    packages: list[list[int]] = []                 # each package's cores, by index in cores
    if per_package is None:
        for nid in dict.fromkeys(nid for nid, _ in cores):
            packages.append([k for k, (n, _) in enumerate(cores) if n == nid])
    else:
        if len(cores) % per_package:
            raise ConfigError(f"{where}cores_per_package: the {len(cores)} cores are not a whole "
                              f"number of packages of {per_package}")
        packages = [list(range(k, k + per_package)) for k in range(0, len(cores), per_package)]
        # A package holds whole nodes, or a node whole packages: never both split.
        nodes_of = [{cores[k][0] for k in ks} for ks in packages]
        for pkg, ks in enumerate(packages):
            for nid in nodes_of[pkg]:
                spans = sum(1 for other in nodes_of if nid in other)
                if spans > 1 and len(nodes_of[pkg]) > 1:
                    raise ConfigError(f"{where}cores_per_package: package {pkg} of {per_package} cores "
                                      f"splits node {nid} and holds part of nodes "
                                      f"{', '.join(map(str, sorted(nodes_of[pkg])))}")

    place: dict[int, CpuPlace] = {}
    for pkg, ks in enumerate(packages):
        for core, k in enumerate(ks):
            for thread, cpu in enumerate(cores[k][1]):
                place[cpu] = CpuPlace(pkg, core, thread)

    host = host_caches()
    caches = tuple(_parse_cache(raw, key, host.get((level, kind), {}), level, kind, shared)
                   for key, level, kind, shared in CACHES)
    configured = frozenset(place)
    online = frozenset(c for n in nodes if n.present for c in n.cpus)
    present, possible = online, configured
    if host_all:
        present |= _host_cpulist("present")
        possible |= _host_cpulist("possible") | present
    return CpuSpec(threads, max((len(ks) for ks in packages), default=1), place, caches,
                   possible, present, online)


def _parse_cache(raw: dict, key: str, host: dict[str, str], level: int, kind: str,
                 shared: str) -> CacheSpec:
    """A cache as the host's cpu0 has it (``host``: its attributes), with the
    configured size if any: then the host's ways and line size, and as many
    sets as the size takes."""
    size, ways, line = DEFAULT_CACHE_GEOMETRY[(level, kind)]
    partitions = 1
    sets = 0

    def host_int(attr: str, default: int) -> int:
        text = host.get(attr, "")
        return int(text) if text.isdigit() and int(text) > 0 else default

    if host:
        line = host_int("coherency_line_size", line)
        partitions = host_int("physical_line_partition", partitions)
        m = re.fullmatch(r"(\d+)K", host.get("size", ""))
        if m and int(m.group(1)) > 0:
            size = int(m.group(1)) << 10
        sets = host_int("number_of_sets", 0)
        ways = (host_int("ways_of_associativity", 0)
                or (size // (line * partitions * sets) if sets else 0) or ways)
    if key in raw:
        value = raw[key]
        m = _SIZE_RE.match(value) if isinstance(value, str) else None
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif m:
            size = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
        else:
            raise ConfigError(f"cpu.{key}: expected a size like \"32K\" or \"2M\", got {value!r}")
        if size <= 0 or size % 1024:
            raise ConfigError(f"cpu.{key}: must be a positive whole number of KiB, got {value!r}")
        if size % (ways * line * partitions):
            raise ConfigError(f"cpu.{key}: {value!r} is not a whole number of sets of "
                              f"{ways} ways of {line}-byte lines")
        sets = 0
    sets = sets or size // (ways * line * partitions)
    return CacheSpec(level, kind, size, ways, line, partitions, sets, shared,
                     host.get("allocation_policy"), host.get("write_policy"))


def load(path: Optional[str]) -> Topology:
    """The topology of a config file, or the embedded default for None, or
    an embedded one by name (TOPOLOGIES) where no file has that name."""
    if path is None:
        return parse(DEFAULT_CONFIG)
    if path in TOPOLOGIES and not os.path.exists(path):
        return parse(TOPOLOGIES[path])
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    return parse(text)
