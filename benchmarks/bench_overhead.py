"""Overhead of running a trial under Ray Tune (with MLflow tracking and per-epoch
checkpoints) against the same trial through ``normlab trial`` (plain ``run_trial``).

Both run the same configuration with the same number of threads; the direct run and the
Ray run alternate, ``--reps`` times each, on one local Ray started once. Reported:

- training throughput: images/s of the training loop (``train_images_per_s``), median
  over epochs 2.. and repetitions: the target is Ray / direct >= 0.9;
- whole-epoch throughput: training images per wall-clock second of the whole epoch
  (training, evaluation, checkpoint, tracking), from the time between reports.

Usage: python benchmarks/bench_overhead.py [--reps 3] [--epochs 6] [--threads 2] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.running.rayenv import prepare_environment

prepare_environment(local_ray=True)

import torch  # noqa: E402

from orchestrator.running.connect import init_ray  # noqa: E402
from orchestrator.running.tuner import build_tuner  # noqa: E402
from orchestrator.searchfile.space import SearchSpace  # noqa: E402
from orchestrator.tracking.search_run import check_reachable, search_running, start_search_run  # noqa: E402
from orchestrator.tracking.target import resolve_tracking  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.trial import run_trial  # noqa: E402


def trial_values(epochs: int, threads: int) -> dict:
    return dict(
        dataset="synthetic",
        model="resnet20",
        norm="batchnorm",
        regime="standard",
        epochs=epochs,
        batch_size=128,
        eval_attacks=["fgsm"],
        eval_eps=[0.03],
        epoch_adv_samples=128,
        final_adv_samples=128,
        threads=threads,
        device="cpu",
    )


def direct(epochs: int, threads: int) -> tuple[list[float], list[float]]:
    cfg = TrialConfig(**trial_values(epochs, threads))
    stamps: list[float] = []
    start = time.perf_counter()
    result = run_trial(cfg, on_epoch=lambda e, m, s: stamps.append(time.perf_counter()))
    walls = [b - a for a, b in zip([start, *stamps], stamps)]
    return [m["train_images_per_s"] for m in result.history], walls


def under_ray(epochs: int, threads: int, workdir: Path, rep: int) -> tuple[list[float], list[float]]:
    values = trial_values(epochs, threads)
    space = SearchSpace(name="overhead", fixed=values, resources={"cpu": threads}, checkpoint={"every": 1, "keep": 2})
    target = resolve_tracking(None, workdir)  # workdir/normlab_runs: mlflow.db, mlartifacts
    check_reachable(target)
    spec_file = workdir / "space.json"
    spec_file.write_text(json.dumps(space.model_dump(mode="json")))
    tracker = start_search_run(target, "overhead", f"rep{rep}", params={}, spec={}, spec_file=spec_file, tags={})
    with search_running(tracker):
        tuner = build_tuner(space, storage_path=str(workdir / "ray"), experiment=f"rep{rep}", tracker=tracker)
        grid = tuner.fit()
    frame = grid[0].metrics_dataframe.sort_values("training_iteration")
    times = frame["time_this_iter_s"].tolist()
    return frame["train_images_per_s"].tolist(), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_ray(None, num_cpus=args.threads)
    seen = (args.epochs - 1) * 128 * (2000 // 128)  # images trained in epochs 2..n (synthetic: 2000 train)
    figures: dict[str, list[float]] = {"direct_train": [], "ray_train": [], "direct_epoch": [], "ray_epoch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            ips, walls = direct(args.epochs, args.threads)
            figures["direct_train"] += ips[1:]
            figures["direct_epoch"].append(seen / sum(walls[1:]))
            ips, walls = under_ray(args.epochs, args.threads, Path(tmp), rep)
            figures["ray_train"] += ips[1:]
            figures["ray_epoch"].append(seen / sum(walls[1:]))
            print(
                f"rep {rep + 1}/{args.reps}: direct {statistics.median(figures['direct_train'][-args.epochs + 1 :]):.0f} img/s, "
                f"ray {statistics.median(figures['ray_train'][-args.epochs + 1 :]):.0f} img/s (training loop)",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in figures.items()}
    train_ratio = med["ray_train"] / med["direct_train"]
    epoch_ratio = med["ray_epoch"] / med["direct_epoch"]
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads; synthetic 3x16x16, resnet20, batchnorm, batch 128, "
        f"{args.epochs} epochs x {args.reps} reps (epoch 1 excluded)"
    )
    print(
        f"training loop   : direct {med['direct_train']:8.0f} img/s   Ray Tune {med['ray_train']:8.0f} img/s   "
        f"ratio {train_ratio:.3f}  (target >= 0.9)"
    )
    print(
        f"whole epoch     : direct {med['direct_epoch']:8.0f} img/s   Ray Tune {med['ray_epoch']:8.0f} img/s   "
        f"ratio {epoch_ratio:.3f}  (eval, checkpoint and MLflow included)"
    )
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "medians": med,
                    "train_ratio": train_ratio,
                    "epoch_ratio": epoch_ratio,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
