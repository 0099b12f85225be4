"""Datasets as in-memory tensors, batched on-device augmentation, and batch splitting.

Every dataset is loaded whole into a ``TensorData``: images are float32 in [0, 1] with
shape (N, C, H, W), labels are int64. Normalization by the dataset's per-channel mean
and std happens inside the model, so attacks work in pixel space ([0, 1], epsilons in
pixel units). Augmentation runs on whole batches on the trial's device; its random
numbers come from a CPU ``torch.Generator`` so a seed reproduces it on any device.

Dataset names (``DATASETS``): ``digits`` (scikit-learn's bundled 8x8 digits, needs no
files: the offline default), ``synthetic`` (generated, needs no files), ``mnist``,
``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn`` (torchvision, read from
``data_dir``, downloaded only when asked) and ``imagefolder`` (any
``data_dir/train/<class>/*`` + ``data_dir/test/<class>/*`` tree of images).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.registry import Registry

# Seeds of the fixed splits and subsets: independent of any trial's seed, so every trial
# of a search sees the same data.
SPLIT_SEED = 0
SUBSET_SEED = 0
SYNTHETIC_SEED = 0
TEST_ORDER_SEED = 0

# Smallest std reported for a channel, so a constant channel cannot divide by zero.
MIN_STD = 1e-6


@dataclass
class TensorData:
    """A whole dataset as tensors: images float32 in [0, 1] (N, C, H, W), labels int64.

    ``mean`` and ``std`` are per channel, computed from ``train_x`` (population std over
    N, H and W) when not given.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.ndim != 4 or x.dtype != torch.float32:
                raise ValueError(f"{split} images must be float32 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.ndim != 1 or y.dtype != torch.int64 or len(y) != len(x):
                raise ValueError(
                    f"{split} labels must be int64 (N,) matching {len(x)} images, got {y.dtype} {tuple(y.shape)}"
                )
        if self.test_x.shape[1:] != self.train_x.shape[1:]:
            raise ValueError(
                f"train images are {tuple(self.train_x.shape[1:])}, test images {tuple(self.test_x.shape[1:])}"
            )
        if len(self.classes) != self.num_classes:
            raise ValueError(f"num_classes={self.num_classes} but {len(self.classes)} class names")
        if not self.mean or not self.std:
            self.mean, self.std = channel_mean_std(self.train_x)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    def to(self, device: str | torch.device) -> TensorData:
        """A copy whose four tensors live on ``device`` (no copy for tensors already there)."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )


def channel_mean_std(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of images (N, C, H, W), computed in float64."""
    x64 = x.detach().to("cpu", torch.float64)
    std, mean = torch.std_mean(x64, dim=(0, 2, 3), correction=0)
    return tuple(mean.tolist()), tuple(max(s, MIN_STD) for s in std.tolist())


def _from_uint8(images: object) -> Tensor:
    """uint8 array or tensor -> float32 tensor in [0, 1]."""
    return torch.as_tensor(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)


def _labels(labels: object) -> Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64)


# --------------------------------------------------------------------------- loaders
Loader = Callable[[Path | None, bool], TensorData]


