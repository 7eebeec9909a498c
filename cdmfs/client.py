"""A thin client over the mount's files (SPEC §8): everything it does can also
be done with ``cat`` and ``echo``.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Iterator, Optional

from .lib import bitmap

PAGE_SIZE = 4096
NODE_DIR = "sys/devices/system/node"
MEMORY_DIR = "sys/devices/system/memory"
WEIGHTS_DIR = "sys/kernel/mm/mempolicy/weighted_interleave"

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst), as the kernel
# writes them for a private anonymous page.  The client reads the file format as
# any program decoding /proc/PID/pagemap does, without the C core (its layer
# imports only lib); test_client checks these against native/cdmcore.h, where
# the emulator's values live.
PM_PFN_MASK = (1 << 55) - 1          # bits 0-54: the frame field
PM_MMAP_EXCLUSIVE = 1 << 56          # present, mapped by this process only
PM_FILE = 1 << 61                    # a file page or shared anon: never set for a region
PM_SWAP = 1 << 62                    # a device-private or poisoned page: a swap-style entry
PM_PRESENT = 1 << 63
# The frame field of a PM_SWAP entry: the swap type in its low
# MAX_SWAPFILES_SHIFT bits, the swap offset (here a PFN) above them; the types
# of include/linux/swap.h with DEVICE_PRIVATE, MIGRATION, MEMORY_FAILURE and
# PTE markers (v6.15 on).
MAX_SWAPFILES_SHIFT = 5
SWP_HWPOISON = 24                    # a poisoned page; offset: the frame that failed
SWP_DEVICE_WRITE = 28                # a writable device-private page; offset: its frame


def pagemap_pfn(entry: int) -> Optional[int]:
    """The PFN a pagemap entry names: a present page's frame, a device-private
    page's frame or a poisoned page's failed frame (decoded from the swap
    offset, as a kernel user does); None for a page never touched.  Without
    privilege the frame field reads 0, and so does this."""
    if entry & PM_PRESENT:
        return entry & PM_PFN_MASK
    if entry & PM_SWAP:
        return (entry & PM_PFN_MASK) >> MAX_SWAPFILES_SHIFT
    return None


def pagemap_swap_type(entry: int) -> Optional[int]:
    """The swap type of a PM_SWAP entry (``SWP_DEVICE_WRITE``, ``SWP_HWPOISON``);
    None for any other entry.  Without privilege the frame field, type
    included, reads 0, as from the kernel."""
    if entry & PM_SWAP:
        return entry & PM_PFN_MASK & ((1 << MAX_SWAPFILES_SHIFT) - 1)
    return None


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


def parse_migrate(text: str) -> dict:
    """A ``migrate`` answer as ``{"requested": n, "migrated": n, "skipped": n,
    "holes": [(first, last, "-EBUSY")]}``: the skipped pages as runs with one
    reason (page numbers, inclusive), as the file gives them (``page N -ERRNO``
    for one, ``pages FIRST-LAST -ERRNO`` for a run)."""
    out: dict = {"holes": []}
    for line in text.splitlines():
        key, value = line.split(" ", 1)
        if key in ("page", "pages"):
            pages, err = value.split()
            first, _, last = pages.partition("-")
            out["holes"].append((int(first), int(last or first), err))
        else:
            out[key] = int(value)
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

    @property
    def numa_balancing(self) -> bool:
        return _read(os.path.join(self.path, "numa_balancing")).strip() == "1"

    @numa_balancing.setter
    def numa_balancing(self, value: bool) -> None:
        _write(os.path.join(self.path, "numa_balancing"), f"{int(value)}\n")

    @property
    def reclaim(self) -> bool:
        return _read(os.path.join(self.path, "reclaim")).strip() == "1"

    @reclaim.setter
    def reclaim(self, value: bool) -> None:
        _write(os.path.join(self.path, "reclaim"), f"{int(value)}\n")

    @property
    def memory_blocks(self) -> list[int]:
        """The memory blocks of this node (``memoryB`` links), by number."""
        return sorted(int(n[6:]) for n in os.listdir(self.path) if n.startswith("memory"))


class MemoryBlock:
    """``sys/devices/system/memory/memoryB``."""

    def __init__(self, mount: "Mount", block: int):
        self.id = block
        self.path = os.path.join(mount.path, MEMORY_DIR, f"memory{block}")

    def _attr(self, name: str) -> str:
        return _read(os.path.join(self.path, name)).strip()

    @property
    def state(self) -> str:
        """``online``, ``offline`` or ``going-offline``."""
        return self._attr("state")

    @state.setter
    def state(self, word: str) -> None:
        """``online``, ``online_movable``, ``online_kernel`` or ``offline``
        (offlining migrates every page off the block first)."""
        _write(os.path.join(self.path, "state"), word + "\n")

    @property
    def online(self) -> bool:
        return self._attr("online") == "1"

    @online.setter
    def online(self, value: bool) -> None:
        _write(os.path.join(self.path, "online"), f"{int(value)}\n")

    @property
    def valid_zones(self) -> list[str]:
        return self._attr("valid_zones").split()

    @property
    def phys_index(self) -> int:
        return int(self._attr("phys_index"), 16)

    @property
    def node(self) -> int:
        return next(int(n[4:]) for n in os.listdir(self.path) if n.startswith("node"))


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
        """Migrates [start, start+length) to target (``1``, ``node:1``, ``gpu0``,
        and as the C API spells them ``cdm0`` for a coherent device's node and
        ``cpu`` for system RAM, see ``Mount.target``):
        ``{"requested": n, "migrated": n, "skipped": n, "holes": [(first, last, "-EBUSY")]}``."""
        path = os.path.join(self.path, "migrate")
        if target == "cpu":
            target = self.mount.target(target)
        try:
            return parse_migrate(transact(path, f"{start} {length} {target}\n"))
        except OSError as e:            # not a word of the file: a coherent device's name?
            word = self.mount.target(target) if e.errno == errno.EINVAL else target
            if word == target:
                raise
            return parse_migrate(transact(path, f"{start} {length} {word}\n"))

    def prefetch(self, start: int, length: int, target: str) -> None:
        """Asks for [start, start+length) to move to target ahead of use
        (``prefetch:TARGET`` advice, as cudaMemPrefetchAsync): returns at
        once, the migration runs in the background (``wait_prefetch``); where
        the mount does not take that advice, migrates now.  As
        cdmfs_prefetch()."""
        target = self.mount.target(target)
        try:
            self.advise(start, length, f"prefetch:{target}")
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.migrate(start, length, target)

    def wait_prefetch(self, timeout: float = 60.0) -> dict[str, int]:
        """Waits until no prefetch of the region is under way (its ``stat``
        says ``prefetch_active 0``); returns that stat.  TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stat
            if not st.get("prefetch_active", 0):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"region {self.name}: prefetch still under way")
            time.sleep(0.002)

    def where(self, offset: int) -> str:
        """Where the page holding byte ``offset`` lives, as cdmfs_where() says
        it: ``node:N``, a device's name for its private memory (``gpu0``),
        ``none`` (never touched) or ``poisoned``.  Frames are root's to see:
        for anyone else the answer comes from numa_maps, and PermissionError
        when the page's policy range holds pages in more than one place."""
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset} is outside region {self.name}")
        entry = self.pagemap(offset // PAGE_SIZE, 1)[0]
        if not entry & (PM_PRESENT | PM_SWAP):
            return "none"
        if os.geteuid() != 0:
            return self._where_from_numa_maps(offset, bool(entry & PM_PRESENT))
        if pagemap_swap_type(entry) == SWP_HWPOISON:
            return "poisoned"
        pfn = pagemap_pfn(entry)
        if entry & PM_PRESENT:
            return f"node:{self.mount.node_of_pfn(pfn)}"
        return self.mount.device_of_pfn(pfn)

    def _where_from_numa_maps(self, offset: int, present: bool) -> str:
        line = [e for e in self.numa_maps if e["start"] <= offset][-1]
        places = ([f"node:{n}" for n, c in line["nodes"].items() if c] if present
                  else [d for d, c in line["private"].items() if c])
        poisoned = 0 if present else self.stat.get("poisoned", 0)
        if not present and not places and poisoned:
            return "poisoned"
        if len(places) != 1 or poisoned:
            raise PermissionError(errno.EACCES, "only root sees where this page is (pagemap frames)")
        return places[0]

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

    def phys_addr(self, page: int) -> Optional[int]:
        """The physical address of the frame a page's pagemap entry names, or
        None for a page never touched: for a page in memory its frame; for a
        device-private page its frame in the device's memory resource (the
        swap offset of its entry); for a poisoned page the frame that failed.
        Only root sees frames (others get 0)."""
        entry = self.pagemap(page, 1)
        pfn = pagemap_pfn(entry[0]) if entry else None
        return None if pfn is None else pfn * 4096

    def advise(self, start: int, length: int, advice: str) -> None:
        """``START LENGTH ADVICE`` (``pin``, ``unpin``) on [start, start+length)."""
        _write(os.path.join(self.path, "advise"), f"{start} {length} {advice}\n")

    def pin(self, start: int, length: int) -> None:
        """A long-term pin: pages leave device memory first, then never migrate."""
        self.advise(start, length, "pin")

    def unpin(self, start: int, length: int) -> None:
        self.advise(start, length, "unpin")

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

    @property
    def online(self) -> bool:
        return _read(os.path.join(self.path, "online")).strip() == "1"

    @online.setter
    def online(self, value: bool) -> None:
        """False evacuates the device's memory to system RAM, then takes it
        out of service (OSError EBUSY if a pinned page is there); True brings
        it back, empty."""
        _write(os.path.join(self.path, "online"), f"{int(value)}\n")

    @property
    def eviction(self) -> str:
        """``lru`` or ``off``: what a full device memory does (oversubscription)."""
        return _read(os.path.join(self.path, "eviction")).strip()

    @eviction.setter
    def eviction(self, value: str) -> None:
        _write(os.path.join(self.path, "eviction"), value + "\n")

    @property
    def access_counters(self) -> str:
        """``0`` (off) or ``THRESHOLD GRANULARITY`` (``256 64K``)."""
        return _read(os.path.join(self.path, "access_counters")).strip()

    @access_counters.setter
    def access_counters(self, value: str) -> None:
        _write(os.path.join(self.path, "access_counters"), value + "\n")

    def inject(self, text: str) -> None:
        """Fault injection: ``link_down``, ``ecc ADDRESS``, ``fail_alloc N``."""
        _write(os.path.join(self.path, "inject"), text + "\n")

    @property
    def resource(self) -> tuple[int, int]:
        """The physical range of its memory, (start, end) inclusive."""
        start, end = _read(os.path.join(self.path, "resource")).split()
        return int(start, 16), int(end, 16)


class Mount:
    def __init__(self, path: str, log_file: Optional[str] = None):
        self.path = os.path.abspath(path)
        self.log_file = log_file        # the daemon's log, when this client mounted it

    @property
    def nodes(self) -> list[int]:
        return sorted(bitmap.parse_nodelist(_read(os.path.join(self.path, NODE_DIR, "online"))))

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

    @property
    def block_size(self) -> int:
        return int(_read(os.path.join(self.path, MEMORY_DIR, "block_size_bytes")), 16)

    @property
    def memory_blocks(self) -> list[int]:
        d = os.path.join(self.path, MEMORY_DIR)
        return sorted(int(n[6:]) for n in os.listdir(d) if n.startswith("memory") and n[6:].isdigit())

    def memory_block(self, block: int) -> MemoryBlock:
        return MemoryBlock(self, block)

    def block_of(self, address: int) -> MemoryBlock:
        """The memory block holding a physical address."""
        return MemoryBlock(self, address // self.block_size)

    @property
    def auto_online_blocks(self) -> str:
        return _read(os.path.join(self.path, MEMORY_DIR, "auto_online_blocks")).strip()

    @auto_online_blocks.setter
    def auto_online_blocks(self, word: str) -> None:
        _write(os.path.join(self.path, MEMORY_DIR, "auto_online_blocks"), word + "\n")

    def probe(self, address: int) -> None:
        """Memory hot-add of the block at a physical address."""
        _write(os.path.join(self.path, MEMORY_DIR, "probe"), f"{address:#x}\n")

    def hard_offline(self, address: int) -> None:
        """Poisons the frame at a physical address (its page's data is lost)."""
        _write(os.path.join(self.path, MEMORY_DIR, "hard_offline_page"), f"{address:#x}\n")

    def soft_offline(self, address: int) -> None:
        """Moves the page at a physical address away and retires its frame."""
        _write(os.path.join(self.path, MEMORY_DIR, "soft_offline_page"), f"{address:#x}\n")

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

    def target(self, word: str) -> str:
        """A migration target as the ``migrate`` file takes it: ``cpu`` is
        system RAM (the first node with CPUs and memory), a coherent device's
        name its node (``cdm0`` -> ``node:1``); other words as they are."""
        if word == "cpu":
            d = os.path.join(self.path, NODE_DIR)
            cpus = bitmap.parse_nodelist(_read(os.path.join(d, "has_cpu")))
            memory = bitmap.parse_nodelist(_read(os.path.join(d, "has_memory")))
            both = sorted(set(cpus) & set(memory))
            if not both:
                raise OSError(errno.ENODEV, "no node has both CPUs and memory")
            return f"node:{both[0]}"
        if ":" not in word and not word.isdigit() and "/" not in word:
            dev = os.path.join(self.path, "devices", word)
            with contextlib.suppress(OSError):
                if _read(os.path.join(dev, "type")).strip() == "coherent":
                    return f"node:{int(_read(os.path.join(dev, 'node')))}"
        return word

    def node_of_pfn(self, pfn: int) -> int:
        """The node whose memory blocks hold frame ``pfn``."""
        block = pfn * PAGE_SIZE // self.block_size
        for nid in self.nodes:
            if os.path.lexists(os.path.join(self.path, NODE_DIR, f"node{nid}", f"memory{block}")):
                return nid
        raise LookupError(f"frame {pfn:#x} is in no node's memory blocks")

    def device_of_pfn(self, pfn: int) -> str:
        """The device whose private memory holds frame ``pfn``."""
        for name in self.devices:
            dev = self.device(name)
            if _read(os.path.join(dev.path, "type")).strip() == "private":
                start, end = dev.resource
                if start <= pfn * PAGE_SIZE <= end:
                    return name
        raise LookupError(f"frame {pfn:#x} is in no device's private memory")

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
    # stderr open, and a pipe would not reach end-of-file while it runs.  Its
    # stdout is /dev/null, so the "mounted ..., log in ..." line can be piped.
    with tempfile.TemporaryFile("w+") as err:
        try:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                                  stderr=err if log_level is None else None)
        finally:
            if tmp is not None:
                os.unlink(tmp.name)
        if done.returncode:
            err.seek(0)
            raise RuntimeError(err.read().strip() or f"cdmfs mount failed ({done.returncode})")
    _, sep, log_file = done.stdout.strip().rpartition(", log in ")
    return Mount(mountpoint, log_file if sep else None)


def umount(mountpoint: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cdmfs", "umount", mountpoint],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip())


class BusyMountWarning(UserWarning):
    """A mount was still in use when ``mounted()`` ended, and was detached."""


MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def users(mountpoint: str) -> list[str]:
    """What keeps a mount busy, one string each: which process has which file
    of it open or mapped, or its working directory there (from /proc)."""
    root = os.path.realpath(mountpoint)
    found: dict[tuple[int, str], set[str]] = {}

    def note(pid: int, comm: str, what: str, path: str) -> None:
        if path == root or path.startswith(root + "/"):
            rel = os.path.relpath(path, root)
            found.setdefault((pid, comm), set()).add(f"{what} {rel}" if rel != "." else f"{what} the mount point")

    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            for link, what in (("cwd", "has its working directory in"), ("root", "has its root in")):
                with contextlib.suppress(OSError):
                    note(pid, comm, what, os.readlink(f"/proc/{pid}/{link}"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    note(pid, comm, "has open", os.readlink(f"/proc/{pid}/fd/{fd}"))
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6:
                        note(pid, comm, "maps", fields[5].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            continue        # gone meanwhile, or not ours to read
    return [f"{comm} (pid {pid}) " + ", ".join(sorted(whats)) for (pid, comm), whats in sorted(found.items())]


def release(mountpoint: str, stacklevel: int = 2) -> None:
    """Unmounts; a mount still in use is detached instead (``umount -l``,
    MNT_DETACH) with a BusyMountWarning naming what holds it.  A detached
    mount leaves the file tree at once; its daemon serves the open files and
    mappings and ends when the last one is closed."""
    path = os.fsencode(os.path.realpath(mountpoint))
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if err != errno.EBUSY:
        umount(mountpoint)      # a stale mount, or a user without the right: as the command does
        return
    holders = users(mountpoint)
    if _libc.umount2(path, MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise RuntimeError(f"cannot unmount {mountpoint}: {os.strerror(err)}")
    warnings.warn(f"{mountpoint} was still in use, detached it (umount -l): "
                  + ("; ".join(holders) or "by a file or mapping no process lists")
                  + "; its daemon ends when these are closed", BusyMountWarning, stacklevel=stacklevel)


@contextlib.contextmanager
def mounted(config: Optional[str] = None, log_level: Optional[str] = None) -> Iterator[Mount]:
    """A mount in a temporary folder for the duration of a with-block.  At
    the end the mount goes in every case: if a file of it is still open or
    mapped, it is detached (see ``release``) and a BusyMountWarning names
    what was open."""
    folder = tempfile.mkdtemp(prefix="cdmfs-")
    try:
        m = mount(folder, config, log_level)
        try:
            yield m
        finally:
            release(folder, stacklevel=4)      # warns at the user's with-statement
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
