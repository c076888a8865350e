"""The mean-field route (cimstat.engine.meanfield) on small networks: exact where it should be, right in
expectation where noise is rectified, and explicit about what it cannot carry."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from cimstat.engine.meanfield import (LayerPerturbation, MeanFieldNetwork, PatchVariance, operating_point,
                                      rectified_gaussian_for,
                                      relu_moments)
from cimstat.errors import EstimationError

torch.set_num_threads(1)


@pytest.mark.parametrize("mean, var", [(0.0, 1.0), (1.5, 0.25), (-2.0, 4.0), (3.0, 1e-6), (0.7, 0.0), (-0.7, 0.0)])
def test_relu_moments_are_those_of_the_rectified_gaussian(mean, var):
    m, v = relu_moments(torch.tensor([mean], dtype=torch.float64), torch.tensor([var], dtype=torch.float64))
    if var == 0:
        assert float(m) == max(mean, 0.0) and float(v) == 0.0
        return
    sd = math.sqrt(var)
    lo, hi = max(0.0, mean - 12 * sd), max(0.0, mean + 12 * sd)
    e1 = integrate.quad(lambda x: x * stats.norm.pdf(x, mean, sd), lo, hi)[0]
    e2 = integrate.quad(lambda x: x * x * stats.norm.pdf(x, mean, sd), lo, hi)[0]
    assert float(m) == pytest.approx(e1, rel=1e-6, abs=1e-12)
    assert float(v) == pytest.approx(e2 - e1 * e1, rel=1e-5, abs=1e-12)


class _Block(nn.Module):
    """conv -> ReLU -> max pool -> residual conv block -> average pool -> linear: what ResNets are made of."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.pool(self.relu(self.conv1(x)))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.avg(y), 1))


@pytest.fixture
def block():
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(_Block().eval())


def test_without_perturbations_it_is_the_float_network(block):
    x = torch.randn(7, 2, 8, 8)
    net = MeanFieldNetwork(block, x, batch_size=3)  # batches of 3: the concatenation is checked too
    mean, var = net.moments({})
    with torch.no_grad():
        np.testing.assert_allclose(mean, block(x).double().numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(var == 0)


def test_a_layer_applies_its_gain_offset_weights_and_variance(block):
    """One linear layer as the last: mean ``(1+a)·W_eff x + b + m``, variance ``v`` (nothing upstream)."""
    x = torch.randn(5, 2, 8, 8)
    net = MeanFieldNetwork(block, x)
    w_eff = np.round(block.fc.weight.detach().numpy() * 4) / 4
    pert = LayerPerturbation(gain=np.array([0.1, -0.2, 0.0]), offset=np.array([0.0, 0.5, -1.0]),
                             variance=np.array([0.3, 0.0, 2.0]), weight=w_eff)
    mean, var = net.moments({"fc": pert})
    feats = {}
    block.avg.register_forward_hook(lambda _m, _i, out: feats.setdefault("f", out.flatten(1)))
    with torch.no_grad():
        block(x)
    f = feats["f"].double().numpy()
    expected = (1 + pert.gain) * (f @ w_eff.T.astype(np.float64)) + block.fc.bias.detach().double().numpy() + pert.offset
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, np.broadcast_to(pert.variance, var.shape), rtol=1e-6)


class _Rectify(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(6, 5)
        self.lin2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x)))


def test_rectified_noise_matches_sampling_in_expectation():
    """Gaussian noise on lin1's outputs, through ReLU and lin2: the rectification drift (mean) and the variance
    of the logits are those of 200,000 noisy forward passes (elements independent: the route is exact here)."""
    torch.manual_seed(1)
    model = _Rectify().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 6)
    sd = torch.tensor([0.5, 1.0, 2.0, 0.1, 1.5])
    net = MeanFieldNetwork(gm, x)
    mean, var = net.moments({"lin1": LayerPerturbation(np.zeros(5), np.zeros(5), (sd ** 2).numpy())})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        h = model.lin1(x)
        draws = h[None] + sd * torch.randn((200_000,) + tuple(h.shape), generator=gen)
        z = model.lin2(torch.relu(draws)).double()
        clean = model(x).double().numpy()
    assert np.abs(mean - clean).max() > 0.05  # the drift is there to be found
    np.testing.assert_allclose(mean, z.mean(0).numpy(), atol=0.01)
    np.testing.assert_allclose(var, z.var(0).numpy(), rtol=0.02)


