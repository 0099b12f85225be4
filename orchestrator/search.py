"""Run a search end to end, resume one, and show what searches the storage path holds.

``run_search`` connects to Ray, opens the MLflow parent run, fits the Tuner (Ray Tune
prints its own progress) and returns the results table; it leaves a small record
(``normlab/search.json``) in the search's folder so that ``resume_search`` can restore the
Tuner with the same trainable and tracking. ``search_status`` reads Ray Tune's experiment
state from the storage path, without connecting to a cluster. The storage path is a local
folder or a URI such as ``s3://bucket/prefix`` (see ``orchestrator.storage``); the record
goes through the same filesystem as Ray's own files.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator import snapshots, storage
from orchestrator.callbacks import StateBackupCallback, TrialRunsCallback, trial_error
from orchestrator.run_names import varying_keys
from orchestrator.spaces import SearchSpace
from orchestrator.storage import Location
from orchestrator.summary import SearchSummary, describe, log_search_summary
from orchestrator.tracking import (
    DRIVER_BUDGET_S,
    MlflowTrialTracker,
    TrackingTarget,
    check_reachable,
    search_running,
    start_search_run,
)
from orchestrator.tuner import TrialResolver, build_tuner, init_ray, trainable
from orchestrator.ui_links import search_url

RESULT_COLUMNS = ("final_clean_acc", "final_adv_acc")


@dataclass
class SearchOutcome:
    """What a finished search leaves: where it is, its table, how many trials failed."""

    experiment_path: str
    table: Table
    rows: list[dict[str, Any]]
    failed: int
    ui_url: str = ""
    summary: SearchSummary | None = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def results_table(title: str, rows: list[dict[str, Any]], keys: list[str]) -> Table:
    """One row per trial: status, the keys that vary, clean and adversarial accuracy."""
    table = Table(title=title)
    columns = ["trial", "status", *keys, "epochs", *RESULT_COLUMNS]
    for column in columns:
        table.add_column(column, justify="right" if column in (*RESULT_COLUMNS, "epochs") else "left")
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    return table


def _row(result: Any, resolver: TrialResolver, keys: list[str]) -> dict[str, Any]:
    values = resolver(result.config or {})
    metrics = result.metrics or {}
    trial = metrics.get("trial_id") or (Path(result.path).name if result.path else "?")
    row = {"trial": trial, "status": "ERROR" if result.error else "OK"}
    row.update({k: values.get(k, "(default)") for k in keys})
    row["epochs"] = metrics.get("epoch")
    row.update({c: metrics.get(c) for c in RESULT_COLUMNS})
    if result.error:
        row["error"] = str(result.error).strip().splitlines()[-1][:200]
    return row


class SearchStorageError(RuntimeError):
    """The search ran, but its results could not be read back from the storage path."""


def _fit(tuner: Any, experiment_path: str) -> Any:
    """``tuner.fit()``; a storage that broke under the search (full, unmounted) is one clear error.

    Tune keeps running trials when it cannot save its state, and reads every trial's
    (possibly truncated) error file back only at the end.
    """
    import pickle

    try:
        return tuner.fit()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise SearchStorageError(
            f"the search ended, but its results could not be read back from {experiment_path} "
            f"({type(exc).__name__}: {exc}). Is the storage full or gone? `normlab status` lists the trials; "
            f"free space, then `normlab resume {experiment_path}`"
        ) from exc


def _finish(tracker: MlflowTrialTracker, space: SearchSpace, console: Console, folder: Location) -> SearchSummary | None:
    """The search's summary on its parent run (never raises: the search is done either way)."""
    summary = log_search_summary(tracker, metric=space.search.metric, mode=space.search.mode, budget_s=DRIVER_BUDGET_S)
    if summary is None:
        console.print(f"[yellow]warning:[/] the search's summary is not in MLflow (see the warning above); "
                      f"`normlab resume {escape(folder.uri)}` logs it once the server answers", soft_wrap=True)
    else:
        console.print(escape(describe(summary)))
    return summary


def _summarise(grid: Any, space: SearchSpace, folder: Location, console: Console) -> SearchOutcome:
    resolver = TrialResolver(space.fixed, frozenset(space.conditional_keys()))
    keys = space.trial_keys()
    rows = sorted((_row(result, resolver, keys) for result in grid), key=lambda r: r["trial"])
    failed = sum(r["status"] == "ERROR" for r in rows)
    for row in rows:
        if row["status"] == "ERROR":
            console.print(f"[red]{row['trial']}[/]: {row['error']}")
    return SearchOutcome(folder.uri, results_table(f"search {folder.name}", rows, keys), rows, failed)


