"""Cooperative scheduling: long operations give the event loop back.

One trio loop serves every user's requests, so a migration of gigabytes, an
evacuation or a device kernel over a large range must not hold it for long:
like the kernel's cond_resched(), ``cond_resched()`` yields when the caller
has run for longer than RESCHED_SECONDS since the loop last got control
(here or anywhere else that awaited).
"""
from __future__ import annotations

import time

import trio

RESCHED_SECONDS = 0.002

_last = time.monotonic()


async def cond_resched() -> None:
    """Yields to the other tasks if this one has run for a while."""
    global _last
    now = time.monotonic()
    if now - _last >= RESCHED_SECONDS:
        await trio.lowlevel.checkpoint()
        _last = time.monotonic()
