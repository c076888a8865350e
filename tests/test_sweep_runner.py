"""The sweep runner: journal, INCOMPLETE marker, kill + --resume, parallel jobs, subsets, plots.

The evaluator is injected, so these tests use a small deterministic fake (a row is a known
function of the combination) and need neither probes nor the engine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cimstat.errors import EstimationError, SweepError
from cimstat.sweeps.plots import _metric_values, plot_designs, plot_metrics, plot_validation
from cimstat.sweeps.report import compact_table, top1_error_in_standard_errors, validation_report, validation_stats
from cimstat.sweeps.rundir import MARKER, RunDir
from cimstat.sweeps.runner import prepare_run_dir, run_combinations
from cimstat.sweeps.spec import build_sweep
from cimstat.sweeps.subset import subset_mask
from conftest import kill_after_journal

REPO = Path(__file__).resolve().parent.parent


def expected_row(adc_bits: int, rows: int) -> dict:
    return {"conv1_snr_db": 6.0 * adc_bits - 0.01 * rows, "fc_snr_db": 5.0 * adc_bits, "top1": 1 - 2.0 ** -adc_bits}


class FakeEvaluator:
    """Deterministic rows; ``fail_on`` adc_bits raise EstimationError, ``crash_on`` raise a bug."""

    def __init__(self, fail_on: int | None = None, crash_on: int | None = None):
        self.fail_on, self.crash_on, self.setups = fail_on, crash_on, 0

    def setup(self) -> None:
        self.setups += 1

    def __call__(self, combo):
        cfg = combo.config.default
        if cfg.adc_bits == self.fail_on:
            raise EstimationError("adc_bits: cannot estimate this one")
        if cfg.adc_bits == self.crash_on:
            raise ZeroDivisionError("a bug")
        return {**expected_row(cfg.adc_bits, cfg.rows_per_array), "est_seconds": 0.001}


GRID = {"params_sweep_list": {"adc_bits": [4, 5, 6], "rows_per_array": [64, 128]}}


def start(tmp_path, namespace=GRID, resume=False, options=None, kind="summary"):
    spec = build_sweep(namespace, name="grid")
    run, resumed = prepare_run_dir(spec, spec.combinations, kind=kind, out_root=tmp_path / "out",
                                   options=options or {"n": 1}, resume=resume)
    return spec, run, resumed


def check_complete(run: RunDir, spec) -> pd.DataFrame:
    assert run.complete and not (run.path / MARKER).exists()
    frame = pd.read_csv(run.csv_path)
    assert list(frame["combo"]) == list(range(len(spec.combinations)))
    for _, row in frame.iterrows():
        exp = expected_row(int(row["adc_bits"]), int(row["rows_per_array"]))
        for key, value in exp.items():
            assert row[key] == pytest.approx(value)
    lines = run.journal_path.read_text().splitlines()
    assert sorted(json.loads(line)["combo"] for line in lines) == list(range(len(spec.combinations)))
    return frame


def test_run_writes_journal_csv_and_removes_marker(tmp_path):
    spec, run, resumed = start(tmp_path)
    assert not resumed and (run.path / MARKER).exists() and run.path.parent.name == "grid"
    ev = FakeEvaluator()
    result = run_combinations(spec, spec.combinations, ev, run_dir=run, progress=False)
    frame = check_complete(run, spec)
    assert list(frame.columns[:3]) == ["combo", "adc_bits", "rows_per_array"]
    assert result.n_run == 6 and result.n_errors == 0 and ev.setups == 1
    manifest = run.manifest()
    assert manifest["kind"] == "summary" and len(manifest["combos"]) == 6


def test_truncated_last_line_is_dropped_and_rerun(tmp_path):
    spec, run, _ = start(tmp_path)
    run_combinations(spec, spec.combinations[:0], FakeEvaluator(), run_dir=run, progress=False)  # nothing
    # simulate a run killed after two rows and in the middle of writing a third
    spec, run, _ = start(tmp_path)
    run.append(0, spec.combinations[0].key, expected_row(4, 64))
    run.append(1, spec.combinations[1].key, expected_row(4, 128))
    run.close()
    with open(run.journal_path, "ab") as fh:
        fh.write(b'{"combo": 2, "key": "{\\"lab')
    (run.path / ".tmp-99-summary.csv").write_text("half a csv")  # a kill during an atomic write
    again, resumed = prepare_run_dir(spec, spec.combinations, kind="summary", out_root=tmp_path / "out",
                                     options={"n": 1}, resume=True)
    assert resumed and again.path == run.path
    result = run_combinations(spec, spec.combinations, FakeEvaluator(), run_dir=again, progress=False)
    assert result.n_run == 4
    check_complete(again, spec)
    assert not list(again.path.glob(".tmp-*"))


def test_resume_refuses_another_sweep_or_other_options(tmp_path):
    spec, run, _ = start(tmp_path)
    run.close()
    other = {"params_sweep_list": {"adc_bits": [4, 5, 7], "rows_per_array": [64, 128]}}
    with pytest.raises(SweepError, match="combinations changed"):
        start(tmp_path, namespace=other, resume=True)
    with pytest.raises(SweepError, match="options differ.*n: 1 then, 2 now"):
        start(tmp_path, resume=True, options={"n": 2})
    with pytest.raises(SweepError, match="not a 'validation' run"):
        prepare_run_dir(spec, spec.combinations, kind="validation", out_root=tmp_path, options={}, resume=run.path)
    run_combinations(spec, spec.combinations, FakeEvaluator(), run_dir=run, progress=False)
    with pytest.raises(SweepError, match="already complete"):
        start(tmp_path, resume=run.path)
    _, fresh, resumed = start(tmp_path, resume=True)  # nothing unfinished: a new run
    assert not resumed and fresh.path != run.path


def test_estimation_errors_become_rows_and_bugs_stop_the_run(tmp_path):
    spec, run, _ = start(tmp_path)
    result = run_combinations(spec, spec.combinations, FakeEvaluator(fail_on=5), run_dir=run, progress=False)
    frame = pd.read_csv(run.csv_path)
    assert result.n_errors == 2 and frame.columns[-1] == "error"
    assert frame.loc[frame["adc_bits"] == 5, "error"].str.contains("EstimationError").all()
    assert frame.loc[frame["adc_bits"] != 5, "error"].isna().all()

    spec, run, _ = start(tmp_path)
    with pytest.raises(SweepError, match="ZeroDivisionError"):
        run_combinations(spec, spec.combinations, FakeEvaluator(crash_on=5), run_dir=run, progress=False)
    assert (run.path / MARKER).exists() and len(run.read_journal()) == 2  # adc 4 rows kept
    run_combinations(spec, spec.combinations, FakeEvaluator(), run_dir=run, progress=False)
    check_complete(run, spec)


def test_lock_prevents_two_processes_on_one_run(tmp_path):
    spec, run, _ = start(tmp_path)
    run.lock()
    try:
        with pytest.raises(SweepError, match="another process"):
            run_combinations(spec, spec.combinations, FakeEvaluator(), run_dir=RunDir(run.path, "summary"),
                             progress=False)
    finally:
        run.close()


def test_subset_expressions():
    frame = pd.DataFrame({"combo": range(6), "adc_bits": [4, 4, 5, 5, 6, 6], "conv1.weight_bits": [6, 8] * 3})
    assert list(np.flatnonzero(subset_mask(frame, "1:5:2"))) == [1, 3]
    assert list(np.flatnonzero(subset_mask(frame, "0,5"))) == [0, 5]
    assert list(np.flatnonzero(subset_mask(frame, "adc_bits >= 5 and `conv1.weight_bits` == 8"))) == [3, 5]
    with pytest.raises(SweepError, match="not a valid expression"):
        subset_mask(frame, "adc_bitz > 3")
    with pytest.raises(SweepError, match="no combination number"):
        subset_mask(frame, "9")


def test_plots_table_and_validation_report(tmp_path):
    spec = build_sweep(GRID, name="grid")
    rows = []
    for c in spec.combinations:
        e = expected_row(c.params["adc_bits"], c.params["rows_per_array"])
        rows.append({"combo": c.index, **c.params, **e, "mc_conv1_snr_db": e["conv1_snr_db"] - 0.2,
                     "mc_fc_snr_db": e["fc_snr_db"] + 0.5, "mc_top1": e["top1"] - 0.01,
                     "err_conv1_db": 0.2, "err_fc_db": -0.5, "err_top1_pp": 1.0, "mc_conv1_snr_se_db": 0.05,
                     "mc_top1_se_pp": 0.4, "snr_db[conv1]": 30.0, "mc_snr_db[conv1]": 30.3,
                     "snr_db[fc]": 20.0, "mc_snr_db[fc]": 21.2, "est_seconds": 0.01, "mc_seconds": 3.0,
                     # predicted drop 2 pp from the probe images' float top-1, measured 2.5 pp on the MC images'
                     "top1_clean": e["top1"] + 0.02, "mc_top1_clean": e["top1"] - 0.01 + 0.025})
    frame = pd.DataFrame(rows)
    written = plot_metrics(frame, spec.parameters, tmp_path)
    assert sorted(p.name for p in written) == ["adc_bits.png", "rows_per_array.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    scatter = plot_validation(frame, tmp_path)
    assert scatter is not None and scatter.stat().st_size > 1000
    table = compact_table(frame, spec.parameters, "validation")
    assert "conv1 MC" in table and len(table.splitlines()) == 7
    stats = validation_stats(frame)
    assert stats["conv1_max_db"] == pytest.approx(0.2) and stats["top1_max_pp"] == pytest.approx(1.0)
    assert stats["layer_max_db"] == pytest.approx(1.2) and stats["layer_median_db"] == pytest.approx(0.75)
    assert stats["fc_n"] == 6  # every MC fc SNR >= 10 dB here
    assert stats["drop_max_pp"] == pytest.approx(0.5) and stats["drop_n"] == 6
    text = validation_report(frame, spec.parameters, {"command": "python -m sweeps.validate x.py"})
    assert "| conv1 isolated SNR | 0.20 dB | 0.20 dB | 6 | max ≤ 0.5 dB | met |" in text
    assert "**missed**" in text  # the layer max of 1.2 dB misses its 1.0 dB target
    assert "| top-1 drop from the float network (each on its own images; diagnostic) | 0.50 pp | 0.50 pp | 6 |" in text
    assert text.count("\n| ") >= 6 + 2



def test_a_list_of_designs_gets_one_designs_plot_not_a_plot_per_knob_some_set(tmp_path):
    """Points that each set their own knobs: no ``<param>.png`` for a knob left blank on some points (its x
    axis would mix values with 'not set'), one ``designs.png`` with every metric per label; a knob every point
    sets is still an axis."""
    frame = pd.DataFrame([
        {"combo": 0, "label": "a", "input_bits": 6, "adc_bits": 6, "conv1.weight_bits": None,
         "conv1_snr_db": float("inf"), "fc_snr_db": 20.0, "top1": 0.98},
        {"combo": 1, "label": "b", "input_bits": 4, "adc_bits": np.nan, "conv1.weight_bits": 8,
         "conv1_snr_db": 30.0, "fc_snr_db": 15.0, "top1": 0.95},
        {"combo": 2, "label": "c", "input_bits": 8, "adc_bits": 5, "conv1.weight_bits": np.nan,
         "conv1_snr_db": 25.0, "fc_snr_db": 10.0, "top1": 0.90},
    ])
    written = plot_metrics(frame, ["input_bits", "adc_bits", "conv1.weight_bits"], tmp_path)
    assert sorted(p.name for p in written) == ["designs.png", "input_bits.png"]
    # a validation run: the MC beside each estimate, both top-1 values in % (the MC's was plotted as a fraction)
    validated = frame.assign(mc_top1=[0.97, 0.94, 0.91], mc_top1_se_pp=[0.5, 0.6, 0.7],
                             mc_fc_snr_db=[19.5, 15.2, 10.1], mc_fc_snr_se_db=[0.1, 0.1, 0.1])
    assert list(_metric_values(validated, "mc_top1")) == pytest.approx([97.0, 94.0, 91.0])
    (tmp_path / "v").mkdir()
    assert plot_designs(validated, tmp_path / "v", ["fc_snr_db", "top1"]).stat().st_size > 1000
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in written)
    unlabelled = frame.assign(label=["a", "", "c"])
    (tmp_path / "u").mkdir()
    assert [p.name for p in plot_metrics(unlabelled, ["input_bits"], tmp_path / "u")] == ["input_bits.png"]


def test_validation_report_separates_the_mean_field_route():
    """Configurations on the mean-field route are counted, their top-1 errors reported apart from the linear
    route's, marked `mf` in the table; fc errors below the 10 dB line are reported without a target."""
    frame = pd.DataFrame([
        {"combo": 0, "route": "linear", "conv1_snr_db": 30.0, "mc_conv1_snr_db": 30.1, "err_conv1_db": -0.1,
         "fc_snr_db": 20.0, "mc_fc_snr_db": 20.3, "err_fc_db": -0.3, "top1": 0.98, "mc_top1": 0.975,
         "err_top1_pp": 0.5},
        {"combo": 1, "route": "meanfield", "conv1_snr_db": 8.0, "mc_conv1_snr_db": 8.2, "err_conv1_db": -0.2,
         "fc_snr_db": 1.0, "mc_fc_snr_db": 1.8, "err_fc_db": -0.8, "top1": 0.40, "mc_top1": 0.44,
         "err_top1_pp": -4.0},
    ])
    stats = validation_stats(frame)
    assert stats["meanfield_n"] == 1 and stats["top1_declined_n"] == 0
    assert stats["top1_linear_route"][1] == pytest.approx(0.5) and stats["top1_meanfield_route"][1] == pytest.approx(4.0)
    assert stats["fc_low_n"] == 1 and stats["fc_low_max_db"] == pytest.approx(0.8)
    text = validation_report(frame, [], {"command": "python -m sweeps.validate x.py"})
    assert "| top-1, mean-field route (collapse regime) | 4.00 pp | 4.00 pp | 1 |" in text
    assert "| fc SNR where MC fc SNR < 10 dB (reported) | 0.80 dB | 0.80 dB | 1 |" in text
    assert "| 40.00 mf |" in text and "| 98.00 |" in text
    assert "mean-field route gave fc SNR and top-1 on 1 configuration" in text


