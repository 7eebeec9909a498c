"""A thin client over the mount's files (SPEC §8): everything it does can also
be done with ``cat`` and ``echo``.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator, Optional

from . import formats

NODE_DIR = "sys/devices/system/node"
WEIGHTS_DIR = "sys/kernel/mm/mempolicy/weighted_interleave"

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = (1 << 55) - 1
PM_FILE = 1 << 61        # a file page or shared anon: every region page with a frame
PM_SWAP = 1 << 62        # here: a device-private (or poisoned) page, not CPU-present
PM_PRESENT = 1 << 63


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    """One write() of the whole text, as ``echo`` does."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def transact(path: str, request: str) -> str:
    """Writes a request to a transaction file and reads its answer on the same
    open file (write, lseek 0, read), as SPEC §6.2 and §7 describe."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, request.encode())
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def parse_numa_maps(text: str) -> list[dict]:
    """numa_maps lines as dicts: ``start`` (bytes), ``policy`` (the kernel's
    spelling, which may hold a space: ``prefer (many):0-1``), ``anon``,
    ``dirty``, ``nodes`` ``{id: pages}``, ``private`` ``{device: pages}``,
    ``kernelpagesize_kB`` (absent keys: 0)."""
    out = []
    for line in text.splitlines():
        addr, _, rest = line.partition(" ")
        words = rest.split(" ")
        k = next((i for i, w in enumerate(words) if "=" in w), len(words))
        entry: dict = {"start": int(addr, 16), "policy": " ".join(words[:k]), "anon": 0, "dirty": 0,
                       "nodes": {}, "private": {}, "kernelpagesize_kB": 0}
        for word in words[k:]:
            key, _, value = word.partition("=")
            if key.startswith("private:"):
                entry["private"][key[len("private:"):]] = int(value)
            elif key[:1] == "N" and key[1:].isdigit():
                entry["nodes"][int(key[1:])] = int(value)
            else:
                entry[key] = int(value)
        out.append(entry)
    return out


def _kv(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        out[key.strip()] = int(value)
    return out


class Node:
    def __init__(self, mount: "Mount", nid: int):
        self.path = os.path.join(mount.path, NODE_DIR, f"node{nid}")
        self.id = nid

    @property
    def meminfo(self) -> dict[str, int]:
        """``{"MemTotal": kB, ...}`` from nodeN/meminfo."""
        out = {}
        for line in _read(os.path.join(self.path, "meminfo")).splitlines():
            key, value = line.split(":", 1)
            out[key.split()[-1]] = int(value.split()[0])
        return out

    @property
    def numastat(self) -> dict[str, int]:
        return _kv(_read(os.path.join(self.path, "numastat")))

    @property
    def vmstat(self) -> dict[str, int]:
        return _kv(_read(os.path.join(self.path, "vmstat")))

    @property
    def isolated(self) -> bool:
        return _read(os.path.join(self.path, "isolated")).strip() == "1"

    @isolated.setter
    def isolated(self, value: bool) -> None:
        _write(os.path.join(self.path, "isolated"), f"{int(value)}\n")


class Region:
    def __init__(self, mount: "Mount", name: str):
        self.mount = mount
        self.name = name
        self.path = os.path.join(mount.path, "regions", name)
        self.data = os.path.join(self.path, "data")

    @property
    def size(self) -> int:
        return os.stat(self.data).st_size

    def truncate(self, size: int) -> None:
        os.truncate(self.data, size)

    def mmap(self, length: Optional[int] = None) -> mmap.mmap:
        """A MAP_SHARED read-write mapping of the data file."""
        fd = os.open(self.data, os.O_RDWR)
        try:
            return mmap.mmap(fd, length or self.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)

    @property
    def policy(self) -> str:
        return _read(os.path.join(self.path, "policy")).strip()

    @policy.setter
    def policy(self, text: str) -> None:
        _write(os.path.join(self.path, "policy"), text + "\n")

    @property
    def stat(self) -> dict[str, int]:
        return _kv(_read(os.path.join(self.path, "stat")))

    def migrate(self, start: int, length: int, target: str) -> dict:
        """Migrates [start, start+length) to target (``1``, ``node:1``, ``gpu0``):
        ``{"requested": n, "migrated": n, "skipped": n, "holes": {page: "-EBUSY"}}``."""
        text = transact(os.path.join(self.path, "migrate"), f"{start} {length} {target}\n")
        out: dict = {"holes": {}}
        for line in text.splitlines():
            key, value = line.split(" ", 1)
            if key == "page":
                page, err = value.split()
                out["holes"][int(page)] = err
            else:
                out[key] = int(value)
        return out

    def mbind(self, start: int, length: int, policy: str, move: bool = False, strict: bool = False) -> None:
        """mbind(2) of [start, start+length) (bytes): ``policy`` for that range
        (``default`` gives it back to the region's policy); ``move`` migrates
        the pages that do not fit, ``strict`` raises EIO if some still do not."""
        words = [str(start), str(length), policy] + (["move"] if move else []) + (["strict"] if strict else [])
        _write(os.path.join(self.path, "mbind"), " ".join(words) + "\n")

    @property
    def mbinds(self) -> list[tuple[int, int, str]]:
        """The per-range policies: ``[(start, length, policy)]`` in bytes."""
        out = []
        for line in _read(os.path.join(self.path, "mbind")).splitlines():
            start, length, policy = line.split()
            out.append((int(start), int(length), policy))
        return out

    @property
    def numa_maps_text(self) -> str:
        return _read(os.path.join(self.path, "numa_maps"))

    @property
    def numa_maps(self) -> list[dict]:
        """The ``numa_maps`` lines, parsed (see ``parse_numa_maps``)."""
        return parse_numa_maps(self.numa_maps_text)

    def pagemap(self, start_page: int = 0, n: Optional[int] = None) -> list[int]:
        """The pagemap entries (64-bit ints, ``PM_*`` bits) of n pages from start_page."""
        if n is None:
            n = max(-(-self.size // 4096) - start_page, 0)
        fd = os.open(os.path.join(self.path, "pagemap"), os.O_RDONLY)
        try:
            data = bytearray()
            while len(data) < 8 * n:
                chunk = os.pread(fd, 8 * n - len(data), 8 * start_page + len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        return [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]

    def remove(self) -> None:
        os.rmdir(self.path)


class Device:
    def __init__(self, mount: "Mount", name: str):
        self.mount = mount
        self.name = name
        self.path = os.path.join(mount.path, "devices", name)

    def access(self, op: str, region: str, start: int, length: int, arg: Optional[int] = None) -> dict:
        """Runs ``OP REGION START LENGTH [ARG]``; the result line as a dict
        (``crc32`` as an int for reads)."""
        request = f"{op} {region} {start} {length}" + (f" {arg}" if arg is not None else "")
        line = transact(os.path.join(self.path, "access"), request + "\n").strip()
        status, *pairs = line.split()
        out = {"status": status}
        for pair in pairs:
            key, value = pair.split("=")
            out[key] = int(value, 0)
        return out

    def snapshot(self, region: str, start: int, length: int) -> dict[int, str]:
        """``{page: flags}`` of the device's view of a range."""
        text = transact(os.path.join(self.path, "snapshot"), f"{region} {start} {length}\n")
        return {int(p): f for p, f in (line.split() for line in text.splitlines())}

    @property
    def stat(self) -> dict[str, int]:
        return _kv(_read(os.path.join(self.path, "stat")))

    @property
    def meminfo(self) -> dict[str, int]:
        return {k.rstrip(":"): int(v) for k, v, *_ in (l.split() for l in _read(os.path.join(self.path, "meminfo")).splitlines())}

    @property
    def fault_policy(self) -> str:
        return _read(os.path.join(self.path, "fault_policy")).strip()

    @fault_policy.setter
    def fault_policy(self, value: str) -> None:
        _write(os.path.join(self.path, "fault_policy"), value + "\n")


class Mount:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    @property
    def nodes(self) -> list[int]:
        return sorted(formats.parse_nodelist(_read(os.path.join(self.path, NODE_DIR, "online"))))

    def node(self, nid: int) -> Node:
        return Node(self, nid)

    @property
    def weights(self) -> dict[int, int]:
        """weighted_interleave weights per node."""
        d = os.path.join(self.path, WEIGHTS_DIR)
        return {int(name[4:]): int(_read(os.path.join(d, name))) for name in os.listdir(d)
                if name.startswith("node")}

    def set_weight(self, nid: int, weight: int) -> None:
        _write(os.path.join(self.path, WEIGHTS_DIR, f"node{nid}"), f"{weight}\n")

    def region(self, name: str, size: Optional[int] = None) -> Region:
        """The region ``name``, made if missing; ``size`` sets its size."""
        r = Region(self, name)
        if not os.path.isdir(r.path):
            os.mkdir(r.path)
        if size is not None:
            r.truncate(size)
        return r

    def device(self, name: str) -> Device:
        return Device(self, name)

    @property
    def devices(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.path, "devices")))

    @property
    def regions(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.path, "regions")))


