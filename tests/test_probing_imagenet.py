"""The ImageNet path: torchvision ResNet-18 from a local weights file, a tiny ImageNet folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from cimstat import load_probes
from cimstat.errors import ProbeFileError
from cimstat.models import load, weights_fingerprint
from probing import activations, noise_prop

FIXTURE = Path(__file__).parent / "fixtures" / "imagenet_val"


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    return path


def test_imagenet_probing_end_to_end(imagenet_weights, tmp_path, capsys):
    out = tmp_path / "probes"
    assert activations.main(["--model", "resnet18-imagenet", "--weights", str(imagenet_weights), "--data",
                             str(FIXTURE), "--n-images", "1", "--out", str(out / "stat.pkl")]) == 0
    assert noise_prop.main(["--model", "resnet18-imagenet", "--weights", str(imagenet_weights), "--data",
                            str(FIXTURE), "--stat", str(out / "stat.pkl"), "--class-probes", "2",
                            "--out", str(out / "noise_prop.pkl")]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load("resnet18-imagenet", imagenet_weights)
    probes = load_probes(out, model, require_noise_prop=True)
    st = probes.stats
    assert st.meta["dataset"] == "imagenet" and st.meta["split"] == "probe" and st.meta["n_images"] == 1
    assert st.meta["fingerprint"] == weights_fingerprint(model)
    assert st.logits.shape == (1, 1000) and 0 <= st.labels[0] < 1000
    assert len(st.layers) == 21
    conv1, l4 = st.layers["conv1"], st.layers["layer4.1.conv2"]
    assert conv1.signed_input and conv1.n_positions == 112 * 112
    assert l4.fan_in == 4608 and l4.m_method == "eig+diag" and l4.n_positions == 49
    assert probes.noise_prop.layers["fc"].ratio.shape == (1000, 1000)
    assert probes.noise_prop.meta["class_estimator"].startswith("rademacher_projections(2)")
    with pytest.raises(ProbeFileError, match="fingerprint"):
        probes.check_model(resnet18())
