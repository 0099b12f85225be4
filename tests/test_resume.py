"""State that must survive a kill: SIGKILL the whole search mid-run (or Ctrl-C it), then `normlab resume`."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest
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


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGINT"])
def test_a_killed_search_resumes_from_checkpoints_into_the_same_runs(tmp_path, stop):
    """SIGKILL: the driver and its local Ray die at once. SIGINT: Ctrl-C in the terminal (the
    whole foreground process group): the search stops, says so and how to continue it, exits
    130 and marks its parent run KILLED; it must not pass for a finished search."""
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
        # SIGKILL: the driver and the local Ray it started, nothing shuts down cleanly
        os.killpg(driver.pid, getattr(signal, stop))
        driver.wait(timeout=30 if stop == "SIGKILL" else 120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("killme")
    if stop == "SIGINT":
        log = (tmp_path / "submit.log").read_text()
        assert driver.returncode == 130, log[-3000:]
        assert "search stopped; `normlab resume " in log and "best trial" not in log, log[-3000:]
        (parent,) = [
            r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags
        ]
        assert parent.info.status == "KILLED" and "trials_finished" not in parent.data.metrics
    time.sleep(3)  # Ray's reaper ends the orphaned workers

    resumed = run_normlab("resume", "killme", "--num-cpus", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming search killme-" in resumed.stderr and resumed.stdout.count(" OK ") == 2
    assert "MLflow UI: http://127.0.0.1:5000/normlab/open?expand=" in resumed.stderr

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