def test_device_noise_follows_each_outputs_input_patch():
    """Device noise adds ``coef_c·Σ_k kernel_ck·x_k²`` per output: none where the inputs are 0. Both layers noisy,
    lin2's from its noisy inputs' energy; the logits' mean (the rectification drift) and variance are those of
    200,000 noisy passes. The same mean variance spread evenly over the images misses the drift."""
    torch.manual_seed(3)
    model = _Rectify().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 6) * torch.tensor([[0.0], [0.3], [1.0], [2.0]])   # image 0: all inputs 0
    k1, k2 = torch.rand(5, 6) + 0.1, torch.rand(3, 5) + 0.1
    c1, c2 = torch.tensor([0.5, 0.2, 1.0, 0.05, 0.3]), torch.tensor([0.1, 0.4, 0.2])
    pert = {"lin1": LayerPerturbation(np.zeros(5), np.zeros(5), np.zeros(5),
                                      patch_variance=(PatchVariance(c1.numpy(), k1.numpy()),)),
            "lin2": LayerPerturbation(np.zeros(3), np.zeros(3), np.zeros(3),
                                      patch_variance=(PatchVariance(c2.numpy(), k2.numpy()),))}
    mean, var = MeanFieldNetwork(gm, x).moments(pert)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        h = model.lin1(x)
        h = h[None] + (c1 * ((x * x) @ k1.T)).sqrt() * torch.randn((200_000,) + tuple(h.shape), generator=gen)
        r = torch.relu(h)
        z = model.lin2(r)
        z = (z + (c2 * ((r * r) @ k2.T)).sqrt() * torch.randn(z.shape, generator=gen)).double()
        clean = model(x).double().numpy()
    np.testing.assert_allclose(mean, z.mean(0).numpy(), atol=0.01)
    np.testing.assert_allclose(var, z.var(0).numpy(), rtol=0.03, atol=1e-4)
    shaped, shaped_var = MeanFieldNetwork(gm, x).moments({"lin1": pert["lin1"]})
    assert np.all(shaped_var[0] == 0)   # image 0 has no input: lin1's devices add nothing to it
    np.testing.assert_allclose(shaped[0], clean[0], rtol=1e-5, atol=1e-6)
    # the same mean variance per output channel, spread evenly over the images: another drift
    v1 = ((c1 * ((x * x) @ k1.T)).mean(0)).numpy()
    even, _ = MeanFieldNetwork(gm, x).moments({"lin1": LayerPerturbation(np.zeros(5), np.zeros(5), v1)})
    assert np.abs(even - shaped).max() > 0.05


def test_an_operation_it_cannot_carry_is_named():
    class Sig(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.sigmoid(self.lin(x))
    with pytest.raises(EstimationError, match="sigmoid"):
        MeanFieldNetwork(torch.fx.symbolic_trace(Sig()), torch.zeros(1, 3))
    with pytest.raises(EstimationError, match="torch.fx"):
        MeanFieldNetwork(nn.Linear(3, 2), torch.zeros(1, 3))


def test_probe_images_are_reloaded_within_the_element_budget():
    """The route reloads the first probe images, fewer where they would exceed its input-element budget; probes
    that name no dataset cannot be reloaded, and say so."""
    from cimstat import data
    from cimstat.engine.network import _probe_images

    images, labels = _probe_images({"dataset": "default", "split": "probe"}, 10, 4 * 3 * 64 * 64 + 5)
    ref_images, ref_labels = data.default_tensors("probe")
    assert images.shape == (4, 3, 64, 64) and torch.equal(images, ref_images[:4]) and torch.equal(labels, ref_labels[:4])
    with pytest.raises(EstimationError, match="no dataset"):
        _probe_images({"model": "resnet18"}, 10, 10 ** 9)


def test_operating_point_is_the_per_channel_fit_of_the_noisy_input_on_the_clean_one():
    gen = torch.Generator().manual_seed(3)
    clean = torch.rand(40, 3, 5, 5, generator=gen)
    alpha, beta = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0.2, 0.0, 0.7])
    mean = alpha.reshape(1, 3, 1, 1) * clean + beta.reshape(1, 3, 1, 1)
    var = torch.tensor([0.04, 0.0, 1.0]).reshape(1, 3, 1, 1).expand_as(clean)
    a, b, sd, m0, s0 = operating_point(clean, mean, var)
    np.testing.assert_allclose(a, alpha.numpy(), atol=1e-6)
    np.testing.assert_allclose(b, beta.numpy(), atol=1e-6)
    np.testing.assert_allclose(sd, [0.2, 0.0, 1.0], atol=1e-6)
    assert np.all(m0 == 0) and np.all(s0 == 0)          # no clean input is 0: nothing silent
    a, b, *_ = operating_point(torch.ones(4, 2), torch.full((4, 2), 3.0), torch.zeros(4, 2))  # constant clean input
    assert np.all(a == 0) and np.allclose(b, 3.0)


