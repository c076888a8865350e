"""Profiled ADC calibration through the Monte Carlo observer, on a tiny model; the CLI."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from cimstat.activation_stats import probe_activations
from cimstat.calibrate import Calibrations, resolve
from cimstat.calibrate.__main__ import main
from cimstat.calibrate.profile import empirical_adc_error, profiled_adc_calibrations
from cimstat.cli import run_cli
from cimstat.errors import CalibrationError
from cimstat.hardware import HardwareConfig, LayerConfig
from cimstat.input_sample import collect_input_samples
from cimstat.models import weights_fingerprint
from cimstat.network import fold_batchnorm
from cimstat.probes import ActivationStats, write_stats


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    images = torch.randn(24, 2, 8, 8)
    batches = [(images[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, 24, 8)]
    layers, logits, labels = probe_activations(fold_batchnorm(model), batches)
    meta = {"schema_version": 1, "model": "tiny", "fingerprint": weights_fingerprint(model), "dataset": "random",
            "split": "probe", "n_images": 24, "seed": 0, "created": "test"}
    return model, ActivationStats(meta, layers, logits, labels), batches


CFG = HardwareConfig(LayerConfig(input_bits=6, weight_bits=4, input_slice_bits=3, weight_slice_bits=(1, 2),
                                 rows_per_array=16, adc_bits=4, input_range="calibrated", adc_range="calibrated"))


def test_profiled_one_pass_for_all_layers_and_matches_empirical_optimum(tiny, tmp_path):
    model, stats, batches = tiny
    cal = Calibrations(tmp_path, model=model, method="profiled", profile_loader=batches)
    res = resolve(CFG, stats, cal)
    assert cal.store.computed == len(stats.layers) + 1      # every input range, one profiling pass
    for name, r in res.items():
        rec = cal.records[("adc", name)]
        table = r.ranges.adc_range
        assert table.shape == (2, 2) and np.all(table <= np.asarray(rec["max_range"]))
        assert np.all(np.asarray(rec["expected_error"]) <= np.asarray(rec["expected_error_max"]))
    # partial sums seen by conv2 (unsigned input: one pass): tiles x images x 4x4 positions x C_out, per (i, j)
    n_partial = res["conv2"].config.n_tiles(stats.layers["conv2"].fan_in) * 24 * 16 * 8
    assert cal.records[("adc", "conv2")]["n_partial_sums"] == pytest.approx(4 * n_partial)   # 2x2 slices
    # analytic ranges exist for the same key space and give an empirical error not far above the profiled one
    an = Calibrations(tmp_path, model=model)
    res_an = resolve(CFG, stats, an)
    hist_cal = Calibrations(None, model=model, method="profiled", profile_loader=batches)
    hist = {}
    profiled_adc_calibrations(hist_cal, stats, CFG, histograms=hist)
    hist["h"] = hist["histograms"]
    for name in res:
        c = CFG.layer(name)
        e_prof = empirical_adc_error(hist["h"], name, res[name].ranges.adc_range, c.adc_bits, c.adc_signed, 0.0)
        e_an = empirical_adc_error(hist["h"], name, res_an[name].ranges.adc_range, c.adc_bits, c.adc_signed, 0.0)
        e_max = empirical_adc_error(hist["h"], name, np.asarray(cal.records[("adc", name)]["max_range"]),
                                    c.adc_bits, c.adc_signed, 0.0)
        assert e_prof.sum() <= e_an.sum() * 1.0001 and e_prof.sum() <= e_max.sum()
        assert e_an.sum() < e_max.sum() and e_an.sum() <= 3 * e_prof.sum()


def _with_samples(model, stats, batches, layers=None):
    """Probes holding an input sample of ``layers`` (all): every im2col vector of the 24 probe images."""
    samples = collect_input_samples(fold_batchnorm(model), batches, 24)
    noise = SimpleNamespace(meta={"created": "test"},
                            layers={n: SimpleNamespace(input_sample=v) for n, v in samples.items()
                                    if layers is None or n in layers})
    return SimpleNamespace(stats=stats, noise_prop=noise)


@pytest.mark.parametrize("knobs", [{}, {"signed_input_encoding": "offset", "weight_encoding": "offset",
                                        "weight_slice_bits": (2, 2)},
                                   {"adc_mode": "separate", "input_slice_bits": 1, "rows_per_array": 5}])
def test_sampled_equals_profiled_when_the_sample_is_every_input(tiny, tmp_path, knobs):
    # the sample holds every input vector of the probe images: the partial sums are the profiled ones
    # (passes, slices, encodings, tiles and polarities re-derived independently of the simulator)
    model, stats, batches = tiny
    probes = _with_samples(model, stats, batches)
    assert all(v.input_sample.shape[0] == n for v, n in
               zip(probes.noise_prop.layers.values(), (24 * 64, 24 * 16, 24)))
    cfg = CFG.replace(**knobs)
    sampled = Calibrations(tmp_path, model=model)
    res = resolve(cfg, probes, sampled)
    prof = Calibrations(None, model=model, method="profiled", profile_loader=batches)
    res_prof = resolve(cfg, stats, prof)
    for name in res:
        rec, rec_prof = sampled.records[("adc", name)], prof.records[("adc", name)]
        assert rec["method"] == "sampled"
        np.testing.assert_allclose(res[name].ranges.adc_range, res_prof[name].ranges.adc_range, rtol=1e-3)
        np.testing.assert_allclose(rec["expected_error"], rec_prof["expected_error"], rtol=1e-3, atol=1e-9)
    # stored under its own key: found next time, not recomputed
    again = Calibrations(tmp_path, model=model)
    resolve(cfg, probes, again)
    assert again.store.computed == 0


def test_sampled_broadens_by_device_noise(tiny):
    # programming error spreads the currents the ADC sees: its calibrated range grows
    model, stats, batches = tiny
    probes = _with_samples(model, stats, batches)
    quiet = resolve(CFG, probes, Calibrations(None, model=model))
    noisy = resolve(CFG.replace(programming_error=0.2), probes, Calibrations(None, model=model))
    for name in quiet:
        assert noisy[name].ranges.adc_range.sum() > quiet[name].ranges.adc_range.sum()


def test_profiled_layers_mix_methods(tiny, tmp_path):
    # the sampled default falls back to analytic where the probes hold no sample of the layer
    model, stats, batches = tiny
    cal = Calibrations(tmp_path, model=model, profiled_layers=["conv1"], profile_loader=batches)
    resolve(CFG, _with_samples(model, stats, batches, ["conv2"]), cal)
    assert [cal.records[("adc", n)]["method"] for n in stats.layers] == ["profiled", "sampled", "analytic"]
    with pytest.raises(CalibrationError, match="nope"):
        resolve(CFG, stats, Calibrations(None, model=model, profiled_layers=["nope"]))


def test_fingerprint_mismatch_is_an_error(tiny):
    model, stats, _ = tiny
    other = Tiny().eval()
    with pytest.raises(CalibrationError, match="fingerprint"):
        resolve(CFG, stats, Calibrations(None, model=other))


def test_cli_prints_and_stores(tmp_path, capsys):
    # the default model on 6 probe images; only conv1 and fc analog (fast)
    from cimstat.activation_stats import probe_model
    from cimstat.models import load

    torch.set_num_threads(1)
    stats = probe_model(load("default"), "default", "default", n_images=6, batch_size=6, progress=False)
    write_stats(stats, tmp_path / "stat.pkl")
    analog = {"input_bits": 8, "weight_bits": 4, "input_slice_bits": 4, "weight_slice_bits": 3,
              "rows_per_array": 128, "adc_bits": 5, "input_range": "calibrated", "adc_range": "calibrated"}
    cfg = {"input_bits": None, "weight_bits": None, "layers": {"conv1": analog, "fc": analog}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    argv = ["--probes", str(tmp_path), "--config", str(tmp_path / "cfg.json")]
    assert run_cli(main, argv) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("conv1 ", "fc ", "layer1.0.conv1 "))}
    assert len(lines) == 3 and "computed 4," in out          # 2 input ranges + 2 ADC tables
    assert "float" in lines["layer1.0.conv1"] and "ideal" in lines["layer1.0.conv1"]
    assert lines["conv1"].split()[1] == "±" and lines["fc"].split()[1] == "+"
    assert len(list((tmp_path / "calibrations").glob("adc-*.json"))) == 2
    assert run_cli(main, argv + ["--mc-images", "2"]) == 0
    out = capsys.readouterr().out
    assert "computed 0, found 4 " in out
    mc = [line for line in out.splitlines() if "top-1" in line and "logits SNR" in line]
    assert [line.split(" top-1")[0].strip() for line in mc] == ["max", "calibrated (analytic)"]
    assert run_cli(main, ["--probes", str(tmp_path), "--config", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err
