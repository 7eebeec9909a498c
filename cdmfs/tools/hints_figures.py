"""The figures of issue 15 (placement the device side decides), measured on
fresh mounts: ``python -m cdmfs.tools.hints_figures [--quick]``.

* oversubscription: a device kernel streaming a buffer twice its memory
  (``read``, then ``add``) with ``eviction lru``, wall and modeled time, and
  what it evicted; with ``eviction off`` for comparison (the pages that do
  not fit are reached remotely);
* read_mostly: device reads of a duplicated buffer, what they migrated;
* access counters at threshold 256: how many page accesses moved how many
  granules.
"""
from __future__ import annotations

import argparse
import os
import time

from .. import client

MB = 1 << 20
PAGE = 4096


def config(device_mb: int, sysram_mb: int) -> str:
    return f"""
[[node]]
id = 0
kind = "sysram"
size = "{sysram_mb}M"
cpus = "all"
[[node]]
id = 1
kind = "cdm"
size = "256M"
[[device]]
name = "cdm0"
memory = "node:1"
[[device]]
name = "gpu0"
memory = "private:{device_mb}M"
"""


def fill(r, byte: int) -> None:
    chunk = bytes([byte]) * MB
    with open(os.path.join(r.path, "data"), "r+b") as f:
        for _ in range(r.size // MB):
            f.write(chunk)


def timed(dev, op: str, region: str, length: int, arg=None) -> tuple[float, dict]:
    t = time.perf_counter()
    res = dev.access(op, region, 0, length, arg)
    return time.perf_counter() - t, res


def oversubscription(device_mb: int) -> None:
    size = 2 * device_mb * MB
    for mode in ("lru", "off"):
        with client.mounted(config(device_mb, 4 * device_mb + 256)) as m:
            gpu = m.device("gpu0")
            gpu.eviction = mode
            r = m.region("stream", size)
            fill(r, 1)
            for op, arg in (("read", None), ("add", 1), ("read", None)):
                st0 = gpu.stat
                wall, res = timed(gpu, op, "stream", size, arg)
                st = gpu.stat
                print(f"eviction {mode:3} {op:4} {size // MB} MiB over {device_mb} MiB: wall {wall * 1e3:8.1f} ms, "
                      f"modeled {res['modeled_ns'] / 1e6:8.3f} ms, migrated {res['migrated']}, "
                      f"local {res['local_bytes'] // MB} MiB, remote {res['remote_bytes'] // MB} MiB, "
                      f"evictions {st['evictions'] - st0['evictions']} "
                      f"({(st['evicted_bytes'] - st0['evicted_bytes']) // MB} MiB)")


def read_mostly(size_mb: int, reads: int) -> None:
    with client.mounted(config(256, 1024)) as m:
        gpu = m.device("gpu0")
        r = m.region("rm", size_mb * MB)
        fill(r, 2)
        r.advise(0, r.size, "read_mostly")
        migrated = modeled = local = remote = 0
        wall = 0.0
        for _ in range(reads):
            w, res = timed(gpu, "read", "rm", r.size)
            wall += w
            migrated += res["migrated"]
            modeled += res["modeled_ns"]
            local += res["local_bytes"]
            remote += res["remote_bytes"]
        st = r.stat
        print(f"read_mostly: {reads} device reads of {size_mb} MiB: migrated {migrated} pages, "
              f"duplicated {st['duplicated']} pages (N0 {st['N0']}, private:gpu0 {st['private:gpu0']}), "
              f"local {local // MB} MiB, remote {remote // MB} MiB, modeled {modeled / 1e6:.3f} ms, "
              f"wall {wall * 1e3:.1f} ms")
        with open(os.path.join(r.path, "data"), "r+b") as f:
            f.write(b"\x03" * PAGE)
        print(f"read_mostly: one CPU page write leaves {r.stat['duplicated']} duplicated pages")


def access_counters(size_mb: int) -> None:
    for dev_name, granularity, advice in (("cdm0", "64K", None), ("gpu0", "2M", "accessed_by:gpu0")):
        with client.mounted(config(256, 1024)) as m:
            dev = m.device(dev_name)
            if dev_name == "cdm0":
                m.node(1).numa_balancing = True
            dev.access_counters = f"256 {granularity}"
            r = m.region("ac", size_mb * MB)
            fill(r, 4)
            if advice:
                r.advise(0, r.size, advice)
            # Accesses of 64 KiB (16 pages) in turn over the region until
            # every granule has moved in.
            step = 64 * 1024
            accesses = page_accesses = 0
            where = "N1" if dev_name == "cdm0" else "private:gpu0"
            while r.stat[where] < r.size // PAGE and accesses < 10 ** 6:
                for off in range(0, r.size, step):
                    dev.access("touch", "ac", off, step)
                    accesses += 1
                    page_accesses += step // PAGE
            st = dev.stat
            print(f"access counters 256 {granularity} on {dev_name}: {accesses} accesses "
                  f"({page_accesses} page accesses) over {size_mb} MiB moved "
                  f"{st['counter_migrations']} granules ({r.stat[where]} pages), "
                  f"{st['counter_notifications']} notifications")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes")
    args = ap.parse_args(argv)
    oversubscription(64 if args.quick else 256)
    read_mostly(16 if args.quick else 64, 10)
    access_counters(4 if args.quick else 16)


if __name__ == "__main__":
    main()