def test_operating_point_takes_the_inputs_silent_in_the_clean_network_apart():
    """Where the clean input is 0 (a ReLU's silent outputs) the noisy input is not on the line of the active ones:
    the fit uses the active elements only, and the silent ones give their own mean and spread (the spread of
    their means included)."""
    gen = torch.Generator().manual_seed(4)
    clean = torch.relu(torch.randn(30, 2, 4, 4, generator=gen))
    silent = clean == 0
    assert 0.3 < silent.double().mean() < 0.7
    lift = torch.rand(clean.shape, generator=gen) * 0.2          # silent: means 0 … 0.2, variance 0.01
    mean = torch.where(silent, lift, 0.8 * clean + 0.3)
    var = torch.where(silent, torch.full_like(clean, 0.01), torch.full_like(clean, 0.09))
    a, b, sd, m0, s0 = operating_point(clean, mean, var)
    np.testing.assert_allclose(a, 0.8, atol=1e-6)
    np.testing.assert_allclose(b, 0.3, atol=1e-6)
    np.testing.assert_allclose(sd, 0.3, atol=1e-6)
    for c in range(2):
        on = silent[:, c]
        np.testing.assert_allclose(m0[c], lift[:, c][on].double().mean(), rtol=1e-9)
        np.testing.assert_allclose(s0[c] ** 2, 0.01 + lift[:, c][on].double().var(unbiased=False), rtol=1e-6)
    dead = torch.cat([clean, torch.zeros(30, 1, 4, 4)], 1)   # a channel that is 0 in every clean image
    a, b, sd, m0, s0 = operating_point(dead, torch.cat([mean, torch.full((30, 1, 4, 4), 0.5)], 1),
                                       torch.cat([var, torch.full((30, 1, 4, 4), 0.04)], 1))
    assert a[2] == b[2] == sd[2] == 0 and np.isclose(m0[2], 0.5) and np.isclose(s0[2], 0.2)


def test_rectified_gaussian_has_the_asked_mean_and_spread():
    """``max(0, μ + σ·ξ)`` with the returned ``(μ, σ)`` has the mean and standard deviation asked for (checked on
    a million draws), from nearly symmetric to mostly 0; a spread of 0 is the constant mean."""
    mean = np.array([0.1, 1.0, 0.5, 0.3, 0.2, 0.0])
    sd = np.array([0.2, 0.3, 1.5, 0.3, 0.0, 0.0])
    mu, sigma = rectified_gaussian_for(mean, sd)
    xi = np.random.default_rng(0).standard_normal((1_000_000, 1))
    x = np.maximum(mu + sigma * xi, 0.0)
    np.testing.assert_allclose(x.mean(0), mean, rtol=0.01, atol=1e-9)
    np.testing.assert_allclose(x.std(0), sd, rtol=0.01, atol=1e-9)
    assert mu[0] < 0 < mu[1] and sigma[4] == 0 and mu[4] == 0.2


class _NoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(6, 5, bias=False)
        self.lin2 = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x)))


