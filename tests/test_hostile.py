"""The daemon as a hostile user meets it (SPEC §4, issue: robustness): files
held open across rmdir, rmdir racing every long operation, huge sparse
regions, oversized and split writes, shell redirections on transaction files,
and a handler failure that must not end the daemon."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest

import cdmfs
from cdmfs.fs.daemon import daemon_pid, daemon_rss

from conftest import PAGE, abort_fuse

CDMFS = [sys.executable, "-m", "cdmfs"]

TIB = 1 << 40
MIB = 1 << 20


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def used_pages(m: cdmfs.Mount) -> dict[str, int]:
    """MemUsed of every node and device, in kB: what a leak would grow."""
    out = {f"N{n}": m.node(n).meminfo["MemUsed"] for n in m.nodes}
    out.update({d: m.device(d).meminfo["MemUsed"] for d in m.devices})
    return out


def alive(m: cdmfs.Mount) -> bool:
    return m.node(0).meminfo["MemTotal"] > 0


# ------------------------------------------------------------ lifetime

CONTROL = {"policy": os.O_RDWR, "stat": os.O_RDONLY, "mbind": os.O_RDWR, "numa_maps": os.O_RDONLY,
           "pagemap": os.O_RDONLY, "migrate": os.O_RDWR, "advise": os.O_RDWR}


def test_control_files_open_across_rmdir(small):
    r = small.region("held", 64 * PAGE)
    with open(r.data, "r+b") as f:
        f.write(os.urandom(64 * PAGE))
    assert small.node(0).meminfo["MemUsed"] >= 256
    fds = {name: os.open(os.path.join(r.path, name), flags) for name, flags in CONTROL.items()}
    try:
        assert os.read(fds["stat"], 4096).startswith(b"size 262144\n")
        os.rmdir(r.path)          # only control files open: the region goes at once
        assert "held" not in small.regions
        assert used_pages(small)["N0"] == 0                 # and its memory with it
        for name, fd in fds.items():
            assert errno_of(os.pread, fd, 4096, 0) == errno.ENOENT, name
            if CONTROL[name] == os.O_RDWR:
                assert errno_of(os.pwrite, fd, b"0 4096 0\n", 0) == errno.ENOENT, name
        # A new region of the same name is a new region.
        again = small.region("held", 4 * PAGE)
        assert again.stat["N0"] == 0 and alive(small)
        assert errno_of(os.pread, fds["stat"], 4096, 0) == errno.ENOENT
        again.remove()
    finally:
        for fd in fds.values():
            os.close(fd)
    assert alive(small)


def test_rmdir_keeps_its_rule_for_data(small):
    r = small.region("busy", 4 * PAGE)
    fd = os.open(r.data, os.O_RDWR)
    try:
        assert errno_of(os.rmdir, r.path) == errno.EBUSY
        assert "busy" in small.regions
    finally:
        os.close(fd)
    os.rmdir(r.path)


def _long_ops(m: cdmfs.Mount, name: str, npages: int):
    """Each long operation of a region, as a function to run in a thread."""
    r = cdmfs.client.Region(m, name)
    size = npages * PAGE
    return {
        "device read": lambda: m.device("gpu0").access("read", name, 0, size),
        "cdm0 add": lambda: m.device("cdm0").access("add", name, 0, size, 3),
        "mbind move": lambda: r.mbind(0, size, "bind:1", move=True),
        "migrate gpu0": lambda: r.migrate(0, size, "gpu0"),
        "migrate node 1": lambda: r.migrate(0, size, "1"),
        "pin": lambda: r.pin(0, size),
        "numa_maps": lambda: r.numa_maps_text,
        "snapshot": lambda: m.device("gpu0").snapshot(name, 0, size),
    }


def test_rmdir_races_every_long_operation(small):
    npages = 512
    pid = daemon_pid(small.path)
    rss = []
    for round_ in range(6):
        for op_name in _long_ops(small, "race", npages):
            r = small.region("race", npages * PAGE)
            with open(r.data, "r+b") as f:
                f.write(os.urandom(npages * PAGE))
            op = _long_ops(small, "race", npages)[op_name]
            outcome: list = []

            def run():
                try:
                    op()
                    outcome.append(0)
                except OSError as e:
                    outcome.append(e.errno)
            t = threading.Thread(target=run)
            t.start()
            time.sleep(0.0005 * round_)        # vary where the rmdir lands
            while True:
                err = errno_of(os.rmdir, r.path)
                if err == 0:
                    break
                assert err == errno.EBUSY, (op_name, err)       # pin's fault-in maps nothing
                time.sleep(0.001)
            t.join(30)
            assert not t.is_alive(), f"{op_name} hangs after rmdir"
            # It finished, or found the region gone (ENOENT; EFAULT: truncated under it).
            assert outcome[0] in (0, errno.ENOENT, errno.EFAULT), (op_name, outcome)
            assert alive(small), f"the daemon died racing rmdir with {op_name}"
            assert all(v == 0 for v in used_pages(small).values()), (op_name, used_pages(small))
        rss.append(daemon_rss(small.path))
    with open(os.path.join(small.path, "sys/kernel/debug/cdmfs/check")) as f:
        assert f.read() == "ok\n"            # the core's invariants hold after it all
    assert os.path.exists(f"/proc/{pid}")
    # Nothing leaks: resident memory stays flat from the second round on.
    assert rss[-1] - rss[1] < 8 * MIB, rss


# ------------------------------------------------------------ sparse regions

def daemon_faults(pid: int) -> int:
    """Page faults the daemon took without I/O (minflt of /proc/PID/stat):
    one for every page of a region's page table a walk reads for the first
    time, so a walk of an untouched 64 TiB table takes 2^25."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[7])


