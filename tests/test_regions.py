"""Regions through a real mount: C programs map them, shell and Python read them."""
from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest

from cdmfs.tools.bench import TIB_CONFIG
from cdmfs.fs.daemon import daemon_rss
from conftest import PAGE, xorshift_page, used_kb


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def test_random_pattern_survives_unmap_and_is_shared(mnt, cprog):
    pattern = cprog("pattern")
    r = mnt.region("pat", 1024 * PAGE)
    # One process writes 300 random pages through its mapping and unmaps.
    w = run(pattern, "write", r.data, 1024, 7, 300)
    assert w.returncode == 0, w.stderr
    # Another process maps again: exactly those pages hold the pattern, the rest zeros.
    v = run(pattern, "verify", r.data, 1024, 7, 300)
    assert v.returncode == 0, v.stderr
    # A different seed's pattern is not there: the check can fail.
    assert run(pattern, "verify", r.data, 1024, 8, 300).returncode == 2
    # pread sees the same bytes as the mappings.
    with open(r.data, "rb") as f:
        data = f.read()
    written = [p for p in range(1024) if data[p * PAGE:(p + 1) * PAGE] != bytes(PAGE)]
    assert len(written) == 300
    for p in written[:20]:
        assert data[p * PAGE:(p + 1) * PAGE] == xorshift_page(7, p)
    r.remove()


def test_second_process_sees_mapping_writes(mnt):
    r = mnt.region("shared", 16 * PAGE)
    m = r.mmap()
    m[5 * PAGE:5 * PAGE + 11] = b"hello world"
    m.flush()
    # Another process, through the page cache it shares with us.
    out = run("dd", f"if={r.data}", "bs=4096", "skip=5", "count=1", "status=none")
    assert out.stdout.startswith("hello world")
    # And the other direction: a write() is visible in our mapping.
    with open(r.data, "r+b") as f:
        f.seek(9 * PAGE)
        f.write(b"from write")
    assert m[9 * PAGE:9 * PAGE + 10] == b"from write"
    m.close()
    r.remove()


def test_memused_grows_by_pages_touched_and_rmdir_returns_it(mnt, cprog):
    pattern = cprog("pattern")
    before0, before1 = used_kb(mnt, 0), used_kb(mnt, 1)
    r = mnt.region("count", 4096 * PAGE)
    assert used_kb(mnt, 0) == before0   # truncate alone allocates nothing
    # 1000 random pages, one fault each (MADV_RANDOM): exactly 1000 pages on node 0.
    assert run(pattern, "write", r.data, 4096, 3, 1000).returncode == 0
    assert used_kb(mnt, 0) - before0 == 1000 * PAGE // 1024
    assert used_kb(mnt, 1) == before1
    st = r.stat
    assert (st["N0"], st["N1"], st["private:gpu0"]) == (1000, 0, 0)
    assert st["size"] == 4096 * PAGE and st["pages"] == 4096
    assert mnt.node(0).meminfo["AnonPages"] >= 1000 * 4
    r.remove()
    assert used_kb(mnt, 0) == before0
    assert used_kb(mnt, 1) == before1


def test_numastat_and_vmstat_count_first_touch(mnt, cprog):
    pattern = cprog("pattern")
    hit0 = mnt.node(0).numastat
    vm0 = mnt.node(0).vmstat
    r = mnt.region("stats", 256 * PAGE)
    assert run(pattern, "write", r.data, 256, 1, 100).returncode == 0
    hit1 = mnt.node(0).numastat
    vm1 = mnt.node(0).vmstat
    # The default policy from a CPU of node 0: every page a local hit.
    assert hit1["numa_hit"] - hit0["numa_hit"] == 100
    assert hit1["local_node"] - hit0["local_node"] == 100
    assert hit1["numa_miss"] == hit0["numa_miss"]
    assert hit1["other_node"] == hit0["other_node"]
    assert vm1["numa_hit"] - vm0["numa_hit"] == 100
    assert vm1["nr_anon_pages"] - vm0["nr_anon_pages"] == 100
    assert vm1["nr_free_pages"] == vm0["nr_free_pages"] - 100
    assert mnt.node(1).numastat["numa_hit"] == 0
    r.remove()


def test_truncate_shrinks_frees_and_grows_with_zeros(mnt):
    r = mnt.region("trunc", 64 * PAGE)
    with open(r.data, "r+b") as f:
        f.write(b"\xaa" * (64 * PAGE))
    assert r.stat["N0"] == 64
    r.truncate(10 * PAGE + 100)
    assert r.stat["N0"] == 11 and r.stat["pages"] == 11
    r.truncate(64 * PAGE)
    with open(r.data, "rb") as f:
        data = f.read()
    assert data[:10 * PAGE + 100] == b"\xaa" * (10 * PAGE + 100)
    assert data[10 * PAGE + 100:] == bytes(54 * PAGE - 100)
    r.remove()


