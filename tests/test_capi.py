"""The C API (cdmfs.h, libcdmfs.so): a C program built against the installed
header and library with ``cdmfs capi --cflags``/``--libs`` maps a region,
fills a buffer and hands the pointer to a device kernel (tests/c/capi.c); the
test looks at the mount in the middle.  And the same from the Python client."""
from __future__ import annotations

import ctypes
import os
import pwd
import re
import select
import shutil
import subprocess
import sys
import time

import pytest

from cdmfs import client
from cdmfs.fs.daemon import is_mounted
from cdmfs.tools import capi
from conftest import HERE, PAGE

NPAGES = 64


def cdmfs_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cdmfs", *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    """tests/c/capi.c built as a user would: cc ... $(cdmfs capi --cflags) $(cdmfs capi --libs)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    exe = str(tmp_path_factory.mktemp("capi") / "capi")
    cmd = (["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe, os.path.join(HERE, "c", "capi.c")]
           + cdmfs_cli("capi", "--cflags").split() + cdmfs_cli("capi", "--libs").split())
    subprocess.run(cmd, check=True)
    return exe


def read_until(p: subprocess.Popen, marker: str, timeout: float = 60) -> list[str]:
    """The program's lines up to and including the one that starts with marker
    (it then waits for us: nothing follows until we answer)."""
    data = b""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(marker.encode()) for line in data.split(b"\n")):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
            p.kill()
            pytest.fail(f"no {marker!r} from the program; so far: {data.decode()}")
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            pytest.fail(f"the program ended before {marker!r}: {data.decode()} {p.stderr.read().decode()}")
        data += chunk
    return data.decode().splitlines()


def fields(lines: list[str], label: str) -> dict[str, int]:
    """``label key=value ...`` as a dict (values decimal or 0x)."""
    (line,) = [l for l in lines if l.startswith(label + " ")]
    return {k: int(v, 0) for k, v in (w.split("=") for w in line.split()[1:])}


def wheres(lines: list[str], label: str) -> list[str]:
    return [l.split()[1] for l in lines if l.startswith(label + " ")]


def start_seed(prog, m, name, device, *first):
    return subprocess.Popen([prog, "seed", m.path, name, device, str(NPAGES), *first], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)


def finish(p: subprocess.Popen) -> list[str]:
    out, err = p.communicate(b"go\n", timeout=60)
    assert p.returncode == 0, (out, err)
    return out.decode().splitlines()


def test_flags_name_the_installed_header_and_library():
    cflags, libs = cdmfs_cli("capi", "--cflags"), cdmfs_cli("capi", "--libs")
    assert (cflags, libs) == (capi.cflags(), capi.libs())
    assert os.path.isfile(os.path.join(cflags[2:], "cdmfs.h"))
    libdir = libs.split()[0][2:]
    assert os.path.isfile(os.path.join(libdir, "libcdmfs.so")) and libs.endswith(" -lcdmfs")
    assert cdmfs_cli("capi") == f"{cflags} {libs}"
    # cdmfs run says the same, for programs built to run under it.
    assert (cdmfs_cli("run", "--cflags"), cdmfs_cli("run", "--libs")) == (cflags, libs)
    assert cdmfs_cli("capi", "--paths").splitlines() == [capi.header(), capi.library()]
    lib = ctypes.CDLL(capi.library())
    for name in ("cdmfs_device_access", "cdmfs_migrate", "cdmfs_prefetch", "cdmfs_advise", "cdmfs_where",
                 "cdmfs_last_error"):
        assert hasattr(lib, name), name


