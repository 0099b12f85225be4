"""A whole ResNet-20 training step with RobustNorm against the same network with nn.BatchNorm2d.

What it measures: one CPU training step of a CIFAR ResNet-20 (``trainables.models``,
input 3x32x32, 10 classes, batch 128): forward, cross-entropy, ``zero_grad``, backward
and the SGD step (momentum and weight decay, built by ``trainables.optim`` from
``TrialConfig``'s defaults), in training mode (batch statistics, running statistics
updated). Two networks, identical but for their norm layers:

- ``batchnorm``: ``nn.BatchNorm2d`` (PyTorch's native kernels), the baseline;
- ``robustnorm``: ``trainables.norms.RobustNorm`` with ``TrialConfig``'s norm options;
- with ``--floor``, also ``none``: no norm at all (``nn.Identity``), the step any norm
  layer adds to. ``none / batchnorm`` is the best RobustNorm/BatchNorm ratio that even a
  norm costing nothing could reach, and ``1 - none / batchnorm`` batch norm's share of
  the step: RobustNorm's layers must cost ``1 - (1 - TARGET) / share`` of batch norm's,
  or less, for the step to meet the target.

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

Page faults per step are printed beside the times. By default each network's process
keeps freed memory for reuse as a trial's process does (``trainables.allocator``), and
steps after the first fault nothing in. ``--malloc glibc`` measures with glibc's
defaults instead: the heap's free top goes back to the kernel, and each step faults its
activations in afresh, several microseconds a fault on a VM (how many depends on the
order of every allocation in the process, which is why the networks do not share one;
``--profile`` does run both in this process). ``--malloc both`` runs every network
both ways, and prints what keeping freed memory saves each.

Run from the repository root: ``python benchmarks/bench_step.py [--reps 15] [--iters 3]
[--warmup 3] [--threads 1 2] [--malloc trial|glibc|both] [--floor] [--json-out FILE]
[--profile] [--rows 15]``.
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

from _machine import cpu_model, load_average, minor_faults, write_json

from trainables.allocator import keep_freed_memory  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.norms import norm_layer_factory  # noqa: E402
from trainables.optim import build_optimizer  # noqa: E402

BATCH, SHAPE, CLASSES = 128, (3, 32, 32), 10
TARGET = 0.95  # RobustNorm step / BatchNorm2d step at most, at TARGET_THREADS
TARGET_THREADS = 2
NORMS = ("batchnorm", "robustnorm")
FLOOR = "none"  # --floor: the same network without norm layers (the norm registry's name)


def build(norm: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """ResNet-20 with ``norm`` layers (same seed, so the same convolutions) and its SGD optimizer."""
    cfg = TrialConfig(model="resnet20", norm="robustnorm")  # TrialConfig's defaults: SGD, norm options
    if norm == "batchnorm":
        norm_layer = functools.partial(nn.BatchNorm2d, eps=cfg.norm_eps, momentum=cfg.norm_momentum)
    elif norm == FLOOR:
        norm_layer = norm_layer_factory(FLOOR)  # the registry's "none": nn.Identity
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


MALLOCS = {"trial": True, "glibc": False}  # --malloc: keep freed memory as a trial does, or glibc's defaults


def _step_worker(norm: str, threads: int, keep_memory: bool, conn: Connection) -> None:
    """One network in its own process: on each ``iters`` received, run that many steps and
    send back (ms per step, page faults per step); ``None`` ends it."""
    if keep_memory:
        keep_freed_memory(force=True)
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


def time_steps(
    threads: int, reps: int, iters: int, warmup: int, mallocs: tuple[str, ...] = ("trial",), floor: bool = False
) -> dict[str, object]:
    """Median ms per step of each network at ``threads`` torch threads, and their ratio, for
    each allocator setting in ``mallocs`` (``MALLOCS``).

    Each network lives in a process of its own, as in a trial: how often a step page-faults
    its activations back in depends on the whole process's sequence of allocations, and
    two networks in one process would share (and disturb) one heap. The processes take
    turns, one running while the other waits, in alternating order. ``floor``: the
    norm-free network takes its turns too (``FLOOR``).
    """
    nets = [(norm, malloc) for malloc in mallocs for norm in ((*NORMS, FLOOR) if floor else NORMS)]
    ctx = multiprocessing.get_context("spawn")
    workers: dict[tuple[str, str], tuple[multiprocessing.process.BaseProcess, Connection]] = {}
    for net in nets:
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_step_worker, args=(net[0], threads, MALLOCS[net[1]], there), daemon=True)
        proc.start()
        workers[net] = (proc, here)
    samples: dict[tuple[str, str], list[float]] = {net: [] for net in nets}
    faults: dict[tuple[str, str], list[float]] = {net: [] for net in nets}
    try:
        for net in nets:
            workers[net][1].send(warmup)
            workers[net][1].recv()
        for rep in range(reps):
            for net in nets if rep % 2 == 0 else nets[::-1]:
                workers[net][1].send(iters)
                ms, per_step_faults = workers[net][1].recv()
                samples[net].append(ms)
                faults[net].append(per_step_faults)
    finally:
        for proc, conn in workers.values():
            if proc.is_alive():
                conn.send(None)
            proc.join(timeout=60)
    result: dict[str, object] = {"threads": threads, "by_malloc": {}}
    for malloc in mallocs:
        mine = {norm: samples[(norm, malloc)] for norm, m in nets if m == malloc}
        med = {norm: statistics.median(v) for norm, v in mine.items()}
        # the ratio of the two medians, and the median of the per-repetition ratios (less sensitive to load drifts)
        per_rep = [r / b for r, b in zip(mine["robustnorm"], mine["batchnorm"])]
        figures: dict[str, object] = {
            "median_ms": med,
            "rn_over_bn": med["robustnorm"] / med["batchnorm"],
            "rn_over_bn_paired": statistics.median(per_rep),
            "rn_over_bn_best": min(mine["robustnorm"]) / min(mine["batchnorm"]),
            "page_faults_per_step": {norm: statistics.median(faults[(norm, malloc)]) for norm in mine},
            "samples_ms": mine,
        }
        if floor:
            figures["floor"] = norm_costs(med["batchnorm"], med["robustnorm"], med[FLOOR])
        result["by_malloc"][malloc] = figures
    if len(mallocs) > 1:  # what keeping freed memory saves each network: its step kept / with glibc's defaults
        by = result["by_malloc"]
        result["kept_over_glibc"] = {
            norm: by["trial"]["median_ms"][norm] / by["glibc"]["median_ms"][norm] for norm in by["trial"]["median_ms"]
        }
    return result


def norm_costs(bn_ms: float, rn_ms: float, none_ms: float, target: float = TARGET) -> dict[str, float]:
    """What the norm layers cost in a step, from the step times with each norm and with none.

    ``bn_share``: batch norm's share of its step, ``1 - none / bn``; ``rn_over_bn_layers``:
    what RobustNorm's layers add to the norm-free step over what batch norm's add;
    ``best_step_ratio``: ``none / bn``, the step ratio of a norm that cost nothing;
    ``layers_needed``: the ``rn_over_bn_layers`` at which the step ratio would be ``target``
    (``1 - (1 - target) / bn_share``; at or below 0 no norm layer can get there).
    """
    bn_cost, rn_cost = bn_ms - none_ms, rn_ms - none_ms
    share = bn_cost / bn_ms
    return {
        "none_ms": none_ms,
        "bn_share": share,
        "rn_over_bn_layers": rn_cost / bn_cost if bn_cost > 0 else float("nan"),
        "best_step_ratio": none_ms / bn_ms,
        "layers_needed": 1 - (1 - target) / share if share > 0 else float("-inf"),
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
        "--malloc",
        choices=[*MALLOCS, "both"],
        default="trial",
        help="trial: malloc keeps freed memory, as a trial's process does (default); glibc: glibc's defaults, "
        "steps fault their memory in afresh; both: each network both ways, and what keeping saves",
    )
    parser.add_argument(
        "--floor", action="store_true", help="also time the network without norm layers: what the norms cost"
    )
    parser.add_argument("--profile", action="store_true", help="print per-op profiles instead of timing")
    parser.add_argument("--rows", type=int, default=15, help="--profile: ops per table (default 15)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.iters < 1 or min(args.threads) < 1:
        parser.error("--reps, --iters and --threads must be >= 1")
    mallocs = tuple(MALLOCS) if args.malloc == "both" else (args.malloc,)

    started = time.perf_counter()
    load_before = load_average()
    print(f"torch {torch.__version__}, CPU: {cpu_model()} ({os.cpu_count()} cores), load average {load_before:.2f}")
    print(
        f"ResNet-20, batch {BATCH}x{'x'.join(map(str, SHAPE))}, training step (forward, cross-entropy, backward, "
        "SGD momentum + weight decay); malloc: trial = keeps freed memory, as a trial does; glibc = its defaults"
    )
    if args.profile:
        if MALLOCS[mallocs[0]]:  # both networks in this process
            keep_freed_memory(force=True)
        for threads in args.threads:
            profile_steps(threads, args.rows, args.reps)
        return 0
    print(f"{args.reps} alternating reps x {args.iters} steps after {args.warmup} warm-up steps, medians")
    print()
    print(
        f"{'threads':<9}{'malloc':<8}{'batchnorm':>11}{'robustnorm':>12}{'RN/BN':>8}{'paired':>8}{'best':>8}"
        f"{'page faults/step':>20}"
    )
    print(f"{'':<17}{'(ms)':>11}{'(ms)':>12}{'':>8}{'':>8}{'':>8}{'BN':>10}{'RN':>10}")
    results = []
    for threads in args.threads:
        res = time_steps(threads, args.reps, args.iters, args.warmup, mallocs, args.floor)
        for malloc, fig in res["by_malloc"].items():
            med, pf = fig["median_ms"], fig["page_faults_per_step"]
            print(
                f"{threads:<9}{malloc:<8}{med['batchnorm']:>11.2f}{med['robustnorm']:>12.2f}{fig['rn_over_bn']:>8.3f}"
                f"{fig['rn_over_bn_paired']:>8.3f}{fig['rn_over_bn_best']:>8.3f}"
                f"{pf['batchnorm']:>10.0f}{pf['robustnorm']:>10.0f}",
                flush=True,
            )
        results.append(res)
    at_target = [r["by_malloc"][mallocs[0]] for r in results if r["threads"] == TARGET_THREADS]
    met = bool(at_target) and at_target[0]["rn_over_bn"] <= TARGET
    print()
    print(
        "RN/BN: ratio of the median step times (the target's figure); paired: median of the per-repetition "
        "ratios; best: ratio of the fastest repetitions (the least disturbed by other processes)"
    )
    if len(mallocs) > 1:
        print()
        print("step kept / step with glibc's defaults (what keeping freed memory saves):")
        for res in results:
            kept = ", ".join(f"{norm} {ratio:.3f}" for norm, ratio in res["kept_over_glibc"].items())
            print(f"  {res['threads']} thread(s): {kept}")
    if args.floor:
        print()
        print("the norm layers' cost: each step time minus the norm-free network's")
        print(
            f"{'threads':<9}{'malloc':<8}{'no norm':>9}{'BN share':>10}{'RN/BN layers':>14}{'best ratio':>12}{'needed':>8}"
        )
        print(f"{'':<17}{'(ms)':>9}{'of step':>10}{'':>14}{'(free norm)':>12}{'':>8}")
        for res in results:
            for malloc, fig in res["by_malloc"].items():
                fl = fig["floor"]
                print(
                    f"{res['threads']:<9}{malloc:<8}{fl['none_ms']:>9.2f}{fl['bn_share']:>10.3f}"
                    f"{fl['rn_over_bn_layers']:>14.3f}{fl['best_step_ratio']:>12.3f}{fl['layers_needed']:>8.3f}"
                )
        print(f"needed: what RobustNorm's layers may cost, as a fraction of batch norm's, for a step ratio of {TARGET}")
    if at_target:
        print(
            f"RobustNorm step / BatchNorm2d step at {TARGET_THREADS} threads ({mallocs[0]} malloc): "
            f"{at_target[0]['rn_over_bn']:.3f} (target <= {TARGET}): {'met' if met else 'MISSED'}"
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
            mallocs=list(mallocs),
            floor=args.floor,
            results=results,
            target={"rn_over_bn_max": TARGET, "threads": TARGET_THREADS, "malloc": mallocs[0]},
            target_met=met,
            load_average={"before": load_before, "after": load_after},
            seconds=seconds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
