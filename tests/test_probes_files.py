"""Probe files: round trip, and a clean ProbeFileError for every malformed file."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cimstat import load_probes
from cimstat.activation_stats import probe_activations
from cimstat.errors import ProbeFileError
from cimstat.models import weights_fingerprint
from cimstat.noise_propagation import jacobian_propagation
from cimstat.probes import (NOISE_SCHEMA_VERSION, SCHEMA_VERSION, ActivationStats, NoiseProp, read_stats, write_noise_prop,
                            write_stats)

from test_probing_tiny import TinyNet, _tiny


@pytest.fixture(scope="module")
def tiny_probe_dir(tmp_path_factory):
    folded, images = _tiny()
    torch.manual_seed(1)
    fp = weights_fingerprint(folded)
    layers, logits, labels = probe_activations(folded, [(images, torch.arange(12) % 3)])
    meta = {"schema_version": SCHEMA_VERSION, "model": "tiny", "fingerprint": fp, "dataset": "synthetic",
            "split": "probe", "n_images": 12, "seed": 0, "created": "now"}
    noise, n, _ = jacobian_propagation(folded, [(images, None)])
    d = tmp_path_factory.mktemp("tiny_probes")
    write_stats(ActivationStats(meta, layers, logits, labels), d / "stat.pkl")
    write_noise_prop(NoiseProp({**meta, "method": "jacobian"}, noise), d / "noise_prop.pkl")
    return d, folded


def _copy(src, tmp_path):
    dst = tmp_path / "probes"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, mutate):
    with open(path, "rb") as f:
        doc = pickle.load(f)
    mutate(doc)
    with open(path, "wb") as f:
        pickle.dump(doc, f, protocol=4)


def test_round_trip(tiny_probe_dir):
    d, folded = tiny_probe_dir
    probes = load_probes(d, folded)
    assert list(probes.stats.layers) == ["conv1", "conv2", "fc"]
    assert probes.noise_prop.meta["method"] == "jacobian"
    st = probes.stats.layers["conv2"]
    dw = np.random.default_rng(0).standard_normal((4, st.fan_in))
    assert st.quad_form(dw).shape == (4,) and np.all(st.quad_form(dw) > 0)
    assert probes.stats.logits.shape == (12, 3) and probes.stats.labels.dtype == np.int64
    assert not list(d.glob("*.tmp"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("cut", [0, 1, 100, -1])
def test_truncated_file(tiny_probe_dir, tmp_path, cut):
    d = _copy(tiny_probe_dir[0], tmp_path)
    data = (d / "stat.pkl").read_bytes()
    (d / "stat.pkl").write_bytes(data[:cut] if cut >= 0 else data[:len(data) // 2])
    with pytest.raises(ProbeFileError, match="stat.pkl"):
        load_probes(d)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload", [_Evil(), torch.zeros(3), np.array([object()], dtype=object),
                                     {"schema": "cimstat.stat", "x": TinyNet}])
def test_pickle_importing_anything_else_is_refused(tiny_probe_dir, tmp_path, payload):
    d = _copy(tiny_probe_dir[0], tmp_path)
    _rewrite(d / "stat.pkl", lambda doc: doc["meta"].__setitem__("evil", payload))
    with pytest.raises(ProbeFileError, match="unsafe|refused"):
        load_probes(d)


@pytest.mark.parametrize("file,version", [("stat.pkl", SCHEMA_VERSION + 1), ("noise_prop.pkl", NOISE_SCHEMA_VERSION + 1),
                                          ("noise_prop.pkl", 1)])  # version 1: before the coherent Jacobians
def test_unknown_schema_version(tiny_probe_dir, tmp_path, file, version):
    d = _copy(tiny_probe_dir[0], tmp_path)
    _rewrite(d / file, lambda doc: doc.__setitem__("schema_version", version))
    with pytest.raises(ProbeFileError, match=f"schema version {version} is not supported.*re-run probing"):
        load_probes(d)


@pytest.mark.parametrize("key", ["gain_jac", "offset_jac", "ratio_image", "sens_image"])
def test_partial_coherent_jacobians_are_refused(tiny_probe_dir, tmp_path, key):
    d = _copy(tiny_probe_dir[0], tmp_path)
    _rewrite(d / "noise_prop.pkl", lambda doc: doc["layers"][0].__setitem__(key, None))
    with pytest.raises(ProbeFileError, match="only some of gain_jac"):
        load_probes(d)


def test_coherent_jacobian_of_wrong_shape_is_refused(tiny_probe_dir, tmp_path):
    d = _copy(tiny_probe_dir[0], tmp_path)
    _rewrite(d / "noise_prop.pkl", lambda doc: doc["layers"][0].__setitem__("offset_jac", doc["layers"][0]["offset_jac"][:, :1]))
    with pytest.raises(ProbeFileError, match="offset_jac.*has shape"):
        load_probes(d)


def test_wrong_schema_kind(tiny_probe_dir, tmp_path):
    d = _copy(tiny_probe_dir[0], tmp_path)
    shutil.copy(d / "noise_prop.pkl", d / "stat.pkl")
    with pytest.raises(ProbeFileError, match="schema 'cimstat.noise_prop', expected 'cimstat.stat'"):
        load_probes(d)


def test_fingerprint_mismatch(tiny_probe_dir):
    d, folded = tiny_probe_dir
    other = TinyNet()
    with pytest.raises(ProbeFileError, match="fingerprint"):
        load_probes(d, other)
    with pytest.raises(ProbeFileError, match="fingerprint"):
        load_probes(d, "0123456789abcdef")


def test_noise_prop_for_other_weights(tiny_probe_dir, tmp_path):
    d = _copy(tiny_probe_dir[0], tmp_path)
    _rewrite(d / "noise_prop.pkl", lambda doc: doc["meta"].__setitem__("fingerprint", "ffff"))
    with pytest.raises(ProbeFileError, match="noise_prop.pkl.*made for weights 'ffff'"):
        load_probes(d)


def _with_out_grad(doc, positions=None, scale=1.0, channels=None, input_images=None, weight_grad=False):
    """Give the tiny net's conv1 (2 input channels of 7x9, 4 outputs at 4x5 positions) output gradients and inputs."""
    d = doc["layers"][0]
    n, c_out, n_dir = d["gain_jac"].shape
    d["out_grad"] = np.ones((n, n_dir, c_out, positions or 20), np.float16)
    d["out_grad_scale"] = scale
    d["layer_input"] = np.ones((input_images or n, channels or 2, 7, 9), np.float16)
    if weight_grad:
        d["weight_grad"] = np.ones((n, n_dir, c_out, 18), np.float16)


