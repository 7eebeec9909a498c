"""Memory failure (mm/memory-failure.c): a poisoned frame's page loses its
data (a CPU access gets SIGBUS, read() and device accesses EIO) and the frame
is retired for good; soft offline moves the data first.  Link loss poisons a
device's whole memory at once.  Each takes the hotplug lock.
"""
from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Callable

import trio

from .._core import ffi, lib
from ..config import PAGE_SIZE
from . import migrate
from .migrate_device import Target

if TYPE_CHECKING:
    from .machine import Machine, PageMap
    from .memory_hotplug import MemoryHotplug
    from .region import Region

log = logging.getLogger(__name__)

EHWPOISON = getattr(errno, "EHWPOISON", 133)    # Linux's; Python's errno lacks it


def check_pfn(hp: "MemoryHotplug", addr: int) -> int:
    pfn = addr // PAGE_SIZE
    if lib.cdm_pfn_pool(hp.m.core, pfn) < 0:
        raise ValueError("no memory at that address")
    b = hp.block_of_pfn(pfn)
    if b is not None and not b.online:
        raise OSError(errno.ENXIO, "memory outside kernel control (offline)")
    return pfn


async def hard_offline(hp: "MemoryHotplug", addr: int) -> None:
    """memory_failure(): the frame is poisoned; its page's data is lost."""
    pfn = check_pfn(hp, addr)
    m = hp.m
    rid = ffi.new("uint32_t *")
    page = ffi.new("uint64_t *")
    async with hp.lock:
        for _ in range(migrate.MAX_PASSES):
            if lib.cdm_pfn_owner(m.core, pfn, rid, page) == -errno.ENOENT:
                rc = lib.cdm_frame_retire(m.core, pfn, lib.CDM_FRAME_POISONED)
                if rc == 1:     # a migration's copy just took it: let it land
                    lib.cdm_frames_unretire(m.core, pfn, 1)
                    await trio.sleep(0.001)
                    continue
                if rc == -errno.EALREADY:
                    # As memory_failure() answers for a page already poisoned
                    # (soft offline marks it so too).
                    raise OSError(EHWPOISON, f"pfn {pfn:#x} is poisoned already")
                return
            region = migrate.regions_by_id(m).get(rid[0])
            if region is None:
                await trio.sleep(0.001)
                continue
            p = page[0]
            private = m.pool_stats(lib.cdm_pfn_pool(m.core, pfn)).flags & lib.CDM_POOL_PRIVATE
            rc = lib.cdm_page_poison(m.core, region.core, p, pfn)
            if rc == -errno.EAGAIN:
                await region.wait_unlocked()
                continue
            if rc:
                continue        # the page moved meanwhile: look again
            m.invalidate_devices(region, p, 1)
            if not private:     # a device-private page is never in the page cache
                await drop_cpu_copies(m, region, p, 1)
            log.warning("pfn %#x: page %d of region %s poisoned", pfn, p, region.name)
            m.events.emit("poison", region=region, page=p, pfn=pfn)
            return
        raise OSError(errno.EBUSY, "the page kept moving")


async def soft_offline(hp: "MemoryHotplug", addr: int) -> None:
    """soft_offline_page(): the data moves to another frame (its node
    first), the frame is retired."""
    pfn = check_pfn(hp, addr)
    m = hp.m
    pool = lib.cdm_pfn_pool(m.core, pfn)
    rid = ffi.new("uint32_t *")
    page = ffi.new("uint64_t *")
    async with hp.lock:
        for _ in range(migrate.MAX_PASSES):
            rc = lib.cdm_frame_retire(m.core, pfn, 0)
            if rc in (0, -errno.EALREADY):
                return          # a free frame retired now, or one retired already
            # Used: retired once its page leaves; collect moves it even
            # within its own pool.
            if lib.cdm_pfn_owner(m.core, pfn, rid, page) == -errno.ENOENT:
                lib.cdm_frames_unretire(m.core, pfn, 1)
                await trio.sleep(0.001)     # a migration's copy: let it land
                continue
            region = migrate.regions_by_id(m).get(rid[0])
            if region is None:
                lib.cdm_frames_unretire(m.core, pfn, 1)
                await trio.sleep(0.001)
                continue
            p = page[0]
            _, failed = await migrate.move_pages(m, region, [p], pool, soft_order(hp, pool))
            if lib.cdm_pfn_owner(m.core, pfn, rid, page) == -errno.ENOENT:
                return          # moved (or freed): the frame is retired
            lib.cdm_frames_unretire(m.core, pfn, 1)
            errs = {err for _, err in failed}
            if errno.EBUSY in errs and migrate.page_pinned(m, region, p):
                raise OSError(errno.EBUSY, "the page is pinned")
            if errno.ENOMEM in errs:
                raise OSError(errno.ENOMEM, "no free frame to move the page to")
            if region.migrations:
                await region.wait_unlocked()
            else:
                await trio.sleep(0.001)
        raise OSError(errno.EBUSY, "the page kept moving")


