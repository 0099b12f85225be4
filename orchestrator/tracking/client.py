"""The one place normlab builds an MLflow client: ``client(uri)``.

Trials' child runs (``trial_runs``), the search summary (``summary``) and the reports
(``orchestrator.reports``) all get theirs here, so how a client is made (its tracking URI,
and whatever it needs later) is decided once.
"""

from __future__ import annotations

from typing import Any


def client(uri: str) -> Any:
    """An ``MlflowClient`` on the tracking store at ``uri`` (MLflow is imported on first use)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)
