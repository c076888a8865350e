"""The default dataset split and the ImageNet folder loader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cimstat import data
from cimstat.errors import DataError

FIXTURE = Path(__file__).parent / "fixtures" / "imagenet_val"


def test_default_splits_are_disjoint_stratified_and_sized():
    _, labels, splits, _ = data._default_all()
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == data.DEFAULT_SPLITS
    all_idx = np.concatenate(list(splits.values()))
    assert len(np.unique(all_idx)) == len(all_idx) == 5000
    for name, idx in splits.items():
        counts = np.bincount(labels.numpy()[idx], minlength=10)
        assert (counts == data.DEFAULT_SPLITS[name] // 10).all(), (name, counts)


@pytest.mark.parametrize("split", ["probe", "validation"])
def test_prefix_of_evaluation_splits_is_class_balanced(split):
    _, labels = data.default_tensors(split)
    counts = np.bincount(labels[:200].numpy(), minlength=10)
    assert counts.min() >= 10, counts  # 20 expected per class; a class-sorted order would give 0


def test_default_split_is_deterministic():
    a = data._stratified_split(np.repeat(np.arange(10), 500), seed=0)
    b = data._stratified_split(np.repeat(np.arange(10), 500), seed=0)
    assert all((a[k] == b[k]).all() for k in a)


def test_default_images_are_normalised_three_channel_and_signed():
    x, y = data.default_tensors("train")
    assert x.shape == (3000, 3, 64, 64) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-2
    assert float(x.min()) < 0 < float(x.max())  # conv1 sees signed inputs
    assert torch.equal(x[:, 0], x[:, 2])


def test_loader_batches_and_limits():
    batches = list(data.loader("default", "probe", batch_size=128, n_images=300))
    assert [len(b[1]) for b in batches] == [128, 128, 44]
    with pytest.raises(DataError, match="holds only 1000"):
        data.loader("default", "validation", 10, n_images=5000)


@pytest.mark.parametrize("name,split,match", [("mnist", "probe", "unknown dataset 'mnist'"),
                                              ("default", "test", "unknown split 'test'")])
def test_unknown_names_raise(name, split, match):
    with pytest.raises(DataError, match=match):
        data.loader(name, split, 8)


def test_imagenet_folder_labels_follow_torchvision_order():
    ds = data.dataset("imagenet", "all", root=FIXTURE)
    synsets = data.imagenet_synsets()
    assert len(synsets) == 1000 and list(synsets) == sorted(synsets)
    assert len(ds) == 8
    for path, label in ds.samples:
        assert synsets[label] == path.parent.name
        assert int(path.stem.split("_")[2]) == label  # the fixture file names carry the class index
    image, label = ds[0]
    assert image.shape == (3, 224, 224)


def test_imagenet_probe_and_validation_partition_the_folder():
    probe = {p for p, _ in data.ImageNetFolder(FIXTURE, "probe").samples}
    val = {p for p, _ in data.ImageNetFolder(FIXTURE, "validation").samples}
    everything = {p for p, _ in data.ImageNetFolder(FIXTURE, "all").samples}
    assert probe and val and probe.isdisjoint(val) and probe | val == everything


def test_imagenet_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.loader("imagenet", "all", 4, root=tmp_path / "missing")
    with pytest.raises(DataError, match="holds no images"):
        data.loader("imagenet", "all", 4, root=tmp_path)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError, match="not ImageNet-1k synsets"):
        data.loader("imagenet", "all", 4, root=tmp_path)
    with pytest.raises(DataError, match="needs root"):
        data.loader("imagenet", "all", 4)
