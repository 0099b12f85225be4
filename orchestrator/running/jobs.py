"""A search's driver as a Ray job: submitted to the cluster's job server, found again by the search's name.

``normlab submit SPACE --job --address http://HEAD:8265`` validates the search file here, then
asks the cluster's job server (Ray's dashboard) to run ``normlab submit SPACE ...`` on the
cluster (``job_request`` builds what is sent): the search no longer depends on the
terminal that submitted it. The job's submission id is ``normlab-<search>-<UTC stamp>`` and
its metadata names the search (``normlab.search``), so ``normlab logs NAME``,
``normlab stop NAME`` and ``normlab status NAME --address ...`` find the newest job of a
search by the search's name (``find_job``). The driver inside the job learns its submission
id and the dashboard's address from two plain variables of the job's runtime environment
and writes them beside the search record (``note_job``), so ``normlab status`` finds the job
from the storage path alone.

Secrets never travel with a job: Ray stores a job's entrypoint, metadata and runtime
environment (``env_vars`` included) in its job table and shows them in ``ray job list`` and
the dashboard. The tracking credentials (``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD`` /
``TOKEN``) come from the cluster's own environment (the environment of ``ray start`` on the
node that runs the driver); a tracking URI with ``user:password@`` is refused, and
credentials set in the client's environment are left behind with a warning.

``normlab stop`` asks Ray to stop the job: Ray sends SIGTERM to the driver, which ends Tune
as Ctrl-C would (its state saved; ``driver``), then SIGKILL after
``RAY_JOB_STOP_WAIT_TIME_S``, which a normlab job sets to ``STOP_WAIT_S``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.credentials.uris import strip_credentials
from orchestrator.state import storage
from orchestrator.state.storage import Location

PREFIX = "normlab-"
META_SEARCH = "normlab.search"  # the search's name (the name of its search file)
META_COMMAND = "normlab.command"  # submit or resume
META_STORAGE = "normlab.storage_path"
JOB_ENV = "NORMLAB_RAY_JOB"  # the submission id, in the job's runtime environment
DASHBOARD_ENV = "NORMLAB_RAY_DASHBOARD"  # the job server's address as the client reached it
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray's: seconds from SIGTERM to SIGKILL when a job is stopped
STOP_WAIT_S = 60
JOB_FILE = "normlab/job.json"  # beside the search record (``records.RECORD_FILE``)
SECRET_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class JobError(RuntimeError):
    """A job request normlab refuses, or a job server that cannot be used; the message says what to do."""


def dashboard_address(address: str | None) -> str:
    """The job server's ``http(s)://host:port`` from ``--address`` (or ``RAY_ADDRESS`` when it is
    one), or a ``JobError`` that tells the dashboard's address from the head's GCS address."""
    address = address or (os.environ.get("RAY_ADDRESS") or "")
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    given = f"--address {address}" if address else "no --address"
    raise JobError(
        f"a Ray job needs the address of the cluster's job server, the Ray dashboard (--address http://HEAD:8265); "
        f"{given} is not one. HEAD:6379 is the head's GCS address, which `normlab submit` without --job joins; "
        'the dashboard comes with `pip install "ray[default]"` on the head'
    )


def _auth_headers(address: str, timeout: float = 10.0) -> dict[str, str]:
    """The header the job server at ``address`` wants: none, or the Ray token (found as ``rayenv`` finds
    it) when the server has token authentication; a ``JobError`` saying what to do otherwise."""
    import requests

    from orchestrator.running.rayenv import find_ray_token

    url = f"{address}/api/jobs/"
    try:
        answer = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise JobError(
            f"the Ray job server {address} is unreachable ({type(exc).__name__}); is the head's dashboard "
            "running there (`ray start --head --dashboard-host 0.0.0.0`, port 8265)?"
        ) from exc
    if answer.status_code not in (401, 403):
        return {}
    token, where = find_ray_token()
    if token is None:
        raise JobError(
            f"the Ray job server {address} requires token authentication and this machine has no token ({where} does "
            "not exist). Get the cluster's token from its head node (`ray get-auth-token` there) and put it in "
            "~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH at it, or set RAY_AUTH_TOKEN"
        )
    headers = {"Authorization": f"Bearer {token}"}
    if requests.get(url, timeout=timeout, headers=headers).status_code in (401, 403):
        raise JobError(
            f"the Ray job server {address} refused the token from {where}: it is another cluster's. "
            "Use the token of this cluster's head node (`ray get-auth-token` there)"
        )
    return headers


def connect(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for the job server at ``address`` (``dashboard_address``), authenticated."""
    address = dashboard_address(address)
    headers = _auth_headers(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(f"cannot use the Ray job server {address}: {exc}") from exc


def submission_id(search: str, now: datetime | None = None) -> str:
    """``normlab-<search>-<YYYYmmdd-HHMMSS>`` (UTC); the search name is kept to letters, digits, ``_`` and ``-``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{PREFIX}{re.sub(r'[^A-Za-z0-9_-]+', '_', search)[:60]}-{stamp}"


@dataclass(frozen=True)
class JobRequest:
    """Everything sent to the job server for one search (what Ray stores and shows: no secrets)."""

    search: str
    command: str  # submit | resume
    args: tuple[str, ...]  # normlab's arguments after the command
    dashboard: str
    storage_path: str
    working_dir: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_resources: dict[str, float] | None = None

    @property
    def entrypoint(self) -> str:
        return shlex.join(["normlab", self.command, *self.args])

    def submit_kwargs(self, job_id: str) -> dict[str, Any]:
        """``JobSubmissionClient.submit_job``'s keyword arguments for submission id ``job_id``."""
        env_vars = {JOB_ENV: job_id, DASHBOARD_ENV: self.dashboard, STOP_WAIT_ENV: str(STOP_WAIT_S)}
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        if self.working_dir:
            runtime_env["working_dir"] = self.working_dir
        kwargs: dict[str, Any] = {
            "entrypoint": self.entrypoint,
            "submission_id": job_id,
            "runtime_env": runtime_env,
            "metadata": {META_SEARCH: self.search, META_COMMAND: self.command, META_STORAGE: self.storage_path},
        }
        if self.entrypoint_num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = self.entrypoint_num_cpus
        if self.entrypoint_resources:
            kwargs["entrypoint_resources"] = dict(self.entrypoint_resources)
        return kwargs


def cluster_path(value: str | None, option: str, what: str) -> str:
    """``value`` as the cluster will read it: a URI, or an absolute path; a ``JobError`` for none or a
    relative path (the job runs elsewhere, in a folder of Ray's)."""
    if not value:
        raise JobError(f"a Ray job needs {option}: {what}")
    if storage.is_uri(value):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise JobError(
            f"{option} {value}: a Ray job runs on the cluster, in a folder of Ray's; give an absolute path ({what})"
        )
    return str(path)


def tracking_for_job(tracking_uri: str | None) -> str:
    """The tracking URI a job's driver gets: ``--tracking-uri`` or this process's ``MLFLOW_TRACKING_URI``,
    never with credentials in it (Ray would store and show them)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    what = "an MLflow server every node reaches (http://...), or an absolute sqlite:////... on a one-node cluster"
    if uri and "://" in uri:
        bare, user, password = strip_credentials(uri)
        if user or password:
            raise JobError(
                f"tracking URI {bare} carries credentials (user:password@): a Ray job's command line is stored and "
                "shown by Ray (`ray job list`, the dashboard). Give the URI without them and set "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the cluster's environment (see docs/cluster.md)"
            )
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            raise JobError(f"--tracking-uri {uri}: a Ray job runs in a folder of Ray's; give an absolute path ({what})")
        return uri
    return cluster_path(uri, "--tracking-uri", what)


def left_behind() -> list[str]:
    """The tracking credentials set here, which a job does not take along (the cluster's own are used)."""
    return [k for k in SECRET_ENV if os.environ.get(k)]


AGENT_WAIT_S = 60.0  # a head that just started answers before its job agent is up ("No available agent")


def submit(client: Any, request: JobRequest, *, attempts: int = 5) -> str:
    """Submit ``request``; returns the submission id (``-2``, ``-3``... when one of that second exists).
    A job server whose agent is not up yet is asked again for up to ``AGENT_WAIT_S`` seconds."""
    base = submission_id(request.search)
    n, deadline = 1, time.monotonic() + AGENT_WAIT_S
    while True:
        job_id = base if n == 1 else f"{base}-{n}"
        try:
            return client.submit_job(**request.submit_kwargs(job_id))
        except RuntimeError as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            if "already exists" not in str(exc) or n == attempts:
                raise JobError(f"the Ray job server refused the job: {exc}") from exc
            n += 1


def _started(job: Any) -> int:
    return int(getattr(job, "start_time", None) or 0)


def find_job(client: Any, name: str) -> Any:
    """The newest job of search ``name`` (a search name, a search folder's name, or a submission id), or
    a ``JobError`` listing none found."""
    jobs = [j for j in client.list_jobs() if getattr(j, "submission_id", None)]
    exact = [j for j in jobs if j.submission_id == name]
    if exact:
        return exact[0]
    names = {name, name.rsplit("-", 2)[0]}  # a search folder's name is NAME-YYYYmmdd-HHMMSS
    mine = [j for j in jobs if (j.metadata or {}).get(META_SEARCH) in names and j.submission_id.startswith(PREFIX)]
    if not mine:
        raise JobError(f"no Ray job of search {name!r} on the job server (normlab's jobs: `ray job list`)")
    return max(mine, key=_started)


def job_line(job: Any, address: str) -> str:
    """One line: the job, its state and, when it ended badly, Ray's message."""
    status = str(getattr(job.status, "value", job.status))
    message = (job.message or "").strip().splitlines()
    why = f" ({message[0][:200]})" if status in ("FAILED", "STOPPED") and message else ""
    return f"Ray job {job.submission_id}: {status}{why} on {address}"


def wait_for(client: Any, job_id: str, states: Iterable[str], timeout: float) -> str:
    """Poll the job until it is in one of ``states`` or ``timeout`` seconds pass; its last state."""
    wanted = set(states)
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def follow_logs(client: Any, job_id: str, write: Callable[[str], None], *, follow: bool) -> None:
    """The driver's output: what there is now, or (``follow``) everything until the job ends."""
    if not follow:
        write(client.get_job_logs(job_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


# ------------------------------------------------------------------ the driver's side, inside the job


def note_job(folder: Location, command: str) -> str | None:
    """Inside a normlab job: write the job's submission id and dashboard beside the search record
    (``JOB_FILE``), newest first; returns the submission id (None outside a job)."""
    job_id = os.environ.get(JOB_ENV)
    if not job_id:
        return None
    previous = read_jobs(folder)
    entry = {"submission_id": job_id, "dashboard": os.environ.get(DASHBOARD_ENV, ""), "command": command}
    jobs = [entry, *[j for j in previous if j.get("submission_id") != job_id]]
    storage.write_atomic(folder.child(JOB_FILE), json.dumps({"jobs": jobs}, indent=2).encode())
    return job_id


def read_jobs(folder: Location) -> list[dict[str, str]]:
    """The jobs that ran the search in ``folder``, newest first (empty if none or unreadable)."""
    try:
        data = json.loads(storage.read_bytes(folder.child(JOB_FILE)))
    except (OSError, ValueError):
        return []
    jobs = data.get("jobs") if isinstance(data, dict) else None
    return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []


def mlflow_url(tracking_uri: str, search: str, timeout: float = 5.0) -> str:
    """Where the search's runs will be: its experiment's runs table on an MLflow server that answers
    here, else the server's address (or the store) and the experiment's name."""
    from orchestrator.tracking.links import runs_route, ui_url
    from orchestrator.tracking.target import resolve_tracking

    target = resolve_tracking(tracking_uri)
    if not target.is_server:
        return f"{target.uri} (experiment {search!r}; `normlab ui --tracking-uri {target.uri}` on the head shows it)"
    base = target.uri.rstrip("/")
    try:
        import requests

        answer = requests.get(
            f"{base}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": search}, timeout=timeout
        )
        experiment_id = answer.json()["experiment"]["experiment_id"] if answer.ok else None
    except (OSError, ValueError, KeyError):
        experiment_id = None
    if experiment_id is None:  # its first search: the driver makes the experiment
        return f"{base} (experiment {search!r})"
    return ui_url(base, runs_route(str(experiment_id)), via_open_page=True, at_root=True)
