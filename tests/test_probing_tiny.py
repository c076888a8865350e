"""Probing on a tiny synthetic network, checked against direct computation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.activation_stats import ProbeSettings, low_rank_plus_diag, probe_activations
from cimstat.network import analog_layers, fold_batchnorm
from cimstat.noise_propagation import injection_ratio, jacobian_propagation


class TinyNet(nn.Module):
    """conv(s2) -> BN -> ReLU -> conv -> BN -> += residual -> ReLU -> avgpool -> fc (in-place ops as torchvision)."""

    def __init__(self, n_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, n_classes)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        z += y
        z = self.relu(z)
        return self.fc(torch.flatten(self.pool(z), 1))


def _tiny(n_classes: int = 3, dtype=torch.float32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    net = TinyNet(n_classes).eval()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.data.normal_(0, 0.3)
    folded = fold_batchnorm(net).to(dtype)
    images = torch.randn(12, 2, 7, 9, dtype=dtype)
    images[:, :, :2, :] = 0.0  # exact zeros in the input (besides padding)
    return folded, images


def _direct_patches(folded: nn.Module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every analog layer's (im2col patches (N*L, K), float output) by hooks + F.unfold."""
    specs = analog_layers(folded, images[:1])
    mods = dict(folded.named_modules())
    seen = {}
    hooks = [mods[s.name].register_forward_hook(
        lambda m, i, o, s=s: seen.__setitem__(s.name, (i[0].clone(), o.clone()))) for s in specs]
    with torch.no_grad():
        folded(images)
    for h in hooks:
        h.remove()
    out = {}
    for s in specs:
        x, y = seen[s.name]
        if s.kind == "conv":
            cols = F.unfold(x, s.kernel_size, dilation=s.dilation, padding=s.padding, stride=s.stride)
            cols = cols.transpose(1, 2).reshape(-1, s.fan_in)
        else:
            cols = x.reshape(x.shape[0], -1)
        out[s.name] = (cols.double(), y.double())
    return out


@pytest.mark.parametrize("settings", [ProbeSettings(m_cost_ratio=None),
                                      ProbeSettings(m_cost_ratio=None, m_dense_max_k=4, m_rank=100)],
                         ids=["dense", "eig"])
def test_statistics_match_direct_computation(settings):
    folded, images = _tiny()
    batches = [(images[:5], torch.zeros(5)), (images[5:], torch.ones(7))]
    layers, logits, labels = probe_activations(folded, batches, settings=settings)
    direct = _direct_patches(folded, images)
    assert list(layers) == ["conv1", "conv2", "fc"]
    with torch.no_grad():
        np.testing.assert_allclose(logits, folded(images).numpy(), rtol=1e-6)
    assert labels.tolist() == [0] * 5 + [1] * 7
    for name, st in layers.items():
        cols, y = direct[name]
        x = cols.numpy()
        n, k = x.shape
        assert st.n_patches == n and st.fan_in == k
        np.testing.assert_allclose(st.row_mean, x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st.row_sq_mean, (x * x).mean(0), rtol=1e-6, atol=1e-9)
        m = x.T @ x / n
        np.testing.assert_allclose(st.matrix(), m, rtol=1e-5, atol=1e-6 * np.abs(m).max())
        dw = np.random.default_rng(0).standard_normal((5, k))
        np.testing.assert_allclose(st.quad_form(dw), np.einsum("ck,kl,cl->c", dw, m, dw), rtol=1e-5)
        ch = st.channel_of_row
        for c in range(st.in_channels):
            v = x[:, ch == c].ravel()
            assert st.total_counts[c] == v.size
            assert st.zero_counts[c] == np.sum(v == 0)
            hist, _ = np.histogram(v[v != 0], bins=st.hist_edges)
            np.testing.assert_array_equal(st.hist_counts[c], hist)
            assert st.hist_counts[c].sum() == np.sum(v != 0)  # no value outside the edges
        yc = y.transpose(0, 1).reshape(y.shape[1], -1).numpy() if y.ndim == 4 else y.T.numpy()
        np.testing.assert_allclose(st.out_mean, yc.mean(1), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st.out_sq_mean, (yc ** 2).mean(1), rtol=1e-6)
        assert st.input_min == pytest.approx(float(x.min()) if name != "conv1" else float(images.min()))
        assert st.signed_input == (name == "conv1")
    assert layers["conv1"].zero_counts.min() > 0  # padding and the zeroed rows count as exact zeros
    assert layers["conv2"].m_method == ("dense" if settings.m_dense_max_k >= 36 else "eig+diag")


