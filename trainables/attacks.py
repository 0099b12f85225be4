"""Attack registry over torchattacks, and robust evaluation.

Attacks run in [0, 1] pixel space (the model normalizes its own input). torchattacks
puts the whole model in eval mode while attacking and calls a blanket ``model.train()``
afterwards when the model was training; ``eval_mode`` instead records every module's
own ``training`` flag and restores exactly those flags, so frozen parts of BN-only
regimes keep their modes and no attack updates running statistics.

Robust evaluation refuses to run on a model left in training mode (RobustBench's rule)
and splits the data into near-equal batches (``eval_batches``), because batch-statistics
evaluation depends on batch size and composition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainables.data import eval_batches
from trainables.registry import Registry

if TYPE_CHECKING:
    import torchattacks


def torchattacks_module():  # noqa: ANN201
    """torchattacks, imported on first use: it pulls in scipy.stats (seconds), which reading
    or validating a configuration never needs."""
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - install-time problem
        raise ImportError(
            "torchattacks is missing: install it with `pip install --no-deps torchattacks==3.5.1` "
            "(--no-deps: its requests pin conflicts with MLflow)"
        ) from exc
    return torchattacks


@dataclass(frozen=True)
class AttackSettings:
    """The attack knobs of a trial (from ``TrialConfig``), shared by every attack."""

    steps: int = 10
    cw_c: float = 1.0
    cw_steps: int = 50
    square_queries: int = 1000
    num_classes: int = 10
    seed: int = 0


@dataclass(frozen=True)
class AttackEntry:
    """How to build one attack at budget ``eps``.

    ``min_norm`` attacks (CW) search for the smallest perturbation rather than staying
    inside a budget: an example counts as adversarial at ``eps`` only if its L2
    perturbation is at most ``eps``.
    """

    build: Callable[[nn.Module, float, AttackSettings], torchattacks.attack.Attack]
    norm: str = "Linf"
    min_norm: bool = False


ATTACKS: Registry[AttackEntry] = Registry(
    "attack",
    {
        "fgsm": AttackEntry(lambda m, eps, s: torchattacks_module().FGSM(m, eps=eps)),
        "pgd": AttackEntry(
            lambda m, eps, s: torchattacks_module().PGD(
                m, eps=eps, alpha=2.5 * eps / s.steps, steps=s.steps, random_start=True
            )
        ),
        "pgd_l2": AttackEntry(
            lambda m, eps, s: torchattacks_module().PGDL2(
                m, eps=eps, alpha=2.5 * eps / s.steps, steps=s.steps, random_start=True
            ),
            norm="L2",
        ),
        "cw": AttackEntry(
            lambda m, eps, s: torchattacks_module().CW(m, c=s.cw_c, kappa=0.0, steps=s.cw_steps, lr=0.01),
            norm="L2",
            min_norm=True,
        ),
        "square": AttackEntry(
            lambda m, eps, s: torchattacks_module().Square(
                m, norm="Linf", eps=eps, n_queries=s.square_queries, seed=s.seed
            )
        ),
        "autoattack": AttackEntry(
            lambda m, eps, s: torchattacks_module().AutoAttack(
                m, norm="Linf", eps=eps, version="standard", n_classes=s.num_classes, seed=s.seed
            )
        ),
    },
)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode inside the block; restore each module's own flag after."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in saved:
            module.training = flag  # not .train(flag): that would recurse into children


def module_modes(model: nn.Module) -> dict[str, bool]:
    """``{module name: training flag}``, to compare modes before and after."""
    return {name: m.training for name, m in model.named_modules()}


@contextmanager
def attack_precision(device_type: str) -> Iterator[None]:
    """Full precision for making adversarial examples under float16 autocast: torchattacks takes
    the gradient of an unscaled mean loss, and float16 input gradients (about 1/batch each)
    underflow to 0, so a sign-based attack would stop moving. bfloat16 has float32's range and
    keeps autocast; outside autocast this does nothing."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16:
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


class Perturber:
    """One attack at one budget against one model: ``perturber(x, y) -> x_adv``."""

    def __init__(self, model: nn.Module, attack: str, eps: float, settings: AttackSettings) -> None:
        self.entry = ATTACKS[attack]
        self.eps = eps
        self.model = model
        self.attack = self.entry.build(model, eps, settings)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.eps == 0:
            return x
        with eval_mode(self.model):
            x_adv = self.attack(x, y).detach()
        if self.entry.min_norm:
            within = (x_adv - x).flatten(1).norm(dim=1) <= self.eps + 1e-6
            x_adv = torch.where(within.view(-1, *([1] * (x.dim() - 1))), x_adv, x)
        return x_adv


def _refuse_training_mode(model: nn.Module) -> None:
    training = [name or "(model)" for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            "robust evaluation needs the model in eval mode (call model.eval()); "
            f"modules in training mode: {', '.join(training[:5])}{' ...' if len(training) > 5 else ''}"
        )


@torch.no_grad()
def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Accuracy on (x, y) in near-equal batches of at most ``batch_size``."""
    _refuse_training_mode(model)
    correct = sum(int((model(x[s]).argmax(1) == y[s]).sum()) for s in eval_batches(len(x), batch_size))
    return correct / len(x)


def robust_accuracy(
    model: nn.Module, attack: str, eps: float, x: Tensor, y: Tensor, batch_size: int, settings: AttackSettings
) -> float:
    """Accuracy on ``attack``-perturbed (x, y) at budget ``eps``, batch by batch."""
    _refuse_training_mode(model)
    perturb = Perturber(model, attack, eps, settings)
    correct = 0
    for s in eval_batches(len(x), batch_size):
        x_adv = perturb(x[s], y[s])
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y[s]).sum())
    return correct / len(x)
