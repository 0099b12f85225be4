"""Multi-stage searches: validation of the whole chain, and a real two-stage search that is
killed in its second stage and resumed as one search.

The second stage's ``bn_finetune_adv`` trials must start from the final checkpoint of the
first-stage trial with the same norm and seed: the test compares the frozen (non-norm)
weights of each fine-tuned network with those of its first-stage trial, bit for bit, and
checks that the MLflow run says where it started (param and tags).
"""

from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest
import torch
from conftest import run_normlab, start_submit
from mlflow.tracking import MlflowClient

from orchestrator.running.stage_inputs import Finished, StageError, seeded_combinations
from orchestrator.searchfile.load import load_space
from orchestrator.searchfile.space import SpaceError, stage_views

COMMON = """
name: {name}
fixed: {{dataset: digits, epochs: {epochs}, train_subset: 256, batch_size: 64, eval_attacks: [fgsm], eval_eps: [0.1],
        epoch_adv_samples: 64, final_adv_samples: 64, test_subset: 96}}
"""
TWO_STAGES = (
    COMMON
    + """
seeds: [0, 1]
stages:
  pretrain:
    fixed: {{regime: standard}}
    grid: {{norm: [batchnorm, robustnorm]}}
  finetune:
    init_from: {{stage: pretrain}}
    grid: {{norm: [batchnorm, robustnorm], regime: [bn_finetune_adv, pgd_at]}}
"""
)


def problems(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SpaceError) as info:
        load_space(str(path))
    return str(info.value)


def test_a_valid_chain_and_its_trials(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(TWO_STAGES.format(name="chain", epochs=2)))
    space, _ = load_space(str(path))
    views = stage_views(space)
    assert [(v.name, v.init_from) for v in views] == [("pretrain", None), ("finetune", "pretrain")]
    assert views[0].space.trial_count() == 4 and views[1].space.trial_count() == 8 and space.trial_count() == 12
    assert (
        views[1].space.fixed["epochs"] == 2 and "seed" in views[1].space.grid
    )  # top-level fixed and seeds reach every stage


LIST_KEYED = """
name: lists
fixed: {dataset: digits, epochs: 2, eval_attacks: [fgsm]}
stages:
  pretrain:
    fixed: {regime: standard}
    grid: {norm: [batchnorm], eval_eps: [[0.1], [0.05, 0.2]]}
  finetune:
    init_from: {stage: pretrain}
    fixed: {regime: bn_finetune_adv}
    grid: {norm: [batchnorm], eval_eps: [[0.1], [0.05, 0.2]]}
"""


def test_a_list_valued_shared_key_matches_each_trial_to_its_own(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(LIST_KEYED)
    space, _ = load_space(str(path))  # validation matches the chain one to one
    pretrain, finetune = stage_views(space)
    # what the earlier trials recorded: their configs as JSON gives them back (floats, lists)
    finished = [
        Finished("t1", {"norm": "batchnorm", "eval_eps": [0.05, 0.2], "seed": 0}, "run1", "/c/1"),
        Finished("t0", {"norm": "batchnorm", "eval_eps": [0.1], "seed": 0}, "run0", "/c/0"),
    ]
    combos = seeded_combinations(finetune, pretrain, finished)
    assert [(c["eval_eps"], c["init_from"], c["_init_from_run_id"]) for c in combos] == [
        ([0.1], "/c/0", "run0"),
        ([0.05, 0.2], "/c/1", "run1"),
    ]
    with pytest.raises(StageError, match=r"eval_eps=\[0.05, 0.2\]"):
        seeded_combinations(finetune, pretrain, finished[1:])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda t: t.replace("init_from: {{stage: pretrain}}", "init_from: {{stage: pretrian}}"),
            "stages.finetune.init_from.stage: 'pretrian' is not an earlier stage; earlier stages: pretrain",
        ),
        (
            lambda t: t.replace(
                "grid: {{norm: [batchnorm, robustnorm], regime:", "grid: {{norm: [batchnorm, groupnorm], regime:"
            ),
            "(norm=groupnorm, regime=bn_finetune_adv, seed=0) matches 0 trials of stage pretrain on norm, seed",
        ),
        (
            lambda t: t.replace("fixed: {{regime: standard}}", "fixed: {{regime: standard, model: resnet20}}"),
            "would load weights of a different network from stage pretrain: model differ",
        ),
        (
            lambda t: t.replace("regime: [bn_finetune_adv, pgd_at]", "regime: [pgd_at]"),
            "no trial of this stage starts from a checkpoint",
        ),
        (
            lambda t: t.replace("seeds: [0, 1]\n", "") + "search: {{algorithm: optuna, num_samples: 4}}\n",
            "a stage that starts from another runs its trials as a grid",
        ),
        (lambda t: t + "grid: {{lr: [0.1]}}\n", "with stages, grid and sample keys belong to the stages"),
        (lambda t: t + "search: {{scheduler: {{type: asha}}}}\n", "needs every earlier trial to finish its last epoch"),
        (lambda t: t.replace("pretrain", "report"), "stage name 'report' must be letters, digits"),
        (lambda t: t.replace("pretrain", "../up"), "stage name '../up' must be letters, digits"),
    ],
)
def test_the_chain_is_checked_before_anything_runs(tmp_path, change, expected):
    assert expected in problems(tmp_path, change(TWO_STAGES).format(name="chain", epochs=2))


