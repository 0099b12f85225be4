"""Faults injected into real searches, and what must survive them.

Each test runs `normlab submit` on a local Ray and a local MLflow store, kills or breaks
something on purpose, and checks MLflow afterwards: one run per trial, every epoch step
exactly once, the right status, the reason where a trial failed.

Kills happen inside the trial's worker at named points (``trainables.faults``, switched on
by ``NORMLAB_FAULTS``), and from outside in the middle of an epoch (SIGKILL of the worker's
pid, which the same hook publishes).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import run_normlab, start_submit
from mlflow.tracking import MlflowClient

METRICS = ("epoch", "train_loss", "train_acc", "clean_acc", "adv_acc", "lr")

SPACE = """
name: {name}
fixed: {{dataset: digits, model: {model}, epochs: {epochs}, train_subset: 512, batch_size: 32, eval_attacks: [fgsm], eval_eps: [0.1],
        epoch_adv_samples: 64, final_adv_samples: 64, test_subset: 128}}
grid: {{norm: [batchnorm, robustnorm]}}
resources: {{cpu: 1}}
max_failures: 10
checkpoint: {{every: 1, keep: 2}}
"""


def write_space(workdir: Path, name: str, epochs: int, model: str = "cnn") -> None:
    (workdir / "space.yaml").write_text(textwrap.dedent(SPACE.format(name=name, epochs=epochs, model=model)))


def children(workdir: Path, name: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    return client, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def assert_exactly_once(client: MlflowClient, run, epochs: int) -> None:
    for metric in METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
        assert steps == list(range(1, epochs + 1)), (run.data.tags["normlab.trial_name"], metric, steps)


class OutsideKiller(threading.Thread):
    """SIGKILL a trial's worker once, ``delay`` seconds into the given epoch (mid-epoch)."""

    def __init__(self, state_dir: Path, trial: str, epoch: int, delay: float) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.trial, self.epoch, self.delay = state_dir, trial, epoch, delay
        self.killed: int | None = None
        self.stop = False

    def run(self) -> None:
        while not self.stop and self.killed is None:
            for file in self.state_dir.glob(f"*{self.trial}*.json"):
                try:
                    state = json.loads(file.read_text())
                except ValueError:
                    continue
                if state["epoch"] == self.epoch:
                    time.sleep(self.delay)
                    try:
                        os.kill(state["pid"], signal.SIGKILL)
                        self.killed = state["pid"]
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_at_every_point_of_an_epoch_loses_and_repeats_nothing(tmp_path):
    epochs = 4
    write_space(tmp_path, "kills", epochs)
    state_dir = tmp_path / "faults"
    kills = [
        {"trial": "00000", "epoch": 1, "point": "before_sync"},  # trained, nothing recorded
        {"trial": "00000", "epoch": 2, "point": "after_sync"},  # in MLflow, checkpoint not saved
        {"trial": "00000", "epoch": 3, "point": "after_report"},  # checkpoint persisted, not pruned
        {"trial": "00001", "epoch": 1, "point": "after_sync"},
        {"trial": "00001", "epoch": 4, "point": "after_sync"},  # last epoch: run FINISHED, checkpoint not saved
    ]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"kills": kills, "state_dir": str(state_dir)}))
    killer = OutsideKiller(state_dir, "00001", epoch=2, delay=0.3)  # mid-epoch, from outside
    killer.start()
    try:
        proc = run_normlab("submit", "space.yaml", "--num-cpus", "2", cwd=tmp_path, NORMLAB_FAULTS=str(plan))
    finally:
        killer.stop = True
    assert proc.returncode == 0, proc.stderr[-4000:]
    fired = sorted(p.name for p in state_dir.glob("killed-*"))
    assert len(fired) == len(kills), fired  # every planned kill happened
    assert killer.killed is not None, "the mid-epoch kill did not happen"

    client, runs = children(tmp_path, "kills")
    assert len(runs) == 2  # one run per trial, however often it restarted
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags
        assert run.data.tags["normlab.resumed"] == "true"
        assert_exactly_once(client, run, epochs)
        assert 0 <= run.data.metrics["final_adv_acc"] <= 1
        assert {"result.json", "checkpoint"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # Tune saw each kill as a failure and restarted the trial from its newest checkpoint
    errors = {
        p.parent.name: p.read_text().count("Failure #")
        for p in (tmp_path / "normlab_runs" / "ray_results").glob("kills-*/train_*/error.txt")
    }
    assert sorted(errors.values()) == [3, 3], errors


def test_a_kill_plan_with_an_unknown_point_is_refused(tmp_path, monkeypatch):
    from trainables import faults

    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"kills": [{"trial": "*", "epoch": 1, "point": "after_synk"}], "state_dir": str(tmp_path)})
    )
    monkeypatch.setenv(faults.ENV, str(plan))
    with pytest.raises(ValueError, match="unknown kill point.*after_synk.*known: before_sync"):
        faults.maybe_kill("after_sync", "train_00000", 1)


