"""Where MLflow runs go, and with which credentials: the one home of the tracking target.

``normlab`` resolves the target once (``resolve_tracking``: ``--tracking-uri``, else
``MLFLOW_TRACKING_URI``, else the SQLite store in the working directory) and hands the
``TrackingTarget`` on as one object: to the driver, the search's parent run, the tracker
every trial gets, the search record and the reports.

A target never holds credentials. Those in a URI (``http://user:password@host``) move to
MLflow's own environment variables (``CREDENTIAL_ENV``) when it is resolved; they reach
trials on other nodes through Ray's runtime environment (``credentials_env``), never
through storage, and a resumed search takes them from the environment again. So the URI
that is printed, stored (a tracker's ``tracking_uri``, pickled and in the search record)
and shipped to trials carries none.

Default store: ``normlab_runs/mlflow.db`` (SQLite) and ``normlab_runs/mlartifacts`` in the
working directory; on a cluster, an ``mlflow server`` every node can reach.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.credentials.uris import strip_credentials

DEFAULT_DIR = "normlab_runs"
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: the tracking URI (without credentials), and the artifact folder for new
    experiments (None: the tracking server's default)."""

    uri: str
    artifact_root: str | None = None

    @property
    def is_local_file_store(self) -> bool:
        """A store on this machine's disk (SQLite or files): trials on other nodes cannot write to it."""
        return self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri

    @property
    def is_server(self) -> bool:
        """An MLflow tracking server (``http(s)://``), which serves its own UI."""
        return self.uri.startswith(("http://", "https://"))


def resolve_tracking(uri: str | None, workdir: Path | None = None) -> TrackingTarget:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite store in the working directory.

    Credentials in the URI (``http://user:password@host``) move to MLflow's own environment
    variables (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``) unless those are set: the URI that
    is printed, stored in the search record and shipped to trials carries none.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        bare, user, password = strip_credentials(uri)
        if user is not None:
            os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        if password is not None:
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
        return TrackingTarget(bare)
    base = (workdir or Path.cwd()).resolve() / DEFAULT_DIR
    base.mkdir(parents=True, exist_ok=True)
    return TrackingTarget(f"sqlite:///{base / 'mlflow.db'}", (base / "mlartifacts").as_uri())


def credentials_env() -> dict[str, str]:
    """The tracking credentials of this process, for trials on other nodes (never stored)."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}
