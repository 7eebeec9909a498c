"""The kernel's HMM test device under ``cdmfs run``: /dev/hmm_dmirrorN.

A C program of ours (tests/c/hmm_dmirror_cases.c, built against our own
native/preload/hmm_dmirror.h) drives every ioctl of lib/test_hmm_uapi.h
against the emulated devices of the hmm-test topology (dmirror0 and 1
device-private, 2 and 3 device-coherent) and checks the driver's documented
results itself: counts, bytes, snapshot codes, errnos, fork behaviour,
exclusive access revoked by the CPU.  Each case is one line of its output;
the tests here also look from outside (the device's counters, the region).
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import cdmfs
from cdmfs.config import HMM_TEST_CONFIG

HERE = os.path.dirname(os.path.abspath(__file__))
PRELOAD = os.path.join(os.path.dirname(HERE), "native", "preload")
CASES = ["open_missing", "bad_input", "read", "read_prot", "write", "write_prot", "migrate",
         "migrate_fault", "snapshot", "migrate_mixed", "migrate_shared", "exclusive",
         "exclusive_mprotect", "fork_private", "fork_shared", "release", "huge_and_fail_alloc",
         "double_map", "teardown", "mixedmap", "large", "fd_reuse"]
VARIANTS = {"private": ("0", "1"), "coherent": ("2", "3")}


@pytest.fixture(scope="module")
def mnt():
    with cdmfs.mounted(HMM_TEST_CONFIG) as m:
        yield m


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("hmmbin")

    def cc(name: str, source: str) -> str:
        exe = str(out / name)
        if not os.path.exists(exe):
            subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-pthread", f"-I{PRELOAD}", "-o", exe, source],
                           check=True)
        return exe
    return cc


@pytest.fixture(scope="module")
def cases(build):
    return build("hmm_dmirror_cases", os.path.join(HERE, "c", "hmm_dmirror_cases.c"))


def run(m: cdmfs.Mount, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdmfs", "run", m.path, "--", *cmd],
                          capture_output=True, text=True, timeout=timeout)


_results: dict[str, dict[str, str]] = {}


def results(m: cdmfs.Mount, exe: str, variant: str) -> dict[str, str]:
    """Every case of a variant, run once in one process: name -> its line."""
    if variant not in _results:
        done = run(m, exe, *VARIANTS[variant])
        assert done.returncode == 0, done.stderr
        lines = {}
        for line in done.stdout.splitlines():
            word, _, rest = line.partition(" ")
            lines[rest.split(":")[0]] = line
        _results[variant] = lines
    return _results[variant]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES)
def test_case(mnt, cases, variant, case):
    """One case of the program, against the private or the coherent pair."""
    line = results(mnt, cases, variant).get(case)
    assert line == f"ok {case}", line or "the program ended before this case"


def stat(m: cdmfs.Mount, dev: str) -> dict[str, int]:
    with open(os.path.join(m.path, "devices", dev, "stat")) as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def test_counters_and_region_from_outside(mnt, cases):
    """The device's own counters saw the faults and migrations, the process's
    region went with it, and the device is left faulting in place."""
    before = stat(mnt, "dmirror0")
    done = run(mnt, cases, "0", "1", "read", "migrate")
    assert done.stdout.split("\n")[:2] == ["ok read", "ok migrate"], done.stdout + done.stderr
    after = stat(mnt, "dmirror0")
    assert after["faults"] - before["faults"] >= 1024           # READ's 1024 pages faulted in
    assert after["migrated_to"] - before["migrated_to"] == 1024
    assert after["migrated_from"] - before["migrated_from"] == 1024   # MIGRATE_TO_SYS
    assert not [r for r in mnt.regions if r.isdigit()]
    with open(os.path.join(mnt.path, "devices", "dmirror0", "fault_policy")) as f:
        assert f.read() == "remote\n"


OPEN_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDWR);
    printf("%d %d\n", fd >= 0, fd >= 0 ? 0 : errno);
    if (fd >= 0) {     /* a terminal ioctl on another descriptor still reaches the kernel */
        int n;
        printf("%d\n", ioctl(0, FIONREAD, &n) == 0 || errno != ENOSYS);
    }
    return 0;
}
"""


def test_open_without_the_devices(tmp_path, build, mnt):
    """Outside cdmfs run nothing changes (the host has no such device); on a
    mount without dmirror devices the open fails as with no device node."""
    src = tmp_path / "open.c"
    src.write_text(OPEN_C)
    exe = build("hmm_open", str(src))
    out = subprocess.run([exe, "/dev/hmm_dmirror0"], capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["0", str(errno.ENOENT)]
    with cdmfs.mounted() as plain:
        assert run(plain, exe, "/dev/hmm_dmirror0").stdout.split()[:2] == ["0", str(errno.ENOENT)]
    assert run(mnt, exe, "/dev/hmm_dmirror3").stdout.split() == ["1", "0", "1"]


@pytest.mark.parametrize("request_text", [
    "copyout nosuch 0 4096 8192",
    "copyout R 0 4096 0",                 # bounce over the range
    "copyout R 0 4096 4096 sideways",
    "copyin R 0 4096 4096 mapped",
    "copyout R 0 4096",
    "copyout R 4095 4096 8192",
    "copyout R 0 4096 1099511627776",     # bounce past the end
    "check_exclusive R 0",
    "copyin R 0 33554432 33554432",       # more than a request moves at once
])
def test_bad_requests_change_nothing(mnt, request_text):
    """The control side of the ioctls refuses bad requests whole (EINVAL or
    ENOENT), and the daemon keeps serving."""
    r = mnt.region("badreq", 64 << 20)
    try:
        with open(r.data, "r+b") as f:
            f.write(b"\x07" * 4096)
        before = stat(mnt, "dmirror1")
        fd = os.open(os.path.join(mnt.path, "devices", "dmirror1", "access"), os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, request_text.replace(" R ", " badreq ").encode())
            assert e.value.errno in (errno.EINVAL, errno.ENOENT)
        finally:
            os.close(fd)
        assert stat(mnt, "dmirror1") == before
        with open(r.data, "rb") as f:
            assert f.read(4096) == b"\x07" * 4096
    finally:
        os.rmdir(os.path.join(mnt.path, "regions", "badreq"))