def test_a_hold_keeps_its_trial_before_the_epoch_until_released(tmp_path, monkeypatch):
    import threading

    from trainables import faults

    release = tmp_path / "go"
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"holds": [{"trial": "00001", "epoch": 3, "until": str(release)}], "state_dir": str(tmp_path)})
    )
    monkeypatch.setenv(faults.ENV, str(plan))
    started = time.monotonic()
    faults.training("train_00000", 3)  # another trial
    faults.training("train_00001", 2)  # another epoch
    assert time.monotonic() - started < 1.0
    held = threading.Thread(target=faults.training, args=("train_00001", 3))
    held.start()
    held.join(timeout=0.5)
    assert held.is_alive()  # held, its state file already naming the epoch
    assert json.loads((tmp_path / "train_00001.json").read_text())["epoch"] == 3
    release.touch()
    held.join(timeout=5)
    assert not held.is_alive()


@pytest.mark.slow
def test_a_truncated_or_corrupt_newest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    """Driver and workers SIGKILLed, then the newest checkpoint of each trial damaged: resume
    falls back one checkpoint, says so on the run, and still logs every epoch once."""
    epochs = 8
    # a ResNet-20 epoch (about half a second here, against a tenth for the default CNN) leaves the
    # driver's kill time to land while both trials are mid-run
    write_space(tmp_path, "damaged", epochs, model="resnet20")
    storage = tmp_path / "normlab_runs" / "ray_results"
    driver = start_submit(tmp_path)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            manifests = list(storage.glob("damaged-*/train_*/checkpoint_*/checkpoint.json"))
            per_trial = {m.parent.parent.name for m in manifests if json.loads(m.read_text())["epoch"] >= 3}
            if len(per_trial) == 2:
                break
            time.sleep(0.2)
        assert driver.poll() is None, (tmp_path / "submit.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    # until the trials' workers, which outlive the driver for a moment, have stopped writing
    written, still = None, 0
    while still < 3:
        time.sleep(1)
        now = sorted((str(m), m.stat().st_mtime) for m in storage.glob("damaged-*/train_*/checkpoint_*/checkpoint.*"))
        still, written = (still + 1 if now == written else 0), now

    damaged = {}
    for trial_dir, how in zip(sorted(storage.glob("damaged-*/train_*")), ("truncated", "corrupt")):
        newest = max(trial_dir.glob("checkpoint_*/checkpoint.json"), key=lambda m: json.loads(m.read_text())["epoch"])
        payload = newest.with_name("checkpoint.pt")
        data = bytearray(payload.read_bytes())
        if how == "truncated":
            payload.write_bytes(bytes(data[: len(data) // 2]))
        else:
            data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: torch.load would not notice
            payload.write_bytes(bytes(data))
        damaged[trial_dir.name.split("_")[2]] = (how, json.loads(newest.read_text())["epoch"])
    assert all(epoch < epochs for _, epoch in damaged.values()), damaged  # both trials still had epochs to run

    resumed = run_normlab("resume", "damaged", "--num-cpus", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    client, runs = children(tmp_path, "damaged")
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert_exactly_once(client, run, epochs)
        how, epoch = damaged[run.data.tags["normlab.trial_id"].split("_")[1]]
        note = run.data.tags["normlab.checkpoint_fallback"]
        assert ("truncated" in note) if how == "truncated" else ("SHA-256" in note), note
        assert f"resumed from epoch {epoch - 1}" in note
