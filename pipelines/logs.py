"""How a run tells what it is doing, in one of four modes the CLI sets (`set_log_mode`):
- bars: a terminal; fastprogress bars redraw their line;
- lines: stdout is a file or a pipe; one line per event (per epoch, per lr_find, ...), and for long loops (rendering,
  features, prediction, an epoch's batches) a line every PROGRESS_SECONDS, never a redrawn bar;
- json: one JSON object per line per event, `{"event": ..., "message": ..., <fields>}`, for programs;
- quiet: nothing but warnings and errors (stderr).
Library code logs through a `log` callable (print by default: a notebook sees plain lines); `emit` hands the
event's fields to `say`, the CLI's logger, and just the message to any other. No fastai here: prediction imports it.
"""
from __future__ import annotations

import json
import math
import sys
import time

MODES = ("bars", "lines", "json", "quiet")
PROGRESS_SECONDS = 10.0  # lines and json modes: a long loop reports this often

_mode = "bars"  # as a notebook or a library user gets it; the CLI chooses with choose_mode


def set_log_mode(mode: str) -> None:
    """Set the process's log mode (one of MODES)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"log mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def log_mode() -> str:
    return _mode


_verbose = False  # --verbose: per-class recall on epoch lines, the precision probe's timings


def set_verbose(on: bool) -> None:
    """Set whether logs carry the details a newcomer does not need (the CLI's --verbose)."""
    global _verbose
    _verbose = bool(on)


def verbose() -> bool:
    return _verbose


def choose_mode(*, quiet: bool = False, json_logs: bool = False, terminal: bool | None = None) -> str:
    """--json-logs wins over --quiet; otherwise bars on a terminal, lines elsewhere."""
    if json_logs:
        return "json"
    if quiet:
        return "quiet"
    return "bars" if (sys.stdout.isatty() if terminal is None else terminal) else "lines"


def _plain(value):
    """JSON for what json.dumps does not take: numpy numbers and arrays, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _finite(value):
    """NaN and infinities are not JSON: null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def event_json(event: str, message: str, **fields) -> str:
    """One line of JSON: {"event", "message", fields...}."""
    return json.dumps(_finite({"event": event, "message": message, **fields}), default=_plain)


def say(message: str, event: str = "note", **fields) -> None:
    """The CLI's logger: `message` as a line (bars, lines), an event object (json), or nothing (quiet)."""
    if _mode == "quiet":
        return
    print(event_json(event, message, **fields) if _mode == "json" else message, flush=True)


def emit(log, event: str, message: str, **fields) -> None:
    """log(message); where `log` is `say`, the event with its fields."""
    if log is say:
        say(message, event, **fields)
    elif log is not None:
        log(message)


def _drawn() -> bool:
    """Bars mode draws where a bar can be redrawn: a terminal, or a notebook (fastprogress's HTML bars); a library
    caller writing to a file (a benchmark's log) gets none."""
    if sys.stdout.isatty():
        return True
    from fastprogress.fastprogress import IN_NOTEBOOK
    return bool(IN_NOTEBOOK)


class Progress:
    """`progress(done, total)` for a long loop (total None: not known): in bars mode a count redrawn on the
    terminal; in lines and json modes a line (an event "progress") every PROGRESS_SECONDS and one at the end if
    any came before; in quiet mode nothing. `log`: where lines go in lines and json modes (default `say`)."""

    def __init__(self, what: str, *, log=None, every: float = PROGRESS_SECONDS):
        self.what, self.log, self.every = what, log, every
        self.start = self.last = time.perf_counter()
        self.reported = False

    def __call__(self, done: int, total: int | None) -> None:
        if _mode == "quiet":
            return
        of = f"/{total}" if total is not None else ""
        if _mode == "bars":
            if _drawn():
                print(f"\r{self.what}: {done}{of}", end="\n" if done == total else "", flush=True)
            return
        now = time.perf_counter()
        if now - self.last >= self.every or (done == total and self.reported):
            self.last, self.reported = now, True
            emit(self.log or say, "progress", f"{self.what}: {done}{of} ({now - self.start:.0f} s)",
                 what=self.what, done=done, total=total, seconds=round(now - self.start, 1))

    def finish(self, done: int) -> None:
        """The closing line of a loop whose total was not known, where a line came before."""
        if _mode == "bars":
            if _drawn():
                print(flush=True)
        elif self.reported:
            self(done, done)


def progress(iterable, *, total: int | None, what: str, log=None, count=None):
    """`iterable`, reported as it goes: a fastprogress bar in bars mode where the total is known, else `Progress`.
    `count(item)`: how many things an item holds (default 1), e.g. the rows of a table chunk."""
    if _mode == "bars" and total is not None and count is None and _drawn():
        from fastprogress.fastprogress import progress_bar
        yield from progress_bar(iterable, total=total, leave=False)
        return
    report, done = Progress(what, log=log), 0
    for item in iterable:
        yield item
        done += 1 if count is None else count(item)
        report(done, total)
    if total is None:
        report.finish(done)
