"""The GPU check: everything normlab should verify the day a CUDA GPU is lent, in one run.

Steps, on a machine with CUDA:

1. ``cuda tests``: ``pytest -m cuda`` (the tests that skip without CUDA), in a subprocess,
   counted from its JUnit XML;
2. ``amp``: a short real trial (``run_trial``, synthetic data, ResNet-20) with ``amp=true``:
   float16 autocast with ``torch.amp.GradScaler``. Passes when every training loss is
   finite, the scaler is enabled with a finite positive scale after every epoch (read from
   the checkpoint state ``run_trial`` hands ``on_epoch``), the training forward really ran
   in float16 (a forward hook on the model), and the clean accuracy is sane: at least twice
   chance and at most ``AMP_ACC_TOLERANCE`` below the same trial in float32;
3. ``norms``: ``bench_norms.py``'s four implementations (BatchNorm2d, RobustNorm, the
   straightforward form, RobustNorm's generic path) built by its own ``make_steps`` on the
   GPU (inside ``with torch.device('cuda')``) and timed here with ``torch.cuda.synchronize``
   around every sample: bench_norms.py itself has no device option and times without a
   sync, so its own ``main`` measures the CPU only;
4. ``throughput``: training images/s of a ResNet-20 trial on CIFAR-shaped data (3x32x32, ten
   classes: a folder of PNGs generated here, or ``--data-dir`` with an imagefolder tree such
   as ../shared/data/cifar10-jpeg-mini) against a plain PyTorch loop over the same model,
   data tensors, batch size and optimizer (``trainables.optim.build_optimizer``) on the same
   GPU, each with and without channels_last and ``torch.backends.cudnn.benchmark``. The
   trial's figure is its own ``train_images_per_s`` (median over epochs after the first; its
   clock stops after a ``nonzero()`` on the losses, a device sync); the plain loop's is
   timed between two ``torch.cuda.synchronize`` calls (median over epochs after a warm-up
   epoch). The trial does not convert to channels_last: here its ``create_model`` is
   wrapped to convert the model (what adopting it in trainables would give), the plain loop
   converts model and inputs. One more trial row trains with crop_flip augmentation;
5. ``search``: a real ``normlab submit`` of a small search file written here (four ResNet-20
   trials, a grid over seeds, device auto) on a local Ray that sees the GPU, once with
   ``resources: {gpu: 0.25}`` (four trials share the GPU) and once with ``gpu: 1`` (one
   after another). Trials per hour come from Ray Tune's results (``result.json`` of each
   trial: a trial ran from ``timestamp - time_total_s`` to its last ``timestamp``; trials
   per hour = trials x 3600 / (last end - first start)) and, for the whole command with
   Ray's start and the report, from the command's wall clock. The devices the trials used
   are read from their MLflow tags (``normlab.device``).

It prints a summary table and writes every figure to ``DIR/gpu_check.json`` (default
``normlab_runs/gpu_check``; the search logs beside it). ``--quick`` makes everything
shorter (about half). Exit status: 0 when every check that ran passed, 1 otherwise.

On a machine without CUDA it says so in one line and runs its CPU part, tiny: step 4's
trial vs plain loop comparison on the CPU (channels_last on and off), step 2 on the CPU
(bfloat16 autocast, where trainables turns the gradient scaler off: the check is that it
is off), step 3's code path on the CPU (a few repetitions), and step 5's search files,
written and validated by ``normlab``'s own loader (no search runs: a ``gpu`` share cannot
be scheduled without a GPU). It exits 0 unless one of those checks failed.

Run from the repository root: ``python benchmarks/gpu_check.py [--out DIR] [--quick]
[--data-dir DIR] [--norm NAME] [--skip STEP ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `trainables` without an install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine, bench_norms (also when imported)

from _machine import cpu_model, default_threads, load_average, write_json  # noqa: E402

import trainables.trial as trial_module  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.data import load_dataset  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.norms import NORMS, norm_layer_factory  # noqa: E402
from trainables.optim import build_optimizer  # noqa: E402
from trainables.trial import TrialResult, run_trial  # noqa: E402

STEPS = ("tests", "amp", "norms", "throughput", "search")
DEFAULT_OUT = Path("normlab_runs/gpu_check")
AMP_ACC_TOLERANCE = 0.1  # AMP's clean accuracy at most this far below float32's
FLAG_MARGIN = 0.05  # a flag "helps" when it speeds the loop up by more than 5% (hurts: slows it by more)
SEARCH_SHARES = (0.25, 1.0)
SEARCH_TRIALS = 4
EVAL = {"eval_attacks": ["fgsm"], "eval_eps": [0.03], "eval_steps": 2}


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """How much work each step does."""

    train_images: int  # CIFAR-shaped training images generated (throughput, search)
    test_images: int
    batch_size: int
    trial_epochs: int  # throughput: epochs of each trial (the first is not counted)
    plain_epochs: int  # throughput: timed epochs of each plain loop (after one warm-up epoch)
    amp_epochs: int
    amp_model: str
    amp_train_subset: int | None
    norm_reps: int
    norm_iters: int
    norm_warmup: int
    search_epochs: int
    search_train_subset: int
    tests_timeout_s: float
    search_timeout_s: float


def sizes_for(cuda: bool, quick: bool) -> Sizes:
    """Full or ``--quick`` sizes on a GPU; on the CPU, tiny ones (a code-path check)."""
    if not cuda:
        return Sizes(
            train_images=64,
            test_images=48,
            batch_size=32,
            trial_epochs=2,
            plain_epochs=1,
            amp_epochs=2,
            amp_model="cnn",
            amp_train_subset=256,
            norm_reps=1,
            norm_iters=1,
            norm_warmup=1,
            search_epochs=2,
            search_train_subset=64,
            tests_timeout_s=600,
            search_timeout_s=300,
        )
    if quick:
        return Sizes(
            train_images=5120,
            test_images=500,
            batch_size=128,
            trial_epochs=3,
            plain_epochs=2,
            amp_epochs=3,
            amp_model="resnet20",
            amp_train_subset=None,
            norm_reps=7,
            norm_iters=5,
            norm_warmup=3,
            search_epochs=2,
            search_train_subset=2560,
            tests_timeout_s=300,
            search_timeout_s=180,
        )
    return Sizes(
        train_images=10240,
        test_images=1000,
        batch_size=128,
        trial_epochs=4,
        plain_epochs=3,
        amp_epochs=6,
        amp_model="resnet20",
        amp_train_subset=None,
        norm_reps=21,
        norm_iters=10,
        norm_warmup=5,
        search_epochs=3,
        search_train_subset=5120,
        tests_timeout_s=420,
        search_timeout_s=300,
    )


# --------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_after_first(values: Sequence[float]) -> float:
    """The median of ``values`` without the first (a warm-up), or the only value."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def gpu_info(device: torch.device) -> dict[str, Any]:
    """What the GPU is, and the cuDNN/TF32 settings the timings ran under."""
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "count": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


