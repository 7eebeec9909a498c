"""The tools over the event stream (issue 17): cdmfs trace (Chrome trace-event
JSON for Perfetto), cdmfs plot (a PNG of placement and usage) and cdmfs top
(a live view), checked as a user would: the JSON against the trace-event
format's rules, the picture by its pixels, top by what a terminal shows."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from cdmfs.lib.trace import EVENTS, format_line, parse_line
from cdmfs.tools import plot, trace_json

CDMFS = [sys.executable, "-m", "cdmfs"]
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cdmfs(*args, **kw):
    return subprocess.run(CDMFS + [str(a) for a in args], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 60), env=ENV, **kw)


# -- the trace-event format's rules ----------------------------------------------

REQUIRED = ("name", "ph", "ts", "pid", "tid")


def check_trace_events(doc: dict) -> dict:
    """Checks a Chrome trace-event JSON document by the format's rules
    (the Trace Event Format document): the object form, required fields per
    phase, counters' timestamps monotonic per counter, B/E matched per
    thread, X slices nested per thread; returns what the checks saw."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert doc.get("displayTimeUnit") in ("ms", "ns")
    counters: dict[tuple, float] = {}
    stacks: dict[tuple, list[str]] = {}
    slices: dict[tuple, list[tuple[float, float]]] = {}
    seen = {"process_name": {}, "thread_name": {}, "phases": set(), "cats": set()}
    for ev in doc["traceEvents"]:
        for key in REQUIRED:
            assert key in ev, f"{key} missing in {ev}"
        ph = ev["ph"]
        seen["phases"].add(ph)
        assert isinstance(ev["name"], str) and ev["name"]
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0
        if "cat" in ev:
            seen["cats"].add(ev["cat"])
        if ph == "M":
            assert ev["name"] in ("process_name", "thread_name", "process_sort_index",
                                  "thread_sort_index", "process_labels"), ev
            assert isinstance(ev["args"], dict)
            if ev["name"] in ("process_name", "thread_name"):
                assert isinstance(ev["args"]["name"], str)
                seen[ev["name"]][(ev["pid"], ev["tid"]) if ev["name"] == "thread_name" else ev["pid"]] = \
                    ev["args"]["name"]
        elif ph == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0, ev
            slices.setdefault((ev["pid"], ev["tid"]), []).append((ev["ts"], ev["ts"] + ev["dur"]))
        elif ph == "C":
            assert isinstance(ev["args"], dict) and ev["args"], ev
            assert all(isinstance(v, (int, float)) for v in ev["args"].values()), ev
            key = (ev["pid"], ev["name"], ev.get("id"))
            assert ev["ts"] >= counters.get(key, 0), f"counter {key} went back in time at {ev}"
            counters[key] = ev["ts"]
        elif ph == "i" or ph == "I":
            assert ev.get("s", "t") in ("g", "p", "t"), ev
        elif ph == "B":
            stacks.setdefault((ev["pid"], ev["tid"]), []).append(ev["name"])
        elif ph == "E":
            stack = stacks.get((ev["pid"], ev["tid"]))
            assert stack, f"E without B: {ev}"
            stack.pop()
        else:
            pytest.fail(f"a phase the converter should not write: {ev}")
    assert all(not s for s in stacks.values()), f"B without E: {stacks}"
    for key, spans in slices.items():
        # on one thread, slices nest or follow each other (Perfetto drops the rest)
        spans.sort(key=lambda s: (s[0], -s[1]))
        open_ends: list[float] = []
        for a, b in spans:
            while open_ends and open_ends[-1] <= a:
                open_ends.pop()
            assert not open_ends or b <= open_ends[-1] + 1e-6, f"slices overlap on {key}: {spans}"
            open_ends.append(b)
    for ev in doc["traceEvents"]:
        if ev["ph"] != "M":
            assert ev["pid"] in seen["process_name"], f"a track without a name: {ev}"
    seen["counters"] = counters
    return seen


# -- a scenario in lines -------------------------------------------------------------

