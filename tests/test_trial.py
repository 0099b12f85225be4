"""run_trial: exact resume, failures that say why, and every registry entry end to end."""

from __future__ import annotations

import pytest
import torch

from trainables.checkpoints import load_checkpoint, save_checkpoint
from trainables.config import TrialConfig
from trainables.metrics import adv_metric
from trainables.trial import CheckpointMismatchError, NonFiniteLossError, run_trial

TIMING = ("epoch_seconds", "train_images_per_s")

# a trial small enough for seconds on a CPU, with every source of randomness in play
TINY = dict(
    train_subset=256,
    test_subset=96,
    batch_size=64,
    eval_batch_size=48,
    epoch_adv_samples=48,
    final_adv_samples=48,
    eval_steps=2,
    train_steps=2,
    cw_steps=2,
    square_queries=5,
    threads=1,
)


def without_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


class Killed(Exception):
    pass


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    cfg = TrialConfig(
        **TINY,
        epochs=3,
        norm="robustnorm",
        regime="pgd_at",
        augment="crop_flip",
        eval_attacks=["pgd", "fgsm"],
        eval_eps=[0.1, 0.05],
        seed=7,
    )
    full = run_trial(cfg)

    path = tmp_path / "last.pt"

    def save_then_die(epoch, metrics, state):
        save_checkpoint({**state, "mlflow_run_id": "run-123"}, path)
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run_trial(cfg, on_epoch=save_then_die)
    torch.manual_seed(999)  # whatever happened in between must not matter
    seen = []
    resumed = run_trial(
        cfg, checkpoint=load_checkpoint(path), on_epoch=lambda e, m, s: seen.append((e, s["mlflow_run_id"]))
    )

    assert resumed.resumed_from_epoch == 1
    assert seen == [(2, "run-123"), (3, "run-123")]  # caller's keys survive a resume
    assert without_timing(resumed.history) == without_timing(full.history)
    assert resumed.final == full.final
    assert set(full.final) >= {"final_clean_acc", "final_adv_acc", adv_metric("pgd", 0.05), "final_adv_acc_batchstats"}


def test_a_checkpoint_from_another_configuration_is_refused(tmp_path):
    states = []
    run_trial(
        TrialConfig(**TINY, epochs=1, eval_attacks=["fgsm"]),
        on_epoch=lambda e, m, s: states.append(save_checkpoint(s, tmp_path / "a.pt")),
    )
    checkpoint = load_checkpoint(tmp_path / "a.pt")
    with pytest.raises(CheckpointMismatchError, match="norm: checkpoint 'batchnorm' vs now 'robustnorm'"):
        run_trial(TrialConfig(**TINY, epochs=2, norm="robustnorm", eval_attacks=["fgsm"]), checkpoint=checkpoint)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_nan_loss_stops_the_trial_naming_epoch_and_step():
    cfg = TrialConfig(
        **{**TINY, "batch_size": 32}, epochs=2, lr=1e12, momentum=0.0, weight_decay=0.0, eval_attacks=["fgsm"]
    )
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step \d+/8"):
        run_trial(cfg)


def test_metrics_follow_the_design_names():
    cfg = TrialConfig(**TINY, epochs=2, norm="groupnorm", eval_attacks=["fgsm", "pgd"], eval_eps=[0.05, 0.1])
    epochs = []
    result = run_trial(cfg, on_epoch=lambda e, m, s: epochs.append((e, m, s["epoch"])))
    assert [(e, s) for e, _, s in epochs] == [(1, 1), (2, 2)]
    for _, metrics, _ in epochs:
        assert {"train_loss", "train_acc", "clean_acc", "adv_acc"} <= set(metrics)
    assert set(result.final) == {
        "final_clean_acc",
        "final_adv_acc",
        "adv_acc_fgsm_eps0.05",
        "adv_acc_fgsm_eps0.1",
        "adv_acc_pgd_eps0.05",
        "adv_acc_pgd_eps0.1",
    }  # groupnorm has no statistic modes: no _batchstats
    assert result.final["final_adv_acc"] == result.final["adv_acc_fgsm_eps0.05"]
    assert epochs[-1][1]["final_clean_acc"] == result.final["final_clean_acc"]
    assert result.eval_batch_size == 48


# ---------------------------------------------------------------- real training targets
# Measured (10 epochs, digits, cnn, batchnorm; seeds 0 and 1): standard clean accuracy
# 0.975 / 0.981, PGD accuracy at eps 0.1 0.597 / 0.603; pgd_at 0.856 / 0.842.


@pytest.fixture(scope="module")
def digits_pair():
    common = dict(epochs=10, eval_attacks=["pgd"], eval_eps=[0.1], threads=2)
    return run_trial(TrialConfig(regime="standard", **common)), run_trial(TrialConfig(regime="pgd_at", **common))


