"""Several Ray nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``), as a real cluster would be.

`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps Ray on loopback, where `ray start --address`
refuses a second node on one host; Ray's own test cluster starts them anyway, and tasks
spread over them (docs/design.md, known traps). These tests drive `normlab submit --address`
against such clusters exactly as a researcher would against a real one:

- two nodes, one of them removed mid-search, with the search's storage on an S3 server
  (SeaweedFS on 127.0.0.1, the ``s3`` fixture): its trials move to the other node from
  their last checkpoints in the bucket, every run ends FINISHED with every epoch once, and
  the record, Ray Tune's state and the checkpoints are in the bucket (none of the keys);
- the trap that broke this before: a stale ``~/.ray/auth_token`` from an earlier
  ``ray start --head`` while this cluster has authentication off (normlab probes the
  cluster instead of guessing from the file);
- GPU scheduling, simulated: a node that declares a GPU it does not have; ``gpu: 0.5``
  packs two trials onto it, ``gpu: 1`` runs them one after the other, and each trial is
  told its GPU id and picks its device from its share (``device: cpu`` keeps CUDA out).
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
from conftest import MlflowServer, normlab_env, run_normlab
from mlflow.tracking import MlflowClient
from s3server import ACCESS_KEY, S3_ENV, SECRET_KEY

from orchestrator.state.records import RECORD_FILE

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

EPOCHS = 6
SPACE = f"""
name: {{name}}
fixed: {{{{dataset: digits, epochs: {EPOCHS}, train_subset: 512, batch_size: 32, eval_attacks: [fgsm], eval_eps: [0.1],
        epoch_adv_samples: 64, final_adv_samples: 64, test_subset: 128, device: cpu}}}}
grid: {{{{norm: [batchnorm, robustnorm], regime: [standard, fgsm_at]}}}}
resources: {{{{cpu: 1, gpu: {{gpu}}}}}}
max_failures: 3
"""


@contextmanager
def one_cpu_head() -> Iterator[Cluster]:
    from ray.cluster_utils import Cluster

    # authentication off, whatever an earlier test in this process left in the environment
    # (the nodes' processes inherit it; RAY_AUTH_MODE=token would make this a token cluster)
    saved = {
        k: os.environ.pop(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH") if k in os.environ
    }
    try:
        made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    finally:
        os.environ.update(saved)
    try:
        yield made
    finally:
        made.shutdown()


@pytest.fixture
def cluster():
    with one_cpu_head() as made:
        yield made


@pytest.fixture
def s3_cluster(s3, monkeypatch):
    """A cluster whose nodes (and the driver) hold the S3 server's keys in their environment, as
    every node of a real cluster storing in a bucket must; yields (cluster, S3 server)."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)  # before the nodes start: their processes inherit it
    with one_cpu_head() as made:
        yield made, s3


