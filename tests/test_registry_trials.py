"""Every registry entry runs a whole (tiny) trial: ``normlab trial`` works for all of them."""

from __future__ import annotations

import pytest

from trainables.attacks import ATTACKS
from trainables.checkpoints import save_checkpoint
from trainables.data import AUGMENTATIONS
from trainables.models import MODELS
from trainables.norms import NORMS
from trainables.optim import LR_SCHEDULES, OPTIMIZERS
from trainables.regimes import REGIMES
from trainables.trial import run_trial

TINY = dict(
    epochs=1,
    train_subset=32,
    test_subset=16,
    batch_size=16,
    eval_batch_size=8,
    eval_steps=1,
    train_steps=1,
    epoch_adv_samples=8,
    final_adv_samples=8,
    cw_steps=2,
    square_queries=5,
    eval_attacks=["fgsm"],
    eval_eps=[0.3],
    threads=1,
)


def check(result):
    assert result.history and all(0.0 <= v <= 1.0 for k, v in result.final.items())
    assert result.history[-1]["train_loss"] == result.history[-1]["train_loss"]  # not NaN


@pytest.mark.parametrize("norm", NORMS.names())
def test_every_norm(norm):
    check(run_trial({**TINY, "norm": norm}))


@pytest.mark.parametrize("model", MODELS.names())
def test_every_model(model):
    check(run_trial({**TINY, "model": model, "train_subset": 16, "batch_size": 8}))


@pytest.mark.parametrize("attack", ATTACKS.names())
def test_every_attack(attack):
    result = run_trial({**TINY, "eval_attacks": [attack]})
    assert f"adv_acc_{attack}_eps0.3" in result.final


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_every_offline_dataset(dataset):
    check(run_trial({**TINY, "dataset": dataset}))


@pytest.mark.parametrize("augment", AUGMENTATIONS.names())
def test_every_augmentation(augment):
    check(run_trial({**TINY, "dataset": "synthetic", "augment": augment}))


@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
@pytest.mark.parametrize("schedule", LR_SCHEDULES.names())
def test_every_optimizer_and_schedule(optimizer, schedule):
    check(
        run_trial(
            {**TINY, "optimizer": optimizer, "lr_schedule": schedule, "lr_milestones": [0.5], "warmup_epochs": 0.5}
        )
    )


@pytest.mark.parametrize("regime", REGIMES.names())
def test_every_regime(regime, tmp_path):
    extra = {}
    if REGIMES[regime].from_checkpoint:
        states = []
        run_trial(TINY, on_epoch=lambda e, m, s: states.append(save_checkpoint(s, tmp_path / "init.pt")))
        extra["init_from"] = str(states[-1])
    check(run_trial({**TINY, "regime": regime, **extra}))
