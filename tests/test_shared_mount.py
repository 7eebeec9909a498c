"""A mount several users share (``--allow-other``, SPEC §4): what another
user may read, write and create, checked as that user with real commands."""
from __future__ import annotations

import os
import pwd
import shutil
import struct
import subprocess
import sys

import pytest

from cdmfs.fs.daemon import is_mounted

from conftest import PAGE

CDMFS = [sys.executable, "-m", "cdmfs"]

USER = "cdmfs-test"


@pytest.fixture(scope="module")
def user():
    if os.getuid() != 0:
        pytest.skip("creating a test user needs root")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
    return pwd.getpwnam(USER)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, user):
    # The mount point's folder must be reachable by the test user.
    mp = tmp_path_factory.mktemp("shared") / "mnt"
    mp.mkdir()
    for d in (mp.parent, mp.parent.parent, mp.parent.parent.parent):
        os.chmod(d, os.stat(d).st_mode | 0o011)
    subprocess.run([*CDMFS, "mount", str(mp), "--allow-other"], check=True, capture_output=True)
    yield str(mp)
    subprocess.run([*CDMFS, "umount", str(mp)], capture_output=True)
    assert not is_mounted(str(mp))


def as_user(user, script: str) -> subprocess.CompletedProcess:
    """A shell script run as the test user (real uid and gid)."""
    def drop():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, preexec_fn=drop,
                          timeout=60, cwd="/")


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def denied(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    return res.stderr


def test_sys_and_devices_read_by_all_written_by_root(shared, user):
    node1 = f"{shared}/sys/devices/system/node/node1"
    assert ok(as_user(user, f"cat {node1}/isolated")) == "1\n"
    assert "MemTotal" in ok(as_user(user, f"cat {node1}/meminfo"))
    assert ok(as_user(user, f"cat {shared}/devices/gpu0/type")) == "private\n"
    assert "Permission denied" in denied(as_user(user, f"echo 0 > {node1}/isolated"))
    assert "Permission denied" in denied(as_user(user, f"echo remote > {shared}/devices/gpu0/fault_policy"))
    assert "Permission denied" in denied(as_user(user, f"echo 'read x 0 4096' > {shared}/devices/gpu0/access"))
    with open(f"{node1}/isolated") as f:
        assert f.read() == "1\n"


def test_a_user_creates_and_owns_regions(shared, user):
    regions = f"{shared}/regions"
    ok(as_user(user, f"mkdir {regions}/mine && truncate -s 64K {regions}/mine/data && "
                     f"printf hello > {regions}/mine/data && head -c 5 {regions}/mine/data"))
    st = os.stat(f"{regions}/mine")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (user.pw_uid, user.pw_gid, 0o700)
    st = os.stat(f"{regions}/mine/data")
    assert (st.st_uid, st.st_mode & 0o7777) == (user.pw_uid, 0o600)
    assert ok(as_user(user, f"grep ^N0 {regions}/mine/stat")) == "N0 1\n"
    assert ok(as_user(user, f"echo bind:0 > {regions}/mine/policy && cat {regions}/mine/policy")) == "bind:0\n"
    # chown is refused, even to root.
    assert "Operation not permitted" in denied(as_user(user, f"chown root {regions}/mine/data"))
    with pytest.raises(PermissionError):
        os.chown(f"{regions}/mine/data", 0, 0)
    # Root may do everything with it.
    with open(f"{regions}/mine/data", "rb") as f:
        assert f.read(5) == b"hello"
    ok(as_user(user, f"rmdir {regions}/mine"))
    assert not os.path.exists(f"{regions}/mine")


def test_other_users_regions_are_closed(shared, user):
    regions = f"{shared}/regions"
    os.mkdir(f"{regions}/roots")
    os.truncate(f"{regions}/roots/data", 4 * PAGE)
    with open(f"{regions}/roots/data", "r+b") as f:
        f.write(b"secret")
    try:
        for script in (f"head -c 6 {regions}/roots/data", f"cat {regions}/roots/stat",
                       f"echo 0 > {regions}/roots/policy", f"truncate -s 0 {regions}/roots/data"):
            assert "Permission denied" in denied(as_user(user, script)), script
        # The sticky regions/ folder: a region is removed by its owner only.
        assert denied(as_user(user, f"rmdir {regions}/roots"))
        assert os.path.exists(f"{regions}/roots/data")
    finally:
        os.rmdir(f"{regions}/roots")


def test_pagemap_shows_pfns_to_root_only(shared, user):
    regions = f"{shared}/regions"
    ok(as_user(user, f"mkdir {regions}/pm && head -c 8192 /dev/urandom > {regions}/pm/data && "
                     f"truncate -s 16K {regions}/pm/data"))
    try:
        script = f"od -An -tx8 -N32 {regions}/pm/pagemap"
        theirs = [int(w, 16) for w in ok(as_user(user, script)).split()]
        with open(f"{regions}/pm/pagemap", "rb") as f:
            ours = list(struct.unpack("<4Q", f.read(32)))
        pfn = (1 << 55) - 1
        flags = (1 << 63) | (1 << 56)                                # present, exclusive: no PM_FILE
        assert [e & ~pfn for e in ours] == [flags, flags, 0, 0]     # never touched: 0
        assert any(e & pfn for e in ours[:2])                       # root sees the frames
        assert theirs == [e & ~pfn for e in ours]                   # the user the flags only
    finally:
        ok(as_user(user, f"rmdir {regions}/pm"))


def test_a_user_cannot_exhaust_the_daemon(shared, user):
    regions = f"{shared}/regions"
    # Address space: a user's regions together span at most 64 TiB.
    ok(as_user(user, f"mkdir {regions}/q1 {regions}/q2 && truncate -s 40T {regions}/q1/data"))
    try:
        err = denied(as_user(user, f"truncate -s 40T {regions}/q2/data"))
        assert "quota" in err.lower(), err
        ok(as_user(user, f"truncate -s 24T {regions}/q2/data"))
        # Root is not held to it.
        os.mkdir(f"{regions}/rootbig")
        os.truncate(f"{regions}/rootbig/data", 64 << 40)
        os.rmdir(f"{regions}/rootbig")
    finally:
        ok(as_user(user, f"rmdir {regions}/q1 {regions}/q2"))
    assert shutil.disk_usage(shared).total > 0      # still answering
