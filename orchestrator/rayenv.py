"""Environment for Ray and MLflow, set before either is imported.

Some of Ray's settings are read once, when ``ray`` is imported (``RAY_AUTH_MODE``), and
both Ray and MLflow reach for the network on their own (Ray's dashboard probes cloud
metadata addresses; MLflow 3 sends telemetry). The command line calls
``prepare_environment`` first thing, so that:

- a driver connecting to a head started with ``ray start --head`` (token authentication
  on, Ray 2.60) uses the token in ``~/.ray/auth_token`` (``RAY_AUTH_MODE=token``);
- a local Ray binds to and advertises 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
  Ray's own switch, read when ray is imported): nothing of a laptop run is reachable from
  the network;
- Ray's usage statistics and MLflow's telemetry are off unless the user turned them on;
- Tune snapshots its experiment state often, so a driver killed outright still resumes
  trials from their checkpoints.

Every variable is only set when the user has not set it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",  # nowhere, should anything still report
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}


def ray_token_available() -> bool:
    """Whether a Ray authentication token can be found (env, token path, ``~/.ray/auth_token``)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def prepare_environment(local_ray: bool = False) -> None:
    """Set normlab's defaults for Ray and MLflow; call before importing either.

    ``local_ray``: this process will start a local Ray, which should bind to and advertise
    127.0.0.1 only (Ray reads the switch when it is imported). Not for a driver joining a
    remote cluster: the cluster must be able to reach it.
    """
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if local_ray:
        os.environ.setdefault(LOOPBACK_SWITCH, "0")
    if "RAY_AUTH_MODE" not in os.environ and ray_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


def check_ray_head(address: str, timeout: float = 5.0) -> None:
    """Fail fast if a ``host:port`` Ray head does not accept connections (ray.init would hang)."""
    if address.startswith("ray://") or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"Ray head {address} is unreachable ({exc}); is `ray start --head` running there?") from exc
