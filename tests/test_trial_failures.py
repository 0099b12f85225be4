"""Failures handled by kind: a configuration that does not validate inside a trial, and a
storage disk that fills up mid-search.

Non-retryable failures fail once, with the reason on the trial's MLflow run (a run is
created even when the trial never got far enough to have one) and in `normlab status`.
A full disk fails the trials that write to it, with that reason, and not the driver;
after space is freed, `normlab resume` finishes them with every epoch logged once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import normlab_env, run_normlab
from mlflow.tracking import MlflowClient


def test_a_config_error_inside_a_trial_fails_once_with_a_run_that_says_why(tmp_path):
    """The trainable itself, under a real local Ray, given a value normlab's validation would refuse."""
    import ray
    from ray import tune

    from orchestrator.running.callbacks import TrialRunsCallback
    from orchestrator.running.tuner import TrialResolver
    from orchestrator.tracking.search_run import start_search_run
    from orchestrator.tracking.target import resolve_tracking
    from trainables.ray_trainable import train

    target = resolve_tracking(None, workdir=tmp_path)
    (tmp_path / "space.yaml").write_text("name: cfgerr\n")
    tracker = start_search_run(
        target, "cfgerr", "cfgerr-1", params={}, spec={}, spec_file=tmp_path / "space.yaml", tags={}
    )
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        tuner = tune.Tuner(
            tune.with_parameters(train, resolve=TrialResolver({"dataset": "digits", "epochs": 1}), tracker=tracker),
            param_space={"lr": -0.5},
            run_config=tune.RunConfig(
                name="cfgerr",
                storage_path=str(tmp_path / "results"),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=5),
                callbacks=[TrialRunsCallback(tracker)],
            ),
        )
        started = time.time()
        grid = tuner.fit()
        elapsed = time.time() - started
    finally:
        ray.shutdown()
    assert grid[0].error is not None and "not retried" in str(grid[0].error)
    error_file = next((tmp_path / "results").glob("cfgerr/train_*/error.txt"))
    assert error_file.read_text().count("Failure #") == 2  # the failure, and the one restart Ray had queued
    assert elapsed < 120

    client = MlflowClient(tracking_uri=target.uri)
    runs = client.search_runs([tracker.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["normlab.retryable"] == "false"
    assert (
        "TrialConfigError: invalid trial configuration: lr: Input should be greater than 0"
        in run.data.tags["normlab.error"]
    )
    assert run.data.params["lr"] == "-0.5" and run.data.params["dataset"] == "digits"  # the values it was given


SPACE = """
name: diskfull
fixed: {dataset: digits, model: resnet20, epochs: 5, train_subset: 256, batch_size: 64, eval_attacks: [fgsm],
        eval_eps: [0.1], epoch_adv_samples: 64, final_adv_samples: 64, test_subset: 128}
grid: {norm: [batchnorm, robustnorm]}
resources: {cpu: 1}
max_failures: 3
checkpoint: {every: 1, keep: 1}
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs: a storage path that can really fill up (needs root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); this test needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full."""
    filler = folder / "filler.bin"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_storage_disk_fails_the_trials_with_the_reason_not_the_driver(tmp_path, small_disk):
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    storage = small_disk / "normlab"
    state_dir = tmp_path / "faults"
    plan, release = tmp_path / "plan.json", tmp_path / "go"
    # every trial waits before its third epoch (its first two checkpointed) until the disk is full:
    # a trial that raced ahead could otherwise finish before the filler ran
    holds = [{"trial": "*", "epoch": 3, "until": str(release)}]
    plan.write_text(json.dumps({"kills": [], "holds": holds, "state_dir": str(state_dir)}))
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            "space.yaml",
            "--num-cpus",
            "2",
            "--storage-path",
            str(storage),
        ],
        cwd=tmp_path,
        env=normlab_env(NORMLAB_FAULTS=str(plan)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:  # both trials held before their third epoch
        epochs = [json.loads(f.read_text())["epoch"] for f in state_dir.glob("*.json")] if state_dir.is_dir() else []
        if epochs == [3, 3]:
            break
        time.sleep(0.1)
    assert driver.poll() is None, driver.communicate()[1][-4000:]
    filler = fill(small_disk)
    release.touch()
    out, err = driver.communicate(timeout=600)
    assert driver.returncode == 1, err[-4000:]  # trials failed; the driver did not crash
    assert "StorageFullError: no space left on the storage path" in err, err[-6000:]  # the trials' reason
    # Tune reads the trials' (truncated) error files back at the end: one clear line, no traceback from normlab
    tail = err[err.index("Trials did not complete") :] if "Trials did not complete" in err else err[-3000:]
    assert "Is the storage full or gone?" in tail and "normlab resume" in tail, tail
    assert "Traceback" not in tail, tail
    # the retries of trials that had checkpoints started at once, without waiting for a snapshot of
    # Tune's that the full disk kept from being saved (``ray_trainable._wait_until_saved``)
    assert "still does not list it" not in err, err[-4000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("diskfull")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FAILED"
        assert "StorageFullError: no space left on the storage path" in run.data.tags["normlab.error"]
        assert run.data.tags["normlab.retryable"] == "false"

    filler.unlink()  # space is back
    # Ray Tune's own state was cut short when the disk filled; normlab's last good copy stands in
    states = list(storage.glob("diskfull-*/experiment_state-*.json"))
    assert states and list(storage.glob("diskfull-*/normlab/state/experiment_state-*.json"))
    status = run_normlab("status", "--storage-path", str(storage), cwd=tmp_path)
    assert status.returncode == 0, status.stderr[-3000:]
    # both trials, by their MLflow run names
    assert "batchnorm standard" in status.stdout and "robustnorm standard" in status.stdout, status.stdout
    assert "Traceback" not in status.stderr

    # resume finishes both, every epoch once
    resumed = run_normlab("resume", "diskfull", "--storage-path", str(storage), "--num-cpus", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for run in client.search_runs([experiment.experiment_id]):
        if "mlflow.parentRunId" not in run.data.tags:
            continue
        assert run.info.status == "FINISHED"
        for metric in ("epoch", "train_loss", "adv_acc"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
            assert steps == [1, 2, 3, 4, 5], (metric, steps)
    shutil.rmtree(storage, ignore_errors=True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_a_gpu_share_on_a_node_without_cuda_says_so():
    """device=auto with a GPU from Ray, on a node whose torch has no CUDA: the message names Ray's
    grant and the node's torch, not a device setting the user never made."""
    from trainables.ray_trainable import check_gpu_share, runtime_settings

    check_gpu_share("cpu", 0.5)  # a GPU share the trial chose not to use
    check_gpu_share("cpu", 0)
    device = runtime_settings({"device": "auto"}, cpus=1, gpus=0.5)["device"]
    with pytest.raises(RuntimeError, match=r"Ray gave this trial 0\.5 GPU, but torch on this node cannot use CUDA"):
        check_gpu_share(device, 0.5)


def test_a_cpu_trial_never_touches_cuda_for_its_random_state():
    import torch

    from trainables.trial import rng_state, set_rng_state

    state = rng_state(torch.device("cpu"))
    assert state["cuda"] == []
    first = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), first)
