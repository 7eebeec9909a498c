"""cdmfs run: the NUMA system calls act on the emulated machine (SPEC §10).

A C program linked with libnuma runs under ``cdmfs run``; at each step it
prints what the calls returned and waits, and the test checks the answer
against the region's numa_maps and pagemap (the node of a page from its PFN
and the memory blocks of sys/devices/system/node).  The error cases run
twice where the host can judge them: under cdmfs run and on the host
kernel, with node 0 only, and must give the same errnos.
"""
from __future__ import annotations

import ctypes.util
import os
import re
import struct
import subprocess

import pytest

from test_run import PAGE, cc, mapping_of, numa_maps_counts, read, region_dir, run_cmd  # noqa: F401

pytestmark = pytest.mark.skipif(ctypes.util.find_library("numa") is None or
                                not os.path.exists("/usr/include/numa.h"),
                                reason="libnuma-dev is not installed")

STEPS_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <numa.h>
#include <numaif.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define NP 64
static void wait_step(void) { char l[8]; fflush(stdout); if (!fgets(l, sizeof l, stdin)) exit(3); }
int main(void) {
    long ps = 4096;
    printf("pid %d\n", getpid());
    /* 1. numa_alloc_onnode: a bind:1 range, every page on node 1 */
    char *a = numa_alloc_onnode(NP * ps, 1);
    memset(a, 1, NP * ps);
    int node = -1;
    long r = get_mempolicy(&node, NULL, 0, a + 5 * ps, MPOL_F_NODE | MPOL_F_ADDR);
    printf("onnode %p %ld %d\n", a, r, node);
    wait_step();
    /* 2. numa_alloc_interleaved: interleave over all */
    char *b = numa_alloc_interleaved(NP * ps);
    memset(b, 2, NP * ps);
    int n0 = -1, n1 = -1;
    get_mempolicy(&n0, NULL, 0, b, MPOL_F_NODE | MPOL_F_ADDR);
    syscall(SYS_get_mempolicy, &n1, NULL, 0, b + ps, MPOL_F_NODE | MPOL_F_ADDR);
    printf("interleaved %p %d %d\n", b, n0, n1);
    wait_step();
    /* 3. move_pages: query, then move the even pages to node 1 */
    char *c = mmap(0, NP * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(c, 3, (NP - 1) * ps);                  /* the last page stays untouched */
    void *pages[NP]; int status[NP];
    for (int i = 0; i < NP; i++) pages[i] = c + i * ps;
    r = numa_move_pages(0, NP, pages, NULL, status, 0);
    printf("query %p %ld", c, r);
    for (int i = 0; i < NP; i++) printf(" %d", status[i]);
    printf("\n");
    void *even[NP / 2]; int st2[NP / 2], to[NP / 2];
    for (int i = 0; i < NP / 2; i++) { even[i] = c + 2 * i * ps; to[i] = 1; }
    r = syscall(SYS_move_pages, 0, NP / 2, even, to, st2, MPOL_MF_MOVE);
    printf("moved %ld", r);
    for (int i = 0; i < NP / 2; i++) printf(" %d", st2[i]);
    printf("\n");
    wait_step();
    /* 4. numa_migrate_pages: everything on node 0 goes to node 1 */
    struct bitmask *from = numa_parse_nodestring("0"), *too = numa_parse_nodestring("1");
    r = numa_migrate_pages(getpid(), from, too);
    printf("migrated %ld\n", r);
    wait_step();
    /* 5. the task policy and what get_mempolicy reports */
    unsigned long mask = 2, got = 0;
    int mode = -1;
    r = set_mempolicy(MPOL_PREFERRED, &mask, 3);
    long r2 = get_mempolicy(&mode, &got, 64, NULL, 0);
    printf("policy %ld %ld %d %lu\n", r, r2, mode, got);
    got = 0;
    r = get_mempolicy(&mode, &got, 64, NULL, MPOL_F_MEMS_ALLOWED);
    printf("mems_allowed %ld %d %lu\n", r, mode, got);
    mode = -1;
    r = get_mempolicy(&mode, &got, 64, a, MPOL_F_ADDR);
    printf("addr_policy %ld %d %lu\n", r, mode, got);
    printf("configured %d max %d size1 %lld\n", numa_num_configured_nodes(), numa_max_node(),
           numa_node_size64(1, NULL));
    printf("distance %d %d %d possible %d\n", numa_distance(0, 0), numa_distance(0, 1), numa_distance(1, 0),
           numa_num_possible_nodes() >= 2);
    wait_step();
    return 0;
}
"""

ERRORS_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <numaif.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MPOL_F_STATIC_NODES (1 << 15)
#define MPOL_F_RELATIVE_NODES (1 << 14)
/* Bad input: each line is "name result errno", for the wrapper and syscall(2). */
#define T(name, call) do { errno = 0; long r_ = (call); printf("%s %ld %s\n", name, r_, r_ < 0 ? strerrorname_np(errno) : "0"); } while (0)
int main(int argc, char **argv) {
    int far = argc > 1 ? atoi(argv[1]) : 0;      /* a node that does not exist */
    unsigned long none = 0, bad = 1UL << far, zero = 1, two = 3;
    long ps = 4096;
    T("bind_empty", set_mempolicy(MPOL_BIND, &none, 64));
    T("bind_empty_sys", syscall(SYS_set_mempolicy, MPOL_BIND, &none, 64));
    T("bind_far", set_mempolicy(MPOL_BIND, &bad, 64));
    T("bad_mode", set_mempolicy(42, &zero, 64));
    T("default_with_nodes", set_mempolicy(MPOL_DEFAULT, &zero, 64));
    T("local_with_nodes", set_mempolicy(MPOL_LOCAL, &zero, 64));
    T("static_and_relative", set_mempolicy(MPOL_BIND | MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES, &zero, 64));
    T("preferred_empty", set_mempolicy(MPOL_PREFERRED, &none, 64));
    T("default", set_mempolicy(MPOL_DEFAULT, NULL, 0));
    T("getpol_small_maxnode", get_mempolicy(NULL, &none, 0, NULL, 0));
    T("getpol_addr_no_flag", get_mempolicy(NULL, NULL, 0, (void *)&none, 0));
    T("getpol_bad_flags", get_mempolicy(NULL, NULL, 0, NULL, 64));
    T("getpol_mems_and_addr", get_mempolicy(NULL, NULL, 0, (void *)&none, MPOL_F_MEMS_ALLOWED | MPOL_F_ADDR));
    T("getpol_node_not_interleave", get_mempolicy(NULL, NULL, 0, NULL, MPOL_F_NODE));
    char *p = mmap(0, 16 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(p + 8 * ps, 8 * ps);                 /* a hole after 8 pages */
    memset(p, 1, 8 * ps);
    T("mbind_unaligned", mbind(p + 1, ps, MPOL_BIND, &zero, 64, 0));
    T("mbind_bad_flags", mbind(p, ps, MPOL_BIND, &zero, 64, 0x100));
    T("mbind_hole", mbind(p, 16 * ps, MPOL_BIND, &zero, 64, 0));
    T("mbind_hole_sys", syscall(SYS_mbind, p, 16 * ps, MPOL_BIND, &zero, 64, 0));
    T("mbind_empty", mbind(p, ps, MPOL_BIND, &none, 64, 0));
    T("mbind_zero_len", mbind(p, 0, MPOL_BIND, &zero, 64, 0));
    T("mbind_ok", mbind(p, 8 * ps, MPOL_BIND, &zero, 64, MPOL_MF_STRICT));
    T("getpol_unmapped", get_mempolicy(NULL, NULL, 0, p + 9 * ps, MPOL_F_ADDR));
    void *pg[2] = {p, p + 9 * ps}; int st[2] = {7, 7}, nd[2] = {0, 0};
    T("move_pages_query", move_pages(0, 2, pg, NULL, st, 0));
    printf("status %d %d\n", st[0], st[1]);
    nd[0] = far;
    T("move_pages_far", move_pages(0, 1, pg, nd, st, MPOL_MF_MOVE));
    nd[0] = -1;
    T("move_pages_negative", move_pages(0, 1, pg, nd, st, MPOL_MF_MOVE));
    T("move_pages_bad_flags", move_pages(0, 1, pg, NULL, st, 0x100));
    T("home_flags", syscall(450, p, ps, 0, 1));
    T("home_far", syscall(450, p, ps, far, 0));
    T("home_bind", syscall(450, p, 8 * ps, 0, 0));
    T("migrate_to_none", syscall(SYS_migrate_pages, 0, 64, &zero, &none));
    T("migrate_from_none", syscall(SYS_migrate_pages, 0, 64, &none, &zero));
    T("migrate_far", syscall(SYS_migrate_pages, 0, 64, &zero, &bad));
    (void)two;
    return 0;
}
"""


def node_of_pfn(m, pfn: int) -> int:
    sysmem = os.path.join(m.path, "sys/devices/system/memory")
    block = int(read(os.path.join(sysmem, "block_size_bytes")), 16) // PAGE
    for name in os.listdir(os.path.join(sysmem, f"memory{pfn // block}")):
        if re.fullmatch(r"node\d+", name):
            return int(name[4:])
    raise AssertionError(f"pfn {pfn} is in no node")


def nodes_of(m, pid: int, addr: int, npages: int) -> list:
    """The node of each page from the region's pagemap: an int, or None if
    not present."""
    s, e, off, path = mapping_of(pid, addr)
    assert path == os.path.join(region_dir(m, pid), "data")
    first = (off + addr - s) // PAGE
    with open(os.path.join(region_dir(m, pid), "pagemap"), "rb") as f:
        f.seek(first * 8)
        raw = f.read(npages * 8)
    out = []
    for (e,) in struct.iter_unpack("<Q", raw):
        out.append(node_of_pfn(m, e & ((1 << 55) - 1)) if e >> 63 else None)
    return out


def numa_maps_line(m, pid: int, addr: int) -> str:
    """The numa_maps line of the range holding addr's region offset."""
    s, e, off, _ = mapping_of(pid, addr)
    at = off + addr - s
    lines = read(os.path.join(region_dir(m, pid), "numa_maps")).splitlines()
    starts = [int(line.split()[0], 16) for line in lines]
    best = max(i for i, x in enumerate(starts) if x <= at)
    return lines[best]


class Steps:
    def __init__(self, m, exe, *opts):
        self.p = subprocess.Popen(run_cmd(m, *opts, "--", exe), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.pid = int(self.line()[1])

    def line(self) -> list[str]:
        words = self.p.stdout.readline().split()
        assert words, "the program ended early"
        return words

    def next(self) -> None:
        self.p.stdin.write("\n")
        self.p.stdin.flush()


def test_libnuma_calls_against_numa_maps_and_pagemap(mnt, cc):
    exe = cc("numa_steps", STEPS_C, "-lnuma")
    st = Steps(mnt, exe)
    pid, np = st.pid, 64
    try:
        # 1. numa_alloc_onnode(1): its own bind:1 range, all pages on node 1
        _, a, r, node = st.line()
        a = int(a, 16)
        assert (r, node) == ("0", "1")
        assert nodes_of(mnt, pid, a, np) == [1] * np
        line = numa_maps_line(mnt, pid, a)
        assert " bind:1 " in line and f"N1={np}" in line and "N0=" not in line, line
        st.next()

        # 2. numa_alloc_interleaved: interleave:0-1, page by page
        _, b, n0, n1 = st.line()
        b = int(b, 16)
        got = nodes_of(mnt, pid, b, np)
        assert sorted(set(got)) == [0, 1] and got.count(0) == got.count(1) == np // 2
        assert [int(n0), int(n1)] == got[:2]
        line = numa_maps_line(mnt, pid, b)
        assert " interleave:0-1 " in line, line
        st.next()

        # 3. move_pages: the query tells each page's node (-ENOENT untouched),
        # the move puts even pages on node 1
        words = st.line()
        c, r, status = int(words[1], 16), int(words[2]), [int(x) for x in words[3:]]
        assert r == 0
        assert status == [0] * (np - 1) + [-2]          # -ENOENT: never touched
        moved = st.line()
        assert moved[1] == "0" and [int(x) for x in moved[2:]] == [1] * (np // 2)
        got = nodes_of(mnt, pid, c, np)
        assert got[:np - 1] == [1 if i % 2 == 0 else 0 for i in range(np - 1)]
        assert got[np - 1] is None
        st.next()

        # 4. migrate_pages from node 0 to node 1: nothing left on node 0
        assert st.line() == ["migrated", "0"]
        counts = numa_maps_counts(read(os.path.join(region_dir(mnt, pid), "numa_maps")))
        assert counts.get("N0", 0) == 0 and counts["N1"] > 3 * np
        assert nodes_of(mnt, pid, c, np - 1) == [1] * (np - 1)
        st.next()

        # 5. set/get_mempolicy, MEMS_ALLOWED, a VMA's policy, libnuma's view
        assert st.line() == ["policy", "0", "0", "1", "2"]         # MPOL_PREFERRED, node 1
        assert st.line() == ["mems_allowed", "0", "0", "3"]        # nodes 0-1
        assert st.line() == ["addr_policy", "0", "2", "2"]         # a's range: bind:1
        assert st.line() == ["configured", "2", "max", "1", "size1", str(1 << 30)]
        assert st.line() == ["distance", "10", "40", "40", "possible", "1"]
        assert read(os.path.join(region_dir(mnt, pid), "policy")).strip() == "preferred:1"
        st.next()
    finally:
        st.p.stdin.close()
        assert st.p.wait(60) == 0


def errors(cmd: list[str]) -> dict[str, str]:
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return {w[0]: " ".join(w[1:]) for w in (line.split() for line in out.splitlines())}


def test_bad_input_gives_the_kernels_errnos(mnt, cc):
    """Under cdmfs run (nodes 0-1) a node that does not exist is 2; on the
    host it is the first node past the host's.  Every answer must match the
    host kernel's, and the man pages' where the two machines differ."""
    exe = cc("numa_errors", ERRORS_C, "-lnuma")
    host_nodes = read("/sys/devices/system/node/possible").strip()
    host_far = int(re.split(r"[-,]", host_nodes)[-1]) + 1
    ours = errors(run_cmd(mnt, "--", exe, "2"))
    host = errors([exe, str(host_far)])
    expected = {
        "bind_empty": "-1 EINVAL", "bind_empty_sys": "-1 EINVAL", "bind_far": "-1 EINVAL",
        "bad_mode": "-1 EINVAL", "default_with_nodes": "-1 EINVAL", "local_with_nodes": "-1 EINVAL",
        "static_and_relative": "-1 EINVAL", "preferred_empty": "0 0", "default": "0 0",
        "getpol_addr_no_flag": "-1 EINVAL", "getpol_bad_flags": "-1 EINVAL",
        "getpol_mems_and_addr": "-1 EINVAL", "getpol_node_not_interleave": "-1 EINVAL",
        "mbind_unaligned": "-1 EINVAL", "mbind_bad_flags": "-1 EINVAL",
        "mbind_hole": "-1 EFAULT", "mbind_hole_sys": "-1 EFAULT", "mbind_empty": "-1 EINVAL",
        "mbind_zero_len": "0 0", "mbind_ok": "0 0", "getpol_unmapped": "-1 EFAULT",
        "move_pages_query": "0 0", "status": "0 -14",
        "move_pages_far": "-1 ENODEV", "move_pages_negative": "-1 ENODEV",
        "move_pages_bad_flags": "-1 EINVAL",
        "home_flags": "-1 EINVAL", "home_far": "-1 EINVAL", "home_bind": "0 0",
        "migrate_to_none": "-1 EINVAL", "migrate_from_none": "0 0", "migrate_far": "-1 EINVAL",
    }
    for name, want in expected.items():
        assert host[name] == want, f"host {name}: {host[name]} (test expectation wrong?)"
        assert ours[name] == want, f"{name}: {ours[name]}, the kernel gives {want}"
    # getpol_small_maxnode: EINVAL when maxnode < nr_node_ids (2 here; the
    # host may have 1 node, where 0 < 1 is EINVAL too)
    assert ours["getpol_small_maxnode"] == host["getpol_small_maxnode"] == "-1 EINVAL"


STRICT_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <numaif.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
int main(void) {
    long ps = 4096; unsigned long one = 2;
    char *p = mmap(0, 8 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 1, 8 * ps);                           /* on node 0 */
    long r = mbind(p, 8 * ps, MPOL_BIND, &one, 64, MPOL_MF_STRICT);
    printf("strict %ld %s\n", r, r ? strerrorname_np(errno) : "0");
    r = mbind(p, 8 * ps, MPOL_BIND, &one, 64, MPOL_MF_STRICT | MPOL_MF_MOVE);
    printf("strict_move %ld %s\n", r, r ? strerrorname_np(errno) : "0");
    int node = -1;
    get_mempolicy(&node, NULL, 0, p + 3 * ps, MPOL_F_NODE | MPOL_F_ADDR);
    printf("node %d\n", node);
    return 0;
}
"""


def test_mbind_strict_with_misplaced_pages_is_eio(mnt, cc):
    """MPOL_MF_STRICT without MOVE, pages on the wrong node: EIO (and the
    policy stays, as since Linux 6.7); with MOVE they move and it succeeds."""
    exe = cc("numa_strict", STRICT_C, "-lnuma")
    out = subprocess.run(run_cmd(mnt, "--", exe), stdout=subprocess.PIPE, text=True, check=True).stdout
    assert out.splitlines() == ["strict -1 EIO", "strict_move 0 0", "node 1"]


OFFLINE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <numaif.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
int main(void) {
    unsigned long one = 2, both = 3;
    long ps = 4096;
    char *p = mmap(0, 4 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 1, 4 * ps);
    void *pg[1] = {p}; int to[1] = {1}, st[1] = {7};
    long r;
#define T(name, call) r = (call); printf("%s %ld %s\n", name, r, r < 0 ? strerrorname_np(errno) : "0")
    T("bind_offline", set_mempolicy(MPOL_BIND, &one, 64));
    T("bind_with_online", set_mempolicy(MPOL_BIND, &both, 64));
    T("mbind_offline", mbind(p, ps, MPOL_BIND, &one, 64, 0));
    T("move_to_offline", move_pages(0, 1, pg, to, st, MPOL_MF_MOVE));
    unsigned long mems = 0;
    T("mems_allowed", get_mempolicy(NULL, &mems, 64, NULL, MPOL_F_MEMS_ALLOWED));
    printf("mems %lu\n", mems);
    return 0;
}
"""


def test_offline_node_is_einval(small, cc):
    """With cdm0 out of service its node 1 has no memory: a mask of it alone
    is EINVAL (set_mempolicy, mbind), a move to it ENODEV, and it leaves
    MEMS_ALLOWED; a mask that also names node 0 is taken."""
    exe = cc("numa_offline", OFFLINE_C, "-lnuma")
    small.device("cdm0").online = False
    try:
        got = errors(run_cmd(small, "--", exe))
        r = subprocess.run(run_cmd(small, "--", "numactl", "--membind=1", "true"), stderr=subprocess.PIPE)
    finally:
        small.device("cdm0").online = True
    assert got["bind_offline"] == "-1 EINVAL"
    assert got["bind_with_online"] == "0 0"
    assert got["mbind_offline"] == "-1 EINVAL"
    assert got["move_to_offline"] == "-1 ENODEV"
    assert got["mems_allowed"] == "0 0" and got["mems"] == "1"
    assert r.returncode != 0


PRIVATE_C = r"""
#define _GNU_SOURCE
#include <numaif.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(void) {
    long ps = 4096;
    char *p = mmap(0, 4 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < 4; i++) p[i * ps] = (char)(i + 1);
    printf("%d %p\n", getpid(), (void *)p);
    fflush(stdout);
    char l[8];
    if (!fgets(l, sizeof l, stdin)) return 3;     /* the test moves pages to gpu0 */
    void *pg[4]; int st[4];
    for (int i = 0; i < 4; i++) pg[i] = p + i * ps;
    move_pages(0, 4, pg, NULL, st, 0);
    printf("query %d %d %d %d\n", st[0], st[1], st[2], st[3]);
    int node = -1;
    get_mempolicy(&node, NULL, 0, p, MPOL_F_NODE | MPOL_F_ADDR);
    move_pages(0, 4, pg, NULL, st, 0);
    printf("node %d then %d %d %d %d data %d\n", node, st[0], st[1], st[2], st[3], p[0]);
    return 0;
}
"""


def test_device_private_pages_are_not_present(mnt, cc):
    """Pages migrated into gpu0's private memory: move_pages reports them
    -ENOENT (the CPU cannot map them); get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR)
    faults the page back, to node 0, with its data."""
    exe = cc("numa_private", PRIVATE_C, "-lnuma")
    p = subprocess.Popen(run_cmd(mnt, "--", exe), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid, addr = p.stdout.readline().split()
    s, e, off, path = mapping_of(int(pid), int(addr, 16))
    off += int(addr, 16) - s
    with open(os.path.join(region_dir(mnt, int(pid)), "migrate"), "r+") as f:
        f.write(f"{off} {4 * PAGE} gpu0\n")
        f.seek(0)
        assert "migrated 4" in f.read()
    out, _ = p.communicate("\n", timeout=60)
    assert p.returncode == 0
    lines = out.splitlines()
    assert lines[0] == "query -2 -2 -2 -2"
    assert lines[1] == "node 0 then 0 -2 -2 -2 data 1"
