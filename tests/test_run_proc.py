"""cdmfs run: processes behave as processes (SPEC §10) -- threads with
policies of their own, fork (private copies both ways, a region per
process), fork then exec (the policy survives), system()."""
from __future__ import annotations

import os
import subprocess

from test_run import cc, numa_maps_counts, read, region_dir, run_cmd  # noqa: F401

THREADS_C = r"""
#define _GNU_SOURCE
#include <numaif.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
/* Four threads fill and check their own blocks; thread 1 binds itself to
 * node 1 first: the memory it maps goes there, the others' stays on node 0,
 * and each thread's get_mempolicy reports its own policy.  (A thread's own
 * policy reaches the memory it maps, not blocks mimalloc hands it from
 * memory mapped before: see the README.) */
#define SZ (8 << 20)
static int bad;
static void *work(void *arg) {
    long id = (long)arg;
    if (id == 1) { unsigned long one = 2; if (set_mempolicy(MPOL_BIND, &one, 64)) bad = 1; }
    unsigned char *p = mmap(0, SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *q = malloc(SZ / 4);
    memset(q, (int)id, SZ / 4);
    for (int i = 0; i < SZ; i++) p[i] = (unsigned char)(i + id);
    int mode = -1, node = -1; unsigned long mask = 0;
    get_mempolicy(&mode, &mask, 64, NULL, 0);
    get_mempolicy(&node, NULL, 0, p + SZ / 2, MPOL_F_NODE | MPOL_F_ADDR);
    for (int i = 0; i < SZ; i++) if (p[i] != (unsigned char)(i + id)) bad = 1;
    for (int i = 0; i < SZ / 4; i++) if (q[i] != (unsigned char)id) bad = 1;
    printf("thread %ld mode %d mask %lu node %d\n", id, mode, mask, node);
    return NULL;
}
int main(void) {
    pthread_t t[4];
    for (long i = 0; i < 4; i++) { pthread_create(&t[i], NULL, work, (void *)i); pthread_join(t[i], NULL); }
    int mode = -1;
    get_mempolicy(&mode, NULL, 0, NULL, 0);
    printf("main mode %d bad %d\n", mode, bad);
    return bad;
}
"""


def test_threads_have_their_own_policies(mnt, cc):
    exe = cc("threads", THREADS_C, "-lnuma")
    text = subprocess.run(run_cmd(mnt, "--", exe), stdout=subprocess.PIPE, text=True, check=True).stdout
    lines = text.splitlines()
    assert "thread 1 mode 2 mask 2 node 1" in lines, text             # MPOL_BIND, node 1
    for i in (0, 2, 3):
        assert f"thread {i} mode 0 mask 0 node 0" in lines, text      # MPOL_DEFAULT
    assert lines[-1] == "main mode 0 bad 0"


FORK_C = r"""
#define _GNU_SOURCE
#include <numaif.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
/* fork: each side writes its own copy and must not see the other's. */
#define SZ (4 << 20)
int main(int argc, char **argv) {
    char *heap = malloc(SZ), *map = mmap(0, SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(heap, 'A', SZ); memset(map, 'a', SZ);
    int up[2], down[2];
    pipe(up); pipe(down);
    pid_t child = fork();
    char c;
    if (child == 0) {
        int ok = heap[123] == 'A' && map[SZ - 1] == 'a';
        memset(heap, 'C', SZ); memset(map, 'c', SZ);
        write(up[1], "x", 1);
        read(down[0], &c, 1);                   /* the parent has written its own */
        for (int i = 0; i < SZ; i += 4096) ok &= heap[i] == 'C' && map[i] == 'c';
        printf("child %d %s\n", getpid(), ok ? "ok" : "BAD");
        fflush(stdout);
        write(up[1], "y", 1);
        read(down[0], &c, 1);
        if (argc > 1) {                         /* fork then exec, under the policy */
            execvp(argv[1], argv + 1);
            return 127;
        }
        return ok ? 0 : 1;
    }
    read(up[0], &c, 1);
    int ok = 1;
    for (int i = 0; i < SZ; i += 4096) ok &= heap[i] == 'A' && map[i] == 'a';
    memset(heap, 'P', SZ); memset(map, 'p', SZ);
    write(down[1], "x", 1);
    read(up[0], &c, 1);
    printf("parent %d %s\n", getpid(), ok ? "ok" : "BAD");
    fflush(stdout);
    char line[8];
    if (fgets(line, sizeof line, stdin) == NULL) return 3;   /* the test looks at both regions */
    write(down[1], "y", 1);
    int st;
    waitpid(child, &st, 0);
    for (int i = 0; i < SZ; i += 4096) ok &= heap[i] == 'P' && map[i] == 'p';
    printf("parent done %s %d\n", ok ? "ok" : "BAD", WEXITSTATUS(st));
    return ok ? 0 : 1;
}
"""


