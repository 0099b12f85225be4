"""A trial does nothing before Ray Tune's saved state lists it (``trainables.tune_state``).

Tune snapshots its state every few seconds; a trial in a reused worker starts within
milliseconds of its creation. Without the wait, a driver killed in between lost the
trial on resume while the Optuna study and MLflow kept what it had done
(``test_optuna_study``'s killed search: 9 COMPLETE study trials for 8 Ray trials). Here a
real Optuna search on one slot, so that every trial after the first reuses the worker:
at each trial's first side effect (its tracker's first sync, which opens its MLflow run)
the saved snapshot already lists it.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from pyarrow import fs as pafs

from orchestrator.running.tuner import StudyRef, build_tuner
from orchestrator.searchfile.load import load_space
from orchestrator.studies.study import RAY_TRIAL_ATTR
from trainables.tune_state import holds_trial, newest_state

SPACE = """
name: saved
fixed: {dataset: digits, epochs: 1, train_subset: 64, test_subset: 32, batch_size: 32, eval_attacks: [fgsm],
        eval_eps: [0.1], epoch_adv_samples: 16, final_adv_samples: 16}
sample: {lr: {loguniform: [0.02, 0.2]}}
search: {algorithm: optuna, num_samples: 4, metric: clean_acc, mode: max, max_concurrent_trials: 1}
resources: {cpu: 1}
"""


class SnapshotProbe:
    """A trial tracker that notes, at a trial's first sync, whether Tune's saved state lists the
    trial, and in which process the trial runs."""

    def __init__(self, out: str) -> None:
        self.out = out

    def sync(self, record: Any, *, budget_s: float, checkpoint_file: Path | None = None, finish: bool = False) -> bool:
        from ray import tune

        path = Path(self.out) / f"{record.trial_id}.json"
        if not path.exists():
            storage = tune.get_context().get_storage()
            saved = holds_trial(storage.storage_filesystem, storage.experiment_fs_path, record.trial_id)
            path.write_text(json.dumps({"saved": saved, "pid": os.getpid()}))
        return True

    def fail(self, record: Any, reason: str, *, retryable: bool, budget_s: float) -> bool:
        return True


def test_every_trial_of_a_reused_worker_starts_only_once_the_saved_state_lists_it(tmp_path, monkeypatch):
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probe travels to the worker whole
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    space, _ = load_space(str(tmp_path / "space.yaml"))
    probes = tmp_path / "probes"
    probes.mkdir()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")  # normlab's 2 s, shorter: each reused trial waits for one
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        tuner = build_tuner(
            space,
            storage_path=str(tmp_path / "results"),
            experiment="saved",
            tracker=SnapshotProbe(str(probes)),
            study=StudyRef(url, "saved"),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert not results.errors
    ray_ids = {r.metrics["trial_id"] for r in results}
    seen = {p.stem: json.loads(p.read_text()) for p in probes.glob("*.json")}
    assert set(seen) == ray_ids and len(ray_ids) == 4
    assert len({s["pid"] for s in seen.values()}) == 1  # one slot: every trial ran in the same worker
    assert all(s["saved"] for s in seen.values()), seen  # ... each only once Tune's saved state listed it
    study = optuna.load_study(study_name="saved", storage=url)
    assert sorted(t.user_attrs[RAY_TRIAL_ATTR] for t in study.trials) == sorted(ray_ids)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_a_snapshot_being_rewritten_does_not_list_a_trial(tmp_path):
    local = pafs.LocalFileSystem()
    assert newest_state(local, str(tmp_path)) is None and not holds_trial(local, str(tmp_path), "abc")
    trial = json.dumps({"trial_id": "abc", "config": {}})
    whole = json.dumps({"trial_data": [[trial, "{}"]], "runner_data": {}})
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(whole)
    assert holds_trial(local, str(tmp_path), "abc") and not holds_trial(local, str(tmp_path), "abd")
    # Tune restores the newest session's snapshot: a trial only in an older one is not listed
    (tmp_path / "experiment_state-2026-01-01_00-00-09.json").write_text(json.dumps({"trial_data": []}))
    assert not holds_trial(local, str(tmp_path), "abc")
    (tmp_path / "experiment_state-2026-01-01_00-00-09.json").write_text(whole[: len(whole) // 2 + 10])  # cut short
    assert not holds_trial(local, str(tmp_path), "abc")


def test_a_trial_folder_with_a_checkpoint_marks_an_earlier_attempt(tmp_path):
    """A retried or resumed trial whose folder holds a checkpoint does not wait for Tune's
    snapshot (``ray_trainable._wait_until_saved``): the attempt that wrote it had waited."""
    from trainables.trial_storage import TrialStorage

    local = pafs.LocalFileSystem()
    trial = tmp_path / "train_abc_00000"
    assert not TrialStorage(local, str(trial)).has_checkpoint_folder()  # not even created yet
    trial.mkdir()
    (trial / "params.json").write_text("{}")
    (trial / "checkpoint_tmp").write_text("")  # a file, not a checkpoint folder
    assert not TrialStorage(local, str(trial)).has_checkpoint_folder()
    (trial / "checkpoint_000002").mkdir()  # even one cut short (no manifest)
    assert TrialStorage(local, str(trial)).has_checkpoint_folder()
