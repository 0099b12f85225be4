"""One MLflow child run per trial, brought up to date exactly once per epoch.

``MlflowTrialTracker`` is what a trial (on any node) and the driver use to make a trial's
run match its ``TrialRecord`` (``trainables.ray_trainable``): ``sync`` opens the run or
re-attaches to it, logs every epoch of the record that the run does not hold yet and,
once the record is finished, closes it FINISHED with its artifacts. It is safe to repeat
at any time from anywhere, because:

- an epoch is logged as one ``log_batch`` with an ``epoch`` metric at that step, last
  (SQL stores commit a batch whole), and an epoch whose ``epoch`` step the run already
  holds is never logged again: a retry, a restarted trial, the driver and ``normlab
  resume`` can all sync the same record and every step appears once;
- a run is found again by its Ray trial id tag before one is created, also after a
  create whose answer was lost, so a trial never gets two runs;
- parameters missing from a re-attached run are logged, never changed.

A new run is named by what varies in the search (``run_names``: ``robustnorm pgd_at
p=0.31``); a name another trial of the search already holds gets the Ray trial number.
The Ray trial name stays on the run as the tag ``normlab.trial_name``.

Every call retries through outages within the caller's time budget (``retry``) and then
returns False instead of raising: tracking never fails a trial.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.credentials.uris import mask_uri
from orchestrator.tracking.client import client
from orchestrator.tracking.retry import TrackingError, TrackingUnavailable, retrying
from orchestrator.tracking.run_names import numbered, run_name
from orchestrator.tracking.target import TrackingTarget
from trainables.record import TrialRecord

TAG_SEARCH = "normlab.search"
TAG_TRIAL_ID = "normlab.trial_id"
TAG_ERROR = "normlab.error"
TAG_SEARCH_RUN = "normlab.search_run"  # the search's parent run name, on the parent and every child
PARENT_TAG = "mlflow.parentRunId"
RUNTIME_FIELDS = ("device", "threads")  # may differ between attempts: tags, not params
STEP_METRIC = "epoch"  # its presence at step e says epoch e is logged, whole

CheckpointFile = Path | Callable[[], Path | None] | None  # a file, or how to get one if it is needed
log = logging.getLogger("normlab.tracking")
_state = threading.local()  # per process and thread: run ids attached, steps known to be logged


def _known() -> dict[str, Any]:
    if not hasattr(_state, "attached"):
        _state.attached, _state.steps = set(), {}
    return {"attached": _state.attached, "steps": _state.steps}


def trial_params(config: dict[str, Any]) -> dict[str, str]:
    """Every TrialConfig field as an MLflow param (lists comma-joined), runtime fields excluded."""
    out = {}
    for key, value in config.items():
        if key in RUNTIME_FIELDS:
            continue
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        out[str(key)[:250]] = text[:6000]
    return out


def result_summary(record: TrialRecord) -> dict[str, Any]:
    """The trial's result as ``TrialResult.to_dict()`` lays it out, from its record."""
    return {
        "config": record.config,
        "history": record.history,
        "final": record.final,
        "eval_batch_size": record.config.get("eval_batch_size"),
    }


