"""cdmfs run: a program's anonymous memory in a region of its own (SPEC §10).

Each test runs a C program compiled here under ``cdmfs run`` on a real mount,
and checks from outside what the kernel would show: the bytes at the
program's addresses are the region's, /proc/PID/maps names the region's data,
numa_maps places the pages as the policy says, and the region goes when the
process does (also after kill -9).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

PAGE = 4096

ANON_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
/* anon MIB: many small blocks, one large one and a direct mmap, each with a
 * pattern; prints "PID BIG SMALL MAPPED" (addresses), waits for a line,
 * checks the patterns, exits 0 if all are intact. */
int main(int argc, char **argv) {
    size_t big = (size_t)atoi(argv[1]) << 20;
    enum { N = 2000 };
    static unsigned char *small[N];
    for (int i = 0; i < N; i++) { small[i] = malloc(100 + i % 900); memset(small[i], i & 0xff, 100); }
    unsigned char *b = malloc(big);
    for (size_t i = 0; i < big; i++) b[i] = (unsigned char)(i * 7 + 3);
    unsigned char *m = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(m, 0x5a, 1 << 20);
    printf("%d %p %p %p\n", getpid(), (void *)b, (void *)small[0], (void *)m);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 3;
    for (int i = 0; i < N; i++) for (int k = 0; k < 100; k++) if (small[i][k] != (i & 0xff)) return 1;
    for (size_t i = 0; i < big; i++) if (b[i] != (unsigned char)(i * 7 + 3)) return 2;
    for (int i = 0; i < 1 << 20; i++) if (m[i] != 0x5a) return 4;
    munmap(m, 1 << 20);
    return 0;
}
"""


@pytest.fixture(scope="module")
def cc(tmp_path_factory):
    """cc(name, source, *flags) -> path of the program compiled for this module."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("runbin")

    def build(name: str, source: str, *flags: str) -> str:
        exe = out / name
        if not exe.exists():
            src = out / f"{name}.c"
            src.write_text(source)
            subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", str(exe), str(src), *flags], check=True)
        return str(exe)
    return build


def run_cmd(m, *args: str) -> list[str]:
    return [sys.executable, "-m", "cdmfs", "run", m.path, *args]


def start(m, *args: str, stdin=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(run_cmd(m, *args), stdin=stdin, stdout=subprocess.PIPE, text=True)


def region_dir(m, pid: int) -> str:
    return os.path.join(m.path, "regions", str(pid))


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def mapping_of(pid: int, addr: int) -> tuple[int, int, int, str]:
    """(start, end, file offset, path) of the mapping holding addr in /proc/PID/maps."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            words = line.split()
            s, e = (int(x, 16) for x in words[0].split("-"))
            if s <= addr < e:
                return s, e, int(words[2], 16), words[5] if len(words) > 5 else ""
    raise AssertionError(f"{addr:#x} is not mapped in {pid}")


def numa_maps_counts(text: str) -> dict[str, int]:
    """N0=..., N1=... summed over the lines of a region's numa_maps."""
    counts: dict[str, int] = {}
    for key, value in re.findall(r"\b(N\d+|anon)=(\d+)", text):
        counts[key] = counts.get(key, 0) + int(value)
    return counts