def run_search(
    space: SearchSpace,
    space_file: Path,
    target: TrackingTarget,
    *,
    address: str | None = None,
    storage_path: str | None = None,
    num_cpus: int | None = None,
    console: Console | None = None,
) -> SearchOutcome:
    """Run every trial of ``space`` on Ray Tune, tracked in MLflow; return the results table."""
    console = console or Console(stderr=True)
    root = storage.resolve(storage_path)
    storage.require_bucket(root)
    experiment = f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = root.child(experiment)
    experiment_path = folder.uri
    where = init_ray(address, num_cpus=num_cpus)
    console.print(f"search {space.name!r}: {space.trial_count()} trial(s) on Ray {where}")
    console.print(f"  results and checkpoints: {experiment_path}")
    params = {
        "algorithm": space.search.algorithm, "num_samples": space.search.num_samples, "metric": space.search.metric,
        "mode": space.search.mode, "scheduler": space.search.scheduler.type, "trials": space.trial_count(),
        "cpu_per_trial": space.resources.cpu, "gpu_per_trial": space.resources.gpu, "max_failures": space.max_failures,
        **{f"fixed.{k}": v for k, v in space.fixed.items()},
    }
    tags = {"normlab.ray_address": where, "normlab.storage_path": experiment_path}
    spec = space.model_dump(mode="json", by_alias=True)
    # repeats of one grid point (num_samples > 1, nothing sampled) have the same name but for the trial number
    repeats = space.search.algorithm != "optuna" and space.search.num_samples > 1 and not space.sample
    conditions = {k: key.when for k, key in (*space.grid.items(), *space.sample.items()) if key.when}
    tracker = start_search_run(target, space.name, experiment, params=params, spec=spec, spec_file=space_file, tags=tags,
                               name_keys=varying_keys(space.trial_keys()), name_conditions=conditions,
                               number_names=repeats)
    url = search_url(tracker.tracking_uri, tracker.experiment_id, tracker.search_run, tracker.parent_run_id)
    where_ui = " (serve it with `normlab ui`)" if target.is_local_file_store else ""
    console.print(f"  MLflow: {target.uri} (experiment {space.name!r}, run {experiment!r})")
    console.print(f"  MLflow UI: {url}{where_ui}", soft_wrap=True, markup=False)
    with search_running(tracker):
        # Ray resolves root.uri with the same pyarrow call as normlab did
        tuner = build_tuner(space, storage_path=root.uri, experiment=experiment, tracker=tracker,
                            callbacks=[TrialRunsCallback(tracker), StateBackupCallback(experiment_path)])
        write_record(folder, SearchRecord(spec, str(space_file), target.uri, target.artifact_root, tracker))
        grid = _fit(tuner, experiment_path)
        summary = _finish(tracker, space, console, folder)
    outcome = _summarise(grid, space, folder, console)
    outcome.ui_url, outcome.summary = url, summary
    return outcome


# ------------------------------------------------------------------------ resume

RECORD_FILE = "normlab/search.json"  # in a subfolder: Ray rewrites the top-level files of a search in place
LEGACY_RECORD_FILE = "normlab_search.json"


@dataclass
class SearchRecord:
    """What ``normlab resume`` needs besides Ray's own state: the space and where it logs."""

    space: dict[str, Any]
    space_file: str
    tracking_uri: str
    artifact_root: str | None
    tracker: MlflowTrialTracker

    def to_json(self) -> str:
        return TypeAdapter(SearchRecord).dump_json(self, indent=2).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> SearchRecord:
        """Parse and check a record; ``pydantic.ValidationError`` (a ValueError) says what is wrong."""
        return TypeAdapter(cls).validate_json(text)


class RecordError(LookupError):
    """A search record that is missing, cut short or malformed: where, what, what to do."""


def write_record(folder: Location, record: SearchRecord) -> None:
    """Write the record into the search's folder, whole or not at all."""
    storage.write_atomic(folder.child(RECORD_FILE), record.to_json().encode())


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()[:5])


def load_record(folder: Location) -> tuple[SearchRecord, SearchSpace]:
    """The record of the search in ``folder`` and its validated space, or one ``RecordError``."""
    where = folder.child(RECORD_FILE)
    if not storage.exists(where) and storage.exists(folder.child(LEGACY_RECORD_FILE)):
        where = folder.child(LEGACY_RECORD_FILE)  # a search submitted by an earlier normlab
    try:
        record = SearchRecord.from_json(storage.read_bytes(where))
    except FileNotFoundError:
        raise RecordError(
            f"{where} is missing: {folder} was not made by `normlab submit` (which writes that record before the "
            "first trial), so normlab does not know its space and MLflow runs; submit the search again"
        ) from None
    except ValidationError as exc:
        cut = any(e["type"] == "json_invalid" for e in exc.errors())
        what = "is not valid JSON; it may have been cut short by a crash" if cut else "is not a normlab search record"
        raise RecordError(
            f"{where} {what} ({_problems(exc)}). It holds the search's space and MLflow run ids: restore it from a "
            "backup, or submit the search again"
        ) from None
    try:
        return record, SearchSpace.model_validate(record.space)
    except ValidationError as exc:
        raise RecordError(f"{where} holds a search space this normlab cannot run ({_problems(exc)}); "
                          "resume it with the normlab version that submitted it, or submit the search again") from None


