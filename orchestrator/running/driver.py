"""Run a search end to end, stage by stage, and resume one.

``run_search`` connects to Ray, opens the MLflow parent run, writes the search record
(``records``) and fits one Ray Tune experiment per stage in order (a search without
stages is one stage whose experiment is the search folder itself); a later stage starts
its trials from the final checkpoints of the earlier one (``stages``). ``resume_search``
continues whichever stage was interrupted and runs the ones after it. Both return the
results table; Ray Tune prints its own progress meanwhile. The storage path is a local
folder or a URI such as ``s3://bucket/prefix`` (``storage``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.running.callbacks import StateBackupCallback, TrialRunsCallback
from orchestrator.running.connect import init_ray
from orchestrator.running.jobs import JOB_ENV, note_job
from orchestrator.running.stage_inputs import finished_trials, seeded_combinations
from orchestrator.running.tuner import StudyRef, TrialResolver, build_tuner, trainable
from orchestrator.searchfile.space import SearchSpace, StageView, stage_views
from orchestrator.state import snapshots, storage
from orchestrator.state.records import SearchRecord, load_record, write_record
from orchestrator.state.storage import Location
from orchestrator.tracking.links import search_url
from orchestrator.tracking.run_names import stage_naming
from orchestrator.tracking.search_run import (
    DRIVER_BUDGET_S,
    MlflowTrialTracker,
    check_reachable,
    search_running,
    start_search_run,
)
from orchestrator.tracking.summary import SearchSummary, describe, log_search_summary
from orchestrator.tracking.target import TrackingTarget
from trainables import profiling
from trainables.environment import environment_tags

RESULT_COLUMNS = ("final_clean_acc", "final_adv_acc")


@dataclass
class SearchOutcome:
    """What a finished search leaves: where it is, its table, how many trials failed."""

    experiment_path: str
    table: Table
    failed: int
    waiting: list[str] = dataclasses.field(default_factory=list)  # stages not run: an earlier one had failures
    ui_url: str = ""
    summary: SearchSummary | None = None


class SearchStorageError(RuntimeError):
    """The search ran, but its results could not be read back from the storage path."""


class SearchStopped(KeyboardInterrupt):
    """The driver was asked to stop (Ctrl-C; SIGTERM: ``normlab stop``, Ray's ``stop_job``, a
    shutdown): Tune saved its state, the parent run is marked KILLED, and ``normlab resume``
    continues the search. ``signum``: the signal that asked."""

    def __init__(self, experiment_path: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(experiment_path)
        self.experiment_path = experiment_path
        self.signum = signum


# Tune reads this when a run starts: set, it leaves SIGINT to the handler below
_TUNE_OWN_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """While Tune runs: Ctrl-C (SIGINT) or SIGTERM ends it the way Tune ends a run on Ctrl-C (it
    saves its experiment state and returns; the running trials go on from their last
    checkpoints on resume). The list it yields gets the signal's number.

    Tune's own Ctrl-C handler returns from ``fit`` as if the search had finished, so the
    driver would mark the search FINISHED, report it and exit 0. Here Tune's handler is off
    (``TUNE_DISABLE_SIGINT_HANDLER``) and both signals go through one handler that records
    the signal and then calls Tune's interrupt (Tune installs it for SIGUSR1 while it runs).
    Ray starts a job's driver with SIGINT blocked, so there SIGTERM is what stops it. A
    second signal, or one before Tune is listening, acts as it would without normlab:
    SIGINT raises ``KeyboardInterrupt``, SIGTERM ends the driver at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum: int, frame: Any) -> None:
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if received or not callable(tune_handler):
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        received.append(signum)
        tune_handler(signal.SIGUSR1, frame)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Tune never removes its handler: an earlier stage's would still be there until this run's
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    tune_sigint = os.environ.get(_TUNE_OWN_SIGINT)
    os.environ[_TUNE_OWN_SIGINT] = "1"
    try:
        yield received
    finally:
        if tune_sigint is None:
            os.environ.pop(_TUNE_OWN_SIGINT, None)
        else:
            os.environ[_TUNE_OWN_SIGINT] = tune_sigint
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def results_table(title: str, rows: list[dict[str, Any]], keys: list[str]) -> Table:
    """One row per trial: stage (if any), status, the keys that vary, clean and adversarial accuracy."""
    table = Table(title=title)
    columns = [
        "trial",
        *(["stage"] if any(r.get("stage") for r in rows) else []),
        "status",
        *keys,
        "epochs",
        *RESULT_COLUMNS,
    ]
    for column in columns:
        table.add_column(column, justify="right" if column in (*RESULT_COLUMNS, "epochs") else "left")
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    return table


