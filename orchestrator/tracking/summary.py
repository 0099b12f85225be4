"""A search's summary on its MLflow parent run: the best trial, trial counts, a table of trials.

Once a search ends (``normlab submit``, and again after each ``normlab resume``), the
parent run gets:

- metrics: ``best_<m>`` for every final metric ``m`` of the best trial (``best_final_adv_acc``,
  ``best_final_clean_acc``, ``best_adv_acc_pgd_eps0.1``, ...), and ``trials_total``,
  ``trials_finished``, ``trials_failed``, ``trials_killed``, ``trials_running``; each
  summary at the next step (0 after submit, 1 after the first resume, ...);
- tags: ``normlab.best_run_name``, ``normlab.best_run_id``, ``normlab.best_run_url`` (a
  link to its run page, through normlab's page: ``orchestrator.tracking.links``),
  ``normlab.best_by`` (what "best" means, e.g. ``final_adv_acc (max)``);
- its description (``mlflow.note.content``, unless someone wrote their own): the best
  trial with a link (relative to the UI's address, the same way), and the counts;
- files: every entry of ``REPORT_FILES`` (``summary/trials.md``, ``summary/trials.csv``:
  one row per trial with its name, status, the keys that vary, final clean and
  adversarial accuracy). To add a report, add a function of the trials to ``REPORT_FILES``
  (or pass ``files=`` to ``log_search_summary``).

The best trial is ranked by ``final_<metric>`` (the final sweep) when the search's metric
has one and some trial logged it, else by the metric's last value; trials without the
ranked metric (failed, stopped early) are not candidates. ``summarise`` is plain data in,
plain data out (no Ray, no MLflow server); ``log_search_summary`` reads the trials' runs,
logs the summary and never raises: with MLflow down it retries for a budget, then warns.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.tracking.client import client
from orchestrator.tracking.links import run_link, run_url
from orchestrator.tracking.retry import TrackingError, retrying
from orchestrator.tracking.run_names import ALWAYS, format_value
from orchestrator.tracking.tables import markdown_table
from orchestrator.tracking.trial_runs import PARENT_TAG, MlflowTrialTracker
from trainables.metrics import is_final_metric

log = logging.getLogger("normlab.tracking")
NOTE_TAG = "mlflow.note.content"
NOTE_HEADING = "### normlab search summary"
STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING")
RESULT_METRICS = ("final_clean_acc", "final_adv_acc")


@dataclass(frozen=True)
class TrialRun:
    """One trial's MLflow run, as the summary sees it."""

    name: str
    run_id: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchSummary:
    """What the parent run gets: metrics, tags, files (artifact path -> text) and its description."""

    metrics: dict[str, float]
    tags: dict[str, str]
    files: dict[str, str]
    note: str
    best: TrialRun | None = None


ReportFile = Callable[[list[TrialRun], list[str]], str]  # (trials, varying keys) -> file text


def _columns(keys: list[str]) -> list[str]:
    return ["trial", "status", *ALWAYS, *keys, *RESULT_METRICS]


def _cells(trial: TrialRun, keys: list[str]) -> list[str]:
    values = [trial.name, trial.status, *(trial.params.get(k, "") for k in (*ALWAYS, *keys))]
    return values + [f"{trial.metrics[m]:.4f}" if m in trial.metrics else "" for m in RESULT_METRICS]


def trials_markdown(trials: list[TrialRun], keys: list[str]) -> str:
    """A markdown table: one row per trial (the accuracies right-aligned)."""
    import pandas as pd

    frame = pd.DataFrame([_cells(t, keys) for t in trials], columns=_columns(keys))
    return markdown_table(frame, right=RESULT_METRICS) + "\n"


