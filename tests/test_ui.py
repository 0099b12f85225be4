"""`normlab ui`: the MLflow UI on normlab's store, bound to 127.0.0.1, shows parent and child runs; the URL it prints."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import requests
from conftest import free_port, normlab_env, run_normlab
from mlflow.tracking import MlflowClient

from orchestrator.tracking.target import resolve_tracking
from trainables.ray_trainable import runtime_settings


def test_ui_serves_the_default_store_on_loopback(tmp_path):
    target = resolve_tracking(None, tmp_path)  # the default: tmp_path/normlab_runs/mlflow.db
    client = MlflowClient(tracking_uri=target.uri)
    experiment = client.create_experiment("uisearch", artifact_location=target.artifact_root)
    search_tags = {"normlab.search": "uisearch", "normlab.search_run": "uisearch-1"}
    older = client.create_run(experiment, run_name="uisearch-0", tags=search_tags, start_time=1000).info.run_id
    parent = client.create_run(experiment, run_name="uisearch-1", tags=search_tags).info.run_id
    child = client.create_run(
        experiment, run_name="trial-0", tags={"mlflow.parentRunId": parent, **search_tags}
    ).info.run_id
    client.log_metric(child, "adv_acc", 0.5, step=1)

    port = free_port()
    out = tmp_path / "ui.out"
    with out.open("w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)],
            cwd=tmp_path,
            env=normlab_env(),
            stdout=stdout,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
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
        # the URL it prints: the newest search's runs table, through normlab's page, its trials unfolded
        url = out.read_text().splitlines()[0]
        assert url == (
            f"{base}/normlab/open?expand={parent}#/experiments/{experiment}/runs?workflowType=machine_learning"
            "&searchFilter=tags.%60normlab.search_run%60%20%3D%20%27uisearch-1%27"
        )
        assert older not in url
        page = requests.get(f"{base}/normlab/open", timeout=10)  # served by MLflow's own server (the plugin app)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1" in page.text and "location.replace(" in page.text
        # the same page at the UI's own address, the form of the links normlab stores; without the query, MLflow's UI
        at_root = requests.get(f"{base}/?normlab=open&expand={parent}", timeout=10)
        assert at_root.status_code == 200 and at_root.text == page.text
        assert at_root.headers["cache-control"] == "no-store"
        ui_page = requests.get(f"{base}/?normlab=other", timeout=10).text
        assert "normlab" not in ui_page and ui_page == requests.get(base, timeout=10).text
        runs = requests.post(
            f"{base}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment]}, timeout=10
        ).json()
        by_name = {r["info"]["run_name"]: r for r in runs["runs"]}
        assert set(by_name) == {"uisearch-0", "uisearch-1", "trial-0"}
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


def test_ui_refuses_a_search_it_does_not_have(tmp_path):
    proc = run_normlab("ui", "--search", "nosuch", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "no search named 'nosuch'" in proc.stderr
