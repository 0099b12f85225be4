"""Where report files go besides the terminal: the search's parent MLflow run, and the
Optuna study a report reads parameter importances from."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.tracking.client import client as mlflow_client
from orchestrator.tracking.retry import TrackingError, retrying

if TYPE_CHECKING:
    from orchestrator.tracking.target import TrackingTarget

log = logging.getLogger("normlab.report")


def log_report(target: TrackingTarget, parent_run_id: str, files: dict[str, Path], budget_s: float = 60.0) -> bool:
    """Log report files to the parent run under ``report/``; False (and a warning) if MLflow refused."""
    client = mlflow_client(target)
    try:
        for path in files.values():
            retrying(
                f"log {path.name}",
                lambda p=path: client.log_artifact(parent_run_id, str(p), "report"),
                time.monotonic() + budget_s,
            )
    except TrackingError as exc:
        log.warning("report files not logged to run %s: %s", parent_run_id, exc)
        return False
    return True


def study_of(frame: Any) -> Any:
    """The Optuna study of the search a results frame came from (None for other searches, or
    when its storage cannot be opened from here)."""
    tags = frame.attrs.get("tags", {})
    if "normlab.study_storage" not in tags:
        return None
    from orchestrator.studies.study import load_study

    try:
        return load_study(tags["normlab.study_storage"], tags["normlab.study"])
    except Exception as exc:  # another machine's SQLite file, a database that is down
        log.warning("Optuna study %s not readable here (%s): no parameter importances", tags.get("normlab.study"), exc)
        return None
