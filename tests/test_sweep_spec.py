"""Sweep files: expansion into combinations, per-layer overrides, and fast, clear failures."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cimstat.errors import SweepError
from cimstat.hardware import WeightEncoding
from cimstat.sweeps.spec import build_sweep, format_value, load_sweep

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "s.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_cartesian_product_order_and_columns(tmp_path):
    spec = load_sweep(write(tmp_path, """
        params_sweep_list = {"adc_bits": [4, 6], "rows_per_array": [64, 128, 256]}
        fixed = {"input_slice_bits": 1}
    """))
    assert spec.name == "s"
    assert spec.parameters == ("adc_bits", "rows_per_array")
    got = [(c.params["adc_bits"], c.params["rows_per_array"]) for c in spec.combinations]
    assert got == [(4, 64), (4, 128), (4, 256), (6, 64), (6, 128), (6, 256)]
    c = spec.combinations[4]
    assert c.index == 4
    assert c.config.default.adc_bits == 6 and c.config.default.rows_per_array == 128
    assert c.config.default.input_slice_bits == 1  # fixed applies everywhere


def test_three_line_first_experiment_per_layer():
    spec = load_sweep(REPO / "sweeps" / "conv1_weight_bits.py")
    assert len(REPO.joinpath("sweeps", "conv1_weight_bits.py").read_text().strip().splitlines()) == 3
    assert spec.parameters == ("conv1.weight_bits",)
    assert [c.params["conv1.weight_bits"] for c in spec.combinations] == list(range(6, 15))
    cfg = spec.combinations[2].config
    assert cfg.layer("conv1").weight_bits == 8 and cfg.layer("conv1").input_bits == 8
    assert cfg.layer("layer1.0.conv1").weight_bits is None  # the rest stays float
    spec.check_layer_names(["conv1", "fc"])
    with pytest.raises(SweepError, match="unknown layer name"):
        spec.check_layer_names(["fc"])


def test_nested_and_dotted_layer_keys_are_the_same(tmp_path):
    a = load_sweep(write(tmp_path, 'params_sweep_list = {"layer1.0.conv1": {"adc_bits": [4, 5]}}', "a.py"))
    b = load_sweep(write(tmp_path, 'params_sweep_list = {"layer1.0.conv1.adc_bits": [4, 5]}', "b.py"))
    assert a.parameters == b.parameters == ("layer1.0.conv1.adc_bits",)
    assert [c.key for c in a.combinations] == [c.key for c in b.combinations]
    assert a.combinations[1].config.layer("layer1.0.conv1").adc_bits == 5
    assert a.combinations[1].config.layer("conv1").adc_bits is None


def test_points_times_product_labels_and_layer_overrides(tmp_path):
    spec = load_sweep(write(tmp_path, """
        name = "mixed"
        base = "int8"
        layer_overrides = {"fc": {"weight_bits": 6}}
        points = [{"label": "a", "weight_encoding": "offset"}, {"label": "b", "read_noise": 0.02}]
        params_sweep_list = {"seed": [0, 1]}
    """))
    assert spec.name == "mixed"
    assert [(c.label, c.params.get("seed")) for c in spec.combinations] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert spec.parameters == ("weight_encoding", "read_noise", "seed")
    first, last = spec.combinations[0].config, spec.combinations[3].config
    assert first.default.weight_encoding is WeightEncoding.OFFSET and last.seed == 1
    assert last.default.read_noise == 0.02 and "read_noise" not in spec.combinations[0].params
    assert first.layer("fc").weight_bits == 6 and first.layer("conv1").weight_bits == 8


def test_a_layer_taken_digital_in_one_word_in_points_fixed_and_overrides(tmp_path):
    """``"conv1": "digital"`` sets every field a float, noiseless, ADC-free layer needs (one override of the
    whole layer instead of nine that each error names in turn); the other layers keep the swept design."""
    spec = load_sweep(write(tmp_path, """
        fixed = {"input_slice_bits": 2, "adc_bits": 6, "rows_per_array": 128, "adc_thermal_noise_lsb": 0.5}
        layer_overrides = {"fc": "digital"}
        points = [{"label": "ends", "conv1": "digital"}, {"label": "core", "read_noise": 0.01}]
    """))
    ends, core = (c.config for c in spec.combinations)
    for layer in (ends.layer("conv1"), ends.layer("fc"), core.layer("fc")):
        assert layer.input_bits is None and layer.weight_bits is None and layer.adc_bits is None
        assert layer.input_slice_bits is None and layer.adc_thermal_noise_lsb == 0 and layer.read_noise == 0
    assert core.layer("conv1").adc_bits == 6 and ends.layer("layer1.0.conv1").input_slice_bits == 2
    with pytest.raises(SweepError, match="layer_overrides must map layer names to .* or 'digital'"):
        load_sweep(write(tmp_path, 'layer_overrides = {"fc": "analog"}\npoints = [{}]'))


def test_list_values_become_tuples_and_csv_format(tmp_path):
    spec = load_sweep(write(tmp_path, 'params_sweep_list = {"weight_slice_bits": [[3, 4], 2, None]}'))
    assert spec.combinations[0].config.default.weight_slice_bits == (3, 4)
    assert [format_value(c.params["weight_slice_bits"]) for c in spec.combinations] == ["(3, 4)", 2, "None"]


def test_keys_are_stable_across_loads(tmp_path):
    path = write(tmp_path, 'params_sweep_list = {"adc_bits": [4, 6], "programming_error_model": ["proportional"]}')
    assert [c.key for c in load_sweep(path).combinations] == [c.key for c in load_sweep(path).combinations]


@pytest.mark.parametrize("body, message", [
    ('params_sweep_list = {"adc_bitz": [4]}', "unknown parameter 'adc_bitz'"),
    ('params_sweep_list = {"conv1": {"adc_bitz": [4]}}', "'adc_bitz' is not a hardware field"),
    ('params_sweep_list = {"conv1.adc_bitz": [4]}', "'adc_bitz' is not a hardware field"),
    ('params_sweep_list = {"adc_bits": [4, -1]}', r"adc_bits=-1"),
    ('params_sweep_list = {"adc_bits": []}', "empty list"),
    ('params_sweep_list = {"adc_bits": 6}', "must be a list"),
    ('params_sweep_list = {"weight_encoding": ["diferential"]}', "weight_encoding='diferential' is not allowed"),
    ('params_sweep_list = {"weight_slice_bits": [(3, 3)]}', "weight_slice_bits"),
    ('params_sweep_list = {"read_noise": [float("nan")]}', "read_noise=nan"),
    ('params_sweep_list = {"adc_bits": [4]}\nfixed = {"input_bits": None}', "adc_bits"),
    ('params_sweep_list = {"adc_bits": [4, 4]}', "appears twice"),
    ('points = [{"label": "x"}, {"label": "x"}]', "used more than once"),
    ('points = [{"adc_bits": 4}]\nparams_sweep_list = {"adc_bits": [5]}', "also sweeps"),
    ('points = {"adc_bits": 4}', "points must be a non-empty list"),
    ('fixed = {"adc_bits": 4}', "neither 'params_sweep_list' nor 'points'"),
    ('params_sweep_lists = {"adc_bits": [4]}', "unknown name"),
    ('params_sweep_list = {"adc_bits": [4]}\nbase = "no-such-preset"', "base"),
    ('params_sweep_list = {"adc_bits": [4]}\nname = "a/b"', "folder name"),
    ('params_sweep_list = {"seed": [-1]}', "seed=-1"),
    ('params_sweep_list = {"adc_bits": [4]\n', "syntax error"),
    ('import nonexistent_module_xyz\nparams_sweep_list = {"adc_bits": [4]}', "ModuleNotFoundError"),
])
def test_bad_sweep_files_fail_with_one_clear_line(tmp_path, body, message):
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(write(tmp_path, body))
    assert "\n" not in str(info.value)


def test_missing_and_non_python_files(tmp_path):
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "nope.py")
    with pytest.raises(SweepError, match="Python file"):
        load_sweep(write(tmp_path, "{}", "s.json"))


def test_helpers_with_underscore_and_imports_are_allowed():
    spec = build_sweep({"_alphas": [0.01], "math": __import__("math"),
                        "points": [{"read_noise": 0.01}]}, name="x")
    assert len(spec.combinations) == 1


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "sweeps").glob("*.py")
                                        if p.name != "__init__.py" and "__main__" not in p.read_text()),  # not the CLI modules
                         ids=lambda p: p.stem)
def test_shipped_sweep_files_load(path):
    spec = load_sweep(path)
    assert spec.combinations and (spec.description or path.stem == "conv1_weight_bits")  # the 3-line file


def test_validation_sweep_covers_the_knobs():
    spec = load_sweep(REPO / "sweeps" / "validation.py")
    assert len(spec.combinations) >= 30
    configs = [c.config.default for c in spec.combinations]
    seen = lambda f: {getattr(c, f) for c in configs}  # noqa: E731
    assert {4, 5, 6, 8} <= seen("input_bits") and {4, 5, 6, 8} <= seen("weight_bits")
    assert {1, 2, 4} <= seen("weight_slice_bits") and 1 in seen("input_slice_bits")
    assert {"differential", "offset"} <= {str(v) for v in seen("weight_encoding")}
    assert {4, 5, 6, 7, 8} <= seen("adc_bits")
    assert {"max", "calibrated"} <= {str(v) for v in seen("adc_range")}
    assert min(r for r in seen("rows_per_array") if r) <= 64 and max(r for r in seen("rows_per_array") if r) >= 1152
    assert {0.5, 4.0} <= seen("adc_thermal_noise_lsb")
    for kind in ("programming_error", "read_noise"):
        models = {str(c.__getattribute__(kind + "_model")) for c in configs if getattr(c, kind) > 0}
        assert models == {"proportional", "state_independent"}
        alphas = {getattr(c, kind) for c in configs if getattr(c, kind) > 0}
        assert min(alphas) <= 0.01 and max(alphas) >= 0.10


def test_cli_rejects_a_bad_file_before_anything_runs(tmp_path):
    bad = write(tmp_path, 'params_sweep_list = {"adc_bits": [4, 0]}')
    for module in ("sweeps.run", "sweeps.validate"):
        proc = subprocess.run([sys.executable, "-m", module, str(bad), "--out", str(tmp_path / "out")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and "adc_bits=0" in proc.stderr
        assert not (tmp_path / "out").exists()