def test_header_is_clean_c_and_cxx(tmp_path):
    src = tmp_path / "h.c"
    src.write_text("#include <cdmfs.h>\nint main(void) { return CDMFS_TOUCH + CDMFS_WHERE_OTHER - 1; }\n")
    subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-fsyntax-only",
                    capi.cflags(), str(src)], check=True)
    if shutil.which("c++"):
        subprocess.run(["c++", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-x", "c++", capi.cflags(), str(src)],
                       check=True)


def test_seed_scenario_on_gpu0(mnt, prog):
    """malloc-and-fill, a kernel on gpu0 (the pages migrate into its private
    memory), the results read back on the CPU (the pages fault back)."""
    gpu = mnt.device("gpu0")
    before = gpu.stat
    p = start_seed(prog, mnt, "seed-gpu", "gpu0")
    out = read_until(p, "kernel-done")
    try:
        assert wheres(out, "untouched") == ["none"] and wheres(out, "filled") == ["node:0"]
        k = fields(out, "kernel")
        assert (k["bytes"], k["migrated"], k["local_bytes"], k["remote_bytes"]) == (NPAGES * PAGE, NPAGES, NPAGES * PAGE, 0)
        assert k["faults"] >= 1 and k["modeled_ns"] > 0
        assert wheres(out, "after-kernel") == ["gpu0"] and wheres(out, "after-kernel-last") == ["gpu0"]
        # While the program waits: every page in gpu0's private memory, as the mount shows it.
        r = mnt.region("seed-gpu")
        (line,) = r.numa_maps
        assert line["private"] == {"gpu0": NPAGES} and line["nodes"] == {}
        assert r.stat["private:gpu0"] == NPAGES and r.stat["N0"] == 0
        start, end = gpu.resource
        for entry in r.pagemap():
            assert entry & client.PM_SWAP and not entry & client.PM_PRESENT
            assert client.pagemap_swap_type(entry) == client.SWP_DEVICE_WRITE
            assert start <= client.pagemap_pfn(entry) * PAGE <= end
        after = gpu.stat
        assert after["migrated_to"] - before["migrated_to"] == NPAGES
        assert after["local_bytes"] - before["local_bytes"] == NPAGES * PAGE
        assert r.where(0) == "gpu0"
    except BaseException:
        p.kill()
        raise
    out = finish(p)
    assert f"verified 0 of {NPAGES * PAGE // 8} words wrong" in out
    assert wheres(out, "after-cpu") == ["node:0"]
    read = fields(out, "read")
    assert read["bytes"] == NPAGES * PAGE       # the program checked its crc32 against its own
    st = r.stat
    assert st["cpu_faults"] >= 1 and st["migrated_pages"] >= 2 * NPAGES
    os.rmdir(r.path)


def test_seed_scenario_on_cdm0(mnt, prog):
    """The same on the coherent device: migrated to its node first, the kernel
    runs on its own memory (no migration), the CPU reads it where it lies."""
    cdm = mnt.device("cdm0")
    before = cdm.stat
    p = start_seed(prog, mnt, "seed-cdm", "cdm0", "cdm0")
    out = read_until(p, "kernel-done")
    try:
        assert fields(out, "migrated") == {"requested": NPAGES, "migrated": NPAGES, "skipped": 0}
        assert wheres(out, "moved") == ["node:1"]
        k = fields(out, "kernel")
        assert (k["bytes"], k["migrated"], k["local_bytes"], k["remote_bytes"]) == (NPAGES * PAGE, 0, NPAGES * PAGE, 0)
        assert wheres(out, "after-kernel") == ["node:1"]
        r = mnt.region("seed-cdm")
        (line,) = r.numa_maps
        assert line["nodes"] == {1: NPAGES} and line["private"] == {}
        blocks = set(mnt.node(1).memory_blocks)
        for entry in r.pagemap():
            assert entry & client.PM_PRESENT
            assert client.pagemap_pfn(entry) * PAGE // mnt.block_size in blocks
        assert cdm.stat["local_bytes"] - before["local_bytes"] == NPAGES * PAGE
        # the program's migration moved them in; the kernel moved none
        assert cdm.stat["migrated_to"] - before["migrated_to"] == NPAGES
    except BaseException:
        p.kill()
        raise
    migrated = r.stat["migrated_pages"]
    out = finish(p)
    assert f"verified 0 of {NPAGES * PAGE // 8} words wrong" in out
    # The CPU maps coherent memory: it read every page in place, none moved.
    assert wheres(out, "after-cpu") == ["node:1"]
    assert r.stat["N1"] == NPAGES and r.stat["migrated_pages"] == migrated
    os.rmdir(r.path)


def test_a_range_over_two_regions_is_split(mnt, prog):
    done = subprocess.run([prog, "split", mnt.path, "split-a", "split-b"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr)
    out = done.stdout.splitlines()
    assert fields(out, "read")["bytes"] == 10 * PAGE      # and its crc32 is the CPU's (checked by the program)
    assert fields(out, "migrated") == {"requested": 16, "migrated": 16, "skipped": 0}
    assert wheres(out, "page") == ["gpu0"] * 4
    # the pinned page of each region stays; the rest moves
    assert fields(out, "to-cpu") == {"requested": 16, "migrated": 14, "skipped": 2}
    assert fields(out, "pinned") == {"requested": 16, "migrated": 14, "skipped": 2}
    assert wheres(out, "pinned-page") == ["node:0", "node:0"]
    assert wheres(out, "prefetched") == ["node:1", "node:1"]
    for name in ("split-a", "split-b"):
        r = mnt.region(name)
        assert r.stat["N1"] == 8 and r.stat["pinned"] == 0
        os.rmdir(r.path)


def test_errors(mnt, prog):
    done = subprocess.run([prog, "errors", mnt.path, "errs"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.stdout, done.stderr)
    got = dict(line.split("=") for line in done.stdout.splitlines())
    assert got == {
        "heap": "EFAULT",               # a pointer outside any region
        "heap_migrate": "EFAULT",
        "heap_where": "EFAULT",
        "null": "EFAULT",
        "past_end": "EFAULT",           # the range runs past the region's mapping
        "wraps": "EFAULT",
        "unknown_device": "ENODEV",
        "device_path": "ENODEV",
        "bad_op": "EINVAL",
        "negative_op": "EINVAL",
        "unaligned": "EINVAL",          # a device works on whole pages
        "bad_byte": "EINVAL",           # as devices/gpu0/access answers it
        "bad_target": "EINVAL",         # as regions/NAME/migrate answers it
        "space_target": "EINVAL",
        "bad_advice": "EINVAL",
        "small_buffer": "ERANGE",
        "zero_length": "ok",
        "where_null_buffer": "ok",
        "map_private": "EFAULT",        # a private copy is not the region's memory
        "ok": "ok",
    }
    os.rmdir(mnt.region("errs").path)


def test_offline_device_is_enodev(mnt, prog):
    gpu = mnt.device("gpu0")
    gpu.online = False
    try:
        p = start_seed(prog, mnt, "offline", "gpu0")
        out, err = p.communicate(b"go\n", timeout=60)
        assert p.returncode == 2 and b"cdmfs_device_access add: No such device" in err, (out, err)
    finally:
        gpu.online = True
    os.rmdir(mnt.region("offline").path)


def test_python_client_offers_the_same(mnt):
    r = mnt.region("py", 16 * PAGE)
    with r.mmap() as mm:
        mm[:] = bytes(range(256)) * (16 * PAGE // 256)
        assert r.where(0) == "node:0"
        res = mnt.device("gpu0").access("add", "py", 0, 16 * PAGE, 1)
        assert res["status"] == "ok" and res["migrated"] == 16
        assert [r.where(i * PAGE) for i in (0, 15)] == ["gpu0", "gpu0"]
        assert mm[8] == 9                          # the CPU faults it back
        assert r.where(0) == "node:0"
        r.prefetch(0, 16 * PAGE, "cdm0")
        r.wait_prefetch()
        assert r.where(5 * PAGE) == "node:1"
        assert r.migrate(0, 16 * PAGE, "cpu")["migrated"] == 16
        assert r.where(15 * PAGE) == "node:0"
        r.pin(0, PAGE)
        assert r.migrate(0, 2 * PAGE, "gpu0")["skipped"] == 1
        assert (r.where(0), r.where(PAGE)) == ("node:0", "gpu0")
        r.unpin(0, PAGE)
    with pytest.raises(ValueError):
        r.where(16 * PAGE)
    os.truncate(r.data, 17 * PAGE)
    assert r.where(16 * PAGE) == "none"
    r.remove()


def test_python_where_without_privilege(mnt, monkeypatch):
    """Without root, pagemap has no frames: the answer comes from numa_maps."""
    r = mnt.region("unpriv", 4 * PAGE)
    with open(r.data, "r+b") as f:
        f.write(b"x" * 4 * PAGE)
    r.migrate(2 * PAGE, PAGE, "gpu0")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert r.where(2 * PAGE) == "gpu0"
    assert r.where(0) == "node:0"
    r.migrate(0, PAGE, "cdm0")
    with pytest.raises(PermissionError):
        r.where(0)                                 # node 0 and node 1 in one policy range
    monkeypatch.undo()
    assert r.where(0) == "node:1"
    r.remove()


USER = "cdmfs-test"


def test_where_without_privilege(prog, tmp_path_factory):
    """Another user of a shared mount sees no frames in pagemap: cdmfs_where
    answers from numa_maps while the page's range is in one place."""
    if os.getuid() != 0:
        pytest.skip("needs root: a test user and a shared mount")
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
        user = pwd.getpwnam(USER)
    top = tmp_path_factory.mktemp("capi-shared")
    mp = top / "mnt"
    mp.mkdir()
    for d in (top, top.parent, top.parent.parent):
        os.chmod(d, os.stat(d).st_mode | 0o011)
    exe = top / "capi"
    shutil.copy(prog, exe)
    os.chmod(exe, 0o755)
    subprocess.run([sys.executable, "-m", "cdmfs", "mount", str(mp), "--allow-other"], check=True, capture_output=True)
    try:
        def drop():
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        done = subprocess.run([str(exe), "unpriv", str(mp), "mine"], capture_output=True, text=True,
                              preexec_fn=drop, timeout=60, cwd="/")
        assert done.returncode == 0, (done.stdout, done.stderr)
        out = done.stdout.splitlines()
        assert wheres(out, "gpu-page") == ["gpu0"] and wheres(out, "cpu-page") == ["node:0"]
        assert "mixed=EACCES" in out            # node 0 and node 1 in one policy range
        os.rmdir(mp / "regions" / "mine")
    finally:
        subprocess.run([sys.executable, "-m", "cdmfs", "umount", str(mp)], capture_output=True)
    assert not is_mounted(str(mp))


def test_readme_c_example_runs(mnt, tmp_path):
    """The README's C program builds with its compile line and does what it prints."""
    with open(os.path.join(HERE, "..", "README.md")) as f:
        text = f.read()
    section = text[text.index("## Devices from a C program"):]
    src = tmp_path / "seed.c"
    src.write_text(re.search(r"```c\n(.*?)```", section, re.S).group(1))
    compile_line = re.search(r"```sh\n(cc .*?)\n```", section).group(1)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run(compile_line, shell=True, check=True, cwd=tmp_path, env=env)
    done = subprocess.run([str(tmp_path / "seed"), mnt.path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "4096 pages migrated, page 0 in gpu0\npage 0 back in node:0\n"
    mnt.region("seed").remove()
