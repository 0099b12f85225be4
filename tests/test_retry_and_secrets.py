"""The tracking-call policy (retry what is transient within a budget, raise the rest) and
credentials that never leak: masked when shown, kept out of everything stored.

The last test submits a real search with ``http://user:password@127.0.0.1:PORT`` as the
tracking URI against a real `mlflow server` and then searches every file the search left
(the search record, Ray Tune's pickles and state, checkpoints) and every MLflow field for
the password.
"""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest
import requests
from conftest import MlflowServer, run_normlab
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from orchestrator.credentials.uris import mask_uri, scrub, strip_credentials
from orchestrator.tracking.retry import TrackingError, TrackingUnavailable, is_transient, retrying


def test_mask_strip_and_scrub_credentials():
    uri = "http://alice:s3cr3t@mlflow.example:5000/base?token=abc&experiment=7"
    assert mask_uri(uri) == "http://alice:***@mlflow.example:5000/base?token=***&experiment=7"
    assert strip_credentials(uri) == ("http://mlflow.example:5000/base?token=abc&experiment=7", "alice", "s3cr3t")
    assert strip_credentials("sqlite:///x.db") == ("sqlite:///x.db", None, None)
    assert strip_credentials("http://al%3Ace:p%40ss@h:5000") == ("http://h:5000", "al:ce", "p@ss")  # percent-decoded
    assert mask_uri("sqlite:////tmp/a:b@c.db") == "sqlite:////tmp/a:b@c.db"  # no netloc: nothing to mask
    message = "API request to http://bob:hunter2@127.0.0.1:5000/api/2.0/runs failed: refused"
    assert "hunter2" not in scrub(message) and "http://bob:***@127.0.0.1:5000" in scrub(message)


def test_which_errors_are_transient():
    assert is_transient(MlflowException("API request to http://x failed with exception ConnectionError"))
    assert is_transient(requests.ConnectionError("refused"))
    assert is_transient(MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE"))
    assert not is_transient(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert is_transient(ConnectionRefusedError(111, "refused")) and is_transient(TimeoutError("slow"))
    assert not is_transient(PermissionError(13, "read-only artifact root"))  # waiting would not help
    assert not is_transient(FileNotFoundError(2, "no such folder"))
    assert not is_transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))
    assert not is_transient(TypeError("a bug"))


def test_retrying_waits_out_transient_errors_within_its_budget():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise MlflowException("API request failed with exception ConnectionError")
        return "ok"

    forgotten = []
    assert retrying("log", flaky, time.monotonic() + 30, on_retry=lambda: forgotten.append(1)) == "ok"
    assert len(calls) == 3 and len(forgotten) == 2
    assert calls[2] - calls[1] >= 2 * (calls[1] - calls[0]) * 0.9  # backoff doubles

    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="the tracking server is unreachable"):
        retrying("log", lambda: (_ for _ in ()).throw(MlflowException("down")), time.monotonic() + 2)
    assert time.monotonic() - started < 4
    with pytest.raises(TrackingError, match="RESOURCE_DOES_NOT_EXIST|no run"):
        retrying(
            "log",
            lambda: (_ for _ in ()).throw(
                RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"})
            ),
            time.monotonic() + 30,
        )
    started = time.monotonic()
    with pytest.raises(TrackingError, match="log: .*read-only"):  # refused at once, not waited on for 30 s
        retrying("log", lambda: (_ for _ in ()).throw(PermissionError(13, "read-only")), time.monotonic() + 30)
    assert time.monotonic() - started < 2
    with pytest.raises(TypeError):  # a bug is not an outage: it surfaces at once
        retrying("log", lambda: (_ for _ in ()).throw(TypeError("bug")), time.monotonic() + 30)


SPACE = """
name: secret
fixed: {dataset: digits, epochs: 2, train_subset: 256, batch_size: 64, eval_attacks: [fgsm], eval_eps: [0.1],
        epoch_adv_samples: 64, final_adv_samples: 64, test_subset: 96}
grid: {norm: [robustnorm]}
resources: {cpu: 1}
"""


def test_a_password_in_the_tracking_uri_is_never_printed_or_stored(tmp_path):
    password = "pw-7f3c9e1b-do-not-store"
    server = MlflowServer(
        tmp_path
    ).start()  # no auth on the server: it ignores the credentials, normlab must not leak them
    try:
        uri = server.uri.replace("http://", f"http://researcher:{password}@")
        (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
        proc = run_normlab("submit", "space.yaml", "--num-cpus", "2", "--tracking-uri", uri, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert password not in proc.stdout + proc.stderr
        leaked = [
            str(p)
            for p in (tmp_path / "normlab_runs").rglob("*")
            if p.is_file() and password.encode() in p.read_bytes()
        ]
        assert leaked == [], f"the password was written to {leaked}"
        client = MlflowClient(tracking_uri=server.uri)
        for run in client.search_runs([client.get_experiment_by_name("secret").experiment_id]):
            fields = {**run.data.params, **run.data.tags}
            assert not [k for k, v in fields.items() if password in v], fields
            assert run.info.status == "FINISHED"
        record = next((tmp_path / "normlab_runs" / "ray_results").glob("secret-*/normlab/search.json")).read_text()
        assert server.uri in record  # the URI without its credentials; resume takes them from the environment

        # resume needs the password again, from the environment (as MLflow itself reads it)
        proc = run_normlab(
            "resume",
            "secret",
            "--num-cpus",
            "2",
            cwd=tmp_path,
            MLFLOW_TRACKING_USERNAME="researcher",
            MLFLOW_TRACKING_PASSWORD=password,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert password not in proc.stdout + proc.stderr
    finally:
        server.stop()
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)


def test_a_ray_job_carries_no_tracking_credentials(monkeypatch):
    """What normlab sends to Ray's job server (entrypoint, metadata, runtime environment) is stored in Ray's
    job table and shown by `ray job list` and the dashboard: credentials set here stay here, and a tracking
    URI that carries them is refused. tests/test_ray_jobs.py checks the same against a real job server
    (the job's info, `ray job list`, the driver's logs, the storage)."""
    from orchestrator.running.jobs import SECRET_ENV, JobError, JobRequest, left_behind, tracking_for_job

    password = "pw-5a0c-not-for-ray"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "researcher")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", password)
    assert left_behind() == list(SECRET_ENV)  # the client warns that they stay behind
    request = JobRequest(
        search="secret",
        command="submit",
        args=("space.yaml", "--tracking-uri", tracking_for_job("http://mlflow:5000"), "--storage-path", "/s"),
        dashboard="http://head:8265",
        storage_path="/s",
    )
    sent = json.dumps(request.submit_kwargs("normlab-secret-20260101-000000"))
    assert password not in sent and not any(k in sent for k in SECRET_ENV)
    with pytest.raises(JobError) as refused:
        tracking_for_job(f"http://researcher:{password}@mlflow:5000")
    assert password not in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://researcher:{password}@mlflow:5000")
    with pytest.raises(JobError):
        tracking_for_job(None)  # the client's own MLFLOW_TRACKING_URI is not taken along with its password
