"""Forward + backward speed of RobustNorm against nn.BatchNorm2d and a straightforward form.

What it measures: one training-mode step of a norm layer (batch statistics, running
statistics updated) on a (128, C, H, W) input that requires grad, followed by the
gradients of the input, weight and bias for a fixed upstream gradient, at the three
layer shapes of a CIFAR ResNet-20: C x H x W = 16x32x32, 32x16x16, 64x8x8. Three
implementations:

- ``batchnorm``: ``nn.BatchNorm2d`` (PyTorch's native kernels), the baseline;
- ``robustnorm``: ``trainables.norms.RobustNorm`` (custom autograd Function);
- ``straightforward``: the same RobustNorm formula written here the way the paper's
  code writes it (transpose to (C, N*H*W), mean, max(dim=1), min(dim=1),
  ``(y - mu) / (range ** p + eps) * w + b``, view back and transpose) with autograd
  doing the backward;
- ``generic``: RobustNorm forced onto its generic kernel path (broadcasting ops, the
  path CUDA, half precision and autocast take), for its cost relative to the fused
  CPU path (no target: informational).

Every figure is a ratio of medians measured in the same run: each repetition times a
few iterations of each implementation at each shape, in rotating orders, so load from
other processes (and the state the other shapes leave behind) hits all alike; the
median over repetitions is taken per implementation and shape. Targets on the machine
it runs on:

- RobustNorm / BatchNorm2d   <= 1.2   (RobustNorm costs at most 20% more than BatchNorm)
- straightforward / RobustNorm >= 1.5 (RobustNorm at least 1.5x faster)

per shape and as the geometric mean over the shapes.

With ``--threads`` at all cores (the default), other processes using the CPU at the
same time hurt every multi-threaded kernel far more than their share, and RobustNorm,
which launches more (smaller) parallel kernels than BatchNorm, a little more than
BatchNorm: the load average is printed before and after, measure on an idle machine (or
compare with ``--threads 1``).

Run from the repository root: ``python benchmarks/bench_norms.py [--reps 31] [--iters 5]
[--threads N] [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `trainables` without an install

from _machine import cpu_model, default_threads, load_average, write_json

from trainables.norms import RobustNorm, force_kernel_path  # noqa: E402

BATCH = 128
SHAPES = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]  # ResNet-20's three stages
POWER, EPS, MOMENTUM = 0.2, 1e-5, 0.1
TARGET_RN_VS_BN = 1.2  # RobustNorm / BatchNorm2d at most
TARGET_ST_VS_RN = 1.5  # straightforward / RobustNorm at least
IMPLS = ("batchnorm", "robustnorm", "straightforward", "generic")


class StraightforwardRobustNorm(nn.Module):
    """RobustNorm as the paper's code writes it; autograd does the backward."""

    def __init__(self, num_features: int, power: float = POWER, eps: float = EPS, momentum: float = MOMENTUM) -> None:
        super().__init__()
        self.power, self.eps, self.momentum = power, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_range", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        y = x.transpose(0, 1).contiguous().view(c, -1)  # (C, N*H*W)
        mu = y.mean(dim=1)
        rng = y.max(dim=1)[0] - y.min(dim=1)[0]
        with torch.no_grad():
            self.running_mean.lerp_(mu, self.momentum)
            self.running_range.lerp_(rng, self.momentum)
        y = (y - mu.view(c, 1)) / (rng.view(c, 1) ** self.power + self.eps)
        y = y * self.weight.view(c, 1) + self.bias.view(c, 1)
        return y.view(c, n, *x.shape[2:]).transpose(0, 1)


def make_step(layer: nn.Module, x: Tensor, grad: Tensor, path: str | None = None) -> Callable[[], object]:
    """One forward + backward: gradients of input, weight and bias (RobustNorm: on ``path``)."""
    inputs = [x, layer.weight, layer.bias]

    def step() -> object:
        with force_kernel_path(path):
            return torch.autograd.grad(layer(x), inputs, grad)

    return step


def make_steps(c: int, h: int, w: int) -> dict[str, Callable[[], object]]:
    """The three implementations' training steps on one (BATCH, c, h, w) input."""
    torch.manual_seed(0)
    x = (torch.randn(BATCH, c, h, w) * 2 + 0.5).requires_grad_()
    grad = torch.randn(BATCH, c, h, w)
    layers: dict[str, nn.Module] = {
        "batchnorm": nn.BatchNorm2d(c, eps=EPS, momentum=MOMENTUM),
        "robustnorm": RobustNorm(c, power=POWER, momentum=MOMENTUM, eps=EPS),
        "straightforward": StraightforwardRobustNorm(c),
        "generic": RobustNorm(c, power=POWER, momentum=MOMENTUM, eps=EPS),
    }
    for layer in layers.values():
        layer.train()
    # the two RobustNorm forms compute the same thing
    y_rn, y_st = layers["robustnorm"](x), layers["straightforward"](x)
    torch.testing.assert_close(y_rn, y_st, rtol=1e-4, atol=1e-4)
    return {name: make_step(layer, x, grad, "generic" if name == "generic" else None) for name, layer in layers.items()}


