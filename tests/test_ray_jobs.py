"""Searches as Ray jobs: a real `ray start --head` with its dashboard (the job server) on 127.0.0.1,
token authentication on, driven by `normlab submit --job`, `status`, `logs`, `stop` and
`resume --job` exactly as a researcher would. The client is a process that ends at once; the
search goes on in the job. One head serves the module (docs/cluster.md, "Ray jobs")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import click.testing
import pytest
from conftest import BIN, free_port, loopback_env, run_normlab, start_token_head, wait_for
from mlflow.tracking import MlflowClient

PASSWORD = "pw-3b1d77e0-never-in-a-job"

SPACE = """
name: {name}
fixed: {{dataset: digits, epochs: {epochs}, train_subset: {subset}, batch_size: 64, eval_attacks: [fgsm],
        eval_eps: [0.1], epoch_adv_samples: 64, final_adv_samples: 64, test_subset: 96}}
grid: {{norm: [batchnorm, robustnorm]}}
resources: {{cpu: 1}}
checkpoint: {{every: 1, keep: 2}}
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    home = root / "home"
    home.mkdir()
    env = loopback_env(home)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # the cluster's normlab: the entrypoint is `normlab ...`
    dashboard_port = free_port()
    head_env = {**env, "RAY_AUTH_MODE": "token"}
    # a private temp dir: a job's driver finds its cluster through the temp dir's "current cluster" file,
    # which another Ray started on this machine would otherwise have rewritten
    temp_dir = Path(tempfile.mkdtemp(prefix="nlj-", dir="/tmp"))
    log = root / "ray.log"
    proc, _ = start_token_head(
        env,
        log,
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}",
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        import requests

        # the job server answers once the dashboard's job module is up
        token = {"Authorization": f"Bearer {(home / '.ray' / 'auth_token').read_text().strip()}"}
        wait_for(
            lambda: requests.get(f"{dashboard}/api/jobs/", headers=token, timeout=2).status_code == 200,
            180,
            "the job server",
            proc,
            log,
        )
        # the client: the test's environment with the head's token (as after `ray get-auth-token` on the head),
        # and tracking credentials that must never reach the job
        client_env = {
            "HOME": str(home),
            "MLFLOW_TRACKING_USERNAME": "researcher",
            "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        }
        yield {"root": root, "env": head_env, "dashboard": dashboard, "client_env": client_env}
    finally:
        # not `ray stop`: it ends every Ray process of the machine, other sessions' too. The head's own
        # process group, whole: a head told SIGTERM drains for 30 s, which a test has no use for
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _write_space(folder: Path, name: str, epochs: int, subset: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(SPACE.format(name=name, epochs=epochs, subset=subset)))
    return path


def _job_info(dashboard: str, job_id: str, home: str) -> dict:
    """The job as Ray stores and shows it (`ray job list`'s fields), read with the head's token."""
    import requests

    token = (Path(home) / ".ray" / "auth_token").read_text().strip()
    answer = requests.get(f"{dashboard}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    answer.raise_for_status()
    return answer.json()


def _wait_state(dashboard: str, job_id: str, home: str, states: set[str], timeout: float) -> dict:
    deadline = time.time() + timeout
    info = _job_info(dashboard, job_id, home)
    while info["status"] not in states and time.time() < deadline:
        time.sleep(0.5)
        info = _job_info(dashboard, job_id, home)
    assert info["status"] in states, info
    return info


def _children(tracking: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _submit(head: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_normlab(*args, "--job", "--address", head["dashboard"], cwd=cwd, timeout=120, **head["client_env"])


@pytest.mark.slow
def test_a_search_submitted_as_a_job_outlives_its_client_and_finishes(head):
    root, home = head["root"] / "one", head["client_env"]["HOME"]
    space = _write_space(root, "jobsmoke", epochs=2, subset=256)
    tracking, storage = f"sqlite:///{root / 'mlflow.db'}", root / "storage"
    started = time.time()
    proc = _submit(head, "submit", space.name, "--tracking-uri", tracking, "--storage-path", str(storage), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip()
    assert job_id.startswith("normlab-jobsmoke-"), proc.stdout
    assert time.time() - started < 60  # it returned; the client process is gone (run() waited for it)
    assert f"normlab logs jobsmoke --address {head['dashboard']}" in proc.stderr
    assert "normlab status jobsmoke" in proc.stderr and "MLflow: " in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in proc.stderr  # the warning that it stays behind

    info = _wait_state(head["dashboard"], job_id, home, {"SUCCEEDED", "FAILED", "STOPPED"}, 240)
    logs = run_normlab("logs", "jobsmoke", "--address", head["dashboard"], "--no-follow", cwd=root, HOME=home)
    assert info["status"] == "SUCCEEDED", logs.stdout[-4000:]
    assert info["metadata"]["normlab.search"] == "jobsmoke"
    # secrets: nothing Ray stores or shows of the job holds the client's credentials
    assert PASSWORD not in json.dumps(info) and "MLFLOW_TRACKING_PASSWORD" not in json.dumps(info["runtime_env"])
    assert logs.returncode == 0 and PASSWORD not in logs.stdout + logs.stderr
    assert "search 'jobsmoke': 2 trial(s) on Ray" in logs.stdout and "final_adv_acc" in logs.stdout
    listed = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", head["dashboard"]],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert job_id in listed.stdout and PASSWORD not in listed.stdout + listed.stderr
    leaked = [str(p) for p in storage.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert leaked == []

    children = _children(tracking, "jobsmoke")
    assert sorted(c.info.run_name for c in children) == ["batchnorm standard", "robustnorm standard"]
    client = MlflowClient(tracking_uri=tracking)
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch")] == [1, 2]
        assert "final_adv_acc" in child.data.metrics

    # status: the job's state beside the trials, each trial by its MLflow run name
    status = run_normlab("status", "jobsmoke", "--storage-path", str(storage), cwd=root, HOME=home)
    assert status.returncode == 0, status.stderr
    assert f"Ray job {job_id}: SUCCEEDED" in status.stdout
    assert "batchnorm standard" in status.stdout and "robustnorm standard" in status.stdout
    assert status.stdout.count("TERMINATED") == 2


def _checkpoints(storage: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for ckpt in storage.glob("jobstop-*/train_*/checkpoint_*/checkpoint.pt"):
        found[ckpt.parent.parent.name] = found.get(ckpt.parent.parent.name, 0) + 1
    return found


@pytest.mark.slow
def test_a_stopped_job_resumes_as_a_job_with_every_epoch_once(head):
    root, home, dashboard = head["root"] / "two", head["client_env"]["HOME"], head["dashboard"]
    epochs = 30  # a few seconds per trial: stopped while both train
    space = _write_space(root, "jobstop", epochs=epochs, subset=768)
    tracking, storage = f"sqlite:///{root / 'mlflow.db'}", root / "storage"
    proc = _submit(head, "submit", str(space), "--tracking-uri", tracking, "--storage-path", str(storage), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip()
    deadline = time.time() + 240
    while time.time() < deadline and not _checkpoints(storage):  # a trial reported an epoch
        assert _job_info(dashboard, job_id, home)["status"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    assert _checkpoints(storage), _job_info(dashboard, job_id, home)

    stopped = cli("stop", "jobstop", "--address", dashboard, env={"HOME": home})  # in this process: at once
    assert stopped.exit_code == 0, stopped.output
    assert f"Ray job {job_id}: STOPPED" in stopped.stderr
    assert f"normlab resume jobstop --job --address {dashboard} --storage-path {storage}" in stopped.stderr
    logs = run_normlab("logs", job_id, "--address", dashboard, "--no-follow", cwd=root, HOME=home)
    assert "Ray Tune saved the search's state" in logs.stdout, logs.stdout[-4000:]  # SIGTERM ended Tune cleanly
    finished = [c for c in _children(tracking, "jobstop") if c.info.status == "FINISHED"]
    assert len(finished) < 2, "the search ended before it was stopped: give it more epochs"
    status = run_normlab("status", "jobstop", "--storage-path", str(storage), cwd=root, HOME=home)
    assert f"Ray job {job_id}: STOPPED" in status.stdout, status.stdout

    resumed = _submit(head, "resume", "jobstop", "--storage-path", str(storage), cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resume_id = resumed.stdout.strip()
    assert resume_id.startswith("normlab-jobstop-") and resume_id != job_id
    info = _wait_state(dashboard, resume_id, home, {"SUCCEEDED", "FAILED", "STOPPED"}, 240)
    followed = run_normlab("logs", "jobstop", "--address", dashboard, "--follow", cwd=root, HOME=home)
    assert info["status"] == "SUCCEEDED", followed.stdout[-4000:]
    assert "resuming search jobstop-" in followed.stdout  # the newest job of the search: the resume

    client = MlflowClient(tracking_uri=tracking)
    children = _children(tracking, "jobstop")
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        for metric in ("epoch", "train_loss", "clean_acc", "adv_acc"):
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, metric))
            assert steps == list(range(1, epochs + 1)), (child.info.run_name, metric, steps)
    status = run_normlab("status", "jobstop", "--storage-path", str(storage), cwd=root, HOME=home)
    assert f"Ray job {resume_id}: SUCCEEDED" in status.stdout and status.stdout.count("TERMINATED") == 2


# ------------------------------------------------------------------ fast: refused before anything starts


def cli(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    """``normlab ARGS`` in this process (the real command line, its real checks), output captured."""
    from click.testing import CliRunner

    from orchestrator.cli import main

    return CliRunner().invoke(main, list(args), env={"RAY_ADDRESS": None, **(env or {})})


def test_job_needs_the_dashboards_http_address(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("submit", "quickstart", "--job", "--address", "127.0.0.1:6379")
    assert result.exit_code == 2, result.output
    assert "--address http://HEAD:8265" in result.stderr and "GCS address" in result.stderr
    result = cli("submit", "quickstart", "--job")
    assert result.exit_code == 2 and "no --address is not one" in result.stderr
    result = cli("submit", "quickstart", "--address", "http://127.0.0.1:8265")
    assert result.exit_code == 2 and "add --job" in result.stderr
    result = cli("submit", "quickstart", "--working-dir", str(tmp_path))
    assert result.exit_code == 2 and "--working-dir: only with --job" in result.stderr
    result = cli("logs", "quickstart", "--address", "127.0.0.1:6379")
    assert result.exit_code == 2 and "http://HEAD:8265" in result.stderr
    result = cli("status", "--address", "127.0.0.1:6379")
    assert result.exit_code == 2 and "http://HEAD:8265" in result.stderr
    result = cli("resume", "quickstart", "--job", "--address", "http://127.0.0.1:1", "--num-cpus", "2")
    assert result.exit_code == 2 and "--num-cpus sizes a local Ray" in result.stderr
    assert not (tmp_path / "normlab_runs").exists()


def test_job_refuses_bad_input_and_paths_the_cluster_cannot_use_before_submitting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "bad.yaml").write_text("name: bad\nfixed: {dataset: digits, nrom: batchnorm}\n")
    result = cli("submit", "bad.yaml", "--job", "--address", dead)
    assert result.exit_code == 2 and "invalid search space" in result.stderr and "nrom" in result.stderr
    common = ("submit", "quickstart", "--job", "--address", dead)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = cli(*common, "--tracking-uri", "http://127.0.0.1:5000")
    assert result.exit_code == 2 and "needs --storage-path" in result.stderr
    result = cli(*common, "--tracking-uri", "http://127.0.0.1:5000", "--storage-path", "rel")
    assert result.exit_code == 2 and "give an absolute path" in result.stderr
    result = cli(*common, "--tracking-uri", "sqlite:///mlflow.db", "--storage-path", "/s")
    assert result.exit_code == 2 and "give an absolute path" in result.stderr
    result = cli(*common, "--storage-path", "/shared/normlab")
    assert result.exit_code == 2 and "needs --tracking-uri" in result.stderr
    result = cli(*common, "--tracking-uri", "http://u:sekret@h:5000", "--storage-path", "/s")
    assert result.exit_code == 2 and "carries credentials" in result.stderr and "sekret" not in result.stderr
    result = cli(*common, "--tracking-uri", "http://127.0.0.1:5000", "--storage-path", "/s")
    assert result.exit_code == 2 and f"Ray job server {dead} is unreachable" in result.stderr
    result = cli(*common, "--tracking-uri", "http://h:5000", "--storage-path", "/s", "--entrypoint-resources", "[1]")
    assert result.exit_code == 2 and "JSON object" in result.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "slow or not slow", "-v"]))