def test_standard_training_on_digits_reaches_95_percent(digits_pair):
    standard, _ = digits_pair
    assert standard.final["final_clean_acc"] >= 0.95
    assert standard.history[-1]["train_acc"] >= 0.95


def test_pgd_training_is_clearly_more_robust_than_standard_training(digits_pair):
    standard, pgd_at = digits_pair
    margin = pgd_at.final["adv_acc_pgd_eps0.1"] - standard.final["adv_acc_pgd_eps0.1"]
    assert margin >= 0.15, (
        f"pgd_at {pgd_at.final['adv_acc_pgd_eps0.1']:.3f} vs standard {standard.final['adv_acc_pgd_eps0.1']:.3f}"
    )
    assert pgd_at.final["final_clean_acc"] >= 0.9


# ---------------------------------------------------------------- mixed precision
# amp=true on the CPU: bfloat16 autocast for every training step (adversarial examples
# included), float32 evaluation. Measured (10 epochs, digits, cnn, seed 0): batchnorm
# standard clean 0.975 in both precisions; robustnorm (lr 0.1, the generic kernel path
# under autocast) standard clean 0.931 / PGD 0.547 in float32, 0.931 / 0.544 in bfloat16.


@pytest.fixture(scope="module")
def digits_amp():
    common = dict(epochs=10, eval_attacks=["pgd"], eval_eps=[0.1], threads=2)
    runs = {
        (norm, regime): run_trial(TrialConfig(norm=norm, regime=regime, amp=True, **common))
        for norm, regime in (("batchnorm", "standard"), ("batchnorm", "pgd_at"))
    }
    for amp in (False, True):
        runs["robustnorm", amp] = run_trial(TrialConfig(norm="robustnorm", lr=0.1, amp=amp, **common))
    return runs


def test_mixed_precision_trains_to_the_float32_accuracy_band(digits_amp, digits_pair):
    standard32, pgd32 = digits_pair
    standard, pgd_at = digits_amp["batchnorm", "standard"], digits_amp["batchnorm", "pgd_at"]
    assert standard.final["final_clean_acc"] >= 0.95 and pgd_at.final["final_clean_acc"] >= 0.9
    assert pgd_at.final["adv_acc_pgd_eps0.1"] - standard.final["adv_acc_pgd_eps0.1"] >= 0.15
    # the same trial in float32 and in bfloat16 lands within a few points
    assert abs(standard.final["final_clean_acc"] - standard32.final["final_clean_acc"]) <= 0.03
    assert abs(pgd_at.final["adv_acc_pgd_eps0.1"] - pgd32.final["adv_acc_pgd_eps0.1"]) <= 0.08
    rn32, rn16 = digits_amp["robustnorm", False], digits_amp["robustnorm", True]
    assert rn16.final["final_clean_acc"] >= 0.9
    assert abs(rn16.final["final_clean_acc"] - rn32.final["final_clean_acc"]) <= 0.03
    assert abs(rn16.final["adv_acc_pgd_eps0.1"] - rn32.final["adv_acc_pgd_eps0.1"]) <= 0.08
    # and it really ran in bfloat16: the training curves are close but not identical
    assert [h["train_loss"] for h in rn16.history] != [h["train_loss"] for h in rn32.history]


def test_mixed_precision_checkpoints_resume_exactly(tmp_path):
    cfg = TrialConfig(**TINY, epochs=2, norm="robustnorm", regime="pgd_at", eval_attacks=["fgsm"], amp=True, seed=3)
    full = run_trial(cfg)
    states = []
    run_trial(cfg, on_epoch=lambda e, m, s: states.append(save_checkpoint(s, tmp_path / f"{e}.pt")))
    resumed = run_trial(cfg, checkpoint=load_checkpoint(tmp_path / "1.pt"))
    assert without_timing(resumed.history) == without_timing(full.history)
    assert "scaler" in load_checkpoint(tmp_path / "1.pt")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", [False, True], ids=["float32", "amp-float16"])
def test_a_robustnorm_trial_trains_on_cuda(amp):
    """The first GPU training step of a RobustNorm trial: the path that used to fail."""
    cfg = TrialConfig(
        **{**TINY, "threads": None},
        epochs=2,
        norm="robustnorm",
        regime="pgd_at",
        eval_attacks=["fgsm"],
        device="cuda",
        amp=amp,
        lr=0.1,
    )
    result = run_trial(cfg)
    assert result.device.startswith("cuda")
    cpu = run_trial(cfg.model_copy(update={"device": "cpu", "amp": False}))
    assert abs(result.history[0]["train_loss"] - cpu.history[0]["train_loss"]) < 0.05
