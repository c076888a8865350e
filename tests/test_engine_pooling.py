"""Per-read noise rectified by max pooling (cimstat.engine.pooling): the shift the linear route adds."""
import numpy as np
import torch
from torch import nn

from cimstat.engine.pooling import max_pool_noise_shift, pooled_layers


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)  # as torchvision's: it overwrites the conv's output
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def _model_and_images():
    torch.manual_seed(0)
    model = _Stem().eval()
    images = torch.zeros(6, 1, 16, 16)             # background with a few strokes: windows of equal elements
    images[:, :, 5:9, 6] = 1.0
    images[3:, :, 10, 2:12] = -0.7
    with torch.no_grad():
        model.conv.bias.copy_(torch.tensor([0.3, -0.1, 0.05, 0.0]))
    return torch.fx.symbolic_trace(model), images


def test_pooled_layers_finds_the_pooling_behind_the_relu():
    gm, _ = _model_and_images()
    assert pooled_layers(gm, {"conv", "head"}) == {"pool": ("conv", True)}
    assert pooled_layers(gm, {"head"}) == {}


def test_max_pool_shift_matches_noise_injection():
    """The shift equals the mean logit change of the float network with the noise injected at the layer output
    (Monte Carlo over 4,000 draws), and it is not zero: the maximum of noisy equal elements sits above them."""
    gm, images = _model_and_images()
    sd = np.array([0.2, 0.1, 0.3, 0.15])
    shift = max_pool_noise_shift(gm, images, {"conv": sd ** 2}, pooled_layers(gm, {"conv"}))
    assert shift.shape == (6, 3)

    gen = torch.Generator().manual_seed(1)
    noise = torch.as_tensor(sd, dtype=torch.float32).reshape(1, -1, 1, 1)
    with torch.no_grad():
        clean = gm(images).double().numpy()
        hook = gm.conv.register_forward_hook(
            lambda _m, _i, out: out + torch.randn(out.shape, generator=gen) * noise)
        try:
            draws = np.stack([gm(images).double().numpy() - clean for _ in range(4000)])
        finally:
            hook.remove()
    mc, se = draws.mean(0), draws.std(0) / np.sqrt(len(draws))
    assert np.abs(shift).max() > 10 * se.max()
    # Clark's pairwise maximum is approximate (within 1e-4 per channel on average on the pooled map, 0.01 at worst)
    assert np.abs(shift - mc).max() < 0.05 * np.abs(mc).max() + 4 * se.max()


def test_no_noise_no_shift():
    gm, images = _model_and_images()
    shift = max_pool_noise_shift(gm, images, {"conv": np.zeros(4)}, pooled_layers(gm, {"conv"}))
    assert np.abs(shift).max() < 1e-6
