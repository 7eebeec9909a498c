"""Device lifecycle and memory failure through real mounts (issue 5): memory
blocks offline/online, hot-add, device offline with evacuation, long-term
pins, hard and soft page offlining, ECC, link loss, allocation failures."""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

import cdmfs
from cdmfs.client import MAX_SWAPFILES_SHIFT, PM_PRESENT, PM_SWAP, SWP_HWPOISON, pagemap_pfn
from cdmfs.lib.bitmap import parse_nodelist
from conftest import PAGE, cdm_machine, xorshift_page

BLOCK = 4 << 20
BLOCK_PAGES = BLOCK // PAGE

# Node 0: blocks 0-3; node 1 (cdm0): blocks 4-5; gpu0's private memory after.
LC_CONFIG = cdm_machine("16M")

# Node 2 is configured but absent until hot-added: blocks 6-7.
HOTPLUG_CONFIG = LC_CONFIG + """
[[node]]
id = 2
kind = "sysram"
size = "8M"
present = false
"""

SYS = "sys/devices/system"


@pytest.fixture(scope="module")
def lc():
    with cdmfs.mounted(LC_CONFIG) as m:
        yield m


@pytest.fixture(autouse=True)
def restore(request):
    """Leaves the module's mount as the next test expects it: devices and
    blocks online, no regions."""
    yield
    if "lc" not in request.fixturenames:
        return
    m = request.getfixturevalue("lc")
    for name in m.devices:
        m.device(name).online = True
    for b in m.memory_blocks:
        m.memory_block(b).online = True
    for name in m.regions:
        m.region(name).remove()


def cat(m: cdmfs.Mount, rel: str) -> str:
    with open(os.path.join(m.path, rel)) as f:
        return f.read()


def echo(m: cdmfs.Mount, rel: str, text: str) -> None:
    fd = os.open(os.path.join(m.path, rel), os.O_WRONLY)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def refused(err: int, fn, *args) -> None:
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err, e.value


def fill(r: cdmfs.client.Region, pages: int, seed: int, first: int = 0) -> None:
    with open(r.data, "r+b") as f:
        for i in range(first, first + pages):
            f.seek(i * PAGE)
            f.write(xorshift_page(seed, i))


def intact(r: cdmfs.client.Region, pages: int, seed: int, first: int = 0) -> bool:
    with open(r.data, "rb") as f:
        for i in range(first, first + pages):
            f.seek(i * PAGE)
            if f.read(PAGE) != xorshift_page(seed, i):
                return False
    return True


def pfns(r: cdmfs.client.Region, first: int = 0, n=None) -> list[int]:
    """The frames of the pages of [first, first + n) that have one, from
    pagemap (a device-private page's from its swap offset)."""
    return [pfn for pfn in map(pagemap_pfn, r.pagemap(first, n)) if pfn is not None]


def meminfo_kb(m: cdmfs.Mount, nid: int, key: str) -> int:
    return m.node(nid).meminfo[key]


def nodelist(m: cdmfs.Mount, name: str) -> set[int]:
    return parse_nodelist(cat(m, f"{SYS}/node/{name}"))


# ------------------------------------------------------------ the allocator

