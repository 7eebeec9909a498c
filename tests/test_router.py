"""The C request router (issue 13, step 1: every request forwarded to pyfuse3).

Mounts go through the paths users take: CDMFS_ROUTER=1 in the environment
of ``cdmfs.mounted()`` (the daemon inherits it) and ``cdmfs mount --router``.
The forwarding rules (INIT recorded, requests without reply kept out of the
table, INTERRUPT passed on, notifications written, a Python side that goes
away failing what it left unanswered, ENODEV at unmount) are checked on a
router driven by hand: the test plays pyfuse3's part on the socket.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import pytest

import cdmfs
from cdmfs._core import ffi, lib
from cdmfs.fs.daemon import daemon_pid, is_mounted
from conftest import PAGE

CDMFS = [sys.executable, "-m", "cdmfs"]
MB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the router mounts with mount(2): root only")


@pytest.fixture(scope="module")
def routed():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDMFS_ROUTER", "1")
        with cdmfs.mounted() as m:
            yield m


def threads_of(pid: int) -> list[str]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            out.append(f.read().strip())
    return out


def wait_for(cond, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


# ---------------------------------------------------------------- through pyfuse3


def test_env_switches_the_router_on(routed):
    names = threads_of(daemon_pid(routed.path))
    assert {"cdmfs-router", "cdmfs-reply", "cdmfs-notify"} <= set(names), names
    # The mount looks as it does without the router.
    with open("/proc/self/mounts") as f:
        line = next(ln for ln in f if ln.split()[1] == os.path.realpath(routed.path))
    source, _, fstype, opts = line.split()[:4]
    assert (source, fstype) == ("cdmfs", "fuse.cdmfs")
    assert {"nosuid", "nodev", "default_permissions", "user_id=0", "group_id=0"} <= set(opts.split(","))


def test_sysfs_reads(routed):
    assert routed.nodes == [0, 1]
    info = routed.node(0).meminfo
    assert info["MemTotal"] > 0 and info["MemFree"] <= info["MemTotal"]
    base = os.path.join(routed.path, "sys/devices/system/node")
    assert open(os.path.join(base, "online")).read() == "0-1\n"
    assert "node0" in os.listdir(base)
    assert sorted(os.listdir(routed.path)) == ["devices", "proc", "regions", "sys"]


def test_mmap_migrate_to_gpu_and_back(routed, cprog):
    pattern = cprog("pattern")
    pages = 256
    r = routed.region("rt-mig", pages * PAGE)
    subprocess.run([pattern, "write", r.data, str(pages), "7"], check=True, timeout=60)
    assert r.stat["N0"] == pages
    res = r.migrate(0, pages * PAGE, "gpu0")
    assert res["migrated"] == pages, res
    assert r.stat["private:gpu0"] == pages
    # The CPU faults them back on read (verify), then an explicit migration
    # home finds nothing left on the device.
    subprocess.run([pattern, "verify", r.data, str(pages), "7"], check=True, timeout=60)
    r.migrate(0, pages * PAGE, "gpu0")
    res = r.migrate(0, pages * PAGE, "0")
    assert res["migrated"] == pages, res
    assert r.stat["private:gpu0"] == 0 and r.stat["N0"] == pages
    subprocess.run([pattern, "verify", r.data, str(pages), "7"], check=True, timeout=60)


def test_python_mmap_roundtrip(routed):
    r = routed.region("rt-py", 16 * PAGE)
    m = r.mmap()
    data = bytes(range(256)) * (16 * PAGE // 256)
    m[:] = data
    m.flush()
    assert r.migrate(0, 16 * PAGE, "gpu0")["migrated"] == 16
    assert m[:] == data           # faulted back from gpu0 through the router
    m.close()


def test_one_mib_write(routed):
    r = routed.region("rt-big", 2 * MB)
    data = os.urandom(MB)
    fd = os.open(r.data, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 4096) == MB
        os.fsync(fd)
    finally:
        os.close(fd)
    # The device reads the frames themselves: the WRITE reached the core.
    got = routed.device("gpu0").access("read", "rt-big", 4096, MB)
    assert got["crc32"] == zlib.crc32(data), got
    with open(r.data, "rb") as f:
        f.seek(4096)
        assert f.read(MB) == data


def start_foreground(mp: str, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(CDMFS + ["mount", mp, "--foreground", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: is_mounted(mp) or proc.poll() is not None, what="the mount")
    assert proc.poll() is None, proc.communicate()
    return proc


def test_readers_and_spin_are_settings(tmp_path, monkeypatch):
    """CDMFS_ROUTER_READERS readers (the second on a cloned /dev/fuse),
    CDMFS_ROUTER_SPIN_US of spinning (0: every reader sleeps as soon as
    /dev/fuse is empty); the data is the same whichever reader serves it."""
    monkeypatch.setenv("CDMFS_ROUTER", "1")
    monkeypatch.setenv("CDMFS_ROUTER_READERS", "2")
    monkeypatch.setenv("CDMFS_ROUTER_SPIN_US", "0")
    with cdmfs.mounted() as m:
        assert threads_of(daemon_pid(m.path)).count("cdmfs-router") == 2
        r = m.region("two", 256 * PAGE)
        data = os.urandom(256 * PAGE)
        with open(r.data, "r+b") as f:
            f.write(data)
        fd = os.open(r.data, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, len(data), 0) == data
        finally:
            os.close(fd)
        with open(os.path.join(m.path, "sys/kernel/debug/cdmfs/router")) as f:
            st = {k: int(v) for k, v in (line.split() for line in f)}
        assert st["served_reads"] > 0 and st["sleeps"] > 0
        assert st["spin_hits"] == st["spin_misses"] == 0
        r.remove()
    # Out of range: the mount fails with one line naming the setting.
    monkeypatch.setenv("CDMFS_ROUTER_READERS", "9")
    res = subprocess.run(CDMFS + ["mount", str(tmp_path), "--foreground"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "CDMFS_ROUTER_READERS" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not is_mounted(str(tmp_path))


def test_flag_umount_ends_the_daemon_with_0(tmp_path):
    mp = str(tmp_path)
    proc = start_foreground(mp, "--router")
    try:
        assert "cdmfs-router" in threads_of(proc.pid)
        assert open(os.path.join(mp, "sys/devices/system/node/online")).read() == "0-1\n"
        res = subprocess.run(CDMFS + ["umount", mp], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert err == ""
        assert not is_mounted(mp)
    finally:
        if proc.poll() is None:
            proc.kill()
        if is_mounted(mp):
            subprocess.run(CDMFS + ["umount", mp])


def test_sigterm_unmounts(tmp_path):
    mp = str(tmp_path)
    proc = start_foreground(mp, "--router")
    try:
        os.mkdir(os.path.join(mp, "regions", "r"))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not is_mounted(mp)
    finally:
        if proc.poll() is None:
            proc.kill()
        if is_mounted(mp):
            subprocess.run(CDMFS + ["umount", mp])


def test_sigkill_fails_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMFS_ROUTER", "1")
    mp = str(tmp_path)
    cdmfs.mount(mp)
    try:
        os.mkdir(os.path.join(mp, "regions", "r"))
        os.truncate(os.path.join(mp, "regions", "r", "data"), MB)
        pid = daemon_pid(mp)
        assert "cdmfs-router" in threads_of(pid)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), what="the daemon to die")
        # In a child, with a deadline: a hang fails the test instead of it.
        # Each operation needs the daemon (what the kernel has cached, as the
        # attributes of a looked-up file, still answers).
        probe = ("import os, sys\n"
                 "mp = sys.argv[1]\n"
                 "ops = [lambda: os.listdir(mp),\n"
                 "       lambda: open(mp + '/sys/devices/system/node/online').read(),\n"
                 "       lambda: os.pread(os.open(mp + '/regions/r/data', os.O_RDONLY), 4096, 0)]\n"
                 "for op in ops:\n"
                 "    try:\n"
                 "        op(); print('ok')\n"
                 "    except OSError as e:\n"
                 "        print(e.errno)\n")
        res = subprocess.run([sys.executable, "-c", probe, mp], capture_output=True, text=True, timeout=20)
        codes = res.stdout.split()
        assert len(codes) == 3 and all(c in (str(errno.ENOTCONN), str(errno.EIO)) for c in codes), res
    finally:
        subprocess.run(CDMFS + ["umount", mp], capture_output=True, timeout=30)
    assert not is_mounted(mp)


# ---------------------------------------------------------------- by hand

IN_HEADER = struct.Struct("<IIQQIIIHH")         # fuse_in_header
OUT_HEADER = struct.Struct("<IiQ")              # fuse_out_header
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")      # fuse_init_out, 64 bytes
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")       # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")            # fuse_entry_out without its attr
FUSE_LOOKUP, FUSE_FORGET, FUSE_INIT, FUSE_INTERRUPT, FUSE_BATCH_FORGET = 1, 2, 26, 36, 42
FUSE_NOTIFY_INVAL_ENTRY = 3


class HandRouter:
    """A router whose Python side is the test: requests are read from its
    socket and answered (or not) by hand."""

    def __init__(self, mountpoint: str):
        self.mp = mountpoint
        self.r = lib.cdm_router_new()
        rc = lib.cdm_router_mount(self.r, mountpoint.encode(), b"cdmfs-hand", b"hand", b"")
        assert rc == 0, os.strerror(-rc)
        assert lib.cdm_router_start(self.r) == 0
        self.sock = lib.cdm_router_python_fd(self.r)

    def recv(self, timeout: float = 10) -> tuple[tuple, bytes]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no request forwarded"
        msg = os.read(self.sock, 2 * MB)
        return IN_HEADER.unpack_from(msg), msg[IN_HEADER.size:]

    def recv_op(self, *opcodes: int, timeout: float = 10) -> tuple[tuple, bytes]:
        """The next request with one of opcodes (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            h, body = self.recv(max(0.01, deadline - time.monotonic()))
            if h[1] in opcodes:
                return h, body

    def reply(self, unique: int, body: bytes = b"", error: int = 0) -> None:
        os.write(self.sock, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)

    def stats(self) -> dict:
        out = ffi.new("struct cdm_router_stats *")
        lib.cdm_router_stats(self.r, out)
        return {k: getattr(out, k) for k, _ in ffi.typeof("struct cdm_router_stats").fields}

    def init_params(self) -> dict:
        out = ffi.new("struct cdm_router_init *")
        lib.cdm_router_init_params(self.r, out)
        return {k: getattr(out, k) for k, _ in ffi.typeof("struct cdm_router_init").fields}

    def close(self) -> None:
        if self.sock is not None:
            os.close(self.sock)
            self.sock = None
        if is_mounted(self.mp):
            ctypes.CDLL(None).umount2(self.mp.encode(), 2)
        lib.cdm_router_free(self.r)


def child_stat(path: str) -> subprocess.Popen:
    """stat(path) in a child: prints ok or the errno."""
    code = ("import os, sys\ntry:\n    os.stat(sys.argv[1]); print('ok')\n"
            "except OSError as e:\n    print(e.errno)\n")
    return subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)