def time_all(reps: int, iters: int, warmup: int) -> list[dict[str, object]]:
    """Median ms per step of every implementation at every shape.

    Each repetition times ``iters`` steps of every (shape, implementation) pair, both
    orders rotating from one repetition to the next, so every pair sees the same mix of
    load and of process state (cache, allocator) as in a network, where the shapes
    alternate: measured one shape after the other, a shape's figures depended on which
    shapes had run before it.
    """
    steps = {shape: make_steps(*shape) for shape in SHAPES}
    for per_shape in steps.values():
        for step in per_shape.values():
            for _ in range(warmup):
                step()
    samples = {shape: {name: [] for name in IMPLS} for shape in SHAPES}
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            k, j = rep % len(SHAPES), rep % len(IMPLS)
            for shape in SHAPES[k:] + SHAPES[:k]:
                for name in IMPLS[j:] + IMPLS[:j]:
                    step = steps[shape][name]
                    start = time.perf_counter()
                    for _ in range(iters):
                        step()
                    samples[shape][name].append((time.perf_counter() - start) / iters * 1e3)
    finally:
        gc.enable()
    results = []
    for (c, h, w), per_impl in samples.items():
        med = {name: statistics.median(v) for name, v in per_impl.items()}
        results.append(
            {
                "shape": [BATCH, c, h, w],
                "median_ms": med,
                "rn_over_bn": med["robustnorm"] / med["batchnorm"],
                "st_over_rn": med["straightforward"] / med["robustnorm"],
                "generic_over_rn": med["generic"] / med["robustnorm"],
                "samples_ms": per_impl,
            }
        )
    return results


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=31, help="interleaved repetitions (default 31)")
    parser.add_argument(
        "--iters", type=int, default=5, help="timed iterations per implementation per repetition (default 5)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per implementation first (default 5)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: all cores)")
    parser.add_argument("--json-out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.iters < 1 or args.threads < 1:
        parser.error("--reps, --iters and --threads must be >= 1")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = load_average()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU: {cpu_model()} ({os.cpu_count()} cores), "
        f"load average {load_before:.2f}"
    )
    print(
        f"batch {BATCH}, training mode (batch statistics), forward + backward; "
        f"{args.reps} interleaved reps x {args.iters} iters, medians"
    )
    print()
    header = f"{'C x H x W':<12}{'batchnorm':>12}{'robustnorm':>12}{'straightfwd':>13}{'generic':>10}{'RN/BN':>9}{'ST/RN':>9}{'G/RN':>7}"
    print(header)
    print(f"{'':<12}{'(ms)':>12}{'(ms)':>12}{'(ms)':>13}{'(ms)':>10}{'<=1.2':>9}{'>=1.5':>9}{'':>7}")
    results = time_all(args.reps, args.iters, args.warmup)
    for res in results:
        _, c, h, w = res["shape"]
        med = res["median_ms"]
        print(
            f"{f'{c}x{h}x{w}':<12}{med['batchnorm']:>12.3f}{med['robustnorm']:>12.3f}{med['straightforward']:>13.3f}"
            f"{med['generic']:>10.3f}{res['rn_over_bn']:>9.2f}{res['st_over_rn']:>9.2f}{res['generic_over_rn']:>7.2f}",
            flush=True,
        )
    rn_bn = geomean([r["rn_over_bn"] for r in results])
    st_rn = geomean([r["st_over_rn"] for r in results])
    g_rn = geomean([r["generic_over_rn"] for r in results])
    print(f"{'geomean':<12}{'':>47}{rn_bn:>9.2f}{st_rn:>9.2f}{g_rn:>7.2f}")
    worst_rn_bn = max(r["rn_over_bn"] for r in results)
    worst_st_rn = min(r["st_over_rn"] for r in results)
    met_bn = worst_rn_bn <= TARGET_RN_VS_BN
    met_st = worst_st_rn >= TARGET_ST_VS_RN
    print()
    print(
        f"RobustNorm / BatchNorm2d: geomean {rn_bn:.2f}, worst shape {worst_rn_bn:.2f} "
        f"(target <= {TARGET_RN_VS_BN}): {'met' if met_bn else 'MISSED'}"
    )
    print(
        f"straightforward / RobustNorm: geomean {st_rn:.2f}, worst shape {worst_st_rn:.2f} "
        f"(target >= {TARGET_ST_VS_RN}): {'met' if met_st else 'MISSED'}"
    )
    seconds = time.perf_counter() - started
    load_after = load_average()
    print(f"({seconds:.0f} s; load average before {load_before:.2f}, after {load_after:.2f})")
    if args.json_out:
        write_json(
            args.json_out,
            "norms",
            reps=args.reps,
            iters=args.iters,
            batch=BATCH,
            shapes=results,
            geomean_rn_over_bn=rn_bn,
            geomean_st_over_rn=st_rn,
            geomean_generic_over_rn=g_rn,
            targets={"rn_over_bn_max": TARGET_RN_VS_BN, "st_over_rn_min": TARGET_ST_VS_RN},
            targets_met={"rn_over_bn": met_bn, "st_over_rn": met_st},
            load_average={"before": load_before, "after": load_after},
            seconds=seconds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