def _row(result: Any, view: StageView, keys: list[str]) -> dict[str, Any]:
    metrics = result.metrics or {}
    # as the trial reported them; a trial that never reported: from Ray's config
    knobs = metrics.get("knobs") or TrialResolver(view.space.fixed, frozenset(view.space.conditional_keys())).varying(
        result.config or {}
    )
    values = {**view.space.fixed, **knobs}
    trial = metrics.get("trial_id") or (Path(result.path).name if result.path else "?")
    row = {"trial": trial, "stage": view.name, "status": "ERROR" if result.error else "OK"}
    row.update({k: values.get(k, "(default)") for k in keys})
    row["epochs"] = metrics.get("epoch")
    row.update({c: metrics.get(c) for c in RESULT_COLUMNS})
    if result.error:
        text = str(result.error)  # as Tune read it back: the type is gone, the file may be cut short
        lines = text.strip().splitlines()
        row["error"] = (lines[-1] if lines else type(result.error).__name__)[:200]
        row["storage_full"] = "StorageFullError" in text or "No space left on device" in text
    return row


def _fit(tuner: Any, experiment_path: str) -> Any:
    """``tuner.fit()``; a storage that broke under the search (full, unmounted) is one clear error.

    Tune keeps running trials when it cannot save its state, and reads every trial's
    (possibly truncated) error file back only at the end.
    """
    try:
        return tuner.fit()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise SearchStorageError(
            f"the search ended, but its results could not be read back from {experiment_path} "
            f"({type(exc).__name__}: {exc}). Is the storage full or gone? `normlab status` lists the trials; "
            f"free space, then `normlab resume {experiment_path}`"
        ) from exc


def _study(record: SearchRecord, view: StageView) -> StudyRef | None:
    if view.space.search.algorithm != "optuna" or record.study_storage is None or record.study_name is None:
        return None
    return StudyRef(record.study_storage, f"{record.study_name}-{view.name}" if view.name else record.study_name)


def _print_front(study: StudyRef | None, view: StageView, console: Console) -> None:
    """After a stage with several objectives: its study's Pareto front (a warning if unreachable)."""
    search = view.space.search
    if study is None or not search.multi_objective:
        return
    from orchestrator.studies.study import front_lines

    try:
        lines = front_lines(study.storage, study.name, search.metrics, search.modes)
    except Exception as exc:  # the study is a view of the results: never fail a finished stage over it
        console.print(f"[yellow]warning:[/] cannot read the Pareto front of study {study.name}: {escape(str(exc))}")
        return
    for line in lines:
        console.print(escape(line), soft_wrap=True)


def _record_retried(study: StudyRef | None, view: StageView, results: list[Any], console: Console) -> None:
    """Tell the study the trials that failed before and finished in this session (see
    ``orchestrator.studies.study.record_retried``); a study that cannot be reached is a warning."""
    if study is None:
        return
    from orchestrator.studies.study import record_retried

    finished = {
        r.metrics["trial_id"]: r.metrics for r in results if not r.error and r.metrics and "trial_id" in r.metrics
    }
    try:
        added = record_retried(study.storage, study.name, view.space.search.metrics, finished)
    except Exception as exc:  # the search's results stand; the study misses the retried trials
        console.print(
            f"[yellow]warning[/]: could not add the retried trials to Optuna study {study.name!r} ({escape(str(exc))})"
        )
        return
    if added:
        console.print(
            f"Optuna study {study.name!r}: {len(added)} trial(s) that had failed finished on retry; "
            "added as COMPLETE (normlab.retry_of names the failed one)"
        )


