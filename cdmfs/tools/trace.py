"""``cdmfs trace``: records a mount's event stream (``trace_pipe``) to a file.

Enables the events asked for (``sys/kernel/tracing/events/KIND/enable``, all
by default), reads ``sys/kernel/tracing/trace_pipe`` and writes Chrome
trace-event JSON (``trace_json``) or the lines themselves (``--format
text``), for ``--seconds N``, while ``-- COMMAND`` runs, or until Ctrl-C.
The file is whole whichever way it stops, and the switches it turned on are
turned off again.

The pipe is read without blocking, every ``POLL_S`` when it was empty.  When
recording stops, the lines waiting are taken up to those stamped after the
stop: lines carry CLOCK_MONOTONIC, the clock of ``time.monotonic()``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Optional, Sequence

from ..client import _write
from ..lib.trace import EVENTS, format_line, parse_line
from .places import meminfo
from .places import read as _read
from .places import places as mount_places
from .trace_json import JsonWriter, convert, open_text

log = logging.getLogger(__name__)

TRACING = "sys/kernel/tracing"
POLL_S = 0.02           # how long to wait when no line is waiting
PROGRESS_S = 0.25       # how often the terminal's count is redrawn


class TraceError(Exception):
    """A failure to report as one line."""


# -- the mount --------------------------------------------------------------

def tracing_dir(mountpoint: str) -> str:
    if not os.path.isdir(os.path.join(mountpoint, "regions")):
        raise TraceError(f"{mountpoint} is not a cdmfs mount")
    d = os.path.join(mountpoint, TRACING)
    if not os.path.exists(os.path.join(d, "trace_pipe")):
        raise TraceError(f"{mountpoint} has no {TRACING}/trace_pipe (a cdmfs without tracing?)")
    return d


def choose_events(words: Optional[str]) -> list[str]:
    """``--events a,b``: kinds of EVENTS (every one without it)."""
    if not words:
        return list(EVENTS)
    kinds = [w.strip() for w in words.split(",") if w.strip()]
    bad = [k for k in kinds if k not in EVENTS]
    if bad or not kinds:
        raise TraceError(f"no event {', '.join(bad) or repr(words)} (the kinds: {', '.join(EVENTS)})")
    return kinds


class Switches:
    """The ``events/KIND/enable`` files: turns kinds on, and back off at the
    end, only those that were off (another reader may want the rest)."""

    def __init__(self, tracing: str, kinds: Sequence[str]):
        self.tracing = tracing
        self.kinds = kinds
        self.turned_on: list[str] = []

    def path(self, kind: str) -> str:
        return os.path.join(self.tracing, "events", kind, "enable")

    def __enter__(self) -> "Switches":
        for kind in self.kinds:
            try:
                if _read(self.path(kind)).strip() != "1":
                    _write(self.path(kind), "1\n")
                    self.turned_on.append(kind)
            except FileNotFoundError:
                log.info("the mount has no event %s", kind)
        return self

    def __exit__(self, *exc) -> None:
        for kind in self.turned_on:
            try:
                _write(self.path(kind), "0\n")
            except OSError as e:        # the mount went away meanwhile
                log.warning("could not turn %s off again: %s", kind, e)


def places_now(mountpoint: str) -> dict[str, tuple[str, int, int]]:
    """Every place memory lives: ``{"0": (title, used kB, total kB), ...}``."""
    out = {}
    for p in mount_places(mountpoint):
        info = meminfo(p.meminfo)
        out[p.name] = (p.title, info.get("MemUsed", 0), info.get("MemTotal", 0))
    return out


def usage_lines(where: dict[str, tuple[str, int, int]]) -> list[str]:
    """``mem_usage`` lines of every place now: the counter tracks start at
    the recording's start and last to its end, changes or not."""
    now = time.monotonic_ns()
    return [format_line(now, "mem_usage", (p, used, total)) for p, (_, used, total) in where.items()]


# -- recording ----------------------------------------------------------------

class Pipe:
    """trace_pipe, opened O_NONBLOCK: a read takes the lines waiting and
    never waits itself, so nothing stops the recorder from stopping (a
    blocking read would wait for the next line, maybe forever)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.rest = b""

    def lines(self) -> list[str]:
        """The whole lines waiting now; [] for none."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                raise TraceError(f"trace_pipe failed: {e.strerror}") from None
            if not chunk:
                raise TraceError("trace_pipe ended: the mount went away?")
            chunks.append(chunk)
            if len(chunk) < 1 << 15:        # most likely all there was
                break
        if not chunks:
            return []
        *whole, self.rest = (self.rest + b"".join(chunks)).split(b"\n")
        return [line.decode("utf-8", "replace") + "\n" for line in whole]

    def close(self) -> None:
        os.close(self.fd)


class Sink:
    """The output file: JSON events or the lines."""

    def __init__(self, path: str, fmt: str, names: dict[str, str]):
        self.file: IO[str] = open_text(path, "w")
        self.json = JsonWriter(self.file, names) if fmt == "json" else None
        self.count = 0

    def line(self, line: str) -> None:
        self.count += 1
        if self.json is not None:
            self.json.line(line)
        else:
            self.file.write(line)

    def close(self) -> None:
        if self.json is not None:
            self.json.close()
        self.file.close()