@contextlib.contextmanager
def patched_trial_models(
    *, channels_last: bool = False, on_model: Callable[[nn.Module], None] | None = None
) -> Iterator[list[nn.Module]]:
    """Wrap the ``create_model`` that ``run_trial`` calls: the model converted to channels_last
    (``_Trial`` then moves it with ``.to(device)``, which keeps the memory format) and/or handed
    to ``on_model``. Yields the models built, so a caller can tell the wrapper was used."""
    built: list[nn.Module] = []
    original = trial_module.create_model

    def create(*args: Any, **kwargs: Any) -> nn.Module:
        model = original(*args, **kwargs)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if on_model is not None:
            on_model(model)
        built.append(model)
        return model

    trial_module.create_model = create
    try:
        yield built
    finally:
        trial_module.create_model = original


def _patch_applied(built: list[nn.Module]) -> None:
    if not built:
        raise RuntimeError(
            "trainables.trial no longer builds its model through trainables.trial.create_model: "
            "this check's channels_last / dtype wrapper did not apply (update gpu_check.py)"
        )


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]


# --------------------------------------------------------------------------- CIFAR-shaped data
def write_cifar_shape_folder(root: Path, train_images: int, test_images: int, seed: int = 0) -> Path:
    """An imagefolder tree (root/train/classK/*.png, root/test/classK/*.png) of 3x32x32 images
    in ten learnable classes: normlab's synthetic dataset upsampled to 32x32, repeated with
    fresh pixel noise up to the sizes asked for."""
    from torchvision.io import encode_png

    base = load_dataset("synthetic")
    gen = torch.Generator().manual_seed(seed)
    splits = (("train", base.train_x, base.train_y, train_images), ("test", base.test_x, base.test_y, test_images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's move to TorchCodec
        for split, x16, y16, n in splits:
            idx = torch.arange(n) % len(x16)
            x = F.interpolate(x16[idx], size=(32, 32), mode="bilinear", align_corners=False)
            x = (x + 0.02 * torch.randn(x.shape, generator=gen)).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
            for i, (image, label) in enumerate(zip(x, y16[idx].tolist())):
                folder = root / split / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{i:06d}.png").write_bytes(encode_png(image).numpy().tobytes())
    return root


# --------------------------------------------------------------------------- step 1: cuda tests
def parse_junit(path: Path) -> dict[str, Any]:
    """Counts of a pytest JUnit XML file (every ``testsuite`` in it) and the failed tests' names."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for suite in suites
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def run_cuda_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    """``pytest -m cuda`` over tests/ (with ``-m cuda`` after pyproject's ``-m 'not slow'``: it wins)."""
    junit = out / "cuda_tests.xml"
    log = out / "cuda_tests.log"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests"]
    started = time.perf_counter()
    with log.open("w") as stream:
        rc = run_in_group(cmd, cwd=REPO, env=_subprocess_env(), stream=stream, timeout_s=timeout_s)
    figures: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": rc, "log": str(log)}
    figures["seconds"] = time.perf_counter() - started
    if junit.exists():
        figures.update(parse_junit(junit))
    # rc 5: nothing collected (no cuda-marked test at all), itself a failure of this check
    figures["ok"] = rc == 0 and junit.exists() and figures.get("tests", 0) > 0
    if rc is None:
        figures["error"] = f"timed out after {timeout_s:.0f} s"
    return figures


# --------------------------------------------------------------------------- step 2: amp
def amp_verdict(
    device_type: str,
    scaler_states: list[dict[str, Any]],
    train_dtypes: list[str],
    losses: list[float],
    amp_acc: float | None,
    fp32_acc: float,
    num_classes: int,
) -> dict[str, Any]:
    """Whether the AMP trial did what trainables promises on ``device_type``: float16 with an
    enabled scaler whose scale stays finite and positive on CUDA, bfloat16 with the scaler off
    elsewhere; finite losses; a clean accuracy of at least twice chance and at most
    ``AMP_ACC_TOLERANCE`` below float32's."""
    cuda = device_type == "cuda"
    expected = "torch.float16" if cuda else "torch.bfloat16"
    scales = [s.get("scale") for s in scaler_states]
    checks = {
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "autocast_dtype": train_dtypes == [expected],
        "scaler": (
            bool(scaler_states) and all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in scales)
            if cuda
            else bool(scaler_states) and all(state == {} for state in scaler_states)
        ),
        "accuracy": amp_acc is not None and amp_acc >= 2 / num_classes and amp_acc >= fp32_acc - AMP_ACC_TOLERANCE,
    }
    return {
        "expected_dtype": expected,
        "scaler_expected": "enabled" if cuda else "disabled",
        "scales": scales if cuda else [],
        "checks": checks,
        "ok": all(checks.values()),
    }


def amp_config(device: torch.device, sizes: Sizes, norm: str, amp: bool) -> TrialConfig:
    return TrialConfig(
        dataset="synthetic",
        train_subset=sizes.amp_train_subset,
        model=sizes.amp_model,
        norm=norm,
        regime="standard",
        epochs=sizes.amp_epochs,
        batch_size=sizes.batch_size if device.type == "cuda" else 64,
        lr=0.05,
        epoch_adv_samples=128,
        final_adv_samples=128,
        device=str(device),
        amp=amp,
        seed=0,
        **EVAL,
    )


def run_amp_check(device: torch.device, sizes: Sizes, norm: str) -> dict[str, Any]:
    """Step 2: the AMP trial and its float32 twin."""
    scaler_states: list[dict[str, Any]] = []
    dtypes: set[str] = set()

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if module.training and isinstance(output, torch.Tensor):
            dtypes.add(str(output.dtype))

    def on_epoch(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        # plain numbers only: the state's tensors are live
        scaler_states.append({k: v for k, v in state.get("scaler", {}).items() if isinstance(v, (int, float))})

    cfg = amp_config(device, sizes, norm, amp=True)
    started = time.perf_counter()
    error = None
    with patched_trial_models(on_model=lambda m: m.register_forward_hook(hook)) as built:
        try:
            amp_result: TrialResult | None = run_trial(cfg, on_epoch=on_epoch)
        except Exception as exc:  # NonFiniteLossError among others: the check fails, the run goes on
            amp_result, error = None, error_text(exc)
    _patch_applied(built)
    fp32_result = run_trial(cfg.model_copy(update={"amp": False}))
    seconds = time.perf_counter() - started
    history = amp_result.history if amp_result else []
    amp_acc = amp_result.final["final_clean_acc"] if amp_result else None
    fp32_acc = fp32_result.final["final_clean_acc"]
    num_classes = 10  # synthetic
    verdict = amp_verdict(
        device.type, scaler_states, sorted(dtypes), [h["train_loss"] for h in history], amp_acc, fp32_acc, num_classes
    )
    figures = {
        "device": amp_result.device if amp_result else str(device),
        "config": {
            k: cfg.model_dump()[k] for k in ("dataset", "train_subset", "model", "norm", "epochs", "batch_size")
        },
        "train_dtypes": sorted(dtypes),
        "scaler_states": scaler_states,
        "train_loss": [h["train_loss"] for h in history],
        "amp_clean_acc": amp_acc,
        "fp32_clean_acc": fp32_acc,
        "amp_train_images_per_s": median_after_first([h["train_images_per_s"] for h in history]) if history else None,
        "fp32_train_images_per_s": median_after_first([h["train_images_per_s"] for h in fp32_result.history]),
        "seconds": seconds,
        **verdict,
    }
    if error:
        figures["error"], figures["ok"] = error, False
    return figures


# --------------------------------------------------------------------------- step 3: norms
def run_norms(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Step 3: bench_norms.py's implementations on ``device``, each sample between two syncs."""
    import bench_norms  # benchmarks/bench_norms.py; another agent may change it: any mismatch is reported

    impls = tuple(bench_norms.IMPLS)
    with torch.device(device):  # make_steps's tensors and layers are created on the device
        steps = {shape: bench_norms.make_steps(*shape) for shape in bench_norms.SHAPES}
    for per_shape in steps.values():
        for step in per_shape.values():
            for _ in range(sizes.norm_warmup):
                step()
    sync(device)
    samples: dict[tuple[int, ...], dict[str, list[float]]] = {s: {i: [] for i in impls} for s in steps}
    for rep in range(sizes.norm_reps):
        k, j = rep % len(steps), rep % len(impls)
        shapes = list(steps)
        for shape in shapes[k:] + shapes[:k]:
            for name in impls[j:] + impls[:j]:
                step = steps[shape][name]
                sync(device)
                start = time.perf_counter()
                for _ in range(sizes.norm_iters):
                    step()
                sync(device)
                samples[shape][name].append((time.perf_counter() - start) / sizes.norm_iters * 1e3)
    rows = []
    for (c, h, w), per_impl in samples.items():
        med = {name: statistics.median(v) for name, v in per_impl.items()}
        rows.append(
            {
                "shape": [bench_norms.BATCH, c, h, w],
                "median_ms": med,
                "rn_over_bn": med["robustnorm"] / med["batchnorm"],
                "st_over_rn": med["straightforward"] / med["robustnorm"],
                "generic_over_rn": med["generic"] / med["robustnorm"],
            }
        )
    return {
        "device": str(device),
        "reps": sizes.norm_reps,
        "iters": sizes.norm_iters,
        "shapes": rows,
        "geomean_rn_over_bn": geomean([r["rn_over_bn"] for r in rows]),
        "geomean_st_over_rn": geomean([r["st_over_rn"] for r in rows]),
        "cpu_targets_for_reference": {
            "rn_over_bn_max": bench_norms.TARGET_RN_VS_BN,
            "st_over_rn_min": bench_norms.TARGET_ST_VS_RN,
        },
        "ok": True,  # informational: the CPU targets are not the GPU's
    }


# --------------------------------------------------------------------------- step 4: throughput
def throughput_config(data_dir: Path, sizes: Sizes, device: torch.device, norm: str, augment: str) -> TrialConfig:
    test_samples = min(128, sizes.test_images)
    return TrialConfig(
        dataset="imagefolder",
        data_dir=str(data_dir),
        augment=augment,
        model="resnet20",
        norm=norm,
        regime="standard",
        epochs=sizes.trial_epochs,
        batch_size=sizes.batch_size,
        test_subset=min(256, sizes.test_images),
        eval_batch_size=max(2, test_samples),
        epoch_adv_samples=test_samples,
        final_adv_samples=test_samples,
        device=str(device),
        seed=0,
        **EVAL,
    )


def plain_loop(cfg: TrialConfig, data: Any, device: torch.device, channels_last: bool) -> Callable[[int], float]:
    """One epoch of a plain training loop, returning its images/s: the trial's model (built the
    same way, same seed), its optimizer (``build_optimizer``), its batch size and data tensors;
    ``randperm`` order, index, forward, cross-entropy, zero_grad, backward, step."""
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        norm_layer=norm_layer_factory(cfg.norm, **cfg.norm_options()),
        mean=data.mean,
        std=data.std,
    ).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg)
    x_all, y_all, bs = data.train_x, data.train_y, cfg.batch_size
    steps = len(x_all) // bs

    def epoch(seed: int) -> float:
        model.train()
        order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed)).to(device)
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            idx = order[i * bs : (i + 1) * bs]
            x, y = x_all[idx], y_all[idx]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        return steps * bs / (time.perf_counter() - start)

    return epoch