def _load_digits(data_dir: Path | None, download: bool) -> TensorData:
    """scikit-learn's bundled 8x8 digits (1797 images), split 1437 / 360 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=360, stratify=digits.target, random_state=SPLIT_SEED
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return TensorData(x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, [str(i) for i in range(10)])


def _load_synthetic(data_dir: Path | None, download: bool) -> TensorData:
    """Generated 10-class 3x16x16 images: a class colour plus a class texture, with noise.

    Class c has a colour offset and a tinted cosine grating (5 orientations x 2
    frequencies). A sample is mid-grey + its class colour + per-sample colour jitter +
    the grating at a random phase and contrast + pixel noise, clipped to [0, 1]. A small
    CNN learns it to over 90% in a few epochs; a nearest-class-mean classifier, which
    only sees the (overlapping) colours since the random-phase gratings average out,
    scores about 45%.
    """
    num_classes, n_train, n_test, size = 10, 2000, 500, 16
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    colors = 0.1 * (2 * torch.rand(num_classes, 3, generator=g) - 1)
    tints = 0.5 + torch.rand(num_classes, 3, generator=g)
    angles = (torch.arange(num_classes) % 5) * math.pi / 5
    freqs = torch.where(torch.arange(num_classes) < 5, 1 / 8, 1 / 4)  # cycles per pixel
    v, u = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
        along = u * torch.cos(angles[y])[:, None, None] + v * torch.sin(angles[y])[:, None, None]
        wave = torch.cos(2 * math.pi * freqs[y, None, None] * along + phase)  # (n, H, W)
        color = colors[y] + 0.05 * torch.randn(n, 3, generator=g)
        contrast = 0.15 * (0.5 + torch.rand(n, 1, generator=g)) * tints[y]
        x = 0.5 + color[:, :, None, None] + contrast[:, :, None, None] * wave[:, None]
        x = x + 0.15 * torch.randn(n, 3, size, size, generator=g)
        return x.clamp_(0.0, 1.0), y

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    return TensorData(train_x, train_y, test_x, test_y, num_classes, [f"class{i}" for i in range(num_classes)])


def _require_dir(name: str, data_dir: Path | None) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir: the folder that holds (or will hold) its files")
    return Path(data_dir).expanduser()


def _torchvision_loader(name: str, class_name: str) -> Loader:
    """A loader for one torchvision dataset, reading its raw arrays straight to tensors."""

    def load(data_dir: Path | None, download: bool) -> TensorData:
        import torchvision.datasets as tvd

        root = _require_dir(name, data_dir)
        cls = getattr(tvd, class_name)
        splits = []
        for train in (True, False):
            split_arg = {"split": "train" if train else "test"} if class_name == "SVHN" else {"train": train}
            try:
                ds = cls(root=str(root), download=download, **split_arg)
            except RuntimeError as err:
                if download:
                    raise
                raise FileNotFoundError(
                    f"dataset {name!r}: files not found (or corrupted) under data_dir {str(root)!r}; "
                    "pass download=true to download them there, or fix data_dir"
                ) from err
            if class_name == "SVHN":  # (N, 3, H, W) already; digit 0 is label 0
                x, y = _from_uint8(ds.data), _labels(ds.labels)
            elif class_name in ("CIFAR10", "CIFAR100"):  # (N, H, W, 3)
                x, y = _from_uint8(ds.data).permute(0, 3, 1, 2).contiguous(), _labels(ds.targets)
            else:  # MNIST family: (N, H, W)
                x, y = _from_uint8(ds.data).unsqueeze(1), _labels(ds.targets)
            splits += [x, y]
        classes = [str(c) for c in getattr(ds, "classes", range(10))]
        return TensorData(*splits, num_classes=len(classes), classes=classes)

    load.__name__ = f"_load_{name}"
    load.__doc__ = f"torchvision's {class_name}, read from data_dir."
    return load


# Formats torchvision.io decodes; a few more go through PIL.
_TV_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
_PIL_IMAGE_SUFFIXES = {".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
IMAGE_SUFFIXES = _TV_IMAGE_SUFFIXES | _PIL_IMAGE_SUFFIXES


def _decode_rgb(path: Path) -> Tensor:
    """One image file -> uint8 (3, H, W)."""
    if path.suffix.lower() in _TV_IMAGE_SUFFIXES:
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(str(path), mode=ImageReadMode.RGB)
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def _class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"imagefolder: no folder {str(split_dir)!r}; data_dir must hold train/<class>/* and test/<class>/*"
        )
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_imagefolder(data_dir: Path | None, download: bool) -> TensorData:
    """Any data_dir/train/<class>/* + data_dir/test/<class>/* tree, decoded to RGB."""
    root = _require_dir("imagefolder", data_dir)
    classes = _class_folders(root / "train")
    test_classes = _class_folders(root / "test")
    if not classes:
        raise FileNotFoundError(f"imagefolder: no class folders in {str(root / 'train')!r}")
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise ValueError(
            f"imagefolder: train and test class folders differ under {str(root)!r}: "
            f"only in train: {only_train}; only in test: {only_test}"
        )
    first: list[tuple[Path, torch.Size]] = []  # the first image read, to compare sizes with
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec (not
        # a dependency); the warning tells a normlab user nothing actionable.
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        train_x, train_y = _read_split(root / "train", classes, first)
        test_x, test_y = _read_split(root / "test", classes, first)
    return TensorData(train_x, train_y, test_x, test_y, num_classes=len(classes), classes=classes)


def _read_split(split_dir: Path, classes: list[str], first: list[tuple[Path, torch.Size]]) -> tuple[Tensor, Tensor]:
    """Decode split_dir/<class>/* for every class into (images in [0, 1], labels)."""
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(
            p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        for path in files:
            img = _decode_rgb(path)
            if not first:
                first.append((path, img.shape))
            elif img.shape != first[0][1]:
                raise ValueError(
                    f"imagefolder: images differ in size: {first[0][0]} is {_size_str(first[0][1])} but "
                    f"{path} is {_size_str(img.shape)}; resize them to one size first"
                )
            images.append(img)
        labels += [label] * len(files)
    if not images:
        raise FileNotFoundError(
            f"imagefolder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(split_dir)!r}"
        )
    return torch.stack(images).to(torch.float32).div_(255.0), torch.tensor(labels, dtype=torch.int64)


def _size_str(shape: torch.Size) -> str:
    return f"{shape[1]}x{shape[2]} (HxW)"


DATASETS: Registry[Loader] = Registry(
    "dataset",
    {
        "digits": _load_digits,
        "synthetic": _load_synthetic,
        "mnist": _torchvision_loader("mnist", "MNIST"),
        "fashion_mnist": _torchvision_loader("fashion_mnist", "FashionMNIST"),
        "cifar10": _torchvision_loader("cifar10", "CIFAR10"),
        "cifar100": _torchvision_loader("cifar100", "CIFAR100"),
        "svhn": _torchvision_loader("svhn", "SVHN"),
        "imagefolder": _load_imagefolder,
    },
)
# the modules a loader imports when first called (a Ray worker imports them as it starts:
# orchestrator.running.warmup); a dataset missing here only loses that head start
_LOADER_MODULES: dict[str, tuple[str, ...]] = {
    "digits": ("sklearn.datasets", "sklearn.model_selection"),
    "imagefolder": ("PIL.Image", "torchvision.io"),
    **{name: ("torchvision.datasets",) for name in ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")},
}


def loader_modules(name: str) -> tuple[str, ...]:
    """The modules dataset ``name``'s loader imports on its first call (none known: empty)."""
    return _LOADER_MODULES.get(name, ())


def _subset_indices(n: int, k: int, split: str) -> Tensor:
    """The same k of n indices on every call (a fixed-seed permutation's first k, sorted)."""
    if not 1 <= k <= n:
        raise ValueError(f"{split}_subset must be between 1 and the {split} set's {n} samples, got {k}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))
    return perm[:k].sort().values


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    device: str | torch.device = "cpu",
) -> TensorData:
    """Load dataset ``name`` whole, optionally keep a fixed random subset, move it to ``device``.

    The subsets are the same on every call (and a smaller one is contained in a larger
    one); mean and std are computed from the (subset) training images. The test split
    comes in a fixed shuffled order, so evaluation batches mix classes.
    """
    loader = DATASETS[name]
    data = loader(Path(data_dir).expanduser() if data_dir is not None else None, download)
    tx, ty, vx, vy = data.train_x, data.train_y, data.test_x, data.test_y
    if train_subset is not None:
        idx = _subset_indices(len(tx), train_subset, "train")
        tx, ty = tx[idx], ty[idx]
    if test_subset is not None:
        idx = _subset_indices(len(vx), test_subset, "test")
        vx, vy = vx[idx], vy[idx]
    # A fixed shuffle of the test split: evaluation batches (whose statistics matter for
    # batch-statistics modes) mix classes, and the first k test samples are a random subset.
    order = torch.randperm(len(vx), generator=torch.Generator().manual_seed(TEST_ORDER_SEED))
    vx, vy = vx[order], vy[order]
    if train_subset is not None or test_subset is not None:
        data = TensorData(tx, ty, vx, vy, data.num_classes, data.classes)  # mean/std recomputed
    else:
        data = dataclasses.replace(data, test_x=vx, test_y=vy)
    return data.to(device)


# ---------------------------------------------------------------------- augmentation
Augmentation = Callable[[Tensor, torch.Generator, int | None], Tensor]


def _no_augmentation(x: Tensor, generator: torch.Generator, pad: int | None) -> Tensor:
    return x


def _random_flip(x: Tensor, generator: torch.Generator, pad: int | None) -> Tensor:
    """Flip a random half horizontally (per-sample Bernoulli(0.5))."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _random_crop(x: Tensor, generator: torch.Generator, pad: int | None) -> Tensor:
    """Zero-pad by ``pad`` and cut an H x W window at an independent random offset per sample."""
    n, c, h, w = x.shape
    pad = max(1, h // 8) if pad is None else pad
    if pad < 0:
        raise ValueError(f"crop pad must be >= 0, got {pad}")
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _random_crop_flip(x: Tensor, generator: torch.Generator, pad: int | None) -> Tensor:
    return _random_flip(_random_crop(x, generator, pad), generator, pad)


AUGMENTATIONS: Registry[Augmentation] = Registry(
    "augmentation",
    {"none": _no_augmentation, "flip": _random_flip, "crop": _random_crop, "crop_flip": _random_crop_flip},
)

DEFAULT_AUGMENTATION: dict[str, str] = {
    "digits": "none",
    "synthetic": "none",
    "mnist": "none",
    "fashion_mnist": "none",
    "cifar10": "crop_flip",
    "cifar100": "crop_flip",
    "svhn": "crop",
    "imagefolder": "crop_flip",
}


def augment(x: Tensor, kind: str, generator: torch.Generator, pad: int | None = None) -> Tensor:
    """Augment a batch (N, C, H, W) on its own device; ``none`` returns ``x`` itself.

    ``crop`` zero-pads by ``pad`` (default max(1, H // 8): 4 for 32x32) and takes a
    random H x W window per sample; ``flip`` mirrors a random half horizontally;
    ``crop_flip`` does both, in that order. Random numbers are drawn from ``generator``
    (a CPU generator) so the same seed gives the same result on any device.
    """
    fn = AUGMENTATIONS[kind]
    if x.ndim != 4:
        raise ValueError(f"augment expects images (N, C, H, W), got shape {tuple(x.shape)}")
    if generator.device.type != "cpu":
        raise ValueError(f"augment needs a CPU torch.Generator, got one on {generator.device}")
    return fn(x, generator, pad)


# ----------------------------------------------------------------------- batching
def batch_indices(
    n: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[Tensor]:
    """Index tensors for one epoch over n samples: a permutation from ``generator`` when shuffling."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def eval_batches(n: int, batch_size: int) -> list[slice]:
    """Split n samples into ceil(n / batch_size) contiguous chunks of near-equal size.

    Batch-statistics evaluation depends on batch size, so there is no small tail batch
    (360 with batch_size 256 -> 180 + 180) and never a batch of one.
    """
    if batch_size < 2:
        raise ValueError(f"evaluation batch_size must be >= 2 (batch statistics of one sample), got {batch_size}")
    if n < 2:
        raise ValueError(f"need at least 2 samples to evaluate in batches, got {n}")
    chunks = math.ceil(n / batch_size)
    base, extra = divmod(n, chunks)
    if base < 2:
        raise ValueError(
            f"cannot split {n} samples into batches of at most {batch_size} without a batch of one; "
            "use a larger evaluation batch_size"
        )
    sizes = [base + 1] * extra + [base] * (chunks - extra)
    starts = [0, *np.cumsum(sizes).tolist()]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]