def test_allocator_hands_out_every_usable_frame_once():
    """Isolated blocks and retired frames are never handed out; a block's
    free frames come back exactly once when it is released."""
    from cdmfs._core import ffi, lib
    core = ffi.gc(lib.cdm_machine_new(), lib.cdm_machine_free)
    pool = lib.cdm_pool_add(core, 0, 64, 0)
    assert lib.cdm_pool_set_blocks(core, pool, 16) == 0
    out = ffi.new("uint64_t[64]")

    def drain() -> list[int]:
        got = []
        while lib.cdm_pool_alloc(core, pool, 1, out) == 0:
            got.append(out[0])
        assert len(got) == len(set(got))
        return got

    def free(frames) -> None:
        lib.cdm_pool_free(core, ffi.new("uint64_t[]", list(frames)), len(frames))

    assert lib.cdm_pool_alloc(core, pool, 20, out) == 0 and list(out[0:20]) == list(range(20))
    free([2, 3, 17])
    lib.cdm_block_isolate(core, pool, 0, 1)
    lib.cdm_block_isolate(core, pool, 2, 1)
    assert lib.cdm_frame_retire(core, 17, 0) == 0          # free: retired at once
    assert lib.cdm_frame_retire(core, 50, 0) == 0          # never used: skipped by the bump
    assert lib.cdm_frame_retire(core, 5, 0) == 1           # used: retired when freed
    assert lib.cdm_frame_retire(core, 50, 0) == -errno.EALREADY
    got = drain()
    assert sorted(got) == list(range(20, 32)) + [f for f in range(48, 64) if f != 50]
    free(got)
    assert lib.cdm_block_isolate(core, pool, 0, 0) == 2     # frames 2 and 3
    assert lib.cdm_block_isolate(core, pool, 2, 0) == 16
    assert lib.cdm_block_isolate(core, pool, 2, 0) == 0     # released once
    got = drain()
    assert sorted(got) == [2, 3] + list(range(20, 50)) + list(range(51, 64))
    assert lib.cdm_pool_free_pages(core, pool) == 0
    free(got + [5])
    assert core.pools[pool].nr_retired == 3
    held = drain()
    assert sorted(held) == [2, 3] + list(range(20, 50)) + list(range(51, 64))   # not 5
    assert lib.cdm_frames_unretire(core, 0, 64) == 3        # a link comes back: all usable again
    free(held + [f for f in range(20) if f not in (2, 3, 5, 17)])
    assert sorted(drain()) == list(range(64))


# ------------------------------------------------------------ the files