def entry(nodeid: int) -> bytes:
    attr = ATTR.pack(nodeid, 0, 0, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, PAGE, 0)
    return ENTRY_OUT.pack(nodeid, 1, 3600, 3600, 0, 0) + attr


@pytest.fixture
def hand():
    mp = tempfile.mkdtemp(prefix="cdmfs-hand-")
    h = HandRouter(mp)
    try:
        yield h
    finally:
        h.close()
        os.rmdir(mp)


def test_forwarding_rules(hand):
    # INIT passes through; both halves are recorded.
    h, body = hand.recv_op(FUSE_INIT)
    major, minor, readahead = struct.unpack_from("<III", body)
    hand.reply(h[2], INIT_OUT.pack(7, minor, readahead, 0, 16, 12, 256 * 1024, 1, 0, 0, 0, *[0] * 7))
    wait_for(lambda: hand.init_params()["done"], what="INIT's reply")
    p = hand.init_params()
    assert (p["kernel_major"], p["kernel_minor"], p["major"], p["minor"]) == (7, minor, 7, minor)
    assert p["max_write"] == 256 * 1024 and p["error"] == 0

    # A LOOKUP awaits its reply in the table; its answer goes back.
    child = child_stat(os.path.join(hand.mp, "x"))
    h, body = hand.recv_op(FUSE_LOOKUP)
    assert body.rstrip(b"\0") == b"x"
    assert hand.stats()["outstanding"] == 1
    hand.reply(h[2], entry(2))
    assert child.communicate(timeout=10)[0].strip() == "ok"
    assert hand.stats()["outstanding"] == 0

    # An INTERRUPT (the caller killed while the kernel waits) is passed on
    # and needs no reply; the interrupted request still does.
    child = child_stat(os.path.join(hand.mp, "y"))
    h, _ = hand.recv_op(FUSE_LOOKUP)
    child.kill()
    hi, body = hand.recv_op(FUSE_INTERRUPT)
    assert hi[2] == h[2] | 1 and struct.unpack_from("<Q", body)[0] == h[2]
    s = hand.stats()
    assert s["outstanding"] == 1 and s["no_reply"] >= 1
    hand.reply(h[2], error=errno.ENOENT)
    child.wait(timeout=10)
    wait_for(lambda: hand.stats()["outstanding"] == 0, what="the table to empty")

    # A notification goes to the kernel (through the notifier): dropping x's
    # entry drops its inode too (FUSE keeps no unused inode), and the FORGET
    # that follows gets no reply either.
    name = b"x\0"
    note = struct.pack("<QII", 1, 1, 0) + name
    os.write(hand.sock, OUT_HEADER.pack(OUT_HEADER.size + len(note), FUSE_NOTIFY_INVAL_ENTRY, 0) + note)
    wait_for(lambda: hand.stats()["notifications"] == 1, what="the notification")
    h, body = hand.recv_op(FUSE_FORGET, FUSE_BATCH_FORGET)
    # fuse_batch_forget_in (count, dummy) then fuse_forget_one (nodeid, nlookup).
    nodeid = struct.unpack_from("<Q", body, 8)[0] if h[1] == FUSE_BATCH_FORGET else h[3]
    assert nodeid == 2
    assert hand.stats()["outstanding"] == 0
    assert hand.stats()["write_errors"] == 0, hand.stats()