def trial_images_per_s(cfg: TrialConfig, channels_last: bool) -> dict[str, Any]:
    with patched_trial_models(channels_last=channels_last) as built:
        result = run_trial(cfg)
    _patch_applied(built)
    per_epoch = [h["train_images_per_s"] for h in result.history]
    return {"images_per_s": median_after_first(per_epoch), "per_epoch": per_epoch, "device": result.device}


def flag_effects(rows: list[dict[str, Any]], key: str = "plain_images_per_s") -> dict[str, dict[str, Any]]:
    """For channels_last and cudnn_benchmark: the geometric mean, over the rows that differ only
    in that flag, of images/s with it on over images/s with it off, and a verdict."""
    out: dict[str, dict[str, Any]] = {}
    base = [r for r in rows if r.get("augment", "none") == "none" and r.get(key)]
    for flag in ("channels_last", "cudnn_benchmark"):
        ratios = []
        for on in (r for r in base if r[flag]):
            twin = [
                o
                for o in base
                if not o[flag] and all(o[f] == on[f] for f in ("channels_last", "cudnn_benchmark") if f != flag)
            ]
            if twin:
                ratios.append(on[key] / twin[0][key])
        if not ratios:
            continue
        speedup = geomean(ratios)
        verdict = "helps" if speedup > 1 + FLAG_MARGIN else "hurts" if speedup < 1 - FLAG_MARGIN else "no clear effect"
        out[flag] = {"speedup": speedup, "pairs": len(ratios), "verdict": verdict}
    return out


