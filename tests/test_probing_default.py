"""Probes of the default model (session fixture ``default_probes``): contents, propagation checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cimstat import data, models, network
from cimstat.noise_propagation import injection_ratio

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folded():
    return network.fold_batchnorm(models.load("default"))


@pytest.fixture(scope="module")
def noise_images(default_probes):
    images, _ = data.default_tensors("probe")
    return images[:default_probes.noise_prop.meta["n_images"]]


def test_default_probes_contents(default_probes):
    st, npr = default_probes.stats, default_probes.noise_prop
    assert st.meta["model"] == "default" and st.meta["split"] == "probe" and "validation" in st.meta["split_note"]
    assert st.meta["fingerprint"] == models.weights_fingerprint(models.load("default"))
    assert len(st.layers) == 21 and list(st.layers)[0] == "conv1" and list(st.layers)[-1] == "fc"
    assert list(npr.layers) == list(st.layers)
    _, labels = data.default_tensors("probe")
    np.testing.assert_array_equal(st.labels, labels[:st.meta["n_images"]].numpy())
    assert (st.logits.argmax(1) == st.labels).mean() > 0.95
    conv1 = st.layers["conv1"]
    assert conv1.signed_input and conv1.input_min < 0
    for name, ls in st.layers.items():
        assert ls.total_counts.sum() == ls.n_patches * ls.fan_in, name
        if name != "conv1":
            assert not ls.signed_input and ls.input_min == 0.0, name
        if ls.kind == "conv" and name != "conv1":
            assert ls.zero_fraction.mean() > 0.1, name  # ReLU zeros (and padding) kept exactly
        lp = npr.layers[name]
        assert lp.ratio.shape == (ls.out_channels, 10) and lp.weight_sens.shape == (ls.out_channels, ls.fan_in)
        assert np.all(lp.ratio >= 0) and np.all(lp.weight_sens >= 0)


@pytest.mark.parametrize("layer", ["layer2.1.conv2", "layer4.1.conv1"])
def test_jacobian_ratio_agrees_with_injection(default_probes, folded, noise_images, layer):
    """White noise on 6 channels, 2 draws x 32 images: statistical error ~ 1/sqrt(64 x 10 classes) per channel."""
    st = default_probes.stats.layers[layer]
    rms = torch.as_tensor(np.sqrt(st.out_sq_mean), dtype=torch.float32)
    channels = list(range(6))
    inj = injection_ratio(folded, layer, noise_images, 1e-3 * rms, channels=channels, draws=2)
    jac = default_probes.noise_prop.layers[layer].ratio[channels]
    err_db = 10 * np.log10(inj.sum(1) / jac.sum(1))
    print(f"{layer}: injection/jacobian per channel (dB) {np.round(err_db, 2)}")
    assert np.all(np.abs(err_db) < 1.0)
    assert abs(10 * np.log10(inj.sum() / jac.sum())) < 0.4


@pytest.mark.parametrize("layer", ["layer1.0.conv1", "layer3.1.conv2", "layer4.1.conv2"])
def test_weight_sens_predicts_weight_perturbation(default_probes, folded, noise_images, layer):
    """Perturb one layer's weights by N(0, s²), run the float network, compare Σ_j E Δz_j² with
    s² Σ_k S_k (fixed-error sensitivities) and with the white-noise prediction from ``ratio``."""
    mod = dict(folded.named_modules())[layer]
    st, lp = default_probes.stats.layers[layer], default_probes.noise_prop.layers[layer]
    w0 = mod.weight.detach().clone()
    s = 2e-3 * float(w0.std())
    gen = torch.Generator().manual_seed(0)
    measured = []
    with torch.no_grad():
        z0 = folded(noise_images)
        for _ in range(6):
            mod.weight.copy_(w0 + s * torch.randn(w0.shape, generator=gen))
            measured.append(float(((folded(noise_images) - z0).double() ** 2).sum(1).mean()))
        mod.weight.copy_(w0)
    measured_var = np.mean(measured)
    by_sens = s * s * float(lp.weight_sens.astype(np.float64).sum())
    per_channel_white = s * s * st.row_sq_mean.sum()  # per-position error variance of every channel
    by_ratio = per_channel_white * float(lp.ratio.astype(np.float64).sum())
    err_sens = 10 * np.log10(by_sens / measured_var)
    err_ratio = 10 * np.log10(by_ratio / measured_var)
    print(f"{layer}: weight_sens error {err_sens:+.2f} dB, white-noise ratio error {err_ratio:+.2f} dB")
    assert abs(err_sens) < 1.0
