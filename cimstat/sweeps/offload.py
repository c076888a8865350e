"""Run a validation sweep's Monte Carlo on another machine (a GPU box) and bring the results home.

The Monte Carlo referee is the slow half of a validation: hours of CPU for a sweep. Its inputs are small once
the ranges are resolved, so the work can travel without probes, datasets or calibrations:

1. :func:`export_mc_jobs` (here, where the probes live): one self-contained *job bundle* — the model's
   weights fingerprint, the validation images and labels the MC runs on, and per combination its config,
   resolved ranges (:class:`~cimstat.hardware.ResolvedLayer`), chip-instance count and MC cache key;
2. :func:`run_mc_jobs` (there, ``python -m sweeps.mc_jobs BUNDLE --device cuda --out results.jsonl``): every job
   measured by :func:`cimstat.montecarlo.measure`, one JSON line per finished job (flushed at once, so a run
   cut short keeps what it finished and a rerun resumes); ``--runners N`` (:func:`run_mc_jobs_side_by_side`)
   keeps a GPU busier with N processes side by side;
3. :func:`import_mc_results` (here, ``python -m sweeps.validate ... --import-mc-results results.jsonl``): each
   line becomes the MC cache entry the validation would have written itself.

The cache key is computed at export from the same facts as a local run (weights, config, images, instances,
batch size, simulator source); the runner refuses a bundle made for other simulator sources or weights, and the
import refuses lines measured by another simulator. The device is not in the key: a chip is the same on every
device (weight codes and programming errors are drawn on the CPU) and only the per-read noise stream differs, so
a GPU measurement is the same measurement. Each entry records where it ran (``mc_device``).

A bundle is a :func:`torch.save` file holding Python objects (configs, resolved ranges): load only bundles you
made. Images whose channels are copies of one (the default dataset's grey digits) are stored once.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from cimstat.errors import SweepError
from cimstat.hardware import SignedInputEncoding
from cimstat.sweeps.spec import Combination

__all__ = ["BUNDLE_FORMAT", "export_mc_jobs", "run_mc_jobs", "run_mc_jobs_side_by_side", "import_mc_results",
           "mc_work", "load_bundle"]

BUNDLE_FORMAT = 1
"""Version of the job-bundle layout."""
BUNDLE_KEYS = ("simulator", "model", "weights", "fingerprint", "images", "repeat_channels", "labels", "n_images",
               "batch_size", "jobs")
"""What a bundle holds besides its ``format``."""


def mc_work(resolved: Mapping[str, Any], macs: Mapping[str, int], instances: int) -> float:
    """Relative Monte Carlo cost of one combination (to run the cheap ones first): per chip and layer, the
    layer's MACs times its analog conversions per product (input passes x ADC columns, twice with read noise);
    a layer whose conversions are ideal and noiseless counts its MACs once."""
    total = 0.0
    for name, entry in resolved.items():
        c, signed = entry.config, bool(entry.ranges.signed_input)
        if c.input_bits is None or c.weight_bits is None:
            total += macs.get(name, 0)
            continue
        split = signed and c.signed_input_encoding is SignedInputEncoding.SPLIT
        passes = len(c.input_slices(signed)) * (2 if split else 1)
        columns = len(c.weight_slices()) * (1 if c.adc_signed else 2)
        lossless = (c.adc_bits is None and c.adc_thermal_noise_lsb == 0 and c.read_noise == 0
                    and c.programming_error == 0)
        total += macs.get(name, 0) * (1 if lossless else passes * columns * (2 if c.read_noise > 0 else 1))
    return float(total * instances)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    from cimstat.sweeps.rundir import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def export_mc_jobs(evaluator: Any, combos: Sequence[Combination], path: str | Path, *,
                   include_cached: bool = False, progress: Callable[[str], None] | None = None) -> int:
    """Write the job bundle of ``combos`` for a set-up :class:`~cimstat.sweeps.evaluators.ValidationEvaluator`
    (its images, instances, batch size and cache key); combinations whose MC result is cached already are left
    out unless ``include_cached``. Jobs are ordered cheapest first (:func:`mc_work`). Returns the job count."""
    from cimstat.sweeps.evaluators import _simulator_source_hash, range_summary

    images, labels = [], []
    for x, y in evaluator._loader:
        images.append(x.to(torch.float32))
        labels.append(y)
    x = torch.cat(images)[: evaluator.n_images]
    y = torch.cat(labels)[: evaluator.n_images]
    repeat = 1
    if x.dim() == 4 and x.shape[1] > 1 and bool((x == x[:, :1]).all()):
        repeat, x = int(x.shape[1]), x[:, :1].contiguous()
    layers = evaluator._estimator._probes.stats.layers  # the probes know every layer's shape on these images
    macs = {name: s.fan_in * s.out_channels * s.n_positions for name, s in layers.items()}
    jobs = []
    for combo in combos:
        resolved, _ = evaluator._estimator.resolve(combo)
        if not include_cached and evaluator.cached_monte_carlo(combo, resolved) is not None:
            if progress:
                progress(f"{combo.label}: cached, not exported")
            continue
        instances = evaluator.instances_for(combo)
        jobs.append({"key": evaluator.mc_cache_key(combo), "label": combo.label, "config": combo.config,
                     "resolved": dict(resolved), "instances": instances, "ranges": range_summary(resolved),
                     "work": mc_work(resolved, macs, instances)})
    jobs.sort(key=lambda j: j["work"])
    bundle = {"format": BUNDLE_FORMAT, "simulator": _simulator_source_hash(), "model": evaluator.model_name,
              "weights": None if evaluator.weights is None else str(evaluator.weights),
              "fingerprint": evaluator._fingerprint, "images": x, "repeat_channels": repeat, "labels": y,
              "n_images": int(x.shape[0]), "batch_size": evaluator.batch_size, "jobs": jobs}
    _atomic_torch_save(bundle, Path(path))
    return len(jobs)


def load_bundle(path: str | Path) -> dict[str, Any]:
    """A job bundle written by :func:`export_mc_jobs`, checked for its format."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"job bundle {path}: no such file")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged or foreign file: name it and the reason
        raise SweepError(f"job bundle {path}: cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        found = bundle.get("format") if isinstance(bundle, dict) else type(bundle).__name__
        raise SweepError(f"job bundle {path}: format {found!r}, expected {BUNDLE_FORMAT} (made by "
                         "python -m sweeps.validate --export-mc-jobs)")
    missing = [k for k in BUNDLE_KEYS if k not in bundle]
    if missing:
        raise SweepError(f"job bundle {path}: fields {missing} are missing (a damaged bundle: export it again)")
    return bundle


def _done_keys(paths: Iterable[Path]) -> set[str]:
    done: set[str] = set()
    for path in paths:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    done.add(json.loads(line)["key"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a kill: that job runs again
    return done


def _end_with_newline(path: Path) -> None:
    """Terminate a line a killed writer left unfinished, so the next line is not glued to it."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def _claim(claims: Path | None, key: str) -> bool:
    """Take job ``key`` for this runner (True), or learn that another runner sharing ``claims`` has (False)."""
    if claims is None:
        return True
    try:
        os.close(os.open(claims / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def run_mc_jobs(bundle_path: str | Path, out: str | Path, *, device: str = "cpu", weights: str | Path | None = None,
                claims: str | Path | None = None, largest_first: bool = False, time_budget_s: float | None = None,
                progress: bool = True, log: Callable[[str], None] = print, skip_done_in: Sequence[Path] = ()) -> int:
    """Measure the jobs of a bundle on ``device``, appending one JSON line per finished job to ``out``
    (``{"key", "label", "simulator", "ranges", "mc"}``, ``mc`` the cache columns of
    :func:`~cimstat.sweeps.evaluators.mc_columns` plus ``mc_seconds`` and ``mc_device``). Jobs already in ``out``
    are skipped, and so are those in the ``skip_done_in`` files. Runners side by side (on one GPU or several)
    share a ``claims`` folder: each job is taken by the first runner to create its claim file there (give each
    runner its own ``out``). Jobs run cheapest first, or
    most costly first with ``largest_first`` (the shortest makespan for runners side by side); no job is started
    once ``time_budget_s`` seconds have passed; a failed job's claim is released. Returns the number of jobs
    measured."""
    from cimstat.models import load, weights_fingerprint
    from cimstat.montecarlo import measure
    from cimstat.montecarlo.measure import device_name, resolve_device
    from cimstat.sweeps.evaluators import _simulator_source_hash, mc_columns

    start = time.perf_counter()
    dev = resolve_device(device)
    bundle = load_bundle(bundle_path)
    here = _simulator_source_hash()
    if bundle["simulator"] != here:
        raise SweepError(f"job bundle {bundle_path}: made for simulator sources {bundle['simulator'][:12]}…, these "
                         f"are {here[:12]}…; run it with the checkout that exported it")
    model = load(bundle["model"], weights if weights is not None else bundle["weights"])
    if weights_fingerprint(model) != bundle["fingerprint"]:
        raise SweepError(f"job bundle {bundle_path}: the loaded {bundle['model']!r} weights are not the ones it was "
                         "exported for (fingerprints differ)")
    x = bundle["images"]
    if bundle["repeat_channels"] > 1:
        x = x.repeat(1, bundle["repeat_channels"], 1, 1)
    data = torch.utils.data.TensorDataset(x, bundle["labels"])
    loader = torch.utils.data.DataLoader(data, batch_size=bundle["batch_size"], shuffle=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done_keys([out, *map(Path, skip_done_in)])
    todo = [job for job in bundle["jobs"] if job["key"] not in done]
    if largest_first:
        todo.reverse()
    if claims is not None:
        claims = Path(claims)
        claims.mkdir(parents=True, exist_ok=True)
    measured, taken = 0, 0
    failed: list[str] = []
    where = device_name(dev)
    _end_with_newline(out)
    with out.open("a") as fh:
        for job in todo:
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                log(f"time budget of {time_budget_s:.0f} s spent: jobs not started are left for a rerun")
                break
            if not _claim(claims, job["key"]):
                taken += 1
                continue
            t0 = time.perf_counter()
            try:
                result = measure(model, job["config"], job["resolved"], loader, instances=job["instances"],
                                 progress=progress, device=dev)
            except Exception as err:  # one job's failure must not cost the others: say which and go on
                failed.append(job["label"])
                if claims is not None:
                    (claims / job["key"]).unlink(missing_ok=True)  # free for a rerun
                log(f"{job['label']}: FAILED ({type(err).__name__}: {err})\n{traceback.format_exc()}")
                continue
            mc = mc_columns(result, bundle["n_images"])
            mc["mc_seconds"] = time.perf_counter() - t0
            mc["mc_device"] = where
            line = {"key": job["key"], "label": job["label"], "simulator": here, "ranges": job["ranges"], "mc": mc}
            fh.write(json.dumps(line, allow_nan=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            measured += 1
            log(f"{job['label']}: {mc['mc_seconds']:.1f} s, fc {mc['mc_fc_snr_db']:.2f} dB, "
                f"top-1 {100 * mc['mc_top1']:.2f} %")
    if taken:
        log(f"{taken} job(s) were claimed by other runners")
    if failed:
        raise SweepError(f"{len(failed)} job(s) failed: {', '.join(failed)} (tracebacks above); the {measured} "
                         f"measured are in {out}")
    return measured


def _merge_parts(parts: Sequence[Path], out: Path) -> None:
    """Append the complete lines of runner part files to ``out`` and delete the parts."""
    _end_with_newline(out)
    with out.open("a") as fh:
        for part in parts:
            if not part.is_file():
                continue
            for text in part.read_text().splitlines():
                try:
                    json.loads(text)
                except json.JSONDecodeError:
                    continue  # cut short by a kill: that job runs again
                fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            part.unlink()


def _side_runner(bundle_path: Path, part: Path, options: dict[str, Any], index: int, threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    run_mc_jobs(bundle_path, part, log=lambda text: print(f"[runner {index}] {text}", file=sys.stderr, flush=True),
                **options)


def run_mc_jobs_side_by_side(bundle_path: str | Path, out: str | Path, runners: int, *, device: str = "cpu",
                             weights: str | Path | None = None, time_budget_s: float | None = None,
                             threads: int | None = None) -> int:
    """``runners`` processes of :func:`run_mc_jobs` side by side on ``device`` (a GPU is kept busier by several),
    most costly jobs first, sharing a claims folder next to ``out``. Each writes a part file next to ``out``; when
    all are done the parts are appended to ``out`` (parts left by a killed run are merged first by the next call,
    which then resumes). ``threads``: torch CPU threads of each runner (None: the CPU's cores shared out; the
    float reference's last bits depend on it). Returns the number of jobs measured; a failing runner is named in
    a :class:`SweepError` after the others finished."""
    import multiprocessing
    import shutil

    if isinstance(runners, bool) or not isinstance(runners, int) or runners < 1:
        raise SweepError(f"runners={runners!r} must be a positive integer")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [out.with_name(f"{out.name}.part{i}") for i in range(runners)]
    leftovers = sorted(out.parent.glob(f"{out.name}.part*"))
    _merge_parts(leftovers, out)
    claims = out.with_name(f"{out.name}.claims")
    shutil.rmtree(claims, ignore_errors=True)
    before = len(_done_keys([out]))
    if threads is None:  # share the CPU's cores instead of each runner taking them all
        threads = max(1, (os.cpu_count() or 1) // runners)
    options = {"device": device, "weights": weights, "claims": claims, "largest_first": True,
               "time_budget_s": time_budget_s, "progress": False, "skip_done_in": [out]}
    context = multiprocessing.get_context("spawn")  # one CUDA context per runner
    procs = [context.Process(target=_side_runner, args=(Path(bundle_path), parts[i], options, i, threads))
             for i in range(runners)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    _merge_parts(parts, out)
    shutil.rmtree(claims, ignore_errors=True)
    failed = [i for i, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        raise SweepError(f"runner(s) {failed} of {runners} failed (their messages are above); what was measured is "
                         f"in {out}")
    return len(_done_keys([out])) - before


def import_mc_results(paths: Sequence[str | Path], cache_dir: str | Path,
                      log: Callable[[str], None] | None = None) -> int:
    """Write every line of the ``results.jsonl`` files of :func:`run_mc_jobs` into the MC cache ``cache_dir``
    (the entry a local run would have written). Lines measured by other simulator sources, and files without
    a single result, are refused with an error naming the file; lines cut short (a killed runner) are skipped
    and counted in ``log``. Returns the entries written."""
    from cimstat.sweeps.evaluators import _simulator_source_hash
    from cimstat.sweeps.rundir import atomic_write_bytes

    here = _simulator_source_hash()
    entries = []
    for path in map(Path, paths):
        if not path.is_file():
            raise SweepError(f"--import-mc-results {path}: no such file")
        found = 0
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            try:
                line = json.loads(text)
                key, ranges, mc, simulator = line["key"], line["ranges"], line["mc"], line["simulator"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if log and text.strip():
                    log(f"{path}:{number}: not a complete result line (a killed runner?): skipped")
                continue
            if not (isinstance(mc, dict) and "mc_fc_snr_db" in mc and isinstance(ranges, dict)
                    and isinstance(simulator, str)):
                raise SweepError(f"{path}:{number}: not a result of python -m sweeps.mc_jobs (its mc, ranges or "
                                 "simulator field is malformed)")
            if simulator != here:
                raise SweepError(f"{path}:{number}: measured by simulator sources {simulator[:12]}…, these are "
                                 f"{here[:12]}…; its key would not match this checkout's cache")
            if not (isinstance(key, str) and len(key) == 64 and all(ch in "0123456789abcdef" for ch in key)):
                raise SweepError(f"{path}:{number}: key {key!r} is not a sha256 hex digest")
            entries.append((key, ranges, mc))
            found += 1
        if not found:
            raise SweepError(f"--import-mc-results {path}: no result lines in it (expected the --out file of "
                             "python -m sweeps.mc_jobs)")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for key, ranges, mc in entries:
        atomic_write_bytes(cache / f"{key}.json", json.dumps({"ranges": ranges, "mc": mc}).encode())
    return len(entries)

