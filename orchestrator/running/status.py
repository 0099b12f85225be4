"""``normlab status``: what searches a storage path holds, read without connecting to Ray.

One table per search (per stage for a multi-stage search): each trial's state, epochs
done, last metrics and, for trials that errored, why. Ray Tune's state that a crash or a
full disk cut short is first put back from normlab's last good copy (``snapshots``).
"""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape
from rich.table import Table

from orchestrator.running.callbacks import trial_error
from orchestrator.searchfile.space import stage_views
from orchestrator.state import snapshots, storage
from orchestrator.state.records import RecordError, experiment_dirs, load_record
from orchestrator.state.storage import Location


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def _stage_folders(folder: Location) -> list[tuple[str, Location]]:
    try:
        _, space = load_record(folder)
    except RecordError:  # not made by normlab submit, or an unreadable record: Ray's state alone
        return [("", folder)]
    return [(view.name, folder.child(view.name) if view.name else folder) for view in stage_views(space)]


def _table(title: str, folder: Location) -> Table | str:
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
    for trial in sorted(analysis.trials, key=lambda t: str(t)):
        last = trial.last_result or {}
        table.add_row(
            str(trial),
            trial.status,
            _fmt(last.get("epoch")),
            _fmt(last.get("clean_acc")),
            _fmt(last.get("adv_acc")),
            _fmt(last.get("final_adv_acc")),
            trial_error(trial)[:200] if trial.status == "ERROR" else "",
        )
    return table


def search_status(storage_path: str | None, name: str | None = None) -> list[Table | str]:
    """One table per search (and stage), or a line saying there are none."""
    tables: list[Table | str] = []
    for folder in experiment_dirs(storage_path, name):
        for stage, stage_folder in _stage_folders(folder):
            tables.append(_table(f"{folder.name} / stage {stage}" if stage else folder.name, stage_folder))
    if not tables:
        tables.append(escape(f"no searches{' named ' + repr(name) if name else ''} in {storage.resolve(storage_path)}"))
    return tables