def _new_experiment_name(root: Location, name: str) -> str:
    """``<name>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... when a search of that name started in the
    same second (two submits in a loop must not share a folder, a study and a run name). On a
    local storage path the folder is made here, which reserves the name atomically."""
    import os

    from pyarrow import fs as pafs

    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 100):
        candidate = base if n == 1 else f"{base}-{n}"
        where = root.child(candidate)
        if root.is_local:
            os.makedirs(root.path, exist_ok=True)
            try:
                os.mkdir(where.path)
            except FileExistsError:
                continue
            return candidate
        if root.fs.get_file_info(where.path).type == pafs.FileType.NotFound:
            return candidate
    raise SearchStorageError(f"{root.uri}: 99 searches named {name!r} started this second; try again")


def _finish(
    tracker: MlflowTrialTracker, space: SearchSpace, console: Console, folder: Location
) -> SearchSummary | None:
    """The search's summary on its parent run (best trial, counts, trial table) and its comparison
    report (tables and plots, ``compare``); never raises: the search is done either way."""
    s = space.search
    summary = log_search_summary(tracker, metric=s.metrics[0], mode=s.modes[0], budget_s=DRIVER_BUDGET_S)
    if summary is None:
        console.print(
            f"[yellow]warning:[/] the search's summary is not in MLflow (see the warning above); "
            f"`normlab resume {escape(folder.uri)}` logs it once the server answers",
            soft_wrap=True,
        )
        return None
    console.print(escape(describe(summary)))
    _log_comparison(tracker, console, folder)
    return summary


def _log_comparison(tracker: MlflowTrialTracker, console: Console, search_folder: Location) -> None:
    """The comparison report beside the search's Ray state when that is a local folder (else only in
    MLflow: nothing falls back to the driver's working directory), logged to the parent run."""
    from orchestrator.reports import compare
    from orchestrator.reports.publish import log_report, study_of
    from orchestrator.reports.results import search_results

    try:
        frame = search_results(tracker.target, tracker.search_name, tracker.parent_run_id)
        keys = [k for k in ("stage", "norm", "regime") if k in frame.columns and frame[k].nunique() > 1]
        with tempfile.TemporaryDirectory(prefix="normlab-report-") as scratch:
            folder = Path(search_folder.path) / "report" if search_folder.is_local else Path(scratch)
            files = compare.write_report(frame, keys, folder, study_of(frame))
            logged = log_report(tracker.target, tracker.parent_run_id, files)
        where = [str(folder)] if search_folder.is_local else []
        where += ["the search's MLflow run (report/)"] if logged else []
        if where:
            console.print(f"  report (--compare {','.join(keys) or '(none)'}): {' and '.join(where)}", soft_wrap=True)
    except Exception as exc:  # a report must never fail a finished search
        console.print(
            f"[yellow]warning:[/] no comparison report ({escape(type(exc).__name__)}: {escape(str(exc))}); "
            "`normlab report NAME --compare ...` makes one",
            soft_wrap=True,
        )


def _stage_tracker(tracker: MlflowTrialTracker, view: StageView) -> MlflowTrialTracker:
    """The tracker of one stage: its runs tagged with the stage, named by what varies in it."""
    if tracker.name_keys is None:  # a search recorded before readable names
        return dataclasses.replace(tracker, stage=view.name)
    naming = stage_naming(view.space)  # `normlab status` names the trials the same way
    return dataclasses.replace(
        tracker,
        stage=view.name,
        name_keys=naming.keys,
        name_conditions=naming.conditions,
        number_names=naming.number,
    )


