"""Model registry: every model takes a ``norm_layer`` factory (timm style).

A norm layer is passed in as a callable ``norm_layer(num_channels) -> nn.Module``
(``nn.BatchNorm2d``, ``functools.partial(RobustNorm, power=0.2)``, ``lambda c:
nn.Identity()``, ...). Blocks only ever call ``norm_layer(channels)`` on 4-d conv
feature maps; no model knows which norm it was given.

``MODELS`` maps a name to a builder ``(num_classes, in_channels, norm_layer) ->
nn.Module``; adding a model is one entry. ``create_model`` builds one by name and,
given a dataset's mean and std, prepends ``InputNormalization`` so that the model
takes inputs in [0, 1] pixel space (where attacks run).

All models accept any number of input channels and any input size >= 8x8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainables.registry import Registry

NormLayer = Callable[[int], nn.Module]
"""A norm layer factory: ``norm_layer(num_channels)`` returns a module for (N, C, H, W)."""

ModelBuilder = Callable[[int, int, NormLayer], nn.Module]
"""``builder(num_classes, in_channels, norm_layer)`` returns an ``nn.Module``."""


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a norm layer follows)."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias, used for projection shortcuts."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_out, relu) convs, zero linear bias; norm layers untouched."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


class Classifier(nn.Module):
    """``features`` -> global average pool -> flatten -> linear ``head``."""

    def __init__(self, features: nn.Module, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def conv_norm_relu(in_ch: int, out_ch: int, norm_layer: NormLayer, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_ch, out_ch, stride), norm_layer(out_ch), nn.ReLU(inplace=True))


# ----------------------------------------------------------------------------- cnn


def small_cnn(num_classes: int, in_channels: int, norm_layer: NormLayer) -> nn.Module:
    """Three conv-norm-relu layers (32, 64/2, 128/2 channels/stride), pool, linear."""
    features = nn.Sequential(
        conv_norm_relu(in_channels, 32, norm_layer),
        conv_norm_relu(32, 64, norm_layer, stride=2),
        conv_norm_relu(64, 128, norm_layer, stride=2),
    )
    return Classifier(features, 128, num_classes)


# ------------------------------------------------------------------ CIFAR ResNets


class BasicBlock(nn.Module):
    """Post-activation residual block (He et al. 2016) with a projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv3x3(in_ch, out_ch, stride), norm_layer(out_ch)
        self.conv2, self.norm2 = conv3x3(out_ch, out_ch), norm_layer(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def cifar_resnet(depth: int) -> ModelBuilder:
    """Builder for the CIFAR ResNet of the given depth (6n + 2)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    def build(num_classes: int, in_channels: int, norm_layer: NormLayer) -> nn.Module:
        layers: list[nn.Module] = [conv_norm_relu(in_channels, 16, norm_layer)]
        in_ch = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_ch, width, stride if i == 0 else 1, norm_layer))
                in_ch = width
        return Classifier(nn.Sequential(*layers), 64, num_classes)

    build.__name__ = f"resnet{depth}"
    return build


# ------------------------------------------------------- pre-activation networks


class PreActBlock(nn.Module):
    """Pre-activation block: norm-relu-conv twice; 1x1 conv shortcut on the
    pre-activated input when the shape changes (PreAct ResNet and WideResNet)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm_layer(in_ch), conv3x3(in_ch, out_ch, stride)
        self.norm2, self.conv2 = norm_layer(out_ch), conv3x3(out_ch, out_ch)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = conv1x1(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + skip


def preact_net(
    stem: int, stages: Sequence[tuple[int, int, int]], num_classes: int, in_channels: int, norm_layer: NormLayer
) -> nn.Module:
    """Stem conv, stages of ``(width, blocks, stride)`` PreActBlocks, final norm+relu."""
    layers: list[nn.Module] = [conv3x3(in_channels, stem)]
    in_ch = stem
    for width, blocks, stride in stages:
        for i in range(blocks):
            layers.append(PreActBlock(in_ch, width, stride if i == 0 else 1, norm_layer))
            in_ch = width
    layers += [norm_layer(in_ch), nn.ReLU(inplace=True)]
    return Classifier(nn.Sequential(*layers), in_ch, num_classes)


def preact_resnet18(num_classes: int, in_channels: int, norm_layer: NormLayer) -> nn.Module:
    """PreAct ResNet-18 as in Rice et al. (2020)."""
    stages = ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))
    return preact_net(64, stages, num_classes, in_channels, norm_layer)


def wrn28_10(num_classes: int, in_channels: int, norm_layer: NormLayer) -> nn.Module:
    """WideResNet-28-10 (Zagoruyko & Komodakis 2016), no dropout."""
    n, k = (28 - 4) // 6, 10
    stages = ((16 * k, n, 1), (32 * k, n, 2), (64 * k, n, 2))
    return preact_net(16, stages, num_classes, in_channels, norm_layer)


# --------------------------------------------------------------------------- VGG


class HalvingMaxPool(nn.Module):
    """2x2 max-pool along each spatial dim larger than 1; a no-op on a 1x1 map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (2 if x.shape[-2] > 1 else 1, 2 if x.shape[-1] > 1 else 1)
        return x if kernel == (1, 1) else F.max_pool2d(x, kernel)


VGG_CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def vgg(config: str) -> ModelBuilder:
    """Builder for VGG config ``A`` (VGG-11) or ``D`` (VGG-16) with conv-norm-relu."""
    cfg = VGG_CONFIGS[config]

    def build(num_classes: int, in_channels: int, norm_layer: NormLayer) -> nn.Module:
        layers: list[nn.Module] = []
        in_ch = in_channels
        for v in cfg:
            if v == "M":
                layers.append(HalvingMaxPool())
            else:
                layers.append(conv_norm_relu(in_ch, int(v), norm_layer))
                in_ch = int(v)
        return Classifier(nn.Sequential(*layers), in_ch, num_classes)

    build.__name__ = f"vgg_{config}"
    return build


# ---------------------------------------------------------------------- registry

MODELS: Registry[ModelBuilder] = Registry(
    "model",
    {
        "cnn": small_cnn,
        "resnet20": cifar_resnet(20),
        "resnet32": cifar_resnet(32),
        "resnet56": cifar_resnet(56),
        "preact_resnet18": preact_resnet18,
        "vgg11": vgg("A"),
        "vgg16": vgg("D"),
        "wrn28_10": wrn28_10,
    },
)


# ------------------------------------------------------------ input normalization


def _check_mean_std(mean: Sequence[float], std: Sequence[float], in_channels: int | None = None) -> None:
    if len(mean) != len(std):
        raise ValueError(f"mean has {len(mean)} values but std has {len(std)}")
    if in_channels is not None and len(mean) != in_channels:
        raise ValueError(f"mean and std have {len(mean)} values but the model has {in_channels} input channels")
    if any(not float(s) > 0 for s in std):
        raise ValueError(f"every std must be > 0, got {list(std)}")


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers (saved, moved with .to)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        _check_mean_std(mean, std)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    norm_layer: NormLayer,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build model ``name`` from ``MODELS``; with ``mean`` and ``std`` given, return
    ``nn.Sequential(InputNormalization(mean, std), net)`` taking inputs in [0, 1]."""
    builder = MODELS[name]  # unknown name -> UnknownNameError listing the known ones
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None and std is not None:
        _check_mean_std(mean, std, in_channels)
    net = builder(num_classes, in_channels, norm_layer)
    if mean is None or std is None:
        return net
    return nn.Sequential(InputNormalization(mean, std), net)
