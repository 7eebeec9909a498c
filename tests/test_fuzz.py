"""Fuzzing the control files: every write to every writable file is either
accepted or refused with a clear errno, and a refused write changes nothing.
The daemon never dies and never hangs (a watchdog ends the run if it does)."""
from __future__ import annotations

import errno
import faulthandler
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdmfs
from conftest import PAGE

# What a refused write may answer: malformed, no such device/region/target,
# busy, no space (a first touch that cannot be placed), poisoned.
REFUSALS = {errno.EINVAL, errno.ENODEV, errno.EBUSY, errno.ENOENT, errno.ENOSPC, errno.EIO,
            errno.ERANGE, errno.EACCES}
EXAMPLES = int(os.environ.get("CDMFS_FUZZ_EXAMPLES", "60"))

# Files whose content is the state a write could change (not counters a
# successful access moves, which are checked by the other tests).
STATE_FILES = [
    "sys/devices/system/node/node0/isolated",
    "sys/devices/system/node/node1/isolated",
    "sys/kernel/mm/mempolicy/weighted_interleave/node0",
    "sys/kernel/mm/mempolicy/weighted_interleave/node1",
    "sys/devices/system/node/node0/meminfo",
    "sys/devices/system/node/node1/meminfo",
    "devices/gpu0/fault_policy",
    "devices/cdm0/fault_policy",
    "devices/gpu0/meminfo",
    "regions/fz/policy",
    "regions/fz/mbind",
    "regions/fz/numa_maps",
]

NUMBERS = st.one_of(
    st.integers(-2**70, 2**70),
    st.sampled_from([0, 1, -1, PAGE, 2 * PAGE, 64 * PAGE, 2**63, 2**64, 2**64 - 1, -(2**63)]),
)


def number_text(n: int) -> st.SearchStrategy[str]:
    return st.sampled_from([str(n), hex(n) if n >= 0 else f"-{hex(-n)}", f"{n}.5", f"{n}k"])


WORDS = st.sampled_from([
    "default", "local", "bind:0", "bind:1", "bind:0-1", "bind:", "bind:9", "preferred:1",
    "preferred_many:0-1", "interleave:0-1", "weighted_interleave:0-1", "interleave:1-0",
    "move", "strict", "gpu0", "cdm0", "node:0", "node:1", "node:7", "private:gpu0", "fz",
    "nosuch", "read", "write", "add", "touch", "migrate", "remote", "0", "1", "2", "255", "256",
    "online", "offline", "online_movable", "online_kernel", "pin", "unpin", "link_down", "ecc",
    "fail_alloc", "", " ", "\t", ",", ":", "-",
])

COMMANDS = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(min_size=4000, max_size=5000),
    st.lists(st.one_of(WORDS, NUMBERS.flatmap(number_text)), min_size=1, max_size=7).flatmap(
        lambda words: st.sampled_from([" ", "  ", ",", "\t", ";"]).map(
            lambda sep: (sep.join(words) + "\n").encode())),
)


@pytest.fixture(scope="module")
def fz():
    with cdmfs.mounted() as m:
        r = m.region("fz", 256 * PAGE)
        mm = r.mmap()
        mm[:PAGE * 8] = b"\x5a" * (PAGE * 8)     # some present, dirty pages
        mm.flush()
        yield m, r, mm
        mm.close()


def writable_files(root: str) -> list[str]:
    out = []
    for base in ("sys", "devices", "regions/fz"):
        for dirpath, _, files in os.walk(os.path.join(root, base)):
            for name in files:
                path = os.path.join(dirpath, name)
                if name == "data":
                    continue
                if os.stat(path).st_mode & stat.S_IWUSR:
                    out.append(os.path.relpath(path, root))
    return sorted(out)


def snapshot(root: str) -> dict[str, bytes]:
    out = {}
    for rel in STATE_FILES:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                out[rel] = f.read()
        except FileNotFoundError:
            pass
    return out


def test_every_writable_file_is_fuzzed(fz):
    m, _, _ = fz
    files = writable_files(m.path)
    # The files of SPEC §5-§7 that take writes, as far as they exist now.
    for must in ("sys/devices/system/node/node1/isolated", "regions/fz/policy", "regions/fz/migrate",
                 "devices/gpu0/access", "devices/gpu0/snapshot", "devices/gpu0/fault_policy"):
        assert must in files


@pytest.mark.parametrize("rel", [
    "sys/devices/system/node/node1/isolated",
    "sys/kernel/mm/mempolicy/weighted_interleave/node1",
    "regions/fz/policy",
    "regions/fz/mbind",
    "regions/fz/migrate",
    "devices/gpu0/access",
    "devices/cdm0/access",
    "devices/gpu0/snapshot",
    "devices/gpu0/fault_policy",
])
def test_fuzz_control_file(fz, rel):
    m, r, mm = fz
    path = os.path.join(m.path, rel)
    faulthandler.dump_traceback_later(300, exit=True)   # a hang fails the run
    try:
        @settings(max_examples=EXAMPLES, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(COMMANDS)
        def fuzz(payload: bytes) -> None:
            before = snapshot(m.path)
            fd = os.open(path, os.O_RDWR)
            try:
                os.write(fd, payload)
            except OSError as e:
                assert e.errno in REFUSALS, (payload, e)
                after = snapshot(m.path)
                assert after == before, f"refused write {payload!r} changed state"
            finally:
                os.close(fd)
            # Whatever happened, the mount still answers and the data is intact.
            with open(os.path.join(m.path, "sys/devices/system/node/online")) as f:
                assert f.read() == "0-1\n"
            assert mm[:PAGE * 8] == b"\x5a" * (PAGE * 8)
        fuzz()
    finally:
        faulthandler.cancel_dump_traceback_later()
        # Leave the mount as the next file's run expects it.
        for rel_reset, value in (("sys/devices/system/node/node1/isolated", "1"),
                                 ("sys/kernel/mm/mempolicy/weighted_interleave/node1", "1"),
                                 ("regions/fz/policy", "default"),
                                 ("devices/gpu0/fault_policy", "migrate")):
            with open(os.path.join(m.path, rel_reset), "w") as f:
                f.write(value + "\n")
