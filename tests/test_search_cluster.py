"""The cluster path: a real Ray head (`ray start --head`, token authentication on) and a real
`mlflow server`, both on 127.0.0.1, driven by `normlab submit --address --tracking-uri
--storage-path` exactly as a researcher would."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import requests
from conftest import BIN, free_port, loopback_env, run_normlab, start_token_head, stop, wait_for
from mlflow.tracking import MlflowClient

SPACE = """
name: cluster_smoke
fixed: {dataset: digits, epochs: 2, train_subset: 256, batch_size: 64, eval_attacks: [fgsm],
        eval_eps: [0.1], epoch_adv_samples: 64, final_adv_samples: 64}
grid: {norm: [batchnorm, robustnorm_batchstats]}
resources: {cpu: 1}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    home = root / "home"
    home.mkdir()
    env = loopback_env(home)
    # token authentication on, as on a real cluster
    ray_log, mlflow_log = root / "ray.log", root / "mlflow.log"
    head, ray_port = start_token_head(env, ray_log, "--include-dashboard=false")
    mlflow_port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "server-artifacts"),
        ],
        env=env,
        stdout=mlflow_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: "Ray runtime started" in ray_log.read_text(), 120, "ray head", head, ray_log)
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_for(
            lambda: requests.get(f"{uri}/health", timeout=2).status_code == 200,
            120,
            "mlflow server",
            server,
            mlflow_log,
        )
        yield {"root": root, "env": env, "address": f"127.0.0.1:{ray_port}", "uri": uri}
    finally:
        stop(head)
        stop(server)


def test_submit_to_a_real_head_and_mlflow_server(cluster):
    root = cluster["root"]
    (root / "space.yaml").write_text(textwrap.dedent(SPACE))
    storage = root / "shared-storage"
    env = {k: v for k, v in cluster["env"].items() if k not in ("http_proxy", "https_proxy", "no_proxy")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            "space.yaml",
            "--address",
            cluster["address"],
            "--tracking-uri",
            cluster["uri"],
            "--storage-path",
            str(storage),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"on Ray {cluster['address']}" in proc.stderr
    assert "robustnorm_batchstats" in proc.stdout and "final_adv_acc" in proc.stdout
    assert not (root / "normlab_runs").exists()  # nothing fell back to the local defaults

    client = MlflowClient(tracking_uri=cluster["uri"])
    experiment = client.get_experiment_by_name("cluster_smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].data.tags["normlab.ray_address"] == cluster["address"]
    assert parents[0].data.tags["normlab.storage_path"].startswith(str(storage))
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert [m.step for m in client.get_metric_history(child.info.run_id, "adv_acc")] == [1, 2]
        assert {"result.json", "robust_accuracy_vs_eps.png", "checkpoint"} <= {
            a.path for a in client.list_artifacts(child.info.run_id)
        }
        # artifacts went through the server into its artifact destination
    assert any((root / "server-artifacts").rglob("checkpoint.pt"))
    assert list(storage.glob("cluster_smoke-*/train_*/checkpoint_*/checkpoint.pt"))

    status = run_normlab("status", "--storage-path", str(storage), cwd=root)
    assert status.returncode == 0 and status.stdout.count("TERMINATED") == 2
    report = run_normlab("report", "cluster_smoke", "--tracking-uri", cluster["uri"], "--format", "csv", cwd=root)
    assert report.returncode == 0 and len(report.stdout.strip().splitlines()) == 3


def test_a_driver_without_the_token_is_refused_by_the_head(cluster):
    """Token authentication really is on: the trap docs/design.md describes, and why normlab sets RAY_AUTH_MODE."""
    env = {**cluster["env"], "RAY_AUTH_MODE": "disabled"}
    code = f"import ray; ray.init(address='{cluster['address']}')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Failed to connect" in proc.stderr or "uthenticat" in proc.stderr


def test_unreachable_servers_are_reported_before_any_trial(cluster, tmp_path):
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    dead = free_port()
    started = time.time()
    proc = run_normlab(
        "submit",
        "space.yaml",
        "--address",
        cluster["address"],
        "--tracking-uri",
        f"http://127.0.0.1:{dead}",
        cwd=tmp_path,
        HOME=cluster["env"]["HOME"],
    )
    assert proc.returncode == 2 and f"MLflow tracking server http://127.0.0.1:{dead} is unreachable" in proc.stderr
    proc = run_normlab(
        "submit",
        "space.yaml",
        "--address",
        f"127.0.0.1:{dead}",
        "--tracking-uri",
        cluster["uri"],
        cwd=tmp_path,
        HOME=cluster["env"]["HOME"],
    )
    assert proc.returncode == 2 and f"Ray head 127.0.0.1:{dead} is unreachable" in proc.stderr
    assert time.time() - started < 60
    assert not (tmp_path / "normlab_runs" / "ray_results").exists()


def test_a_missing_or_wrong_token_is_one_clear_message_before_any_trial(cluster, tmp_path):
    """normlab asks the head what it requires, then says what to do; nothing starts."""
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    proc = run_normlab("submit", "space.yaml", "--address", cluster["address"], cwd=tmp_path, HOME=str(empty_home))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "requires token authentication and this machine has no token" in proc.stderr
    assert "ray get-auth-token" in proc.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 32)
    proc = run_normlab(
        "submit",
        "space.yaml",
        "--address",
        cluster["address"],
        cwd=tmp_path,
        HOME=str(empty_home),
        RAY_AUTH_TOKEN_PATH=str(wrong),
    )
    assert proc.returncode == 2 and "refused the token from" in proc.stderr and str(wrong) in proc.stderr
    assert not (tmp_path / "normlab_runs" / "ray_results").exists()
