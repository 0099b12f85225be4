"""Run a search end to end, and show what searches the storage path holds.

``run_search`` connects to Ray, opens the MLflow parent run, fits the Tuner (Ray Tune
prints its own progress) and returns the results table; ``search_status`` reads Ray
Tune's experiment state from the storage path, without connecting to a cluster.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.spaces import SearchSpace
from orchestrator.tracking import TrackingTarget, search_run
from orchestrator.tuner import CloseRunsCallback, TrialResolver, build_tuner, init_ray, storage_uri

RESULT_COLUMNS = ("final_clean_acc", "final_adv_acc")


@dataclass
class SearchOutcome:
    """What a finished search leaves: where it is, its table, how many trials failed."""

    experiment_path: str
    table: Table
    rows: list[dict[str, Any]]
    failed: int


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
    storage = storage_uri(storage_path)
    experiment = f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    where = init_ray(address, num_cpus=num_cpus)
    console.print(f"search {space.name!r}: {space.trial_count()} trial(s) on Ray {where}")
    console.print(f"  results and checkpoints: {storage}/{experiment}")
    console.print(f"  MLflow: {target.uri} (experiment {space.name!r}, run {experiment!r}); browse with `normlab ui`")
    params = {
        "algorithm": space.search.algorithm, "num_samples": space.search.num_samples, "metric": space.search.metric,
        "mode": space.search.mode, "scheduler": space.search.scheduler.type, "trials": space.trial_count(),
        "cpu_per_trial": space.resources.cpu, "gpu_per_trial": space.resources.gpu, "max_failures": space.max_failures,
        **{f"fixed.{k}": v for k, v in space.fixed.items()},
    }
    tags = {"normlab.ray_address": where, "normlab.storage_path": f"{storage}/{experiment}"}
    with search_run(target, space.name, experiment, params=params, spec=space.model_dump(mode="json", by_alias=True),
                    spec_file=space_file, tags=tags) as tracker:
        tuner = build_tuner(space, storage_path=storage, experiment=experiment, tracker=tracker,
                            callbacks=[CloseRunsCallback(tracker)])
        grid = tuner.fit()
    resolver = TrialResolver(space.fixed, frozenset(space.conditional_keys()))
    keys = space.trial_keys()
    rows = [_row(result, resolver, keys) for result in grid]
    rows.sort(key=lambda r: r["trial"])
    failed = sum(r["status"] == "ERROR" for r in rows)
    for row in rows:
        if row["status"] == "ERROR":
            console.print(f"[red]{row['trial']}[/]: {row['error']}")
    return SearchOutcome(f"{storage}/{experiment}", results_table(f"search {experiment}", rows, keys), rows, failed)


def experiment_dirs(storage_path: str | None, name: str | None = None) -> list[Path]:
    """Search folders in the storage path (newest last), optionally only those of search ``name``."""
    root = Path(storage_uri(storage_path))
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and any(p.glob("experiment_state-*.json"))]
    if name:
        found = [p for p in found if p.name == name or p.name.rsplit("-", 2)[0] == name]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def search_status(storage_path: str | None, name: str | None = None) -> list[Table]:
    """One table per search: each trial's state, epochs done and last metrics."""
    from ray.tune import ExperimentAnalysis

    tables = []
    for folder in experiment_dirs(storage_path, name):
        analysis = ExperimentAnalysis(str(folder))
        table = Table(title=f"{folder.name}  ({folder})")
        for column in ("trial", "state", "epochs", "clean_acc", "adv_acc", "final_adv_acc"):
            table.add_column(column)
        for trial in sorted(analysis.trials, key=lambda t: str(t)):
            last = trial.last_result or {}
            table.add_row(str(trial), trial.status, _fmt(last.get("epoch")), _fmt(last.get("clean_acc")),
                          _fmt(last.get("adv_acc")), _fmt(last.get("final_adv_acc")))
        tables.append(table)
    if not tables:
        table = Table(title=f"no searches{' named ' + repr(name) if name else ''} in {storage_uri(storage_path)}")
        tables.append(table)
    return tables
