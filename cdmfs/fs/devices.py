"""The files of ``devices/NAME/`` (SPEC §7): one show/store per file."""
from __future__ import annotations

import errno
import functools

from ..config import PAGE_SIZE
from ..drivers.dmirror import COPY_OPS, FAULT_POLICIES, OPS, Device
from ..mm.machine import KB_PER_PAGE, Machine
from . import formats
from .regions import parse_range
from .sysfs.memory import parse_address
from .sysfs.node import parse_bool01
from .tree import Attr, Dir, Transaction, Tree

INJECT = ("link_down", "ecc", "fail_alloc")
COPY_MODES = {"copyout": ("", "mapped", "exclusive"), "copyin": ("",)}
COPY_AT_ONCE = 16 << 20     # bytes a copy request moves at most: the daemon holds them whole


def parse_int(word: str) -> int:
    """A decimal or 0x-hex integer, as the control files take them."""
    try:
        return int(word, 0)
    except ValueError:
        raise ValueError(f"not a number: {word!r}") from None


def region_of(m: Machine, name: str):
    region = m.regions.by_name.get(name)
    if region is None:
        raise OSError(errno.ENOENT, f"no region {name!r}")
    return region


def device_meminfo(m: Machine, dev: Device) -> str:
    """Its memory: a coherent device's is its node's online blocks (what
    node/nodeN/meminfo counts, hot-added or not), a private one's the pool."""
    for nid, node in m.nodes.items():
        if node.pool == dev.pool:
            pages = m.node_pages(nid)
            return formats.device_meminfo(pages["total"] * KB_PER_PAGE, pages["free"] * KB_PER_PAGE)
    p = m.pool_stats(dev.pool)
    return formats.device_meminfo(p.npages * KB_PER_PAGE, p.nr_free * KB_PER_PAGE)


def device_resource(m: Machine, dev: Device) -> str:
    p = m.pool_stats(dev.pool)
    start = p.base_pfn * PAGE_SIZE
    return f"0x{start:x} 0x{start + p.npages * PAGE_SIZE - 1:x}\n"


def fault_policy_store(dev: Device, text: str) -> None:
    word = text.strip()
    if word not in FAULT_POLICIES:
        raise ValueError(f"expected one of {', '.join(FAULT_POLICIES)}")
    dev.fault_policy = word


async def copy_request(m: Machine, dev: Device, state: dict, words: list[str]) -> None:
    """``copyout REGION START LENGTH BOUNCE [mapped|exclusive]`` and ``copyin
    REGION START LENGTH BOUNCE``: test_hmm's READ and WRITE (and the read-backs
    of its migration and exclusive access), the bytes going through the
    bounce range at byte offset BOUNCE of the same region.  Checked whole
    before anything runs."""
    op = words[0]
    if len(words) not in (5, 6) or (words[5] if len(words) == 6 else "") not in COPY_MODES[op]:
        raise ValueError(f"expected {op} REGION START LENGTH BOUNCE"
                         + (" [mapped|exclusive]" if op == "copyout" else ""))
    region = region_of(m, words[1])
    first, n = parse_range(region, words[2], words[3])
    bounce, nb = parse_range(region, words[4], words[3])
    if n * PAGE_SIZE > COPY_AT_ONCE:
        raise ValueError(f"LENGTH above {COPY_AT_ONCE} bytes: copy it in pieces")
    if bounce < first + n and first < bounce + nb:
        raise ValueError("the bounce range overlaps the range")
    if op == "copyout":
        res = await dev.copy_out(region, first, n, bounce, words[5] if len(words) == 6 else "")
    else:
        res = await dev.copy_in(region, first, n, bounce)
    state["result"] = res.text()


def check_exclusive_request(m: Machine, dev: Device, state: dict, words: list[str]) -> None:
    """``check_exclusive REGION START LENGTH``: the pages the device still
    holds exclusively (the CPU has not accessed them since)."""
    if len(words) != 4:
        raise ValueError("expected check_exclusive REGION START LENGTH")
    region = region_of(m, words[1])
    first, n = parse_range(region, words[2], words[3])
    state["result"] = f"ok exclusive={dev.revoke_touched(region, first, n)}\n"


