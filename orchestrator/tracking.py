"""MLflow tracking: one parent run per search, one child run per trial.

The driver opens the parent run (the spec, the resolved file, the git commit, the Ray
address) and hands every trial a picklable ``MlflowTrialTracker``; the trial itself
logs to MLflow, so it works on any node that can reach the tracking server. The child
run's id travels in the trial's checkpoint, so a trial resumed after a failure keeps
writing to the same run; without a checkpoint, the run is found again by its Ray trial
id tag.

Default store: ``normlab_runs/mlflow.db`` (SQLite) and ``normlab_runs/mlartifacts`` in the
working directory; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere (on a
cluster: an ``mlflow server`` every node can reach).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DIR = "normlab_runs"
TAG_SEARCH = "normlab.search"
TAG_TRIAL_ID = "normlab.trial_id"
TAG_ERROR = "normlab.error"
PARENT_TAG = "mlflow.parentRunId"
RUNTIME_FIELDS = ("device", "threads")  # may differ between attempts: tags, not params

# MLflow's HTTP client retries for minutes by default; a trial should fail fast and say why.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking store cannot be reached or opened."""


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: the tracking URI, and the artifact folder for new experiments."""

    uri: str
    artifact_root: str | None = None

    @property
    def is_local_file_store(self) -> bool:
        return self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri


def resolve_tracking(uri: str | None, workdir: Path | None = None) -> TrackingTarget:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite store in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return TrackingTarget(uri)
    base = (workdir or Path.cwd()).resolve() / DEFAULT_DIR
    base.mkdir(parents=True, exist_ok=True)
    return TrackingTarget(f"sqlite:///{base / 'mlflow.db'}", (base / "mlartifacts").as_uri())


def _client(uri: str):  # noqa: ANN202 - mlflow type imported lazily
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(target: TrackingTarget, timeout: float = 10.0) -> None:
    """Fail fast, before any trial starts, if the tracking store cannot be used."""
    if target.uri.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(target.uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            raise TrackingUnreachable(f"MLflow tracking server {target.uri} is unreachable: {exc}") from exc
        if response.status_code != 200:
            raise TrackingUnreachable(f"MLflow tracking server {target.uri} answered {response.status_code} on /health")
    # also creates a new SQLite store's tables, once, before trials open it concurrently
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout)))
    try:
        _client(target.uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingUnreachable(f"MLflow tracking store {target.uri} cannot be used: {exc}") from exc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_experiment(target: TrackingTarget, name: str) -> str:
    """The id of experiment ``name``, created (with the default artifact folder) if missing."""
    client = _client(target.uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=target.artifact_root)
    except Exception:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(path: Path | None = None) -> str:
    """The git commit of normlab's source (or ``unknown``), with ``-dirty`` for local changes."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def trial_params(config: dict[str, Any]) -> dict[str, str]:
    """Every TrialConfig field as an MLflow param (lists comma-joined), runtime fields excluded."""
    out = {}
    for key, value in config.items():
        if key in RUNTIME_FIELDS:
            continue
        out[key] = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return out


def start_search_run(
    target: TrackingTarget,
    experiment: str,
    run_name: str,
    *,
    params: dict[str, Any],
    spec: dict[str, Any],
    spec_file: Path,
    tags: dict[str, str],
) -> MlflowTrialTracker:
    """Open the parent run of a search; return the tracker that trials use for child runs."""
    from mlflow.entities import Param

    client = _client(target.uri)
    experiment_id = ensure_experiment(target, experiment)
    all_tags = {TAG_SEARCH: experiment, "mlflow.source.git.commit": git_commit(), **tags}
    run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()][:100])
    client.log_dict(run_id, spec, "search_space.resolved.json")
    client.log_artifact(run_id, str(spec_file))
    return MlflowTrialTracker(target.uri, experiment_id, run_id, experiment)


