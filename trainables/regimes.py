"""Training regimes: which parameters train, and how each batch is perturbed.

A regime is one ``Regime`` entry in ``REGIMES``:

- ``standard``: every parameter, clean cross-entropy.
- ``pgd_at``: every parameter, cross-entropy on PGD examples (Madry et al.).
- ``fgsm_at``: every parameter, cross-entropy on FGSM examples with a random start
  (Wong et al., step 1.25 * eps).
- ``trades``: every parameter, clean cross-entropy + beta * KL(f(x_adv) || f(x))
  (Zhang et al.).
- ``bn_finetune_adv``: start from ``init_from``, train only norm parameters on PGD
  examples (Walter et al.: BN-only adversarial fine-tuning).
- ``bn_only_adv``: random init, everything but norm parameters frozen, norm
  parameters trained on PGD examples (Walter et al.).

Adversarial examples are made with the model in eval mode (``attacks.eval_mode``), so
only the training forward pass updates running statistics, and every module's mode is
restored afterwards. In norm-only regimes the frozen parts stay in eval mode during
training; the norm layers train (their running statistics follow the data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from trainables.attacks import attack_precision, eval_mode, torchattacks_module
from trainables.checkpoints import read_state
from trainables.failures import TrialConfigError
from trainables.norms import is_norm_layer, norm_parameters
from trainables.registry import Registry

if TYPE_CHECKING:
    import torchattacks

    from trainables.config import TrialConfig

# loss_fn(x, y) -> (loss, logits used for the training accuracy)
LossFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _pgd(model: nn.Module, cfg: TrialConfig) -> torchattacks.attack.Attack:
    alpha = cfg.train_alpha or 2.5 * cfg.train_eps / cfg.train_steps
    return torchattacks_module().PGD(model, eps=cfg.train_eps, alpha=alpha, steps=cfg.train_steps, random_start=True)


def _fgsm_rs(model: nn.Module, cfg: TrialConfig) -> torchattacks.attack.Attack:
    return torchattacks_module().FFGSM(model, eps=cfg.train_eps, alpha=cfg.train_alpha or 1.25 * cfg.train_eps)


def clean_loss(model: nn.Module, cfg: TrialConfig) -> LossFn:
    def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    return loss_fn


def adversarial_loss(
    make_attack: Callable[[nn.Module, TrialConfig], torchattacks.attack.Attack],
) -> Callable[[nn.Module, TrialConfig], LossFn]:
    """Cross-entropy on examples from ``make_attack`` (made in eval mode)."""

    def make(model: nn.Module, cfg: TrialConfig) -> LossFn:
        attack = make_attack(model, cfg)

        def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            if cfg.train_eps > 0:
                with eval_mode(model), attack_precision(x.device.type):
                    x = attack(x, y).detach()
            logits = model(x)
            return F.cross_entropy(logits, y), logits

        return loss_fn

    return make


def trades_loss(model: nn.Module, cfg: TrialConfig) -> LossFn:
    """TRADES: CE(f(x), y) + beta * KL(f(x_adv) || f(x)), x_adv maximising the KL term."""
    alpha = cfg.train_alpha or 2.5 * cfg.train_eps / cfg.train_steps
    attack = torchattacks_module().TPGD(model, eps=cfg.train_eps, alpha=alpha, steps=cfg.train_steps)

    def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with eval_mode(model), attack_precision(x.device.type):
            x_adv = attack(x).detach() if cfg.train_eps > 0 else x
        logits = model(x)
        logits_adv = model(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + cfg.trades_beta * kl, logits

    return loss_fn


@dataclass(frozen=True)
class Regime:
    """A training regime: its loss, and which parameters train from which start."""

    make_loss: Callable[[nn.Module, TrialConfig], LossFn]
    norm_only: bool = False
    from_checkpoint: bool = False

    def set_train_mode(self, model: nn.Module) -> None:
        """Training modes for this regime (norm-only: frozen parts in eval, norms training)."""
        if not self.norm_only:
            model.train()
            return
        model.eval()
        for module in model.modules():
            if is_norm_layer(module):
                module.training = True

    def prepare(self, model: nn.Module, cfg: TrialConfig, load_init: bool = True) -> list[nn.Parameter]:
        """Load the starting weights (unless resuming), freeze what does not train; return what does."""
        if self.from_checkpoint and load_init:
            load_initial_weights(model, cfg.init_from)
        if not self.norm_only:
            return [p for p in model.parameters() if p.requires_grad]
        trainable = {id(p) for _, p in norm_parameters(model)}
        if not trainable:
            raise ValueError("this regime trains only norm parameters, but the model has none")
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        return [p for p in model.parameters() if p.requires_grad]


REGIMES: Registry[Regime] = Registry(
    "regime",
    {
        "standard": Regime(clean_loss),
        "pgd_at": Regime(adversarial_loss(_pgd)),
        "fgsm_at": Regime(adversarial_loss(_fgsm_rs)),
        "trades": Regime(trades_loss),
        "bn_finetune_adv": Regime(adversarial_loss(_pgd), norm_only=True, from_checkpoint=True),
        "bn_only_adv": Regime(adversarial_loss(_pgd), norm_only=True),
    },
)


def load_initial_weights(model: nn.Module, path: str | None) -> None:
    """Load model weights from a normlab checkpoint (``{"model": ...}``) or a bare state dict."""
    if not path:
        raise TrialConfigError("init_from is not set")
    try:
        state = read_state(path, f"init_from={path}")
    except (ValueError, FileNotFoundError) as exc:  # corrupt or missing: the same on every retry
        raise TrialConfigError(f"init_from={path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise TrialConfigError(f"init_from={path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # the same on every retry
        raise TrialConfigError(f"init_from={path} does not fit this model (same model and norm needed): {exc}") from exc