class Progress:
    """``N events recorded`` on a terminal's stderr, redrawn in place."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.last = 0.0
        self.width = 0

    def show(self, count: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < PROGRESS_S):
            return
        self.last = now
        text = f"cdmfs trace: {count} events recorded"
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


def copy(pipe: Pipe, sink: Sink, progress: Progress, done: Callable[[], bool]) -> None:
    """Moves lines from the pipe to the file until done() says stop."""
    while not done():
        lines = pipe.lines()
        for line in lines:
            sink.line(line)
        progress.show(sink.count)
        if not lines:
            time.sleep(POLL_S)


def drain(pipe: Pipe, sink: Sink, stop: float) -> None:
    """The lines stamped up to ``stop`` still waiting (a read gives the
    daemon's every line up to the moment, the C core's faults included)."""
    while lines := pipe.lines():
        for line in lines:
            try:
                ts = parse_line(line)[0]
            except ValueError:
                ts = 0.0
            if ts > stop:
                return
            sink.line(line)


def end_child(child: subprocess.Popen) -> int:
    """The command's status once it ended: a Ctrl-C reached it too, a
    SIGTERM or SIGHUP to cdmfs trace did not, so it gets one after 2 s."""
    for ask in (None, child.terminate, child.kill):
        if ask is not None:
            ask()
        try:
            return child.wait(timeout=2 if ask is None else 5)
        except subprocess.TimeoutExpired:
            continue
    return child.wait()


# Set by a signal that asks the recording to stop (stop_on_signals).
STOP = threading.Event()


def stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal or ssh session gone) stop a
    recording between two lines, the file whole: an exception raised at
    any point could cut a write to a gzip'd file in two.  For the main
    thread only."""
    def stop(signum, frame):
        STOP.set()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def record(mountpoint: str, out: str, fmt: str = "json", seconds: Optional[float] = None,
           command: Optional[Sequence[str]] = None, events: Optional[str] = None,
           on_start: Optional[Callable[[], None]] = None, done: Optional[Callable[[], bool]] = None,
           progress: bool = True) -> tuple[int, int]:
    """Records to ``out`` until ``seconds`` have passed, the command ended,
    ``done()`` says so, or Ctrl-C; returns the command's exit status (0
    without one) and the count of lines recorded.  Ctrl-C is a way to stop
    like the others: the file is whole and the status the command's."""
    tracing = tracing_dir(mountpoint)
    kinds = choose_events(events)
    where = places_now(mountpoint)
    names = {p: title for p, (title, _, _) in where.items()}
    shown = Progress(progress and sys.stderr.isatty())
    try:
        sink = Sink(out, fmt, names)
    except OSError as e:
        raise TraceError(f"cannot write {out}: {e.strerror}") from None
    child: Optional[subprocess.Popen] = None
    pipe: Optional[Pipe] = None
    status = 0
    try:
        # The usage now, stamped before the pipe opens: every line the
        # pipe gives is later, and the file stays in time order.  The pipe
        # opens before the switches turn on, so nothing is missed.
        for line in usage_lines(where):
            sink.line(line)
        try:
            pipe = Pipe(os.path.join(tracing, "trace_pipe"))
        except PermissionError:
            raise TraceError("tracing is root's, as tracefs is (run cdmfs trace as root)") from None
        with Switches(tracing, kinds):
            if command:
                try:
                    child = subprocess.Popen(list(command))
                except OSError as e:
                    raise TraceError(f"cannot run {command[0]}: {e.strerror}") from None
            if on_start is not None:
                on_start()
            end = time.monotonic() + seconds if seconds is not None else None

            def finished() -> bool:
                if STOP.is_set():
                    return True
                if child is not None and child.poll() is not None:
                    return True
                if end is not None and time.monotonic() >= end:
                    return True
                return done is not None and done()
            try:
                copy(pipe, sink, shown, finished)
            except KeyboardInterrupt:
                pass        # the terminal's Ctrl-C reached the command too
            stop = time.monotonic()
            if child is not None:
                status = end_child(child)
                if status < 0:      # killed by a signal: as a shell reports it
                    status = 128 - status
            drain(pipe, sink, stop)
            for line in usage_lines(places_now(mountpoint)):
                sink.line(line)
    finally:
        if pipe is not None:
            pipe.close()        # before the mount may go (cdmfs demo unmounts next)
        shown.clear()
        sink.close()
        if child is not None and child.poll() is None:
            child.kill()
    return status, sink.count


def convert_file(src: str, out: str) -> int:
    """``--convert``: a text trace (``--format text``) to JSON; the count of lines."""
    import json
    try:
        with open_text(src) as f:
            lines = f.readlines()
    except OSError as e:
        raise TraceError(f"cannot read {src}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{src} is not a text trace") from None
    try:
        doc = convert(lines)
    except (ValueError, IndexError):
        raise TraceError(f"{src} is not a text trace (cdmfs trace --format text)") from None
    try:
        with open_text(out, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
    except OSError as e:
        raise TraceError(f"cannot write {out}: {e.strerror}") from None
    return len(lines)


def default_format(path: str) -> str:
    """text for FILE.txt (or .txt.gz), else JSON."""
    return "text" if path.removesuffix(".gz").endswith(".txt") else "json"
