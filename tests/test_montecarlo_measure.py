"""convert(), measure() and the command line of the Monte Carlo referee."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from cimstat.errors import ConfigError
from cimstat.hardware import PRESETS, HardwareConfig, LayerConfig
from cimstat.montecarlo import (
    AnalogLayer,
    analog_modules,
    convert,
    measure,
    resolve_from_data,
    set_partial_sum_observer,
)

torch.set_num_threads(1)


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> pool -> linear: signed conv1 input, unsigned later inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.bn1.running_mean.normal_(0, 0.3)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.bias.normal_(0, 0.5)
    return model


def _data(n: int = 24, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    model = _tiny()
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[:3] = (y[:3] + 1) % 4  # the float model gets 3 images wrong
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_ideal_config_reproduces_the_float_network():
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    analog = convert(model, PRESETS["ideal"])
    assert len(analog_modules(analog)) == 21
    assert not any(isinstance(m, nn.BatchNorm2d) for m in analog.modules())
    with torch.no_grad():
        ref, out = model(x), analog(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_convert_needs_ranges_for_quantized_inputs_and_checks_names():
    model = _tiny()
    with pytest.raises(ConfigError, match="conv1.*resolved input range"):
        convert(model, PRESETS["int8"], {})
    with pytest.raises(ConfigError, match="unknown layer name"):
        convert(model, HardwareConfig(LayerConfig(input_bits=None, weight_bits=None), layers={"conv9": {}}))
    resolved = resolve_from_data(model, PRESETS["int8"], _data()[0][0])
    other = resolve_from_data(model, PRESETS["int8"].replace(weight_bits=6), _data()[0][0])
    with pytest.raises(ConfigError, match="another config"):
        convert(model, PRESETS["int8"], {"conv1": other["conv1"], "conv2": resolved["conv2"], "fc": resolved["fc"]})
    with pytest.raises(ConfigError, match="calibrate"):
        resolve_from_data(model, PRESETS["bitserial-2b-slices"], _data()[0][0])


def test_resolve_from_data_finds_sign_and_max_ranges():
    model = _tiny()
    config = HardwareConfig(LayerConfig(input_bits=6, weight_bits=6, input_slice_bits=2, adc_bits=5),
                            layers={"fc": {"input_range": 3.5, "adc_range": 40.0}})
    resolved = resolve_from_data(model, config, _data()[0][0])
    assert resolved["conv1"].ranges.signed_input and not resolved["conv2"].ranges.signed_input
    assert resolved["conv1"].ranges.input_range == pytest.approx(float(_data()[0][0].abs().max()))
    assert resolved["conv2"].ranges.adc_range.shape == (3, 1)
    assert resolved["conv2"].ranges.adc_range[2, 0] == 54 * 3 * 31
    assert resolved["fc"].ranges.input_range == 3.5 and np.all(resolved["fc"].ranges.adc_range == 40.0)


def test_measure_ideal_config_is_exact_and_counts_accuracy():
    data = _data()
    result = measure(_tiny(), PRESETS["ideal"], None, data, instances=2, progress=False, model_name="tiny")
    assert result.n_images == 24 and result.layers == ["conv1", "conv2", "fc"]
    assert result.float_top1 == pytest.approx(21 / 24)
    assert result.top1_per_instance == [pytest.approx(21 / 24)] * 2 and result.top1_std == 0.0
    assert all(math.isinf(v) for v in result.isolated_snr_db.values())
    assert math.isinf(result.logits_snr_db)


def test_measure_noisy_config_snr_accuracy_and_reproducibility(tmp_path):
    model, data = _tiny(), _data()
    config = HardwareConfig(LayerConfig(input_bits=6, weight_bits=5, input_slice_bits=2, weight_slice_bits=2,
                                        rows_per_array=16, adc_bits=6, programming_error=0.03, read_noise=0.02),
                            seed=4, name="noisy")
    resolved = resolve_from_data(model, config, data[0][0])
    a = measure(model, config, resolved, data, instances=2, n_images=20, progress=False)
    b = measure(model, config, resolved, data, instances=2, n_images=20, progress=False)
    assert a.n_images == 20
    assert a.isolated_snr_db == b.isolated_snr_db and a.top1_per_instance == b.top1_per_instance
    for name in a.layers:
        assert 5 < a.isolated_snr_db[name] < 60
        assert a.e2e_snr_db[name] <= a.isolated_snr_db[name] + 1.0  # errors accumulate through the network
    assert a.isolated_snr_db_per_instance["conv1"][0] != a.isolated_snr_db_per_instance["conv1"][1]
    # pooled SNR lies between the per-instance ones
    per = a.isolated_snr_db_per_instance["conv2"]
    assert min(per) - 1e-9 <= a.isolated_snr_db["conv2"] <= max(per) + 1e-9
    row = a.to_row()
    assert row["conv1_snr_db"] == a.isolated_snr_db["conv1"] and row["config"] == "noisy"
    assert "snr_e2e_db[conv2]" in row and "conv2" in a.table()
    a.write_json(tmp_path / "out.json")
    loaded = json.loads((tmp_path / "out.json").read_text())
    assert loaded["top1_mean"] == pytest.approx(a.top1_mean) and loaded["layers"] == a.layers


def test_measure_snr_equals_a_hand_computation():
    """Deterministic chips (programming error only): isolated conv2 SNR and top-1 recomputed by hand."""
    from cimstat.network import fold_batchnorm

    model, data = _tiny(), _data()
    config = HardwareConfig(LayerConfig(input_bits=5, weight_bits=4, weight_slice_bits=1, adc_bits=7,
                                        programming_error=0.08), seed=1)
    resolved = resolve_from_data(model, config, data[0][0])
    result = measure(model, config, resolved, data, instances=2, progress=False)
    folded = fold_batchnorm(model)
    signal = error = 0.0
    hits = []
    per_image = torch.zeros(24, dtype=torch.int64)
    for inst in range(2):
        analog = convert(model, config, resolved, instance=inst)
        conv2 = analog_modules(analog)["conv2"]
        correct = 0
        for b, (x, y) in enumerate(data):
            with torch.no_grad():
                h = torch.relu(folded.conv1(x))
                ideal = folded.conv2(h).double()
                noisy = conv2(h).double()
                right = analog(x).argmax(dim=1) == y
                correct += int(right.sum())
                per_image[b * len(y):(b + 1) * len(y)] += right
            signal += float((ideal ** 2).sum())
            error += float(((noisy - ideal) ** 2).sum())
        hits.append(correct / 24)
    assert result.isolated_snr_db["conv2"] == pytest.approx(10 * math.log10(signal / error), abs=1e-6)
    assert result.top1_per_instance == pytest.approx(hits)
    # per image, in loader order: on how many chips the analog net was right, and whether the float net was
    assert result.correct_instances_per_image == per_image.tolist()
    float_right = torch.cat([folded(x).argmax(dim=1) == y for x, y in data]).tolist()
    assert result.float_correct_per_image == float_right and sum(float_right) == round(24 * result.float_top1)
    assert isinstance(conv2, AnalogLayer)


def test_partial_sum_observer_sees_every_conversion():
    model, data = _tiny(), _data()
    config = HardwareConfig(LayerConfig(input_bits=4, weight_bits=4, input_slice_bits=2, weight_slice_bits=(1, 2),
                                        rows_per_array=20, adc_bits=6, adc_mode="separate"))
    resolved = resolve_from_data(model, config, data[0][0])
    analog = convert(model, config, resolved)
    calls: dict[tuple[str, int, int], int] = {}

    def observe(name, i, j, tensor):
        calls[(name, i, j)] = calls.get((name, i, j), 0) + 1
        assert tensor.ndim == 3 and bool((tensor >= 0).all())  # separate mode: each polarity is non-negative

    set_partial_sum_observer(analog, observe)
    with torch.no_grad():
        analog(data[0][0])
    # conv1 (signed, split): 2 passes per input slice x 2 polarities; conv2/fc: 1 pass x 2 polarities
    assert calls[("conv1", 0, 0)] == 4 and calls[("conv1", 1, 1)] == 4
    assert calls[("conv2", 1, 0)] == 2 and calls[("fc", 0, 1)] == 2
    assert {n for n, _, _ in calls} == {"conv1", "conv2", "fc"}
    set_partial_sum_observer(analog, None)
    assert all(m.partial_sum_observer is None for m in analog_modules(analog).values())


@pytest.mark.slow
def test_cli_runs_the_default_model(tmp_path, capsys):
    from cimstat.cli import run_cli
    from cimstat.montecarlo.__main__ import main

    out = tmp_path / "mc.json"
    code = run_cli(main, ["--config", "int8", "--n-images", "4", "--instances", "1", "--batch-size", "4",
                          "--ranges", "data", "--n-range-images", "4", "--json", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0 and "layer4.1.conv2" in text and "logits" in text
    data = json.loads(out.read_text())
    assert data["n_images"] == 4 and 0.0 <= data["top1_mean"] <= 1.0
    assert data["isolated_snr_db"]["conv1"] > 25  # 8-bit inputs and weights


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path, capsys):
    from cimstat.cli import run_cli
    from cimstat.montecarlo.__main__ import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"adc_bits": -3}))
    assert run_cli(main, ["--config", str(bad), "--ranges", "data", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adc_bits" in err[0]