def test_memory_block_files_in_kernel_formats(lc):
    mem = os.path.join(lc.path, SYS, "memory")
    assert cat(lc, f"{SYS}/memory/block_size_bytes") == "400000\n"
    assert cat(lc, f"{SYS}/memory/auto_online_blocks") == "online\n"
    assert lc.memory_blocks == list(range(6))
    for b, nid, zone in [(0, 0, "Normal"), (3, 0, "Normal"), (4, 1, "Movable"), (5, 1, "Movable")]:
        d = os.path.join(mem, f"memory{b}")
        assert cat(lc, f"{SYS}/memory/memory{b}/phys_index") == f"{b:08x}\n"
        assert cat(lc, f"{SYS}/memory/memory{b}/state") == "online\n"
        assert cat(lc, f"{SYS}/memory/memory{b}/online") == "1\n"
        assert cat(lc, f"{SYS}/memory/memory{b}/valid_zones") == f"{zone}\n"
        assert cat(lc, f"{SYS}/memory/memory{b}/removable") == "1\n"
        assert cat(lc, f"{SYS}/memory/memory{b}/phys_device") == "0\n"
        assert os.readlink(os.path.join(d, f"node{nid}")) == f"../../node/node{nid}"
        assert os.path.realpath(os.path.join(d, f"node{nid}")) == \
            os.path.realpath(os.path.join(lc.path, SYS, "node", f"node{nid}"))
        back = os.path.join(lc.path, SYS, "node", f"node{nid}", f"memory{b}")
        assert os.readlink(back) == f"../../memory/memory{b}"
        assert os.path.realpath(back) == os.path.realpath(d)
        assert os.stat(os.path.join(d, "state")).st_mode & 0o777 == 0o644
    assert lc.node(0).memory_blocks == [0, 1, 2, 3]
    for name in ("probe", "soft_offline_page", "hard_offline_page"):
        assert os.stat(os.path.join(mem, name)).st_mode & 0o777 == 0o200
    if shutil.which("lsmem"):
        out = subprocess.run(["lsmem", "--sysroot", lc.path, "-o", "RANGE,SIZE,STATE,BLOCK,NODE,ZONES"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            assert "0x0000000000000000-0x0000000000ffffff  16M online   0-3    0  Normal" in out.stdout
            assert "Total online memory:      24M" in out.stdout


def test_node_switches(lc):
    assert (lc.node(0).numa_balancing, lc.node(0).reclaim) == (True, True)
    assert (lc.node(1).numa_balancing, lc.node(1).reclaim) == (False, False)
    lc.node(1).numa_balancing = True
    lc.node(0).reclaim = False
    assert lc.node(1).numa_balancing and not lc.node(0).reclaim
    refused(errno.EINVAL, echo, lc, f"{SYS}/node/node0/reclaim", "2")
    refused(errno.EINVAL, echo, lc, f"{SYS}/node/node1/numa_balancing", "yes")
    assert lc.node(1).numa_balancing and not lc.node(0).reclaim
    lc.node(1).numa_balancing = False
    lc.node(0).reclaim = True


def test_invalid_words_are_refused(lc):
    b0, b4 = lc.memory_block(0), lc.memory_block(4)
    for word in ("bogus", "", "onlinex", "1"):
        refused(errno.EINVAL, setattr, b0, "state", word)
    refused(errno.EINVAL, setattr, b0, "state", "online")           # already online
    refused(errno.EINVAL, setattr, b4, "state", "online_kernel")    # cdm: Movable only
    refused(errno.EINVAL, echo, lc, f"{SYS}/memory/memory0/online", "2")
    refused(errno.EINVAL, setattr, lc, "auto_online_blocks", "sometimes")
    refused(errno.EINVAL, lc.probe, 0x1001)                          # not block aligned
    refused(errno.EEXIST, lc.probe, 0)                               # present already
    refused(errno.EINVAL, lc.probe, 64 * BLOCK)                      # nothing configured there
    refused(errno.EINVAL, echo, lc, f"{SYS}/memory/hard_offline_page", "junk")
    refused(errno.EINVAL, lc.hard_offline, 1 << 40)                  # outside every pool
    refused(errno.EINVAL, lc.soft_offline, 1 << 40)
    gpu = lc.device("gpu0")
    for text in ("bogus", "ecc", "ecc 0x0", "fail_alloc", "fail_alloc x", "link_down now"):
        refused(errno.EINVAL, gpu.inject, text)
    refused(errno.EINVAL, echo, lc, "devices/gpu0/online", "2")
    r = lc.region("inval", 4 * PAGE)
    refused(errno.EINVAL, r.advise, 0, PAGE, "bogus")
    refused(errno.EINVAL, r.advise, 1, PAGE, "pin")
    refused(errno.EINVAL, r.advise, 0, 8 * PAGE, "pin")
    # Nothing of it changed anything.
    assert [lc.memory_block(b).state for b in lc.memory_blocks] == ["online"] * 6
    assert lc.auto_online_blocks == "online" and gpu.online
    assert r.stat["pinned"] == 0 and r.stat["N0"] == 0


# ------------------------------------------------------------ device offline

@pytest.mark.parametrize("name", ["gpu0", "cdm0"])
def test_offline_device_under_a_live_program(lc, cprog, name):
    """The device's data moves to system RAM under a program that keeps its
    mapping (and dirty pages) for the whole time; the program finds every
    byte; the device is out of service, then back, empty."""
    hold = cprog("hold")
    pages = 256
    dev = lc.device(name)
    target = "gpu0" if name == "gpu0" else "node:1"
    r = lc.region("live", pages * PAGE)
    if name == "cdm0":
        r.policy = "bind:1"        # the CPU's first touch lands on the CDM node
    p = subprocess.Popen([hold, r.data, str(pages), "11"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        if name == "gpu0":
            assert r.migrate(0, pages * PAGE, "gpu0")["migrated"] == pages
            assert r.stat["private:gpu0"] == pages
        else:
            assert r.stat["N1"] == pages
        assert dev.meminfo["MemUsed"] == pages * 4
        done = subprocess.run([sys.executable, "-m", "cdmfs", "device", lc.path, name, "offline"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert not dev.online
        assert dev.meminfo["MemUsed"] == 0
        st = r.stat
        assert (st["N0"], st["N1"], st["private:gpu0"]) == (pages, 0, 0)
        refused(errno.ENODEV, dev.access, "read", "live", 0, PAGE)
        refused(errno.ENODEV, r.migrate, 0, PAGE, target)
        if name == "cdm0":
            assert 1 not in nodelist(lc, "has_memory") and 1 not in nodelist(lc, "online")
            assert meminfo_kb(lc, 1, "MemTotal") == 0
            assert [lc.memory_block(b).state for b in (4, 5)] == ["offline", "offline"]
        # The program is still running and finds its data through its mapping.
        assert p.poll() is None
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline() == "ok\n"
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert intact(r, pages, 11)
    dev.online = True
    assert dev.online and dev.meminfo["MemUsed"] == 0
    assert set(dev.snapshot("live", 0, 4 * PAGE).values()) == {"none"}
    if name == "cdm0":
        assert 1 in nodelist(lc, "has_memory")
        assert meminfo_kb(lc, 1, "MemTotal") == 8192
    assert r.migrate(0, 4 * PAGE, target)["migrated"] == 4
    assert intact(r, 4, 11)


def test_migrate_release(lc):
    """hmm-tests' migrate_release: migrate to the device, the device reads
    it, the device's memory is released (migrate_device_range), the CPU
    reads half of it from system RAM."""
    npages = 256
    size = npages * PAGE
    r = lc.region("release", size)
    gpu = lc.device("gpu0")
    with open(r.data, "r+b") as f:
        mm = mmap.mmap(f.fileno(), size)
        ints = struct.pack(f"<{size // 4}i", *range(size // 4))
        mm[:] = ints
        assert r.migrate(0, size, "gpu0")["migrated"] == npages            # cpages == npages
        assert gpu.access("read", "release", 0, size)["crc32"] == zlib.crc32(ints)
        gpu.online = False                                                 # HMM_DMIRROR_RELEASE
        assert r.stat["private:gpu0"] == 0 and r.stat["N0"] == npages
        half = size // 2
        assert mm[:half] == ints[:half]
        mm.close()
    gpu.online = True
    assert gpu.meminfo["MemUsed"] == 0


def test_offline_with_a_pinned_page_is_ebusy(lc):
    r = lc.region("pinned", 64 * PAGE)
    fill(r, 64, 3)
    r.pin(10 * PAGE, PAGE)
    assert r.stat["pinned"] == 1
    assert meminfo_kb(lc, 0, "Mlocked") == 4
    assert cat(lc, "regions/pinned/advise") == f"{10 * PAGE} {PAGE} pin\n"
    before = r.pagemap()
    block = lc.block_of(r.phys_addr(10))
    refused(errno.EBUSY, setattr, block, "state", "offline")
    assert block.state == "online"
    assert r.pagemap() == before                  # every page where it was
    assert r.migrate(10 * PAGE, PAGE, "1")["holes"] == [(10, 10, "-EBUSY")]
    # A pin of pages on the CDM node takes them to system RAM first.
    c = lc.region("oncdm", 8 * PAGE)
    c.policy = "bind:1"
    fill(c, 8, 4)
    assert c.stat["N1"] == 8
    c.pin(0, 8 * PAGE)
    assert (c.stat["N0"], c.stat["N1"], c.stat["pinned"]) == (8, 0, 8)
    assert meminfo_kb(lc, 1, "Mlocked") == 0 and meminfo_kb(lc, 0, "Mlocked") == 4 * 9
    assert intact(c, 8, 4)
    r.unpin(0, 64 * PAGE)
    c.unpin(0, 8 * PAGE)
    assert r.stat["pinned"] == c.stat["pinned"] == 0 and meminfo_kb(lc, 0, "Mlocked") == 0
    block.state = "offline"                        # now it can go
    assert block.state == "offline" and intact(r, 64, 3)


# ------------------------------------------------------------ memory blocks

@pytest.mark.parametrize("nid", [0, 1])
def test_block_offline_online_round_trip(lc, nid):
    pages = 300
    r = lc.region(f"blk{nid}", pages * PAGE)
    r.policy = f"bind:{nid}"
    fill(r, pages, 20 + nid)
    held = {}
    for pfn in pfns(r):
        held[pfn // BLOCK_PAGES] = held.get(pfn // BLOCK_PAGES, 0) + 1
    b = max(held, key=held.get)
    block = lc.memory_block(b)
    assert block.node == nid
    total = meminfo_kb(lc, nid, "MemTotal")
    used = meminfo_kb(lc, nid, "MemUsed")
    block.state = "offline"
    assert (block.state, block.online) == ("offline", False)
    assert block.valid_zones == (["Movable"] if nid else ["Normal", "Movable"])
    assert meminfo_kb(lc, nid, "MemTotal") == total - BLOCK // 1024
    moved = held[b]
    if nid == 0:
        # No other node takes implicit allocations (node 1 is isolated): the
        # pages stay on node 0, on its other blocks.
        assert meminfo_kb(lc, 0, "MemUsed") == used and r.stat["N0"] == pages
    else:
        # do_migrate_range() leaves the node: the block's pages go to node 0,
        # the others stay on node 1's other block.
        assert meminfo_kb(lc, 1, "MemUsed") == used - moved * PAGE // 1024
        assert (r.stat["N0"], r.stat["N1"]) == (moved, pages - moved)
    assert not any(pfn // BLOCK_PAGES == b for pfn in pfns(r))
    assert intact(r, pages, 20 + nid)
    refused(errno.EINVAL, setattr, block, "state", "offline")   # already offline
    block.online = True
    assert (block.state, block.valid_zones) == ("online", ["Movable" if nid else "Normal"])
    assert meminfo_kb(lc, nid, "MemTotal") == total
    # Its frames are back in the allocator, once: the whole node fills again.
    assert meminfo_kb(lc, nid, "MemFree") == total - meminfo_kb(lc, nid, "MemUsed")
    assert meminfo_kb(lc, nid, "MemUsed") == (used if nid == 0 else used - moved * PAGE // 1024)
    if nid == 0:
        block.state = "offline"
        block.state = "online_movable"
        assert block.valid_zones == ["Movable"]


def test_all_blocks_of_the_cdm_node_offline(lc):
    r = lc.region("cdmall", 64 * PAGE)
    r.policy = "bind:1"
    fill(r, 64, 5)
    for b in (4, 5):
        lc.memory_block(b).state = "offline"
    # bind:1 has nowhere left on node 1: offline_pages() takes the nearest node.
    assert (r.stat["N0"], r.stat["N1"]) == (64, 0)
    assert intact(r, 64, 5)
    assert 1 not in nodelist(lc, "online") | nodelist(lc, "has_memory") | nodelist(lc, "has_coherent_device")
    assert meminfo_kb(lc, 1, "MemTotal") == 0
    refused(errno.ENODEV, r.migrate, 0, PAGE, "node:1")
    lc.memory_block(4).state = "online"
    assert 1 in nodelist(lc, "has_memory") and meminfo_kb(lc, 1, "MemTotal") == 4096
    assert r.migrate(0, 4 * PAGE, "1")["migrated"] == 4


# ------------------------------------------------------------ memory failure

CHILD_READ = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, int(sys.argv[2]) * 4096, prot=mmap.PROT_READ)
for page in map(int, sys.argv[3:]):
    sys.stdout.buffer.write(m[page * 4096:(page + 1) * 4096])
"""


def child_read(r, npages: int, *pages: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD_READ, r.data, str(npages), *map(str, pages)],
                          capture_output=True, timeout=30)


def test_hard_poison_of_one_page(lc):
    pages = 16
    used0 = meminfo_kb(lc, 0, "MemUsed")
    r = lc.region("poison", pages * PAGE)
    fill(r, pages, 8)
    with open(r.data, "rb") as f:      # the CPU has every page cached
        f.read()
    used = meminfo_kb(lc, 0, "MemUsed")
    addr = r.phys_addr(8)
    lc.hard_offline(addr)
    # Only that page's access dies with SIGBUS; its neighbours read correctly.
    assert child_read(r, pages, 8).returncode == -signal.SIGBUS
    done = child_read(r, pages, 7, 9)
    assert done.returncode == 0 and done.stdout == xorshift_page(8, 7) + xorshift_page(8, 9)
    with open(r.data, "rb") as f:
        refused(errno.EIO, os.pread, f.fileno(), PAGE, 8 * PAGE)
        assert os.pread(f.fileno(), PAGE, 9 * PAGE) == xorshift_page(8, 9)
    assert r.stat["poisoned"] == 1
    # A hwpoison swap entry naming the failed frame, as the kernel leaves it.
    assert r.pagemap(8, 1)[0] == PM_SWAP | SWP_HWPOISON | (addr // PAGE) << MAX_SWAPFILES_SHIFT
    assert r.phys_addr(8) == addr
    assert r.pagemap(7, 1)[0] & PM_PRESENT
    gpu = lc.device("gpu0")
    assert gpu.snapshot("poison", 7 * PAGE, 3 * PAGE)[8] == "error"
    refused(errno.EIO, gpu.access, "read", "poison", 8 * PAGE, PAGE)
    assert meminfo_kb(lc, 0, "MemUsed") == used          # the retired frame counts as used
    # Truncating clears the page's poison; the frame stays retired.
    r.truncate(8 * PAGE)
    r.truncate(pages * PAGE)
    assert r.stat["poisoned"] == 0
    assert child_read(r, pages, 8).stdout == bytes(PAGE)
    r.truncate(0)
    assert meminfo_kb(lc, 0, "MemUsed") == used0 + 4
    refused(133, lc.hard_offline, addr)                   # EHWPOISON: poisoned already, as memory_failure()


def test_pagemap_entries_as_the_kernel_writes_them(lc):
    """regions/NAME/pagemap read by root, bit for bit, as fs/proc/task_mmu.c
    writes /proc/PID/pagemap for a private anonymous page mapped once (no
    PM_FILE, bit 61): in memory, PM_PRESENT | PM_MMAP_EXCLUSIVE | PFN; on
    device-private memory, PM_SWAP with the frame field SWP_DEVICE_WRITE (28)
    | PFN << MAX_SWAPFILES_SHIFT (5); poisoned, PM_SWAP with SWP_HWPOISON (24)
    | failed PFN << 5; never touched, 0."""
    present, exclusive, swap, pfn_bits = 1 << 63, 1 << 56, 1 << 62, (1 << 55) - 1
    r = lc.region("pm", 8 * PAGE)
    fill(r, 6, 30)                                       # pages 0-5 on node 0; 6, 7 untouched
    assert r.migrate(2 * PAGE, 2 * PAGE, "gpu0")["migrated"] == 2
    with open(os.path.join(r.path, "pagemap"), "rb") as f:
        before = struct.unpack("<8Q", f.read(64))      # whole entries only
    failed = before[4] & pfn_bits
    lc.hard_offline(failed * PAGE)
    with open(os.path.join(r.path, "pagemap"), "rb") as f:
        entries = struct.unpack("<8Q", f.read(64))
    # In memory: its frame, on node 0.
    for page in (0, 1, 5):
        e = entries[page]
        assert e & ~pfn_bits == present | exclusive, (page, hex(e))
        assert e == before[page] and lc.block_of((e & pfn_bits) * PAGE).node == 0
    # Device-private: a writable device-private swap entry; its offset is the
    # frame in gpu0's memory resource.
    start, end = lc.device("gpu0").resource
    offsets = set()
    for page in (2, 3):
        e = entries[page]
        assert e & ~pfn_bits == swap and e & 0x1f == 28, (page, hex(e))
        offset = (e & pfn_bits) >> 5
        assert start <= offset * PAGE <= end
        assert r.phys_addr(page) == offset * PAGE
        offsets.add(offset)
    assert len(offsets) == 2
    # Poisoned: a hwpoison swap entry naming the frame that failed.
    assert entries[4] == swap | failed << 5 | 24, hex(entries[4])
    assert r.phys_addr(4) == failed * PAGE
    # Never touched.
    assert entries[6:] == (0, 0) and r.phys_addr(6) is None
    assert r.pagemap() == list(entries)


def test_hard_poison_under_a_live_program(lc, cprog):
    """The program has the page mapped and dirty when its frame fails: its
    next access to that page dies with SIGBUS; its other pages are intact."""
    hold = cprog("hold")
    r = lc.region("dirty", 8 * PAGE)
    p = subprocess.Popen([hold, r.data, "8", "21"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        lc.hard_offline(r.phys_addr(5))
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.wait(30) == -signal.SIGBUS      # checking page 5
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert intact(r, 5, 21) and intact(r, 2, 21, first=6)
    assert r.stat["poisoned"] == 1


def test_ecc_in_device_memory(lc):
    r = lc.region("ecc", 8 * PAGE)
    fill(r, 8, 9)
    assert r.migrate(0, 8 * PAGE, "gpu0")["migrated"] == 8
    gpu = lc.device("gpu0")
    start, end = gpu.resource
    addr = r.phys_addr(3)
    assert start <= addr <= end
    gpu.inject(f"ecc {addr:#x}")
    refused(errno.EIO, gpu.access, "read", "ecc", 3 * PAGE, PAGE)
    assert gpu.access("read", "ecc", 4 * PAGE, PAGE)["crc32"] == zlib.crc32(xorshift_page(9, 4))
    assert gpu.snapshot("ecc", 2 * PAGE, 3 * PAGE) == {2: "private-local", 3: "error", 4: "private-local"}
    # 7 pages there and the bad frame, retired: used.
    assert r.stat["poisoned"] == 1 and gpu.meminfo["MemUsed"] == 8 * 4
    with open(r.data, "rb") as f:
        refused(errno.EIO, os.pread, f.fileno(), PAGE, 3 * PAGE)
    assert intact(r, 3, 9) and intact(r, 4, 9, first=4)
    refused(errno.EINVAL, gpu.inject, f"ecc {r.phys_addr(0):#x}")       # back in system RAM now


def test_soft_offline_keeps_the_data(lc):
    r = lc.region("soft", 8 * PAGE)
    fill(r, 8, 10)
    with open(r.data, "rb") as f:
        f.read()
    used = meminfo_kb(lc, 0, "MemUsed")
    addr = r.phys_addr(5)
    lc.soft_offline(addr)
    assert r.phys_addr(5) != addr and r.stat["N0"] == 8         # moved, same node
    assert intact(r, 8, 10) and child_read(r, 8, 5).stdout == xorshift_page(10, 5)
    assert r.stat["poisoned"] == 0
    assert meminfo_kb(lc, 0, "MemUsed") == used + 4             # the old frame is retired
    lc.soft_offline(addr)                                        # already retired: fine
    # The retired frame is never handed out again, not even to fill the node.
    free = meminfo_kb(lc, 0, "MemFree") // 4
    r2 = lc.region("soft2", free * PAGE)
    with open(r2.data, "r+b") as f:
        for i in range(free):
            f.seek(i * PAGE)
            f.write(b"x")
    assert meminfo_kb(lc, 0, "MemFree") == 0
    assert addr // PAGE not in set(pfns(r2))


def test_link_down_during_a_device_workload(lc):
    gpu = lc.device("gpu0")
    wl = lc.region("wl", 64 * PAGE)
    fill(wl, 64, 12)
    assert wl.migrate(0, 64 * PAGE, "gpu0")["migrated"] == 64
    other = lc.region("other", 32 * PAGE)
    fill(other, 32, 13)
    assert other.migrate(0, 16 * PAGE, "1")["migrated"] == 16       # half on cdm0's node
    errors: list[tuple[int, bool]] = []     # (errno, whether the link was going down)
    ran = [0]
    going_down = threading.Event()

    def workload() -> None:
        while True:
            try:
                gpu.access("add", "wl", 0, 64 * PAGE, 1)
                ran[0] += 1
            except OSError as e:
                errors.append((e.errno, going_down.is_set()))
                return

    t = threading.Thread(target=workload, daemon=True)
    t.start()
    # The link goes down once the workload has run a few accesses (the
    # deadline only catches a workload that never gets going).
    deadline = time.monotonic() + 60
    while ran[0] < 3 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert t.is_alive() and ran[0] >= 3, \
        f"the workload did {ran[0]} accesses, then {'failed: ' + str(errors) if errors else 'hung'}"
    going_down.set()
    gpu.inject("link_down")
    t.join(30)
    assert not t.is_alive()
    # It failed because the link went down, not before.
    assert len(errors) == 1 and errors[0][0] in (errno.ENODEV, errno.EIO) and errors[0][1], errors
    assert not gpu.online
    refused(errno.ENODEV, gpu.access, "read", "other", 0, PAGE)
    # Its memory is lost: every page that was there is poisoned.
    assert wl.stat["poisoned"] == 64 and wl.stat["private:gpu0"] == 0
    with open(wl.data, "rb") as f:
        refused(errno.EIO, os.pread, f.fileno(), PAGE, 0)
    # Nothing else is affected and the mount keeps serving.
    assert intact(other, 32, 13)
    assert lc.device("cdm0").access("read", "other", 0, PAGE)["crc32"] == zlib.crc32(xorshift_page(13, 0))
    assert "MemTotal" in cat(lc, f"{SYS}/node/node0/meminfo") and nodelist(lc, "online") == {0, 1}
    fresh = lc.region("fresh", 4 * PAGE)
    fill(fresh, 4, 14)
    assert intact(fresh, 4, 14)
    # Back online: the device's memory is empty and usable again.
    gpu.online = True
    assert gpu.meminfo["MemUsed"] == 0
    assert fresh.migrate(0, 4 * PAGE, "gpu0")["migrated"] == 4
    wl.truncate(0)
    assert wl.stat["poisoned"] == 0


def test_link_down_of_a_coherent_device(lc):
    cdm = lc.device("cdm0")
    r = lc.region("cl", 16 * PAGE)
    fill(r, 16, 15)
    assert r.migrate(8 * PAGE, 8 * PAGE, "1")["migrated"] == 8
    with open(r.data, "rb") as f:
        f.read()                    # the CPU has the CDM pages cached too
    cdm.inject("link_down")
    assert r.stat["poisoned"] == 8 and not cdm.online
    assert child_read(r, 16, 9).returncode == -signal.SIGBUS
    assert intact(r, 8, 15)
    assert 1 not in nodelist(lc, "has_memory")
    cdm.online = True
    assert meminfo_kb(lc, 1, "MemUsed") == 0 and meminfo_kb(lc, 1, "MemTotal") == 8192


def test_fail_alloc_makes_enomem_holes(lc):
    r = lc.region("fa", 8 * PAGE)
    fill(r, 8, 16)
    gpu = lc.device("gpu0")
    gpu.inject("fail_alloc 3")
    res = r.migrate(0, 8 * PAGE, "gpu0")
    assert (res["migrated"], res["skipped"]) == (5, 3)
    assert {err for _, _, err in res["holes"]} == {"-ENOMEM"}
    assert r.migrate(0, 8 * PAGE, "gpu0")["migrated"] == 3       # the injection is used up
    assert intact(r, 8, 16)


def test_cli_device_progress_on_a_terminal(lc):
    if shutil.which("script") is None:
        pytest.skip("no script(1) for a terminal")
    r = lc.region("cli", 512 * PAGE)
    fill(r, 512, 17)
    assert r.migrate(0, 512 * PAGE, "gpu0")["migrated"] == 512
    cmd = f"{sys.executable} -m cdmfs device {lc.path} gpu0 offline"
    out = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
    assert "gpu0: offline, 2.0 MiB moved to system RAM" in out.stdout
    assert not lc.device("gpu0").online and intact(r, 512, 17)
    bad = subprocess.run([sys.executable, "-m", "cdmfs", "device", lc.path, "nosuch", "offline"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "no device 'nosuch'" in bad.stderr
    assert subprocess.run([sys.executable, "-m", "cdmfs", "device", lc.path, "gpu0", "online"]).returncode == 0
    assert lc.device("gpu0").online


# ------------------------------------------------------------ hot-add

def test_hot_add_by_probe():
    with cdmfs.mounted(HOTPLUG_CONFIG) as m:
        assert 2 in nodelist(m, "possible")
        assert 2 not in nodelist(m, "online") | nodelist(m, "has_memory")
        assert not os.path.exists(os.path.join(m.path, SYS, "node", "node2"))
        assert m.memory_blocks == list(range(6))
        refused(errno.ENODEV, m.region("h", PAGE).migrate, 0, PAGE, "2")
        # As mbind(2) and set_mempolicy(2): a node list with no memory is EINVAL.
        with pytest.raises(OSError) as e:
            m.region("h").policy = "bind:2"
        assert e.value.errno == errno.EINVAL and m.region("h").policy == "default"
        m.region("h").policy = "interleave:0,2"           # one node with memory is enough
        m.region("h").policy = "default"
        refused(errno.EINVAL, m.probe, 6 * BLOCK + PAGE)
        m.probe(6 * BLOCK)
        assert m.memory_blocks == list(range(7))
        b6 = m.memory_block(6)
        assert (b6.state, b6.node, b6.valid_zones) == ("online", 2, ["Normal"])
        assert os.path.isdir(os.path.join(m.path, SYS, "node", "node2"))
        assert os.readlink(os.path.join(m.path, SYS, "node", "node2", "memory6")) == "../../memory/memory6"
        assert os.path.islink(os.path.join(m.path, "sys/bus/node/devices/node2"))
        assert 2 in nodelist(m, "online") & nodelist(m, "has_memory") & nodelist(m, "has_normal_memory")
        assert m.node(2).meminfo["MemTotal"] == 4096
        refused(errno.EEXIST, m.probe, 6 * BLOCK)
        r = m.region("h")
        r.truncate(16 * PAGE)
        r.policy = "bind:2"
        fill(r, 16, 18)
        assert r.stat["N2"] == 16 and intact(r, 16, 18)
        m.auto_online_blocks = "offline"
        m.probe(7 * BLOCK)
        assert m.memory_block(7).state == "offline"
        assert m.node(2).meminfo["MemTotal"] == 4096
        m.memory_block(7).state = "online_movable"
        assert m.node(2).meminfo["MemTotal"] == 8192 and m.memory_block(7).valid_zones == ["Movable"]
        r.remove()