def wait_gone(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not os.path.exists(path)


def test_heap_and_mappings_are_the_region(mnt, cc):
    """malloc's small and large blocks and a direct anonymous mmap live in
    MOUNT/regions/PID/data: /proc/PID/maps says so, and the region's bytes at
    the mapping's offset are the program's."""
    exe = cc("anon", ANON_C)
    p = start(mnt, "--", exe, "8")
    pid, big, small, mapped = (int(x, 0) for x in p.stdout.readline().split())
    try:
        d = region_dir(mnt, pid)
        data = os.path.join(d, "data")
        for addr in (big, small, mapped):
            s, e, off, path = mapping_of(pid, addr)
            assert path == data, f"{addr:#x} is in {path!r}, not the region"
        s, e, off, _ = mapping_of(pid, big)
        with open(data, "rb") as f:
            f.seek(off + (big - s))
            got = f.read(PAGE)
        assert got == bytes((i * 7 + 3) & 0xff for i in range(PAGE))
        s, e, off, _ = mapping_of(pid, mapped)
        with open(data, "rb") as f:
            f.seek(off + (mapped - s))
            assert f.read(PAGE) == b"\x5a" * PAGE
        counts = numa_maps_counts(read(os.path.join(d, "numa_maps")))
        assert counts["anon"] >= (8 << 20) // PAGE + 256      # the big block and the map
        assert counts.get("N1", 0) == 0                         # CDM is isolated
        assert read(os.path.join(d, "owner_pid")).strip() == str(pid)
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        assert p.wait(60) == 0
    assert not os.path.exists(d), "the region outlived its process"


@pytest.mark.parametrize("opts, expect", [
    (["--membind=1"], {"N1"}),
    (["-m", "1"], {"N1"}),
    (["--preferred=1"], {"N1"}),
    (["--interleave=all"], {"N0", "N1"}),
    (["--preferred-many", "1"], {"N1"}),
    (["--localalloc"], {"N0"}),
    ([], {"N0"}),
])
def test_placement_options(mnt, cc, opts, expect):
    """numactl's placement options place the program's pages: on node 1 only
    when named (bind, preferred), half and half when interleaved."""
    exe = cc("anon", ANON_C)
    p = start(mnt, *opts, "--", exe, "4")
    pid = int(p.stdout.readline().split()[0])
    try:
        text = read(os.path.join(region_dir(mnt, pid), "numa_maps"))
        counts = numa_maps_counts(text)
        nodes = {k for k, v in counts.items() if k.startswith("N") and v}
        assert nodes == expect, text
        if expect == {"N0", "N1"}:
            # By page offset in the region, as the kernel interleaves an mbind
            # range (its task policy goes round robin): even over the whole.
            assert abs(counts["N0"] - counts["N1"]) <= counts["anon"] // 50 + 16, text
            assert text.startswith("00000000 interleave:0-1 ")
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        assert p.wait(60) == 0


def test_kill9_leaves_no_region(mnt, cc):
    """A process killed with -9 (no exit handler runs) leaves no region: the
    daemon's pidfd sees it end."""
    exe = cc("anon", ANON_C)
    p = start(mnt, "--", exe, "4")
    pid = int(p.stdout.readline().split()[0])
    d = region_dir(mnt, pid)
    assert os.path.isdir(d)
    os.kill(pid, signal.SIGKILL)
    assert p.wait(60) == 128 + signal.SIGKILL
    assert wait_gone(d), "the killed process's region stayed"
    assert not [n for n in os.listdir(os.path.join(mnt.path, "regions")) if n.startswith(str(pid))]


def test_command_words_pass_as_given(mnt):
    """Everything after the first -- is the command's, its own -- included."""
    r = subprocess.run(run_cmd(mnt, "-m", "0", "--", "sh", "-c", 'echo "$@"', "x", "a", "--", "-m", "1"),
                       stdout=subprocess.PIPE, text=True, check=True)
    assert r.stdout == "a -- -m 1\n"


def test_exit_status_and_missing_command(mnt, tmp_path):
    r = subprocess.run(run_cmd(mnt, "--", "sh", "-c", "exit 7"))
    assert r.returncode == 7
    r = subprocess.run(run_cmd(mnt, "--", str(tmp_path / "nope")), stderr=subprocess.PIPE, text=True)
    assert r.returncode == 127 and "cannot run" in r.stderr
    r = subprocess.run(run_cmd(mnt, "--membind=7", "--", "true"), stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1 and "node 7 does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cdmfs", "run", str(tmp_path), "--", "true"],
                       stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1 and "not a cdmfs mount" in r.stderr


MIN_SIZE_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
int main(void) {
    char *a = mmap(0, 64 << 10, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *b = mmap(0, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(a, 1, 64 << 10); memset(b, 2, 4 << 20);
    char line[512]; FILE *f = fopen("/proc/self/maps", "r");
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e; sscanf(line, "%lx-%lx", &s, &e);
        if (s == (unsigned long)a) printf("small %s", strchr(line, '/') ? strchr(line, '/') : "anon\n");
        if (s == (unsigned long)b) printf("large %s", strchr(line, '/') ? strchr(line, '/') : "anon\n");
    }
    return 0;
}
"""


def test_min_size_keeps_small_mappings_on_the_host(mnt, cc):
    exe = cc("minsize", MIN_SIZE_C)
    out = subprocess.run(run_cmd(mnt, "--min-size", "1M", "--", exe), stdout=subprocess.PIPE,
                         text=True, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["small"].strip() == "anon"
    assert lines["large"].strip().startswith(os.path.join(mnt.path, "regions"))


REUSE_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
/* Memory handed back and mapped again reads zero; MADV_DONTNEED zeroes. */
int main(void) {
    for (int round = 0; round < 50; round++) {
        unsigned char *p = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (int i = 0; i < 1 << 20; i += 4096) if (p[i]) { printf("dirty round %d\n", round); return 1; }
        memset(p, 0xee, 1 << 20);
        if (round % 2) {
            madvise(p, 1 << 20, MADV_DONTNEED);
            for (int i = 0; i < 1 << 20; i += 4096) if (p[i]) { printf("not zeroed\n"); return 2; }
        }
        if (round % 5 == 0) {               /* partial unmaps split the mapping */
            munmap(p + 4096, 8192);
            munmap(p, 4096);
            munmap(p + 12288, (1 << 20) - 12288);
        } else {
            munmap(p, 1 << 20);
        }
    }
    unsigned char *q = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(q, 3, 1 << 20);
    q = mremap(q, 1 << 20, 4 << 20, MREMAP_MAYMOVE);
    for (int i = 0; i < 1 << 20; i++) if (q[i] != 3) { printf("mremap lost data\n"); return 3; }
    for (int i = 1 << 20; i < 4 << 20; i += 4096) if (q[i]) { printf("mremap tail dirty\n"); return 4; }
    char path[512], line[128]; long n0 = -1;
    snprintf(path, sizeof path, "%s/regions/%d/stat", getenv("CDMFS_RUN_MOUNT"), getpid());
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof line, f)) sscanf(line, "N0 %ld", &n0);
    printf("ok %ld\n", n0);
    return 0;
}
"""


def test_freed_memory_reads_zero_and_is_freed(mnt, cc):
    """munmap gives the pages back (the region does not grow with each round),
    memory mapped again reads zero, MADV_DONTNEED zeroes, mremap keeps data."""
    exe = cc("reuse", REUSE_C)
    r = subprocess.run(run_cmd(mnt, "--", exe), stdout=subprocess.PIPE, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stdout
    # 50 rounds of 1 MiB came and went: what stays is the last mapping (4 MiB
    # after mremap, whose copy placed its pages) and the heap, not 50 MiB.
    assert 0 < int(r.stdout.split()[1]) * PAGE < 12 << 20, r.stdout


def test_owner_pid_ties_a_region_to_a_process(mnt):
    """The daemon's side of cdmfs run, by hand: a region whose owner_pid
    names a process goes when that process ends (not before, even with its
    data open until then); a bad pid is refused."""
    regions = os.path.join(mnt.path, "regions")
    os.mkdir(os.path.join(regions, "owned"))
    d = os.path.join(regions, "owned")
    sleeper = subprocess.Popen(["sleep", "1"])
    with open(os.path.join(d, "owner_pid"), "w") as f:
        f.write(f"{sleeper.pid}\n")
    assert read(os.path.join(d, "owner_pid")).strip() == str(sleeper.pid)
    fd = os.open(os.path.join(d, "data"), os.O_RDWR)
    try:
        os.truncate(os.path.join(d, "data"), 1 << 20)
        sleeper.wait()
        time.sleep(0.3)
        assert os.path.isdir(d), "removed while its data was open"
    finally:
        os.close(fd)
    assert wait_gone(d)
    os.mkdir(os.path.join(regions, "owned2"))
    try:
        for bad, err in (("abc", "Invalid argument"), ("0", "Invalid argument"), ("999999999", "No such process")):
            with pytest.raises(OSError, match=err):
                with open(os.path.join(regions, "owned2", "owner_pid"), "w") as f:
                    f.write(bad)
    finally:
        os.rmdir(os.path.join(regions, "owned2"))
