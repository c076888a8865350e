"""Activation probing fast paths, checked against direct im2col computation.

Covers what the tiny network of ``test_probing_tiny.py`` does not reach: a strided 1x1
(downsample) conv that reads only its stride grid, an input that turns negative in a later
batch (exact zeros move from the zero slot to explicit counting), batches smaller than the
histogram table (pending bin indices), and the direct tap gather vs the channels-last gather
of the sub-sampled second moment.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cimstat.activation_stats import ProbeSettings, probe_activations
from test_probing_tiny import _direct_patches


class BranchNet(nn.Module):
    """conv(3x3, s1) -> ReLU -> {conv(3x3, s2, p1), downsample conv(1x1, s2)} -> add -> conv(2x2, dil 2) -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.down = nn.Conv2d(5, 6, 1, stride=2)
        self.conv3 = nn.Conv2d(6, 4, 2, dilation=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        z = self.conv2(y) + self.down(y)           # signed input of conv3
        z = self.conv3(z)
        return self.fc(z.mean((2, 3)))


def _net_and_images() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    net = BranchNet().eval()
    images = torch.randn(9, 2, 9, 11)
    images[:, :, 3:5, :] = 0.0
    images[:4] = images[:4].abs()                  # first batch non-negative, later batches signed
    return net, images


def _direct(net: nn.Module, images: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer: im2col patches (N*L, K) and the float output as (C_out, N*L), as numpy."""
    out = {}
    for name, (cols, y) in _direct_patches(net, images).items():
        yc = y.transpose(0, 1).reshape(y.shape[1], -1) if y.ndim == 4 else y.T
        out[name] = (cols.numpy(), yc.numpy())
    return out


@pytest.mark.parametrize("ratio", [None, 0.3])
def test_branch_network_matches_direct_computation(ratio):
    net, images = _net_and_images()
    batches = [(images[:4], torch.zeros(4)), (images[4:6], torch.zeros(2)), (images[6:], torch.zeros(3))]
    settings = ProbeSettings(m_cost_ratio=ratio, m_min_patches_per_batch=2)
    layers, _, _ = probe_activations(net, batches, settings=settings)
    direct = _direct(net, images)
    assert not layers["conv1"].signed_input or images.min() < 0
    assert layers["conv3"].signed_input
    for name, st in layers.items():
        x, yc = direct[name]
        n, k = x.shape
        assert st.n_patches == n
        np.testing.assert_allclose(st.row_mean, x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st.row_sq_mean, (x * x).mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st.out_mean, yc.mean(1), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(st.out_sq_mean, (yc ** 2).mean(1), rtol=1e-5)
        ch = st.channel_of_row
        for c in range(st.in_channels):
            v = x[:, ch == c].ravel()
            assert st.total_counts[c] == v.size
            assert st.zero_counts[c] == np.sum(v == 0), (name, c)
            hist, _ = np.histogram(v[v != 0], bins=st.hist_edges)
            np.testing.assert_array_equal(st.hist_counts[c], hist, err_msg=f"{name} channel {c}")
        m = x.T @ x / n
        if ratio is None:
            np.testing.assert_allclose(st.matrix(), m, rtol=1e-5, atol=1e-6 * np.abs(m).max())
        else:
            np.testing.assert_allclose(np.diag(st.matrix()), np.diag(m), rtol=1e-6)   # diagonal stays exact


def test_zero_slot_survives_negative_values_in_a_later_batch():
    """A layer fed non-negative values first and signed values later keeps exact zero and bin -1 counts."""
    net, images = _net_and_images()
    batches = [(images[i:i + 2], torch.zeros(2)) for i in range(0, 9, 2)]
    layers, _, _ = probe_activations(net, batches, settings=ProbeSettings(m_cost_ratio=None))
    x, _ = _direct(net, images)["conv1"]
    st = layers["conv1"]
    assert st.signed_input and st.hist_edges[0] < 0
    for c in range(st.in_channels):
        v = x[:, st.channel_of_row == c].ravel()
        assert st.zero_counts[c] == np.sum(v == 0)
        np.testing.assert_array_equal(st.hist_counts[c], np.histogram(v[v != 0], bins=st.hist_edges)[0])


def test_bin_edges_hit_exactly():
    """Inputs lying exactly on bin edges (including max|x|) land in the bin they open, as np.histogram."""
    lin = nn.Linear(4, 2)
    width = 2.0 / 1024
    x = torch.tensor([[0.0, width, 2.0, 3 * width], [1.0, 0.5, 0.0, 2.0 - width]])
    layers, _, _ = probe_activations(lin, [(x, torch.zeros(2))], settings=ProbeSettings(m_cost_ratio=None))
    st = layers[""] if "" in layers else next(iter(layers.values()))
    v = x.double().numpy()
    for c in range(4):
        col = v[:, c]
        assert st.zero_counts[c] == np.sum(col == 0)
        np.testing.assert_array_equal(st.hist_counts[c], np.histogram(col[col != 0], bins=st.hist_edges)[0])