@dataclass(frozen=True)
class MlflowTrialTracker:
    """What a trial needs to keep its child run up to date; picklable, so Ray ships it to any node.

    It is also stored in the search record (``SearchRecord``): fields added later have
    defaults, so records written before them still load (and keep their old behaviour).
    ``name_keys``: the keys a run name shows after norm and regime (None: runs are named
    by their Ray trial name, as before), ``name_conditions`` the ``when`` of those that are
    conditional; ``number_names``: the search repeats identical
    configurations, so every name ends with its Ray trial number; ``search_run``: the
    parent run's name, tagged on every child so the UI can show one search's runs.

    Where its runs go is ``target``, kept in two fields: ``tracking_uri`` (never with
    credentials; the field every pickled tracker has) and ``artifact_root`` (added later:
    None in trackers pickled or recorded before it, whose search record holds the folder).
    """

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    search_name: str
    stage: str = ""  # of a multi-stage search: tags its trials' runs
    name_keys: tuple[str, ...] | None = None
    name_conditions: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    number_names: bool = False
    search_run: str = ""
    artifact_root: str | None = None

    @classmethod
    def for_target(
        cls, target: TrackingTarget, experiment_id: str, parent_run_id: str, search_name: str, **more: Any
    ) -> MlflowTrialTracker:
        """The tracker of a search's parent run in ``target``."""
        return cls(target.uri, experiment_id, parent_run_id, search_name, artifact_root=target.artifact_root, **more)

    @property
    def target(self) -> TrackingTarget:
        """Where this tracker's runs go."""
        return TrackingTarget(self.tracking_uri, self.artifact_root)

    def _client(self) -> Any:
        return client(self.target)

    def __repr__(self) -> str:  # never print a password
        return f"MlflowTrialTracker({mask_uri(self.tracking_uri)!r}, parent run {self.parent_run_id})"

    # ------------------------------------------------------------ public
    def sync(
        self,
        record: TrialRecord,
        *,
        budget_s: float,
        checkpoint_file: CheckpointFile = None,
        finish: bool = False,
        running: bool = True,
    ) -> bool:
        """Bring the trial's run up to ``record`` (see the module doc); False if the server
        could not be reached within ``budget_s`` (nothing is lost: sync again later).

        ``running``: the trial is running in this process (re-attaching sets RUNNING).
        ``finish``: close the run FINISHED (with ``checkpoint_file`` as artifact) if the
        record is finished.
        """
        try:
            self._sync(record, time.monotonic() + budget_s, checkpoint_file, finish, running)
        except TrackingError as exc:
            log.warning("trial %s: %s; its metrics wait in its checkpoints for the next sync", record.trial_name, exc)
            return False
        return True

    def _sync(
        self, record: TrialRecord, deadline: float, checkpoint_file: CheckpointFile, finish: bool, running: bool
    ) -> None:
        self._retry("open the trial's run", lambda: self._open(record, running), deadline)
        self._retry("log the trial's epochs", lambda: self._log_missing(record), deadline)
        if finish and record.finished:
            self._retry("finish the trial's run", lambda: self._finish(record, checkpoint_file), deadline)

    def fail(self, record: TrialRecord, reason: str, *, retryable: bool, budget_s: float) -> bool:
        """Close the run FAILED with ``reason`` (a run is created if the trial had none yet)."""
        deadline = time.monotonic() + budget_s

        def close() -> None:
            c = self._client()
            c.set_tag(record.run_id, TAG_ERROR, reason[:5000])
            c.set_tag(record.run_id, "normlab.retryable", str(retryable).lower())
            c.set_terminated(record.run_id, "FAILED")

        try:
            self._retry("open the trial's run", lambda: self._open(record, running=False), deadline)
            self._retry("log the trial's epochs", lambda: self._log_missing(record), deadline)
            self._retry("record the failure", close, deadline)
        except TrackingError as exc:
            log.warning("trial %s failed (%s) and its run could not say so: %s", record.trial_name, reason, exc)
            return False
        return True

    def close(
        self, record: TrialRecord, status: str, reason: str, *, budget_s: float, checkpoint_file: CheckpointFile = None
    ) -> bool | None:
        """Driver side, after the trial ended: sync what its checkpoints hold, then close a run
        its trial left open (finished -> FINISHED; otherwise ``status`` with ``reason``).

        True when done; False when the server stayed unreachable (try again later); None
        when it refused (retrying would not help).
        """
        deadline = time.monotonic() + budget_s

        def close_if_running() -> None:
            run_id = record.run_id or self.find_run(record.trial_id)
            if run_id is None:
                return
            c = self._client()
            if c.get_run(run_id).info.status == "RUNNING":
                c.set_tag(run_id, "normlab.stopped" if status != "FAILED" else TAG_ERROR, reason[:5000])
                c.set_terminated(run_id, status)

        try:
            if record.config:
                self._sync(record, deadline, checkpoint_file, finish=True, running=False)
            self._retry("close the trial's run", close_if_running, deadline)
        except TrackingUnavailable as exc:
            log.warning("trial %s: its run could not be brought up to date yet: %s", record.trial_name, exc)
            return False
        except TrackingError as exc:
            log.warning("trial %s: the tracking server refused to close its run: %s", record.trial_name, exc)
            return None
        return True

    def find_run(self, trial_id: str) -> str | None:
        """The child run already logged for a Ray trial id, if any."""
        runs = self._client().search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    # ------------------------------------------------------------ idempotent steps
    def _retry(self, what: str, call: Any, deadline: float) -> None:
        retrying(what, call, deadline, on_retry=_forget)

    def _open(self, record: TrialRecord, running: bool) -> None:
        from mlflow.entities import Param, RunTag

        known = _known()
        if record.run_id in known["attached"]:
            return
        c = self._client()
        run = None
        if record.run_id:
            try:
                run = c.get_run(record.run_id)
            except Exception as exc:  # deleted by hand: find or create another
                if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
            if run is not None and run.info.lifecycle_stage == "deleted":
                run = None
        if run is None:
            found = self.find_run(record.trial_id)
            run = c.get_run(found) if found else None
        tags = dict(record.tags)
        if run is None:
            tags.update(
                {
                    PARENT_TAG: self.parent_run_id,
                    TAG_SEARCH: self.search_name,
                    TAG_TRIAL_ID: record.trial_id,
                    "normlab.trial_name": record.trial_name,
                    "normlab.norm": str(record.config.get("norm")),
                    "normlab.regime": str(record.config.get("regime")),
                }
            )
            if self.stage:
                tags["normlab.stage"] = self.stage
            if self.search_run:
                tags[TAG_SEARCH_RUN] = self.search_run
            run = c.create_run(self.experiment_id, run_name=self.run_name(record), tags=tags)
            params = trial_params(record.config)
        else:
            params = {k: v for k, v in trial_params(record.config).items() if k not in run.data.params}
            if running:
                tags["normlab.resumed"] = "true"
                if run.info.status != "RUNNING":
                    c.update_run(run.info.run_id, status="RUNNING")
        node = record.tags.get("normlab.node_id")
        if node:
            nodes = [n for n in run.data.tags.get("normlab.nodes", "").split(",") if n]
            tags["normlab.nodes"] = ",".join(nodes if nodes and nodes[-1] == node else [*nodes, node])
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, max(len(items), 1), 100):
            c.log_batch(
                run.info.run_id,
                params=items[i : i + 100],
                tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()] if i == 0 else [],
            )
        if self.name_keys is not None and not self.number_names and run.info.run_name == self.run_name(record):
            self._number_if_taken(c, run, record)
        record.run_id = run.info.run_id
        known["attached"].add(run.info.run_id)

    def run_name(self, record: TrialRecord) -> str:
        """The name a new run of this trial gets (see ``run_names``)."""
        if self.name_keys is None:  # a search recorded before readable names
            return record.trial_name
        return run_name(
            record.config, self.name_keys, record.trial_id, number=self.number_names, conditions=self.name_conditions
        )

    def _number_if_taken(self, c: Any, run: Any, record: TrialRecord) -> None:
        """Append the Ray trial number to the name when an earlier run of the search holds it.

        Two trials that create their runs at once both see the other afterwards and agree
        on which came first (start time, then run id): only the later one is renamed.
        """
        name = run.info.run_name
        same = c.search_runs(
            [self.experiment_id],
            max_results=100,
            filter_string=(f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and attributes.run_name = '{name}'"),
        )
        mine = (run.info.start_time, run.info.run_id)
        if any((r.info.start_time, r.info.run_id) < mine for r in same if r.info.run_id != run.info.run_id):
            c.update_run(run.info.run_id, name=numbered(name, record.trial_id))

    def _log_missing(self, record: TrialRecord) -> None:
        from mlflow.entities import Metric

        steps = _known()["steps"]
        c = self._client()
        if record.run_id not in steps:
            steps[record.run_id] = {m.step for m in c.get_metric_history(record.run_id, STEP_METRIC)}
        logged = steps[record.run_id]
        for metrics in record.history:
            epoch = int(metrics["epoch"])
            if epoch in logged:
                continue
            now = int(time.time() * 1000)
            batch = [
                Metric(k, float(v), now, epoch)
                for k, v in metrics.items()
                if k != STEP_METRIC and isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
            batch.append(Metric(STEP_METRIC, float(epoch), now, epoch))  # last: its presence means the rest is in
            for i in range(0, len(batch), 1000):
                c.log_batch(record.run_id, metrics=batch[i : i + 1000])
            logged.add(epoch)

    def _finish(self, record: TrialRecord, checkpoint_file: CheckpointFile) -> None:
        from orchestrator.display.views import robustness_figure, shift_figure

        c = self._client()
        if c.get_run(record.run_id).info.status == "FINISHED":  # a re-run of the last epoch re-attached it RUNNING
            return
        if callable(checkpoint_file):  # the driver reads a stored checkpoint only when it is needed
            checkpoint_file = checkpoint_file()
        result = result_summary(record)
        c.log_dict(record.run_id, _finite(result), "result.json")
        attacks, eps = record.config.get("eval_attacks") or [], record.config.get("eval_eps") or []
        try:
            figure = robustness_figure(record.final, attacks, eps)
        except KeyError:  # a final sweep without every pair (should not happen): no plot, still finished
            figure = None
        if figure is not None:
            c.log_figure(record.run_id, figure, "robust_accuracy_vs_eps.png")
        shifts = shift_figure(record.final)  # None unless the trial ran with shift_diagnostic
        if shifts is not None:
            c.log_figure(record.run_id, shifts, "shift_by_layer.png")
        if checkpoint_file is not None:
            c.log_artifact(record.run_id, str(checkpoint_file), "checkpoint")
        c.set_terminated(record.run_id, "FINISHED")


def _forget() -> None:
    """After a failed call nothing cached can be trusted: re-read attachment and steps."""
    known = _known()
    known["attached"].clear()
    known["steps"].clear()


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