@contextmanager
def search_running(tracker: MlflowTrialTracker, *, resumed: bool = False) -> Iterator[MlflowTrialTracker]:
    """While the search runs: the parent run is RUNNING; after, FINISHED (KILLED on Ctrl-C, FAILED on error)."""
    client = _client(tracker.tracking_uri)
    if resumed:
        client.update_run(tracker.parent_run_id, status="RUNNING")
        client.set_tag(tracker.parent_run_id, "normlab.resumed_at", time.strftime("%Y-%m-%d %H:%M:%S"))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(tracker.parent_run_id, status)


@dataclass(frozen=True)
class MlflowTrialTracker:
    """What a trial needs to log its child run; picklable, so Ray ships it to any node."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    search_name: str

    def _client(self):  # noqa: ANN202
        return _client(self.tracking_uri)

    def find_run(self, trial_id: str) -> str | None:
        """The child run already logged for a Ray trial id, if any."""
        runs = self._client().search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start(self, config: dict[str, Any], trial_id: str, trial_name: str, run_id: str | None = None) -> str:
        """Open the trial's child run, or re-attach to ``run_id`` (or the run found by trial id)."""
        from mlflow.entities import Param, RunTag

        client = self._client()
        run_id = run_id or self.find_run(trial_id)
        runtime = [RunTag(f"normlab.{k}", str(config.get(k))) for k in RUNTIME_FIELDS]
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[*runtime, RunTag("normlab.resumed", "true")])
            return run_id
        tags = {
            PARENT_TAG: self.parent_run_id,
            TAG_SEARCH: self.search_name,
            TAG_TRIAL_ID: trial_id,
            "normlab.trial_name": trial_name,
            "normlab.norm": str(config.get("norm")),
            "normlab.regime": str(config.get("regime")),
        }
        run = client.create_run(self.experiment_id, run_name=trial_name, tags=tags)
        params = [Param(k, v) for k, v in trial_params(config).items()]
        client.log_batch(run.info.run_id, params=params, tags=runtime)
        return run.info.run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """Every numeric metric of one epoch, at ``step=epoch``, once.

        A trial resumed from a checkpoint older than its last logged epoch (Ray restores the
        checkpoint of its last experiment snapshot, which can lag behind) runs those epochs
        again, from the checkpointed RNG state; MLflow would keep both rows, so an epoch whose
        first metric is already logged at that step is not logged again.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if isinstance(v, (int, float))]
        client = self._client()
        if batch and any(m.step == epoch for m in client.get_metric_history(run_id, batch[0].key)):
            return
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i : i + 1000])

    def log_checkpoint(self, run_id: str, checkpoint_file: Path) -> None:
        """The trial's final checkpoint, as an artifact."""
        self._client().log_artifact(run_id, str(checkpoint_file), "checkpoint")

    def finish(self, run_id: str, result: dict[str, Any]) -> None:
        """Final artifacts (result JSON, robust-accuracy-vs-eps plot) and status FINISHED."""
        from orchestrator.report import robustness_figure

        client = self._client()
        client.log_dict(run_id, result, "result.json")
        figure = robustness_figure(result["final"], result["config"]["eval_attacks"], result["config"]["eval_eps"])
        client.log_figure(run_id, figure, "robust_accuracy_vs_eps.png")
        client.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str, error: BaseException) -> None:
        """Status FAILED, with the reason as a tag."""
        client = self._client()
        client.set_tag(run_id, TAG_ERROR, f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, "FAILED")

    def stopped(self, run_id: str, reason: str) -> None:
        """Status KILLED: the trial was ended on purpose (e.g. by an early-stopping scheduler)."""
        client = self._client()
        client.set_tag(run_id, "normlab.stopped", reason[:5000])
        client.set_terminated(run_id, "KILLED")

    def close_if_running(self, trial_id: str, status: str, reason: str) -> None:
        """Driver side: close a child run its trial could not close (its process died)."""
        run_id = self.find_run(trial_id)
        if run_id is None:
            return
        client = self._client()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "normlab.stopped", reason[:5000])
            client.set_terminated(run_id, status)
