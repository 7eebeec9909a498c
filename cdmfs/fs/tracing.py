"""``sys/kernel/tracing``: the trace stream as tracefs shows ftrace's.

    events/enable           0 or 1 for every kind at once; reads 0, 1, or X
                            when some are on and some off
    events/KIND/enable      0 or 1: whether KIND's lines are written
    events/KIND/format      the kind's fields, in line order
    trace_pipe              the lines (lib/trace.py), read as they come

Root only, as tracefs is: lines name every user's regions.  A read of
``trace_pipe`` with no line waiting blocks until one comes (``O_NONBLOCK``:
EAGAIN).  FUSE gives the daemon no word of a signal to the reader that
pyfuse3 passes on, and a killed reader's request would otherwise wait for the
next line in the kernel, unkillable: a waiting read looks at the reader's
pending signals every SIGNAL_CHECK seconds and ends with EINTR when one came.
While a reader waits, the machine's trace is polled every POLL seconds: the
faults the C core served and the memory each place uses reach the lines
within that time.
"""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import trio

from ..lib.trace import EVENTS
from .tree import Attr, Pipe, Tree

if TYPE_CHECKING:
    from ..mm.trace import MachineTrace

# tracefs' modes (kernel/trace/trace.h), under a directory of root's alone.
TRACE_MODE_WRITE = 0o640
TRACE_MODE_READ = 0o440
POLL = 0.01
SIGNAL_CHECK = 0.1


def _switch(text: str) -> bool:
    """An enable file's 0 or 1; anything else is EINVAL."""
    value = text.strip()
    if value not in ("0", "1"):
        raise ValueError(f"enable takes 0 or 1, not {value!r}")
    return value == "1"


def signal_pending(pid: int) -> bool:
    """Whether thread pid has a signal it does not block waiting (or is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return True
    pending = int(fields.get("SigPnd", "0"), 16) | int(fields.get("ShdPnd", "0"), 16)
    return bool(pending & ~int(fields.get("SigBlk", "0"), 16))


class PipeReader:
    """One open ``trace_pipe``: every line from its open on."""

    def __init__(self, trace: "MachineTrace", wake: "Wakeup", nonblock: bool):
        self.trace = trace
        self.wake = wake
        self.nonblock = nonblock
        self.seq = trace.tracer.buffer.end
        self.rest = b""         # what a read shorter than a line left of it
        trace.show_usage()

    async def read(self, size: int, pid: int) -> bytes:
        buffer = self.trace.tracer.buffer
        next_check = trio.current_time() + SIGNAL_CHECK
        while True:
            if self.rest:
                data, self.rest = self.rest[:size], self.rest[size:]
                return data
            self.trace.drain()
            self.trace.sample()
            data, self.seq = buffer.read(self.seq, size)
            if data:
                data, self.rest = data[:size], data[size:]
                return data
            if self.nonblock:
                raise OSError(errno.EAGAIN, "no trace line waiting")
            if trio.current_time() >= next_check:
                if signal_pending(pid):
                    raise OSError(errno.EINTR, "the reader got a signal")
                next_check = trio.current_time() + SIGNAL_CHECK
            await self.wake.wait(POLL)


class Wakeup:
    """Wakes the readers waiting when a line is written; free when none waits."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.waiting = 0

    def notify(self) -> None:
        if self.waiting:
            self._event.set()
            self._event = trio.Event()

    async def wait(self, timeout: float) -> None:
        self.waiting += 1
        try:
            with trio.move_on_after(timeout):
                await self._event.wait()
        finally:
            self.waiting -= 1


def build(tree: Tree, trace: "MachineTrace") -> None:
    tracer = trace.tracer
    top = tree.path("sys/kernel/tracing")
    top.mode = (top.mode & ~0o777) | 0o700
    events = tree.dir(top, "events")

    def show_all() -> str:
        on = {tracer.is_enabled(k) for k in EVENTS}
        return "X\n" if len(on) > 1 else f"{int(on.pop())}\n"

    def store_all(text: str) -> None:
        on = _switch(text)
        for kind in EVENTS:
            tracer.enable(kind, on)

    tree.add(events, "enable", Attr(show_all, store_all, mode=TRACE_MODE_WRITE, cache=False))
    for kind, (fields, what) in EVENTS.items():
        d = tree.dir(events, kind)
        tree.add(d, "enable", Attr(lambda kind=kind: f"{int(tracer.is_enabled(kind))}\n",
                                   lambda text, kind=kind: tracer.enable(kind, _switch(text)),
                                   mode=TRACE_MODE_WRITE, cache=False))
        fmt = f"name: {kind}\nfields: {' '.join(fields)}\nprint fmt: TIMESTAMP {kind} " + \
            " ".join(f"{f}=%s" for f in fields) + f"\ndescription: {what}\n"
        tree.add(d, "format", Attr(lambda fmt=fmt: fmt, mode=TRACE_MODE_READ))
    wake = Wakeup()
    tracer.on_line.append(wake.notify)
    tree.add(top, "trace_pipe", Pipe(lambda flags: PipeReader(trace, wake, bool(flags & os.O_NONBLOCK)),
                                       mode=TRACE_MODE_READ))
