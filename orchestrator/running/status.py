"""``normlab status``: what searches a storage path holds, read without connecting to Ray.

One table per search (per stage for a multi-stage search): each trial by the name its
MLflow run has (``run_names``, computed from the search record and what the trial
reported, so it needs no MLflow), its state, epochs done, last metrics and, for trials that
errored, why. Ray Tune's state that a crash or a full disk cut short is first put back from
normlab's last good copy (``snapshots``). A search run as a Ray job gets a line with the
job's state, asked of the dashboard it recorded (``jobs``) or of the one given.
"""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape
from rich.table import Table

from orchestrator.running.callbacks import trial_error
from orchestrator.running.jobs import JobError, connect, find_job, job_line, read_jobs
from orchestrator.running.tuner import TrialResolver
from orchestrator.searchfile.space import StageView, stage_views
from orchestrator.state import snapshots, storage
from orchestrator.state.records import RecordError, SearchRecord, experiment_dirs, load_record
from orchestrator.state.storage import Location
from orchestrator.tracking.run_names import run_name, stage_naming


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


class _Namer:
    """The MLflow run name of each trial of one stage (as ``MlflowTrialTracker.run_name`` gives it), from
    the search record and what Ray holds of the trial; Ray's trial name for a search without a record
    or recorded before readable names."""

    def __init__(self, record: SearchRecord | None, view: StageView | None) -> None:
        readable = record is not None and view is not None and record.tracker.name_keys is not None
        self.fixed = view.space.fixed if view else {}
        self.resolver = TrialResolver(self.fixed, frozenset(view.space.conditional_keys())) if view else None
        self.naming = stage_naming(view.space) if readable and view else None

    def __call__(self, trial: Any) -> str:
        if self.naming is None or self.resolver is None:
            return str(trial)
        last = trial.last_result or {}
        knobs = last.get("knobs") or self.resolver.varying(trial.config or {})
        values = {k: v for k, v in {**self.fixed, **knobs}.items() if not str(k).startswith("_")}
        return run_name(_validated(values), self.naming.keys, trial.trial_id, **self.naming.options)


def _validated(values: dict[str, Any]) -> dict[str, Any]:
    """The trial's config as its run records it (defaults filled in); the values as they are if they
    do not validate (the run shows them so too)."""
    from pydantic import ValidationError

    from trainables.config import TrialConfig

    try:
        return TrialConfig.model_validate(values).model_dump(mode="json")
    except (ValidationError, ValueError, TypeError):
        return values


def _stage_folders(folder: Location) -> list[tuple[str, Location, _Namer]]:
    try:
        record, space = load_record(folder)
    except RecordError:  # not made by normlab submit, or an unreadable record: Ray's state alone
        return [("", folder, _Namer(None, None))]
    return [
        (view.name, folder.child(view.name) if view.name else folder, _Namer(record, view))
        for view in stage_views(space)
    ]


def _number_repeats(names: list[str], trials: list[Any]) -> list[str]:
    """A name another trial of the stage holds too gets the Ray trial number, except the first's
    (MLflow keeps the first run created under it; here Ray's order stands for that)."""
    from orchestrator.tracking.run_names import numbered

    seen: set[str] = set()
    out = []
    for name, trial in zip(names, trials, strict=True):
        out.append(numbered(name, trial.trial_id) if name in seen else name)
        seen.add(name)
    return out


def _table(title: str, folder: Location, namer: _Namer) -> Table | str:
    from ray.tune import ExperimentAnalysis

    if storage.latest_snapshot(folder) is None:
        return escape(f"{title}: not started yet")
    repaired = snapshots.repair(folder)
    try:
        analysis = ExperimentAnalysis(folder.uri)
    except (OSError, ValueError, EOFError) as exc:
        return escape(
            f"{title}: Ray Tune's state cannot be read ({type(exc).__name__}: {exc}) and normlab has no good copy of it"
        )
    note = f"; state repaired from normlab's last good copy: {', '.join(repaired)}" if repaired else ""
    table = Table(title=f"{title}  ({folder}){note}")
    for column in ("trial", "state", "epochs", "clean_acc", "adv_acc", "final_adv_acc", "error"):
        table.add_column(column)
    trials = sorted(analysis.trials, key=lambda t: str(t))
    names = _number_repeats([namer(t) for t in trials], trials)
    for trial, name in zip(trials, names, strict=True):
        last = trial.last_result or {}
        table.add_row(
            escape(name),
            trial.status,
            _fmt(last.get("epoch")),
            _fmt(last.get("clean_acc")),
            _fmt(last.get("adv_acc")),
            _fmt(last.get("final_adv_acc")),
            trial_error(trial)[:200] if trial.status == "ERROR" else "",
        )
    return table


class _Jobs:
    """Job servers asked once each (a dashboard that does not answer is said once)."""

    def __init__(self, dashboard: str | None) -> None:
        self.dashboard = dashboard
        self.clients: dict[str, Any] = {}

    def client(self, address: str) -> Any:
        if address not in self.clients:
            try:
                self.clients[address] = connect(address)
            except JobError as exc:
                self.clients[address] = exc
        return self.clients[address]

    def line(self, job_id: str, address: str) -> str:
        client = self.client(address)
        if isinstance(client, JobError):
            return f"Ray job {job_id}: state unknown ({client})"
        try:
            return job_line(client.get_job_info(job_id), address)
        except Exception as exc:  # noqa: BLE001  (a job the server no longer knows: say so, show the trials)
            return f"Ray job {job_id}: not known to {address} ({type(exc).__name__})"

    def of_search(self, folder: Location) -> tuple[str | None, str | None]:
        """The line of the newest job that ran the search in ``folder`` and its id (None, None: no job)."""
        jobs = read_jobs(folder)
        if not jobs:
            return None, None
        newest = jobs[0]
        address = self.dashboard or newest.get("dashboard") or ""
        if not address:
            return f"Ray job {newest['submission_id']}: no dashboard recorded; give --address", newest["submission_id"]
        return escape(self.line(newest["submission_id"], address)), newest["submission_id"]


def search_status(storage_path: str | None, name: str | None = None, dashboard: str | None = None) -> list[Table | str]:
    """One table per search (and stage), each after its Ray job's line for a search run as a job;
    with ``dashboard`` and ``name``, also the newest job of the search that has no folder yet (it
    waits to start, or ended before it made one); a line saying there are none."""
    tables: list[Table | str] = []
    jobs = _Jobs(dashboard)
    shown: set[str] = set()
    folders = experiment_dirs(storage_path, name)
    for folder in folders:
        line, job_id = jobs.of_search(folder)
        if line:
            tables.append(line)
            shown.add(str(job_id))
        for stage, stage_folder, namer in _stage_folders(folder):
            tables.append(_table(f"{folder.name} / stage {stage}" if stage else folder.name, stage_folder, namer))
    if dashboard and name:
        client = jobs.client(dashboard)
        if isinstance(client, JobError):
            raise client
        try:
            newest = find_job(client, name)
        except JobError:
            newest = None
        if newest is not None and newest.submission_id not in shown:
            tables.insert(0, escape(job_line(newest, dashboard)))
    if not folders:
        tables.append(escape(f"no searches{' named ' + repr(name) if name else ''} in {storage.resolve(storage_path)}"))
    return tables
