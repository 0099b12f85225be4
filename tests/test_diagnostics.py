"""The per-layer shift diagnostic: its formula, its hygiene, a trained network, its plot and table."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.display.views import shift_figure, shift_table
from orchestrator.tracking import trial_runs
from trainables.attacks import AttackSettings, Perturber, module_modes
from trainables.config import TrialConfig
from trainables.data import load_dataset
from trainables.diagnostics import (
    LayerShift,
    measure_shift,
    recording,
    shift_metrics,
    shifts_from_metrics,
    tracked_layers,
)
from trainables.models import create_model
from trainables.norms import BatchNorm, RobustNorm, norm_layer_factory
from trainables.record import TrialRecord
from trainables.trial import run_trial

# ---------------------------------------------------------------- the formula


def test_hand_computed_shift_of_batchnorm_then_robustnorm():
    # BatchNorm (eps 0): running var (4, 1) -> scale s = (2, 1); it passes x / s on (running mean 0, w 1, b 0).
    # RobustNorm (power 0.5, eps 0): running range (16, 4) -> s = (4, 2).
    bn, rn = BatchNorm(2, eps=0.0), RobustNorm(2, power=0.5, eps=0.0)
    bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    rn.running_range.copy_(torch.tensor([16.0, 4.0]))
    rn.running_mean.copy_(torch.tensor([5.0, -3.0]))  # the mean does not enter the scale
    model = nn.Sequential(bn, rn)
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0], [6.0, 1.0]])
    x_adv = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [7.0, 2.0]])
    adv_of = {tuple(r.tolist()): a for r, a in zip(x, x_adv)}

    def perturb(xb, yb):
        return torch.stack([adv_of[tuple(r.tolist())] for r in xb])

    # batches of 2: (0,1),(2,1) | (4,1),(6,1). Channel 1 of the attacked input is 0,0 | 2,2:
    # variance 0 within each batch, 1 over all four, so only merged statistics give the numbers below.
    shifts = measure_shift(model, perturb, x, torch.zeros(4, dtype=torch.long), batch_size=2)
    # BatchNorm input. ch0: mean 3 -> 4, var 5 -> 5; ch1: mean 1 -> 1, var 0 -> 1.
    #   mean shift = (|4-3|/2 + 0/1) / 2 = 0.25; var shift = (0/4 + |1-0|/1) / 2 = 0.5
    # RobustNorm input = x / (2, 1). ch0: mean 1.5 -> 2, var 1.25 -> 1.25; ch1: mean 1 -> 1, var 0 -> 1.
    #   mean shift = (0.5/4 + 0/2) / 2 = 0.0625; var shift = (0/16 + 1/4) / 2 = 0.125
    assert [s.name for s in shifts] == ["l01_0", "l02_1"]
    assert shifts[0].mean == pytest.approx(0.25) and shifts[0].var == pytest.approx(0.5)
    assert shifts[1].mean == pytest.approx(0.0625) and shifts[1].var == pytest.approx(0.125)
    metrics = shift_metrics(shifts)
    assert metrics == pytest.approx(
        {
            "shift_mean_l01_0": 0.25,
            "shift_var_l01_0": 0.5,
            "shift_mean_l02_1": 0.0625,
            "shift_var_l02_1": 0.125,
            "shift_mean_avg": 0.15625,
            "shift_var_avg": 0.3125,
        }
    )


def test_formula_on_feature_maps_in_unequal_batches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    bn = BatchNorm(4)
    bn.running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    model = nn.Sequential(conv, bn, nn.ReLU(inplace=True))
    x = torch.rand(20, 3, 5, 5)

    def perturb(xb, yb):
        return 1.3 * xb + 0.1 * torch.sin(13 * xb)

    [shift] = measure_shift(model, perturb, x, torch.zeros(20, dtype=torch.long), batch_size=7)  # 7 + 7 + 6
    with torch.no_grad():
        clean, adv = conv(x).double(), conv(perturb(x, None)).double()
    dims = (0, 2, 3)
    s = (bn.running_var.double() + bn.eps).sqrt()
    mean = ((adv.mean(dims) - clean.mean(dims)).abs() / s).mean()
    var = ((adv.var(dims, correction=0) - clean.var(dims, correction=0)).abs() / s**2).mean()
    assert shift.name == "l01_1"
    assert shift.mean == pytest.approx(float(mean), rel=1e-5) and shift.var == pytest.approx(float(var), rel=1e-5)
    assert shift.mean > 0.01 and shift.var > 0.01  # not a vacuous match


# ---------------------------------------------------------------- hygiene


@pytest.mark.parametrize("norm", ["batchnorm", "robustnorm", "robustnorm_mixed"])
def test_measuring_leaves_modes_running_statistics_and_hooks_as_they_were(norm):
    torch.manual_seed(1)
    model = create_model("cnn", num_classes=4, in_channels=1, norm_layer=norm_layer_factory(norm))
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 4, (24,))
    model.train()
    model(x)  # running statistics away from their initial values
    model.features[1].eval()  # a mixed state, as BN-only regimes leave it
    modes, buffers = module_modes(model), copy.deepcopy(dict(model.named_buffers()))

    perturb = Perturber(model, "pgd", 0.1, AttackSettings(steps=2, num_classes=4))
    shifts = measure_shift(model, perturb, x, y, batch_size=10)

    assert [s.name for s in shifts] == ["l01_features.0.1", "l02_features.1.1", "l03_features.2.1"]
    assert all(s.mean > 0 and s.var > 0 for s in shifts)
    assert module_modes(model) == modes
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_hooks_are_removed_when_the_forward_fails():
    layers = {"l01_bn": BatchNorm(3)}
    moments = {}
    with pytest.raises(RuntimeError, match="running_mean"), recording(layers, moments):
        layers["l01_bn"].eval()(torch.ones(2, 5))  # 5 channels into BatchNorm(3): recorded, then refused
    assert moments["l01_bn"].count == 2 and not layers["l01_bn"]._forward_pre_hooks


def test_norms_without_tracked_statistics_are_not_measured():
    model = create_model("cnn", num_classes=4, in_channels=1, norm_layer=norm_layer_factory("groupnorm"))
    assert tracked_layers(model) == {}
    assert measure_shift(model, lambda xb, yb: xb + 0.1, torch.rand(8, 1, 8, 8), torch.zeros(8), 4) == []
    assert shift_metrics([]) == {}


def test_short_names_sort_by_depth():
    model = nn.Sequential(*[BatchNorm(2) for _ in range(12)])
    names = list(tracked_layers(model))
    assert names[:2] == ["l01_0", "l02_1"] and names[-1] == "l12_11"
    assert sorted(names) == names
    metrics = shift_metrics([LayerShift(n, i, 2 * i) for i, n in enumerate(names)])
    assert [s.name for s in shifts_from_metrics(dict(reversed(metrics.items())))] == names


# ---------------------------------------------------------------- a trained network
# digits, cnn, batchnorm, standard training, 3 epochs at lr 0.1 (about 0.95 clean).
# Measured: PGD at eps 0.1 shifts the three layers' input means by 0.03 / 0.05 / 0.06 of
# their scale and their variances by 0.14 / 0.14 / 0.20 of theirs; FGSM at eps 0.02 by
# about a fifth of that; eps 0 by exactly nothing.


@pytest.fixture(scope="module")
def trained():
    cfg = TrialConfig(
        norm="batchnorm",
        epochs=3,
        lr=0.1,
        eval_attacks=["pgd"],
        eval_eps=[0.1],
        eval_steps=5,
        epoch_adv_samples=48,
        final_adv_samples=180,
        threads=2,
        shift_diagnostic=True,
    )
    epochs, saved = [], {}

    def keep(epoch, metrics, state):
        epochs.append(metrics)
        saved["model"] = copy.deepcopy(state["model"])

    result = run_trial(cfg, on_epoch=keep)
    data = load_dataset("digits")
    model = create_model(
        "cnn", num_classes=10, in_channels=1, norm_layer=norm_layer_factory("batchnorm"), mean=data.mean, std=data.std
    )
    model.load_state_dict(saved["model"])
    return result, epochs, model.eval(), data


LAYERS = ["l01_1.features.0.1", "l02_1.features.1.1", "l03_1.features.2.1"]


def test_run_trial_reports_shift_metrics_in_the_final_epoch(trained):
    result, epochs, _, _ = trained
    assert result.final["final_clean_acc"] >= 0.85  # it really trained
    names = {f"shift_{kind}_{layer}" for kind in ("mean", "var") for layer in [*LAYERS, "avg"]}
    assert names <= set(result.final) and names <= set(epochs[-1])
    assert not any(k.startswith("shift_") for k in epochs[0])
    for kind in ("mean", "var"):
        per_layer = [result.final[f"shift_{kind}_{layer}"] for layer in LAYERS]
        assert result.final[f"shift_{kind}_avg"] == pytest.approx(np.mean(per_layer))


def test_pgd_shifts_a_trained_network_far_more_than_a_small_or_no_perturbation(trained):
    result, _, model, data = trained
    x, y = data.test_x[:180], data.test_y[:180]
    settings = AttackSettings(steps=5)
    none = measure_shift(model, Perturber(model, "pgd", 0.0, settings), x, y, 256)
    small = shift_metrics(measure_shift(model, Perturber(model, "fgsm", 0.02, settings), x, y, 256))
    assert [s.name for s in none] == LAYERS
    assert all(s.mean < 1e-9 and s.var < 1e-9 for s in none)
    pgd = result.final
    assert pgd["shift_mean_avg"] > 0.015 and pgd["shift_var_avg"] > 0.05
    for layer in LAYERS:
        assert pgd[f"shift_mean_{layer}"] > 0.005 and pgd[f"shift_var_{layer}"] > 0.02, layer
    assert pgd["shift_mean_avg"] > 2.5 * small["shift_mean_avg"] > 0
    assert pgd["shift_var_avg"] > 2.5 * small["shift_var_avg"] > 0


# ---------------------------------------------------------------- table, plot, MLflow artifact


def _png_colors(png: bytes) -> set[tuple[int, ...]]:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return set(image.getdata())


def test_table_and_plot_are_drawn_from_the_metrics(trained):
    result, _, _, _ = trained
    table = shift_table(result.final)
    assert [c.header for c in table.columns] == ["layer", "mean shift", "var shift"]
    assert list(table.columns[0].cells) == [*LAYERS, "average"]
    assert list(table.columns[1].cells)[-1] == f"{result.final['shift_mean_avg']:.4f}"
    assert shift_table({"final_clean_acc": 0.9}) is None and shift_figure({"final_clean_acc": 0.9}) is None

    fig = shift_figure(result.final)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == LAYERS
    heights = [round(p.get_height(), 6) for p in fig.axes[0].patches]
    assert heights == [round(result.final[f"shift_mean_{layer}"], 6) for layer in LAYERS]


class _FakeMlflow:
    """The calls ``MlflowTrialTracker._finish`` makes, with every figure kept as PNG bytes."""

    def __init__(self) -> None:
        self.figures: dict[str, bytes] = {}
        self.status = "RUNNING"

    def get_run(self, run_id):
        return SimpleNamespace(info=SimpleNamespace(status=self.status))

    def log_dict(self, run_id, value, name):
        pass

    def log_figure(self, run_id, figure, name):
        buf = io.BytesIO()
        figure.savefig(buf, format="png")
        self.figures[name] = buf.getvalue()

    def set_terminated(self, run_id, status):
        self.status = status


@pytest.mark.parametrize("with_shift", [True, False])
def test_finished_run_gets_a_shift_plot_only_when_measured(trained, monkeypatch, with_shift):
    result, _, _, _ = trained
    fake = _FakeMlflow()
    monkeypatch.setattr(trial_runs, "client", lambda uri: fake)
    final = result.final if with_shift else {k: v for k, v in result.final.items() if not k.startswith("shift_")}
    record = TrialRecord(
        "t1",
        "trial_1",
        {"eval_attacks": ["pgd"], "eval_eps": [0.1]},
        epochs=3,
        run_id="r1",
        history=[{"epoch": 3, **final}],
    )
    trial_runs.MlflowTrialTracker("sqlite:///unused", "0", "p", "s")._finish(record, None)
    assert fake.status == "FINISHED"
    assert set(fake.figures) == (
        {"robust_accuracy_vs_eps.png", "shift_by_layer.png"} if with_shift else {"robust_accuracy_vs_eps.png"}
    )
    if with_shift:
        png = fake.figures["shift_by_layer.png"]
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        colors = _png_colors(png)
        assert (31, 119, 180) in colors and (255, 127, 14) in colors  # the mean (C0) and variance (C1) bars


def test_normlab_trial_prints_the_per_layer_table(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "trial",
            "epochs=1",
            "train_subset=256",
            "eval_attacks=fgsm",
            "eval_eps=0.1",
            "final_adv_samples=96",
            "threads=1",
            "shift_diagnostic=true",
            "--no-progress",
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "norm-layer input shift under fgsm at eps 0.1" in text
    assert text.index(LAYERS[0]) < text.index(LAYERS[1]) < text.index(LAYERS[2]) < text.index("average")
    final = json.loads(out.read_text())["final"]
    assert f"{final['shift_var_avg']:.4f}" in text and f"{final[f'shift_mean_{LAYERS[2]}']:.4f}" in text


# ---------------------------------------------------------------- BatchNorm vs RobustNorm (slow)
# 10 epochs of standard training on digits, seed 0, PGD at eps 0.1 (the settings of
# tests/test_trial.py's real training targets; RobustNorm at lr 0.1). Measured, average over
# the three layers, each in its own layer's scale: batchnorm mean 0.059 / variance 0.196,
# robustnorm 0.024 / 0.091 (with pgd_at: batchnorm 0.049 / 0.250, robustnorm 0.015 / 0.054).


@pytest.mark.slow
def test_robustnorm_inputs_shift_less_than_batchnorm_inputs_under_pgd():
    common = {"epochs": 10, "eval_attacks": ["pgd"], "eval_eps": [0.1], "threads": 2, "shift_diagnostic": True}
    bn = run_trial(TrialConfig(norm="batchnorm", **common)).final
    rn = run_trial(TrialConfig(norm="robustnorm", lr=0.1, **common)).final
    assert bn["final_clean_acc"] >= 0.95 and rn["final_clean_acc"] >= 0.9
    assert bn["shift_mean_avg"] > 0.03 and bn["shift_var_avg"] > 0.1
    assert rn["shift_mean_avg"] < 0.6 * bn["shift_mean_avg"]
    assert rn["shift_var_avg"] < 0.7 * bn["shift_var_avg"]