def test_fork_gives_each_its_own_memory(mnt, cc):
    exe = cc("fork", FORK_C)
    p = subprocess.Popen(run_cmd(mnt, "--membind=1", "--", exe), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    child = p.stdout.readline().split()
    parent = p.stdout.readline().split()
    try:
        assert child[0] == "child" and child[2] == "ok"
        assert parent[0] == "parent" and parent[2] == "ok"
        cpid, ppid = int(child[1]), int(parent[1])
        for pid in (cpid, ppid):
            d = region_dir(mnt, pid)
            assert read(os.path.join(d, "owner_pid")).strip() == str(pid)
            assert read(os.path.join(d, "policy")).strip() == "bind:1"      # inherited by the child
            counts = numa_maps_counts(read(os.path.join(d, "numa_maps")))
            assert counts["N1"] >= 2 * (4 << 20) // 4096 and not counts.get("N0"), counts
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        last = p.stdout.readline().split()
        assert p.wait(60) == 0
    assert last == ["parent", "done", "ok", "0"]
    regions = os.listdir(os.path.join(mnt.path, "regions"))
    assert not [r for r in regions if r.startswith((str(cpid), str(ppid)))], regions


def test_fork_then_exec_keeps_the_policy(mnt, cc):
    """A policy set with set_mempolicy before fork+exec holds in the new
    program: the child, its region, and what the exec'd numactl --show reads."""
    exe = cc("fork", FORK_C)
    p = subprocess.Popen(run_cmd(mnt, "--preferred=1", "--", exe, "numactl", "--show"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    text, _ = p.communicate("\n", timeout=120)
    assert p.returncode == 0, text
    assert "preferred node: 1" in text, text


def test_system_and_popen_children_run_under_it(mnt):
    """A shell the program starts, and what it starts, get regions of their own."""
    text = subprocess.run(run_cmd(mnt, "--interleave=all", "--", "sh", "-c",
                                  "cat /proc/self/status > /dev/null; "
                                  f"cat {mnt.path}/regions/$$/policy; "
                                  "sh -c 'cat " + mnt.path + "/regions/$$/policy'"),
                          stdout=subprocess.PIPE, text=True, check=True).stdout
    assert text.splitlines() == ["interleave:0-1", "interleave:0-1"], text


STRESS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
/* Threads allocate, fill, check and free blocks of 16 B to 1 MiB at once. */
static int bad;
static void *work(void *arg) {
    unsigned seed = (unsigned)(long)arg;
    enum { K = 64 };
    unsigned char *b[K] = {0}; size_t n[K] = {0};
    for (int round = 0; round < 400; round++) {
        int k = rand_r(&seed) % K;
        if (b[k]) {
            for (size_t i = 0; i < n[k]; i += 509) if (b[k][i] != (unsigned char)(k ^ n[k])) bad = 1;
            free(b[k]);
        }
        n[k] = (size_t)16 << (rand_r(&seed) % 17);
        b[k] = malloc(n[k]);
        memset(b[k], k ^ (int)n[k], n[k]);
    }
    return NULL;
}
int main(void) {
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, work, (void *)(i + 1));
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("bad %d\n", bad);
    return bad;
}
"""


def test_threads_allocate_at_once(mnt, cc):
    exe = cc("stress", STRESS_C)
    text = subprocess.run(run_cmd(mnt, "--", exe), stdout=subprocess.PIPE, text=True, timeout=300).stdout
    assert text == "bad 0\n"


def test_an_emptied_environment_keeps_the_interposer(mnt):
    """env -i execs with nothing: the interposer puts itself and the task
    policy back, as the kernel keeps a policy whatever the environment."""
    text = subprocess.run(run_cmd(mnt, "--membind=1", "--", "env", "-i", "/bin/sh", "-c",
                                  f"cat {mnt.path}/regions/$$/policy; echo ${{LD_PRELOAD:+set}}"),
                          stdout=subprocess.PIPE, text=True, check=True).stdout
    assert text.splitlines() == ["bind:1", "set"], text


INHERIT_C = r"""
#define _GNU_SOURCE
#include <numaif.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
/* A thread starts with its creator's policy (clone copies it); changing its
 * own leaves the main thread's alone, and the memory each maps follows its
 * own. */
#define SZ (1 << 20)
static int node_of(char *p) { int n = -1; get_mempolicy(&n, NULL, 0, p, MPOL_F_NODE | MPOL_F_ADDR); return n; }
static char *fill(void) {
    char *p = mmap(0, SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 7, SZ);
    return p;
}
static void *work(void *arg) {
    int mode = -1; unsigned long mask = 0;
    get_mempolicy(&mode, &mask, 64, NULL, 0);
    printf("thread inherited %d %lu\n", mode, mask);
    set_mempolicy(MPOL_DEFAULT, NULL, 0);
    printf("thread node %d\n", node_of(fill()));
    return NULL;
}
int main(void) {
    unsigned long one = 2;
    set_mempolicy(MPOL_BIND, &one, 64);
    pthread_t t;
    pthread_create(&t, NULL, work, NULL);
    pthread_join(t, NULL);
    int mode = -1;
    get_mempolicy(&mode, NULL, 0, NULL, 0);
    printf("main %d node %d\n", mode, node_of(fill()));
    return 0;
}
"""


def test_a_thread_starts_with_its_creators_policy(mnt, cc):
    exe = cc("inherit", INHERIT_C, "-lnuma")
    text = subprocess.run(run_cmd(mnt, "--", exe), stdout=subprocess.PIPE, text=True, check=True).stdout
    assert text.splitlines() == ["thread inherited 2 2", "thread node 0", "main 2 node 1"], text