def scenario_lines() -> list[str]:
    """Lines as the pipe writes them (format_line), for a machine of node 0,
    node 1 (cdm0) and gpu0: every kind of EVENTS at least once, two
    migrations overlapping in time, a region named with a blank."""
    t = [5_000_000_000_000]
    out: list[str] = []

    def e(dt_ms: float, kind: str, *values) -> None:
        t[0] += int(dt_ms * 1e6)
        assert len(values) == len(EVENTS[kind][0] if kind in EVENTS else ("events",)), kind
        out.append(format_line(t[0], kind, values))
    for loc in ("0", "1", "gpu0"):
        e(0, "mem_usage", loc, 0, 1048576)
    for i in range(32):
        e(1, "cpu_fault", "buf", 321, i * 512, 512, 0, "first_touch")
        e(0, "mem_usage", "0", (i + 1) * 2048, 1048576)
    e(1, "writeback", "buf", 321, 0, 16384)
    e(5, "migrate", "buf", 0, 8192, "0", "gpu0", 8192, 0, 20_000_000, 15_000_000)
    # a second migration, written later but started during the first
    e(1, "migrate", "my data", 0, 256, "0", "gpu0", 256, 0, 15_000_000, 1_000_000)
    e(0, "mem_usage", "gpu0", 33792, 1048576)
    e(0, "mem_usage", "0", 31744, 1048576)
    e(2, "device_fault", "gpu0", "buf", 0, 8192, 0)
    e(3, "device_op", "gpu0", "buf", 0, 8192, "add", 33554432, 0, 2_000_000, 3_000_000)
    e(1, "counter_notification", "cdm0", "buf", 8192, 16)
    e(1, "duplicate", "gpu0", "buf", 8192, 512, 512)
    e(1, "collapse", "buf", 8192, 1, 1)
    e(2, "cpu_fault", "buf", 322, 0, 1024, 0, "fault_back")
    e(0, "numa_hint_fault", "buf", 0, 1024, 0, 1024, 1024, 0)
    e(3, "migrate", "buf", 8192, 8192, "0", "1", 8000, 192, 10_000_000, 8_000_000)
    e(0, "mem_usage", "1", 32000, 1048576)
    e(1, "demote", "buf", 8192, 64, "0", "1", 64, "kswapd")
    e(1, "promote", "buf", 8192, 64, "1", "0", 64)
    e(1, "evict", "gpu0", "buf", 1024, 1024, 1024)
    e(1, "poison", "buf", 12000, 0x8001)
    e(1, "memory_offline", 3, 0)
    e(1, "memory_online", 3, 0)
    e(1, "device_offline", "gpu0", 7168)
    e(1, "device_online", "gpu0")
    e(1, "link_down", "gpu0", 0)
    e(1, "region_removed", "my data")
    e(1, "lost", 3)
    return out


def test_every_kind_has_a_scenario_line():
    assert {parse_line(line)[1] for line in scenario_lines()} == set(EVENTS) | {"lost"}


def test_converted_lines_follow_the_trace_event_rules():
    doc = trace_json.convert(scenario_lines(), names={"1": "node 1 (CDM, cdm0's memory)"})
    seen = check_trace_events(doc)
    assert {"M", "X", "C", "i"} <= seen["phases"]
    tracks = set(seen["process_name"].values())
    assert {"node 0", "node 1 (CDM, cdm0's memory)", "gpu0", "cdm0", "regions"} <= tracks
    # a counter track of used memory per node and device
    used = {seen["process_name"][pid] for pid, name, _ in seen["counters"] if name == trace_json.USED}
    assert used == {"node 0", "node 1 (CDM, cdm0's memory)", "gpu0"}
    # the two overlapping migrations into gpu0 went to two lanes
    gpu = next(pid for pid, n in seen["process_name"].items() if n == "gpu0")
    lanes = {name for (pid, _), name in seen["thread_name"].items() if pid == gpu}
    assert {"migrations in", "migrations in #2", "kernels"} <= lanes
    # every line is one event of its kind, its fields in args
    kinds = [ev["cat"] for ev in doc["traceEvents"] if ev["ph"] != "M"]
    assert sorted(kinds) == sorted(parse_line(line)[1] for line in scenario_lines())


