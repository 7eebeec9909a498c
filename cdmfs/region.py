"""Regions: application memory whose pages live on emulated nodes.

A region's ``data`` file is the memory; the host page cache of that file is
the CPU's page table (DESIGN §1).  ``fault`` serves a FUSE READ (a CPU fault,
first touch allocating by policy), ``writeback`` a FUSE WRITE.  Each is one
native call per request; Python only handles the rare outcomes (a page under
migration, a page in device memory, no memory left).
"""
from __future__ import annotations

import errno
import functools
import logging
import re
from typing import Callable, Optional

import trio

from . import migrate
from . import policy as mpol
from ._core import ffi, lib
from .config import PAGE_SIZE
from .machine import Machine

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_REGION_SIZE = 1 << 46            # 64 TiB of address space per region


class Region:
    def __init__(self, machine: Machine, name: str, rid: int):
        self.machine = machine
        self.name = name
        self.id = rid
        self.core = lib.cdm_region_new(machine.core, rid)
        if self.core == ffi.NULL:
            raise MemoryError("cannot allocate a region")
        self.size = 0
        self.policy = mpol.DEFAULT
        self.opens = 0                  # open data files (a mapping holds one)
        self.cpu_faults = 0             # READ requests: CPU faults (with fault-around)
        self.writebacks = 0             # WRITE requests: write-back and write()
        self.device_faults = 0
        self.migrated_pages = 0
        self.invalidations = 0
        self.migrations = 0             # migrations under way
        self._res = ffi.new("struct cdm_rw_result *")
        self._unlocked = trio.Event()
        # Pages in device-private memory must come back before the CPU sees
        # them; the migration engine installs the handler (fault-back).
        self.faultback: Optional[Callable] = None

    @property
    def npages(self) -> int:
        return self.core.npages

    def policy_at(self, page: int) -> mpol.MemPolicy:
        """The policy that places page."""
        return self.policy

    # -------------------------------------------------------------- CPU side

    async def fault(self, off: int, size: int, pid: int) -> bytearray:
        """Bytes for a FUSE READ: a CPU fault (or read()) of [off, off+size)."""
        if off >= self.size:
            return bytearray()
        size = min(size, self.size - off)
        buf = bytearray(size)
        await self._rw(off, size, ffi.from_buffer(buf), 0, pid)
        self.cpu_faults += 1
        return buf

    async def writeback(self, off: int, data: bytes, pid: int) -> int:
        """A FUSE WRITE: write-back of dirty CPU pages, or write()."""
        if off + len(data) > self.size:
            # write() past the end grows the file, as on tmpfs.
            self.resize(off + len(data))
        await self._rw(off, len(data), ffi.from_buffer(data), 1, pid)
        self.writebacks += 1
        return len(data)

    async def _rw(self, off: int, size: int, buf, write: int, pid: int) -> None:
        m = self.machine
        res = self._res
        while True:
            plan = m.plan(self.policy_at(off // PAGE_SIZE), m.local_node(pid))
            rc = lib.cdm_region_rw(m.core, self.core, off, size, buf, write, 1, plan, res)
            if rc == 0:
                return
            page = res.page
            if rc == -errno.EAGAIN:
                await self.wait_unlocked()
            elif rc == -errno.EREMOTE and self.faultback is not None:
                await self.faultback(self, off // PAGE_SIZE, (off + size - 1) // PAGE_SIZE + 1, pid)
            elif rc == -errno.ENOSPC:
                log.info("region %s: no memory for page %d under %s", self.name, page, self.policy)
                # A fault that cannot allocate dies with SIGBUS (EIO), write() gets ENOSPC.
                raise OSError(errno.ENOSPC if write else errno.EIO, "no memory left on any allowed node")
            elif rc == -errno.EIO:
                raise OSError(errno.EIO, f"page {page} is poisoned")
            else:
                raise OSError(-rc, f"page {page}: {errno.errorcode.get(-rc, rc)}")

    async def wait_unlocked(self) -> None:
        """Waits until the migration holding a page of this region finishes."""
        await self._unlocked.wait()

    def wake_waiters(self) -> None:
        """Called when a migration unlocks pages."""
        self._unlocked.set()
        self._unlocked = trio.Event()

    # -------------------------------------------------------------- size

    def resize(self, size: int) -> None:
        """truncate(2): grows with zero pages, shrinking frees pages."""
        if size < 0 or size > MAX_REGION_SIZE:
            raise OSError(errno.EINVAL, f"size must be 0..{MAX_REGION_SIZE}")
        if self.migrations and size < self.size:
            # A shrink must not free frames a migration is copying.
            raise OSError(errno.EBUSY, "a migration is under way")
        npages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        if npages < self.npages and size % PAGE_SIZE:
            # The page that stays partly must read as zero past the new end.
            tail = bytes(PAGE_SIZE - size % PAGE_SIZE)
            self._zero_tail(size, tail)
        old = self.npages
        rc = lib.cdm_region_resize(self.machine.core, self.core, npages)
        if rc:
            raise OSError(-rc, "cannot resize the page table")
        if npages < old:
            self.machine.invalidate_devices(self, npages, old - npages)
        self.size = size

    def _zero_tail(self, size: int, tail: bytes) -> None:
        ptes = ffi.new("uint64_t[1]")
        lib.cdm_region_ptes(self.machine.core, self.core, size // PAGE_SIZE, 1, ptes)
        if ptes[0] & lib.CDM_PTE_PRESENT and not ptes[0] & lib.CDM_PTE_POISONED:
            addr = lib.cdm_pfn_addr(self.machine.core, ptes[0] & lib.CDM_PTE_PFN_MASK)
            ffi.memmove(addr + size % PAGE_SIZE, tail, len(tail))

    def free(self) -> None:
        lib.cdm_region_free(self.machine.core, self.core)
        self.core = ffi.NULL

    # -------------------------------------------------------------- views

    def stat(self) -> list[tuple[str, object]]:
        """The ``stat`` file: SPEC §6."""
        m = self.machine
        items: list[tuple[str, object]] = [("size", self.size), ("pages", self.npages)]
        items += [(f"N{nid}", self.core.resident[n.pool]) for nid, n in m.nodes.items()]
        items += [(f"private:{name}", self.core.resident[p.pool]) for name, p in m.private.items()]
        items += [
            ("cpu_faults", self.cpu_faults),
            ("device_faults", self.device_faults),
            ("migrated_pages", self.migrated_pages),
            ("invalidations", self.invalidations),
            ("writebacks", self.writebacks),
            ("pinned", self.core.nr_pinned),
            ("poisoned", self.core.nr_poisoned),
        ]
        return items


class Regions:
    """The regions of a mount, by name."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.by_name: dict[str, Region] = {}
        self._next_id = 0
        machine.regions = self

    def create(self, name: str) -> Region:
        if not NAME_RE.match(name):
            raise OSError(errno.EINVAL, "region names are 1-64 of [A-Za-z0-9_.-]")
        if name in self.by_name:
            raise OSError(errno.EEXIST, f"region {name} exists")
        region = Region(self.machine, name, self._next_id)
        region.faultback = functools.partial(migrate.fault_back, self.machine)
        self._next_id += 1
        self.by_name[name] = region
        return region

    def remove(self, name: str) -> None:
        region = self.by_name[name]
        if region.opens or region.migrations:
            raise OSError(errno.EBUSY, f"region {name} is open or mapped")
        del self.by_name[name]
        for dev in self.machine.devices.values():
            dev.forget(region)
        region.free()
