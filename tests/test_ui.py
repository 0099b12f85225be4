"""`normlab ui`: the MLflow UI on normlab's store, bound to 127.0.0.1, shows parent and child runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import requests
from conftest import free_port, normlab_env
from mlflow.tracking import MlflowClient

from orchestrator.tracking import resolve_tracking
from trainables.ray_trainable import runtime_settings


def test_ui_serves_the_default_store_on_loopback(tmp_path):
    target = resolve_tracking(None, tmp_path)  # the default: tmp_path/normlab_runs/mlflow.db
    client = MlflowClient(tracking_uri=target.uri)
    experiment = client.create_experiment("uisearch", artifact_location=target.artifact_root)
    parent = client.create_run(experiment, run_name="uisearch-1").info.run_id
    child = client.create_run(experiment, run_name="trial-0", tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_metric(child, "adv_acc", 0.5, step=1)

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)], cwd=tmp_path,
                            env=normlab_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert requests.get(base, timeout=10).status_code == 200  # the UI page itself
        runs = requests.post(f"{base}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment]}, timeout=10).json()
        by_name = {r["info"]["run_name"]: r for r in runs["runs"]}
        assert set(by_name) == {"uisearch-1", "trial-0"}
        tags = {t["key"]: t["value"] for t in by_name["trial-0"]["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parent
        if shutil.which("ss"):
            listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
            assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_trials_take_threads_and_device_from_their_ray_resources():
    assert runtime_settings({}, cpus=2, gpus=0) == {"threads": 2, "device": "cpu"}
    assert runtime_settings({}, cpus=0.5, gpus=0.5) == {"threads": 1, "device": "cuda"}  # fractional GPU
    assert runtime_settings({"threads": 4, "device": "cuda:1"}, cpus=1, gpus=1) == {}  # explicit settings win
