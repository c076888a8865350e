"""Monte Carlo columns of a validation row: means, standard errors, per-layer columns, the Monte Carlo cache."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from cimstat.sweeps.evaluators import column_layer, layer_column, mc_columns, probe_defaults


def fake_result(**over):
    base = dict(isolated_snr_db={"conv1": 30.0, "layer1.0.conv1": 25.0, "fc": 20.0},
                isolated_snr_db_per_instance={"conv1": [29.9, 30.1], "layer1.0.conv1": [25.0, 25.0], "fc": [20, 20]},
                logits_snr_db=15.0, logits_snr_db_per_instance=[14.0, 16.0], top1_per_instance=[0.90, 0.80],
                float_top1=0.95)
    base.update(over)
    return SimpleNamespace(**base)


def test_mc_columns_means_and_standard_errors():
    row = mc_columns(fake_result(), n_images=100)
    assert row["mc_conv1_snr_db"] == 30.0 and row["mc_fc_snr_db"] == 15.0
    assert row["mc_top1"] == pytest.approx(0.85) and row["mc_top1_clean"] == 0.95
    assert row["mc_conv1_snr_se_db"] == pytest.approx(np.std([29.9, 30.1], ddof=1) / math.sqrt(2))
    assert row["mc_fc_snr_se_db"] == pytest.approx(np.std([14.0, 16.0], ddof=1) / math.sqrt(2))
    p = (0.85 * 100 + 2) / 104
    binomial = math.sqrt(p * (1 - p) / 104)
    spread = np.std([0.9, 0.8], ddof=1) / math.sqrt(2)
    assert row["mc_top1_se_pp"] == pytest.approx(100 * math.hypot(binomial, spread))
    assert row[layer_column("mc_snr_db[", "layer1.0.conv1")] == 25.0


def test_perfect_accuracy_still_has_an_error_bar_and_one_instance_has_no_spread():
    row = mc_columns(fake_result(top1_per_instance=[1.0], logits_snr_db_per_instance=[15.0],
                                 isolated_snr_db_per_instance={"conv1": [30.0]}), n_images=250)
    assert row["mc_top1"] == 1.0 and 0.2 < row["mc_top1_se_pp"] < 1.0
    assert math.isnan(row["mc_conv1_snr_se_db"]) and math.isnan(row["mc_fc_snr_se_db"])


def test_layer_columns_round_trip_and_probe_defaults():
    col = layer_column("snr_db[", "layer2.0.downsample.0")
    assert col == "snr_db[layer2.0.downsample.0]"
    assert column_layer(col, "snr_db[") == "layer2.0.downsample.0"
    assert column_layer("mc_snr_db[fc]", "snr_db[") is None
    assert probe_defaults({"model": "resnet18-imagenet", "dataset": "imagenet"}) == ("resnet18-imagenet", "imagenet")
    assert probe_defaults({}) == ("default", "default")


def test_programmed_instances_apply_only_where_programming_error_is_on(tmp_path):
    """One chip is one draw of programming errors: those combinations get their own (larger) chip count,
    also in the Monte Carlo cache key; everything else keeps --instances."""
    from cimstat.hardware import HardwareConfig, LayerConfig
    from cimstat.sweeps.evaluators import ValidationEvaluator
    from cimstat.sweeps.spec import Combination

    ev = ValidationEvaluator(tmp_path, instances=2, programmed_instances=8)
    plain = Combination(0, {}, HardwareConfig(LayerConfig(read_noise=0.05)))
    prog = Combination(1, {}, HardwareConfig(LayerConfig(programming_error=0.02)))
    one_layer = Combination(2, {}, HardwareConfig(LayerConfig(), layers={"fc": {"programming_error": 0.01}}))
    assert [ev.instances_for(c) for c in (plain, prog, one_layer)] == [2, 8, 8]
    assert ValidationEvaluator(tmp_path, instances=3).instances_for(prog) == 3


def _resolved(input_range: float, adc: np.ndarray | None):
    from cimstat.hardware import LayerRanges

    return {"conv1": SimpleNamespace(ranges=LayerRanges(True, 3.0, None)),
            "layer1.0.conv1": SimpleNamespace(ranges=LayerRanges(False, input_range, adc))}


def test_range_summary_matches_float_noise_but_not_another_calibration():
    """Probes made with another thread count move ranges in the last float bits: that must not
    rerun the Monte Carlo; a real range change, a missing ADC or another channel count must."""
    from cimstat.sweeps.evaluators import ADC_RANGE_MATCH_RTOL, RANGE_MATCH_RTOL, range_summary, ranges_match

    adc = np.linspace(500.0, 700.0, 64).reshape(8, 8)
    ref = range_summary(_resolved(6.6079879, adc))
    assert ranges_match(ref, range_summary(_resolved(6.6079869, adc * (1 + 1e-5))))
    assert not ranges_match(ref, range_summary(_resolved(6.6079879 * (1 + 10 * RANGE_MATCH_RTOL), adc)))
    flipped = adc.copy()
    flipped[3, :4] *= 1.05  # a few columns at the neighbouring calibration candidate: the same design
    assert ranges_match(ref, range_summary(_resolved(6.6079879, flipped)))
    # a recalibration: every range moved by more than the tolerance
    assert not ranges_match(ref, range_summary(_resolved(6.6079879, adc * (1 + 2 * ADC_RANGE_MATCH_RTOL))))
    moved = adc.copy()
    moved[3, 3] *= 3.0  # one channel's range far off (its sum of squares moves by more than the tolerance)
    assert not ranges_match(ref, range_summary(_resolved(6.6079879, moved)))
    assert not ranges_match(ref, range_summary(_resolved(6.6079879, None)))
    assert not ranges_match(ref, range_summary(_resolved(6.6079879, np.linspace(500.0, 700.0, 65))))
    assert not ranges_match(ref, {k: v for k, v in ref.items() if k != "conv1"})


def test_monte_carlo_cache_is_reused_within_tolerance_and_rerun_otherwise(tmp_path, monkeypatch):
    from cimstat.hardware import HardwareConfig, LayerConfig
    from cimstat.sweeps import evaluators
    from cimstat.sweeps.spec import Combination

    calls = []

    def fake_measure(model, config, resolved, loader, instances, progress, device):
        calls.append(resolved)
        return fake_result(logits_snr_db=15.0 + len(calls))

    import cimstat.montecarlo

    monkeypatch.setattr(cimstat.montecarlo, "measure", fake_measure)
    ev = evaluators.ValidationEvaluator(tmp_path, n_images=100, cache_dir=tmp_path / "cache")
    ev._fingerprint, ev._model, ev._loader = "weights-a", None, None
    combo = Combination(0, {}, HardwareConfig(LayerConfig(read_noise=0.05)))
    adc = np.full((2, 4), 600.0)
    first = ev.monte_carlo(combo, _resolved(6.6, adc))
    assert not first["mc_cached"] and first["mc_fc_snr_db"] == 16.0
    again = ev.monte_carlo(combo, _resolved(6.6 * (1 + 1e-7), adc * (1 + 1e-5)))
    assert again["mc_cached"] and again["mc_fc_snr_db"] == 16.0 and len(calls) == 1
    other = ev.monte_carlo(combo, _resolved(6.6, adc * 1.01))  # recalibrated ADC: measured again
    assert not other["mc_cached"] and other["mc_fc_snr_db"] == 17.0
    ev._fingerprint = "weights-b"  # other weights: another key
    assert ev.cached_monte_carlo(combo, _resolved(6.6, adc * 1.01)) is None
    (tmp_path / "cache" / f"{ev.mc_cache_key(combo)}.json").write_text("{not json")
    assert ev.cached_monte_carlo(combo, _resolved(6.6, adc * 1.01)) is None  # a damaged entry is recomputed


def _mc(correct, float_right, instances, spread=0.0):
    """Cached MC columns of a run on len(correct) images (c_i of `instances` chips right, f_i float right)."""
    correct, float_right = np.asarray(correct), np.asarray(float_right)
    return {"mc_top1": correct.mean() / instances, "mc_top1_clean": float_right.mean(), "mc_top1_se_pp": 9.9,
            "mc_top1_spread_se": spread, "mc_image_correct": correct.tolist(),
            "mc_image_float_correct": float_right.tolist()}


def test_top1_over_the_split_carries_the_paired_drop_to_the_float_accuracy_of_every_image():
    """The MC ran on 200 of 1000 split images: its top-1 over the split is the float network's there plus the
    drop measured image by image; the error bar is that of the drop (with the finite-population factor)."""
    from cimstat.sweeps.evaluators import Top1Control, top1_over_split

    rng = np.random.default_rng(0)
    float_right = (rng.random(200) < 0.95).astype(int)
    correct = 2 * float_right
    correct[:6] = 0  # six images lost on both chips, one gained on one chip
    correct[np.flatnonzero(float_right == 0)[0]] = 1
    row = top1_over_split(_mc(correct, float_right, 2, spread=0.002), Top1Control(0.97, 1000), instances=2)
    drop = correct.mean() / 2 - float_right.mean()
    assert row["mc_top1"] == pytest.approx(0.97 + drop) and row["mc_top1_clean"] == 0.97
    assert row["mc_top1_sample"] == pytest.approx(correct.mean() / 2) and row["mc_top1_images"] == 1000
    d = correct / 2 - float_right
    se = math.sqrt((1 - 200 / 1000) * d.var(ddof=1) / 200 + 0.002 ** 2)
    assert row["mc_top1_se_kind"] == "paired" and row["mc_top1_se_pp"] == pytest.approx(100 * se)
    assert row["mc_top1_se_pp"] < row["mc_top1_sample_se_pp"]
    # the MC on every image of the split: its own top-1, and only the chip spread left in the error bar
    whole = top1_over_split(_mc(correct, float_right, 2, spread=0.002), Top1Control(float_right.mean(), 200), 2)
    assert whole["mc_top1"] == pytest.approx(correct.mean() / 2) and whole["mc_top1_se_pp"] == pytest.approx(0.2)


def test_top1_over_the_split_without_per_image_results_or_control():
    """Entries cached before per-image results keep their own (unpaired) error bar; without a control the
    columns are the sample's; a control over fewer images than the MC ran on is refused."""
    from cimstat.errors import SweepError
    from cimstat.sweeps.evaluators import Top1Control, top1_over_split

    old = {"mc_top1": 0.95, "mc_top1_clean": 0.97, "mc_top1_se_pp": 1.4}
    row = top1_over_split(old, Top1Control(0.98, 1000), instances=2)
    assert row["mc_top1"] == pytest.approx(0.96) and row["mc_top1_se_pp"] == 1.4
    assert row["mc_top1_se_kind"] == "unpaired"
    plain = top1_over_split(_mc([2, 2, 0, 1], [1, 1, 1, 0], 2), None, instances=2)
    assert plain["mc_top1"] == pytest.approx(5 / 8) and plain["mc_top1_se_kind"] == "sample"
    with pytest.raises(SweepError, match="control covers 3 images"):
        top1_over_split(_mc([2, 2, 0, 1], [1, 1, 1, 0], 2), Top1Control(0.9, 3), instances=2)


