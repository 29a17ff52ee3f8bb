"""Step tracing: timed spans of the router, the expert workers and the ingress, on one clock.

Off by default and then free: `span()` returns a shared no-op object after one global check, so the
hot path pays a function call. When on, each finished span is one tuple appended to a bounded
per-process buffer; `take()` turns them into Chrome trace-event dicts ("ph": "X", microseconds),
which Perfetto (ui.perfetto.dev) and chrome://tracing open as they are.

The clock is `time.time_ns()`: the wall clock, the same for every process of a machine (so the
router's and the workers' timelines line up without any offset estimation) and NTP-close across
machines. Each process names itself once (`set_process`) so its track reads "router" or
"expert worker 1" rather than a pid.
"""

from __future__ import annotations

import collections
import os
import threading
import time

MAX_EVENTS = 500_000  # ~60 MB of tuples at most; a few seconds of a busy server

_enabled = False
_events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
_process = ""
_thread_names: dict[int, str] = {}


def set_process(name: str) -> None:
    """The name of this process's track in a trace ("router", "expert worker 0", ...)."""
    global _process
    _process = name


def enable(on: bool = True) -> None:
    """Start (clearing what was recorded) or stop recording in this process."""
    global _enabled
    if on:
        _events.clear()
    _enabled = on


def enabled() -> bool:
    return _enabled


def now_us() -> float:
    return time.time_ns() / 1000.0


class _Span:
    __slots__ = ("name", "args", "t0")

    def __init__(self, name: str, args: dict | None):
        self.name, self.args = name, args

    def __enter__(self):
        self.t0 = now_us()
        return self

    def __exit__(self, *exc) -> None:
        record(self.name, self.t0, now_us(), self.args)


class _Off:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


_OFF = _Off()


def span(name: str, args: dict | None = None):
    """`with span("plan"): ...` records the block's start and duration when tracing is on."""
    return _Span(name, args) if _enabled else _OFF


def record(name: str, start_us: float, end_us: float, args: dict | None = None) -> None:
    """Record a span measured by the caller (start and end from `now_us()`)."""
    if not _enabled:
        return
    tid = threading.get_native_id()
    if tid not in _thread_names:
        _thread_names[tid] = threading.current_thread().name
    _events.append((name, start_us, end_us - start_us, tid, args))


def take() -> list[dict]:
    """This process's recorded spans as trace events (plus its process and thread names), and
    clear them."""
    pid = os.getpid()
    events = []
    while _events:
        name, ts, dur, tid, args = _events.popleft()
        ev = {"name": name, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid}
        if args:
            ev["args"] = args
        events.append(ev)
    meta = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": _process or f"pid {pid}"}}]
    meta += [
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}
        for tid, name in _thread_names.items()
    ]
    return meta + events


def chrome_trace(events: list[dict]) -> dict:
    """The JSON object Perfetto / chrome://tracing open: {"traceEvents": [...]}."""
    return {"traceEvents": events, "displayTimeUnit": "ms"}
