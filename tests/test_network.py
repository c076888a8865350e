"""Batch-norm folding and the list of analog layers."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from cimstat.network import analog_layers, fold_batchnorm, replace_module


def _randomised_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    return model


def test_fold_batchnorm_keeps_outputs_and_names():
    model = _randomised_resnet()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # the original is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_analog_layers_in_execution_order():
    folded = fold_batchnorm(_randomised_resnet())
    specs = analog_layers(folded, torch.zeros(1, 3, 64, 64))
    names = [s.name for s in specs]
    assert len(specs) == 21  # conv1, 16 block convs, 3 downsample convs, fc
    assert names[0] == "conv1" and names[-1] == "fc"
    assert names.index("layer2.0.downsample.0") > names.index("layer1.1.conv2")
    conv1 = specs[0]
    assert conv1.kind == "conv" and conv1.fan_in == 147 and conv1.stride == (2, 2) and conv1.padding == (3, 3)
    assert conv1.bias is not None  # folded BN bias
    assert max(s.fan_in for s in specs) == 4608
    assert specs[-1].kind == "linear" and specs[-1].weight_matrix.shape == (10, 512)


def test_replace_module_in_graph_module():
    folded = fold_batchnorm(_randomised_resnet())
    replace_module(folded, "layer1.0.conv1", nn.Identity())
    assert isinstance(folded.get_submodule("layer1.0.conv1"), nn.Identity)