def test_json_reads_back_as_the_lines(tmp_path):
    lines = scenario_lines()
    path = tmp_path / "t.json"
    with open(path, "w") as f:
        w = trace_json.JsonWriter(f)
        for line in lines:
            w.line(line)
        w.close()
    json.load(open(path))      # the streamed file is one JSON document
    back = list(trace_json.read_events(str(path)))
    assert back == [parse_line(line) for line in lines]


def test_convert_a_text_trace(tmp_path):
    txt, out = tmp_path / "t.txt", tmp_path / "t.json"
    txt.write_text("".join(scenario_lines()))
    res = cdmfs("trace", "--convert", txt, "-o", out)
    assert res.returncode == 0, res.stderr
    check_trace_events(json.load(open(out)))
    res = cdmfs("trace", "--convert", tmp_path / "missing.txt", "-o", out)
    assert res.returncode == 1 and res.stderr.startswith("cdmfs: cannot read") and res.stderr.count("\n") == 1


# -- the picture -----------------------------------------------------------------------

def pixel_colours(path: str, size: tuple[int, int]) -> set[str]:
    from matplotlib import image
    img = image.imread(path)
    assert img.shape[:2] == (size[1], size[0])
    rgb = (img[:, :, :3] * 255 + 0.5).astype(int)
    flat = rgb.reshape(-1, 3)
    return {f"#{r:02x}{g:02x}{b:02x}" for r, g, b in {tuple(p) for p in flat.tolist()}}


def test_plot_draws_placement_and_usage(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("".join(scenario_lines()))
    out = tmp_path / "p.png"
    res = cdmfs("plot", src, "-o", out, "--width", 900, "--height", 600)
    assert res.returncode == 0, res.stderr
    found = pixel_colours(str(out), (900, 600))
    want = plot.colours(["0", "1", "gpu0"])
    assert {want["0"], want["1"], want["gpu0"], plot.UNPLACED, plot.POISONED} <= found
    # the same picture from the JSON
    doc = tmp_path / "t.json"
    doc.write_text(json.dumps(trace_json.convert(scenario_lines())))
    out2 = tmp_path / "p2.png"
    assert cdmfs("plot", doc, "-o", out2, "--width", 900, "--height", 600).returncode == 0
    assert pixel_colours(str(out2), (900, 600)) == found


def test_placement_follows_the_events():
    lines = scenario_lines()
    events = sorted((parse_line(line) for line in lines), key=lambda e: e[0])
    places = plot.place_order(["0", "1", "gpu0"])
    img, pages = plot.placement_image(events, "buf", places, events[0][0], events[-1][0], columns=50)
    assert pages == 16384
    idx = {p: i + 1 for i, p in enumerate(places)}
    rows = img.shape[0]
    first_half, second_half = img[: rows // 2 - 2, -1], img[rows // 2 + 2:, -1]
    # after the first touch, the first half went to gpu0 (then gpu0's link went
    # down: lost), the second to node 1
    assert set(img[:, 0].tolist()) <= {0, idx["0"]}
    assert (second_half == idx["1"]).mean() > 0.9
    assert set(first_half.tolist()) <= {idx["0"], plot.Placement(1, places).poisoned}


def test_a_removed_region_ends_not_placed():
    events = sorted((parse_line(line) for line in scenario_lines()), key=lambda e: e[0])
    places = plot.place_order(["0", "1", "gpu0"])
    img, pages = plot.placement_image(events, "my data", places, events[0][0], events[-1][0], columns=50)
    idx = {p: i + 1 for i, p in enumerate(places)}
    assert pages == 256
    assert (img == idx["gpu0"]).any()               # after its migration, before its removal
    assert set(img[:, -1].tolist()) == {0}          # removed: nothing placed


def test_plot_errors(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("".join(scenario_lines()))
    for args, words in [((tmp_path / "none.json", "-o", tmp_path / "x.png"), "cannot read"),
                        ((src, "-o", tmp_path / "x.png", "--region", "nope"), "no region 'nope'"),
                        ((HERE + "/conftest.py", "-o", tmp_path / "x.png"), "is not a trace")]:
        res = cdmfs("plot", *args)
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith("cdmfs: ") and words in res.stderr and res.stderr.count("\n") == 1


# -- on a real mount -------------------------------------------------------------------

def test_trace_needs_a_mount(tmp_path):
    res = cdmfs("trace", tmp_path, "-o", tmp_path / "t.json", "--seconds", 1)
    assert res.returncode == 1 and "is not a cdmfs mount" in res.stderr and res.stderr.count("\n") == 1
    res = cdmfs("trace", tmp_path, "-o", tmp_path / "t.json", "--seconds", "-1")
    assert res.returncode == 1 and "--seconds must be positive" in res.stderr
    res = cdmfs("trace", tmp_path, "-o", tmp_path / "t.json", "--seconds", "soon")
    assert res.returncode == 2


def test_top_snapshot_when_not_a_terminal(mnt):
    r = mnt.region("topsnap", 4 << 20)
    try:
        with open(r.data, "r+b") as f:
            f.write(b"x" * (1 << 20))
        mnt.region("topsnap").migrate(0, 1 << 19, "gpu0")
        res = cdmfs("top", mnt.path, "--interval", "0.2")
        assert res.returncode == 0, res.stderr
        out = res.stdout
        for nid in mnt.nodes:
            total = mnt.node(nid).meminfo["MemTotal"]
            assert f"node {nid} (" in out and f"/ {total / 1024:.1f}" in out
        assert "gpu0 (device-private memory)" in out and "\x1b[" not in out
        line = next(line for line in out.splitlines() if line.startswith("topsnap"))
        assert "g" * 4 in line and "0" * 4 in line and "node 0 128" in line and "gpu0 128" in line
    finally:
        r.remove()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_top_in_tmux(mnt, tmp_path):
    session = f"cdmfs-top-{os.getpid()}"
    cmd = " ".join(CDMFS + ["top", mnt.path]) + f"; echo $? > {tmp_path}/status"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50",
                    "env", f"PYTHONPATH={ENV['PYTHONPATH']}", "sh", "-c", cmd], check=True)
    try:
        screen = ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "q quits" not in screen:
            time.sleep(0.3)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                    capture_output=True, text=True).stdout
        time.sleep(1.5)     # a second frame, with rates
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                capture_output=True, text=True).stdout
        for nid in mnt.nodes:
            info = mnt.node(nid).meminfo
            assert f"node {nid} (" in screen
            assert f"{info['MemUsed'] / 1024:.1f} / {info['MemTotal'] / 1024:.1f}" in screen, screen
        assert "CPU faults" in screen and "migrated" in screen and "evicted" in screen
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        deadline = time.monotonic() + 10
        while not (tmp_path / "status").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "status").read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


