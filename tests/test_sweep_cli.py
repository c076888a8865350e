"""The sweep commands on the real default model: run, validate, kill + --resume, report.

Uses the default model's probes (``cimstat.probes.ensure_default_probes``, cached under
``.cache/probes/default``) and the conv1-only sweep (only conv1 is analog, so the Monte
Carlo is cheap); a handful of validation images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cimstat.sweeps.rundir import MARKER
from conftest import kill_after_journal

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "sweeps" / "conv1_weight_bits.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe_dir() -> Path:
    from cimstat.probes import ensure_default_probes

    return Path(ensure_default_probes(progress=False))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_run_writes_summary_and_plots(tmp_path, probe_dir):
    proc = _cli("sweeps.run", str(SWEEP), "--probes", str(probe_dir), "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "conv1_weight_bits").iterdir())
    assert not (run_dir / MARKER).exists()
    frame = pd.read_csv(run_dir / "summary.csv")
    assert list(frame["conv1.weight_bits"]) == list(range(6, 15))
    for col in ("conv1_snr_db", "fc_snr_db", "top1", "err_weight_quantization", "est_seconds"):
        assert frame[col].notna().all(), col
    assert frame["conv1_snr_db"].is_monotonic_increasing  # more conv1 weight bits, less error
    assert (run_dir / "conv1.weight_bits.png").stat().st_size > 1000
    assert f"summary CSV: {run_dir}/summary.csv" in proc.stdout


def test_unknown_layer_fails_before_anything_runs(tmp_path, probe_dir):
    bad = tmp_path / "bad.py"
    bad.write_text('params_sweep_list = {"conv9": {"weight_bits": [4, 6]}}\n')
    proc = _cli("sweeps.run", str(bad), "--probes", str(probe_dir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "unknown layer name(s) ['conv9']" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--mc-refresh", "--no-mc-cache"], "--mc-refresh replaces cached results"),
    (["--top1-images", "8"], "--top1-images=8 must be at least --n-images=16"),
])
def test_validate_rejects_contradictory_options(tmp_path, probe_dir, extra, message):
    proc = _cli("sweeps.validate", str(SWEEP), "--probes", str(probe_dir), "--out", str(tmp_path / "out"),
                "--n-images", "16", *extra)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "out").exists()


def test_validate_killed_midway_resumes_exactly_once(tmp_path, probe_dir):
    args = ["sweeps.validate", str(SWEEP), "--probes", str(probe_dir), "--out", str(tmp_path), "--subset", "0:3",
            "--n-images", "16", "--instances", "1", "--batch-size", "16", "--no-mc-cache", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    journal = kill_after_journal(proc, tmp_path / "conv1_weight_bits", "*/validation.jsonl", 1, 240)
    run_dir = journal.parent
    n_killed = journal.read_text().count("\n")
    assert (run_dir / MARKER).exists() and 1 <= n_killed <= 3

    done = _cli(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (run_dir / MARKER).exists()
    combos = [json.loads(line)["combo"] for line in journal.read_text().splitlines()]
    assert sorted(combos) == [0, 1, 2]  # every combination exactly once
    frame = pd.read_csv(run_dir / "validation.csv")
    assert list(frame["combo"]) == [0, 1, 2]
    for col in ("mc_conv1_snr_db", "mc_fc_snr_db", "mc_top1", "err_conv1_db", "err_fc_db", "err_top1_pp",
                "mc_seconds", "snr_db[conv1]", "mc_snr_db[conv1]"):
        assert frame[col].notna().all(), col
    assert (frame["err_conv1_db"] - (frame["conv1_snr_db"] - frame["mc_conv1_snr_db"])).abs().max() < 1e-9
    # the MC top-1 is reported over the whole 1,000-image split, the float network as control variate
    assert (frame["mc_top1_images"] == 1000).all() and (frame["mc_top1_se_kind"] == "paired").all()
    drop = frame["mc_top1_sample"] - frame["mc_top1_clean_sample"]
    assert ((frame["mc_top1"] - (frame["mc_top1_clean"] + drop).clip(0, 1)).abs() < 1e-12).all()
    assert (frame["mc_top1_clean"] - 0.987).abs().max() < 1e-9  # the float network on the whole split
    assert (run_dir / "validation_scatter.png").is_file() and (run_dir / "validation.md").is_file()
    assert [p.name for p in (tmp_path / "conv1_weight_bits").iterdir()] == [run_dir.name]
