"""A validation's Monte Carlo run elsewhere: export a job bundle, run it, import the results into the cache.

On the real default model with only conv1 analog (cheap), a handful of validation images. The offloaded run on
the CPU must give exactly what the local validation measures: same chips, same noise streams, same cache key.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cimstat.errors import ConfigError, SweepError
from cimstat.sweeps.commands import mc_jobs_main, validate_main
from cimstat.sweeps.offload import import_mc_results, load_bundle, run_mc_jobs

pytestmark = pytest.mark.slow

SWEEP = '''name = "offload"
fixed = {"input_bits": None, "weight_bits": None,
         "conv1": {"input_bits": 7, "weight_bits": 6, "adc_bits": 7, "read_noise": 0.04}}
params_sweep_list = {"conv1": {"programming_error": [0.0, 0.03]}}
'''


@pytest.fixture(scope="module")
def probe_dir() -> Path:
    from cimstat.probes import ensure_default_probes

    return Path(ensure_default_probes(progress=False))


@pytest.fixture()
def sweep(tmp_path) -> Path:
    path = tmp_path / "offload.py"
    path.write_text(SWEEP)
    return path


def _args(sweep: Path, probe_dir: Path, out: Path, *extra: str) -> list[str]:
    return [str(sweep), "--probes", str(probe_dir), "--out", str(out), "--n-images", "12", "--instances", "2",
            "--programmed-instances", "3", "--batch-size", "5", "--quiet", *extra]


def _rows(out: Path) -> pd.DataFrame:
    (csv,) = list((out / "offload").glob("*/validation.csv"))
    return pd.read_csv(csv).sort_values("combo").reset_index(drop=True)


def test_offloaded_monte_carlo_is_the_local_one_bit_for_bit(tmp_path, sweep, probe_dir):
    bundle, results = tmp_path / "jobs.pt", tmp_path / "results.jsonl"
    assert validate_main(_args(sweep, probe_dir, tmp_path / "far", "--export-mc-jobs", str(bundle))) == 0
    assert not (tmp_path / "far" / "offload").exists()  # exporting runs nothing
    jobs = load_bundle(bundle)
    assert [j["instances"] for j in jobs["jobs"]] == [2, 3]  # cheapest first; programmed chips get their count
    assert jobs["images"].shape == (12, 1, 64, 64) and jobs["repeat_channels"] == 3  # grey digits stored once

    assert mc_jobs_main([str(bundle), "--out", str(results), "--claims", str(tmp_path / "claims"), "--quiet"]) == 0
    lines = [json.loads(t) for t in results.read_text().splitlines()]
    assert [line["mc"]["mc_device"] for line in lines] == ["cpu", "cpu"]
    # every job claimed: a second runner sharing the claims finds nothing left to do
    assert run_mc_jobs(bundle, tmp_path / "other.jsonl", claims=tmp_path / "claims", progress=False,
                       log=lambda _: None) == 0
    # a rerun into the same results file resumes: nothing measured twice
    assert run_mc_jobs(bundle, results, progress=False, log=lambda _: None) == 0
    # two runner processes side by side measure the same, into one file, leaving no parts or claims behind
    side = tmp_path / "side" / "results.jsonl"
    threads = str(torch.get_num_threads())  # the float reference's last bits depend on the thread count
    assert mc_jobs_main([str(bundle), "--out", str(side), "--runners", "2", "--threads", threads, "--quiet"]) == 0
    by_key = {line["key"]: line["mc"] for line in map(json.loads, side.read_text().splitlines())}
    assert by_key == {line["key"]: {**line["mc"], "mc_seconds": by_key[line["key"]]["mc_seconds"]} for line in lines}
    assert sorted(p.name for p in side.parent.iterdir()) == ["results.jsonl"]
    # a rerun with runners resumes too: nothing measured twice
    assert mc_jobs_main([str(bundle), "--out", str(side), "--runners", "2", "--threads", threads, "--quiet"]) == 0
    assert len(side.read_text().splitlines()) == 2
    # a line a killed runner left unfinished does not swallow the result the rerun appends after it
    cut = tmp_path / "cut.jsonl"
    cut.write_text(results.read_text().splitlines()[0] + '\n{"key": "cut short')
    assert run_mc_jobs(bundle, cut, progress=False, log=lambda _: None) == 1
    messages: list[str] = []
    assert import_mc_results([cut], tmp_path / "cut-cache", log=messages.append) == 2
    assert len(messages) == 1 and "cut.jsonl:2: not a complete result line" in messages[0]

    assert validate_main(_args(sweep, probe_dir, tmp_path / "far", "--import-mc-results", str(results))) == 0
    far = _rows(tmp_path / "far")
    assert far["mc_cached"].all()  # the imported entries were found: no Monte Carlo ran here
    assert validate_main(_args(sweep, probe_dir, tmp_path / "near", "--no-mc-cache")) == 0
    near = _rows(tmp_path / "near")
    assert not near["mc_cached"].any()
    for col in ("mc_conv1_snr_db", "mc_fc_snr_db", "mc_top1", "mc_conv1_snr_se_db", "mc_top1_se_pp"):
        assert far[col].tolist() == near[col].tolist(), col
    assert far["mc_conv1_snr_se_db"].iloc[1] > 0  # the programmed chips differ: a real spread was compared


def test_offload_refuses_what_would_not_match(tmp_path, sweep, probe_dir):
    bundle = tmp_path / "jobs.pt"
    validate_main(_args(sweep, probe_dir, tmp_path / "out", "--export-mc-jobs", str(bundle)))
    with pytest.raises(SweepError, match="with --export-mc-jobs it runs none"):
        validate_main(_args(sweep, probe_dir, tmp_path / "out", "--export-mc-jobs", str(bundle), "--device", "cuda"))
    with pytest.raises(SweepError, match="cannot go with --no-mc-cache"):
        validate_main(_args(sweep, probe_dir, tmp_path / "out", "--import-mc-results", "x.jsonl", "--no-mc-cache"))

    stale = load_bundle(bundle)
    stale["simulator"] = "0" * 64
    torch.save(stale, tmp_path / "stale.pt")
    with pytest.raises(SweepError, match="made for simulator sources 000000000000"):
        run_mc_jobs(tmp_path / "stale.pt", tmp_path / "r.jsonl", progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a bundle")
    with pytest.raises(SweepError, match="junk.pt: cannot be read"):
        load_bundle(tmp_path / "junk.pt")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            run_mc_jobs(bundle, tmp_path / "r.jsonl", device="cuda", progress=False)

    results = tmp_path / "results.jsonl"
    line = {"key": "a" * 64, "label": "x", "simulator": "f" * 64, "ranges": {}, "mc": {"mc_fc_snr_db": 20.0}}
    results.write_text("{cut short by a kill\n" + json.dumps(line) + "\n")
    with pytest.raises(SweepError, match=r"results.jsonl:2: measured by simulator sources ffffffffffff"):
        import_mc_results([results], tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing written when a line is refused
    results.write_text(json.dumps({**line, "mc": [1, 2]}) + "\n")
    with pytest.raises(SweepError, match=r"results.jsonl:1: not a result of python -m sweeps.mc_jobs"):
        import_mc_results([results], tmp_path / "cache")
    results.write_text("\n")
    with pytest.raises(SweepError, match="no result lines in it"):
        import_mc_results([results], tmp_path / "cache")
    del stale["labels"]
    stale["simulator"] = load_bundle(bundle)["simulator"]
    torch.save(stale, tmp_path / "damaged.pt")
    with pytest.raises(SweepError, match=r"damaged.pt: fields \['labels'\] are missing"):
        load_bundle(tmp_path / "damaged.pt")