# -- recorded from a real mount ----------------------------------------------------------

# The workload cdmfs trace runs (-- COMMAND): a region's first touch through
# mmap, half of it to gpu0, gpu0 adding to it, the CPU reading it back, the
# other half to node 1.  Exits 3, which cdmfs trace must pass on.
WORKLOAD = """
import sys, cdmfs
m = cdmfs.Mount(sys.argv[1])
r = m.region("scen", 4 << 20)
with r.mmap() as mm:
    for p in range(1024):
        mm[p * 4096] = 1
r.migrate(0, 2 << 20, "gpu0")
m.device("gpu0").access("add", "scen", 0, 2 << 20, 1)
with open(r.data, "rb") as f:
    f.read(1 << 20)
r.migrate(2 << 20, 2 << 20, "node:1")
sys.exit(3)
"""


def enables(m) -> dict[str, str]:
    base = os.path.join(m.path, "sys/kernel/tracing/events")
    return {k: open(os.path.join(base, k, "enable")).read().strip() for k in EVENTS}


@pytest.fixture(scope="module")
def recorded(mnt, tmp_path_factory):
    """The scenario's trace, JSON, and how cdmfs trace ended."""
    out = tmp_path_factory.mktemp("trace") / "scen.json"
    before = enables(mnt)
    res = cdmfs("trace", mnt.path, "-o", out, "--", sys.executable, "-c", WORKLOAD, mnt.path)
    after = enables(mnt)
    try:
        mnt.region("scen").remove()
    except OSError:
        pass
    return res, out, before, after


