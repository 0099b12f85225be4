"""What a trial's tracking run must show, and the interface of whoever records it.

A ``TrialRecord`` is plain data (no Ray, no MLflow): the trial's id and name, its config,
its run id once it has one, its per-epoch metric history and facts about the current
attempt. It travels inside every checkpoint's manifest, so the driver can bring a run up
to date from storage without the trial. A ``TrialTracker`` makes a run match a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trainables.metrics import is_final_metric


@dataclass
class TrialRecord:
    """What a trial's tracking run must show: its config, run, per-epoch history and facts.

    ``config`` is the validated config (or the raw values when they did not validate);
    ``epochs`` the number the trial trains (None when unknown). The record travels in each
    checkpoint's manifest, so the driver can bring the run up to date without the trial.
    """

    trial_id: str
    trial_name: str
    config: dict[str, Any]
    epochs: int | None = None
    run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """The last epoch, with its final sweep, is in the history."""
        return bool(self.history) and self.epochs is not None and self.history[-1].get("epoch") == self.epochs

    @property
    def final(self) -> dict[str, float]:
        return {k: v for k, v in self.history[-1].items() if is_final_metric(k)} if self.finished else {}

    def manifest_extra(self) -> dict[str, Any]:
        return {"record": {k: v for k, v in self.__dict__.items() if k != "history"}}

    @classmethod
    def from_manifest(cls, extra: dict[str, Any], history: list[dict[str, Any]]) -> TrialRecord:
        return cls(**extra["record"], history=list(history))


class TrialTracker(Protocol):
    """Where a trial records itself (e.g. an MLflow child run). ``sync`` opens or re-attaches
    the run (setting ``record.run_id``), logs the epochs it lacks and, with ``finish`` on a
    finished record, closes it; ``fail`` closes it with a reason. Neither raises for an
    unreachable server: they return False after ``budget_s`` seconds of trying."""

    def sync(
        self, record: TrialRecord, *, budget_s: float, checkpoint_file: Path | None = None, finish: bool = False
    ) -> bool: ...
    def fail(self, record: TrialRecord, reason: str, *, retryable: bool, budget_s: float) -> bool: ...
