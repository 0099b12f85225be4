"""Tests for trainables/data.py: dataset loaders (no network), subsets, augmentation,
and batch splitting."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import (
    AUGMENTATIONS,
    DATASETS,
    DEFAULT_AUGMENTATION,
    TensorData,
    augment,
    batch_indices,
    eval_batches,
    load_dataset,
)
from trainables.registry import UnknownNameError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def shared_data_dir() -> Path:
    env = os.environ.get("NORMLAB_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def direct_mean_std(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std, computed independently with numpy."""
    arr = x.cpu().numpy().astype(np.float64).transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    return arr.mean(axis=1), arr.std(axis=1)


def nearest_class_mean_accuracy(data: TensorData) -> float:
    means = torch.stack([data.train_x[data.train_y == c].mean(0) for c in range(data.num_classes)])
    dist = torch.cdist(data.test_x.flatten(1), means.flatten(1))
    return (dist.argmin(1) == data.test_y).float().mean().item()


def rows_in(sub: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """For each row of ``sub``, whether an identical row exists in ``full``."""
    return (sub.flatten(1)[:, None, :] == full.flatten(1)[None, :, :]).all(-1).any(-1)


# ------------------------------------------------------------------- registries
def test_registry_names() -> None:
    assert set(DATASETS.names()) == {
        "digits",
        "synthetic",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "svhn",
        "imagefolder",
    }
    assert AUGMENTATIONS.names() == ["none", "flip", "crop", "crop_flip"]
    assert set(DEFAULT_AUGMENTATION) == set(DATASETS.names())
    assert all(kind in AUGMENTATIONS for kind in DEFAULT_AUGMENTATION.values())
    assert DEFAULT_AUGMENTATION["cifar10"] == "crop_flip" and DEFAULT_AUGMENTATION["svhn"] == "crop"
    assert DEFAULT_AUGMENTATION["digits"] == "none"


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset("cifar11")
    message = str(info.value)
    assert "cifar11" in message and "digits" in message and "imagefolder" in message


def test_missing_data_dir_is_value_error() -> None:
    with pytest.raises(ValueError, match="cifar10.*data_dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("imagefolder")


# ----------------------------------------------------------------------- digits
def test_digits() -> None:
    data = load_dataset("digits")
    assert data.train_x.shape[1:] == (1, 8, 8) and data.test_x.shape[1:] == (1, 8, 8)
    assert len(data.train_x) + len(data.test_x) == 1797
    assert len(data.test_x) == 360
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0 and data.train_x.max() == 1.0
    assert data.num_classes == 10 and len(data.classes) == 10
    assert data.in_channels == 1 and data.image_size == (8, 8)
    assert set(data.train_y.tolist()) == set(range(10))
    counts = torch.bincount(data.test_y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38, counts  # stratified: ~36 each
    mean, std = direct_mean_std(data.train_x)
    np.testing.assert_allclose(data.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(data.std, std, rtol=1e-6)
    again = load_dataset("digits")
    for a, b in [
        (data.train_x, again.train_x),
        (data.train_y, again.train_y),
        (data.test_x, again.test_x),
        (data.test_y, again.test_y),
    ]:
        assert torch.equal(a, b)
    # train and test are disjoint parts of the 1797 images (the bundled set has no duplicates)
    assert not rows_in(data.test_x, data.train_x).any()


def test_tensordata_to_and_validation() -> None:
    data = load_dataset("digits", train_subset=20, test_subset=10)
    moved = data.to("cpu")
    assert isinstance(moved, TensorData) and moved.mean == data.mean and moved.classes == data.classes
    with pytest.raises(ValueError, match="labels"):
        TensorData(data.train_x, data.train_y[:-1], data.test_x, data.test_y, 10, data.classes)
    with pytest.raises(ValueError, match="float32"):
        TensorData(data.train_x.double(), data.train_y, data.test_x, data.test_y, 10, data.classes)


# -------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_learnable() -> None:
    data = load_dataset("synthetic")
    assert data.train_x.shape == (2000, 3, 16, 16) and data.test_x.shape == (500, 3, 16, 16)
    assert data.num_classes == 10 and data.in_channels == 3 and data.image_size == (16, 16)
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
    assert torch.bincount(data.train_y, minlength=10).tolist() == [200] * 10
    again = load_dataset("synthetic")
    assert torch.equal(data.train_x, again.train_x) and torch.equal(data.test_y, again.test_y)
    accuracy = nearest_class_mean_accuracy(data)
    assert 0.25 < accuracy < 0.9, accuracy  # far above chance (0.1), far from trivial
    mean, std = direct_mean_std(data.train_x)
    np.testing.assert_allclose(data.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(data.std, std, rtol=1e-6)


# ---------------------------------------------------------------------- subsets
def test_subsets() -> None:
    full = load_dataset("digits")
    sub = load_dataset("digits", train_subset=100, test_subset=50)
    assert len(sub.train_x) == len(sub.train_y) == 100 and len(sub.test_x) == len(sub.test_y) == 50
    again = load_dataset("digits", train_subset=100, test_subset=50)
    assert torch.equal(sub.train_x, again.train_x) and torch.equal(sub.test_y, again.test_y)
    # drawn from the full set, labels travelling with their images
    pairs_full = torch.cat([full.train_x.flatten(1), full.train_y[:, None].float()], 1)
    pairs_sub = torch.cat([sub.train_x.flatten(1), sub.train_y[:, None].float()], 1)
    assert rows_in(pairs_sub, pairs_full).all()
    assert rows_in(sub.test_x, full.test_x).all()
    # not just the first k
    assert not torch.equal(sub.train_x, full.train_x[:100])
    # a smaller subset sits inside a larger one
    small = load_dataset("digits", train_subset=30)
    assert rows_in(small.train_x, sub.train_x).all()
    assert len(small.test_x) == 360
    # mean/std are those of the subset
    mean, std = direct_mean_std(sub.train_x)
    np.testing.assert_allclose(sub.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(sub.std, std, rtol=1e-6)
    assert sub.mean != full.mean
    for bad in (0, 1438):
        with pytest.raises(ValueError, match="train_subset"):
            load_dataset("digits", train_subset=bad)


# -------------------------------------------------------------- torchvision path
def write_idx(path: Path, array: np.ndarray) -> None:
    """torchvision's raw MNIST format: big-endian magic (0, 0, type 8=uint8, ndim), dims, data."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_fake_mnist_through_torchvision(tmp_path: Path, name: str, folder: str) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 12)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    data = load_dataset(name, data_dir=tmp_path)
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (12, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    expected = torch.from_numpy(arrays["train"][0]).float().div(255).unsqueeze(1)
    assert torch.equal(data.train_x, expected)
    assert data.train_y.tolist() == arrays["train"][1].tolist()
    assert sorted(data.test_y.tolist()) == sorted(arrays["t10k"][1].tolist())  # test split: shuffled once
    assert DATASETS[name](tmp_path, False).test_y.tolist() == arrays["t10k"][1].tolist()
    assert data.num_classes == 10 and len(data.classes) == 10
    # a str data_dir works too, with a subset
    sub = load_dataset(name, data_dir=str(tmp_path), train_subset=5)
    assert len(sub.train_x) == 5


def test_cifar10_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "cifar10" in message and "download" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or created


# ------------------------------------------------------------------ imagefolder
def write_png(img: torch.Tensor, path: Path) -> None:
    """uint8 (C, H, W) -> PNG, written with PIL (independent of the torchvision decoder)."""
    arr = img.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)


def write_tree(
    root: Path, classes: dict[str, dict[str, int]], size: tuple[int, int] = (8, 8), seed: int = 0
) -> dict[tuple[str, str], list[torch.Tensor]]:
    """root/<split>/<class>/<i>.png with random RGB pixels; returns the pixels written."""
    g = torch.Generator().manual_seed(seed)
    written = {}
    for cls, per_split in classes.items():
        for split, count in per_split.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            images = [torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8) for _ in range(count)]
            for i, img in enumerate(images):
                write_png(img, folder / f"{i:03d}.png")
            written[(split, cls)] = images
    return written


def test_imagefolder_pixels_and_labels(tmp_path: Path) -> None:
    # class folders written in unsorted order; labels must follow sorted names
    written = write_tree(tmp_path, {c: {"train": 4, "test": 2} for c in ("cat", "ant", "bee")})
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored
    data = DATASETS["imagefolder"](tmp_path, False)  # the loader itself: files in sorted order
    assert data.classes == ["ant", "bee", "cat"] and data.num_classes == 3
    assert data.train_x.shape == (12, 3, 8, 8) and data.test_x.shape == (6, 3, 8, 8)
    assert data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    expected_train = torch.cat([torch.stack(written[("train", c)]) for c in data.classes]).float() / 255
    expected_test = torch.cat([torch.stack(written[("test", c)]) for c in data.classes]).float() / 255
    assert torch.equal(data.train_x, expected_train)
    assert torch.equal(data.test_x, expected_test)


def test_imagefolder_grayscale_and_bmp_become_rgb(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": {"train": 1, "test": 1}, "b": {"train": 1, "test": 1}})
    gray = torch.arange(64, dtype=torch.uint8).reshape(1, 8, 8)
    write_png(gray, tmp_path / "train" / "a" / "gray.png")
    rgb = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "train" / "b" / "zz.bmp")
    data = load_dataset("imagefolder", data_dir=tmp_path)
    assert data.train_x.shape == (4, 3, 8, 8)
    # sorted file order: a/000.png, a/gray.png, b/000.png, b/zz.bmp
    assert torch.equal(data.train_x[1], (gray.float() / 255).expand(3, 8, 8))
    assert torch.equal(data.train_x[3], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": {"train": 1, "test": 1}, "b": {"train": 1}, "c": {"test": 1}})
    with pytest.raises(ValueError) as info:
        load_dataset("imagefolder", data_dir=tmp_path)
    message = str(info.value)
    assert "only in train: ['b']" in message and "only in test: ['c']" in message


def test_imagefolder_mixed_sizes(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": {"train": 2, "test": 1}, "b": {"train": 1, "test": 1}})
    write_png(torch.zeros(3, 10, 12, dtype=torch.uint8), tmp_path / "train" / "b" / "big.png")
    with pytest.raises(ValueError) as info:
        load_dataset("imagefolder", data_dir=tmp_path)
    message = str(info.value)
    assert "000.png" in message and "big.png" in message and "8x8" in message and "10x12" in message


def test_imagefolder_missing_split(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": {"train": 1}})
    with pytest.raises(FileNotFoundError, match="test"):
        load_dataset("imagefolder", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagefolder", data_dir=tmp_path / "nowhere")


def test_imagefolder_cifar10_jpeg_mini() -> None:
    root = shared_data_dir() / "cifar10-jpeg-mini"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    data = load_dataset("imagefolder", data_dir=root)
    assert data.train_x.shape == (5000, 3, 32, 32) and data.test_x.shape == (2000, 3, 32, 32)
    assert data.num_classes == 10 and data.classes[0] == "airplane" and data.classes[-1] == "truck"
    assert torch.bincount(data.train_y).tolist() == [500] * 10
    assert torch.bincount(data.test_y).tolist() == [200] * 10
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
    assert all(0.4 < m < 0.55 for m in data.mean) and all(0.2 < s < 0.3 for s in data.std)


# ----------------------------------------------------------------- augmentation
def images(n: int = 64, c: int = 3, h: int = 32, w: int = 32, device: str = "cpu") -> torch.Tensor:
    """Distinct random pixels in (0, 1], so every translate and flip is identifiable."""
    g = torch.Generator().manual_seed(123)
    return (torch.rand(n, c, h, w, generator=g) * 0.9 + 0.1).to(device)


def translate_offset(out: torch.Tensor, x: torch.Tensor, pad: int) -> tuple[int, int] | None:
    """Reference loop: the (dy, dx) window of the zero-padded x equal to out, if any."""
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            if torch.equal(out, padded[:, dy : dy + h, dx : dx + w]):
                return dy, dx
    return None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["none", "flip", "crop", "crop_flip"])
def test_augment_shape_dtype_device(kind: str, device: str) -> None:
    x = images(device=device)
    out = augment(x, kind, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device


def test_augment_none_is_identity() -> None:
    x = images()
    assert torch.equal(augment(x, "none", torch.Generator().manual_seed(0)), x)


def test_augment_flip() -> None:
    x = images()
    out = augment(x, "flip", torch.Generator().manual_seed(0))
    changed = ~(out == x).flatten(1).all(1)
    assert 16 <= changed.sum() <= 48  # a random half of 64
    assert torch.equal(out[changed], x[changed].flip(-1))
    assert torch.equal(out[~changed], x[~changed])


@pytest.mark.parametrize("pad, h", [(2, 16), (None, 32), (1, 8)])
def test_augment_crop_is_a_translate_of_the_padded_image(pad: int | None, h: int) -> None:
    x = images(n=40, h=h, w=h)
    out = augment(x, "crop", torch.Generator().manual_seed(1), pad=pad)
    p = max(1, h // 8) if pad is None else pad
    offsets = [translate_offset(o, xi, p) for o, xi in zip(out, x)]
    assert all(off is not None for off in offsets), "some crop is not a translate within the padding"
    assert len(set(offsets)) > 3  # independent offsets per sample
    assert any(off != (p, p) for off in offsets)


def test_augment_crop_flip() -> None:
    x = images(n=32, h=16, w=16)
    out = augment(x, "crop_flip", torch.Generator().manual_seed(2), pad=2)
    flipped = 0
    for o, xi in zip(out, x):
        if translate_offset(o, xi, 2) is None:
            assert translate_offset(o.flip(-1), xi, 2) is not None
            flipped += 1
    assert 4 <= flipped <= 28


@pytest.mark.parametrize("kind", ["flip", "crop", "crop_flip"])
def test_augment_reproducible_from_seed(kind: str) -> None:
    x = images()
    a = augment(x, kind, torch.Generator().manual_seed(7))
    b = augment(x, kind, torch.Generator().manual_seed(7))
    c = augment(x, kind, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    if "cuda" in DEVICES:  # same seed, same result on any device
        d = augment(x.cuda(), kind, torch.Generator().manual_seed(7))
        assert torch.equal(a, d.cpu())


def test_augment_bad_arguments() -> None:
    x = images(n=4)
    with pytest.raises(UnknownNameError, match="crop_flip"):
        augment(x, "rotate", torch.Generator())
    with pytest.raises(ValueError):
        augment(x[0], "flip", torch.Generator())
    with pytest.raises(ValueError):
        augment(x, "crop", torch.Generator(), pad=-1)


# --------------------------------------------------------------------- batching
def test_batch_indices() -> None:
    batches = batch_indices(103, 10, generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    everything = torch.cat(batches)
    assert sorted(everything.tolist()) == list(range(103))
    assert not torch.equal(everything, torch.arange(103))
    again = batch_indices(103, 10, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = batch_indices(103, 10, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(torch.cat(other), everything)
    ordered = batch_indices(25, 10, shuffle=False)
    assert torch.equal(torch.cat(ordered), torch.arange(25))
    dropped = batch_indices(25, 10, generator=torch.Generator().manual_seed(0), drop_last=True)
    assert [len(b) for b in dropped] == [10, 10]
    assert [len(b) for b in batch_indices(20, 10, shuffle=False, drop_last=True)] == [10, 10]
    with pytest.raises(ValueError):
        batch_indices(10, 0)


def test_eval_batches_examples() -> None:
    assert [s.stop - s.start for s in eval_batches(360, 256)] == [180, 180]
    assert [s.stop - s.start for s in eval_batches(1000, 256)] == [250] * 4
    assert [s.stop - s.start for s in eval_batches(10, 3)] == [3, 3, 2, 2]
    assert [s.stop - s.start for s in eval_batches(257, 256)] == [129, 128]
    assert eval_batches(100, 500) == [slice(0, 100)]


def test_eval_batches_properties() -> None:
    for n in range(2, 200):
        for batch_size in range(2, 40):
            try:
                chunks = eval_batches(n, batch_size)
            except ValueError:
                assert n < 2 * math.ceil(n / batch_size)  # only when a batch of one is unavoidable
                continue
            sizes = [s.stop - s.start for s in chunks]
            assert len(chunks) == math.ceil(n / batch_size)
            assert chunks[0].start == 0 and chunks[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
            assert max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1 and min(sizes) >= 2


def test_eval_batches_bad_sizes() -> None:
    for n, batch_size in [(100, 1), (100, 0), (1, 256), (0, 256), (3, 2)]:
        with pytest.raises(ValueError):
            eval_batches(n, batch_size)


def test_test_split_comes_in_one_fixed_shuffled_order(tmp_path: Path) -> None:
    """Evaluation batches must mix classes (batch statistics), the same way on every call."""
    write_tree(tmp_path, {c: {"train": 2, "test": 8} for c in ("a", "b", "c")})
    raw = DATASETS["imagefolder"](tmp_path, False)
    data = load_dataset("imagefolder", data_dir=tmp_path)
    again = load_dataset("imagefolder", data_dir=tmp_path)
    assert torch.equal(data.test_x, again.test_x) and torch.equal(data.test_y, again.test_y)
    assert raw.test_y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert sorted(data.test_y.tolist()) == raw.test_y.tolist() and data.test_y.tolist() != raw.test_y.tolist()
    assert len(set(data.test_y[:8].tolist())) > 1  # the first evaluation batch is not one class
    for x, y in zip(data.test_x, data.test_y):  # every image keeps its label
        match = [i for i in range(len(raw.test_x)) if torch.equal(raw.test_x[i], x)]
        assert match and all(int(raw.test_y[i]) == int(y) for i in match)