async def access_request(m: Machine, dev: Device, state: dict, text: str) -> None:
    """``OP REGION START LENGTH [ARG]``: a device kernel run; the result on read."""
    words = text.split()
    if words and words[0] in COPY_OPS:
        return await copy_request(m, dev, state, words)
    if words and words[0] == "check_exclusive":
        return check_exclusive_request(m, dev, state, words)
    if len(words) < 4 or words[0] not in OPS:
        raise ValueError(f"expected OP REGION START LENGTH [ARG], OP one of {', '.join(OPS)}")
    op = words[0]
    needs_arg = op in ("write", "add")
    if len(words) != (5 if needs_arg else 4):
        raise ValueError(f"{op} takes {'an ARG' if needs_arg else 'no ARG'}")
    arg = parse_int(words[4]) if needs_arg else 0
    if op == "write" and not 0 <= arg <= 255:
        raise ValueError("write takes a byte 0..255")
    if op == "add" and not -(1 << 63) <= arg < (1 << 64):
        raise ValueError("add takes a 64-bit integer")
    region = region_of(m, words[1])
    first, n = parse_range(region, words[2], words[3])
    state["result"] = (await dev.access(region, first, n, op, arg)).text()


SNAPSHOT_AT_ONCE = 1 << 16      # pages: a snapshot up to 256 MiB is taken at the request


def snapshot_request(m: Machine, dev: Device, state: dict, text: str):
    """``REGION START LENGTH [cpu]``: the device's view of each page (with
    ``cpu``: the CPU page table's, as test_hmm's snapshot reports it).  A
    snapshot of a range larger than SNAPSHOT_AT_ONCE is rendered as it is
    read instead of whole, so its memory stays bounded whatever the range."""
    words = text.split()
    if len(words) not in (3, 4) or (len(words) == 4 and words[3] != "cpu"):
        raise ValueError("expected REGION START LENGTH [cpu]")
    region = region_of(m, words[0])
    first, n = parse_range(region, words[1], words[2])
    if len(words) == 4:
        return snapshot_cpu(dev, state, region, first, n)      # waits for the CPU's write-back
    if n <= SNAPSHOT_AT_ONCE:
        state["result"] = "".join(dev.snapshot(region, first, n))
    else:
        state["result"] = functools.partial(dev.snapshot, region, first, n)


async def snapshot_cpu(dev: Device, state: dict, region, first: int, n: int) -> None:
    pages = await dev.snapshot_cpu(region, first, n)
    state["result"] = "".join(pages) if n <= SNAPSHOT_AT_ONCE else functools.partial(
        dev.snapshot, region, first, n, True)


def answer(state: dict):
    """The answer of a transaction file: text, or a function giving it in pieces."""
    result = state.get("result", "")
    return result() if callable(result) else result


async def online_store(dev: Device, text: str) -> None:
    await dev.set_online(parse_bool01(text))


async def inject_store(dev: Device, text: str) -> None:
    """``link_down`` | ``ecc ADDRESS`` | ``fail_alloc N``."""
    words = text.split()
    if not words or words[0] not in INJECT:
        raise ValueError(f"expected one of {', '.join(INJECT)}")
    if words[0] == "link_down":
        if len(words) != 1:
            raise ValueError("link_down takes no argument")
        await dev.link_down()
    elif words[0] == "ecc":
        if len(words) != 2:
            raise ValueError("expected ecc ADDRESS")
        await dev.ecc(parse_address(words[1]))
    else:
        if len(words) != 2 or not words[1].isdigit():
            raise ValueError("expected fail_alloc N")
        count = int(words[1])
        if count >= 1 << 64:
            raise ValueError("N out of range")
        dev.fail_alloc(count)


def add_device(tree: Tree, m: Machine, dev: Device) -> None:
    d = tree.add(tree.dir(tree.root, "devices"), dev.name, Dir())
    tree.add(d, "type", Attr(lambda: f"{dev.kind}\n"))
    tree.add(d, "node", Attr(lambda: f"{dev.spec.node if dev.spec.coherent else -1}\n"))
    tree.add(d, "meminfo", Attr(lambda: device_meminfo(m, dev)))
    tree.add(d, "resource", Attr(lambda: device_resource(m, dev)))
    tree.add(d, "fault_policy", Attr(lambda: f"{dev.fault_policy}\n", lambda t: fault_policy_store(dev, t)))
    tree.add(d, "access", Transaction(lambda state, text: access_request(m, dev, state, text), answer))
    tree.add(d, "snapshot", Transaction(lambda state, text: snapshot_request(m, dev, state, text), answer))
    tree.add(d, "stat", Attr(lambda: formats.kv_lines(dev.stats.items())))
    tree.add(d, "online", Attr(lambda: f"{int(dev.online)}\n", lambda t: online_store(dev, t)))
    tree.add(d, "inject", Attr(None, lambda t: inject_store(dev, t)))
    tree.add(d, "access_counters", Attr(dev.counters_text, dev.set_counters))
    tree.add(d, "eviction", Attr(lambda: f"{dev.eviction}\n", lambda t: dev.set_eviction(t.strip())))


def build(tree: Tree, m: Machine, devices: dict[str, Device]) -> None:
    tree.dir(tree.root, "devices")
    for dev in devices.values():
        add_device(tree, m, dev)