def final_checkpoint(storage, stage: str, trial_id: str) -> dict:
    folder = next(storage.glob(f"*/{stage}/train_{trial_id}_*"))
    newest = max(folder.glob("checkpoint_*/checkpoint.pt"), key=lambda p: p.parent.name)
    return torch.load(newest, weights_only=True)


@pytest.mark.slow
def test_a_two_stage_search_killed_in_its_second_stage_resumes_as_one_search(tmp_path):
    epochs = 3
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TWO_STAGES.format(name="twostage", epochs=epochs)))
    storage = tmp_path / "normlab_runs" / "ray_results"
    driver = start_submit(tmp_path)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            if len(list(storage.glob("twostage-*/finetune/train_*/checkpoint_*/checkpoint.json"))) >= 2:
                break
            time.sleep(0.2)
        assert driver.poll() is None, (tmp_path / "submit.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)  # in the middle of stage finetune
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    time.sleep(3)
    resumed = run_normlab("resume", "twostage", "--num-cpus", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage finetune: continuing" in resumed.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("twostage")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_stage = {s: [r for r in trials if r.data.tags.get("normlab.stage") == s] for s in ("pretrain", "finetune")}
    assert len(by_stage["pretrain"]) == 4 and len(by_stage["finetune"]) == 8
    for run in trials:
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))
        assert steps == list(range(1, epochs + 1))
    pretrain = {(r.data.params["norm"], r.data.params["seed"]): r for r in by_stage["pretrain"]}
    for run in by_stage["finetune"]:
        source = pretrain[run.data.params["norm"], run.data.params["seed"]]
        if run.data.params["regime"] != "bn_finetune_adv":
            assert run.data.params["init_from"] == "None" and "normlab.init_from_run_id" not in run.data.tags
            continue
        # it says where it started: the earlier trial's run and final checkpoint
        assert run.data.tags["normlab.init_from_run_id"] == source.info.run_id
        assert run.data.params["init_from"] == run.data.tags["normlab.init_from_checkpoint"]
        assert f"/pretrain/train_{source.data.tags['normlab.trial_id']}_" in run.data.params["init_from"]
        # and it really loaded those weights: every frozen (non-norm) tensor is the earlier trial's, bit for bit
        before = final_checkpoint(storage, "pretrain", source.data.tags["normlab.trial_id"])["model"]
        after = final_checkpoint(storage, "finetune", run.data.tags["normlab.trial_id"])["model"]
        frozen = [
            k
            for k in before
            if ".weight" in k
            and k.replace(".weight", ".running_mean") not in before
            and "norm" not in k
            and before[k].dim() > 1
        ]
        assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
        norm_weights = [
            k
            for k in before
            if k.replace(".weight", ".running_mean") in before or k.replace(".weight", ".running_range") in before
        ]
        assert any(not torch.equal(before[k], after[k]) for k in norm_weights)  # the norm layers did train