def find_experiment(path_or_name: str, storage_path: str | None = None) -> Location:
    """A search folder given as a path or URI, or the newest search of that name in the storage path."""
    if storage.is_uri(path_or_name) or Path(path_or_name).expanduser().is_dir():
        folder = storage.resolve(path_or_name)
        if storage.exists(folder.child(RECORD_FILE)) or storage.latest_snapshot(folder) is not None:
            return folder
        if storage.is_uri(path_or_name):
            raise LookupError(f"no search at {folder} (neither {RECORD_FILE} nor Ray Tune's experiment state)")
    found = experiment_dirs(storage_path, path_or_name)
    if not found:
        root = storage.resolve(storage_path)
        raise LookupError(f"no search folder {path_or_name!r} (a path, or a search name under {root})")
    return found[-1]


def resume_search(
    folder: Location, *, address: str | None = None, num_cpus: int | None = None, console: Console | None = None
) -> SearchOutcome:
    """Continue an interrupted or failed search: unfinished trials from their checkpoints,
    errored ones too; each keeps logging to its own MLflow run."""
    from ray import tune

    console = console or Console(stderr=True)
    repaired = snapshots.repair(folder)
    if repaired:
        console.print(f"[yellow]repaired[/] damaged Ray Tune state from normlab's last good copy: {', '.join(repaired)}")
    record, space = load_record(folder)
    check_reachable(TrackingTarget(record.tracking_uri, record.artifact_root))
    where = init_ray(address, num_cpus=num_cpus)
    console.print(f"resuming search {folder.name} on Ray {where}; MLflow {record.tracking_uri}")
    retried = clear_fatal_markers(folder)
    if retried:
        console.print(f"retrying {len(retried)} trial(s) that failed with a non-retryable error: {', '.join(retried)}")
    with search_running(record.tracker, resumed=True):
        # the folder's URI, as submit gave Ray its parent: Ray resolves it with the same pyarrow call
        tuner = tune.Tuner.restore(
            folder.uri, trainable=trainable(space, record.tracker), resume_unfinished=True, resume_errored=True
        )
        grid = _fit(tuner, folder.uri)
        summary = _finish(record.tracker, space, console, folder)
    outcome = _summarise(grid, space, folder, console)
    tracker = record.tracker
    outcome.ui_url = search_url(tracker.tracking_uri, tracker.experiment_id, tracker.search_run, tracker.parent_run_id)
    outcome.summary = summary
    return outcome


def clear_fatal_markers(folder: Location) -> list[str]:
    """Forget the non-retryable failures recorded in a search's trial folders (a resume is
    the user's request to try them again); returns the trial folders that had one."""
    from pyarrow import fs as pafs

    from trainables.ray_trainable import FATAL_FILE

    fs, root = folder.fs, folder.path
    cleared = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        marker = f"{info.path}/{FATAL_FILE}"
        if info.type == pafs.FileType.Directory and fs.get_file_info(marker).type == pafs.FileType.File:
            fs.delete_file(marker)
            cleared.append(info.base_name.split("_")[2] if info.base_name.count("_") >= 2 else info.base_name)
    return cleared


def experiment_dirs(storage_path: str | None, name: str | None = None) -> list[Location]:
    """Search folders in the storage path (newest last), optionally only those of search ``name``."""
    found = storage.search_folders(storage.resolve(storage_path))
    if name:
        found = [f for f in found if f.name == name or f.name.rsplit("-", 2)[0] == name]
    return found


def search_status(storage_path: str | None, name: str | None = None) -> list[Table | str]:
    """One table per search: each trial's state, epochs done and last metrics (or a line saying there are none)."""
    from ray.tune import ExperimentAnalysis

    tables: list[Table | str] = []
    for folder in experiment_dirs(storage_path, name):
        repaired = snapshots.repair(folder)
        try:
            analysis = ExperimentAnalysis(folder.uri)
        except (OSError, ValueError, EOFError) as exc:
            tables.append(escape(f"{folder.name}: Ray Tune's state cannot be read ({type(exc).__name__}: {exc}) "
                                 "and normlab has no good copy of it"))
            continue
        note = f"; state repaired from normlab's last good copy: {', '.join(repaired)}" if repaired else ""
        table = Table(title=f"{folder.name}  ({folder}){note}")
        for column in ("trial", "state", "epochs", "clean_acc", "adv_acc", "final_adv_acc", "error"):
            table.add_column(column)
        for trial in sorted(analysis.trials, key=lambda t: str(t)):
            last = trial.last_result or {}
            table.add_row(str(trial), trial.status, _fmt(last.get("epoch")), _fmt(last.get("clean_acc")),
                          _fmt(last.get("adv_acc")), _fmt(last.get("final_adv_acc")),
                          trial_error(trial)[:200] if trial.status == "ERROR" else "")
        tables.append(table)
    if not tables:
        tables.append(escape(f"no searches{' named ' + repr(name) if name else ''} in {storage.resolve(storage_path)}"))
    return tables