def mount(mountpoint: str, config: Optional[str] = None, log_level: Optional[str] = None) -> Mount:
    """Mounts with ``cdmfs mount`` (a daemon); returns once the mount answers.
    ``config`` is a TOML file's path or TOML text."""
    cmd = [sys.executable, "-m", "cdmfs", "mount", mountpoint]
    tmp = None
    if config is not None:
        if "\n" in config or not os.path.exists(config):
            tmp = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
            tmp.write(config)
            tmp.close()
            config = tmp.name
        cmd += ["--config", config]
    if log_level:
        cmd += ["--log-level", log_level]
    # The error goes to a file, not a pipe: with a log level the daemon keeps
    # stderr open, and a pipe would not reach end-of-file while it runs.
    with tempfile.TemporaryFile("w+") as err:
        try:
            done = subprocess.run(cmd, stderr=err if log_level is None else None)
        finally:
            if tmp is not None:
                os.unlink(tmp.name)
        if done.returncode:
            err.seek(0)
            raise RuntimeError(err.read().strip() or f"cdmfs mount failed ({done.returncode})")
    return Mount(mountpoint)


def umount(mountpoint: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cdmfs", "umount", mountpoint],
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip())


@contextlib.contextmanager
def mounted(config: Optional[str] = None, log_level: Optional[str] = None) -> Iterator[Mount]:
    """A mount in a temporary folder for the duration of a with-block."""
    folder = tempfile.mkdtemp(prefix="cdmfs-")
    try:
        m = mount(folder, config, log_level)
        try:
            yield m
        finally:
            umount(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