def test_a_layer_sees_its_operating_point_and_moves_its_gain_and_offset():
    """lin1 halves its outputs: lin2's input is relu(h/2) = relu(h)/2, so lin2 is told α = 1/2, β = 0, sd = 0 and
    0 for its silent inputs (once, over the first ``fit_images`` images, not per batch), and its returned gain and
    offset changes are applied to every image, those of the later batches too."""
    torch.manual_seed(4)
    model = _NoBias().eval()
    x = torch.randn(7, 6)
    seen = []

    def moved(alpha, beta, sd, silent_mean, silent_sd):
        seen.append((alpha, beta, sd, silent_mean, silent_sd))
        return np.full(3, 0.1), np.array([0.2, 0.0, -0.3])
    net = MeanFieldNetwork(torch.fx.symbolic_trace(model), x, batch_size=2, fit_images=3)
    mean, var = net.moments({"lin1": LayerPerturbation(np.full(5, -0.5), np.zeros(5), np.zeros(5)),
                             "lin2": LayerPerturbation(np.zeros(3), np.zeros(3), np.zeros(3), operating_point=moved)})
    assert len(seen) == 1
    alpha, beta, sd, silent_mean, silent_sd = seen[0]
    with torch.no_grad():
        h = torch.relu(model.lin1(x))
        expected = (1.1 * model.lin2(h / 2)).double().numpy() + np.array([0.2, 0.0, -0.3])
    live = h[:3].std(0).numpy() > 0          # fitted on the first 3 images
    assert live.sum() >= 3
    np.testing.assert_allclose(alpha[live], 0.5, atol=1e-5)
    np.testing.assert_allclose(beta, 0.0, atol=1e-6)
    assert np.all(sd == 0) and np.all(silent_mean == 0) and np.all(silent_sd == 0)  # relu(h)/2 is 0 where relu(h) is
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)
    assert np.all(var == 0)


def _layer1_shift_setup(probes, **knobs):
    """The engine, layer1.0.conv1's model, its config and resolved layer under bit-serial 8-bit inputs, 256 rows and a
    calibrated ADC (``knobs`` on top), and per-input-channel ones and zeros for :func:`adc_clipping_shift`."""
    from cimstat.engine import engine_for
    from cimstat.hardware import HardwareConfig, LayerConfig

    eng = engine_for(probes)
    lm = eng.layers["layer1.0.conv1"]
    c_in = int(lm.channel_of_row.max()) + 1
    cfg = LayerConfig(input_bits=8, weight_bits=8, input_slice_bits=1, rows_per_array=256, adc_range="calibrated",
                      **knobs)
    return eng, lm, cfg, eng.resolve(HardwareConfig(cfg))["layer1.0.conv1"], np.ones(c_in), np.zeros(c_in)


def test_adc_clipping_shift_is_zero_at_the_clean_operating_point_and_undoes_clipping_as_inputs_shrink(default_probes):
    """A calibrated 4-bit ADC under bit-serial inputs clips layer1.0.conv1's largest partial sums (a negative
    gain). At the clean operating point (α = 1, β = 0, sd = 0) nothing moves; with the inputs shrunk fewer partial
    sums clip and the gain moves up (more at a quarter than at a half, never above the loss it had); a max-range
    ADC never moves."""
    from cimstat.engine.layer import adc_clipping_shift
    from cimstat.engine.sources import ErrorSource
    from cimstat.hardware import HardwareConfig, LayerConfig

    eng, lm, cfg, r, ones, zeros = _layer1_shift_setup(default_probes, adc_bits=4)
    d_gain, d_offset, curves = adc_clipping_shift(lm, r, ones, zeros, zeros, zeros, zeros)
    assert np.all(d_gain == 0) and np.all(d_offset == 0)
    y = np.linspace(-50.0, 50.0, 11)[None, :].repeat(lm.weight.shape[0], 0).T   # (11 outputs, C_out)
    assert len(curves) == 2 and np.allclose(curves[0](y) + curves[1](y), 0.0)  # the curvature does not move
    clip_gain = eng.estimate(HardwareConfig(cfg)).layers["layer1.0.conv1"].gain[ErrorSource.ADC_QUANTIZATION]
    assert np.mean(clip_gain) < -0.01
    half = adc_clipping_shift(lm, r, 0.5 * ones, zeros, zeros, zeros, zeros)[0]
    quarter = adc_clipping_shift(lm, r, 0.25 * ones, zeros, zeros, zeros, zeros)[0]
    assert np.mean(quarter > 0) > 0.9          # less clipping: the gain moves up on (nearly) every channel,
    assert 0 < np.mean(half) < np.mean(quarter) <= -np.mean(clip_gain)  # more as the inputs shrink, never past 0
    r_max = eng.resolve(HardwareConfig(LayerConfig(input_bits=8, weight_bits=8, input_slice_bits=1, rows_per_array=256,
                                                   adc_bits=4)))
    assert not np.any(adc_clipping_shift(lm, r_max["layer1.0.conv1"], 0.25 * ones, *[zeros] * 4)[0])


