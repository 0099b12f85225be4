"""MLflow tracking: one parent run per search, in the tracking target (``target``).

The driver checks the target can be used (``check_reachable``), opens the parent run (the
spec, the resolved file, the git commit, the Ray address) and hands every trial a picklable
``MlflowTrialTracker`` (``trial_runs``) that carries the target; the trial itself logs to
MLflow, so it works on any node that can reach the tracking server. Every call goes through
``retry``: an outage of the server delays records, it never ends a search.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.credentials.uris import mask_uri, scrub
from orchestrator.tracking.client import client
from orchestrator.tracking.links import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from orchestrator.tracking.retry import TrackingError, retrying
from orchestrator.tracking.target import TrackingTarget
from orchestrator.tracking.trial_runs import (
    PARENT_TAG,
    TAG_SEARCH,
    TAG_SEARCH_RUN,
    MlflowTrialTracker,
)
from trainables.environment import environment_tags

TAG_PROFILE = "normlab.profile"  # the profile of the search file the search ran (``normlab submit --profile``)
DRIVER_BUDGET_S = float(os.environ.get("NORMLAB_TRACKING_DRIVER_WAIT_S", 60))
log = logging.getLogger("normlab.tracking")


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking store cannot be reached or opened."""


def check_reachable(target: TrackingTarget, timeout: float = 10.0) -> None:
    """Fail fast, before any trial starts, if the tracking store cannot be used."""
    shown = mask_uri(target.uri)
    if target.is_server:
        import requests

        try:
            response = requests.get(target.uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            raise TrackingUnreachable(f"MLflow tracking server {shown} is unreachable: {scrub(str(exc))}") from exc
        if response.status_code != 200:
            raise TrackingUnreachable(f"MLflow tracking server {shown} answered {response.status_code} on /health")
    # also creates a new SQLite store's tables, once, before trials open it concurrently
    try:
        retrying(
            "open the tracking store",
            lambda: client(target).search_experiments(max_results=1),
            time.monotonic() + timeout,
        )
    except TrackingError as exc:
        raise TrackingUnreachable(f"MLflow tracking store {shown} cannot be used: {exc}") from exc


def ensure_experiment(target: TrackingTarget, name: str) -> str:
    """The id of experiment ``name``, created (with the default artifact folder) if missing.

    A new experiment is tagged as model training (``links`` says what MLflow's UI makes of it).
    """
    c = client(target)
    experiment = c.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} was deleted in MLflow and sits in its trash (a new one of that name "
            "cannot be made until it is gone): restore it in the UI, remove it for good with `mlflow gc`, "
            "or give the search another name"
        )
    if experiment is not None:
        return experiment.experiment_id
    try:
        return c.create_experiment(
            name, artifact_location=target.artifact_root, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        )
    except Exception:  # created concurrently by another process
        experiment = c.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(path: Path | None = None) -> str:
    """The git commit of normlab's source (or ``unknown``), with ``-dirty`` for local changes."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_search_run(
    target: TrackingTarget,
    experiment: str,
    run_name: str,
    *,
    params: dict[str, Any],
    spec: dict[str, Any],
    spec_file: Path,
    tags: dict[str, str],
    name_keys: tuple[str, ...] = (),
    name_conditions: dict[str, dict[str, list[Any]]] | None = None,
    number_names: bool = False,
) -> MlflowTrialTracker:
    """Open the parent run of a search; return the tracker that trials use for child runs
    (named by ``name_keys``, see ``run_names``). A ``spec`` resolved with a profile of its file
    (``spec["profile"]``, ``normlab submit --profile``) records it as the tag ``normlab.profile``
    and the param ``profile``."""
    from mlflow.entities import Param

    deadline = time.monotonic() + DRIVER_BUDGET_S
    all_tags = {TAG_SEARCH: experiment, TAG_SEARCH_RUN: run_name, "mlflow.source.git.commit": git_commit(), **tags}
    profile = spec.get("profile")
    if isinstance(profile, str):
        all_tags[TAG_PROFILE] = profile
        params = {"profile": profile, **params}
    try:
        experiment_id = retrying(
            "open the search's experiment", lambda: ensure_experiment(target, experiment), deadline
        )
        c = client(target)
        run_id = retrying(
            "create the search's run", lambda: c.create_run(experiment_id, run_name=run_name, tags=all_tags), deadline
        ).info.run_id
        retrying(
            "log the search's settings",
            lambda: (
                c.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()][:100]),
                c.log_dict(run_id, spec, "search_space.resolved.json"),
                c.log_artifact(run_id, str(spec_file)),
            ),
            deadline,
        )
    except TrackingError as exc:  # unreachable, or refused: either way no search starts
        raise TrackingUnreachable(f"MLflow tracking store {mask_uri(target.uri)}: {exc}") from exc
    return MlflowTrialTracker.for_target(
        target,
        experiment_id,
        run_id,
        experiment,
        name_keys=tuple(name_keys),
        name_conditions=dict(name_conditions or {}),
        number_names=number_names,
        search_run=run_name,
    )


def _set_parent(tracker: MlflowTrialTracker, what: str, call: Any, budget_s: float) -> None:
    """A driver-side call on the parent run that never raises: retried, then a warning."""
    try:
        retrying(what, call, time.monotonic() + budget_s)
    except TrackingError as exc:
        log.warning("search run %s: could not %s: %s", tracker.parent_run_id, what, exc)


@contextmanager
def search_running(tracker: MlflowTrialTracker, *, resumed: bool = False) -> Iterator[MlflowTrialTracker]:
    """While the search runs: the parent run is RUNNING; after, FINISHED (KILLED on Ctrl-C, FAILED on error).

    The tracking server may be down at either end: the calls wait for it (a bounded time,
    ``NORMLAB_TRACKING_DRIVER_WAIT_S``), then warn; they never end the search.
    """
    c = client(tracker.target)
    if resumed:
        from mlflow.entities import RunTag

        _set_parent(
            tracker,
            "mark it resumed",
            lambda: (
                c.update_run(tracker.parent_run_id, status="RUNNING"),
                c.set_tag(tracker.parent_run_id, "normlab.resumed_at", time.strftime("%Y-%m-%d %H:%M:%S")),
                # the driver that resumed may run another install than the one that submitted
                c.log_batch(
                    tracker.parent_run_id,
                    tags=[RunTag(k, v) for k, v in environment_tags("normlab.resume_env.").items()],
                ),
            ),
            DRIVER_BUDGET_S,
        )
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _set_parent(
            tracker, f"mark it {status}", lambda: c.set_terminated(tracker.parent_run_id, status), DRIVER_BUDGET_S * 5
        )


def find_search_run(target: TrackingTarget, name: str | None = None) -> Any:
    """The newest search's parent run in the store, or the newest of search ``name`` (a
    search name, or the run name ``NAME-YYYYmmdd-HHMMSS`` of one search); None if none."""
    c = client(target)
    experiments = [e.experiment_id for e in c.search_experiments(max_results=50000)]
    if not experiments:
        return None
    parent = f"tags.`{PARENT_TAG}` IS NULL"
    wanted = [f"tags.`{TAG_SEARCH}` LIKE '%'"]
    if name is not None:
        quoted = name.replace("'", "")
        wanted = [f"tags.`{TAG_SEARCH}` = '{quoted}'", f"attributes.run_name = '{quoted}'"]
    for condition in wanted:
        runs = c.search_runs(
            experiments,
            filter_string=f"{condition} and {parent}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            return runs[0]
    return None
