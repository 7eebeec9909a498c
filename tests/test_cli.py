"""The cdmfs command: mount/umount lifecycle, one-line errors, demo."""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cdmfs.fs.daemon import daemon_pid, default_log_file, is_mounted

CDMFS = [sys.executable, "-m", "cdmfs"]


def cdmfs(*args, **kw):
    return subprocess.run(CDMFS + [str(a) for a in args], capture_output=True, text=True, timeout=60, **kw)


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return
        except OSError:
            return
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), f"daemon {pid} still running"


@pytest.fixture
def mp(tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    yield d
    if is_mounted(str(d)):
        subprocess.run(CDMFS + ["umount", str(d)])


def one_line_error(res) -> str:
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cdmfs: ")
    return lines[0]


def test_mount_umount_and_sigterm(mp):
    res = cdmfs("mount", mp)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"mounted {mp}, log in {default_log_file(str(mp))}\n" and res.stderr == ""
    assert is_mounted(str(mp))
    assert sorted(os.listdir(mp)) == ["devices", "proc", "regions", "sys"]
    res = cdmfs("umount", mp)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"unmounted {mp}\n" and res.stderr == ""
    assert not is_mounted(str(mp))
    # SIGTERM unmounts cleanly too.
    assert cdmfs("mount", mp).returncode == 0
    pid = daemon_pid(mp)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not is_mounted(str(mp))


def test_mount_errors(mp, tmp_path):
    assert "does not exist" in one_line_error(cdmfs("mount", tmp_path / "nope"))
    (mp / "file").write_text("x")
    assert "not empty" in one_line_error(cdmfs("mount", mp))
    os.unlink(mp / "file")
    assert cdmfs("mount", mp).returncode == 0
    assert "already a mount point" in one_line_error(cdmfs("mount", mp))
    assert cdmfs("umount", mp).returncode == 0
    assert "not mounted" in one_line_error(cdmfs("umount", mp))


@pytest.mark.parametrize("toml, key", [
    ('[[node]]\nid = 0\nsize = "1G"\ncpus = "all"\nsise = 1\n', "node[0].sise"),
    ('[[node]]\nid = 0\nsize = "1G"\ncpus = "all"\n[[node]]\nid = 0\nsize = "1G"\n', "node[1].id"),
    ('[[node]]\nid = 0\nsize = "1000"\ncpus = "all"\n', "node[0].size"),
    ('[[node]]\nid = 0\nsize = "1G"\ncpus = "all"\n[[device]]\nname = "g"\nmemory = "node:0"\n',
     "device[0].memory"),
    ('[[node]]\nid = 0\nsize = "1G"\ncpus = "all"\n[[device]]\nname = "g"\nmemory = "node:5"\n',
     "device[0].memory"),
    ('[[node]]\nid = 0\nsize = "1G"\ncpus = "all"\n[distance]\nmatrix = [[10, 20]]\n', "distance.matrix"),
    ('page_size = 8192\n[[node]]\nid = 0\nsize = "1G"\ncpus = "all"\n', "page_size"),
    ('[[node]]\nid = 0\nkind = "hbm"\nsize = "1G"\ncpus = "all"\n', "node[0].kind"),
    ("this is not toml", "config"),
])
def test_bad_config_names_the_key(mp, tmp_path, toml, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    line = one_line_error(cdmfs("mount", mp, "--config", cfg))
    assert line.startswith(f"cdmfs: {key}"), line
    assert not is_mounted(str(mp))
    assert "config" in one_line_error(cdmfs("mount", mp, "--config", tmp_path / "missing.toml"))


def test_kill9_stale_mount_is_cleaned(mp):
    assert cdmfs("mount", mp).returncode == 0
    region = mp / "regions" / "r"
    os.mkdir(region)
    os.truncate(region / "data", 1 << 20)
    pid = daemon_pid(mp)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    # A program touching the dead mount gets an error, not a hang.
    with pytest.raises(OSError) as e:
        os.listdir(mp)
    # ENOTCONN once the connection is gone; ECONNABORTED for a request that
    # was queued while the dying daemon still held /dev/fuse (fuse_abort_conn
    # ends those), which the router's slower exit makes likely.
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert is_mounted(str(mp))
    res = cdmfs("umount", mp)
    assert res.returncode == 0, res.stderr
    assert not is_mounted(str(mp))
    # A new mount comes up in the same place, empty.
    assert cdmfs("mount", mp).returncode == 0
    assert os.listdir(mp / "regions") == []


def test_foreground_mount(mp):
    proc = subprocess.Popen(CDMFS + ["mount", str(mp), "--foreground"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not is_mounted(str(mp)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert is_mounted(str(mp))
    assert open(mp / "sys/devices/system/node/online").read() == "0-1\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert err == ""          # quiet by default
    assert not is_mounted(str(mp))


DEMO_STEPS = [
    "1. created: nothing touched yet, so no page is placed",
    "   pages: node0     0  node1     0  gpu0     0   MiB used: node0  0.0  node1  0.0  gpu0  0.0",
    "2. a child program wrote all 16384 pages through mmap: each first-touch fault placed its",
    "   pages: node0 16384  node1     0  gpu0     0   MiB used: node0 64.0  node1  0.0  gpu0  0.0",
    "3. migrated the first half to gpu0 (migrate_vma): 8192 pages moved, 0 skipped; the CPU's",
    "   pages: node0  8192  node1     0  gpu0  8192   MiB used: node0 32.0  node1  0.0  gpu0 32.0",
    "4. the CPU read the first 1024 pages: the CPU cannot map gpu0's memory, so each fault",
    "5. migrated the second half to node 1, cdm0's memory: 8192 pages moved, 0 skipped; the",
    "6. gpu0 added 1000 to every page of the first half: it faulted on the",
    "   pages: node0     0  node1  8192  gpu0  8192   MiB used: node0  0.0  node1 32.0  gpu0 32.0",
    "7. cdm0 added 1000 to every page of the second half where it lies (fault policy remote):",
    "   they are on node 1, its own memory, so 32 MiB local, 0 MiB remote, 0 pages migrated,",
    "8. the CPU read every page: gpu0's 8192 pages faulted back to node 0, node 1's were read",
    "   pages: node0  8192  node1  8192  gpu0     0   MiB used: node0 32.0  node1 32.0  gpu0  0.0",
    "verification: 16384 of 16384 pages correct (each holds its page number + 1000)",
    "9. memhog, numactl's own tool, unmodified, ran under cdmfs run --membind 1 and wrote 16",
    "unmounted; the demo passed",
]


def test_demo():
    """The demo piped, as a script runs it; README.md shows its whole output."""
    res = subprocess.run(CDMFS + ["demo"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    at = 0
    for want in DEMO_STEPS:                     # each line starts so, in this order
        found = [i for i in range(at, len(lines)) if lines[i].startswith(want)]
        assert found, (want, res.stdout)
        at = found[0] + 1
    assert re.search(r"came back, (\d+) more than read: the kernel\n   reads ahead", res.stdout) or \
        "1024 pages came back\n" in res.stdout, res.stdout


def test_demo_fails_loudly(monkeypatch, capsys):
    """A wrong page in the last check: the verification line says so and the command fails."""
    from cdmfs.tools import cli, demo
    real = demo.cpu

    def one_wrong(data, mode, add, pages):
        bad = real(data, mode, add, pages)
        return bad + 1 if add == demo.ADD else bad
    monkeypatch.setattr(demo, "cpu", one_wrong)
    assert cli.main(["demo"]) == 1
    out, err = capsys.readouterr()
    assert "verification: 16383 of 16384 pages correct (each holds its page number + 1000)\n" in out
    assert "unmounted" not in out
    assert err == "cdmfs: the demo failed: 1 of 16384 pages do not hold what the devices wrote\n"


def test_no_arguments_prints_help():
    res = cdmfs()
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("usage: cdmfs [-h] [--version] COMMAND ...\n")
    for command in ("mount", "umount", "hardware", "numastat", "device", "demo", "bench"):
        assert re.search(rf"^    {command} +\S", res.stdout, re.M), command


def test_version():
    from importlib.metadata import version
    res = cdmfs("--version")
    assert (res.returncode, res.stdout, res.stderr) == (0, f"cdmfs {version('cdmfs')}\n", "")


def bench_references() -> set[str]:
    """The reference names of every row cdmfs bench makes (4th argument of Row)."""
    import ast
    from cdmfs.tools import bench
    tree = ast.parse(open(bench.__file__).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Row" and len(node.args) >= 4:
            ref = node.args[3]
            names.add(ref.value if isinstance(ref, ast.Constant) else getattr(bench, ref.id))
    return names


def test_bench_help_names_every_reference():
    res = cdmfs("bench", "--help")
    assert res.returncode == 0, res.stderr
    refs = bench_references()
    assert {"tmpfs", "bindfs", "pyfuse3 floor", "memcpy", "host node0/meminfo"} <= refs
    for ref in refs:
        assert ref.split(",")[0] in res.stdout, ref      # "bindfs, same bytes" is bindfs's row
    assert "higher is better" in res.stdout and "lower is better" in res.stdout


def test_device_reports_when_piped(mp):
    """device offline/online print their outcome on stdout with no terminal; nothing on stderr."""
    assert cdmfs("mount", mp).returncode == 0
    os.mkdir(mp / "regions" / "r")
    with open(mp / "regions" / "r" / "data", "wb") as f:
        f.write(b"\1" * (12 << 20))
    fd = os.open(mp / "regions" / "r" / "migrate", os.O_RDWR)
    try:
        os.write(fd, b"0 12582912 gpu0\n")
    finally:
        os.close(fd)
    res = cdmfs("device", mp, "gpu0", "offline")
    assert (res.returncode, res.stdout, res.stderr) == (0, "gpu0: offline, 12.0 MiB moved to system RAM\n", "")
    res = cdmfs("device", mp, "gpu0", "online")
    assert (res.returncode, res.stdout, res.stderr) == (0, "gpu0: online\n", "")
    res = cdmfs("device", mp, "nope", "online")
    assert res.stdout == "" and one_line_error(res) == f"cdmfs: no device 'nope' in {mp}"


MAPPED_CHILD = """
import mmap, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
os.close(fd)
m[0] = 1                         # page 0 is faulted in and cached
print("ready", flush=True)
sys.stdin.readline()             # the test kills the daemon meanwhile
assert m[0] == 1                 # a cached page still reads
print("cached ok", flush=True)
m.madvise(mmap.MADV_RANDOM)
m[300 * 4096] = 1                # an uncached page: the dead daemon cannot answer
print("no signal", flush=True)
"""


def test_kill9_mapped_program_gets_sigbus_not_hang(mp):
    assert cdmfs("mount", mp).returncode == 0
    os.mkdir(mp / "regions" / "r")
    os.truncate(mp / "regions" / "r" / "data", 1024 * 4096)
    child = subprocess.Popen([sys.executable, "-c", MAPPED_CHILD, str(mp / "regions" / "r" / "data")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    pid = daemon_pid(mp)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    child.stdin.write("go\n")
    child.stdin.flush()
    out, _ = child.communicate(timeout=30)
    assert "cached ok" in out
    assert child.returncode == -signal.SIGBUS, (child.returncode, out)
    assert cdmfs("umount", mp).returncode == 0
    assert cdmfs("mount", mp).returncode == 0
    assert os.listdir(mp / "regions") == []
