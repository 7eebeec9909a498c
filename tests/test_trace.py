"""The trace stream (sys/kernel/tracing): switches, trace_pipe readers, and
lines that add up to the counters the rest of the mount shows."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections import Counter, defaultdict

import pytest

import cdmfs
from cdmfs.lib.trace import CAPACITY, EVENTS, LOST, TraceBuffer, format_line, parse_line
from conftest import EVICTION_CONFIG, PAGE, fill

TRACING = "sys/kernel/tracing"


def tpath(m: cdmfs.Mount, rel: str) -> str:
    return os.path.join(m.path, TRACING, rel)


def sh(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)


def vmstat(m: cdmfs.Mount) -> dict[str, int]:
    with open(os.path.join(m.path, "proc/vmstat")) as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def enable(m: cdmfs.Mount, kind: str = "", on: bool = True) -> None:
    rel = f"events/{kind}/enable" if kind else "events/enable"
    with open(tpath(m, rel), "w") as f:
        f.write("1" if on else "0")


class Reader:
    """``cat trace_pipe > FILE``: a shell reader, as a user would run one."""
    running: list["Reader"] = []

    def __init__(self, m: cdmfs.Mount, out: str):
        Reader.running.append(self)
        self.out = out
        self.f = open(out, "w")
        self.p = subprocess.Popen(["cat", tpath(m, "trace_pipe")], stdout=self.f)
        # Lines are a reader's from its open on: wait for cat to have opened.
        end = time.monotonic() + 10
        while not self._opened():
            assert time.monotonic() < end and self.p.poll() is None, "cat did not open trace_pipe"
            time.sleep(0.01)

    def _opened(self) -> bool:
        fds = f"/proc/{self.p.pid}/fd"
        for fd in os.listdir(fds):
            try:
                if os.readlink(f"{fds}/{fd}").endswith("/trace_pipe"):
                    return True
            except FileNotFoundError:       # closed meanwhile (cat starting up)
                pass
        return False

    def lines(self) -> list[str]:
        with open(self.out) as f:
            return f.read().splitlines()

    def wait_for(self, pred, timeout: float = 20.0) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = self.lines()
            if any(pred(parse_line(line)) for line in lines):
                return lines
            time.sleep(0.02)
        raise AssertionError(f"no such line in {self.out}: {self.lines()[-5:]}")

    def stop(self) -> int:
        self.p.send_signal(signal.SIGINT)
        rc = self.p.wait(timeout=10)
        self.f.close()
        if self in Reader.running:
            Reader.running.remove(self)
        return rc


@pytest.fixture(autouse=True)
def stop_readers():
    """A failed test's readers end with it (and let its mount go)."""
    yield
    for rd in list(Reader.running):
        rd.stop()


@pytest.fixture
def tm():
    with cdmfs.mounted() as m:
        yield m


# --------------------------------------------------------------------------- switches


def test_every_kind_has_a_switch_and_a_format(tm):
    kinds = sorted(os.listdir(tpath(tm, "events")))
    assert kinds == sorted(list(EVENTS) + ["enable"])
    assert open(tpath(tm, "events/enable")).read() == "0\n"
    fmt = open(tpath(tm, "events/migrate/format")).read()
    assert "fields: region first n from to moved holes wall_ns modeled_ns\n" in fmt
    # Root only, as tracefs.
    assert os.stat(tpath(tm, "")).st_mode & 0o777 == 0o700


def test_switches_and_bad_writes(tm):
    assert sh(f"echo 1 > {tpath(tm, 'events/migrate/enable')}").returncode == 0
    assert sh(f"cat {tpath(tm, 'events/migrate/enable')}").stdout == "1\n"
    assert sh(f"cat {tpath(tm, 'events/enable')}").stdout == "X\n"      # some on, some off
    for bad in ("2", "on", "-1", "1 1", ""):
        r = sh(f"echo '{bad}' > {tpath(tm, 'events/migrate/enable')}")
        assert r.returncode != 0 and "Invalid argument" in r.stderr, bad
        r = sh(f"echo '{bad}' > {tpath(tm, 'events/enable')}")
        assert r.returncode != 0 and "Invalid argument" in r.stderr, bad
    # Nothing changed by the refused writes.
    assert open(tpath(tm, "events/migrate/enable")).read() == "1\n"
    assert open(tpath(tm, "events/cpu_fault/enable")).read() == "0\n"
    enable(tm)
    assert {open(tpath(tm, f"events/{k}/enable")).read() for k in EVENTS} == {"1\n"}
    assert open(tpath(tm, "events/enable")).read() == "1\n"
    enable(tm, on=False)
    assert open(tpath(tm, "events/enable")).read() == "0\n"


