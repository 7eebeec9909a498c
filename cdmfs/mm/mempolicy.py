"""Memory policies (set_mempolicy(2)/mbind(2) modes) and where they place a page.

SPEC §6.1.  A policy is parsed from and printed to its canonical text
(``bind:0-1``); ``placement`` turns it into the ordered node lists that the
native allocator walks, applying the CDM rules: an isolated node never gets an
implicit allocation, only one a policy names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from ..lib import bitmap

MODES = ("default", "local", "bind", "preferred", "preferred_many", "interleave",
         "weighted_interleave")
_TAKES_NODES = {"bind", "preferred", "preferred_many", "interleave", "weighted_interleave"}


@dataclass(frozen=True)
class MemPolicy:
    mode: str = "default"
    nodes: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.mode in _TAKES_NODES:
            return f"{self.mode}:{bitmap.nodelist(self.nodes).strip()}"
        return self.mode

    @property
    def interleaved(self) -> bool:
        return self.mode in ("interleave", "weighted_interleave")


DEFAULT = MemPolicy()

# The kernel's names of the modes (mm/mempolicy.c policy_modes[]), as
# mpol_to_str() prints them in /proc/PID/numa_maps and tmpfs mount options.
_KERNEL_NAMES = {
    "default": "default",
    "local": "local",
    "bind": "bind",
    "preferred": "prefer",
    "preferred_many": "prefer (many)",
    "interleave": "interleave",
    "weighted_interleave": "weighted interleave",
}


def kernel_str(policy: MemPolicy) -> str:
    """The policy as mpol_to_str() prints it: ``prefer:1``, ``prefer (many):0-1``,
    ``weighted interleave:0-1``, ``bind:1``, ``default``."""
    name = _KERNEL_NAMES[policy.mode]
    if policy.nodes:
        return f"{name}:{bitmap.nodelist(policy.nodes).strip()}"
    return name


def parse(text: str, known_nodes: Sequence[int], memory_nodes: Optional[Sequence[int]] = None) -> MemPolicy:
    """The policy written as text; ValueError with a one-line reason if it is
    not one.  As mpol_new() does with the nodes that have memory, a node list
    none of whose nodes has memory (``memory_nodes``) is refused."""
    text = text.strip()
    mode, sep, arg = text.partition(":")
    if mode not in MODES:
        raise ValueError(f"unknown policy mode {mode!r} (expected one of {', '.join(MODES)})")
    if mode not in _TAKES_NODES:
        if sep:
            raise ValueError(f"policy {mode!r} takes no node list")
        return MemPolicy(mode)
    if not arg.strip():
        raise ValueError(f"policy {mode!r} needs a node list, like {mode}:0-1")
    nodes = bitmap.parse_nodelist(arg)
    unknown = sorted(set(nodes) - set(known_nodes))
    if unknown:
        raise ValueError(f"node {unknown[0]} does not exist")
    if mode == "preferred" and len(nodes) != 1:
        raise ValueError("preferred takes exactly one node; use preferred_many for several")
    if memory_nodes is not None and not set(nodes) & set(memory_nodes):
        raise ValueError(f"no node of {bitmap.nodelist(nodes).strip()} has memory")
    return MemPolicy(mode, tuple(sorted(nodes)))


@dataclass(frozen=True)
class Placement:
    """Where first-touched pages go: page index i is intended for
    ``table[i % len(table)]``; ``fallback[n]`` is the order of nodes tried when
    n is intended (n first when it is allowed)."""
    table: tuple[int, ...]
    fallback: Mapping[int, tuple[int, ...]]
    interleave: bool


def placement(policy: MemPolicy, local: int, usable: Sequence[int], isolated: Callable[[int], bool],
              distance: Callable[[int, int], int], weight: Callable[[int], int],
              sysram: Callable[[int], bool] = lambda n: True) -> Placement:
    """The placement of a policy for a CPU on node ``local``: where a page
    may go now, for a first touch and for every mover alike.

    ``usable`` are the nodes that can take pages now (present, online, with
    memory); ``isolated(n)`` tells the CDM isolation of a node, ``sysram(n)``
    whether it is system RAM.  A policy whose nodes are all offline or absent
    falls back to the online system RAM nearest to ``local``, so a page never
    dies with SIGBUS for want of a node while system RAM has room.
    """
    def by_distance(src: int, nodes) -> tuple[int, ...]:
        return tuple(sorted(nodes, key=lambda n: (distance(src, n), n)))

    named = set(policy.nodes)
    implicit = [n for n in usable if not isolated(n) or n in named]
    mode = policy.mode
    if mode in ("default", "local"):
        return Placement((local,), {local: by_distance(local, implicit)}, False)
    if mode == "bind":
        order = by_distance(local, [n for n in usable if n in named]) or \
            by_distance(local, [n for n in usable if sysram(n) and not isolated(n)])
        intended = order[0] if order else min(named)
        return Placement((intended,), {intended: order}, False)
    if mode == "preferred":
        (node,) = policy.nodes
        rest = by_distance(node, [n for n in implicit if n != node])
        return Placement((node,), {node: ((node,) if node in usable else ()) + rest}, False)
    if mode == "preferred_many":
        first = by_distance(local, [n for n in usable if n in named])
        intended = first[0] if first else min(named)
        rest = by_distance(local, [n for n in implicit if n not in named])
        return Placement((intended,), {intended: first + rest}, False)
    # interleave and weighted_interleave: by page offset over the named nodes,
    # each falling back by its own distance (never into an unnamed isolated node).
    nodes = sorted(named)
    if mode == "weighted_interleave":
        table = tuple(n for n in nodes for _ in range(weight(n)))
    else:
        table = tuple(nodes)
    fallback = {n: ((n,) if n in usable else ()) + by_distance(n, [m for m in implicit if m != n])
                for n in nodes}
    return Placement(table, fallback, True)
