"""Real data (slow): the CIFAR-10 JPEG subset beside the repository, through `imagefolder`.

Skipped when ../shared/data is absent; run with `pytest -m slow`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainables.trial import run_trial

DATA = (
    Path(os.environ.get("NORMLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    / "cifar10-jpeg-mini"
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"{DATA} not present"),
]


def test_resnet20_learns_cifar10_subset_and_pgd_breaks_it():
    # measured: 5 epochs, ~100 s on 2 CPU cores: clean 0.48, PGD (8/255) 0.02
    result = run_trial(
        dict(
            dataset="imagefolder",
            data_dir=str(DATA),
            model="resnet20",
            norm="batchnorm",
            epochs=5,
            lr=0.1,
            eval_attacks=["pgd"],
            eval_eps=[8 / 255],
            eval_steps=5,
            final_adv_samples=500,
            threads=2,
        )
    )
    final = result.final
    assert final["final_clean_acc"] >= 0.40  # chance is 0.10
    assert final["final_adv_acc"] <= final["final_clean_acc"] - 0.25
    assert final["final_clean_acc_batchstats"] >= 0.35
