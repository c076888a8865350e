"""Model loading: the shipped default and torchvision ResNet-18 from a local file."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from cimstat import models
from cimstat.data import loader
from cimstat.errors import ModelError


def test_default_model_classifies_held_out_digits():
    model = models.load("default")
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader("default", split="validation", batch_size=256):
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    assert total == 1000
    assert correct / total >= 0.97


def test_default_model_is_plain_torchvision_resnet18():
    model = models.load("default")
    reference = resnet18(num_classes=10)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    assert not model.training


def test_imagenet_resnet18_from_local_state_dict(tmp_path):
    torch.manual_seed(0)
    source = resnet18(num_classes=1000).eval()
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = models.load("resnet18-imagenet", weights=path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), source(x))
    assert models.weights_fingerprint(model) == models.weights_fingerprint(source)


def test_fingerprint_changes_with_weights():
    a = models.load("default")
    fp = models.weights_fingerprint(a)
    with torch.no_grad():
        a.fc.bias[0] += 1e-3
    assert models.weights_fingerprint(a) != fp


def test_weights_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'vgg'"):
        models.load("vgg")
    with pytest.raises(ModelError, match="needs a local weights file"):
        models.load("resnet18-imagenet")
    with pytest.raises(ModelError, match="does not exist"):
        models.load("resnet18-imagenet", weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable PyTorch state dict"):
        models.load("resnet18-imagenet", weights=bad)
    ten = tmp_path / "ten.pth"
    torch.save(resnet18(num_classes=10).state_dict(), ten)
    with pytest.raises(ModelError, match="wrong shape"):
        models.load("resnet18-imagenet", weights=ten)