def test_split_control_needs_a_random_order_and_enough_images(tmp_path):
    from cimstat.errors import SweepError
    from cimstat.sweeps.evaluators import ValidationEvaluator

    ev = ValidationEvaluator(tmp_path, dataset="imagenet", n_images=50, top1_images=500)
    with pytest.raises(SweepError, match="random order"):
        ev._top1_control()
    assert ValidationEvaluator(tmp_path, dataset="imagenet", n_images=50)._top1_control() is None
    with pytest.raises(SweepError, match="at least --n-images"):
        ValidationEvaluator(tmp_path, n_images=50, top1_images=20)._top1_control()


def test_entries_of_a_compatible_simulator_are_found_and_refresh_replaces_them(tmp_path, monkeypatch):
    """A cache written by an earlier simulator whose measurements the current one reproduces stays valid;
    --mc-refresh reruns it and the new entry (with per-image results) is taken from then on."""
    from cimstat.hardware import HardwareConfig, LayerConfig
    from cimstat.sweeps import evaluators
    from cimstat.sweeps.spec import Combination

    calls = []

    def fake_measure(model, config, resolved, loader, instances, progress, device):
        calls.append(1)
        return fake_result(correct_instances_per_image=[2, 1], float_correct_per_image=[True, True])

    import cimstat.montecarlo

    monkeypatch.setattr(cimstat.montecarlo, "measure", fake_measure)
    monkeypatch.setattr(evaluators, "COMPATIBLE_SIMULATORS", ("old-simulator",))
    ev = evaluators.ValidationEvaluator(tmp_path, n_images=2, cache_dir=tmp_path / "cache")
    ev._fingerprint, ev._model, ev._loader = "weights-a", None, None
    combo = Combination(0, {}, HardwareConfig(LayerConfig(read_noise=0.05)))
    resolved = _resolved(6.6, None)
    import json

    old = {"ranges": evaluators.range_summary(resolved), "mc": {"mc_top1": 0.5, "mc_fc_snr_db": 3.0}}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{ev.mc_cache_key(combo, 'old-simulator')}.json").write_text(json.dumps(old))
    assert ev.monte_carlo(combo, resolved)["mc_fc_snr_db"] == 3.0 and not calls
    ev.refresh_cache = True
    fresh = ev.monte_carlo(combo, resolved)
    assert not fresh["mc_cached"] and fresh["mc_image_correct"] == [2, 1] and len(calls) == 1
    ev.refresh_cache = False
    again = ev.monte_carlo(combo, resolved)
    assert again["mc_cached"] and again["mc_fc_snr_db"] == 15.0 and len(calls) == 1