def run_throughput(device: torch.device, sizes: Sizes, data_dir: Path, norm: str) -> dict[str, Any]:
    """Step 4: trial vs plain loop, per channels_last x cudnn.benchmark combination."""
    cuda = device.type == "cuda"
    combos = [(cl, bm) for cl in (False, True) for bm in ((False, True) if cuda else (False,))]
    base_cfg = throughput_config(data_dir, sizes, device, norm, augment="none")
    data = load_dataset("imagefolder", data_dir=data_dir, device=device)
    rows = []
    for channels_last, benchmark in combos:
        with cudnn_benchmark(benchmark):
            trial = trial_images_per_s(base_cfg, channels_last)
            loop = plain_loop(base_cfg, data, device, channels_last)
            loop(0)  # warm-up (cuDNN's autotuning with benchmark on)
            plain = [loop(seed) for seed in range(1, sizes.plain_epochs + 1)]
        plain_ips = statistics.median(plain)
        rows.append(
            {
                "channels_last": channels_last,
                "cudnn_benchmark": benchmark,
                "augment": "none",
                "trial_images_per_s": trial["images_per_s"],
                "plain_images_per_s": plain_ips,
                "trial_over_plain": trial["images_per_s"] / plain_ips,
                "trial_per_epoch": trial["per_epoch"],
                "plain_per_epoch": plain,
            }
        )
    if cuda:  # the augmentation every CIFAR trial uses (random numbers drawn on the CPU, then copied)
        aug = trial_images_per_s(throughput_config(data_dir, sizes, device, norm, augment="crop_flip"), False)
        rows.append(
            {
                "channels_last": False,
                "cudnn_benchmark": False,
                "augment": "crop_flip",
                "trial_images_per_s": aug["images_per_s"],
                "plain_images_per_s": None,
                "trial_over_plain": None,
                "trial_per_epoch": aug["per_epoch"],
                "plain_per_epoch": [],
            }
        )
    return {
        "device": str(device),
        "model": "resnet20",
        "norm": norm,
        "batch_size": sizes.batch_size,
        "train_images": len(data.train_x),
        "image_shape": list(data.train_x.shape[1:]),
        "data_dir": str(data_dir),
        "trial_epochs": sizes.trial_epochs,
        "plain_epochs": sizes.plain_epochs,
        "rows": rows,
        "effects_plain": flag_effects(rows, "plain_images_per_s"),
        "effects_trial": flag_effects(rows, "trial_images_per_s"),
        "ok": True,
    }