def trials_csv(trials: list[TrialRun], keys: list[str]) -> str:
    """The same table as CSV."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_columns(keys), "run_id"])
    writer.writerows([*_cells(t, keys), t.run_id] for t in trials)
    return out.getvalue()


REPORT_FILES: dict[str, ReportFile] = {
    "summary/trials.md": trials_markdown,
    "summary/trials.csv": trials_csv,
}


def varying_params(trials: list[TrialRun]) -> list[str]:
    """Params (besides norm and regime) whose value differs between trials, sorted."""
    names = sorted({k for t in trials for k in t.params} - set(ALWAYS))
    return [k for k in names if len({t.params.get(k) for t in trials}) > 1]


def ranking_metric(trials: list[TrialRun], metric: str) -> str:
    """``final_<metric>`` if some trial has it, else ``metric``."""
    final = f"final_{metric}"
    return final if any(final in t.metrics for t in trials) else metric


def best_trial(trials: list[TrialRun], metric: str, mode: str) -> TrialRun | None:
    """The trial with the best finite ``metric`` (``mode`` max or min); ties go to the first by name.
    A failed trial is a candidate only when no other trial has logged ``metric``."""
    candidates = [t for t in trials if math.isfinite(t.metrics.get(metric, math.nan))]
    if not candidates:
        return None
    candidates = [t for t in candidates if t.status != "FAILED"] or candidates
    sign = -1.0 if mode == "max" else 1.0
    return min(sorted(candidates, key=lambda t: t.name), key=lambda t: sign * t.metrics[metric])


def summarise(
    trials: list[TrialRun],
    *,
    metric: str,
    mode: str,
    keys: list[str] | None = None,
    link: Callable[[str], str] = lambda run_id: run_id,
    note_link: Callable[[str], str] | None = None,
    files: dict[str, ReportFile] | None = None,
) -> SearchSummary:
    """The summary of a search's ``trials`` (see the module doc); ``keys``: the varying keys
    (default: the params that differ); ``link(run_id)``: a run's URL for the tag,
    ``note_link(run_id)``: for the description (default: ``link``)."""
    note_link = note_link or link
    trials = sorted(trials, key=lambda t: t.name)
    keys = varying_params(trials) if keys is None else keys
    by = ranking_metric(trials, metric)
    best = best_trial(trials, by, mode)
    counts = Counter(t.status for t in trials)
    metrics = {"trials_total": float(len(trials))}
    metrics.update({f"trials_{s.lower()}": float(counts.get(s, 0)) for s in STATUSES})
    tags = {"normlab.best_by": f"{by} ({mode})"}
    lines = [NOTE_HEADING, ""]
    if best is not None:
        metrics.update(
            {
                f"best_{k}": v
                for k, v in sorted(best.metrics.items())
                if (is_final_metric(k) or k == by) and math.isfinite(v)
            }
        )
        tags.update(
            {
                "normlab.best_run_name": best.name,
                "normlab.best_run_id": best.run_id,
                "normlab.best_run_url": link(best.run_id),
            }
        )
        shown = ", ".join(f"{m} {best.metrics[m]:.4f}" for m in RESULT_METRICS if m in best.metrics)
        shown = shown or f"{by} {best.metrics[by]:.4f}; no final metrics"
        if best.status != "FINISHED":
            shown += f"; {best.status.lower()}"
        lines.append(f"Best trial by {by} ({mode}): [{best.name}]({note_link(best.run_id)}) ({shown}).")
    else:
        lines.append(f"No trial has logged {by} yet.")
    counted = ", ".join(f"{counts[s]} {s.lower()}" for s in STATUSES if counts.get(s))
    lines += ["", f"{len(trials)} trials: {counted or 'none'}. Every trial: `summary/trials.md`, `summary/trials.csv`."]
    table = {path: build(trials, keys) for path, build in (files or REPORT_FILES).items()}
    return SearchSummary(metrics, tags, table, "\n".join(lines) + "\n", best)


# ------------------------------------------------------------------ MLflow


def read_trials(tracker: MlflowTrialTracker) -> list[TrialRun]:
    """Every child run of the search's parent run."""
    c = client(tracker.target)
    trials, token = [], None
    while True:
        page = c.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{tracker.parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        trials += [
            TrialRun(r.info.run_name, r.info.run_id, r.info.status, dict(r.data.params), dict(r.data.metrics))
            for r in page
        ]
        token = page.token
        if not token:
            return trials


def _log(tracker: MlflowTrialTracker, summary: SearchSummary) -> None:
    from mlflow.entities import Metric, RunTag

    c = client(tracker.target)
    run_id = tracker.parent_run_id
    step = len(c.get_metric_history(run_id, "trials_total"))  # one step per summary: submit, each resume
    now = int(time.time() * 1000)
    tags = dict(summary.tags)
    note = c.get_run(run_id).data.tags.get(NOTE_TAG)
    if note is None or note.startswith(NOTE_HEADING):  # never overwrite a description someone wrote
        tags[NOTE_TAG] = summary.note
    for path, text in summary.files.items():
        c.log_text(run_id, text, path)
    c.log_batch(
        run_id,
        metrics=[Metric(k, v, now, step) for k, v in summary.metrics.items()],
        tags=[RunTag(k, v[:5000]) for k, v in tags.items()],
    )


def log_search_summary(
    tracker: MlflowTrialTracker,
    *,
    metric: str,
    mode: str,
    budget_s: float = 60.0,
    files: dict[str, ReportFile] | None = None,
) -> SearchSummary | None:
    """Summarise the search's trial runs on its parent run; None (and a warning) if MLflow
    stayed unreachable for ``budget_s`` seconds or refused."""
    deadline = time.monotonic() + budget_s
    try:
        trials = retrying("read the search's trial runs", lambda: read_trials(tracker), deadline)
        # the keys runs are named by, where there are some (a staged search's parent run names none)
        keys = list(tracker.name_keys) if tracker.name_keys else None
        summary = summarise(
            trials,
            metric=metric,
            mode=mode,
            keys=keys,
            files=files,
            link=lambda run_id: run_url(tracker.target, tracker.experiment_id, run_id),
            note_link=lambda run_id: run_link(tracker.experiment_id, run_id),  # within the UI, wherever it is
        )
        retrying("log the search's summary", lambda: _log(tracker, summary), deadline)
    except TrackingError as exc:
        log.warning("search run %s: its summary could not be logged: %s", tracker.parent_run_id, exc)
        return None
    return summary


def describe(summary: SearchSummary | None) -> str:
    """One line for the terminal: the best trial and its final accuracies."""
    if summary is None or summary.best is None:
        return "no best trial (no trial logged the search's metric)"
    best = summary.best
    by = summary.tags["normlab.best_by"]
    values = ", ".join(f"{m} {format_value(best.metrics[m])}" for m in RESULT_METRICS if m in best.metrics)
    values = values or f"{by.split(' ')[0]} {format_value(best.metrics.get(by.split(' ')[0], math.nan))}"
    if best.status != "FINISHED":
        values += f"; {best.status.lower()}"
    return f"best trial: {best.name} ({values}) by {by}"
