"""Environment for Ray and MLflow, set before either is imported.

Some of Ray's settings are read once, when ``ray`` is imported (``RAY_AUTH_MODE``), and
both Ray and MLflow reach for the network on their own (Ray's dashboard probes cloud
metadata addresses; MLflow 3 sends telemetry). The command line calls
``prepare_environment`` first thing, so that:

- a driver joining a cluster uses the authentication that cluster really has: normlab
  asks the head's GCS (one gRPC call without a token, then one with the token it finds)
  and sets ``RAY_AUTH_MODE`` to match, instead of guessing from a token file that may
  belong to another cluster. A cluster that wants a token normlab cannot find or that
  refuses the token is one clear message, before any trial starts;
- a local Ray binds to and advertises 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
  Ray's own switch, read when ray is imported): nothing of a laptop run is reachable from
  the network;
- Ray's usage statistics and MLflow's telemetry are off unless the user turned them on;
- Tune snapshots its experiment state often, so a driver killed outright still resumes
  trials from their checkpoints.

Every default is only set when the user has not set it.
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
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # any GCS call: the server checks the token first


class RayAuthError(ConnectionError):
    """The cluster's authentication and this driver's do not match, and normlab cannot fix it."""


def find_ray_token() -> tuple[str | None, str]:
    """The Ray token this process would use, and where it came from (as Ray looks: env, path, file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None, str(path)
    except OSError:
        return None, str(path)


def _gcs_status(address: str, token: str | None, timeout: float) -> tuple[str, str]:
    """(gRPC status name, details) of one GCS call to ``address``, with ``token`` if given."""
    import grpc

    channel = grpc.insecure_channel(address)
    call = channel.unary_unary(_GCS_PROBE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(b"", timeout=timeout, metadata=[("authorization", f"Bearer {token}")] if token else None)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    finally:
        channel.close()


def cluster_auth_mode(address: str, timeout: float = 5.0) -> str:
    """``disabled`` or ``token``: what the Ray cluster at ``host:port`` requires of a driver.

    Raises ``ConnectionError`` if the head does not answer and ``RayAuthError`` if it wants
    a token this process does not have or has wrong, each saying what to do.
    """
    status, details = _gcs_status(address, None, timeout)
    if status == "OK":
        return "disabled"
    if status != "UNAUTHENTICATED":
        raise ConnectionError(
            f"Ray head {address} is unreachable ({status}: {details}); is `ray start --head` running there?"
        )
    token, where = find_ray_token()
    if token is None:
        raise RayAuthError(
            f"the Ray cluster at {address} requires token authentication and this machine has no token ({where} "
            "does not exist). Get the cluster's token from its head node (`ray get-auth-token` there, or copy its "
            "~/.ray/auth_token) and put it in ~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH at it, or set RAY_AUTH_TOKEN"
        )
    status, details = _gcs_status(address, token, timeout)
    if status == "OK":
        return "token"
    raise RayAuthError(
        f"the Ray cluster at {address} refused the token from {where} ({details or status}): it is another cluster's. "
        "Use the token of this cluster's head node (`ray get-auth-token` there)"
    )


def prepare_environment(local_ray: bool = False, address: str | None = None) -> None:
    """Set normlab's defaults for Ray and MLflow; call before importing either.

    ``local_ray``: this process will start a local Ray, which should bind to and advertise
    127.0.0.1 only (Ray reads the switch when it is imported). Not for a driver joining a
    remote cluster: the cluster must be able to reach it.
    ``address``: the ``host:port`` of the cluster this driver joins; its authentication
    mode is probed and ``RAY_AUTH_MODE`` set to match (``RayAuthError`` on a mismatch that
    normlab cannot fix, e.g. ``RAY_AUTH_MODE`` set by hand to the other mode).
    """
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if local_ray:
        os.environ.setdefault(LOOPBACK_SWITCH, "0")
    if address and probe_address(address):
        mode = cluster_auth_mode(address)
        wanted = os.environ.get("RAY_AUTH_MODE")
        if wanted and wanted != mode:
            raise RayAuthError(
                f"RAY_AUTH_MODE={wanted} is set, but the Ray cluster at {address} has "
                f"{'token authentication' if mode == 'token' else 'authentication turned off'}: unset RAY_AUTH_MODE "
                "(normlab matches the cluster by itself)"
            )
        os.environ["RAY_AUTH_MODE"] = mode


def probe_address(address: str) -> bool:
    """Whether ``address`` is a ``host:port`` GCS address normlab can probe (not ray://, not auto)."""
    return not (address.startswith("ray://") or address == "auto" or ":" not in address)


def check_ray_head(address: str, timeout: float = 5.0) -> None:
    """Fail fast if a ``host:port`` Ray head does not accept connections (ray.init would hang)."""
    if not probe_address(address):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(
            f"Ray head {address} is unreachable ({exc}); is `ray start --head` running there?"
        ) from exc