# --------------------------------------------------------------------------- step 5: search
def search_space(
    name: str,
    *,
    gpu: float,
    cpu: int,
    data_dir: Path,
    epochs: int,
    train_subset: int,
    test_subset: int,
    batch_size: int,
    trials: int,
    norm: str,
) -> dict[str, Any]:
    """The search file's content: ``trials`` ResNet-20 trials (a grid over seeds), device auto."""
    return {
        "name": name,
        "description": f"gpu_check: {trials} ResNet-20 trials at gpu {gpu:g} each",
        "fixed": {
            "dataset": "imagefolder",
            "data_dir": str(Path(data_dir).resolve()),
            "augment": "none",
            "train_subset": train_subset,
            "test_subset": test_subset,
            "model": "resnet20",
            "norm": norm,
            "regime": "standard",
            "epochs": epochs,
            "batch_size": batch_size,
            "eval_batch_size": max(2, min(128, test_subset)),
            "epoch_adv_samples": max(2, min(128, test_subset)),
            "final_adv_samples": max(2, min(128, test_subset)),
            **EVAL,
        },
        "grid": {"seed": list(range(trials))},
        "search": {"algorithm": "grid", "num_samples": 1, "metric": "clean_acc", "mode": "max", "scheduler": "fifo"},
        "resources": {"cpu": cpu, "gpu": gpu},
        "max_failures": 0,
        "checkpoint": {"every": epochs, "keep": 1},
    }