def test_adc_clipping_shift_with_offset_weights_follows_the_lift_of_the_silent_inputs(default_probes):
    """Offset weights: every partial sum holds the offset level times the sum of the inputs. Lifting the inputs
    that are 0 in the clean network (``silent_mean``) pushes partial sums past a calibrated ADC's range: the
    offset falls on (nearly) every channel, more for a larger lift. With the silent inputs left at 0 and the
    active ones as they are, nothing moves."""
    from cimstat.engine.layer import adc_clipping_shift

    _, lm, _, r, ones, zeros = _layer1_shift_setup(default_probes, adc_bits=6, weight_encoding="offset")
    d_gain, d_offset, _ = adc_clipping_shift(lm, r, ones, zeros, zeros, zeros, zeros)
    assert np.all(d_gain == 0) and np.all(d_offset == 0)
    low, high = (adc_clipping_shift(lm, r, ones, zeros, zeros, lift * ones, zeros)[1] for lift in (0.3, 1.0))
    assert np.mean(low < 0) > 0.9 and np.mean(high) < np.mean(low) < 0


def test_padding_taps_are_the_convolutions_zero_padding():
    """On post-ReLU feature maps with few all-zero positions, the geometric padding mask of im2col vectors is the
    unfold of a ones tensor's zeros, for padding 1 and 2 (3x3 and 5x5 kernels)."""
    from cimstat.engine.layer import padding_taps

    gen = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(3, 4, 6, 6, generator=gen) + 1.0)
    for k, p in ((3, 1), (5, 2)):
        vecs = torch.nn.functional.unfold(x, k, padding=p).transpose(1, 2).reshape(-1, 4 * k * k).numpy()
        ones = torch.nn.functional.unfold(torch.ones(3, 4, 6, 6), k, padding=p).transpose(1, 2).reshape(-1, 4 * k * k)
        np.testing.assert_array_equal(padding_taps(vecs, (k, k), (p, p)), ones.numpy() == 0)
    vecs = torch.nn.functional.unfold(x, 3).transpose(1, 2).reshape(-1, 36).numpy()
    assert not padding_taps(vecs, (3, 3), (0, 0)).any()


@pytest.mark.parametrize("pool, shape", [(nn.MaxPool2d(3, 2, 1), (2, 3, 8, 8)), (nn.MaxPool2d(2), (2, 3, 7, 7)),
                                         (nn.MaxPool2d(3, 2, ceil_mode=True), (1, 2, 8, 8)),
                                         (nn.MaxPool2d(3, 1, 1, dilation=2), (1, 2, 9, 9))])
def test_max_pooling_keeps_the_noises_upward_bias(pool, shape):
    """Max pooling of independent Gaussians: Clark's moments match 40,000 sampled maxima (padding never wins);
    the element of largest mean would be off by ~0.5 here. Without noise it is the float max pooling."""
    from cimstat.engine.meanfield import _max_pool_moments

    gen = torch.Generator().manual_seed(6)
    mean = torch.randn(shape, generator=gen)
    var = 0.5 * torch.rand(shape, generator=gen)
    m, v = _max_pool_moments(mean, var, pool)
    draws = mean[None] + var.sqrt()[None] * torch.randn((40_000,) + shape, generator=gen)
    sampled = pool(draws.flatten(0, 1)).reshape((40_000,) + tuple(m.shape))
    assert (pool(mean) - sampled.mean(0)).abs().max() > 0.3   # the bias is there to be found
    assert (m - sampled.mean(0)).abs().max() < 0.03
    assert (v - sampled.var(0)).abs().max() < 0.08
    m0, v0 = _max_pool_moments(mean, torch.zeros_like(var), pool)
    assert torch.equal(m0, pool(mean)) and not v0.any()


