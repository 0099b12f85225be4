"""The one place normlab builds an MLflow client: ``client(target)``.

Trials' child runs (``trial_runs``), the search summary (``summary``) and the reports
(``orchestrator.reports``) all get theirs here, from the ``TrackingTarget`` they were given
(``target``), so how a client is made (its tracking URI, and whatever it needs later) is
decided once.
"""

from __future__ import annotations

from typing import Any

from orchestrator.tracking.target import TrackingTarget


def client(target: TrackingTarget) -> Any:
    """An ``MlflowClient`` on the tracking store of ``target`` (MLflow is imported on first use;
    credentials come from MLflow's environment variables, ``target.CREDENTIAL_ENV``)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=target.uri)
