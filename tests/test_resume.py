"""State that must survive a kill: SIGKILL the whole search mid-run, then `normlab resume`."""

from __future__ import annotations

import os
import signal
import textwrap
import time

from conftest import run_normlab, start_submit
from mlflow.tracking import MlflowClient

SPACE = """
name: killme
fixed: {dataset: digits, regime: pgd_at, epochs: 8, eval_attacks: [fgsm], eval_eps: [0.1], epoch_adv_samples: 128,
        final_adv_samples: 128, train_steps: 3}
grid: {norm: [batchnorm, robustnorm]}
resources: {cpu: 1}
max_failures: 0
checkpoint: {every: 1, keep: 2}
"""


def checkpoints_per_trial(storage):
    trials = {}
    for ckpt in storage.glob("killme-*/train_*/checkpoint_*/checkpoint.pt"):
        trials.setdefault(ckpt.parent.parent.name, set()).add(ckpt.parent.name)
    return trials


def test_a_killed_search_resumes_from_checkpoints_into_the_same_runs(tmp_path):
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    storage = tmp_path / "normlab_runs" / "ray_results"
    driver = start_submit(tmp_path)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and driver.poll() is None:
            found = checkpoints_per_trial(storage)
            if len(found) == 2 and all(len(c) >= 2 for c in found.values()):
                break
            time.sleep(0.2)
        assert driver.poll() is None, (
            "the search ended before it could be killed:\n" + (tmp_path / "submit.log").read_text()[-3000:]
        )
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started: nothing shuts down cleanly
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    time.sleep(3)  # Ray's reaper ends the orphaned workers

    resumed = run_normlab("resume", "killme", "--num-cpus", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming search killme-" in resumed.stderr and resumed.stdout.count(" OK ") == 2
    assert "MLflow UI: http://127.0.0.1:5000/normlab/open?expand=" in resumed.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("killme")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and "normlab.resumed_at" in parents[0].data.tags
    assert len(children) == 2  # the same runs, re-attached through the run id in each checkpoint
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        assert child.data.tags["normlab.resumed"] == "true"
        # every epoch's metrics exactly once: whatever the kill interrupted was neither lost nor logged twice
        for metric in ("epoch", "train_loss", "train_acc", "clean_acc", "adv_acc", "lr"):
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, metric))
            assert steps == list(range(1, 9)), (metric, steps)
        assert "final_adv_acc" in child.data.metrics
    assert {c.info.run_name for c in children} == {"batchnorm pgd_at", "robustnorm pgd_at"}
    # the driver that would have summarised the search was killed: resume does it
    summary = parents[0].data
    assert summary.metrics["trials_finished"] == 2 and 0 <= summary.metrics["best_final_adv_acc"] <= 1
    assert summary.tags["normlab.best_run_id"] in {c.info.run_id for c in children}
