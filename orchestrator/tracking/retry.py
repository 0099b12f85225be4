"""Calls to the tracking server that survive its outages, and messages that leak no secrets.

normlab's policy for MLflow (README, "When things fail"): every call is retried with
exponential backoff (0.5 s doubling to 10 s) while the error is *transient* (the server
is down or restarting, a 5xx answer, a locked SQLite store) and a caller-given time
budget lasts; then ``TrackingUnavailable``. Errors a retry cannot fix (a 4xx answer: a
refused Host header, a bad parameter) raise ``TrackingError`` at once. MLflow's own HTTP
retries are turned off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` unless set) so that the
budget is the only clock. Callers decide what a budget overrun means: a trial carries on
and syncs later, the driver warns and never raises.

Tracking URIs may carry credentials (``http://user:password@host``); ``mask_uri`` and
``scrub`` replace the password with ``***`` wherever a URI or an error message is shown
or stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from orchestrator.credentials.uris import scrub

T = TypeVar("T")

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

_TRANSIENT_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "INTERNAL_ERROR",
}


class TrackingError(RuntimeError):
    """The tracking server refused a request that retrying will not change."""


class TrackingUnavailable(TrackingError):
    """The tracking server stayed unreachable for the whole time budget."""


# OSErrors that waiting does not cure (a server outage shows as connection errors and timeouts)
PERMANENT_OS_ERRORS = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(error: BaseException) -> bool:
    """Whether retrying the same request later may succeed."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()  # noqa: N806
    if isinstance(error, MlflowException):
        return error.error_code in _TRANSIENT_CODES or error.get_http_status_code() >= 500
    import requests

    if isinstance(error, PERMANENT_OS_ERRORS):  # a local artifact root that is read-only, missing, ...
        return False
    return isinstance(error, (OSError, requests.RequestException, TimeoutError))


def retrying(what: str, call: Callable[[], T], deadline: float, *, on_retry: Callable[[], None] | None = None) -> T:
    """``call()`` until it succeeds, a non-transient error, or ``deadline`` (``time.monotonic``).

    ``call`` must be safe to repeat: a request whose answer was lost may have been carried
    out (``on_retry`` runs before each repeat, e.g. to forget cached state).
    """
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as exc:  # classified below; anything else is a bug and propagates
            if not is_transient(exc):
                if _is_mlflow_error(exc) or isinstance(exc, PERMANENT_OS_ERRORS):  # refused: said once, not waited on
                    raise TrackingError(f"{what}: {scrub(str(exc))}") from exc
                raise
            if time.monotonic() + delay > deadline:
                raise TrackingUnavailable(f"{what}: the tracking server is unreachable ({_short(exc)})") from exc
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _is_mlflow_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("mlflow")


def _short(error: BaseException) -> str:
    text = scrub(" ".join(str(error).split()))
    return text if len(text) <= 300 else text[:297] + "..."