def test_validation_report_gives_the_top1_error_in_standard_errors():
    """The top-1 error over the MC's error bar and the estimate's image-sampling one, combined in quadrature."""
    frame = pd.DataFrame([
        {"combo": 0, "top1": 0.98, "mc_top1": 0.975, "err_top1_pp": 0.5, "mc_top1_se_pp": 0.3, "top1_se": 0.004},
        {"combo": 1, "top1": 0.40, "mc_top1": 0.44, "err_top1_pp": -4.0, "mc_top1_se_pp": 1.2, "top1_se": 0.016},
    ])
    z = top1_error_in_standard_errors(frame)
    np.testing.assert_allclose(z, [0.5 / 0.5, -4.0 / 2.0])
    stats = validation_stats(frame)
    assert stats["top1_z_max"] == pytest.approx(2.0) and stats["top1_z_beyond_2"] == 0
    assert stats["top1_se_pp"] == pytest.approx((1.0, 1.6))
    text = validation_report(frame, [], {"command": "python -m sweeps.validate x.py"})
    assert "`|err| / √(SE_MC² + SE_est²)` (diagnostic) | 1.50 | 2.00 | 2 (0 beyond 2) |" in text
    assert "the estimate's own image-sampling error `top1_se` 1.00 / 1.60 pp" in text
    # without the estimate's error bar (older runs) the row is left out
    assert "SE_est" not in validation_report(frame.drop(columns="top1_se"), [], {"command": "x"})


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from cimstat.sweeps.spec import build_sweep
    from cimstat.sweeps.runner import prepare_run_dir, run_combinations

    class SlowEvaluator:
        def __init__(self, pid_dir):
            self.pid_dir = pid_dir
        def setup(self):
            Path(self.pid_dir, str(os.getpid())).touch()
        def __call__(self, combo):
            time.sleep(0.25)
            c = combo.config.default
            return {"conv1_snr_db": 6.0 * c.adc_bits - 0.01 * c.rows_per_array, "fc_snr_db": 5.0 * c.adc_bits,
                    "top1": 1 - 2.0 ** -c.adc_bits}

    if __name__ == "__main__":
        out, jobs, resume, pid_dir = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume", sys.argv[4]
        spec = build_sweep({"params_sweep_list": {"adc_bits": [3, 4, 5, 6, 7, 8],
                                                  "rows_per_array": [64, 128, 256]}}, name="grid")
        run, _ = prepare_run_dir(spec, spec.combinations, kind="summary", out_root=out, options={},
                                 resume=resume)
        run_combinations(spec, spec.combinations, SlowEvaluator(pid_dir), run_dir=run, jobs=jobs, progress=False)
        print(run.path)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("jobs", [1, 2])
def test_killed_run_resumes_with_every_combination_exactly_once(tmp_path, jobs):
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(jobs), "new", str(pid_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = kill_after_journal(proc, tmp_path / "out" / "grid", "*/summary.jsonl", 4, 90)
    run_path = journal.parent
    assert (run_path / MARKER).exists()
    n_before = len(journal.read_text().splitlines())
    assert 4 <= n_before < 18
    workers = [int(p.name) for p in pid_dir.iterdir()]
    deadline = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "worker processes outlived their killed parent"

    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(jobs), "resume", str(pid_dir)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == run_path
    spec = build_sweep({"params_sweep_list": {"adc_bits": [3, 4, 5, 6, 7, 8], "rows_per_array": [64, 128, 256]}},
                       name="grid")
    frame = check_complete(RunDir(run_path, "summary"), spec)
    assert len(frame) == 18 and len(journal.read_text().splitlines()) == 18
    assert sorted(p.name for p in (tmp_path / "out" / "grid").iterdir()) == [run_path.name]