def test_trace_pipe_takes_no_write(tm):
    with pytest.raises(PermissionError):
        open(tpath(tm, "trace_pipe"), "w")


def test_disabled_kinds_write_nothing(tm, tmp_path):
    enable(tm, "migrate")
    rd = Reader(tm, str(tmp_path / "a"))
    r = tm.region("quiet", 64 * PAGE)
    with r.mmap() as mm:
        mm[:] = b"x" * (64 * PAGE)              # faults: not enabled
        r.migrate(0, 64 * PAGE, "gpu0")
        lines = rd.wait_for(lambda ln: ln[1] == "migrate")
    rd.stop()
    assert {parse_line(line)[1] for line in lines} == {"migrate"}


# --------------------------------------------------------------------------- readers


def test_short_reads_lose_nothing(tm):
    """A read shorter than a line gets its start; the next read goes on."""
    enable(tm, "device_online")
    fd = os.open(tpath(tm, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
    tm.device("gpu0").online = False
    tm.device("gpu0").online = True             # one line
    data, end = b"", time.monotonic() + 10
    while not data.endswith(b"\n") and time.monotonic() < end:
        try:
            chunk = os.read(fd, 7)
            assert len(chunk) <= 7
            data += chunk
        except BlockingIOError:
            time.sleep(0.01)
    os.close(fd)
    assert parse_line(data.decode())[1:] == ("device_online", {"device": "gpu0"})


def test_nonblocking_read_of_an_empty_pipe_is_eagain(tm):
    fd = os.open(tpath(tm, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError) as e:
            os.read(fd, 4096)
        assert e.value.errno == errno.EAGAIN
    finally:
        os.close(fd)


def test_killed_reader_does_not_hold_the_daemon(tm):
    """A reader waiting for lines dies at once on SIGKILL, and the mount
    serves on (the daemon noticed the signal: no request stays stuck)."""
    p = subprocess.Popen(["cat", tpath(tm, "trace_pipe")], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    t0 = time.monotonic()
    p.kill()
    p.wait(timeout=5)
    assert time.monotonic() - t0 < 5
    assert tm.node(0).meminfo["MemTotal"] > 0


def test_concurrent_readers_get_every_line(tm, tmp_path):
    enable(tm)
    readers = [Reader(tm, str(tmp_path / f"r{i}")) for i in range(3)]
    r = tm.region("many", 256 * PAGE)
    with r.mmap() as mm:
        for page in range(256):
            mm[page * PAGE] = 1
        r.migrate(0, 256 * PAGE, "gpu0")
        r.migrate(0, 256 * PAGE, "node:0")
    done = lambda ln: ln[1] == "migrate" and ln[2]["to"] == "0"     # noqa: E731
    seen = [rd.wait_for(done) for rd in readers]
    for rd in readers:
        rd.stop()
    # From its open on, each reader got the same lines (mem_usage aside:
    # each reader's open starts it with every place's figures).
    same = [[x for x in s if " mem_usage " not in x] for s in seen]
    cut = min(len(s) for s in same)
    assert cut > 0 and all(s[:cut] == same[0][:cut] for s in same)
    assert all(int(parse_line(x)[2]["n"]) > 0 for x in same[0] if " cpu_fault " in x)


# --------------------------------------------------------------------------- lines add up


@pytest.mark.parametrize("router", ["1", "0"], ids=["router", "python"])
def test_lines_add_up_to_the_counters(router, tmp_path, monkeypatch):
    """A scripted scenario: first touch, write(), migrations to gpu0 and cdm0
    and back, device accesses that fault, CPU fault-backs -- served in C by
    the router, or all in Python without it.  The lines, by kind, add up to
    what stat, vmstat and the devices' stat say."""
    monkeypatch.setenv("CDMFS_ROUTER", router)
    with cdmfs.mounted() as tm:
        scenario_adds_up(tm, tmp_path)


def scenario_adds_up(tm: cdmfs.Mount, tmp_path) -> None:
    before = vmstat(tm)
    gpu_before = tm.device("gpu0").stat
    enable(tm)
    rd = Reader(tm, str(tmp_path / "trace"))
    r = tm.region("scene", 512 * PAGE)
    with r.mmap() as mm:
        for page in range(0, 384):
            mm[page * PAGE] = page & 0xff                     # first touches (C)
        fd = os.open(os.path.join(tm.path, "regions/scene/data"), os.O_WRONLY)
        os.pwrite(fd, b"w" * PAGE * 2, 400 * PAGE)             # write(): two pages
        os.close(fd)
        r.migrate(0, 256 * PAGE, "gpu0")
        r.migrate(256 * PAGE, 128 * PAGE, "cdm0")
        tm.device("gpu0").access("read", "scene", 256 * PAGE, 128 * PAGE)   # remote: maps them
        tm.device("gpu0").access("write", "scene", 384 * PAGE, 16 * PAGE, 7)   # faults untouched pages
        for page in range(0, 64):
            assert mm[page * PAGE] == page & 0xff           # fault-backs from gpu0
        r.migrate(0, 512 * PAGE, "node:0")
    rd.wait_for(lambda ln: ln[1] == "migrate" and ln[2]["to"] == "0" and ln[2]["n"] == "512")
    time.sleep(0.1)
    lines = rd.lines()
    rd.stop()
    after = vmstat(tm)
    stat = r.stat
    gpu = tm.device("gpu0").stat
    events = [parse_line(line) for line in lines]
    by_kind = defaultdict(list)
    for _, kind, fields in events:
        by_kind[kind].append(fields)
    assert LOST not in by_kind
    # Timestamps never go back.
    ts = [t for t, _, _ in events]
    assert ts == sorted(ts)

    # Every READ is a fault line; the machine counts one pgfault per READ.
    faults = by_kind["cpu_fault"]
    assert len(faults) == stat["cpu_faults"] == after["pgfault"] - before["pgfault"]
    types = Counter(f["type"] for f in faults)
    assert types["first_touch"] > 0 and types["fault_back"] > 0
    assert all(f["region"] == "scene" for f in faults)
    assert len(by_kind["writeback"]) == stat["writebacks"]
    # Every page moved is in a migrate line, counted once.
    moves = by_kind["migrate"]
    assert sum(int(f["moved"]) for f in moves) == stat["migrated_pages"] == \
        after["pgmigrate_success"] - before["pgmigrate_success"]
    assert sum(int(f["moved"]) for f in moves if f["to"] == "gpu0") == \
        gpu["migrated_to"] - gpu_before["migrated_to"]
    assert sum(int(f["moved"]) for f in moves if f["from"] == "gpu0") == \
        gpu["migrated_from"] - gpu_before["migrated_from"]
    assert all(int(f["wall_ns"]) >= 0 and f["to"] != "-" for f in moves if int(f["moved"]))
    assert any(int(f["modeled_ns"]) > 0 for f in moves if f["to"] == "gpu0")
    # Device faults and device ops, as the device counts them.
    dfaults = [f for f in by_kind["device_fault"] if f["device"] == "gpu0"]
    assert sum(int(f["faults"]) for f in dfaults) == gpu["faults"] - gpu_before["faults"] == \
        stat["device_faults"]
    assert len(dfaults) == gpu["fault_batches"] - gpu_before["fault_batches"]
    ops = [f for f in by_kind["device_op"] if f["device"] == "gpu0"]
    assert [f["op"] for f in ops] == ["read", "write"]
    for key in ("local_bytes", "remote_bytes", "modeled_ns"):
        assert sum(int(f[key]) for f in ops) == gpu[key] - gpu_before[key], key
    # The last used-memory line of each place is what meminfo says now.
    usage = {f["loc"]: int(f["used_kb"]) for f in by_kind["mem_usage"]}
    for nid in tm.nodes:
        assert usage[str(nid)] == tm.node(nid).meminfo["MemUsed"]


# --------------------------------------------------------------------------- the buffer


def test_a_reader_behind_reads_what_it_lost():
    buf = TraceBuffer(capacity=4)
    for i in range(6):
        buf.append(format_line(i, "device_online", (f"gpu{i}",)))
    data, seq = buf.read(0, 1 << 16)
    lines = data.decode().splitlines()
    assert parse_line(lines[0])[1:] == (LOST, {"events": "2"})
    assert [parse_line(x)[2]["device"] for x in lines[1:]] == ["gpu2", "gpu3", "gpu4", "gpu5"]
    assert seq == 6 and buf.read(seq, 4096) == (b"", 6)
    assert CAPACITY >= 1 << 16


def test_lines_round_trip_through_the_parser():
    line = format_line(12_345_678_901_234, "migrate", ("my data", 0, 512, "0,1", "gpu0", 500, 12, 10, 20))
    assert line == ('12345.678901 migrate region="my data" first=0 n=512 from=0,1 to=gpu0 moved=500 '
                    'holes=12 wall_ns=10 modeled_ns=20\n')
    ts, kind, fields = parse_line(line)
    assert (ts, kind, fields["region"], fields["holes"]) == (12345.678901, "migrate", "my data", "12")
    odd = format_line(0, "poison", ('a"b\\c=d\ne', 1, 2))
    assert parse_line(odd)[2]["region"] == 'a"b\\c=d\ne'


# --------------------------------------------------------------------------- every mover



def test_every_mover_writes_its_lines(tmp_path):
    """Eviction, read duplication and its collapse, access counters, device
    and block offline/online, poisoning: each writes its lines, and they
    add up to the device's and the region's counters."""
    MB = 1 << 20
    with cdmfs.mounted(EVICTION_CONFIG) as m:
        enable(m)
        rd = Reader(m, str(tmp_path / "trace"))
        gpu, cdm = m.device("gpu0"), m.device("cdm0")
        r = m.region("movers", 16 * MB)
        fill(r)
        r.advise(12 * MB, 1 * MB, "read_mostly")
        gpu.access("read", "movers", 12 * MB, 1 * MB)            # duplicates
        with open(r.data, "r+b") as f:
            f.seek(12 * MB)
            f.write(b"\x01" * PAGE)                              # collapses
        r.migrate(0, 8 * MB, "gpu0")
        r.migrate(8 * MB, 4 * MB, "gpu0")                        # 8 MiB device: evicts
        cdm.access_counters = "2 64K"
        m.node(1).numa_balancing = True
        for _ in range(2):
            cdm.access("read", "movers", 14 * MB, 64 << 10)      # the counter fires
        gstat, cstat = gpu.stat, cdm.stat
        gpu.online = False
        gpu.online = True
        block = m.node(1).memory_blocks[0]
        m.memory_block(block).online = False
        m.memory_block(block).online = True
        m.hard_offline(m.region("movers").phys_addr(15 * MB // PAGE))
        stat = r.stat
        r.remove()                                               # the last line waited for
        lines = rd.wait_for(lambda ln: ln[1] == "region_removed")
        rd.stop()
    by_kind = defaultdict(list)
    for line in lines:
        _, kind, fields = parse_line(line)
        by_kind[kind].append(fields)
    assert len(by_kind["evict"]) == gstat["evictions"] > 0
    assert sum(int(f["moved"]) for f in by_kind["evict"]) * PAGE == gstat["evicted_bytes"]
    assert sum(int(f["pages"]) for f in by_kind["duplicate"]) > 0
    assert sum(int(f["pages"]) for f in by_kind["collapse"]) > 0
    assert len(by_kind["counter_notification"]) == cstat["counter_notifications"] > 0
    assert [f["device"] for f in by_kind["device_offline"]] == ["gpu0"]
    assert [f["device"] for f in by_kind["device_online"]] == ["gpu0"]
    assert [(f["block"], f["node"]) for f in by_kind["memory_offline"]] == [(f"memory{block}", "1")]
    assert [(f["block"], f["node"]) for f in by_kind["memory_online"]] == [(f"memory{block}", "1")]
    assert [(f["region"], f["page"]) for f in by_kind["poison"]] == [("movers", str(15 * MB // PAGE))]
    assert stat["poisoned"] == 1
    assert [f["region"] for f in by_kind["region_removed"]] == ["movers"]