def test_trace_records_a_command(recorded):
    res, out, before, after = recorded
    assert res.returncode == 3, res.stderr          # the command's status
    assert res.stdout.endswith(f"events recorded to {out}\n")
    assert before == after                          # the switches it turned on are off again
    doc = json.load(open(out))
    seen = check_trace_events(doc)
    tracks = set(seen["process_name"].values())
    assert {"node 0 (system RAM)", "node 1 (CDM, cdm0's memory)", "gpu0 (device-private memory)"} <= tracks
    assert {"cpu_fault", "migrate", "device_op", "mem_usage"} <= seen["cats"]
    used = {seen["process_name"][pid] for pid, name, _ in seen["counters"] if name == trace_json.USED}
    assert {"node 0 (system RAM)", "node 1 (CDM, cdm0's memory)", "gpu0 (device-private memory)"} <= used
    events = [e for e in trace_json.read_events(str(out)) if e[2].get("region") == "scen"]
    migrations = [f for _, kind, f in events if kind == "migrate"]
    assert sum(int(f["moved"]) for f in migrations if f["to"] == "gpu0") >= 512
    assert sum(int(f["moved"]) for f in migrations if f["to"] == "1") == 512
    assert any(kind == "cpu_fault" and f["type"] == "first_touch" for _, kind, f in events)
    assert any(kind == "device_op" and f["device"] == "gpu0" for _, kind, f in events)


def test_plot_of_a_recorded_trace(recorded, tmp_path):
    _, out, _, _ = recorded
    png = tmp_path / "scen.png"
    res = cdmfs("plot", out, "-o", png, "--region", "scen")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"region scen drawn to {png}\n"
    want = plot.colours(["0", "1", "gpu0"])
    assert {want["0"], want["1"], want["gpu0"]} <= pixel_colours(str(png), (1200, 800))


def test_trace_for_seconds_as_text(mnt, tmp_path):
    out = tmp_path / "t.txt"
    r = mnt.region("secs", 1 << 20)
    try:
        t = time.monotonic()
        proc = subprocess.Popen(CDMFS + ["trace", mnt.path, "-o", str(out), "--seconds", "1.5",
                                         "--events", "cpu_fault,mem_usage"], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.8)
        with open(r.data, "rb") as f:
            f.read(1 << 20)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert 1.5 <= time.monotonic() - t < 10 and stderr == ""
    finally:
        r.remove()
    lines = [parse_line(line) for line in open(out)]
    assert {kind for _, kind, _ in lines} <= {"cpu_fault", "mem_usage"}
    assert any(kind == "cpu_fault" and f["region"] == "secs" for _, kind, f in lines)
    assert all(a[0] <= b[0] for a, b in zip(lines, lines[1:]))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_trace_stops_on_ctrl_c_with_a_whole_file(mnt, tmp_path, sig):
    import signal
    out = tmp_path / "c.json"
    proc = subprocess.Popen(CDMFS + ["trace", mnt.path, "-o", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert stdout.endswith(f"events recorded to {out}\n")
    check_trace_events(json.load(open(out)))
    assert set(enables(mnt).values()) == {"0"}


def test_trace_bad_input(mnt, tmp_path):
    res = cdmfs("trace", mnt.path, "-o", tmp_path / "t.json", "--events", "migrate,nonsense", "--seconds", 1)
    assert res.returncode == 1 and "no event nonsense" in res.stderr and res.stderr.count("\n") == 1
    res = cdmfs("trace", mnt.path, "-o", tmp_path / "no/such/dir/t.json", "--seconds", 1)
    assert res.returncode == 1 and "cannot write" in res.stderr and res.stderr.count("\n") == 1
    res = cdmfs("trace", mnt.path, "-o", tmp_path / "t.json", "--", "/no/such/program")
    assert res.returncode == 1 and "cannot run /no/such/program" in res.stderr


def test_demo_records_its_run(tmp_path):
    out = tmp_path / "demo.json"
    res = cdmfs("demo", "--trace", out, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"trace written to {out}" in res.stdout
    seen = check_trace_events(json.load(open(out)))
    assert {"cpu_fault", "migrate", "device_op"} <= seen["cats"]
    png = tmp_path / "demo.png"
    assert cdmfs("plot", out, "-o", png).stdout == f"region demo drawn to {png}\n"
