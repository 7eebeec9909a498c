"""The emulated devices (SPEC §7), in the manner of Linux's lib/test_hmm.c.

A device mirrors the process address space: its page table (one byte a page
per region: none, read, write) fills on device faults and loses pages when
they migrate, get truncated, poisoned or faulted back by the CPU.  A device
fault under ``migrate`` moves the pages into device memory (allocating there
if the CPU never touched them); under ``remote`` the device reaches them where
they lie.  Every access sees what a CPU access would see at that moment: CPU
copies are invalidated first, so dirty data is written back before the device
reads, and again after a device write, so the CPU's next access faults.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import migrate
from ._core import ffi, lib
from .config import PAGE_SIZE, DeviceSpec

if TYPE_CHECKING:
    from .machine import Machine, Target
    from .region import Region

# Device page-table entries: one byte a page.
PT_NONE, PT_READ, PT_WRITE = 0, 1, 2
MAP_READ = bytes([PT_READ, PT_READ, PT_WRITE]) + bytes(253)      # none/read -> read
MAP_WRITE = bytes([PT_WRITE] * 3) + bytes(253)

OPS = {"read": lib.CDM_OP_READ, "write": lib.CDM_OP_WRITE, "add": lib.CDM_OP_ADD,
       "touch": lib.CDM_OP_TOUCH}
FAULT_POLICIES = ("migrate", "remote")
STAT_KEYS = ("faults", "fault_batches", "migrated_to", "migrated_from", "local_bytes",
             "remote_bytes", "invalidations", "modeled_ns")


@dataclass
class AccessResult:
    bytes: int = 0
    faults: int = 0
    migrated: int = 0
    local_bytes: int = 0
    remote_bytes: int = 0
    modeled_ns: int = 0
    crc32: int | None = None

    def text(self) -> str:
        line = (f"ok bytes={self.bytes} faults={self.faults} migrated={self.migrated} "
                f"local_bytes={self.local_bytes} remote_bytes={self.remote_bytes} "
                f"modeled_ns={self.modeled_ns}")
        if self.crc32 is not None:
            line += f" crc32=0x{self.crc32:08x}"
        return line + "\n"


def transfer_ns(nbytes: int, bandwidth_mbps: int) -> int:
    """Modeled time of moving nbytes at a bandwidth in MB/s (1 MB/s = 1 byte/us)."""
    return nbytes * 1000 // bandwidth_mbps


@dataclass
class Device:
    machine: "Machine"
    spec: DeviceSpec
    pool: int                               # its memory: private pool or its CDM node's pool
    fault_policy: str = ""
    online: bool = True
    stats: dict = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))
    mirrors: dict = field(default_factory=dict)   # region id -> bytearray

    def __post_init__(self) -> None:
        if not self.fault_policy:
            self.fault_policy = "remote" if self.spec.coherent else "migrate"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return "coherent" if self.spec.coherent else "private"

    @property
    def own_target(self) -> str:
        return f"node:{self.spec.node}" if self.spec.coherent else f"private:{self.name}"

    def target(self) -> "Target":
        return self.machine.target(self.own_target)

    # ------------------------------------------------------------ page table

    def mirror(self, region: "Region") -> bytearray:
        pt = self.mirrors.get(region.id)
        if pt is None or len(pt) < region.npages:
            grown = bytearray(region.npages)
            if pt is not None:
                grown[:len(pt)] = pt
            pt = self.mirrors[region.id] = grown
        return pt

    def invalidate(self, region: "Region", first: int, n: int) -> None:
        """mmu_notifier: drop the device's entries of pages [first, first + n)."""
        pt = self.mirrors.get(region.id)
        if pt is None:
            return
        end = min(first + n, len(pt))
        if first < end and pt.count(PT_NONE, first, end) != end - first:
            pt[first:end] = bytes(end - first)
            self.stats["invalidations"] += 1

    def map_own(self, region: "Region", first: int, n: int) -> None:
        """Maps the pages of [first, first + n) that live in this device's
        memory, as test_hmm maps what it migrated to itself."""
        pt = self.mirror(region)
        lib.cdm_region_mirror_pool(self.machine.core, region.core, first, n, self.pool,
                                   ffi.from_buffer(pt), PT_WRITE)

    def forget(self, region: "Region") -> None:
        self.mirrors.pop(region.id, None)

    # ------------------------------------------------------------ access

    async def access(self, region: "Region", first: int, n: int, op: str, arg: int) -> AccessResult:
        """A device kernel touching pages [first, first + n) of region.  A range
        truncated under the access fails with EFAULT, whatever step noticed."""
        try:
            return await self._access(region, first, n, op, arg)
        except OSError:
            if first + n > region.npages:
                raise OSError(errno.EFAULT, "the range was truncated during the access") from None
            raise

    async def _access(self, region: "Region", first: int, n: int, op: str, arg: int) -> AccessResult:
        if not self.online:
            raise OSError(errno.ENODEV, f"device {self.name} is offline")
        m = self.machine
        pt = self.mirror(region)
        res = AccessResult(bytes=n * PAGE_SIZE)
        res.faults = pt.count(PT_NONE, first, first + n)
        if res.faults:
            self.stats["faults"] += res.faults
            self.stats["fault_batches"] += 1
            region.device_faults += res.faults
            res.modeled_ns += self.remote_figures().read_latency
            await self._fault(region, first, n, res)
        # Coherence: take the CPU's dirty copies back before the device looks.
        if m.cpu_mapped(region, first, n):
            await m.cpu_unmap(region, first, n)
        out = ffi.new("struct cdm_op_result *")
        own = 1 << self.pool
        private_ok = own if not self.spec.coherent else 0
        for _ in range(64):
            rc = lib.cdm_device_op(m.core, region.core, first, n, OPS[op], arg & 0xFFFFFFFFFFFFFFFF,
                                   own, private_ok, out)
            if rc == 0:
                break
            if rc == -errno.EAGAIN:
                await region.wait_unlocked()
            elif rc == -errno.EREMOTE:
                # Another device's private pages: back to RAM first, as the CPU would.
                await migrate.fault_back(m, region, first, first + n, 0)
            elif rc == -errno.ENOENT:
                await self._fault(region, first, n, res)     # truncated and regrown meanwhile
            else:
                raise OSError(-rc, f"page {out.page}: {errno.errorcode.get(-rc, rc)}")
        else:
            raise OSError(errno.EAGAIN, "pages kept moving under the device")
        if op in ("write", "add") and out.cpu_pages:
            # The CPU faulted pages in meanwhile: its next access must see our bytes.
            await m.cpu_unmap(region, first, n)
        pt[first:first + n] = pt[first:first + n].translate(MAP_WRITE if op in ("write", "add") else MAP_READ)
        res.local_bytes, res.remote_bytes = out.local_bytes, out.remote_bytes
        own_fig, remote_fig = self.own_figures(), self.remote_figures()
        writing = op in ("write", "add")
        res.modeled_ns += transfer_ns(res.local_bytes, own_fig.write_bandwidth if writing else own_fig.read_bandwidth)
        res.modeled_ns += transfer_ns(res.remote_bytes, remote_fig.write_bandwidth if writing else remote_fig.read_bandwidth)
        if op == "read":
            res.crc32 = out.crc
        for key in ("local_bytes", "remote_bytes", "modeled_ns"):
            self.stats[key] += getattr(res, key)
        return res

    async def _fault(self, region: "Region", first: int, n: int, res: AccessResult) -> None:
        """Device fault on pages [first, first + n): batched, as HMM does."""
        m = self.machine
        if self.fault_policy == "migrate":
            moved = await migrate.migrate_range(m, region, first, n, self.target())
            res.migrated += moved.migrated
            res.modeled_ns += transfer_ns(moved.migrated * PAGE_SIZE, self.remote_figures().read_bandwidth)
            # Pages that could not move (device memory full, pinned) are reached remotely.
        # Whatever is still absent is a first touch by the device, by the region's policy.
        await m.populate(region, first, n)

    def own_figures(self):
        return self.machine.topo.access_of(self.name, self.own_target)

    def remote_figures(self):
        return self.machine.topo.access_of(self.name, f"node:{self.machine.first_sysram}")

    # ------------------------------------------------------------ snapshot

    def snapshot(self, region: "Region", first: int, n: int) -> str:
        """One ``PAGE FLAGS`` line a page, after test_hmm's HMM_DMIRROR_SNAPSHOT."""
        m = self.machine
        ptes = ffi.new("uint64_t[]", n)
        lib.cdm_region_ptes(m.core, region.core, first, n, ptes)
        pt = self.mirror(region)
        lines = []
        for k in range(n):
            i, pte = first + k, ptes[k]
            lines.append(f"{i} {self._flag(pte, i, region, pt)}")
        return "\n".join(lines) + "\n"

    def _flag(self, pte: int, i: int, region: "Region", pt: bytearray) -> str:
        if i >= region.npages or pte & lib.CDM_PTE_POISONED:
            return "error"
        if not pte & lib.CDM_PTE_PRESENT:
            return "none"
        pool = (pte & lib.CDM_PTE_POOL_MASK) >> lib.CDM_PTE_POOL_SHIFT
        owner = self.machine.pool_owner.get(pool)
        if pte & lib.CDM_PTE_PRIVATE:
            return "private-local" if owner == self.name else "private-remote"
        if owner is not None:
            return "coherent-local" if owner == self.name else "coherent-remote"
        if pt[i] == PT_NONE:
            return "none"
        if not pte & lib.CDM_PTE_DIRTY:
            return "zero"
        return "write" if pt[i] == PT_WRITE else "read"