def test_channel_cubic_takes_the_clipping_beyond_the_linear_gain():
    """The remainder of a hard clip after its least-squares gain and offset is mostly a cubic in y: the fit has
    zero mean and no covariance with y over the sample, explains most of it, its energy is E[h²], and it holds its
    edge value outside the sample's range."""
    from cimstat.engine.sampled_adc import ChannelCubic

    rng = np.random.default_rng(7)
    y = rng.normal(size=(20_000, 3)) * [1.0, 2.0, 3.0] + [0.0, 1.0, 2.0]
    r = np.clip(y, -2.0, 2.0) - y
    yc = y - y.mean(0)
    r = r - r.mean(0) - yc * (yc * r).mean(0) / (yc * yc).mean(0)
    cubic = ChannelCubic.fit(r, y, lambda a: a.mean(0))
    h = cubic(y)
    np.testing.assert_allclose(h.mean(0), 0.0, atol=1e-8)
    np.testing.assert_allclose((h * yc).mean(0), 0.0, atol=1e-7)
    np.testing.assert_allclose(cubic.energy, (h * h).mean(0), rtol=1e-6)
    assert np.all(cubic.energy > 0.6 * (r * r).mean(0))
    edge = y.max(0)
    np.testing.assert_allclose(cubic(np.stack([edge, edge + 100.0])), cubic(np.stack([edge, edge])), rtol=1e-12)
    t = torch.tensor(y[:5])
    np.testing.assert_allclose(cubic(t).numpy(), h[:5], rtol=1e-12)
    np.testing.assert_allclose(cubic.scaled(0.5)(y[:5]), 0.5 * h[:5], rtol=1e-12)


def test_a_layers_curvature_goes_on_the_mean(block):
    """A curvature term of the last layer adds ``h(W_eff x)`` to its mean (before gain and bias act on it)."""
    x = torch.randn(5, 2, 8, 8)
    net = MeanFieldNetwork(block, x)
    seen = []

    def bend(y):
        seen.append(y.clone())
        return 0.1 * y * y
    pert = LayerPerturbation(gain=np.full(3, -0.2), offset=np.zeros(3), variance=np.zeros(3), curvature=(bend,))
    mean, _ = net.moments({"fc": pert})
    with torch.no_grad():
        clean = block(x).double().numpy()
    wx = seen[0].double().numpy()
    np.testing.assert_allclose(wx, clean - block.fc.bias.detach().double().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, 0.8 * wx + 0.1 * wx * wx + block.fc.bias.detach().double().numpy(),
                               rtol=1e-5, atol=1e-5)


class _ConvPoolFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.avg(self.conv(x)), 1))


def test_errors_fixed_on_the_chip_do_not_average_out_over_positions():
    """The same variance on conv's outputs: per read it shrinks 1/n at the 4x4 average pooling; fixed on the chip
    (one weight draw for every position) it does not, so the logits' variance is 16x as large."""
    torch.manual_seed(8)
    gm = torch.fx.symbolic_trace(_ConvPoolFc().eval())
    x = torch.randn(3, 2, 4, 4)
    net = MeanFieldNetwork(gm, x)
    var = np.array([0.2, 0.5, 1.0])
    m_read, v_read = net.moments({"conv": LayerPerturbation(np.zeros(3), np.zeros(3), var)})
    m_fixed, v_fixed = net.moments({"conv": LayerPerturbation(np.zeros(3), np.zeros(3), var, fixed_variance=var)})
    np.testing.assert_allclose(m_fixed, m_read, rtol=1e-6)
    np.testing.assert_allclose(v_fixed, 16 * v_read, rtol=1e-5)
