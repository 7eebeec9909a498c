"""The one place every mover reports to.

The memory manager and the drivers know nothing of the layers above them; when
something happens that the world may want to know (pages moved, a device went
offline, a node got memory, pages were poisoned), they ``emit`` an event, and
whoever cares has subscribed: the sys tree adds a node's directory when memory
appears, a device maps what migrated into its memory, and later the trace
stream and NUMA balancing feed on the same events.

An event is a kind (a short name, as a tracepoint's) and keyword fields.
Subscribers run synchronously, in the order they subscribed, on the thread
that emits; they must not block.  An event nobody subscribed to costs a
dictionary look-up.  The kinds and their fields:

====================  =======================================================
cpu_fault             region, off, size, pid: a CPU fault (or read()) served
device_fault          device, region, first, n, faults: a device fault batch
migrate               region, first, n, target, moved, device_moves {device:
                      pages in (+) or out (-)}: a migrate_vma batch that moved
region_removed        region: its pages are gone, its mirrors must go
memory_added          block: a block hot-added (probe)
node_registered       nid: a node has memory and a directory from now on
memory_online         block
memory_offline        block: its pages moved away first
device_offline        device, moved: its memory evacuated, out of service
device_online         device: back in service, its memory empty
numa_hint_fault       region, first, n, node, faults, local, migrated: the NUMA
                      hinting faults of one CPU fault (node: the faulting CPU's)
demote                region, first, n, source, target, moved, reason (kswapd or
                      direct): reclaim moved cold pages to the next slower tier
promote               region, first, n, source, target, moved: hinting faults
                      moved hot pages of a lower tier up (also a ``migrate``)
poison                region, page, pfn: a page lost with its frame
link_down             device, poisoned: a device's whole memory lost
====================  =======================================================
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

Subscriber = Callable[..., None]


class Events:
    """The subscribers of one machine, by event kind."""

    def __init__(self) -> None:
        self._subscribers: dict[str, list[Subscriber]] = defaultdict(list)

    def subscribe(self, kind: str, fn: Subscriber) -> None:
        self._subscribers[kind].append(fn)

    def unsubscribe(self, kind: str, fn: Subscriber) -> None:
        self._subscribers[kind].remove(fn)
        if not self._subscribers[kind]:
            del self._subscribers[kind]

    def emit(self, kind: str, **fields: Any) -> None:
        for fn in self._subscribers.get(kind, ()):
            fn(**fields)
