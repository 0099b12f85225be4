"""Timed spans of a search's processes, for the whole-search benchmark; off unless asked.

With ``NORMLAB_PROFILE=DIR`` in the environment (Ray's workers inherit the driver's), every
process that runs a span (the driver, each trial's worker) appends one JSON line per span
to ``DIR/spans-<pid>.jsonl``::

    {"span": "trial.train", "start": 1796608427.51, "end": 1796608427.70, "pid": 19584, "trial": "train_0975e_00001", ...}

Times are wall-clock seconds (``time.time()``), so the spans of processes on one machine
line up on one timeline (``benchmarks/bench_search.py`` reads them). Without the variable a
span costs one environment lookup; nothing is written. A span that cannot be written is
dropped: profiling never fails the work it measures.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV = "NORMLAB_PROFILE"
_context: dict[str, Any] = {}


def enabled() -> bool:
    """Whether spans are being recorded in this process."""
    return bool(os.environ.get(ENV))


def set_context(**fields: Any) -> None:
    """Fields added to every later span of this process (e.g. the trial a worker now runs)."""
    _context.clear()
    _context.update(fields)


def record(name: str, start: float, end: float | None = None, **fields: Any) -> None:
    """Record a span that has already happened (``end`` None: now)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    line = {"span": name, "start": start, "end": time.time() if end is None else end, "pid": os.getpid()}
    line.update(_context)
    line.update(fields)
    try:
        path = Path(folder) / f"spans-{os.getpid()}.jsonl"
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
    except OSError:
        pass


@contextmanager
def span(name: str, **fields: Any) -> Iterator[None]:
    """Time the block as span ``name`` (recorded also when the block raises)."""
    if not enabled():
        yield
        return
    start = time.time()
    try:
        yield
    finally:
        record(name, start, **fields)


def process_started() -> float:
    """When this process started (wall clock): the start of its imports."""
    try:
        import psutil  # Ray's dependency; present wherever a trial runs

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - profiling never fails the work
        return time.time()


def read_spans(folder: str | Path) -> list[dict[str, Any]]:
    """Every span recorded under ``folder``, by start time."""
    spans = []
    for path in sorted(Path(folder).glob("spans-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                spans.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed process
    return sorted(spans, key=lambda s: s["start"])