@pytest.mark.parametrize("mutate, message", [
    (lambda doc: doc["meta"].pop("fingerprint"), "missing key 'fingerprint' in meta"),
    (lambda doc: doc.pop("logits"), "missing key 'logits'"),
    (lambda doc: doc["layers"][1].pop("row_sq_mean"), "missing key 'row_sq_mean' in layer 'conv2'"),
    (lambda doc: doc["layers"][0].pop("m_dense"), "missing key 'm_dense' in layer 'conv1'"),
    (lambda doc: doc["layers"][1].__setitem__("hist_counts", doc["layers"][1]["hist_counts"][:, :-1]), "shape"),
    (lambda doc: doc["layers"][1].__setitem__("row_mean", doc["layers"][1]["row_mean"].astype(np.int64)), "dtype"),
    (lambda doc: doc["layers"][1]["out_sq_mean"].__setitem__(0, np.nan), "non-finite"),
    (lambda doc: doc["layers"][1].__setitem__("zero_counts", doc["layers"][1]["zero_counts"] + 1), "total_counts"),
    (lambda doc: doc.__setitem__("layers", "conv1"), "expected <class 'list'>"),
    (lambda doc: doc["meta"].__setitem__("n_images", 99), "n_images=99"),
    (lambda doc: doc["layers"][0].__setitem__("stride", (2,)), "stride"),
])
def test_malformed_stat_file(tiny_probe_dir, tmp_path, mutate, message):
    d = _copy(tiny_probe_dir[0], tmp_path)
    _rewrite(d / "stat.pkl", mutate)
    with pytest.raises(ProbeFileError, match=message.replace("(", r"\(").replace(")", r"\)").replace("'", ".")):
        load_probes(d)