def test_python_side_gone_fails_requests_and_unmount_is_seen(hand):
    h, body = hand.recv_op(FUSE_INIT)
    major, minor, readahead = struct.unpack_from("<III", body)
    hand.reply(h[2], INIT_OUT.pack(7, minor, readahead, 0, 16, 12, 128 * 1024, 1, 0, 0, 0, *[0] * 7))
    child = child_stat(os.path.join(hand.mp, "x"))
    hand.recv_op(FUSE_LOOKUP)
    # pyfuse3 dies with the LOOKUP unanswered: it fails, and so does what follows.
    os.close(hand.sock)
    hand.sock = None
    assert child.communicate(timeout=10)[0].strip() == str(errno.EIO)
    event = lib.cdm_router_event_fd(hand.r)
    assert select.select([event], [], [], 10)[0]
    assert lib.cdm_router_state(hand.r) & lib.CDM_ROUTER_PYTHON_GONE
    child = child_stat(os.path.join(hand.mp, "y"))
    assert child.communicate(timeout=10)[0].strip() == str(errno.EIO)
    s = hand.stats()
    assert s["failed"] == 2 and s["outstanding"] == 0, s
    # Unmounting ends the request thread with ENODEV.
    assert ctypes.CDLL(None, use_errno=True).umount2(hand.mp.encode(), 0) == 0
    wait_for(lambda: lib.cdm_router_state(hand.r) & lib.CDM_ROUTER_UNMOUNTED, what="ENODEV")


