"""The own-images diagnostic: chip logits from the referee, and the breakdown of a top-1 error."""
import json

import numpy as np
import pytest

from cimstat.errors import SweepError
from cimstat.sweeps.own_images import ChipLogits, breakdown, chip_logits, own_images_main


def _synthetic(bias_sd: float, noise_sd: float, chips: int = 12, n: int = 300, c: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n, c)) * 2.0
    labels = clean.argmax(1)
    bias = rng.normal(size=(chips, 1, c)) * bias_sd            # each chip's common class bias
    logits = clean[None] + bias + rng.normal(size=(chips, n, c)) * noise_sd
    return ChipLogits(logits, clean, labels)


def test_chip_common_class_bias_is_found_and_removed():
    b = breakdown(_synthetic(bias_sd=1.0, noise_sd=0.0))
    assert b["mc_top1"] < 90.0                                    # the bias costs accuracy ...
    assert b["top1_without_chip_bias"] == pytest.approx(100.0)    # ... and is all of the error
    assert all(0.5 < s < 1.6 for s in b["class_bias_sd"])
    assert b["mc_top1_chip_min"] <= b["mc_top1"] <= b["mc_top1_chip_max"]


def test_gaussian_errors_independent_between_classes_are_predicted_by_the_quadrature():
    b = breakdown(_synthetic(bias_sd=0.0, noise_sd=0.8, chips=200, n=200))
    # per-image moments over 200 chips: the quadrature and the sampled covariance both meet the truth
    assert abs(b["gauss_diag_top1"] - b["mc_top1"]) < 1.0
    assert abs(b["gauss_cov_top1"] - b["mc_top1"]) < 1.0
    assert b["mc_top1_se"] < 0.5


def test_one_chip_leaves_the_spread_entries_nan():
    b = breakdown(_synthetic(bias_sd=0.5, noise_sd=0.5, chips=1))
    assert b["chips"] == 1 and np.isnan(b["mc_top1_se"]) and np.isnan(b["gauss_diag_top1"])


def test_chip_logits_of_a_noiseless_design_equal_the_referee_on_every_chip(default_probes):
    from cimstat import data, models
    from cimstat.calibrate import resolve
    from cimstat.hardware import HardwareConfig, LayerConfig
    from cimstat.montecarlo import convert

    images, labels = data.default_tensors("probe")
    images, labels = images[:16], labels[:16]
    cfg = HardwareConfig(LayerConfig(input_bits=None, weight_bits=5), name="w5")
    model = models.load("default")
    res = resolve(cfg, default_probes)
    got = chip_logits(model, cfg, res, images, labels, chips=2, batch_size=8, progress=False)
    assert got.logits.shape == (2, 16, 10) and got.clean.shape == (16, 10)
    np.testing.assert_allclose(got.logits[0], got.logits[1])     # weight rounding only: every chip the same
    ref = convert(model, cfg, res, instance=0)(images).double().detach().numpy()
    np.testing.assert_allclose(got.logits[0], ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got.logits[0], got.clean)


def test_cli_refuses_a_sweep_of_another_model(tmp_path):
    sweep = tmp_path / "other.py"
    sweep.write_text('name = "other"\nmodel = "resnet18"\nprobes = "x"\npoints = [{"label": "a", "weight_bits": 6}]\n')
    with pytest.raises(SweepError, match="default model"):
        own_images_main([str(sweep), "--subset", "label == 'a'"])


def test_cli_refuses_zero_chips_before_any_work(tmp_path):
    with pytest.raises(SweepError, match="--chips=0"):
        own_images_main([str(tmp_path / "missing.py"), "--subset", "label == 'a'", "--chips", "0"])