@pytest.mark.parametrize("mutate, message", [
    (lambda doc: doc["layers"].pop(), "no noise propagation for layer"),
    (lambda doc: doc["layers"][0].__setitem__("ratio", np.ones((3, 3))), "shape"),
    (lambda doc: doc["layers"][1].pop("weight_sens"), "missing key 'weight_sens'"),
    (lambda doc: doc["meta"].pop("method"), "missing key 'method'"),
    (lambda doc: doc["layers"][0].__setitem__("sample_grad_weight", np.ones((5, 4), np.float16)),
     "sample_grad_weight but no input_sample"),
    (lambda doc: doc["layers"][0].update(input_sample=np.ones((5, 18), np.float32),
                                         sample_grad_weight=np.ones((6, 4), np.float16)), "sample_grad_weight.*shape"),
    (lambda doc: _with_out_grad(doc, positions=5), "out_grad.*shape"),
    (lambda doc: _with_out_grad(doc, scale=0.0), "out_grad_scale"),
    (lambda doc: _with_out_grad(doc, channels=3), "layer_input.*channels"),
    (lambda doc: _with_out_grad(doc, input_images=11), "layer_input.*shape"),
    (lambda doc: _with_out_grad(doc, weight_grad=True), "one route per layer"),
])
def test_malformed_noise_prop_file(tiny_probe_dir, tmp_path, mutate, message):
    d = _copy(tiny_probe_dir[0], tmp_path)
    _rewrite(d / "noise_prop.pkl", mutate)
    with pytest.raises(ProbeFileError, match=message):
        load_probes(d)


def test_output_gradients_load_with_their_scale(tiny_probe_dir, tmp_path):
    d = _copy(tiny_probe_dir[0], tmp_path)
    _rewrite(d / "noise_prop.pkl", lambda doc: _with_out_grad(doc, scale=0.25))
    lp = next(iter(load_probes(d).noise_prop.layers.values()))
    assert lp.out_grad.shape == (12, 3, 4, 20) and lp.out_grad_scale == 0.25 and lp.layer_input.shape == (12, 2, 7, 9)


def test_missing_files_and_folders(tiny_probe_dir, tmp_path):
    with pytest.raises(ProbeFileError, match="does not exist"):
        load_probes(tmp_path / "nowhere")
    d = _copy(tiny_probe_dir[0], tmp_path)
    (d / "noise_prop.pkl").unlink()
    assert load_probes(d).noise_prop is None
    with pytest.raises(ProbeFileError, match="noise_prop.pkl' does not exist"):
        load_probes(d, require_noise_prop=True)
    (d / "stat.pkl").unlink()
    with pytest.raises(ProbeFileError, match="stat.pkl' does not exist"):
        load_probes(d)
    (d / "stat.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(ProbeFileError, match="corrupt"):
        read_stats(d / "stat.pkl")


def test_cli_reports_bad_probe_file_in_one_line(tiny_probe_dir, tmp_path):
    bad = tmp_path / "stat.pkl"
    bad.write_bytes(b"\x80\x04garbage")
    proc = subprocess.run([sys.executable, "-m", "probing.noise_prop", "--model", "default", "--stat", str(bad),
                           "--out", str(tmp_path / "np.pkl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "stat.pkl" in proc.stderr and "Traceback" not in proc.stderr