# ---------------------------------------------------------------- the side channel, by hand

FUSE_OPEN, FUSE_FLUSH, FUSE_LSEEK = 14, 25, 46
FUSE_ASYNC_READ, FUSE_AUTO_INVAL_DATA = 1 << 0, 1 << 12
SEEKER = ("import os, signal, sys\n"
          "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
          "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
          "print('open', flush=True)\n"
          "for line in sys.stdin:\n"
          "    try:\n"
          "        print(os.lseek(fd, 0, os.SEEK_DATA), flush=True)\n"
          "    except OSError as e:\n"
          "        print(-e.errno, flush=True)\n")


def test_side_channel(hand):
    assert lib.cdm_router_route(hand.r, FUSE_INIT, 1) == -errno.EINVAL
    assert lib.cdm_router_route(hand.r, FUSE_LSEEK, 1) == 0
    side = lib.cdm_router_side_fd(hand.r)
    # INIT's reply loses FUSE_AUTO_INVAL_DATA on its way to the kernel.
    h, body = hand.recv_op(FUSE_INIT)
    major, minor, readahead = struct.unpack_from("<III", body)
    flags = FUSE_ASYNC_READ | FUSE_AUTO_INVAL_DATA
    hand.reply(h[2], INIT_OUT.pack(7, minor, readahead, flags, 16, 12, 128 * 1024, 1, 0, 0, 0, *[0] * 7))
    wait_for(lambda: hand.init_params()["done"], what="INIT's reply")
    assert hand.init_params()["flags"] == FUSE_ASYNC_READ

    child = subprocess.Popen([sys.executable, "-c", SEEKER, os.path.join(hand.mp, "x")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        h, _ = hand.recv_op(FUSE_LOOKUP)
        hand.reply(h[2], entry(2))
        h, _ = hand.recv_op(FUSE_OPEN)
        hand.reply(h[2], struct.pack("<QIi", 7, 0, 0))
        assert child.stdout.readline().strip() == "open"

        def side_request() -> tuple:
            child.stdin.write("s\n")
            child.stdin.flush()
            assert select.select([side], [], [], 10)[0], "nothing on the side channel"
            msg = os.read(side, 1 << 16)
            h = IN_HEADER.unpack_from(msg)
            fh, offset, whence = struct.unpack_from("<QqI", msg, IN_HEADER.size)
            assert (h[1], h[3], fh, offset, whence) == (FUSE_LSEEK, 2, 7, 0, os.SEEK_DATA)
            return h

        # LSEEK goes to the side channel, not to pyfuse3; its reply goes back.
        h = side_request()
        assert not select.select([hand.sock], [], [], 0.2)[0]
        assert hand.stats()["side"] == 1 and hand.stats()["outstanding"] == 1
        assert lib.cdm_router_reply(hand.r, h[2], 0, struct.pack("<q", 4096), 8) == 0
        assert child.stdout.readline().strip() == "4096"
        assert lib.cdm_router_reply(hand.r, h[2], 0, ffi.NULL, 0) == -errno.ENOENT   # answered
        assert hand.stats()["outstanding"] == 0

        # An INTERRUPT of it is dropped; the reply still comes.
        h = side_request()
        child.send_signal(signal.SIGUSR1)
        wait_for(lambda: hand.stats()["interrupts_dropped"] == 1, what="the INTERRUPT")
        assert not select.select([hand.sock], [], [], 0.2)[0]
        assert lib.cdm_router_reply(hand.r, h[2], errno.ENXIO, ffi.NULL, 0) == 0
        assert child.stdout.readline().strip() == str(-errno.ENXIO)

        # Python gone: the side-channel request in flight fails with EIO.
        h = side_request()
        os.close(hand.sock)
        hand.sock = None
        assert child.stdout.readline().strip() == str(-errno.EIO)
        assert lib.cdm_router_reply(hand.r, h[2], 0, struct.pack("<q", 0), 8) == -errno.ENOENT
        child.stdin.close()
        child.wait(timeout=10)        # its FLUSH fails with EIO from the router
        assert hand.stats()["outstanding"] == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
