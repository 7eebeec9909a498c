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
dictionary look-up.  The kinds the trace stream shows, with their fields,
are lib/trace.py's EVENTS; a mover may give more fields than a line shows
(migrate's target and device_moves, for the devices; region_removed's
region, whose mirrors must go).  Kinds only the layers themselves use:

====================  =======================================================
memory_added          block: a block hot-added (probe)
node_registered       nid: a node has memory and a directory from now on
advise                region, first, n, what, arg: advice given on a range
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

    def wants(self, kind: str) -> bool:
        """Whether anyone listens to kind: an emitter may skip working out
        fields nobody reads."""
        return kind in self._subscribers

    def emit(self, kind: str, **fields: Any) -> None:
        for fn in self._subscribers.get(kind, ()):
            fn(**fields)
