"""``sys/devices/system/memory`` (drivers/base/memory.c, mm/memory-failure.c's
files): block_size_bytes, auto_online_blocks, probe, soft_offline_page,
hard_offline_page and a ``memoryB`` directory per present block, one
show/store function per attribute.  Memory hotplug tells this tree, through
the machine's events, when a block or a node's memory appears.
"""
from __future__ import annotations

from ...mm import memory_failure
from ...mm.machine import Machine
from ...mm.memory_hotplug import ONLINE_TYPES, Block, MemoryHotplug
from .. import formats
from ..tree import Attr, Dir, Link, Tree
from .device import add_bus, add_device_files
from .node import add_node, parse_bool01

MEMORY_DIR = "sys/devices/system/memory"
NODE_DIR = "sys/devices/system/node"


def parse_address(text: str) -> int:
    """A physical address, decimal or 0x (kstrtoull(buf, 0))."""
    word = text.strip()
    try:
        if "_" in word:
            raise ValueError(word)
        value = int(word, 0)
    except ValueError:
        raise ValueError(f"expected a physical address, got {word!r}") from None
    if not 0 <= value < 1 << 64:
        raise ValueError("address out of range")
    return value


def state_show(b: Block) -> str:
    return formats.memory_state("going-offline" if b.going_offline else
                                "online" if b.online else "offline")


async def state_store(hp: MemoryHotplug, b: Block, text: str) -> None:
    word = text.strip()
    if word not in ONLINE_TYPES:
        raise ValueError(f"expected one of {', '.join(ONLINE_TYPES)}")
    if word == "offline":
        await hp.offline_block(b)
    else:
        await hp.online_block(b, word)


async def online_store(hp: MemoryHotplug, b: Block, text: str) -> None:
    """The device core's ``online``: 1/0, a no-op when already there."""
    if parse_bool01(text):
        await hp.online_block(b, "online", strict=False)
    else:
        await hp.offline_block(b, strict=False)


def valid_zones(hp: MemoryHotplug, b: Block) -> str:
    """valid_zones_show(): the zone of an online block; for an offline
    one the default zone first, then the others it could go to."""
    if b.online:
        return formats.memory_valid_zones([b.zone])
    return formats.memory_valid_zones(["Movable"] if hp.kind(b) == "cdm" else ["Normal", "Movable"])


def auto_online_store(hp: MemoryHotplug, text: str) -> None:
    word = text.strip()
    if word not in ONLINE_TYPES:
        raise ValueError(f"expected one of {', '.join(ONLINE_TYPES)}")
    hp.auto_online = word


async def probe_store(hp: MemoryHotplug, text: str) -> None:
    """Memory hot-add of the block at a physical address (probe_store())."""
    await hp.add_memory(parse_address(text))


async def hard_offline_store(hp: MemoryHotplug, text: str) -> None:
    await memory_failure.hard_offline(hp, parse_address(text))


async def soft_offline_store(hp: MemoryHotplug, text: str) -> None:
    await memory_failure.soft_offline(hp, parse_address(text))


def add_block_files(tree: Tree, hp: MemoryHotplug, b: Block) -> None:
    """memoryB/ and its links, for a present block."""
    d = tree.add(tree.path(MEMORY_DIR), f"memory{b.id}", Dir())
    tree.add(d, "phys_index", Attr(lambda: formats.memory_phys_index(b.id)))
    tree.add(d, "state", Attr(lambda: state_show(b), lambda t: state_store(hp, b, t)))
    tree.add(d, "online", Attr(lambda: f"{int(b.online)}\n", lambda t: online_store(hp, b, t)))
    tree.add(d, "valid_zones", Attr(lambda: valid_zones(hp, b)))
    tree.add(d, "removable", Attr(lambda: "1\n"))
    tree.add(d, "phys_device", Attr(lambda: "0\n"))
    tree.add(d, f"node{b.nid}", Link(f"../../node/node{b.nid}"))
    tree.add(d, "subsystem", Link("../../../../bus/memory"))
    add_device_files(tree, d)
    tree.add(tree.path("sys/bus/memory/devices"), f"memory{b.id}",
             Link(f"../../../devices/system/memory/memory{b.id}"))
    node_dir = tree.path(NODE_DIR).children.get(f"node{b.nid}")
    if node_dir is not None and f"memory{b.id}" not in node_dir.children:
        tree.add(node_dir, f"memory{b.id}", Link(f"../../memory/memory{b.id}"))


def ensure_node_dir(tree: Tree, hp: MemoryHotplug, nid: int) -> None:
    """nodeN appears once it has memory (a hot-added memory-only node)."""
    nodes = tree.path(NODE_DIR)
    d = nodes.children.get(f"node{nid}")
    if d is None:
        add_node(tree, nodes, hp.m, nid)
        tree.add(tree.path("sys/bus/node/devices"), f"node{nid}",
                 Link(f"../../../devices/system/node/node{nid}"))
        d = nodes.children[f"node{nid}"]
        for b in hp.node_blocks(nid):
            if b.present:
                tree.add(d, f"memory{b.id}", Link(f"../../memory/memory{b.id}"))


def build(tree: Tree, m: Machine) -> None:
    """sys/devices/system/memory, and the files that follow hotplug."""
    hp = m.hotplug
    mem = tree.path(MEMORY_DIR)
    tree.add(mem, "block_size_bytes", Attr(lambda: formats.block_size_bytes(hp.block_size)))
    tree.add(mem, "auto_online_blocks", Attr(lambda: f"{hp.auto_online}\n", lambda t: auto_online_store(hp, t)))
    tree.add(mem, "probe", Attr(None, lambda t: probe_store(hp, t)))
    tree.add(mem, "soft_offline_page", Attr(None, lambda t: soft_offline_store(hp, t)))
    tree.add(mem, "hard_offline_page", Attr(None, lambda t: hard_offline_store(hp, t)))
    add_bus(tree, "memory")
    for b in sorted(hp.blocks.values(), key=lambda b: b.id):
        if b.present:
            add_block_files(tree, hp, b)
    m.events.subscribe("memory_added", lambda block: add_block_files(tree, hp, block))
    m.events.subscribe("node_registered", lambda nid: ensure_node_dir(tree, hp, nid))