def test_shell_session(mnt):
    """What the README shows: mkdir, truncate, echo into data, cat it back."""
    base = os.path.join(mnt.path, "regions", "sh")
    out = run("sh", "-c", f"mkdir {base} && truncate -s 1M {base}/data && "
                          f"printf hello > {base}/data && head -c 5 {base}/data && "
                          f"cat {base}/policy && grep N0 {base}/stat && rmdir {base}")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hellodefault\nN0 1\n"


def test_bad_region_names(mnt):
    for name in ("a" * 65, "bad name", "sp*ce", "ünï"):
        with pytest.raises(OSError) as e:
            os.mkdir(os.path.join(mnt.path, "regions", name))
        assert e.value.errno == errno.EINVAL
    os.mkdir(os.path.join(mnt.path, "regions", "dup"))
    with pytest.raises(FileExistsError):
        os.mkdir(os.path.join(mnt.path, "regions", "dup"))
    os.rmdir(os.path.join(mnt.path, "regions", "dup"))
    # Regions live under regions/ only.
    with pytest.raises(OSError):
        os.mkdir(os.path.join(mnt.path, "sys", "x"))
    assert sorted(os.listdir(mnt.path)) == ["devices", "proc", "regions", "sys"]


def test_rmdir_busy_while_open_or_mapped(mnt):
    r = mnt.region("busy", 4 * PAGE)
    f = open(r.data, "rb")
    with pytest.raises(OSError) as e:
        r.remove()
    assert e.value.errno == errno.EBUSY
    m = r.mmap()
    f.close()
    with pytest.raises(OSError) as e:
        r.remove()   # still mapped
    assert e.value.errno == errno.EBUSY
    m.close()
    r.remove()
    assert "busy" not in mnt.regions


def test_policy_file(mnt):
    r = mnt.region("pol", PAGE)
    assert r.policy == "default"
    r.policy = "local"
    assert r.policy == "local"
    for bad in ("nonsense", "bind:", "bind:7", "local:0", "interleave:0-x"):
        fd = os.open(os.path.join(r.path, "policy"), os.O_WRONLY)
        with pytest.raises(OSError) as e:
            os.write(fd, bad.encode() + b"\n")
        os.close(fd)
        assert e.value.errno == errno.EINVAL, bad
        assert r.policy == "local"
    # A read-only file refuses writes, even for root.
    with pytest.raises(PermissionError):
        open(os.path.join(r.path, "stat"), "w")
    r.remove()


def test_node0_full_sigbus_enospc_never_cdm(small, cprog):
    """Default policy with node 0 full: faults die with SIGBUS, write() gets
    ENOSPC, node 1 (isolated CDM) receives nothing, the mount keeps serving."""
    pattern = cprog("pattern")
    total = small.node(0).meminfo["MemTotal"] // 4        # pages of node 0
    r = small.region("fill", 2 * total * PAGE)
    out = run(pattern, "touch", r.data, 2 * total)
    assert out.returncode == -signal.SIGBUS
    assert small.node(0).meminfo["MemFree"] == 0
    assert small.node(1).meminfo["MemUsed"] == 0
    assert r.stat["N0"] == total and r.stat["N1"] == 0
    fd = os.open(r.data, os.O_RDWR)
    with pytest.raises(OSError) as e:
        os.pwrite(fd, b"x" * PAGE, (2 * total - 1) * PAGE)
    os.close(fd)
    assert e.value.errno == errno.ENOSPC
    assert small.node(1).meminfo["MemUsed"] == 0
    r.remove()
    # Healthy afterwards: memory back, new regions work.
    assert small.node(0).meminfo["MemUsed"] == 0
    r2 = small.region("after", 8 * PAGE)
    assert run(pattern, "write", r2.data, 8, 5, 8).returncode == 0
    assert run(pattern, "verify", r2.data, 8, 5, 8).returncode == 0
    r2.remove()


def daemon_rss_kb(mountpoint: str) -> int:
    return daemon_rss(mountpoint) // 1024


def test_terabyte_cdm_node_costs_only_touched_pages(cprog):
    import cdmfs
    pattern = cprog("pattern")
    with cdmfs.mounted(TIB_CONFIG) as m:
        assert m.node(1).meminfo["MemTotal"] == 1 << 30       # kB: 1 TiB
        rss0 = daemon_rss_kb(m.path)
        r = m.region("big", 8192 * PAGE)
        r.policy = "bind:1"
        assert run(pattern, "write", r.data, 8192, 2, 8192).returncode == 0
        assert r.stat["N1"] == 8192
        grown = daemon_rss_kb(m.path) - rss0
        # 32 MiB of data on a 1 TiB node: the daemon grows by about that, not by the node.
        assert 8192 * 4 <= grown < 8192 * 4 + 64 * 1024, grown
        assert run(pattern, "verify", r.data, 8192, 2, 8192).returncode == 0
        r.remove()
