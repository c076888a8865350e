"""Deterministic (coherent) errors: the gain/offset split, its Jacobians, and the whole-network effect."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cimstat.engine import ErrorSource, engine_for
from cimstat.engine.coherent import split_coherent
from cimstat.engine.moments import SecondMoment
from cimstat.hardware import HardwareConfig, LayerConfig
from cimstat.noise_propagation import jacobian_propagation
from test_probing_tiny import _tiny

torch.set_num_threads(1)


def _moment(rng, k=12, n=4000):
    x = rng.normal(size=(n, k)) @ rng.normal(size=(k, k)) * 0.3 + rng.uniform(0, 1, size=k)
    m = x.T @ x / n
    vals, vecs = np.linalg.eigh(m)
    return SecondMoment(vecs * np.sqrt(np.maximum(vals, 0)), np.zeros(k), x.mean(0), (x * x).mean(0)), x


def test_split_recovers_a_pure_gain_and_offset():
    rng = np.random.default_rng(0)
    mom, x = _moment(rng)
    w = rng.normal(size=(5, 12))
    gain = np.array([0.1, -0.02, 0.0, 0.3, -0.5])
    sp = split_coherent(mom, w, gain[:, None] * w, k=np.arange(5.0))
    np.testing.assert_allclose(sp.gain, gain, atol=1e-12)
    np.testing.assert_allclose(sp.offset, np.arange(5.0), atol=1e-10)
    np.testing.assert_allclose(sp.residual_sq, 0.0, atol=1e-10)


def test_split_is_an_exact_energy_decomposition():
    """E[(v·x + k)²] = E[(a y + m)²] + Var(r), checked against the samples themselves."""
    rng = np.random.default_rng(1)
    mom, x = _moment(rng)
    w, v, k = rng.normal(size=(4, 12)), rng.normal(size=(4, 12)) * 0.1, rng.normal(size=4)
    sp = split_coherent(mom, w, v, k)
    e = x @ v.T + k
    np.testing.assert_allclose(sp.coherent_sq + sp.residual_sq, (e * e).mean(0), rtol=1e-9)
    rest = e - (sp.gain * (x @ w.T) + sp.offset)
    np.testing.assert_allclose(rest.mean(0), 0.0, atol=1e-9)                            # zero mean
    np.testing.assert_allclose(((rest - rest.mean(0)) * (x @ w.T)).mean(0), 0.0, atol=1e-9)  # uncorrelated with y


def test_gain_and_offset_jacobians_match_finite_differences():
    """Scaling channel c's weights by (1+ε), or adding δ to its bias, moves logit d by ε·gain_jac / δ·offset_jac."""
    folded, images = _tiny(dtype=torch.float64)
    layers, _, _ = jacobian_propagation(folded, [(images[:5], None), (images[5:], None)])
    mods = dict(folded.named_modules())
    with torch.no_grad():
        z0 = folded(images)
    for name in ("conv1", "conv2", "fc"):
        m = mods[name]
        lp = layers[name]
        assert lp.gain_jac.shape == (12, m.weight.shape[0], 3) == lp.offset_jac.shape
        for c in range(m.weight.shape[0]):
            eps = 1e-6
            w0, b0 = m.weight.data.clone(), m.bias.data.clone()
            m.weight.data[c] *= 1 + eps
            with torch.no_grad():
                dz_gain = (folded(images) - z0) / eps
            m.weight.data.copy_(w0)
            m.bias.data[c] += eps
            with torch.no_grad():
                dz_off = (folded(images) - z0) / eps
            m.bias.data.copy_(b0)
            np.testing.assert_allclose(lp.gain_jac[:, c], dz_gain.numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(lp.offset_jac[:, c], dz_off.numpy(), rtol=1e-4, atol=1e-6)
        # per-image sensitivities sum (over images) to the stored image means
        np.testing.assert_allclose(lp.ratio_image.mean(0), lp.ratio.sum(0), rtol=1e-5)
        np.testing.assert_allclose(lp.sens_image.mean(0), lp.weight_sens_class.sum(0), rtol=1e-5)


def test_off_device_bias_adds_coherently_over_layers(default_probes):
    """State-independent read noise: the clipping bias of off devices shrinks every layer's
    weights alike. The engine's prediction of that deterministic error at the logits is checked
    against the float network with the bias applied to all layers at once (the same probe images);
    the old per-layer incoherent sum was 6 dB low here."""
    from cimstat.models import load
    from cimstat.network import fold_batchnorm
    from cimstat.data import default_tensors

    eng = engine_for(default_probes)
    cfg = HardwareConfig(LayerConfig(read_noise=0.01), name="bias")
    res = eng.resolve(cfg)
    est = eng.estimate(cfg, res)
    # the deterministic part the engine predicts: the coherent shift energy + the fixed residual route
    white = sum(float((le.white[ErrorSource.READ_NOISE] @ eng._prop[n][0]).sum()) for n, le in est.layers.items())
    predicted = float(est.logit_noise[ErrorSource.READ_NOISE].sum()) - white

    model = fold_batchnorm(load("default")).eval()
    mods = dict(model.named_modules())
    n_img = next(iter(eng._coherent.values()))[0].shape[0]
    x, _ = default_tensors("probe")
    x = x[:n_img]
    with torch.no_grad():
        z0 = model(x)
        for name, lm in eng.layers.items():
            c = res[name].config
            bias = lm.weights(c).step[:, None] * lm.noise(c).bias
            mods[name].weight += torch.as_tensor(bias, dtype=torch.float32).reshape(mods[name].weight.shape)
        measured = float(((model(x) - z0) ** 2).sum(1).mean())
    assert 10 * abs(np.log10(predicted / measured)) < 0.5


def _logit_change(folded, images, z0, module, dw: np.ndarray) -> np.ndarray:
    """The float network's logit change when ``dw`` is added to ``module``'s weights (restored after)."""
    w0 = module.weight.data.clone()
    module.weight.data += torch.as_tensor(dw)
    with torch.no_grad():
        dz = (folded(images) - z0).numpy()
    module.weight.data.copy_(w0)
    return dz


def _tiny_propagation():
    """The tiny net, its 12 images, their float logits and ``jacobian_propagation`` keeping per-image data."""
    folded, images = _tiny(dtype=torch.float64)
    layers, _, _ = jacobian_propagation(folded, [(images[:5], None), (images[5:], None)], keep_grads=12)
    with torch.no_grad():
        z0 = folded(images)
    return folded, images, z0, layers, dict(folded.named_modules())


def test_kept_weight_gradients_propagate_one_draw_exactly():
    """``weight_grad`` of a small layer: Σ_ck dW_ck ∂z/∂W_ck equals the float network's logit change."""
    folded, images, z0, layers, mods = _tiny_propagation()
    rng = np.random.default_rng(3)
    for name in ("conv1", "conv2", "fc"):
        m = mods[name]
        grad = layers[name].weight_grad.astype(np.float64)           # (N, D, C_out, K), float16 on disk
        assert grad.shape == (12, 3, m.weight.shape[0], m.weight[0].numel())
        dw = rng.normal(size=m.weight.shape) * 1e-4
        dz = _logit_change(folded, images, z0, m, dw)
        pred = np.einsum("ndck,ck->nd", grad, dw.reshape(dw.shape[0], -1))
        np.testing.assert_allclose(pred, dz, rtol=2e-3, atol=2e-3 * np.abs(dz).max())


def test_conv1_weight_rounding_reaches_the_logits_as_measured(default_probes):
    """conv1 alone at 6 weight bits (the demo sweep): the engine's logit energy of one draw of
    rounding errors vs the float network with those weights, on the same probe images. The
    per-weight route Σ dW² S over-predicted it 1.9x (errors of different channels cancel)."""
    from cimstat.data import default_tensors
    from cimstat.models import load
    from cimstat.network import fold_batchnorm

    eng = engine_for(default_probes)
    cfg = HardwareConfig(LayerConfig(input_bits=None, weight_bits=None),
                         layers={"conv1": {"weight_bits": 6}}, name="conv1-w6")
    res = eng.resolve(cfg)
    est = eng.estimate(cfg, res)
    predicted = float(est.logit_noise[ErrorSource.WEIGHT_QUANTIZATION].sum())
    model = fold_batchnorm(load("default")).eval()
    conv1 = dict(model.named_modules())["conv1"]
    n_img = next(iter(eng._coherent.values()))[0].shape[0]
    x, _ = default_tensors("probe")
    with torch.no_grad():
        z0 = model(x[:n_img])
        conv1.weight += torch.as_tensor(eng.layers["conv1"].weights(res["conv1"].config).error,
                                        dtype=torch.float32).reshape(conv1.weight.shape)
        measured = float(((model(x[:n_img]) - z0) ** 2).sum(1).mean())
    assert 10 * abs(np.log10(predicted / measured)) < 0.3


def test_kept_output_gradients_propagate_one_draw_exactly(monkeypatch):
    """Layers too large for ``weight_grad`` keep ``out_grad`` and ``layer_input``: the logit shift of a weight
    error computed from them (one convolution and a contraction) equals the float network's logit change."""
    import cimstat.noise_propagation as npg
    from cimstat.engine.network import weight_error_logit_shift
    from types import SimpleNamespace

    monkeypatch.setattr(npg, "GRAD_MAX_ELEMENTS", 0)  # every layer takes the output-gradient route
    folded, images, z0, layers, mods = _tiny_propagation()
    rng = np.random.default_rng(4)
    for name in ("conv1", "conv2", "fc"):
        m, lp = mods[name], layers[name]
        assert lp.weight_grad is None and lp.out_grad.dtype == np.float16
        assert lp.out_grad.shape[:3] == (12, 3, m.weight.shape[0])
        dw = rng.normal(size=m.weight.shape) * 1e-4
        dz = _logit_change(folded, images, z0, m, dw)
        conv = isinstance(m, torch.nn.Conv2d)
        geometry = SimpleNamespace(kind="conv" if conv else "linear", weight_shape=tuple(m.weight.shape),
                                   stride=m.stride if conv else (1, 1), padding=m.padding if conv else (0, 0),
                                   dilation=m.dilation if conv else (1, 1), groups=m.groups if conv else 1)
        g = torch.from_numpy(lp.out_grad.astype(np.float32) * np.float32(lp.out_grad_scale))
        pred = weight_error_logit_shift(torch.from_numpy(lp.layer_input.astype(np.float32)),
                                        g.reshape(12, 3, -1), dw.reshape(dw.shape[0], -1), geometry)
        np.testing.assert_allclose(pred, dz, rtol=3e-3, atol=3e-3 * np.abs(dz).max())
        # a kernel offset by one position breaks it: the test sees the geometry
        if conv:
            shifted = np.roll(dw, 1, axis=-1).reshape(dw.shape[0], -1)
            bad = weight_error_logit_shift(torch.from_numpy(lp.layer_input.astype(np.float32)), g.reshape(12, 3, -1),
                                           shifted, geometry)
            assert np.abs(bad - dz).max() > 0.1 * np.abs(dz).max()


def test_weight_rounding_of_every_layer_reaches_the_logits_as_measured(default_probes):
    """4-bit weights on every layer (float inputs): the engine's fc SNR against the float network with those
    weights on 256 unseen validation images. The single-layer logit errors are correlated between layers
    (they add to 1.55x the sum of their energies); propagated as independent per-weight energies the estimate
    was 1.1 dB optimistic, per image and layer as amplitudes it is 0.4 dB pessimistic."""
    from cimstat.data import default_tensors
    from cimstat.models import load
    from cimstat.montecarlo import convert

    eng = engine_for(default_probes)
    assert all(n in eng._grad or n in eng._maps for n in eng.layers)
    cfg = HardwareConfig(LayerConfig(input_bits=None, weight_bits=4), name="w4")
    est = eng.estimate(cfg)
    x, _ = default_tensors("validation")
    x = x[torch.linspace(0, len(x) - 1, 256).round().long()]
    model = load("default")
    with torch.no_grad():
        z0 = torch.cat([model.eval()(x[i:i + 64]) for i in range(0, 256, 64)])
        analog = convert(model, cfg, eng.resolve(cfg))
        z = torch.cat([analog(x[i:i + 64]) for i in range(0, 256, 64)])
    measured = 10 * np.log10(float((z0 ** 2).sum(1).mean()) / float(((z - z0) ** 2).sum(1).mean()))
    # the linear route's propagation (w4's error-to-signal ratios add up to 1.01: its reported fc SNR is the
    # mean-field route's)
    assert abs(est.fc_snr_db_linear - measured) < 0.7, (est.fc_snr_db_linear, measured)


def test_output_error_maps_reach_the_logits_through_the_output_gradients(monkeypatch):
    """The precise ADC route propagates an output error map (N·P, C_out), image-major, by ``Σ g·e``: equal to
    the float network's logit change when that map is added to the layer's output."""
    import cimstat.noise_propagation as npg
    from cimstat.engine.network import _map_shift

    monkeypatch.setattr(npg, "GRAD_MAX_ELEMENTS", 0)
    folded, images, z0, layers, mods = _tiny_propagation()
    rng = np.random.default_rng(5)
    for name in ("conv1", "conv2"):
        lp = layers[name]
        n, d, c, p = lp.out_grad.shape
        e = rng.normal(size=(n, c, p)) * 1e-4                      # the error at output (channel, position)
        h = mods[name].register_forward_hook(lambda _m, _i, o: o + torch.as_tensor(e).reshape(o.shape))
        with torch.no_grad():
            dz = (folded(images) - z0).numpy()
        h.remove()
        g = torch.from_numpy(lp.out_grad.astype(np.float32) * np.float32(lp.out_grad_scale)).reshape(n, d, -1)
        pred = _map_shift(g, e.transpose(0, 2, 1).reshape(n * p, c))
        np.testing.assert_allclose(pred, dz, rtol=3e-3, atol=3e-3 * np.abs(dz).max())
