"""Test-only fault injection: SIGKILL this worker at a named point of a trial, or hold a
trial before an epoch until the test lets it go on.

Inactive unless the environment variable ``NORMLAB_FAULTS`` names a JSON plan::

    {"kills": [{"trial": "00001", "epoch": 2, "point": "after_sync"}, ...],
     "holds": [{"trial": "*", "epoch": 3, "until": "/tmp/faults/go"}, ...],
     "state_dir": "/tmp/faults"}

``trial`` is a substring of the Ray trial name (``"*"``: any trial). Points, in the
order an epoch passes them: ``before_sync`` (the epoch is trained, nothing recorded),
``after_sync`` (its metrics are in MLflow, its checkpoint is not yet saved),
``after_report`` (checkpoint persisted, old ones not yet pruned). Each kill fires once:
a marker in ``state_dir`` records it before the signal, so the retried trial passes.
``state_dir/<trial name>.json`` always holds the worker's pid and the epoch it is
training, so a test can also kill a worker from outside in the middle of an epoch.

A hold stops a trial before it trains ``epoch`` (its earlier epochs recorded and
checkpointed, its state file already naming ``epoch``) until the file ``until`` exists,
at most ``HOLD_MAX_S``: a test can then change the world (fill a disk) while every trial
is at a known epoch, instead of racing the trials.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

ENV = "NORMLAB_FAULTS"
POINTS = ("before_sync", "after_sync", "after_report")
HOLD_MAX_S = 300.0


def _plan() -> dict | None:
    path = os.environ.get(ENV)
    if not path:
        return None
    plan = json.loads(Path(path).read_text())
    unknown = sorted({k.get("point") for k in plan.get("kills", [])} - set(POINTS), key=str)
    if unknown:  # a typo would silently never fire
        raise ValueError(f"{ENV}={path}: unknown kill point(s) {unknown}; known: {', '.join(POINTS)}")
    return plan


def _matches(fault: dict, trial_name: str, epoch: int) -> bool:
    return fault["epoch"] == epoch and (fault["trial"] == "*" or fault["trial"] in trial_name)


def training(trial_name: str, epoch: int) -> None:
    """Record that this worker (pid) is now training ``epoch`` of ``trial_name``; then wait
    while a hold for that epoch says so."""
    plan = _plan()
    if plan is None:
        return
    state = Path(plan["state_dir"])
    state.mkdir(parents=True, exist_ok=True)
    tmp = state / f".{trial_name}.json.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "epoch": epoch, "time": time.time()}))
    os.replace(tmp, state / f"{trial_name}.json")
    for hold in plan.get("holds", []):
        if _matches(hold, trial_name, epoch):
            release, deadline = Path(hold["until"]), time.monotonic() + HOLD_MAX_S
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def maybe_kill(point: str, trial_name: str, epoch: int) -> None:
    """SIGKILL this process if the plan says so for (trial, epoch, point) and it has not fired yet."""
    plan = _plan()
    if plan is None:
        return
    for kill in plan.get("kills", []):
        if kill["point"] != point or not _matches(kill, trial_name, epoch):
            continue
        marker = Path(plan["state_dir"]) / f"killed-{trial_name}-{point}-{epoch}"
        if marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
