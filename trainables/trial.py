"""run_trial(): one trial from config to metrics, resumable from a plain checkpoint dict.

The epoch loop trains with the regime's loss, evaluates clean accuracy and the primary
attack's accuracy every epoch, and after the last epoch measures every attack x eps pair
(and, for norms with statistic modes, the same with the inference batch's statistics,
suffix ``_batchstats``), then, with ``shift_diagnostic``, how far the primary attack shifts
each norm layer's input (``trainables.diagnostics``, metrics ``shift_*``). After each epoch it calls ``on_epoch(epoch, metrics, state)``,
where ``state`` is one plain dict (model, optimizer, scheduler, epoch, RNG states,
config, history) from which ``run_trial(config, checkpoint=state)`` continues exactly:
the same seed gives the same metrics whether or not the trial was interrupted.

``state`` holds live tensors: save it (``torch.save``) inside the callback, do not keep
it. Extra keys a caller adds (e.g. ``mlflow_run_id``) survive a save and a resume.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn
from tqdm.auto import tqdm

from trainables import allocator, profiling
from trainables.attacks import AttackSettings, Perturber, clean_accuracy, robust_accuracy
from trainables.config import TrialConfig
from trainables.data import DEFAULT_AUGMENTATION, TensorData, augment, batch_indices, load_dataset
from trainables.diagnostics import MAX_SHIFT_SAMPLES, measure_shift, shift_metrics
from trainables.failures import NonRetryableError, TrialConfigError
from trainables.metrics import BATCHSTATS, adv_metric, is_final_metric
from trainables.models import create_model
from trainables.norms import norm_layer_factory, stats_mode, stats_mode_layers
from trainables.optim import build_optimizer, build_scheduler
from trainables.problems import Problem, problem_lines, short_repr
from trainables.regimes import REGIMES

CHECKPOINT_FORMAT = "normlab.checkpoint/1"
# fields that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = ("device", "threads")
STATE_KEYS = frozenset({"format", "epoch", "model", "optimizer", "scheduler", "scaler", "rng", "config", "history"})
# the checkpoint dict's structure: key -> (type, required)
STATE_TYPES: dict[str, tuple[type, bool]] = {
    "epoch": (int, True),
    "model": (dict, True),
    "optimizer": (dict, True),
    "scheduler": (dict, True),
    "rng": (dict, True),
    "config": (dict, True),
    "scaler": (dict, False),
    "history": (list, False),
}
RNG_KEYS = ("python", "numpy", "torch")

EpochCallback = Callable[[int, dict[str, float], dict[str, Any]], None]


class NonFiniteLossError(NonRetryableError, FloatingPointError):
    """The training loss became NaN or infinite; the message names epoch and step."""


class CheckpointMismatchError(NonRetryableError, ValueError):
    """A checkpoint was made by a trial with a different configuration."""


class InvalidCheckpointError(CheckpointMismatchError):
    """A checkpoint dict that is not what ``run_trial`` saves: ``name: key: reason`` lines."""

    def __init__(self, name: str, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(problem_lines(name, problems))


@dataclass
class TrialResult:
    """What a finished trial measured: per-epoch history and the final sweep."""

    config: dict[str, Any]
    history: list[dict[str, float]]
    final: dict[str, float]
    eval_batch_size: int
    device: str
    seconds: float
    resumed_from_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for, but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Data order and augmentation of one epoch depend only on (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python's, numpy's and torch's generators, and the CUDA generator of ``device`` when it is
    a GPU (a CPU trial never touches CUDA: on a GPU node it would take a context on GPUs that
    Ray gave other trials)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)


class _Trial:
    """The pieces of one trial, built once from a config."""

    def __init__(self, cfg: TrialConfig, checkpoint: dict[str, Any] | None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.data: TensorData = load_dataset(
            cfg.dataset,
            data_dir=cfg.data_dir,
            download=cfg.download,
            train_subset=cfg.train_subset,
            test_subset=cfg.test_subset,
            device=self.device,
        )
        if len(self.data.train_x) < cfg.batch_size:
            raise TrialConfigError(
                f"batch_size={cfg.batch_size} is larger than the training set ({len(self.data.train_x)})"
            )
        self.model: nn.Module = create_model(
            cfg.model,
            num_classes=self.data.num_classes,
            in_channels=self.data.in_channels,
            norm_layer=norm_layer_factory(cfg.norm, **cfg.norm_options()),
            mean=self.data.mean,
            std=self.data.std,
        ).to(self.device)
        self.regime = REGIMES[cfg.regime]
        params = self.regime.prepare(self.model, cfg, load_init=checkpoint is None)
        self.steps_per_epoch = len(self.data.train_x) // cfg.batch_size
        self.optimizer = build_optimizer(params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.loss_fn = self.regime.make_loss(self.model, cfg)
        self.augment = DEFAULT_AUGMENTATION[cfg.dataset] if cfg.augment == "auto" else cfg.augment
        self.attack_settings = AttackSettings(
            steps=cfg.eval_steps,
            cw_c=cfg.cw_c,
            cw_steps=cfg.cw_steps,
            square_queries=cfg.square_queries,
            num_classes=self.data.num_classes,
            seed=cfg.seed,
        )
        self.stats_layers = stats_mode_layers(self.model)
        # mixed precision: autocast for the training step (adversarial examples included);
        # float16 needs a gradient scaler against underflow, bfloat16 (the CPU's) does not
        self.amp_dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp and self.amp_dtype == torch.float16)

    # --- one epoch of training --------------------------------------------------------
    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        cfg, data = self.cfg, self.data
        self.regime.set_train_mode(self.model)
        gen = _epoch_generator(cfg.seed, epoch)
        batches = batch_indices(len(data.train_x), cfg.batch_size, generator=gen, shuffle=True, drop_last=True)
        losses = torch.zeros(len(batches), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        check_every = 25  # a look at the losses costs a device sync; the first bad step is still found exactly
        bar = tqdm(
            total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress, unit="batch"
        )
        start = time.perf_counter()
        for step, idx in enumerate(batches):
            idx = idx.to(self.device, non_blocking=True)
            x, y = data.train_x[idx], data.train_y[idx]
            if self.augment != "none":
                x = augment(x, self.augment, gen)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=cfg.amp):
                loss, logits = self.loss_fn(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)  # skipped (and the scale lowered) on inf/NaN gradients
            self.scaler.update()
            self.scheduler.step()
            losses[step] = loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            if (step + 1) % check_every == 0 or step + 1 == len(batches):
                self._check_finite(losses[: step + 1], epoch)
                if progress:
                    bar.set_postfix(loss=f"{losses[step].item():.4f}", refresh=False)
            bar.update()
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the epoch's kernels done: images/s measures them
        seconds = time.perf_counter() - start
        seen = len(batches) * cfg.batch_size
        return {
            "train_loss": float(losses.mean()),
            "train_acc": int(correct) / seen,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "train_images_per_s": seen / seconds,
        }

    def _check_finite(self, losses: torch.Tensor, epoch: int) -> None:
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = int(bad[0])
            raise NonFiniteLossError(
                f"non-finite training loss ({losses[step].item()}) at epoch {epoch}, step {step + 1}/{self.steps_per_epoch} "
                f"(regime={self.cfg.regime}, norm={self.cfg.norm}, lr={self.cfg.lr}): lower lr or set grad_clip"
            )

    # --- evaluation -------------------------------------------------------------------
    def _adv_subset(self, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.test_x, self.data.test_y
        return (x, y) if limit is None else (x[:limit], y[:limit])

    def evaluate_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.eval()
        x_adv, y_adv = self._adv_subset(cfg.epoch_adv_samples)
        return {
            "clean_acc": clean_accuracy(self.model, self.data.test_x, self.data.test_y, cfg.eval_batch_size),
            "adv_acc": robust_accuracy(
                self.model, cfg.primary_attack, cfg.primary_eps, x_adv, y_adv, cfg.eval_batch_size, self.attack_settings
            ),
        }

    def _sweep(self, suffix: str, clean_acc: float | None = None) -> dict[str, float]:
        cfg = self.cfg
        x, y = self._adv_subset(cfg.final_adv_samples)
        if clean_acc is None:
            clean_acc = clean_accuracy(self.model, self.data.test_x, self.data.test_y, cfg.eval_batch_size)
        out = {f"final_clean_acc{suffix}": clean_acc}
        for attack in cfg.eval_attacks:
            for eps in cfg.eval_eps:
                out[adv_metric(attack, eps, suffix)] = robust_accuracy(
                    self.model, attack, eps, x, y, cfg.eval_batch_size, self.attack_settings
                )
        out[f"final_adv_acc{suffix}"] = out[adv_metric(cfg.primary_attack, cfg.primary_eps, suffix)]
        return out

    def evaluate_final(self, clean_acc: float | None = None) -> dict[str, float]:
        """Every attack x eps pair; with batch statistics too for norms that have modes;
        then, with ``shift_diagnostic``, the per-layer shift (after the sweep, so turning it
        on leaves the sweep's numbers as they were).

        ``clean_acc``: the model's clean test accuracy if already measured (this epoch).
        """
        self.model.eval()
        final = self._sweep("", clean_acc)
        if self.stats_layers:
            if all(layer.stats_mode == "batch" for layer in self.stats_layers):
                final.update({f"{k}{BATCHSTATS}": v for k, v in list(final.items())})
            else:
                with stats_mode(self.model, "batch"):
                    final.update(self._sweep(BATCHSTATS))
        if self.cfg.shift_diagnostic:
            final.update(self.shift_diagnostic())
        return final

    def shift_diagnostic(self) -> dict[str, float]:
        """``shift_*`` metrics: the primary attack at the primary eps on the first
        ``min(final_adv_samples, MAX_SHIFT_SAMPLES)`` test samples, in the layers' own modes."""
        cfg = self.cfg
        x, y = self._adv_subset(min(cfg.final_adv_samples or MAX_SHIFT_SAMPLES, MAX_SHIFT_SAMPLES))
        perturb = Perturber(self.model, cfg.primary_attack, cfg.primary_eps, self.attack_settings)
        return shift_metrics(measure_shift(self.model, perturb, x, y, cfg.eval_batch_size))

    # --- checkpoints --------------------------------------------------------------------
    def state(self, epoch: int, history: list[dict[str, float]], extra: dict[str, Any]) -> dict[str, Any]:
        return {
            **extra,
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.device),
            "config": self.cfg.model_dump(mode="json"),
            "history": list(history),
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"], self.device)


def _type_name(value: Any) -> str:
    return type(value).__name__


def validate_checkpoint_state(state: Any, name: str = "checkpoint") -> TrialConfig:
    """The configuration of a checkpoint dict that ``run_trial`` can resume from, or an
    ``InvalidCheckpointError`` naming ``name`` and every missing or mistyped entry."""
    if not isinstance(state, dict):
        raise InvalidCheckpointError(name, [("", f"not a normlab checkpoint: a {_type_name(state)}, not a dict")])
    if state.get("format") != CHECKPOINT_FORMAT:
        reason = f"not a normlab checkpoint (format {short_repr(state.get('format'))}, expected {CHECKPOINT_FORMAT!r})"
        raise InvalidCheckpointError(name, [("", reason)])
    problems: list[Problem] = []
    for key, (kind, required) in STATE_TYPES.items():
        if key not in state:
            if required:
                problems.append((key, "missing"))
        elif not isinstance(state[key], kind) or isinstance(state[key], bool):
            problems.append((key, f"should be {kind.__name__}, got {_type_name(state[key])}"))
    if isinstance(state.get("rng"), dict):
        problems += [(f"rng.{key}", "missing") for key in RNG_KEYS if key not in state["rng"]]
    if isinstance(state.get("model"), dict):
        bad = [k for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
        problems += (
            [(f"model.{short_repr(bad[0], 40)}", f"should be a tensor ({len(bad)} entries are not)")] if bad else []
        )
    if isinstance(state.get("optimizer"), dict):
        problems += [
            (f"optimizer.{key}", "missing") for key in ("state", "param_groups") if key not in state["optimizer"]
        ]
    saved = None
    if isinstance(state.get("config"), dict):
        try:
            saved = TrialConfig.model_validate(state["config"])
        except ValidationError as err:
            problems += [
                (f"config.{'.'.join(map(str, e['loc']))}", e["msg"].removeprefix("Value error, ")) for e in err.errors()
            ]
    if saved is not None and isinstance(state.get("epoch"), int) and not 0 <= state["epoch"] <= saved.epochs:
        problems.append(("epoch", f"{short_repr(state['epoch'])} is outside 0..{saved.epochs} (the config's epochs)"))
    if problems or saved is None:
        raise InvalidCheckpointError(name, problems)
    return saved


def check_checkpoint(cfg: TrialConfig, checkpoint: dict[str, Any], name: str = "checkpoint") -> None:
    """Refuse a checkpoint that is malformed (``validate_checkpoint_state``) or that another
    configuration made (device and threads may change)."""
    saved = validate_checkpoint_state(checkpoint, name)
    diff = cfg.differing(saved, ignore=RESUMABLE_CHANGES)
    if diff:
        detail = ", ".join(f"{k}: checkpoint {getattr(saved, k)!r} vs now {getattr(cfg, k)!r}" for k in diff)
        raise CheckpointMismatchError(f"checkpoint was made with a different configuration ({detail})")


def run_trial(
    config: TrialConfig | dict[str, Any],
    on_epoch: EpochCallback | None = None,
    checkpoint: dict[str, Any] | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrialResult:
    """Train and evaluate one trial; resume from ``checkpoint`` when given.

    ``on_epoch(epoch, metrics, state)`` is called after every epoch (1-based); the last
    epoch's metrics include the final sweep (``final_*`` and ``adv_acc_<attack>_eps<eps>``).
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.model_validate(config)
    if checkpoint is not None:
        check_checkpoint(cfg, checkpoint)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    allocator.keep_freed_memory()  # every step reuses the last one's memory instead of faulting it in
    started = time.perf_counter()
    with profiling.span("trial.build"):
        trial = _Trial(cfg, checkpoint)
    history: list[dict[str, float]] = []
    extra: dict[str, Any] = {}
    start_epoch = 1
    if checkpoint is not None:
        trial.restore(checkpoint)
        history = list(checkpoint.get("history", []))
        extra = {k: v for k, v in checkpoint.items() if k not in STATE_KEYS}
        start_epoch = int(checkpoint["epoch"]) + 1
    final: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        with profiling.span("trial.train", epoch=epoch):
            metrics: dict[str, float] = {"epoch": epoch, **trial.train_epoch(epoch, progress)}
        with profiling.span("trial.eval", epoch=epoch):
            metrics.update(trial.evaluate_epoch())
        if epoch == cfg.epochs:
            with profiling.span("trial.final_eval", epoch=epoch):
                final = trial.evaluate_final(clean_acc=metrics["clean_acc"])
            metrics.update(final)
        history.append(metrics)
        if log:
            log(format_epoch(metrics, cfg.epochs))
        if on_epoch:
            on_epoch(epoch, metrics, trial.state(epoch, history, extra))
    if not final:  # resumed from the checkpoint of a trial that had finished: its last epoch measured it
        final = {k: v for k, v in history[-1].items() if is_final_metric(k)} if history else {}
        final = final or trial.evaluate_final()
    return TrialResult(
        config=cfg.model_dump(mode="json"),
        history=history,
        final=final,
        eval_batch_size=cfg.eval_batch_size,
        device=str(trial.device),
        seconds=time.perf_counter() - started,
        resumed_from_epoch=start_epoch - 1,
    )


def format_epoch(m: dict[str, float], epochs: int) -> str:
    """One line of per-epoch metrics."""
    width = len(str(epochs))
    return (
        f"epoch {int(m['epoch']):>{width}}/{epochs}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.4f}  "
        f"clean_acc {m['clean_acc']:.4f}  adv_acc {m['adv_acc']:.4f}  ({m['epoch_seconds']:.1f}s, "
        f"{m['train_images_per_s']:.0f} img/s)"
    )