def soft_order(hp: "MemoryHotplug", pool: int) -> Callable:
    m = hp.m
    nid = m.pool_node.get(pool)
    if nid is not None:
        return migrate.orderer(m, nid, sysram_only=False, stay=True)
    name = m.pool_owner[pool]
    own = Target(f"private:{name}", pool, False)
    sysram = migrate.orderer(m, None, sysram_only=True, stay=False)
    return lambda region, page: (own,) + sysram(region, page)


async def drop_cpu_copies(m: "Machine", region: "Region", first: int, n: int) -> None:
    """Drops the CPU's copies of poisoned pages so that the next access
    faults, gets EIO and dies with SIGBUS.  The first invalidation writes
    dirty copies back; that WRITE fails (EIO) and leaves the copy cached,
    clean; the second drops it."""
    await m.cpu_unmap(region, first, n)
    await m.cpu_unmap(region, first, n)


async def link_down(hp: "MemoryHotplug", dev: "PageMap") -> None:
    """The device's link is lost: every page in its memory is poisoned at
    once, the device goes offline.  Pages elsewhere are untouched."""
    m = hp.m
    async with hp.lock:
        dev.online = False
        hp.link_lost.add(dev.owner)
        lib.cdm_pool_isolate(m.core, dev.pool, 1)
        m.placement_changed()
        coherent = dev.spec.coherent
        blocks = [b for b in hp.node_blocks(dev.spec.node) if b.online] if coherent else []
        for b in blocks:
            lib.cdm_block_isolate(m.core, b.pool, b.index, 1)
        pool = m.pool_stats(dev.pool)       # its geometry
        busy = ffi.new("uint64_t *")
        poisoned = 0
        for attempt in range(migrate.MAX_PASSES):
            owners = migrate.frame_owners(m, pool.base_pfn, pool.npages)
            if not owners and not migrate.frames_census(m, pool.base_pfn, pool.npages)[0]:
                break
            regions = migrate.regions_by_id(m)
            waiting = None
            for rid, pages in owners.items():
                region = regions.get(rid)
                if region is None or region.removed:     # removed meanwhile: no pages left
                    continue
                lo, n = pages[0], pages[-1] + 1 - pages[0]
                cached = [run for run in migrate.runs(pages) if coherent and m.cpu_mapped(region, *run)]
                poisoned += lib.cdm_region_poison_pool(m.core, region.core, lo, n, dev.pool, busy)
                if busy[0]:
                    waiting = region
                m.invalidate_devices(region, lo, n)
                for run in cached:
                    await drop_cpu_copies(m, region, *run)
            if waiting is not None:
                await waiting.wait_unlocked()
            elif not owners:
                await trio.sleep(0.005)
        else:
            # Pages a migration kept busy through every pass still sit on the
            # lost memory: say so rather than report the link down as done.
            left = migrate.frames_census(m, pool.base_pfn, pool.npages)[0]
            log.error("device %s: link down left %d pages busy, not poisoned", dev.owner, left)
            raise OSError(errno.EBUSY, f"{left} pages of {dev.owner} stayed busy")
        for b in blocks:
            hp._offlined(b, taken_by=dev.owner)
        if coherent:
            hp._refresh(dev.spec.node)
        log.warning("device %s: link down, %d pages lost", dev.owner, poisoned)
        m.events.emit("link_down", device=dev.owner, poisoned=poisoned)
