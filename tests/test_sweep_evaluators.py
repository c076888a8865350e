"""Monte Carlo columns of a validation row: means, standard errors, per-layer columns, cache key."""
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
