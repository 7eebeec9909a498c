"""README.md runs as written: byexample runs its shell sessions (``# `` prompts, as
root) and its Python session in order, and compares every output with the README's.

The sessions mount at /mnt/cdm, as a reader would.  Whatever a failing session
leaves behind (a mount, its daemon, files in /tmp) is removed here, so a drifted
example fails this test alone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cdmfs.client import MNT_DETACH, _libc
from cdmfs.fs.daemon import daemon_pid, is_mounted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MODULES = os.path.join(ROOT, "tests", "doc_modules")
MOUNT = "/mnt/cdm"
BYEXAMPLE = "import sys; from byexample.byexample import main; sys.argv[0] = 'byexample'; sys.exit(main())"
LEFTOVERS = ["/tmp/touch", "/tmp/touch.c", "/tmp/buf.md5", "/tmp/fill", "/tmp/fill.c", "/tmp/two.toml",
             "/tmp/tiers.toml", "/tmp/cold.md5", "/tmp/oversub.toml"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="the README's sessions run as root with /dev/fuse")


def clean_up() -> None:
    """Leaves no mount at MOUNT (detached if busy), no daemon, no leftover file."""
    pids = []
    while is_mounted(MOUNT):
        try:
            pids.append(daemon_pid(MOUNT))
        except LookupError:
            pass
        if _libc.umount2(os.fsencode(MOUNT), MNT_DETACH) != 0:
            break
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for path in LEFTOVERS:
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture
def session_env(tmp_path):
    """PATH with ``cdmfs`` and ``python3`` of the Python under test first, as the
    README's activated .venv gives; HOME and the working directory in tmp_path."""
    if is_mounted(MOUNT):
        pytest.skip(f"{MOUNT} is already mounted; the README's sessions mount there")
    pytest.importorskip("byexample", reason="pip install -e '.[test]' installs byexample")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, run in (("cdmfs", f'exec "{sys.executable}" -m cdmfs "$@"'),
                      ("python3", f'exec "{sys.executable}" "$@"'),
                      ("python", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{run}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(tmp_path), LC_ALL="C.UTF-8")
    env.pop("PYTHONWARNINGS", None)
    clean_up()
    yield env
    clean_up()


def test_readme_runs_as_written(session_env, tmp_path):
    os.makedirs(MOUNT, exist_ok=True)
    cmd = [sys.executable, "-c", BYEXAMPLE, "--language", "shell,python", "--modules", MODULES,
           "--timeout", "120", "--fail-fast", "--diff", "unified", "--pretty", "none", README]
    t = time.monotonic()
    res = subprocess.run(cmd, cwd=tmp_path, env=session_env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=900)
    assert res.returncode == 0, f"byexample exit {res.returncode}:\n{res.stdout}\n{res.stderr}"
    assert "[PASS]" in res.stdout, res.stdout
    assert not is_mounted(MOUNT), "the README's last session left the mount behind"
    print(f"README.md: {res.stdout.strip().splitlines()[-1]} in {time.monotonic() - t:.1f} s")
