"""A whole ResNet-20 training step with RobustNorm against the same network with nn.BatchNorm2d.

What it measures: one CPU training step of a CIFAR ResNet-20 (``trainables.models``,
input 3x32x32, 10 classes, batch 128): forward, cross-entropy, ``zero_grad``, backward
and the SGD step (momentum and weight decay, built by ``trainables.optim`` from
``TrialConfig``'s defaults), in training mode (batch statistics, running statistics
updated). Two networks, identical but for their norm layers:

- ``batchnorm``: ``nn.BatchNorm2d`` (PyTorch's native kernels), the baseline;
- ``robustnorm``: ``trainables.norms.RobustNorm`` with ``TrialConfig``'s norm options.

The layer alone (``bench_norms.py``) says little about the step: the convolutions
dominate it, and what the norm costs around them (its Python autograd Function's small
ops, the heap layout its allocations leave and the page faults that follow, memory
traffic shared with the convolutions) only shows in the whole step.

Every figure is a ratio of medians measured in the same run, per thread count (1 and 2
by default). Each network runs in a process of its own, as in a trial (see page faults
below); after a warm-up, each repetition times a few steps of each network, the two
processes taking turns in alternating order, so load from other processes hits both
alike; the median over repetitions is taken per network. Target on the machine it runs
on:

- RobustNorm step / BatchNorm2d step <= 0.95 at 2 threads (RobustNorm's step at least 5%
  faster than BatchNorm's; at 1 thread the ratio is printed for information).

``--profile`` prints, instead of timing, torch.profiler's per-op self-CPU-time tables of
the forward (with the loss) and of the backward of both networks side by side, at each
thread count (medians over ``--reps`` alternating rounds): where one step's time goes.

Page faults per step are printed beside the times: glibc's malloc returns the heap's
free top to the kernel and a step then faults its activations in afresh, each fault
several microseconds on a VM; how many depends on the order of every allocation in the
process, which is why the two networks do not share one (``--profile`` does run both in
this process). ``--keep-freed-memory`` turns that off (``mallopt``, glibc only), so the
figures are compute alone.

Run from the repository root: ``python benchmarks/bench_step.py [--reps 15] [--iters 3]
[--warmup 3] [--threads 1 2] [--keep-freed-memory] [--json-out FILE] [--profile]
[--rows 15]``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `trainables` without an install

from _machine import cpu_model, keep_freed_memory, load_average, minor_faults, write_json

from trainables.config import TrialConfig  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.norms import norm_layer_factory  # noqa: E402
from trainables.optim import build_optimizer  # noqa: E402

BATCH, SHAPE, CLASSES = 128, (3, 32, 32), 10
TARGET = 0.95  # RobustNorm step / BatchNorm2d step at most, at TARGET_THREADS
TARGET_THREADS = 2
NORMS = ("batchnorm", "robustnorm")


def build(norm: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """ResNet-20 with ``norm`` layers (same seed, so the same convolutions) and its SGD optimizer."""
    cfg = TrialConfig(model="resnet20", norm="robustnorm")  # TrialConfig's defaults: SGD, norm options
    if norm == "batchnorm":
        norm_layer = functools.partial(nn.BatchNorm2d, eps=cfg.norm_eps, momentum=cfg.norm_momentum)
    else:
        norm_layer = norm_layer_factory(cfg.norm, **cfg.norm_options())
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=CLASSES, in_channels=SHAPE[0], norm_layer=norm_layer).train()
    return model, build_optimizer(model.parameters(), cfg)


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """One training step, as ``trainables.trial`` runs it (without the bookkeeping)."""

    def step() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def make_batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, *SHAPE, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


def _step_worker(norm: str, threads: int, keep_memory: bool, conn: Connection) -> None:
    """One network in its own process: on each ``iters`` received, run that many steps and
    send back (ms per step, page faults per step); ``None`` ends it."""
    if keep_memory:
        keep_freed_memory()
    torch.set_num_threads(threads)
    x, y = make_batch()
    step = make_step(*build(norm), x, y)
    gc.collect()
    gc.disable()
    while (iters := conn.recv()) is not None:
        faults_before, start = minor_faults(), time.perf_counter()
        for _ in range(iters):
            step()
        seconds, faults = time.perf_counter() - start, minor_faults() - faults_before
        conn.send((seconds / max(iters, 1) * 1e3, faults / max(iters, 1)))


def time_steps(threads: int, reps: int, iters: int, warmup: int, keep_memory: bool = False) -> dict[str, object]:
    """Median ms per step of each network at ``threads`` torch threads, and their ratio.

    Each network lives in a process of its own, as in a trial: how often a step page-faults
    its activations back in depends on the whole process's sequence of allocations, and
    two networks in one process would share (and disturb) one heap. The processes take
    turns, one running while the other waits, in alternating order.
    """
    ctx = multiprocessing.get_context("spawn")
    workers: dict[str, tuple[multiprocessing.process.BaseProcess, Connection]] = {}
    for norm in NORMS:
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_step_worker, args=(norm, threads, keep_memory, there), daemon=True)
        proc.start()
        workers[norm] = (proc, here)
    samples: dict[str, list[float]] = {norm: [] for norm in NORMS}
    faults: dict[str, list[float]] = {norm: [] for norm in NORMS}
    try:
        for norm in NORMS:
            workers[norm][1].send(warmup)
            workers[norm][1].recv()
        for rep in range(reps):
            for norm in NORMS if rep % 2 == 0 else NORMS[::-1]:
                workers[norm][1].send(iters)
                ms, per_step_faults = workers[norm][1].recv()
                samples[norm].append(ms)
                faults[norm].append(per_step_faults)
    finally:
        for proc, conn in workers.values():
            if proc.is_alive():
                conn.send(None)
            proc.join(timeout=60)
    med = {norm: statistics.median(v) for norm, v in samples.items()}
    # the ratio of the two medians, and the median of the per-repetition ratios (less sensitive to load drifts)
    per_rep = [r / b for r, b in zip(samples["robustnorm"], samples["batchnorm"])]
    return {
        "threads": threads,
        "median_ms": med,
        "rn_over_bn": med["robustnorm"] / med["batchnorm"],
        "rn_over_bn_paired": statistics.median(per_rep),
        "rn_over_bn_best": min(samples["robustnorm"]) / min(samples["batchnorm"]),
        "page_faults_per_step": {norm: statistics.median(v) for norm, v in faults.items()},
        "samples_ms": samples,
    }


def profile_steps(threads: int, rows: int, rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per-op self CPU ms per step of forward (+ loss) and backward, for each network.

    ``rounds`` rounds, each profiling one forward and one backward of each network, in
    alternating order; per op, the median over rounds (load from other processes hits
    both networks alike). Printed as one table per part: the ``rows`` ops that cost
    most in either network, then the totals.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    x, y = make_batch()
    nets = {norm: build(norm) for norm in NORMS}
    for model, optimizer in nets.values():
        step = make_step(model, optimizer, x, y)
        for _ in range(3):
            step()
    parts = ("forward + loss", "backward")
    samples: dict[str, dict[str, list[dict[str, float]]]] = {part: {norm: [] for norm in NORMS} for part in parts}
    for r in range(rounds):
        for norm in NORMS if r % 2 == 0 else NORMS[::-1]:
            model, optimizer = nets[norm]
            optimizer.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) as fwd:
                loss = F.cross_entropy(model(x), y)
            with profile(activities=[ProfilerActivity.CPU]) as bwd:
                loss.backward()
            for part, prof in zip(parts, (fwd, bwd)):
                samples[part][norm].append({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()})
    out: dict[str, dict[str, dict[str, float]]] = {}
    for part in parts:
        per_norm = {}
        for norm in NORMS:
            ops = {key for sample in samples[part][norm] for key in sample}
            per_norm[norm] = {op: statistics.median(s.get(op, 0.0) for s in samples[part][norm]) for op in ops}
            per_norm[norm]["(total)"] = statistics.median(sum(s.values()) for s in samples[part][norm])
        out[part] = per_norm
        top = sorted(
            {op for v in per_norm.values() for op in v} - {"(total)"},
            key=lambda op: -max(v.get(op, 0.0) for v in per_norm.values()),
        )[:rows]
        print(f"--- {part}, {threads} thread(s), self CPU ms per step, median of {rounds} rounds")
        print(f"{'op':<56}{'batchnorm':>11}{'robustnorm':>12}")
        for op in [*top, "(total)"]:
            print(
                f"{op[:55]:<56}{per_norm['batchnorm'].get(op, 0.0):>11.2f}{per_norm['robustnorm'].get(op, 0.0):>12.2f}"
            )
        print()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per network per repetition (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per network first (default 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--json-out", type=Path, help="write the figures to this JSON file")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc malloc keeps freed memory (no page faults from heap trimming): compute only",
    )
    parser.add_argument("--profile", action="store_true", help="print per-op profiles instead of timing")
    parser.add_argument("--rows", type=int, default=15, help="--profile: ops per table (default 15)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.iters < 1 or min(args.threads) < 1:
        parser.error("--reps, --iters and --threads must be >= 1")

    kept = keep_freed_memory() if args.keep_freed_memory else False  # here for --profile; workers set their own
    started = time.perf_counter()
    load_before = load_average()
    print(f"torch {torch.__version__}, CPU: {cpu_model()} ({os.cpu_count()} cores), load average {load_before:.2f}")
    print(
        f"ResNet-20, batch {BATCH}x{'x'.join(map(str, SHAPE))}, training step (forward, cross-entropy, backward, "
        f"SGD momentum + weight decay); malloc: {'keeps freed memory' if kept else 'default'}"
    )
    if args.profile:
        for threads in args.threads:
            profile_steps(threads, args.rows, args.reps)
        return 0
    print(f"{args.reps} alternating reps x {args.iters} steps after {args.warmup} warm-up steps, medians")
    print()
    print(
        f"{'threads':<9}{'batchnorm':>12}{'robustnorm':>12}{'RN/BN':>8}{'paired':>8}{'best':>8}{'page faults/step':>20}"
    )
    print(f"{'':<9}{'(ms)':>12}{'(ms)':>12}{'':>8}{'':>8}{'':>8}{'BN':>10}{'RN':>10}")
    results = []
    for threads in args.threads:
        res = time_steps(threads, args.reps, args.iters, args.warmup, args.keep_freed_memory)
        med = res["median_ms"]
        print(
            f"{threads:<9}{med['batchnorm']:>12.2f}{med['robustnorm']:>12.2f}{res['rn_over_bn']:>8.3f}"
            f"{res['rn_over_bn_paired']:>8.3f}{res['rn_over_bn_best']:>8.3f}"
            f"{res['page_faults_per_step']['batchnorm']:>10.0f}"
            f"{res['page_faults_per_step']['robustnorm']:>10.0f}",
            flush=True,
        )
        results.append(res)
    at_target = [r for r in results if r["threads"] == TARGET_THREADS]
    met = bool(at_target) and at_target[0]["rn_over_bn"] <= TARGET
    print()
    print(
        "RN/BN: ratio of the median step times (the target's figure); paired: median of the per-repetition "
        "ratios; best: ratio of the fastest repetitions (the least disturbed by other processes)"
    )
    if at_target:
        print(
            f"RobustNorm step / BatchNorm2d step at {TARGET_THREADS} threads: {at_target[0]['rn_over_bn']:.3f} "
            f"(target <= {TARGET}): {'met' if met else 'MISSED'}"
        )
    seconds = time.perf_counter() - started
    load_after = load_average()
    print(f"({seconds:.0f} s; load average before {load_before:.2f}, after {load_after:.2f})")
    if args.json_out:
        write_json(
            args.json_out,
            "step",
            reps=args.reps,
            iters=args.iters,
            warmup=args.warmup,
            batch=BATCH,
            model="resnet20",
            malloc_keeps_freed_memory=kept,
            results=results,
            target={"rn_over_bn_max": TARGET, "threads": TARGET_THREADS},
            target_met=met,
            load_average={"before": load_before, "after": load_after},
            seconds=seconds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