def _run_stages(space: SearchSpace, folder: Location, record: SearchRecord, console: Console) -> SearchOutcome:
    """Fit each stage's experiment in order (restoring those already started); stop before a
    stage whose earlier stage has failed trials."""
    from ray import tune

    rows: list[dict[str, Any]] = []
    views = stage_views(space)
    keys = list(dict.fromkeys(k for view in views for k in view.space.trial_keys()))
    waiting: list[str] = []
    for i, view in enumerate(views):
        stage_folder = folder.child(view.name) if view.name else folder
        tracker = _stage_tracker(record.tracker, view)
        callbacks = [TrialRunsCallback(tracker), StateBackupCallback(stage_folder.uri)]
        if storage.latest_snapshot(stage_folder) is not None:  # started before: continue it
            if view.name:
                console.print(f"stage {view.name}: continuing")
            tuner = tune.Tuner.restore(
                stage_folder.uri, trainable=trainable(view.space, tracker), resume_unfinished=True, resume_errored=True
            )
        else:
            combinations = None
            if view.init_from:
                source = next(v for v in views if v.name == view.init_from)
                combinations = seeded_combinations(view, source, finished_trials(folder.child(source.name)))
            if view.name:
                console.print(
                    f"stage {view.name}: {view.space.trial_count()} trial(s)"
                    + (f", starting from stage {view.init_from}" if view.init_from else "")
                )
            # Ray resolves these URIs with the same pyarrow call as normlab did
            parent, name = (folder, view.name) if view.name else (folder.parent(), folder.name)
            tuner = build_tuner(
                view.space,
                storage_path=parent.uri,
                experiment=name,
                tracker=tracker,
                callbacks=callbacks,
                study=_study(record, view),
                combinations=combinations,
            )
        with profiling.span("driver.fit", stage=view.name), _stop_on_signals() as stopped:
            results = list(_fit(tuner, stage_folder.uri))
        if stopped:
            console.print(
                f"[yellow]stopped[/]: Ray Tune saved the search's state in {escape(folder.uri)}", soft_wrap=True
            )
            raise SearchStopped(folder.uri, stopped[0])
        _record_retried(_study(record, view), view, results, console)
        _print_front(_study(record, view), view, console)
        stage_rows = [_row(result, view, keys) for result in results]
        rows += sorted(stage_rows, key=lambda r: r["trial"])
        failed = [r for r in stage_rows if r["status"] == "ERROR"]
        if failed and i + 1 < len(views):
            waiting = [v.name for v in views[i + 1 :]]
            console.print(
                f"[red]stage {view.name}: {len(failed)} trial(s) failed[/]; stage(s) {', '.join(waiting)} "
                "wait for it: `normlab resume` retries the failed trials, then runs them"
            )
            break
    for row in rows:
        if row["status"] == "ERROR":
            console.print(f"[red]{row['trial']}[/]: {row['error']}")
    if full := sum(row.get("storage_full", False) for row in rows):
        # the trials' own error files may be cut short by the same full disk: say it here, whole
        console.print(
            f"[red]{full} trial(s) could not save to {escape(folder.uri)}[/]. Is the storage full or gone? "
            f"Free space, then `normlab resume {escape(folder.uri)}`",
            soft_wrap=True,
        )
    table = results_table(f"search {folder.name}", rows, keys)
    tracker = record.tracker
    outcome = SearchOutcome(
        folder.uri,
        table,
        sum(r["status"] == "ERROR" for r in rows),
        waiting,
        search_url(tracker.target, tracker.experiment_id, tracker.search_run, tracker.parent_run_id),
    )
    with profiling.span("driver.finish"):
        outcome.summary = _finish(tracker, space, console, folder)
    return outcome


