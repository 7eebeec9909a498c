"""``cdmfs bench``: figures measured in one run beside in-run references (SPEC §9).

Every row is a median of repetitions with min and max, and a ratio to a
reference measured on this machine in the same run (tmpfs, memcpy, the host's
sysfs), never an absolute target.  The CPU side is a C driver, so the figures
measure the filesystem rather than a Python loop.  Two more references show
where the floor is: bindfs (a C FUSE filesystem) and cdmfs.tools.benchfloor (pyfuse3
on trio answering and doing nothing else), for the rows a FUSE round trip
bounds.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from ..client import Mount, mounted
from ..fs import router
from ..fs.daemon import daemon_rss

HERE = os.path.dirname(os.path.abspath(__file__))
# The C workload programs live beside the package, in the source tree's native/.
DRIVERS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "native", "drivers")
PAGE = 4096
FLOOR = "pyfuse3 floor"      # the reference filesystem of cdmfs.tools.benchfloor
ROUTER_DEFAULTS = "router defaults"   # the random first touch row, for the router's other settings
MB = 1 << 20


@dataclass
class Row:
    name: str
    unit: str
    values: list[float]
    ref_name: str
    ref_values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def ref(self) -> float:
        return statistics.median(self.ref_values)

    @property
    def ratio(self) -> float:
        return self.median / self.ref if self.ref else float("nan")


def progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()


def build_driver(name: str, out_dir: str) -> str:
    exe = os.path.join(out_dir, name)
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(DRIVERS, f"{name}.c")], check=True)
    return exe


def first_touch(driver: str, path: str, size: int, mode: str) -> float:
    """Pages per second of the C driver on a fresh file of size bytes."""
    with open(path, "ab") as f:
        f.truncate(size)
    out = subprocess.run([driver, path, str(size), mode], capture_output=True, text=True, check=True)
    pages, seconds = out.stdout.split()
    return int(pages) / float(seconds)


def re_fault(driver: str, path: str, size: int) -> float:
    """Pages per second of random faults on pages already placed: the file
    is written, its page cache dropped, then every page faulted again."""
    with open(path, "wb") as f:
        chunk = b"\1" * (4 * MB)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    out = subprocess.run([driver, path, str(size), "random"], capture_output=True, text=True, check=True)
    pages, seconds = out.stdout.split()
    return int(pages) / float(seconds)


def control_latency(m: Mount, n: int = 200) -> float:
    """Median seconds of one Python-served control request: a ``migrate``
    transaction of one page (open, write, read, release), to gpu0 and back."""
    r = m.region("bench-ctl", PAGE)
    try:
        with open(r.data, "r+b") as f:
            f.write(b"\1" * PAGE)
        xs = []
        for i in range(n):
            t = time.perf_counter()
            r.migrate(0, PAGE, "gpu0" if i % 2 == 0 else "node:0")
            xs.append(time.perf_counter() - t)
        return statistics.median(xs)
    finally:
        r.remove()


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """os.environ with values set (the daemon a mount starts inherits them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tracing(m: Mount) -> Iterator[None]:
    """Every trace event on, and a reader (``cat trace_pipe``) taking the lines."""
    events = os.path.join(m.path, "sys/kernel/tracing/events/enable")
    with open(events, "w") as f:
        f.write("1")
    reader = subprocess.Popen(["cat", os.path.join(m.path, "sys/kernel/tracing/trace_pipe")],
                              stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        reader.terminate()
        reader.wait()
        with open(events, "w") as f:
            f.write("0")


def memcpy_rate(nbytes: int) -> float:
    """Bytes per second of memcpy between two buffers in this process."""
    a = ctypes.create_string_buffer(nbytes)
    b = ctypes.create_string_buffer(nbytes)
    ctypes.memmove(b, a, nbytes)          # fault both in first
    t = time.perf_counter()
    ctypes.memmove(b, a, nbytes)
    return nbytes / (time.perf_counter() - t)


def read_latency(path: str, n: int = 300) -> float:
    """Median seconds of open + read + close of a small file."""
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(65536):
                pass
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


def migrate_rate(m: Mount, mapped_dirty: bool, size: int, request: int) -> float:
    """Bytes per second of migrating a region sysram -> gpu0, one ``migrate``
    request per ``request`` bytes (the daemon moves 2 MiB batches either way)."""
    r = m.region("bench-mig", size)
    try:
        if mapped_dirty:
            mm = r.mmap()
            for off in range(0, size, PAGE):
                mm[off] = 1                     # dirty, never synced
        else:
            with open(r.data, "r+b") as f:
                f.write(b"\1" * size)
            # As memcpy_rate faults both buffers in first: one round trip to
            # gpu0 backs both sides with host memory, and leaves the pages on
            # node 0 and out of the page cache.
            r.migrate(0, size, "gpu0")
            r.migrate(0, size, "node:0")
        t = time.perf_counter()
        for off in range(0, size, request):
            res = r.migrate(off, request, "gpu0")
            assert res["migrated"] == request // PAGE, res
        rate = size / (time.perf_counter() - t)
        if mapped_dirty:
            mm.close()
        return rate
    finally:
        r.truncate(0)
        r.remove()


def device_read_rate(m: Mount, size: int) -> float:
    """Bytes per second of gpu0 reading a range already in its own memory."""
    r = m.region("bench-dev", size)
    try:
        r.migrate(0, size, "gpu0")
        gpu = m.device("gpu0")
        gpu.access("read", "bench-dev", 0, size)           # mapped in the device now
        t = time.perf_counter()
        res = gpu.access("read", "bench-dev", 0, size)
        rate = size / (time.perf_counter() - t)
        assert res["faults"] == 0 and res["local_bytes"] == size, res
        return rate
    finally:
        r.remove()


TIB_CONFIG = """
[[node]]
id = 0
kind = "sysram"
size = "2G"
cpus = "all"
[[node]]
id = 1
kind = "cdm"
size = "1T"
[[device]]
name = "cdm0"
memory = "node:1"
"""


# Two system RAM nodes, the CPUs on node 0: NUMA balancing has somewhere to
# move pages, so its scanner runs (issue balancing).
BALANCING_CONFIG = """
[[node]]
id = 0
kind = "sysram"
size = "{size}"
cpus = "all"
[[node]]
id = 1
kind = "sysram"
size = "{size}"
"""


def balancing_cost(driver: str, touch_size: int, reps: int) -> tuple[list[float], list[float]]:
    """Random first touches on a two-node machine with NUMA balancing on
    (the kernel's default tunables) and off, alternating in one mount."""
    on: list[float] = []
    off: list[float] = []
    ctl = "proc/sys/kernel/numa_balancing"
    with mounted(BALANCING_CONFIG.format(size=f"{2 * touch_size // MB}M")) as m:
        for i in range(reps):
            for mode, out in (("1", on), ("0", off)):
                progress(f"first touch, NUMA balancing {'on' if mode == '1' else 'off'} {i + 1}/{reps}")
                with open(os.path.join(m.path, ctl), "w") as f:
                    f.write(mode)
                r = m.region("bench-balancing")
                try:
                    # Long enough for the scanner (delay 1 s, then a period of 1 s).
                    out.append(first_touch(driver, r.data, touch_size, "random"))
                finally:
                    r.remove()
    return on, off


def rss_per_touched(size: int) -> tuple[float, float]:
    """(daemon RSS growth, bytes touched) after touching size bytes on a 1 TiB CDM node."""
    with mounted(TIB_CONFIG) as m:
        before = daemon_rss(m.path)
        r = m.region("bench-rss", size)
        r.policy = "bind:1"
        chunk = b"\1" * (4 * MB)
        with open(r.data, "r+b") as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
        grown = daemon_rss(m.path) - before
        r.remove()
    return grown, size


def bindfs_mount(src: str, dst: str) -> bool:
    if shutil.which("bindfs") is None:
        return False
    return subprocess.run(["bindfs", src, dst], stderr=subprocess.DEVNULL).returncode == 0


def floor_mount(mountpoint: str, size: int) -> Optional[subprocess.Popen]:
    """Mounts cdmfs.tools.benchfloor (pyfuse3 answering, doing nothing else) there."""
    proc = subprocess.Popen([sys.executable, "-m", "cdmfs.tools.benchfloor", mountpoint, str(size)],
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.ismount(mountpoint):
            return proc
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    proc.kill()
    return None


def fault_back_rate(m: Mount, driver: str, size: int) -> float:
    r = m.region("bench-fb", size)
    try:
        r.migrate(0, size, "gpu0")               # allocated directly in gpu0
        out = subprocess.run([driver, r.data, str(size), "random"], capture_output=True, text=True, check=True)
        pages, seconds = out.stdout.split()
        return int(pages) / float(seconds)
    finally:
        r.remove()


def run(quick: bool = False, json_path: Optional[str] = None) -> list[Row]:
    reps = 3 if quick else 5
    touch_size = (64 if quick else 256) * MB
    mig_size = 64 * MB
    rows: list[Row] = []
    work = tempfile.mkdtemp(prefix="cdmfs-bench-")
    tmpfs = os.path.join(work, "tmpfs")
    bindfs = os.path.join(work, "bindfs")
    floor = os.path.join(work, "floor")
    for d in (tmpfs, bindfs, floor):
        os.mkdir(d)
    floor_proc = None
    try:
        driver = build_driver("firsttouch", work)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={touch_size + 16 * MB}", "tmpfs", tmpfs], check=True)
        with mounted() as m:
            def reps_of(label: str, fn: Callable[[], float]) -> list[float]:
                out = []
                for i in range(reps):
                    progress(f"{label} {i + 1}/{reps}")
                    out.append(fn())
                return out

            def on_region(mode: str) -> Callable[[], float]:
                def go() -> float:
                    r = m.region("bench-touch")
                    try:
                        return first_touch(driver, r.data, touch_size, mode)
                    finally:
                        r.remove()
                return go

            def on_folder(folder: str, mode: str) -> Callable[[], float]:
                def go() -> float:
                    path = os.path.join(folder, "f")
                    try:
                        return first_touch(driver, path, touch_size, mode)
                    finally:
                        os.unlink(path)
                return go

            def on_floor(mode: str) -> Callable[[], float]:
                runs = iter(range(1 << 30))
                def go() -> float:
                    return first_touch(driver, os.path.join(floor, f"d{next(runs)}"), touch_size, mode)
                return go

            have_bindfs = bindfs_mount(tmpfs, bindfs)
            floor_proc = floor_mount(floor, touch_size)
            random_ref = reps_of("tmpfs random first touch", on_folder(tmpfs, "random"))
            random = reps_of("cdmfs random first touch", on_region("random"))
            label = f"CPU first touch, random 4 KiB, {touch_size // MB} MiB"
            rows.append(Row(label, "faults/s", random, "tmpfs", random_ref))
            if have_bindfs:
                rows.append(Row(label, "faults/s", random, "bindfs",
                                reps_of("bindfs random first touch", on_folder(bindfs, "random"))))
            if floor_proc:
                rows.append(Row(label, "faults/s", random, FLOOR,
                                reps_of("pyfuse3 floor random first touch", on_floor("random"))))
            seq_ref = [x * PAGE / MB for x in reps_of("tmpfs sequential first touch", on_folder(tmpfs, "seq"))]
            seq = [x * PAGE / MB for x in reps_of("cdmfs sequential first touch", on_region("seq"))]
            label = f"CPU first touch, sequential, {touch_size // MB} MiB"
            rows.append(Row(label, "MB/s", seq, "tmpfs", seq_ref))
            if have_bindfs:
                rows.append(Row(label, "MB/s", seq, "bindfs",
                                [x * PAGE / MB for x in reps_of("bindfs sequential", on_folder(bindfs, "seq"))]))
            if floor_proc:
                rows.append(Row(label, "MB/s", seq, FLOOR,
                                [x * PAGE / MB for x in reps_of("pyfuse3 floor sequential", on_floor("seq"))]))
            label = f"CPU re-fault of placed pages, random 4 KiB, {touch_size // MB} MiB"
            def refault_region() -> float:
                r = m.region("bench-refault")
                try:
                    return re_fault(driver, r.data, touch_size)
                finally:
                    r.remove()
            refault = reps_of("cdmfs re-fault", refault_region)
            if have_bindfs:
                def refault_bindfs() -> float:
                    path = os.path.join(bindfs, "f")
                    try:
                        return re_fault(driver, path, touch_size)
                    finally:
                        os.unlink(path)
                rows.append(Row(label, "faults/s", refault, "bindfs", reps_of("bindfs re-fault", refault_bindfs)))
            with tracing(m):
                traced = reps_of("cdmfs random first touch, tracing on", on_region("random"))
            rows.append(Row(f"CPU first touch, random 4 KiB, {touch_size // MB} MiB, every trace event on",
                            "faults/s", traced, "tracing off", random))
            fb = reps_of("fault-back from gpu0", lambda: fault_back_rate(m, driver, mig_size))
            rows.append(Row("CPU fault-back from gpu0, random 4 KiB", "faults/s", fb,
                            "cdmfs random first touch", random))
            # Migration and device rows on a fresh machine: the first-touch rows
            # leave the free lists in random order, and copies between scattered
            # frames would measure that fragmentation, not migration.
            with mounted() as fresh:
                cpy = [x / MB for x in reps_of("memcpy", lambda: memcpy_rate(mig_size))]
                unm = [x / MB for x in reps_of("migration, not mapped",
                                               lambda: migrate_rate(fresh, False, mig_size, mig_size))]
                rows.append(Row("migrate sysram -> gpu0, 64 MiB, one request (2 MiB batches), not CPU-mapped",
                                "MB/s", unm, "memcpy", cpy))
                with tracing(fresh):
                    traced = [x / MB for x in reps_of("migration, not mapped, tracing on",
                                                      lambda: migrate_rate(fresh, False, mig_size, mig_size))]
                rows.append(Row("migrate sysram -> gpu0, 64 MiB, not CPU-mapped, every trace event on",
                                "MB/s", traced, "tracing off", unm))
                per = [x / MB for x in reps_of("migration, a request per batch",
                                               lambda: migrate_rate(fresh, False, mig_size, 2 * MB))]
                rows.append(Row("migrate sysram -> gpu0, 64 MiB, a request per 2 MiB, not CPU-mapped",
                                "MB/s", per, "memcpy", cpy))
                dirty = [x / MB for x in reps_of("migration, mapped and dirty",
                                                 lambda: migrate_rate(fresh, True, mig_size, mig_size))]
                rows.append(Row("migrate sysram -> gpu0, 64 MiB, one request (2 MiB batches), mapped and dirty",
                                "MB/s", dirty, "memcpy", cpy))
                dev = [x / MB for x in reps_of("device read", lambda: device_read_rate(fresh, mig_size))]
                rows.append(Row("gpu0 read of 64 MiB in its own memory", "MB/s", dev, "memcpy", cpy))
            routed = router.enabled()
            if routed:
                # The router's settings (fs/router.py): each variant on a mount of its own.
                for readers, spin in ((1, 0), (2, router.SPIN_US)):
                    with environment(**{router.READERS_ENV: str(readers), router.SPIN_ENV: str(spin)}):
                        with mounted() as tuned:
                            def on_tuned() -> float:
                                r = tuned.region("bench-touch")
                                try:
                                    return first_touch(driver, r.data, touch_size, "random")
                                finally:
                                    r.remove()
                            variant = reps_of(f"first touch, {readers} readers, {spin} us spin", on_tuned)
                    rows.append(Row(f"CPU first touch, random 4 KiB, router with {readers} reader"
                                    f"{'s' if readers > 1 else ''}, {spin} us spin", "faults/s", variant,
                                    ROUTER_DEFAULTS, random))
            ctl = [control_latency(m) * 1e6 for _ in reps_of("control request", lambda: 0.0)]
            if routed:
                with environment(**{router.ENV: "0"}):
                    with mounted() as plain:
                        ctl_plain = [control_latency(plain) * 1e6 for _ in range(reps)]
                rows.append(Row("control request: migrate one page (open, write, read, close)", "us", ctl,
                                "without the router", ctl_plain))
            emu = os.path.join(m.path, "sys/devices/system/node/node1/meminfo")
            host = "/sys/devices/system/node/node0/meminfo"
            lat = [read_latency(emu) * 1e6 for _ in reps_of("meminfo", lambda: 0.0)]
            label = "read sys/.../node1/meminfo (open, read, close)"
            if os.path.exists(host):
                host_lat = [read_latency(host) * 1e6 for _ in range(reps)]
                rows.append(Row(label, "us", lat, "host node0/meminfo", host_lat))
            if have_bindfs:
                shutil.copyfile(host if os.path.exists(host) else emu, os.path.join(tmpfs, "meminfo"))
                rows.append(Row(label, "us", lat, "bindfs, same bytes",
                                [read_latency(os.path.join(bindfs, "meminfo")) * 1e6 for _ in range(reps)]))
            if floor_proc:
                rows.append(Row(label, "us", lat, FLOOR,
                                [read_latency(os.path.join(floor, "attr")) * 1e6 for _ in range(reps)]))
        on, off = balancing_cost(driver, touch_size, reps)
        rows.append(Row(f"CPU first touch, random 4 KiB, {touch_size // MB} MiB, 2 nodes, NUMA balancing on",
                        "faults/s", on, "NUMA balancing off", off))
        touched = (256 if quick else 1024) * MB
        progress("daemon memory with a 1 TiB CDM node")
        grown, size = rss_per_touched(touched)
        rows.append(Row(f"daemon RSS growth after touching {touched // MB} MiB of a 1 TiB CDM node", "MiB",
                        [grown / MB], "bytes touched", [size / MB]))
    finally:
        subprocess.run(["umount", bindfs], stderr=subprocess.DEVNULL)
        if floor_proc:
            subprocess.run(["umount", floor], stderr=subprocess.DEVNULL)
            floor_proc.wait()
        subprocess.run(["umount", tmpfs], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
        progress("")
    print(table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump([{"name": r.name, "unit": r.unit, "median": r.median, "min": min(r.values),
                        "max": max(r.values), "reference": r.ref_name, "reference_median": r.ref,
                        "ratio": r.ratio} for r in rows], f, indent=2)
    return rows


def table(rows: list[Row]) -> str:
    w = max(len(r.name) for r in rows)
    head = f"{'measure':<{w}} {'median':>10} {'min':>10} {'max':>10}  {'unit':<9} {'reference':>10}  ratio  (reference)"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<{w}} {r.median:>10.1f} {min(r.values):>10.1f} {max(r.values):>10.1f}  "
                     f"{r.unit:<9} {r.ref:>10.1f}  {r.ratio:5.2f}x ({r.ref_name})")
    return "\n".join(lines)
