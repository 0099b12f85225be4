"""Training-loop throughput of run_trial against a bare PyTorch loop over the same work.

What it measures: images per second of one training epoch of ``run_trial``'s loop
(``trainables.trial._Trial.train_epoch``: regime loss, optimizer and LR-scheduler
steps, loss/accuracy bookkeeping, the non-finite-loss check) against a bare loop
written here over the same model architecture (freshly built with the same seed), the
same in-memory data tensors on the same device and the same batch size: ``randperm``,
index, (the trial's augmentation, if any: the configurations measured have none),
forward, ``cross_entropy``, ``zero_grad``, ``backward``, SGD step, nothing else.

Configurations: digits / cnn / batchnorm / standard and synthetic (3x16x16) /
resnet20 / robustnorm / standard, batch 128, on the CPU. Each repetition runs one
epoch of each loop, in alternating order, so load from other processes hits both
alike; the figure is the ratio of the median images/s over repetitions (trial / bare),
after one warm-up epoch of each. Target: trial / bare >= 0.9 (run_trial's loop costs at
most about 10% over the bare loop). Other processes using the CPU at the same time make
the absolute figures swing widely (the load average is printed before and after).

Run from the repository root: ``python benchmarks/bench_trial.py [--reps 11]
[--threads N] [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `trainables` without an install

from _machine import cpu_model, default_threads, load_average, write_json

from trainables.config import TrialConfig  # noqa: E402
from trainables.data import augment  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.norms import norm_layer_factory  # noqa: E402
from trainables.trial import _Trial  # noqa: E402

TARGET = 0.9  # trial / bare images per second, at least
CONFIGS: dict[str, dict[str, Any]] = {
    "digits/cnn/batchnorm": {"dataset": "digits", "model": "cnn", "norm": "batchnorm"},
    "synthetic/resnet20/robustnorm": {"dataset": "synthetic", "model": "resnet20", "norm": "robustnorm"},
}
COMMON: dict[str, Any] = {
    "regime": "standard",
    "batch_size": 128,
    "device": "cpu",
    # many epochs, so the cosine schedule keeps a non-zero learning rate throughout
    "epochs": 1000,
}


def bare_loop(trial: _Trial) -> Callable[[int], int]:
    """A plain training epoch over the trial's data with a fresh copy of its model."""
    cfg, data = trial.cfg, trial.data
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        norm_layer=norm_layer_factory(cfg.norm, **cfg.norm_options()),
        mean=data.mean,
        std=data.std,
    ).to(trial.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x_all, y_all, bs = data.train_x, data.train_y, cfg.batch_size
    steps = len(x_all) // bs

    def epoch(seed: int) -> int:
        model.train()
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x_all), generator=gen).to(trial.device)
        for i in range(steps):
            idx = perm[i * bs : (i + 1) * bs]
            x, y = x_all[idx], y_all[idx]
            if trial.augment != "none":
                x = augment(x, trial.augment, gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * bs

    return epoch


def trial_loop(trial: _Trial) -> Callable[[int], int]:
    def epoch(n: int) -> int:
        trial.train_epoch(n, progress=False)
        return trial.steps_per_epoch * trial.cfg.batch_size

    return epoch


def measure(name: str, overrides: dict[str, Any], reps: int) -> dict[str, Any]:
    cfg = TrialConfig(**{**COMMON, **overrides})
    trial = _Trial(cfg, None)
    loops = {"trial": trial_loop(trial), "bare": bare_loop(trial)}
    for loop in loops.values():  # warm-up epoch
        loop(0)
    samples: dict[str, list[float]] = {k: [] for k in loops}
    gc.collect()
    for rep in range(reps):
        order = ("trial", "bare") if rep % 2 == 0 else ("bare", "trial")
        for key in order:
            start = time.perf_counter()
            images = loops[key](rep + 1)
            samples[key].append(images / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "config": name,
        "train_images": len(trial.data.train_x),
        "image_shape": list(trial.data.train_x.shape[1:]),
        "steps_per_epoch": trial.steps_per_epoch,
        "median_images_per_s": med,
        "ratio": med["trial"] / med["bare"],
        "samples_images_per_s": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reps", type=int, default=11, help="interleaved repetitions (epochs of each loop) per config (default 11)"
    )
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: all cores)")
    parser.add_argument("--json-out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        parser.error("--reps and --threads must be >= 1")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = load_average()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU: {cpu_model()} ({os.cpu_count()} cores), "
        f"load average {load_before:.2f}"
    )
    print(
        f"batch {COMMON['batch_size']}, regime standard, default augmentation (none), device cpu; "
        f"{args.reps} interleaved reps (one epoch of each loop), medians"
    )
    print()
    print(f"{'config':<32}{'trial img/s':>13}{'bare img/s':>13}{'trial/bare':>12}")
    results = []
    for name, overrides in CONFIGS.items():
        res = measure(name, overrides, args.reps)
        results.append(res)
        med = res["median_images_per_s"]
        print(f"{name:<32}{med['trial']:>13.0f}{med['bare']:>13.0f}{res['ratio']:>12.3f}", flush=True)
    worst = min(r["ratio"] for r in results)
    met = worst >= TARGET
    print()
    print(f"trial / bare: worst {worst:.3f} (target >= {TARGET}): {'met' if met else 'MISSED'}")
    seconds = time.perf_counter() - started
    load_after = load_average()
    print(f"({seconds:.0f} s; load average before {load_before:.2f}, after {load_after:.2f})")
    if args.json_out:
        write_json(
            args.json_out,
            "trial",
            reps=args.reps,
            configs=results,
            target_min_ratio=TARGET,
            target_met=met,
            load_average={"before": load_before, "after": load_after},
            seconds=seconds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