def test_histogram_bins_are_fine_enough_for_8_bit_quantization():
    folded, images = _tiny()
    layers, _, _ = probe_activations(folded, [(images, torch.zeros(12))])
    for st in layers.values():
        width = np.diff(st.hist_edges)
        np.testing.assert_allclose(width, width[0])
        lsb = max(abs(st.input_min), abs(st.input_max)) / 255
        assert lsb / width[0] >= 4


def test_subsampled_second_moment_keeps_exact_diagonal():
    folded, images = _tiny()
    settings = ProbeSettings(m_cost_ratio=0.05, m_min_patches_per_batch=3)
    layers, _, _ = probe_activations(folded, [(images[:6], torch.zeros(6)), (images[6:], torch.zeros(6))],
                                     settings=settings)
    direct = _direct_patches(folded, images)
    st = layers["conv2"]
    x = direct["conv2"][0].numpy()
    assert st.m_n_patches < x.shape[0]
    np.testing.assert_allclose(np.diag(st.matrix()), (x * x).mean(0), rtol=1e-6)


def test_low_rank_plus_diag_is_exact_for_low_rank_matrices():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 6))
    m = a @ a.T + np.diag(rng.uniform(0, 1e-9, 50))
    v, lam, d = low_rank_plus_diag(m, rank=6)
    rebuilt = (v.astype(np.float64) * lam) @ v.T.astype(np.float64) + np.diag(d)
    np.testing.assert_allclose(rebuilt, m, atol=1e-5 * np.abs(m).max())


def _brute_force_jacobians(folded: nn.Module, images: torch.Tensor, name: str):
    """Per image: dz/dy (n_cls, C, P) and dz/dW (n_cls, C, K) by torch.func jacobians."""
    from torch.func import functional_call, jacrev

    mod = dict(folded.named_modules())[name]
    params = {k: v.detach() for k, v in folded.named_parameters()}
    wkey = f"{name}.weight"
    with torch.no_grad():
        y0 = []
        h = mod.register_forward_hook(lambda m, i, o: y0.append(o))
        folded(images[:1])
        h.remove()
    shape = y0[0].shape[1:]
    ratio, sens = 0.0, 0.0
    for img in images:
        def z_of_delta(delta):
            h = mod.register_forward_hook(lambda m, i, o: o + delta)
            try:
                return functional_call(folded, params, (img[None],))[0]
            finally:
                h.remove()

        def z_of_w(w):
            return functional_call(folded, {**params, wkey: w}, (img[None],))[0]

        jy = jacrev(z_of_delta)(torch.zeros(shape, dtype=images.dtype))           # (n_cls, C, ...)
        jw = jacrev(z_of_w)(params[wkey])                                           # (n_cls, C, ...)
        n_cls, c = jy.shape[:2]
        ratio = ratio + (jy.reshape(n_cls, c, -1) ** 2).sum(2).T
        sens = sens + (jw.reshape(n_cls, c, -1) ** 2).sum(0)
    return ratio / len(images), sens / len(images)


