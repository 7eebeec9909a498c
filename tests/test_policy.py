"""Memory policies through a real mount (SPEC §6, §6.1): C programs first-touch
regions; numa_maps, pagemap, stat and node meminfo must agree on where every
page went; mbind splits, merges and moves; counters follow the kernel's rules."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections import Counter

import pytest

import cdmfs
from cdmfs.client import (PM_MMAP_EXCLUSIVE, PM_PFN_MASK, PM_PRESENT, PM_SWAP, SWP_DEVICE_WRITE,
                          pagemap_pfn, pagemap_swap_type, parse_numa_maps)
from conftest import PAGE

DEFAULT_BLOCK = 128 << 20      # the embedded default's block_size
SMALL_BLOCK = 4 << 20          # conftest.SMALL_CONFIG's


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_file(path: str) -> str:
    with open(path) as f:
        return f.read()


def pfn_ranges(m, block: int) -> dict:
    """SPEC §5's physical layout: nodes in id order from address 0, each on a
    block boundary, then device-private memory (from devices/NAME/resource)."""
    out = {}
    base = 0
    for nid in m.nodes:
        pages = m.node(nid).meminfo["MemTotal"] // 4
        out[nid] = (base, base + pages)
        base = -(-(base + pages) * PAGE // block) * block // PAGE
    for dev in m.devices:
        path = os.path.join(m.path, "devices", dev)
        if read_file(os.path.join(path, "type")).strip() == "private":
            start, end = (int(x, 16) for x in read_file(os.path.join(path, "resource")).split())
            out[f"private:{dev}"] = (start // PAGE, (end + 1) // PAGE)
    return out


def where(entry: int, ranges: dict):
    """The node id (or ``private:DEV``) of a pagemap entry's frame; None if absent."""
    if entry == 0:
        return None
    pfn = pagemap_pfn(entry)
    for key, (lo, hi) in ranges.items():
        if lo <= pfn < hi:
            return key
    raise AssertionError(f"PFN {pfn:#x} is in no node's range")


def placement(m, r, block=DEFAULT_BLOCK) -> list:
    """Where each page of r is, by its pagemap entry (checking the entry bits)."""
    ranges = pfn_ranges(m, block)
    out = []
    for e in r.pagemap():
        w = where(e, ranges)
        if w is None:
            assert e == 0
        elif isinstance(w, int):     # present, mapped once, anonymous: no PM_FILE
            assert e & ~PM_PFN_MASK == PM_PRESENT | PM_MMAP_EXCLUSIVE, hex(e)
        else:                        # a writable device-private swap entry
            assert e & ~PM_PFN_MASK == PM_SWAP and pagemap_swap_type(e) == SWP_DEVICE_WRITE, hex(e)
        out.append(w)
    return out


def check_views_agree(m, r, block=DEFAULT_BLOCK) -> Counter:
    """pagemap, numa_maps and stat give the same count per node; returns it."""
    pages = Counter(w for w in placement(m, r, block) if w is not None)
    maps = r.numa_maps
    nodes, private = Counter(), Counter()
    for line in maps:
        nodes.update(line["nodes"])
        private.update({f"private:{d}": n for d, n in line["private"].items()})
        assert line["anon"] == sum(line["nodes"].values())
        if line["anon"] or line["private"]:
            assert line["kernelpagesize_kB"] == 4
    assert pages == nodes + private
    st = r.stat
    for nid in m.nodes:
        assert st[f"N{nid}"] == pages[nid]
    return pages