def run_search(
    space: SearchSpace,
    space_file: Path,
    target: TrackingTarget,
    *,
    where: str,
    storage_path: str | None = None,
    console: Console | None = None,
) -> SearchOutcome:
    """Run every trial of ``space`` on Ray Tune (connected by ``connect.init_ray``, which said
    ``where``), tracked in MLflow; return the results table."""
    from orchestrator.studies.study import default_storage, rdb_storage

    console = console or Console(stderr=True)
    root = storage.resolve(storage_path)
    storage.require_bucket(root)
    experiment = _new_experiment_name(root, space.name)
    folder = root.child(experiment)
    s = space.search
    profile = f" (profile {space.profile!r})" if space.profile else ""
    console.print(f"search {space.name!r}{profile}: {space.trial_count()} trial(s) on Ray {where}")
    console.print(f"  results and checkpoints: {folder.uri}")
    study_storage = (s.storage or default_storage(target.uri)) if s.algorithm == "optuna" else None
    # one study per stage for a staged search (_study), named after the search and the stage
    studies = [f"{experiment}-{stage}" for stage in space.stages] or [experiment]
    if study_storage:
        console.print(
            f"  Optuna {'studies' if len(studies) > 1 else 'study'} {', '.join(map(repr, studies))} "
            f"({s.sampler_name}) in {study_storage}"
        )
        if not study_storage.startswith("sqlite"):  # a database server: reachable, and takes our password?
            rdb_storage(study_storage)  # StudyStorageError before the parent run exists, not after
    params = {
        "algorithm": s.algorithm,
        "num_samples": s.num_samples,
        "metric": s.metric,
        "mode": s.mode,
        "scheduler": s.scheduler.type,
        "trials": space.trial_count(),
        "cpu_per_trial": space.resources.cpu,
        "gpu_per_trial": space.resources.gpu,
        "max_failures": space.max_failures,
        **({"sampler": s.sampler_name, "study": ",".join(studies)} if study_storage else {}),
        **{f"sampler.{k}": v for k, v in s.sampler_options.items()},
        **({"stages": ",".join(space.stages)} if space.stages else {}),
        **{f"fixed.{k}": v for k, v in space.fixed.items()},
    }
    tags = {
        "normlab.ray_address": where,
        "normlab.storage_path": folder.uri,
        **({"normlab.ray_job": os.environ[JOB_ENV]} if os.environ.get(JOB_ENV) else {}),
        **environment_tags(),
        # the report's importances come from the last stage's study
        **({"normlab.study": studies[-1], "normlab.study_storage": study_storage} if study_storage else {}),
    }
    spec = space.model_dump(mode="json", by_alias=True)
    with profiling.span("driver.tracking"):
        tracker = start_search_run(
            target, space.name, experiment, params=params, spec=spec, spec_file=space_file, tags=tags, name_keys=()
        )  # named per stage, by what varies in it (_stage_tracker)
    url = search_url(tracker.target, tracker.experiment_id, tracker.search_run, tracker.parent_run_id)
    console.print(f"  MLflow: {target.uri} (experiment {space.name!r}, run {experiment!r})")
    console.print(
        f"  MLflow UI: {url}" + (" (serve it with `normlab ui`)" if target.is_local_file_store else ""),
        soft_wrap=True,
        markup=False,
    )
    record = SearchRecord(
        spec,
        str(space_file),
        tracker,  # holds the target
        study_storage=study_storage,
        study_name=experiment if study_storage else None,
    )
    with search_running(tracker):  # a record that cannot be written ends the parent run FAILED, not RUNNING
        write_record(folder, record)
        note_job(folder, "submit")  # inside a Ray job: which one, for `normlab status`
        return _run_stages(space, folder, record, console)


def resume_search(
    folder: Location, *, address: str | None = None, num_cpus: int | None = None, console: Console | None = None
) -> SearchOutcome:
    """Continue an interrupted or failed search: unfinished trials from their checkpoints,
    errored ones too, each logging to its own MLflow run; then the stages not run yet."""
    console = console or Console(stderr=True)
    record, space = load_record(folder)
    stage_folders = [folder.child(v.name) if v.name else folder for v in stage_views(space)]
    for stage_folder in stage_folders:
        repaired = snapshots.repair(stage_folder)
        if repaired:
            console.print(
                f"[yellow]repaired[/] damaged Ray Tune state from normlab's last good copy: {', '.join(repaired)}"
            )
        snapshots.check_loadable(stage_folder)  # before anything is changed: a search this version cannot restore
    check_reachable(record.target)
    where = init_ray(address, num_cpus=num_cpus, datasets=tuple(map(str, space.values_of("dataset"))))
    console.print(f"resuming search {folder.name} on Ray {where}; MLflow {record.target.uri}")
    retried = [t for stage_folder in stage_folders for t in clear_fatal_markers(stage_folder)]
    if retried:
        console.print(f"retrying {len(retried)} trial(s) that failed with a non-retryable error: {', '.join(retried)}")
    note_job(folder, "resume")
    with search_running(record.tracker, resumed=True):
        return _run_stages(space, folder, record, console)


def clear_fatal_markers(folder: Location) -> list[str]:
    """Forget the non-retryable failures recorded in a search's trial folders (a resume is
    the user's request to try them again); returns the trial numbers (``00003``, from the
    folder names) that had one."""
    from pyarrow import fs as pafs

    from trainables.trial_storage import TrialStorage

    fs, root = folder.fs, folder.path
    cleared = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and TrialStorage(fs, info.path).clear_fatal():
            cleared.append(info.base_name.split("_")[2] if info.base_name.count("_") >= 2 else info.base_name)
    return cleared