STEP_FAULTS = 1024      # a step over three pages takes ~30; one over 2 GiB of an untouched table 1024


def test_64_tib_region_costs_by_its_pages(mnt):
    """Every walk of a 64 TiB region holding three pages costs by the pages:
    each step takes fewer than STEP_FAULTS page faults in the daemon (before,
    each walk read the whole table: ~20 s, 2^25 faults and GiBs), and the
    daemon's resident memory barely grows."""
    r = mnt.region("sparse")
    r.truncate(64 * TIB)
    pages = [0, (32 * TIB) // PAGE, (64 * TIB) // PAGE - 1]
    fd = os.open(r.data, os.O_RDWR)
    try:
        for p in pages:
            os.pwrite(fd, bytes([p % 251 + 1]) * PAGE, p * PAGE)
    finally:
        os.close(fd)
    pid = daemon_pid(mnt.path)
    rss0 = daemon_rss(mnt.path)
    faults: dict[str, int] = {}

    def counted(name, fn):
        before = daemon_faults(pid)
        out = fn()
        faults[name] = max(faults.get(name, 0), daemon_faults(pid) - before)
        assert faults[name] < STEP_FAULTS, f"{name} took {faults[name]} page faults: it read the table"
        return out
    st = counted("stat", lambda: r.stat)
    assert (st["size"], st["pages"], st["N0"]) == (64 * TIB, (64 * TIB) // PAGE, 3)
    maps = counted("numa_maps", lambda: r.numa_maps_text)
    assert maps == "00000000 default anon=3 dirty=3 N0=3 kernelpagesize_kB=4\n"
    for name in ("policy", "mbind", "advise"):
        counted(name, lambda: open(os.path.join(r.path, name)).read())
    for p in pages:
        entries = counted("pagemap", lambda: r.pagemap(p - 1 if p else p, 2))
        present = entries[1 if p else 0]
        # present, mapped exclusively; an anonymous page: no PM_FILE
        assert present & ~((1 << 55) - 1) == (1 << 63) | (1 << 56)
        assert entries[0 if p else 1] == 0
    # The whole pagemap is 128 GiB: its size is right and a read at its end works.
    assert os.stat(os.path.join(r.path, "pagemap")).st_size == (64 * TIB) // PAGE * 8
    # Untouched pages do not move to system RAM: one run of holes, not 16 M lines.
    res = counted("migrate", lambda: r.migrate(TIB, 64 << 30, "0"))
    assert res == {"requested": 1 << 24, "migrated": 0, "skipped": 1 << 24,
                   "holes": [(TIB // PAGE, TIB // PAGE + (1 << 24) - 1, "-ENOENT")]}
    res = counted("migrate", lambda: r.migrate(0, 64 * TIB, "0"))
    assert res["holes"] == [(1, pages[1] - 1, "-ENOENT"), (pages[1] + 1, pages[2] - 1, "-ENOENT")]
    assert (res["migrated"], res["skipped"]) == (0, pages[2] - 2)
    gpu = mnt.device("gpu0")
    mid = pages[1] * PAGE
    got = counted("device read", lambda: gpu.access("read", "sparse", mid, PAGE))
    assert got["migrated"] == 1
    snap = counted("snapshot", lambda: gpu.snapshot("sparse", mid - PAGE, 3 * PAGE))
    assert snap == {pages[1] - 1: "none", pages[1]: "private-local", pages[1] + 1: "none"}
    counted("numa_maps", lambda: r.numa_maps_text)
    counted("shrink", lambda: r.truncate(TIB))
    assert r.stat["N0"] == 1 and r.stat["private:gpu0"] == 0
    grown = daemon_rss(mnt.path) - rss0
    print(f"64 TiB region, 3 pages: page faults {faults}; daemon RSS +{grown / MIB:.1f} MiB")
    assert grown < 16 * MIB
    counted("rmdir", r.remove)


def test_device_mirror_is_sparse(mnt):
    r = mnt.region("mirror")
    r.truncate(4 * TIB)
    rss0 = daemon_rss(mnt.path)
    for dev in ("gpu0", "cdm0"):
        for off in (0, 2 * TIB, 4 * TIB - PAGE):
            mnt.device(dev).access("write", "mirror", off, PAGE, 7)
    assert daemon_rss(mnt.path) - rss0 < 16 * MIB
    assert mnt.device("cdm0").snapshot("mirror", 2 * TIB, PAGE) == {(2 * TIB) // PAGE: "write"}
    r.remove()


# ------------------------------------------------------------ all or nothing

# Each writable control file: a request that would change something, and one
# that changes nothing here (the first piece of a split write).
WRITABLE = [
    ("regions/aon/policy", "bind:0\n", "default"),
    ("regions/aon/mbind", "0 4096 bind:1\n", "0 4096 default"),
    ("regions/aon/migrate", "0 4096 1\n", "0 4096 0"),
    ("regions/aon/advise", "0 4096 pin\n", "0 4096 unpin"),
    ("devices/cdm0/access", "write aon 0 4096 9\n", "read aon 0 4096"),
    ("devices/gpu0/snapshot", "aon 0 4096\n", "aon 0 4096"),
    ("devices/gpu0/fault_policy", "remote\n", "migrate"),
    ("devices/cdm0/online", "0\n", "1"),
    ("sys/devices/system/node/node1/isolated", "0\n", "1"),
    ("sys/kernel/mm/mempolicy/weighted_interleave/node0", "7\n", "1"),
]


def _state(m: cdmfs.Mount) -> tuple:
    r = cdmfs.client.Region(m, "aon")
    with open(r.data, "rb") as f:
        data = f.read()
    placed = {k: v for k, v in r.stat.items() if k not in ("cpu_faults", "device_faults", "invalidations")}
    return (r.policy, r.mbinds, placed, open(os.path.join(r.path, "advise")).read(), data,
            m.device("gpu0").fault_policy, m.device("cdm0").online, m.node(1).isolated, m.weights,
            m.device("gpu0").snapshot("aon", 0, 4 * PAGE))


def test_oversized_and_split_writes_change_nothing(small):
    r = small.region("aon", 4 * PAGE)
    with open(r.data, "r+b") as f:
        f.write(b"\x01" * 4 * PAGE)
    before = _state(small)
    for rel, request, noop in WRITABLE:
        path = os.path.join(small.path, rel)
        # A valid request padded past a page, and one past a FUSE WRITE (128 KiB).
        for size in (4097, 1 << 20):
            padded = request[:-1] + " " * (size - len(request)) + "\n"
            fd = os.open(path, os.O_WRONLY)
            try:
                assert errno_of(os.write, fd, padded.encode()) == errno.EINVAL, (rel, size)
            finally:
                os.close(fd)
        # A request written in two pieces: the second piece is not taken for a
        # request of its own (it would be the valid request here).
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.write(fd, noop.encode()) == len(noop), rel
            assert errno_of(os.write, fd, b"\n" + request.encode()) == errno.EINVAL, rel
        finally:
            os.close(fd)
        assert _state(small) == before, rel
    assert alive(small)
    r.remove()


# ------------------------------------------------------------ streams

@pytest.mark.parametrize("rel, req, start", [
    ("regions/stream/migrate", "0 65536 gpu0", "requested 16\nmigrated 16\nskipped 0\n"),
    ("devices/gpu0/access", "read stream 0 65536", "ok bytes=65536 "),
    ("devices/gpu0/snapshot", "stream 0 8192", "0 private-local\n1 private-local\n"),
])
def test_transaction_files_read_as_streams(small, rel, req, start):
    if "stream" not in small.regions:
        r = small.region("stream", 16 * PAGE)
        with open(r.data, "r+b") as f:
            f.write(b"\x05" * 16 * PAGE)
    path = os.path.join(small.path, rel)
    # One read-write descriptor, as a shell redirection opens it.
    out = subprocess.run(["bash", "-c", f"exec 3<>{path}; echo '{req}' >&3; cat <&3"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(start), out.stdout


# ------------------------------------------------------------ where pages go

def test_fault_back_when_the_policy_nodes_are_offline(small):
    """bind:1 with node 1 offline: fault-back and evacuation both take node 0."""
    r = small.region("orphan", 16 * PAGE)
    r.policy = "bind:1"
    data = os.urandom(16 * PAGE)
    with open(r.data, "r+b") as f:
        f.write(data)
    assert r.migrate(0, 16 * PAGE, "gpu0")["migrated"] == 16
    for b in small.node(1).memory_blocks:
        small.memory_block(b).state = "offline"
    try:
        with open(r.data, "rb") as f:
            assert f.read(8 * PAGE) == data[:8 * PAGE]        # CPU fault-back: no SIGBUS/EIO
        assert r.stat["N0"] >= 8
        small.device("gpu0").online = False                     # evacuation: the same rule
        assert (r.stat["N0"], r.stat["private:gpu0"]) == (16, 0)
        with open(r.data, "rb") as f:
            assert f.read() == data
    finally:
        small.device("gpu0").online = True
        for b in small.node(1).memory_blocks:
            small.memory_block(b).state = "online"
    r.remove()


# ------------------------------------------------------------ a failing handler

def test_a_failing_request_is_logged_and_the_mount_serves_on(tmp_path):
    """A daemon that can map no more memory (its RLIMIT_AS lowered to its
    size): a device access that must invalidate the CPU's copies cannot start
    the thread that does it.  That request fails with EIO, the log has its
    traceback, and the daemon serves on with every byte intact."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    log = tmp_path / "cdmfs.log"
    subprocess.run([*CDMFS, "mount", str(mp), "--log-file", str(log)], check=True, capture_output=True)
    try:
        m = cdmfs.Mount(str(mp))
        r = m.region("big", 16 * MIB)
        data = os.urandom(16 * MIB)
        with open(r.data, "r+b") as f:
            f.write(data)
            f.seek(0)
            assert f.read() == data          # the CPU now holds the pages
        pid = daemon_pid(str(mp))
        with open(f"/proc/{pid}/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        subprocess.run(["prlimit", f"--pid={pid}", f"--as={vm * 1024}:unlimited"], check=True)
        try:
            err = errno_of(m.device("gpu0").access, "read", "big", 0, 16 * MIB)
            grow = errno_of(r.truncate, 64 * TIB)
        finally:
            subprocess.run(["prlimit", f"--pid={pid}", "--as=unlimited:unlimited"], check=True)
        assert err == errno.EIO and grow == errno.ENOMEM
        text = log.read_text()
        assert "write failed; the request gets EIO" in text and "Traceback" in text, text
        # Alive, serving, nothing lost or left locked.
        assert os.path.exists(f"/proc/{pid}") and alive(m)
        assert m.device("gpu0").access("read", "big", 0, 16 * MIB)["migrated"] == 4096
        with open(r.data, "rb") as f:
            assert f.read() == data
    finally:
        subprocess.run([*CDMFS, "umount", str(mp)], capture_output=True)


# ------------------------------------------------------------ starvation

def test_more_waiting_operations_than_readers():
    """Each migration of a dirty mapped region waits in its invalidation for
    the kernel's write-back WRITEs, which the daemon must still read.  Forty
    at once (more than pyfuse3 ever had readers) complete, round after round;
    a deadline aborts the connection if the mount starved."""
    nregions, size = 40, 2 * MIB
    with cdmfs.mounted() as m:
        regions = [m.region(f"w{k}", size) for k in range(nregions)]
        maps = [r.mmap() for r in regions]
        try:
            for rnd, target in enumerate(("gpu0", "1", "0")):
                for k, mm in enumerate(maps):
                    mm[:] = bytes([(k + rnd) % 251 + 1]) * size    # dirty, never synced
                results: list = []

                def migrate(r) -> None:
                    try:
                        results.append(r.migrate(0, size, target)["migrated"])
                    except OSError as e:
                        results.append(e)
                threads = [threading.Thread(target=migrate, args=(r,), daemon=True) for r in regions]
                for t in threads:
                    t.start()
                deadline = time.monotonic() + 60
                for t in threads:
                    t.join(max(0.0, deadline - time.monotonic()))
                if any(t.is_alive() for t in threads):
                    abort_fuse(m)
                    pytest.fail(f"round {rnd}: {len(results)} of {nregions} migrations to {target} "
                                "finished; the rest starved")
                assert results == [size // PAGE] * nregions, (rnd, target, results)
                for k, mm in enumerate(maps):
                    assert mm[:] == bytes([(k + rnd) % 251 + 1]) * size, (rnd, k)
        finally:
            for mm in maps:
                try:
                    mm.close()
                except (ValueError, OSError):
                    pass