def used_pages(m) -> dict:
    return {nid: m.node(nid).meminfo["MemUsed"] // 4 for nid in m.nodes}


def counters(m) -> dict:
    return {nid: m.node(nid).numastat for nid in m.nodes}


def counter_delta(before: dict, after: dict) -> dict:
    return {nid: {k: after[nid][k] - before[nid][k] for k in after[nid]} for nid in after}


def kernel_counts(nodes, events) -> dict:
    """numastat deltas by the kernel's rules (zone_statistics() and, for
    interleave, alloc_pages_mpol()): events are (intended, placed, local,
    interleaved) for every page allocated."""
    keys = ("numa_hit", "numa_miss", "numa_foreign", "interleave_hit", "local_node", "other_node")
    out = {nid: dict.fromkeys(keys, 0) for nid in nodes}
    for intended, placed, local, interleaved in events:
        if placed == intended:
            out[placed]["numa_hit"] += 1
            if interleaved:
                out[placed]["interleave_hit"] += 1
        else:
            out[placed]["numa_miss"] += 1
            out[intended]["numa_foreign"] += 1
        out[placed]["local_node" if placed == local else "other_node"] += 1
    return out


# ------------------------------------------------------------------ every policy

# policy -> (kernel spelling in numa_maps, node of page i for a CPU on node 0)
POLICIES = {
    "default": ("default", lambda i: 0),
    "local": ("local", lambda i: 0),
    "bind:1": ("bind:1", lambda i: 1),
    "bind:0-1": ("bind:0-1", lambda i: 0),
    "preferred:1": ("prefer:1", lambda i: 1),
    "preferred_many:1": ("prefer (many):1", lambda i: 1),
    "interleave:0-1": ("interleave:0-1", lambda i: i % 2),
    "weighted_interleave:0-1": ("weighted interleave:0-1", lambda i: i % 2),
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_first_touch_by_every_policy(mnt, cprog, policy):
    pattern = cprog("pattern")
    spelling, node_of_page = POLICIES[policy]
    before = used_pages(mnt)
    r = mnt.region("every", 64 * PAGE)
    r.policy = policy
    w = run(pattern, "write", r.data, 64, 11, 40)
    assert w.returncode == 0, w.stderr
    places = placement(mnt, r)
    touched = [i for i, p in enumerate(places) if p is not None]
    assert len(touched) == 40
    for i in touched:
        assert places[i] == node_of_page(i), (policy, i)
    pages = check_views_agree(mnt, r)
    (line,) = r.numa_maps
    assert line["start"] == 0 and line["policy"] == spelling
    assert line["anon"] == 40 and line["dirty"] == 40       # msync wrote every page back
    text = r.numa_maps_text
    assert text.startswith(f"00000000 {spelling} anon=40 dirty=40 N")
    assert text.endswith(" kernelpagesize_kB=4\n")
    after = used_pages(mnt)
    assert {nid: after[nid] - before[nid] for nid in after} == {nid: pages[nid] for nid in after}
    assert run(pattern, "verify", r.data, 64, 11, 40).returncode == 0
    r.remove()
    assert used_pages(mnt) == before


def test_interleave_alternates_exactly(mnt, cprog):
    r = mnt.region("alt", 256 * PAGE)
    r.policy = "interleave:0-1"
    assert run(cprog("pattern"), "touch", r.data, 256).returncode == 0
    ranges = pfn_ranges(mnt, DEFAULT_BLOCK)
    entries = r.pagemap()
    assert [where(e, ranges) for e in entries] == [i % 2 for i in range(256)]
    assert len({e & PM_PFN_MASK for e in entries}) == 256
    # pread at an offset gives those pages' entries.
    fd = os.open(os.path.join(r.path, "pagemap"), os.O_RDONLY)
    try:
        raw = os.pread(fd, 16, 101 * 8)
    finally:
        os.close(fd)
    assert [int.from_bytes(raw[k:k + 8], "little") for k in (0, 8)] == entries[101:103]
    assert r.pagemap(200, 3) == entries[200:203]
    assert os.stat(os.path.join(r.path, "pagemap")).st_size == 256 * 8
    r.remove()


def test_weighted_interleave_three_to_one(mnt, cprog):
    wdir = os.path.join(mnt.path, "sys/kernel/mm/mempolicy/weighted_interleave")
    mnt.set_weight(0, 3)
    try:
        assert read_file(os.path.join(wdir, "node0")) == "3\n"
        assert mnt.weights == {0: 3, 1: 1}
        r = mnt.region("wil", 64 * PAGE)
        r.policy = "weighted_interleave:0-1"
        before = counters(mnt)
        assert run(cprog("pattern"), "touch", r.data, 64).returncode == 0
        delta = counter_delta(before, counters(mnt))
        want = [(0, 0, 0, 1)[i % 4] for i in range(64)]
        assert placement(mnt, r) == want
        (line,) = r.numa_maps
        assert line["policy"] == "weighted interleave:0-1"
        assert line["nodes"] == {0: 48, 1: 16}
        assert delta == kernel_counts(mnt.nodes, [(n, n, 0, True) for n in want])
        r.remove()
    finally:
        mnt.set_weight(0, 1)
    assert mnt.weights == {0: 1, 1: 1}


# ------------------------------------------------------------------ counters

def test_counters_follow_kernel_rules(mnt, cprog):
    touch = cprog("pattern")
    nodes = mnt.nodes
    events = []
    before = counters(mnt)
    vm_before = {nid: mnt.node(nid).vmstat for nid in nodes}
    # bind:1 from a CPU on node 0: hits on node 1, all of them other_node.
    rb = mnt.region("cb", 30 * PAGE)
    rb.policy = "bind:1"
    assert run(touch, "touch", rb.data, 30).returncode == 0
    events += [(1, 1, 0, False)] * 30
    # interleave:0-1 by page offset: hits and interleave hits on both nodes.
    ri = mnt.region("ci", 41 * PAGE)
    ri.policy = "interleave:0-1"
    assert run(touch, "touch", ri.data, 41).returncode == 0
    events += [(i % 2, i % 2, 0, True) for i in range(41)]
    # default: local hits on node 0.
    rd = mnt.region("cd", 7 * PAGE)
    assert run(touch, "touch", rd.data, 7).returncode == 0
    events += [(0, 0, 0, False)] * 7
    delta = counter_delta(before, counters(mnt))
    assert delta == kernel_counts(nodes, events)
    # vmstat carries the same numa_hit/numa_miss.
    for nid in nodes:
        vm = mnt.node(nid).vmstat
        for key in ("numa_hit", "numa_miss"):
            assert vm[key] - vm_before[nid][key] == delta[nid][key]
    for r in (rb, ri, rd):
        r.remove()


def test_preferred_falls_back_when_node_full(small, cprog):
    touch = cprog("pattern")
    free1 = small.node(1).meminfo["MemFree"] // 4
    n = free1 + 100
    before = counters(small)
    r = small.region("pref", n * PAGE)
    r.policy = "preferred:1"
    out = run(touch, "touch", r.data, n)
    assert out.returncode == 0, out.stderr
    places = placement(small, r, SMALL_BLOCK)
    # touched in order: node 1 until full, then the nearest node, 0.
    assert places == [1] * free1 + [0] * 100
    pages = check_views_agree(small, r, SMALL_BLOCK)
    assert pages == {1: free1, 0: 100}
    assert small.node(1).meminfo["MemFree"] == 0
    delta = counter_delta(before, counters(small))
    assert delta == kernel_counts(small.nodes, [(1, p, 0, False) for p in places])
    assert delta[0]["numa_miss"] == 100 and delta[1]["numa_foreign"] == 100
    r.remove()


def test_preferred_many_spills_from_the_local_node(small, cprog):
    """preferred_many tries its nodemask, then the whole machine from the
    local node (alloc_pages_preferred_many()): the pages that spill out of
    the mask are charged against the local node, so landing there is a
    hit, not a miss against the preferred node."""
    touch = cprog("pattern")
    free1 = small.node(1).meminfo["MemFree"] // 4
    n = free1 + 100
    before = counters(small)
    r = small.region("prefmany", n * PAGE)
    r.policy = "preferred_many:1"
    out = run(touch, "touch", r.data, n)
    assert out.returncode == 0, out.stderr
    places = placement(small, r, SMALL_BLOCK)
    assert places == [1] * free1 + [0] * 100
    delta = counter_delta(before, counters(small))
    assert delta == kernel_counts(small.nodes, [(1 if p == 1 else 0, p, 0, False) for p in places])
    assert delta[0]["numa_hit"] == 100 and delta[0]["numa_miss"] == 0
    assert delta[1]["numa_foreign"] == 0
    r.remove()


def test_bind_full_node_sigbus(small, cprog):
    touch = cprog("pattern")
    free1 = small.node(1).meminfo["MemFree"] // 4
    before = counters(small)
    r = small.region("bindfull", (free1 + 10) * PAGE)
    r.policy = "bind:1"
    out = run(touch, "touch", r.data, free1 + 10)
    assert out.returncode == -signal.SIGBUS
    pages = check_views_agree(small, r, SMALL_BLOCK)
    assert pages == {1: free1}
    assert small.node(0).meminfo["MemUsed"] == 0
    delta = counter_delta(before, counters(small))
    assert delta == kernel_counts(small.nodes, [(1, 1, 0, False)] * free1)
    # write() of a page that cannot be placed: ENOSPC.
    fd = os.open(r.data, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * PAGE, (free1 + 5) * PAGE)
    finally:
        os.close(fd)
    assert e.value.errno == errno.ENOSPC
    r.remove()


def test_unisolated_cdm_node_is_default_fallback(small, cprog):
    touch = cprog("pattern")
    free0 = small.node(0).meminfo["MemFree"] // 4
    small.node(1).isolated = False
    try:
        before = counters(small)
        r = small.region("unisol", (free0 + 50) * PAGE)
        out = run(touch, "touch", r.data, free0 + 50)
        assert out.returncode == 0, out.stderr
        places = placement(small, r, SMALL_BLOCK)
        assert places == [0] * free0 + [1] * 50
        assert check_views_agree(small, r, SMALL_BLOCK) == {0: free0, 1: 50}
        delta = counter_delta(before, counters(small))
        assert delta == kernel_counts(small.nodes, [(0, p, 0, False) for p in places])
        r.remove()
    finally:
        small.node(1).isolated = True
    assert small.node(1).isolated


# ------------------------------------------------------------------ mbind

def test_mbind_ranges_split_and_merge(mnt):
    r = mnt.region("split", 16 * PAGE)
    assert r.mbinds == [] and r.numa_maps_text == "00000000 default\n"
    r.mbind(0, 16 * PAGE, "bind:1")
    assert r.mbinds == [(0, 16 * PAGE, "bind:1")]
    r.mbind(4 * PAGE, 4 * PAGE, "interleave:0-1")
    assert r.mbinds == [(0, 4 * PAGE, "bind:1"), (4 * PAGE, 4 * PAGE, "interleave:0-1"),
                        (8 * PAGE, 8 * PAGE, "bind:1")]
    # The same policy again over the middle: the three merge back into one.
    r.mbind(4 * PAGE, 4 * PAGE, "bind:1")
    assert r.mbinds == [(0, 16 * PAGE, "bind:1")]
    # default gives a range back to the region's policy.
    r.mbind(0, 4 * PAGE, "default")
    r.mbind(0x6000, 0x2000, "preferred:1")
    assert read_file(os.path.join(r.path, "mbind")) == (
        f"{4 * PAGE} {2 * PAGE} bind:1\n{6 * PAGE} {2 * PAGE} preferred:1\n{8 * PAGE} {8 * PAGE} bind:1\n")
    r.policy = "local"
    assert r.numa_maps_text == ("00000000 local\n00004000 bind:1\n00006000 prefer:1\n"
                                "00008000 bind:1\n")
    # Shrinking the file cuts the ranges; growing it does not bring them back.
    r.truncate(10 * PAGE)
    assert r.mbinds[-1] == (8 * PAGE, 2 * PAGE, "bind:1")
    r.truncate(16 * PAGE)
    assert r.numa_maps_text.splitlines()[-1] == "0000a000 local"
    r.remove()


def test_mbind_ranges_place_first_touch(mnt, cprog):
    """One FUSE request spanning several ranges is cut at their boundaries."""
    r = mnt.region("ranges", 32 * PAGE)
    r.mbind(4 * PAGE, 8 * PAGE, "bind:1")
    r.mbind(12 * PAGE, 8 * PAGE, "interleave:0-1")
    r.mbind(24 * PAGE, 4 * PAGE, "preferred_many:1")
    want = [1 if 4 <= i < 12 else i % 2 if 12 <= i < 20 else 1 if 24 <= i < 28 else 0
            for i in range(32)]
    with open(r.data, "r+b") as f:          # one write() of the whole region
        f.write(b"\x5a" * 32 * PAGE)
    assert placement(mnt, r) == want
    maps = r.numa_maps
    assert [(l["start"], l["policy"], l["nodes"]) for l in maps] == [
        (0, "default", {0: 4}),
        (4 * PAGE, "bind:1", {1: 8}),
        (12 * PAGE, "interleave:0-1", {0: 4, 1: 4}),
        (20 * PAGE, "default", {0: 4}),
        (24 * PAGE, "prefer (many):1", {1: 4}),
        (28 * PAGE, "default", {0: 4}),
    ]
    assert all(l["dirty"] == l["anon"] for l in maps)
    check_views_agree(mnt, r)
    r.remove()
    # A read() fault (with read-ahead) spanning ranges places the same way.
    r = mnt.region("ranges2", 32 * PAGE)
    r.mbind(4 * PAGE, 8 * PAGE, "bind:1")
    r.mbind(12 * PAGE, 8 * PAGE, "interleave:0-1")
    r.mbind(24 * PAGE, 4 * PAGE, "preferred_many:1")
    with open(r.data, "rb") as f:
        assert f.read() == bytes(32 * PAGE)
    assert placement(mnt, r) == want
    assert all(l["dirty"] == 0 for l in r.numa_maps)
    # The C program sees zeros everywhere.
    assert run(cprog("pattern"), "verify", r.data, 32, 1, 0).returncode == 0
    r.remove()


def test_mbind_move_dirty_mapped_range(mnt, cprog):
    """A program's pattern, dirty in its mapping (no msync), survives mbind
    bind:1 move; it checks the data through its own mapping."""
    hold = cprog("hold")
    n = 96
    r = mnt.region("hold", n * PAGE)
    p = subprocess.Popen([hold, r.data, str(n), "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        assert r.stat["N0"] == n                # first-touched on node 0
        r.mbind(0, n * PAGE, "bind:1", move=True)
        assert r.mbinds == [(0, n * PAGE, "bind:1")]
        assert placement(mnt, r) == [1] * n
        (line,) = r.numa_maps
        assert line["nodes"] == {1: n} and line["policy"] == "bind:1"
        assert line["dirty"] == n               # the invalidation wrote the pages back
        st = r.stat
        assert st["N0"] == 0 and st["N1"] == n and st["migrated_pages"] == n
        out, err = p.communicate("go\n", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, (out, err)
    assert out == "ok\n"
    assert r.stat["N1"] == n and r.stat["N0"] == 0
    r.remove()


THREE_NODES = """
block_size = "4M"
[[node]]
id = 0
kind = "sysram"
size = "16M"
cpus = "all"
[[node]]
id = 1
kind = "sysram"
size = "16M"
[[node]]
id = 2
kind = "sysram"
size = "16M"
"""


def test_mbind_move_interleave_and_back(cprog):
    """mbind(MPOL_MF_MOVE) under interleave moves only the pages on nodes
    outside the nodemask, each to its interleave slot; a page on any node
    of the mask stays where it is, and MPOL_MF_STRICT accepts it, as the
    kernel's queue_folio_required() does."""
    pattern = cprog("pattern")
    n = 64
    with cdmfs.mounted(THREE_NODES) as m:
        r = m.region("mvil", n * PAGE)
        assert run(pattern, "write", r.data, n, 9, n).returncode == 0
        assert placement(m, r, SMALL_BLOCK) == [0] * n
        # All on node 0, outside 1-2: every page of the range goes to its slot.
        r.mbind(8 * PAGE, 32 * PAGE, "interleave:1-2", move=True, strict=True)
        want = [(1, 2)[i % 2] if 8 <= i < 40 else 0 for i in range(n)]
        assert placement(m, r, SMALL_BLOCK) == want
        assert r.stat["migrated_pages"] == 32
        # Over 0-1: the pages on node 1 are in the mask and stay; those on
        # node 2 (odd pages) go to their slot of 0-1: page i to node i % 2.
        r.mbind(0, n * PAGE, "interleave:0-1", move=True, strict=True)
        want = [1 if 8 <= i < 40 else 0 for i in range(n)]
        assert placement(m, r, SMALL_BLOCK) == want
        assert r.stat["migrated_pages"] == 32 + 16
        # Weighted 3:1 over the same nodes: nothing is outside the mask.
        r.mbind(0, n * PAGE, "weighted_interleave:0-1", move=True, strict=True)
        assert placement(m, r, SMALL_BLOCK) == want and r.stat["migrated_pages"] == 48
        # default with move brings the pages home to the local node.
        r.mbind(0, n * PAGE, "default", move=True)
        assert r.mbinds == []
        assert placement(m, r, SMALL_BLOCK) == [0] * n
        check_views_agree(m, r, SMALL_BLOCK)
        assert run(pattern, "verify", r.data, n, 9, n).returncode == 0
        r.remove()


def test_mbind_strict(small, cprog):
    touch = cprog("pattern")
    r = small.region("strict", 16 * PAGE)
    assert run(touch, "touch", r.data, 16).returncode == 0
    path = os.path.join(r.path, "mbind")
    # strict without move: the pages on node 0 do not follow bind:1 -> EIO;
    # the policy is applied all the same (Linux 6.7+ do_mbind()).
    with pytest.raises(OSError) as e:
        write_file(path, f"0 {16 * PAGE} bind:1 strict\n")
    assert e.value.errno == errno.EIO
    assert r.mbinds == [(0, 16 * PAGE, "bind:1")]
    assert r.stat["N0"] == 16
    # pages that fit: no error.
    write_file(path, f"0 {16 * PAGE} bind:0-1 strict\n")
    # strict is ignored for default.
    write_file(path, f"0 {16 * PAGE} default strict\n")
    assert r.mbinds == []
    # move with room: fine; with node 1 full, the pages cannot move -> EIO.
    write_file(path, f"0 {8 * PAGE} bind:1 move strict\n")
    assert placement(small, r, SMALL_BLOCK) == [1] * 8 + [0] * 8
    filler = small.region("filler", small.node(1).meminfo["MemFree"] // 4 * PAGE)
    filler.policy = "bind:1"
    assert run(touch, "touch", filler.data, filler.size // PAGE).returncode == 0
    assert small.node(1).meminfo["MemFree"] == 0
    with pytest.raises(OSError) as e:
        write_file(path, f"{8 * PAGE} {8 * PAGE} bind:1 move strict\n")
    assert e.value.errno == errno.EIO
    assert placement(small, r, SMALL_BLOCK) == [1] * 8 + [0] * 8
    assert r.mbinds == [(0, 16 * PAGE, "bind:1")]
    # Without strict the same move is not an error: the pages just stay.
    write_file(path, f"{8 * PAGE} {8 * PAGE} bind:1 move\n")
    filler.remove()
    r.remove()


BAD_MBIND = [
    "0 4096 nonsense",               # unknown mode
    "0 4096 bind:",                  # empty node list
    "0 4096 bind",                   # no node list
    "0 4096 bind:7",                 # no such node
    "0 4096 interleave:0-x",
    "0 4096 preferred:0-1",          # preferred takes one node
    "0 4096 local:0",
    "4096 1000 bind:1",              # length not page aligned
    "100 4096 bind:1",               # start not page aligned
    "0 69632 bind:1",                # off the end (17 pages of 16)
    "65536 4096 bind:1",             # starts at the end
    "0 0 bind:1",                    # empty range
    "-4096 4096 bind:1",
    "x 4096 bind:1",
    "0 4096",                        # no policy
    "0 4096 bind:1 quickly",         # unknown flag
    "0 4096 bind:1 move sideways",
]


def test_mbind_bad_input_changes_nothing(mnt, cprog):
    r = mnt.region("bad", 16 * PAGE)
    assert run(cprog("pattern"), "touch", r.data, 16).returncode == 0
    r.mbind(4 * PAGE, 4 * PAGE, "interleave:0-1")
    path = os.path.join(r.path, "mbind")
    listing, maps = read_file(path), r.numa_maps_text
    for bad in BAD_MBIND:
        with pytest.raises(OSError) as e:
            write_file(path, bad + "\n")
        assert e.value.errno == errno.EINVAL, bad
        assert read_file(path) == listing, bad
        assert r.numa_maps_text == maps, bad
    # numa_maps and pagemap are read-only.
    for name in ("numa_maps", "pagemap"):
        with pytest.raises(PermissionError):
            open(os.path.join(r.path, name), "w")
    r.remove()


# ------------------------------------------------------------------ introspection

def test_numa_maps_and_pagemap_of_private_pages(mnt, cprog):
    r = mnt.region("priv", 32 * PAGE)
    assert run(cprog("pattern"), "write", r.data, 32, 3, 32).returncode == 0
    res = r.migrate(8 * PAGE, 8 * PAGE, "gpu0")
    assert res["migrated"] == 8
    places = placement(mnt, r)
    assert places == [0] * 8 + ["private:gpu0"] * 8 + [0] * 16
    (line,) = r.numa_maps
    assert line["anon"] == 24 and line["nodes"] == {0: 24} and line["private"] == {"gpu0": 8}
    assert r.numa_maps_text == "00000000 default anon=24 dirty=24 N0=24 private:gpu0=8 kernelpagesize_kB=4\n"
    check_views_agree(mnt, r)
    # A CPU access faults them back; pagemap shows them present again.
    assert run(cprog("pattern"), "verify", r.data, 32, 3, 32).returncode == 0
    assert placement(mnt, r) == [0] * 32
    r.remove()


def test_big_sparse_region_views(mnt):
    """A 1 GiB region's numa_maps and pagemap come from the core, not a Python loop per page."""
    n = 1 << 18
    r = mnt.region("big", n * PAGE)
    r.mbind(PAGE * (n // 2), PAGE * (n // 2), "bind:1")
    fd = os.open(r.data, os.O_RDWR)
    try:
        for page in (0, 1000, n // 2, n - 1):
            os.pwrite(fd, b"z", page * PAGE)
    finally:
        os.close(fd)
    assert [(l["start"], l["nodes"]) for l in r.numa_maps] == [(0, {0: 2}), (PAGE * (n // 2), {1: 2})]
    assert os.stat(os.path.join(r.path, "pagemap")).st_size == n * 8
    entries = r.pagemap()
    assert len(entries) == n
    assert [i for i, e in enumerate(entries) if e] == [0, 1000, n // 2, n - 1]
    ranges = pfn_ranges(mnt, DEFAULT_BLOCK)
    assert where(r.pagemap(n - 1, 1)[0], ranges) == 1
    r.remove()


def test_parse_numa_maps_kernel_lines():
    lines = ("7f0000000000 prefer (many):0-1 anon=5 dirty=5 N0=2 N1=3 kernelpagesize_kB=4\n"
             "00001000 default\n")
    a, b = parse_numa_maps(lines)
    assert a["policy"] == "prefer (many):0-1" and a["nodes"] == {0: 2, 1: 3} and a["anon"] == 5
    assert b == {"start": 0x1000, "policy": "default", "anon": 0, "dirty": 0, "nodes": {},
                 "private": {}, "kernelpagesize_kB": 0}


def test_policy_changes_of_a_region_happen_one_at_a_time(mnt):
    """mbind with move holds the region's policy lock across its migrations,
    as the kernel holds the mmap lock: a policy write landing meanwhile waits
    for it (writes to the mbind file itself the kernel already serializes),
    and the pages end where that mbind put them."""
    import threading
    npages = 16384
    size = npages * PAGE
    r = mnt.region("serial", size)
    for rnd in range(2):
        mm = r.mmap()
        mm[:] = bytes([rnd + 1]) * size               # CPU-mapped and dirty: slow to move
        first = threading.Thread(target=r.mbind, args=(0, size, "bind:1"), kwargs={"move": True})
        first.start()
        while r.stat["N1"] == 0 and first.is_alive():  # the mbind is moving pages
            pass
        r.policy = "preferred:0"
        # Not first.is_alive(): the mbind's thread may still be on its way
        # back from the syscall; what the daemon did is in the pages.
        placed_when_policy_returned = r.stat["N1"]
        first.join(60)
        assert placed_when_policy_returned == npages, "the policy changed in the middle of an mbind"
        assert (r.policy, r.mbinds) == ("preferred:0", [(0, size, "bind:1")])
        assert (r.stat["N1"], r.stat["N0"]) == (npages, 0)
        assert mm[:size] == bytes([rnd + 1]) * size
        mm.close()
        r.mbind(0, size, "default", move=True)
        r.policy = "default"
    r.remove()


def test_fault_back_places_each_page_by_its_interleave_slot(mnt, cprog):
    """A CPU fault on device-private pages of an interleaved range brings
    each page back to its own slot, as a first touch would have placed it
    (migrate_to_ram() allocates by the policy at each page's address), not
    the whole READ by its first page."""
    pattern = cprog("pattern")
    n = 64
    r = mnt.region("ilfb", n * PAGE)
    r.policy = "interleave:0-1"
    assert run(pattern, "write", r.data, n, 5, n).returncode == 0
    assert placement(mnt, r) == [i % 2 for i in range(n)]
    assert r.migrate(0, n * PAGE, "gpu0")["migrated"] == n
    assert r.stat["private:gpu0"] == n
    with open(r.data, "rb") as f:       # READs of many pages each
        f.read()
    assert run(pattern, "verify", r.data, n, 5, n).returncode == 0
    assert r.stat["private:gpu0"] == 0
    assert placement(mnt, r) == [i % 2 for i in range(n)]
    r.remove()