def search_name(gpu: float) -> str:
    return f"gpucheck-gpu{gpu:g}".replace(".", "")


def write_search_file(path: Path, space: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def validate_search_file(path: Path) -> dict[str, Any]:
    """The file as ``normlab submit`` reads it (its own loader): name, trial count, resources."""
    from orchestrator.searchfile.load import load_space

    space, _ = load_space(str(path))
    return {"name": space.name, "trials": len(space.grid["seed"].values), "resources": space.resources.model_dump()}


def read_trial_results(storage: Path, name: str) -> list[list[dict[str, Any]]]:
    """Every trial's Ray Tune results (its ``result.json`` lines) of the newest search ``name`` in ``storage``."""
    runs = sorted(storage.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return []
    trials = []
    for result in sorted(runs[-1].glob("*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(rows)
    return trials


def trial_span(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(start, end) of one trial from its Ray results: it ended at its last report's ``timestamp``
    (whole seconds) and had run ``time_total_s`` by then."""
    last = rows[-1]
    end = float(last["timestamp"])
    return end - float(last["time_total_s"]), end


def search_rate(spans: list[tuple[float, float]], wall_s: float | None = None) -> dict[str, Any]:
    """Trials per hour of a search: from the trials' spans (first start to last end) and, when
    given, from the whole command's wall clock; and how many trials ran at once on average."""
    figures: dict[str, Any] = {"trials": len(spans), "wall_s": wall_s}
    figures["trials_per_hour_wall"] = len(spans) * 3600 / wall_s if wall_s and spans else None
    if not spans:
        return {**figures, "makespan_s": None, "trials_per_hour": None, "mean_trial_s": None, "concurrency": None}
    makespan = max(end for _, end in spans) - min(start for start, _ in spans)
    busy = sum(end - start for start, end in spans)
    return {
        **figures,
        "makespan_s": makespan,
        "trials_per_hour": len(spans) * 3600 / makespan if makespan > 0 else None,
        "mean_trial_s": busy / len(spans),
        "concurrency": busy / makespan if makespan > 0 else None,
    }


def packing_speedup(searches: dict[str, dict[str, Any]]) -> float | None:
    """Trials per hour with the smallest share over trials per hour with the largest."""
    rates = {float(k): v.get("trials_per_hour") for k, v in searches.items()}
    lo, hi = min(rates), max(rates)
    if lo == hi or not rates[lo] or not rates[hi]:
        return None
    return rates[lo] / rates[hi]


def trial_devices(tracking_uri: str) -> dict[str, int]:
    """How many trial runs in the tracking store ran on each device (MLflow tag ``normlab.device``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, max_results=1000) if ids else []
    return dict(Counter(r.data.tags["normlab.device"] for r in runs if "normlab.device" in r.data.tags))


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "RAY_ADDRESS"))}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a local Ray on 127.0.0.1 only
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_in_group(cmd: list[str], *, cwd: Path, env: dict[str, str], stream: Any, timeout_s: float) -> int | None:
    """Run ``cmd`` in a process group of its own; on timeout, SIGINT the group, then SIGKILL it.
    Returns the exit status, or None after a timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                break
        return None


def run_search(
    workdir: Path, space: dict[str, Any], log: Path, timeout_s: float, *, check_devices: bool = True
) -> dict[str, Any]:
    """``normlab submit`` of ``space`` with its own storage and tracking store in ``workdir``; its
    trials per hour from Ray's results."""
    space_file = write_search_file(workdir / "space.yaml", space)
    storage, tracking = workdir / "ray", f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "submit", str(space_file)]
    cmd += ["--storage-path", str(storage), "--tracking-uri", tracking]
    started = time.perf_counter()
    with log.open("w") as stream:
        rc = run_in_group(cmd, cwd=workdir, env=_subprocess_env(), stream=stream, timeout_s=timeout_s)
    wall = time.perf_counter() - started
    trials = read_trial_results(storage, space["name"])
    figures: dict[str, Any] = {
        "gpu": space["resources"]["gpu"],
        "cpu": space["resources"]["cpu"],
        "returncode": rc,
        "log": str(log),
        "finished": sum(1 for rows in trials if rows[-1].get("done") or "final_clean_acc" in rows[-1]),
        **search_rate([trial_span(rows) for rows in trials], wall),
    }
    per_trial = [[r["train_images_per_s"] for r in rows if "train_images_per_s" in r] for rows in trials]
    ips = [median_after_first(v) for v in per_trial if v]
    figures["median_trial_train_images_per_s"] = statistics.median(ips) if ips else None
    if check_devices:
        try:
            figures["devices"] = trial_devices(tracking)
        except Exception as exc:
            figures["devices_error"] = error_text(exc)
    expected = len(space["grid"]["seed"])
    want_device = "cuda" if space["resources"]["gpu"] > 0 else "cpu"
    figures["ok"] = (
        rc == 0
        and figures["trials"] == expected
        and (not check_devices or figures.get("devices") == {want_device: expected})
    )
    if rc is None:
        figures["error"] = f"timed out after {timeout_s:.0f} s (with a gpu share: does Ray see the GPU?)"
    return figures


def cpus_per_trial() -> int:
    """2 CPUs per trial where four trials at 2 fit (8+ cores), else 1."""
    return 2 if default_threads() >= 8 else 1


def run_searches(
    workdir: Path,
    out: Path,
    sizes: Sizes,
    data_dir: Path,
    norm: str,
    *,
    run: bool,
    shares: Sequence[float] = SEARCH_SHARES,
    trials: int = SEARCH_TRIALS,
) -> dict[str, Any]:
    """Step 5: write (and validate) one search file per GPU share; run them when ``run``."""
    searches: dict[str, dict[str, Any]] = {}
    for gpu in shares:
        name = search_name(gpu)
        space = search_space(
            name,
            gpu=gpu,
            cpu=cpus_per_trial(),
            data_dir=data_dir,
            epochs=sizes.search_epochs,
            train_subset=sizes.search_train_subset,
            test_subset=min(256, sizes.test_images),
            batch_size=sizes.batch_size,
            trials=trials,
            norm=norm,
        )
        folder = workdir / name
        path = write_search_file(folder / "space.yaml", space)
        figures: dict[str, Any] = {"file": str(path), "validated": validate_search_file(path)}
        if run:
            figures.update(run_search(folder, space, out / f"search_{name}.log", sizes.search_timeout_s))
        searches[f"{gpu:g}"] = figures
    result: dict[str, Any] = {"searches": searches, "ran": run}
    if run:
        result["packing_speedup"] = packing_speedup(searches)
        result["ok"] = all(s["ok"] for s in searches.values())
    else:
        result["ok"] = all(s["validated"]["trials"] == trials for s in searches.values())
    return result


# --------------------------------------------------------------------------- summary
def _fmt(value: Any, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _verdict(step: dict[str, Any]) -> str:
    return "ok" if step.get("ok") else "FAILED"


def summary_rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(step, what, figure, verdict) rows from the JSON's figures."""
    rows: list[tuple[str, str, str, str]] = []
    steps = figures.get("steps", {})
    for name, step in steps.items():
        if "not_run" in step:
            rows.append((name, "", "", f"not run: {step['not_run']}"))
        elif "error" in step:
            rows.append((name, "error", step["error"].splitlines()[0][:70], "FAILED"))
    if "tests" in steps and "not_run" not in steps["tests"]:
        t = steps["tests"]
        counts = f"{_fmt(t.get('passed'))} passed, {_fmt(t.get('failures'))} failed, {_fmt(t.get('errors'))} errors, {_fmt(t.get('skipped'))} skipped"
        if "tests" in t:  # the JUnit report's counts
            rows.append(("tests", "pytest -m cuda", counts, _verdict(t)))
    amp = steps.get("amp", {})
    if "checks" in amp:
        scales = amp.get("scales") or []
        scaler = f"on, scale {_fmt(scales[-1], 'g')}" if scales else "off"
        rows.append(
            ("amp", "autocast dtype, scaler", f"{','.join(amp['train_dtypes']) or '-'}, {scaler}", _verdict(amp))
        )
        rows.append(
            (
                "amp",
                "clean acc amp / fp32",
                f"{_fmt(amp['amp_clean_acc'], '.3f')} / {_fmt(amp['fp32_clean_acc'], '.3f')}",
                "",
            )
        )
        bad = [k for k, v in amp["checks"].items() if not v]
        if bad:
            rows.append(("amp", "failed checks", ", ".join(bad), "FAILED"))
    norms = steps.get("norms", {})
    if "shapes" in norms:
        rows.append(
            ("norms", f"RobustNorm / BatchNorm2d ({norms['device']})", _fmt(norms["geomean_rn_over_bn"], ".2f"), "info")
        )
        rows.append(("norms", "straightforward / RobustNorm", _fmt(norms["geomean_st_over_rn"], ".2f"), "info"))
    tp = steps.get("throughput", {})
    for r in tp.get("rows", []):
        what = f"cl={'on' if r['channels_last'] else 'off'} bench={'on' if r['cudnn_benchmark'] else 'off'}"
        what += f" aug={r['augment']}" if r["augment"] != "none" else ""
        figure = f"trial {_fmt(r['trial_images_per_s'])} / plain {_fmt(r['plain_images_per_s'])} img/s"
        rows.append(("throughput", what, figure, f"ratio {_fmt(r['trial_over_plain'], '.2f')}"))
    for loop in ("plain", "trial"):
        for flag, e in tp.get(f"effects_{loop}", {}).items():
            verdict = e["verdict"] if figures.get("cuda", True) else "(tiny CPU run: a code-path check, not a measure)"
            rows.append(("throughput", f"{flag} ({loop})", f"x{e['speedup']:.2f}", verdict))
    search = steps.get("search", {})
    for share, s in search.get("searches", {}).items():
        if "trials_per_hour" in s:
            figure = (
                f"{s['trials']} trials, {_fmt(s['trials_per_hour'])} /h ({_fmt(s['trials_per_hour_wall'])} /h wall)"
            )
            rows.append(("search", f"gpu {share}", figure, _verdict(s)))
        else:
            rows.append(("search", f"gpu {share} file", f"{s['validated']['trials']} trials, valid", "written"))
    if search.get("packing_speedup") is not None:
        rows.append(("search", "packing speedup", f"x{search['packing_speedup']:.2f}", "trials/h"))
    return rows


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("step", "what", "figure", "verdict")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"folder for gpu_check.json and logs (default {DEFAULT_OUT})"
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs of every step")
    parser.add_argument(
        "--data-dir", type=Path, help="an imagefolder tree of 32x32 images for steps 4-5 (default: generated)"
    )
    parser.add_argument(
        "--norm", default="batchnorm", choices=NORMS.names(), help="norm layer of the trials (default batchnorm)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's own with CUDA; 1 without, where the CPU part is a code-path "
        "check and a shared machine's load makes several threads many times slower)",
    )
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=STEPS, metavar="STEP", help=f"steps to leave out: {', '.join(STEPS)}"
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def run_step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"--- {name}", flush=True)
    started = time.perf_counter()
    try:
        figures = fn()
    except Exception as exc:
        figures = {"error": error_text(exc), "ok": False}
    figures.setdefault("seconds", time.perf_counter() - started)
    print(f"    {'ok' if figures.get('ok') else 'FAILED'} ({figures['seconds']:.0f} s)", flush=True)
    if "error" in figures:
        print(f"    {figures['error'].splitlines()[0]}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    sizes = sizes_for(cuda, args.quick)
    threads = args.threads or (None if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    print(
        f"torch {torch.__version__} (CUDA build {torch.version.cuda}), {torch.get_num_threads()} thread(s), "
        f"CPU: {cpu_model()} ({os.cpu_count()} cores), load average {load_before:.2f}"
    )
    info = None
    if cuda:
        info = gpu_info(device)
        print(f"GPU: {info['name']} ({info['memory_gib']} GiB, capability {info['capability']}), cuDNN {info['cudnn']}")
    else:
        print("no CUDA on this machine: running the CPU part only (tiny sizes; the GPU figures need a GPU)")
    steps: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        data_dir = args.data_dir.resolve() if args.data_dir else work / "cifar_shape"

        def data() -> Path:
            if not args.data_dir and not data_dir.exists():
                write_cifar_shape_folder(data_dir, sizes.train_images, sizes.test_images)
            return data_dir

        plan: dict[str, Callable[[], dict[str, Any]]] = {
            "tests": lambda: run_cuda_tests(args.out, sizes.tests_timeout_s),
            "amp": lambda: run_amp_check(device, sizes, args.norm),
            "norms": lambda: run_norms(device, sizes),
            "throughput": lambda: run_throughput(device, sizes, data(), args.norm),
            "search": lambda: run_searches(work, args.out, sizes, data(), args.norm, run=cuda),
        }
        for name, fn in plan.items():
            if name in args.skip:
                steps[name] = {"not_run": "--skip", "ok": True}
            elif name == "tests" and not cuda:
                steps[name] = {"not_run": "without CUDA the cuda-marked tests all skip", "ok": True}
            else:
                steps[name] = run_step(name, fn)
                if cuda:
                    torch.cuda.empty_cache()  # the searches' trials want the GPU's memory
    ok = all(step.get("ok") for step in steps.values())
    seconds = time.perf_counter() - started
    figures = {
        "cuda": cuda,
        "device": str(device),
        "quick": args.quick,
        "gpu": info,
        "sizes": asdict(sizes),
        "steps": steps,
        "ok": ok,
        "load_average": {"before": load_before, "after": load_average()},
        "seconds": seconds,
    }
    print()
    print(format_table(summary_rows(figures)))
    print()
    print(f"{'every check passed' if ok else 'SOME CHECKS FAILED'} ({seconds:.0f} s)")
    write_json(args.out / "gpu_check.json", "gpu_check", **figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
