"""File metadata as tmpfs keeps it (issue: fidelity): times that move on
truncate, utimensat and on the parent at mkdir/rmdir/rename (not on a
write: see Filesystem.write);
consistent statfs; sysfs's directory link counts; regions renamed within
regions/ and nothing else renamed; st_blocks by the pages placed."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

import cdmfs

from conftest import PAGE


def times(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def later(path: str, before: tuple[int, int, int]) -> tuple[bool, bool, bool]:
    return tuple(a > b for a, b in zip(times(path), before))


def test_times_move_as_tmpfs_moves_them(mnt):
    regs = os.path.join(mnt.path, "regions")
    before = times(regs)
    r = mnt.region("times", 16 * PAGE)
    assert later(regs, before)[1:] == (True, True)          # mkdir: parent mtime, ctime
    t = times(r.data)
    os.truncate(r.data, 8 * PAGE)
    assert later(r.data, t)[1:] == (True, True)             # truncate
    # touch -d sets atime and mtime to the date given, ctime to now; make is not fooled.
    subprocess.run(["touch", "-d", "2001-02-03 04:05:06 UTC", r.data], check=True)
    st = os.stat(r.data)
    assert st.st_mtime == st.st_atime == 981173106
    assert st.st_ctime > 981173106
    newer = subprocess.run(["find", r.path, "-newer", r.data, "-name", "data"],
                           capture_output=True, text=True, check=True).stdout
    assert newer == ""
    os.utime(r.data, ns=(5 * 10**9, 7 * 10**9))
    assert times(r.data)[:2] == (5 * 10**9, 7 * 10**9)
    before = times(regs)
    r.remove()
    assert later(regs, before)[1:] == (True, True)          # rmdir: the parent again


def test_statfs_counts_inodes_consistently(mnt):
    st = os.statvfs(mnt.path)
    assert 0 < st.f_ffree < st.f_files
    out = subprocess.run(["df", "-i", mnt.path], capture_output=True, text=True, check=True).stdout
    total, used, free = (int(x) for x in out.splitlines()[1].split()[1:4])
    assert used > 0 and used + free == total
    r = mnt.region("inodes", PAGE)
    assert os.statvfs(mnt.path).f_ffree < st.f_ffree        # the region's files took inodes
    r.remove()


def test_directory_link_counts_as_sysfs(mnt):
    """2 + the subdirectories, as kernfs counts; files have one link."""
    for rel in ("", "sys", "sys/devices/system/node", "sys/devices/system/node/node0",
                "sys/devices/system/memory", "sys/devices/system/cpu", "regions", "devices"):
        path = os.path.join(mnt.path, rel)
        subdirs = sum(e.is_dir(follow_symlinks=False) for e in os.scandir(path))
        assert os.stat(path).st_nlink == 2 + subdirs, rel
    assert os.stat(os.path.join(mnt.path, "sys/devices/system/node/online")).st_nlink == 1
    host = "/sys/devices/system/node"
    if os.path.isdir(host):
        subdirs = sum(e.is_dir(follow_symlinks=False) for e in os.scandir(host))
        assert os.stat(host).st_nlink == 2 + subdirs     # the rule holds on the host too


def test_rename_a_region(mnt):
    regs = os.path.join(mnt.path, "regions")
    r = mnt.region("old", 4 * PAGE)
    with open(r.data, "r+b") as f:
        f.write(b"kept")
    other = mnt.region("other", PAGE)
    os.rename(os.path.join(regs, "old"), os.path.join(regs, "new"))
    assert sorted(os.listdir(regs)) == ["new", "other"]
    with open(os.path.join(regs, "new", "data"), "rb") as f:
        assert f.read(4) == b"kept"
    # Device requests use the new name; the old one is gone.
    dev = mnt.device("gpu0")
    assert dev.access("read", "new", 0, PAGE)["status"] == "ok"
    with pytest.raises(OSError) as e:
        dev.access("read", "old", 0, PAGE)
    assert e.value.errno == errno.ENOENT
    # Onto another region (never an empty directory), out of regions/, inside sys/.
    cases = [(os.path.join(regs, "new"), os.path.join(regs, "other"), errno.ENOTEMPTY),
             (os.path.join(regs, "new"), os.path.join(mnt.path, "devices", "x"), errno.EXDEV),
             (os.path.join(mnt.path, "sys/kernel"), os.path.join(mnt.path, "sys/k"), errno.EPERM),
             (os.path.join(regs, "new"), os.path.join(regs, "bad name!"), errno.EINVAL)]
    for src, dst, err in cases:
        with pytest.raises(OSError) as e:
            os.rename(src, dst)
        assert e.value.errno == err, (src, dst)
    assert sorted(os.listdir(regs)) == ["new", "other"]
    mnt.region("new").remove()
    other.remove()
def test_st_blocks_counts_the_pages_placed(mnt):
    """du and ls -s see the pages placed, not the size, as on tmpfs."""
    r = mnt.region("du", 1 << 30)
    assert os.stat(r.data).st_blocks == 0
    with open(r.data, "r+b") as f:
        f.seek(100 * PAGE)
        f.write(b"y" * 3 * PAGE)
    assert os.stat(r.data).st_blocks == 3 * PAGE // 512
    du = subprocess.run(["du", "-k", r.data], capture_output=True, text=True, check=True).stdout
    assert du.split()[0] == "12"
    r.migrate(100 * PAGE, 2 * PAGE, "gpu0")                 # device memory counts too
    assert os.stat(r.data).st_blocks == 3 * PAGE // 512
    r.remove()


def test_st_blocks_after_a_program_wrote_through_mmap(mnt, cprog):
    """Pages a program placed by faults count once it has unmapped them."""
    pattern = cprog("pattern")
    r = mnt.region("dumap", 64 * PAGE)
    assert subprocess.run([pattern, "write", r.data, "64", "3", "20"]).returncode == 0
    assert os.stat(r.data).st_blocks == 20 * PAGE // 512
    r.remove()