def test_jacobian_propagation_matches_brute_force():
    folded, images = _tiny(dtype=torch.float64)
    layers, n, est = jacobian_propagation(folded, [(images[:5], None), (images[5:], None)])
    assert n == 12 and est == "exact_per_class"
    for name in ("conv1", "conv2", "fc"):
        ratio, sens = _brute_force_jacobians(folded, images, name)
        lp = layers[name]
        np.testing.assert_allclose(lp.ratio, ratio.numpy(), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(lp.weight_sens, sens.numpy(), rtol=1e-6, atol=1e-12)  # stored float32
        assert lp.weight_sens.shape == (lp.ratio.shape[0], dict(folded.named_modules())[name].weight[0].numel())
    np.testing.assert_allclose(layers["fc"].ratio, np.eye(3), atol=1e-7)  # noise on a logit reaches only it


def test_weight_sens_class_sums_to_weight_sens():
    folded, images = _tiny(dtype=torch.float64)
    layers, _, _ = jacobian_propagation(folded, [(images, None)])
    for lp in layers.values():
        np.testing.assert_allclose(lp.weight_sens_class.sum(1), lp.weight_sens.sum(1), rtol=1e-6)


def test_random_projections_estimate_class_sums():
    folded, images = _tiny(n_classes=40, dtype=torch.float64)
    exact, _, _ = jacobian_propagation(folded, [(images, None)])
    proj, _, est = jacobian_propagation(folded, [(images, None)], class_probes=100, seed=3)
    assert est.startswith("rademacher_projections(100)")
    for name in ("conv1", "conv2"):
        e, p = exact[name], proj[name]
        np.testing.assert_allclose(p.ratio.sum(1), e.ratio.sum(1), rtol=0.15)
        np.testing.assert_allclose(p.weight_sens.sum(1), e.weight_sens.sum(1), rtol=0.15)
        np.testing.assert_allclose(p.weight_sens_class.sum(1), e.weight_sens_class.sum(1), rtol=0.15)
        assert np.ptp(p.ratio, axis=1).max() < 1e-12 * p.ratio.max()  # uniform over classes


def test_injection_agrees_with_jacobian_in_the_linear_regime():
    folded, images = _tiny(dtype=torch.float64)
    layers, _, _ = jacobian_propagation(folded, [(images, None)])
    for name in ("conv1", "conv2"):
        inj = injection_ratio(folded, name, images, 1e-5, draws=120, seed=1)
        jac = layers[name].ratio
        rel = np.abs(inj.sum(1) - jac.sum(1)) / jac.sum(1)
        assert rel.max() < 0.15, (name, rel)  # statistical: 12 images x 120 draws


def test_weight_sens_predicts_weight_perturbation():
    """Σ_k s² S_k = E Σ_j Δz_j² for dW ~ N(0, s²) of one layer (linear regime), measured by perturbing."""
    folded, images = _tiny(dtype=torch.float64)
    layers, _, _ = jacobian_propagation(folded, [(images, None)])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = folded(images)
        for name in ("conv1", "conv2"):
            mod = dict(folded.named_modules())[name]
            w0 = mod.weight.detach().clone()
            s = 1e-6
            measured = []
            for _ in range(150):
                mod.weight.copy_(w0 + s * torch.randn(w0.shape, generator=gen, dtype=w0.dtype))
                measured.append(float(((folded(images) - z0) ** 2).sum(1).mean()))
            mod.weight.copy_(w0)
            predicted = s * s * layers[name].weight_sens.sum()
            assert abs(10 * np.log10(np.mean(measured) / predicted)) < 0.4  # 150 draws


def test_input_samples_are_real_patch_vectors():
    """Every sampled vector is one of the layer's im2col vectors, spread over all images, and the
    sampling is deterministic; layers above the fan-in limit keep none."""
    from cimstat.input_sample import collect_input_samples

    folded, images = _tiny()
    direct = _direct_patches(folded, images)
    batches = [(images[:5], None), (images[5:], None)]
    got = collect_input_samples(folded, batches, len(images), size=40, max_fan_in=36, seed=3)
    again = collect_input_samples(folded, batches, len(images), size=40, max_fan_in=36, seed=3)
    assert set(got) == {"conv1", "conv2", "fc"}  # fan-ins 18, 36, 4
    assert set(got) == set(again)
    for name, sample in got.items():
        np.testing.assert_array_equal(sample, again[name])
        cols = direct[name][0].float().numpy()
        n_pos = cols.shape[0] // len(images)
        assert sample.shape == (min(40, len(images) * min(n_pos, 4)), cols.shape[1])
        # each sampled row equals some patch row; rows come from every image
        match = np.abs(sample[:, None, :] - cols[None, :, :]).max(-1) < 1e-6
        assert match.any(1).all(), name
        images_hit = {int(np.flatnonzero(row)[0]) // n_pos for row in match}
        assert len(images_hit) == len(images), name
    few = collect_input_samples(folded, batches, len(images), size=40, max_fan_in=18, seed=3)
    assert set(few) == {"conv1", "fc"}


def test_wide_layers_keep_a_smaller_float16_sample(monkeypatch):
    """Layers above SMALL_FAN_IN keep about SAMPLE_ELEMENTS / K vectors (at least LARGE_SAMPLE_MIN) in
    float16: the same patch vectors, rounded to half precision."""
    import cimstat.input_sample as sampling

    folded, images = _tiny()
    batches = [(images[:5], None), (images[5:], None)]
    full = sampling.collect_input_samples(folded, batches, len(images), size=40, seed=3)
    monkeypatch.setattr(sampling, "SMALL_FAN_IN", 20)
    monkeypatch.setattr(sampling, "SAMPLE_ELEMENTS", 36 * 6)
    monkeypatch.setattr(sampling, "LARGE_SAMPLE_MIN", 3)
    assert sampling.sample_size(18, 40) == 40 and sampling.sample_size(36, 40) == 6
    got = sampling.collect_input_samples(folded, batches, len(images), size=40, seed=3)
    assert got["conv1"].dtype == np.float32 and got["conv2"].dtype == np.float16
    assert got["conv2"].shape == (6, 36)
    assert full["conv2"].dtype == np.float32
    direct = _direct_patches(folded, images)["conv2"][0].float().numpy().astype(np.float16).astype(np.float32)
    match = np.abs(got["conv2"].astype(np.float32)[:, None, :] - direct[None, :, :]).max(-1) == 0
    assert match.any(1).all()


def test_gradient_weights_are_the_logit_sensitivity_of_each_sampled_output():
    """``collect_input_samples_with_gradients`` keeps the same vectors as ``collect_input_samples`` and, per
    vector and output channel, ``Σ_j (∂z_j/∂y_{c,p})²`` of its own image and position (relative to the
    sample's mean), checked against autograd on every output of the tiny network (in-place residual included)."""
    from cimstat.input_sample import collect_input_samples, collect_input_samples_with_gradients

    folded, images = _tiny(n_classes=3)
    images = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    batches = [(images[:5], None), (images[5:], None)]
    plain = collect_input_samples(folded, batches, len(images), size=40, seed=3)
    samples, weights = collect_input_samples_with_gradients(folded, batches, len(images), size=40, seed=3)
    assert set(samples) == set(plain) == set(weights) == {"conv1", "conv2", "fc"}
    direct = _direct_patches(folded, images)
    # autograd reference: Σ_j (∂z_j/∂y)² at every output of every layer
    mods = dict(folded.named_modules())
    outs = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o) or o.clone())
             for n in samples]
    x = images.clone().requires_grad_(True)
    z = folded(x)
    for h in hooks:
        h.remove()
    energy = {n: 0.0 for n in samples}
    for j in range(z.shape[1]):
        grads = torch.autograd.grad(z[:, j].sum(), [outs[n] for n in samples], retain_graph=True)
        for n, g in zip(samples, grads):
            energy[n] = energy[n] + g.reshape(g.shape[0], g.shape[1], -1) ** 2
    for name, sample in samples.items():
        np.testing.assert_array_equal(sample, plain[name])
        got = weights[name].astype(np.float64)
        assert got.shape == (sample.shape[0], outs[name].shape[1])
        cols = direct[name][0].float().numpy()
        n_pos = cols.shape[0] // len(images)
        match = np.abs(sample[:, None, :] - cols[None, :, :]).max(-1) < 1e-6
        unique = match.sum(1) == 1
        assert unique.sum() >= 0.8 * len(sample), name
        where = match[unique].argmax(1)
        ref = energy[name].detach().numpy()[where // n_pos, :, where % n_pos]    # (vectors, C_out)
        assert np.all(ref.max(0) > 0), name
        got_u = got[unique]
        np.testing.assert_allclose(got_u / got_u.mean(0), ref / ref.mean(0), rtol=2e-3, atol=2e-3, err_msg=name)


def test_gradient_weights_by_class_projections_approach_the_exact_ones():
    """With ``class_probes`` random ±1 projections (the 1000-class route) the sampled vectors are the same and
    the weights are unbiased estimates of the exact per-class sums: with 400 projections over 3 classes every
    channel's weights correlate with the exact ones at > 0.95 (a channel whose exact weights are all equal:
    within 25 %), and a wrong count is refused."""
    from cimstat.input_sample import collect_input_samples_with_gradients

    folded, images = _tiny(n_classes=3)
    images = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    batches = [(images[:5], None), (images[5:], None)]
    exact_s, exact_w = collect_input_samples_with_gradients(folded, batches, len(images), size=40, seed=3)
    proj_s, proj_w = collect_input_samples_with_gradients(folded, batches, len(images), size=40, seed=3,
                                                          class_probes=400)
    for name in ("conv1", "conv2"):
        np.testing.assert_array_equal(exact_s[name], proj_s[name])
        a, b = exact_w[name].astype(np.float64), proj_w[name].astype(np.float64)
        for c in range(a.shape[1]):
            if a[:, c].std() == 0:  # the same sensitivity at every sampled output: the estimate scatters ~7 %
                np.testing.assert_allclose(b[:, c], a[:, c], rtol=0.25)
            else:
                assert np.corrcoef(a[:, c], b[:, c])[0, 1] > 0.95, (name, c)
    with pytest.raises(ValueError, match="class_probes"):
        collect_input_samples_with_gradients(folded, batches, len(images), size=40, class_probes=0)