def trial_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def stale_token_home(tmp_path):
    """A HOME whose ~/.ray/auth_token belongs to some other cluster (the trap)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-token-of-another-cluster-0123456789abcdef")
    return home


@pytest.mark.slow
def test_two_nodes_one_lost_mid_search(tmp_path, s3_cluster):
    cluster, s3 = s3_cluster
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    head_id, worker_id = cluster.head_node.node_id, worker.node_id
    server = MlflowServer(tmp_path).start()
    client = MlflowClient(tracking_uri=server.uri)
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE.format(name="twonodes", gpu=0)))
    removed: dict[str, float] = {}

    def lose_the_worker() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                running = [r for r in trial_runs(client, "twonodes") if r.info.status == "RUNNING"]
                on_worker = [
                    r
                    for r in running
                    if r.data.tags.get("normlab.node_id") == worker_id and r.data.metrics.get("epoch", 0) >= 2
                ]
                if on_worker:
                    cluster.remove_node(worker)
                    removed["at"] = time.time()
                    removed["trial"] = on_worker[0].data.tags["normlab.trial_id"]
                    return
            except Exception:
                pass
            time.sleep(0.3)

    thread = threading.Thread(target=lose_the_worker, daemon=True)
    thread.start()
    try:
        proc = run_normlab(
            "submit",
            "space.yaml",
            "--address",
            cluster.address,
            "--tracking-uri",
            server.uri,
            "--storage-path",
            s3.uri("twonodes"),
            cwd=tmp_path,
            timeout=1500,
            HOME=str(stale_token_home(tmp_path)),
        )
        thread.join(timeout=60)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "at" in removed, "the worker node was never removed"
        runs = trial_runs(client, "twonodes")
        assert len(runs) == 4
        nodes = {n for r in runs for n in r.data.tags["normlab.nodes"].split(",")}
        assert nodes == {head_id, worker_id}  # the trials spread over both nodes
        moved = next(r for r in runs if r.data.tags["normlab.trial_id"] == removed["trial"])
        assert moved.data.tags["normlab.nodes"].split(",") == [worker_id, head_id]  # and one moved when its node went
        assert moved.data.tags["normlab.resumed"] == "true"
        for run in runs:
            assert run.info.status == "FINISHED", run.data.tags
            for metric in ("epoch", "train_loss", "clean_acc", "adv_acc"):
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
                assert steps == list(range(1, EPOCHS + 1)), (metric, steps)
            assert run.data.tags["normlab.node_id"] == head_id or run.data.tags["normlab.nodes"] == worker_id
        # everything of the search in the bucket: normlab's record, Ray Tune's state, checkpoints
        files = s3.files("twonodes")
        (folder,) = {path.split("/")[0] for path in files}
        assert folder.startswith("twonodes-") and f"{folder}/{RECORD_FILE}" in files
        assert any(p.startswith(f"{folder}/experiment_state-") for p in files)
        trial_folders = {p.split("/")[1] for p in files if p.endswith("/checkpoint.pt")}
        assert len(trial_folders) == 4  # every trial's checkpoints, the moved one's included
        assert not (tmp_path / "normlab_runs" / "ray_results").exists()  # nothing went to the local default
        for path in files:  # and no object holds the keys
            with s3.fs().open_input_stream(f"{s3.bucket}/twonodes/{path}") as fh:
                content = fh.read()
            assert SECRET_KEY.encode() not in content and ACCESS_KEY.encode() not in content, path
    finally:
        server.stop()


def test_a_driver_matches_the_clusters_authentication_whatever_token_files_lie_around(tmp_path, cluster):
    """The cluster has authentication off; a stale token in HOME made normlab set RAY_AUTH_MODE=token."""
    from orchestrator.running.rayenv import cluster_auth_mode

    assert cluster_auth_mode(cluster.address) == "disabled"
    home = stale_token_home(tmp_path)
    code = (
        "import os; from orchestrator.running.rayenv import prepare_environment; "
        f"prepare_environment(address='{cluster.address}'); print(os.environ['RAY_AUTH_MODE'])"
    )
    import subprocess
    import sys

    env = normlab_env(HOME=str(home))
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "disabled", proc.stderr
    # a mode set by hand that contradicts the cluster is one clear message, before anything starts
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE.format(name="authmismatch", gpu=0)))
    started = time.time()
    proc = run_normlab(
        "submit", "space.yaml", "--address", cluster.address, cwd=tmp_path, HOME=str(home), RAY_AUTH_MODE="token"
    )
    assert proc.returncode == 2
    assert (
        "RAY_AUTH_MODE=token is set, but the Ray cluster at" in proc.stderr
        and "authentication turned off" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and time.time() - started < 30


@pytest.mark.slow
def test_fractional_gpus_pack_trials_and_each_trial_knows_its_gpu(tmp_path, cluster):
    cluster.add_node(num_cpus=2, num_gpus=1)  # declares a GPU this machine does not have
    cluster.wait_for_nodes()
    spans = {}
    for gpu in (0.5, 1):
        name = f"gpu{str(gpu).replace('.', '')}"
        space = textwrap.dedent(SPACE.format(name=name, gpu=gpu)).replace(EPOCHS_LINE, "epochs: 3,")
        space = space.replace("regime: [standard, fgsm_at]", "regime: [standard]")
        (tmp_path / f"{name}.yaml").write_text(space)
        proc = run_normlab(
            "submit",
            f"{name}.yaml",
            "--address",
            cluster.address,
            "--storage-path",
            str(tmp_path / "shared"),
            cwd=tmp_path,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
        runs = trial_runs(client, name)
        assert len(runs) == 2
        for run in runs:
            tags = run.data.tags
            assert tags["normlab.gpu_share"] == f"{gpu:g}" and tags["normlab.gpu_ids"] == "0"
            assert tags["normlab.cuda_visible_devices"] == "0"  # Ray shows the trial its GPU only
            assert tags["normlab.device_auto"] == "cuda"  # what device=auto would have used: its share
            assert tags["normlab.device"] == "cpu"  # what it used, as the file said
            assert run.info.status == "FINISHED"
        spans[gpu] = sorted((r.info.start_time, r.info.end_time) for r in runs)
    (a0, a1), (b0, b1) = spans[0.5]
    assert b0 < a1, "with gpu: 0.5 both trials share the one GPU at the same time"
    (a0, a1), (b0, b1) = spans[1]
    assert b0 >= a1 - 1000, "with gpu: 1 the second trial waits for the GPU"


EPOCHS_LINE = f"epochs: {EPOCHS},"
