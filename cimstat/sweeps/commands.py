"""The two sweep commands: ``python -m sweeps.run`` and ``python -m sweeps.validate``.

``run``: analytic estimates for every combination -> ``<out>/<name>/<UTC time>/summary.csv``
and ``<param>.png`` plots. ``validate``: estimate and Monte Carlo side by side for every (or
a ``--subset`` of the) combinations -> ``validation.csv`` and ``validation_scatter.png``,
optionally the Markdown report (``--report docs/validation.md``).

Order of work, so that mistakes cost nothing: the sweep file is loaded and every
combination's config validated; the probes are loaded and per-layer names checked; only then
is a run folder created and anything run.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from cimstat.errors import SweepError
from cimstat.sweeps.evaluators import (DEFAULT_MC_IMAGES, DEFAULT_MC_INSTANCES, EstimateEvaluator,
                                       ValidationEvaluator, probe_defaults)
from cimstat.sweeps.plots import plot_metrics, plot_validation
from cimstat.sweeps.report import compact_table, validation_report
from cimstat.sweeps.rundir import atomic_write_bytes
from cimstat.sweeps.rundir import RunDir
from cimstat.sweeps.runner import RunResult, prepare_run_dir, rows_to_frame, run_combinations
from cimstat.sweeps.spec import Combination, SweepSpec, load_sweep
from cimstat.sweeps.subset import subset_mask

__all__ = ["run_main", "validate_main", "mc_jobs_main", "resolve_probe_dir", "select_combinations"]


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", help="sweep definition, e.g. sweeps/conv1_weight_bits.py")
    parser.add_argument("--probes", type=Path, default=None,
                        help="probe folder (stat.pkl, noise_prop.pkl); default: the sweep file's 'probes', "
                             "else the default model's probes (created on first use)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights file of the probed model (needed for resnet18-imagenet); default: the sweep "
                             "file's 'weights'")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="results root; the run goes to OUT/<sweep name>/<UTC time>/ (default: results)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="finish an interrupted run: the given folder, or the newest unfinished one")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    parser.add_argument("--adc-per-image", action="store_true",
                        help="the engine's precise ADC route: the ADC error of every output of the noise-propagation "
                             "images, propagated per image (5-14 s per configuration for the default model "
                             "instead of 0.1-0.5 s; see cimstat.engine.network.ADC_PER_IMAGE_NOTE)")
    parser.add_argument("--meanfield-images", type=_positive_int, default=None, metavar="N",
                        help="probe images the engine's mean-field route (heavily distorted designs) runs over "
                             "(default: cimstat.engine.meanfield.MEANFIELD_IMAGES, 1000, all of the default model's); "
                             "fewer is faster in proportion, and the top1_se column shows the larger image-sampling "
                             "error")
    parser.add_argument("--meanfield-top1", action="store_true",
                        help="top-1 from the engine's mean-field route on every combination, the fc SNR still linear "
                             "(11-22 s per configuration for the default model instead of 0.1-3 s; closer to "
                             "the Monte Carlo where noise is large; see cimstat.engine.network.MEANFIELD_TOP1_NOTE)")


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Engine settings a resumed run must share, where they differ from the defaults (runs made before they
    existed resume as before)."""
    out: dict[str, Any] = {} if args.meanfield_images is None else {"meanfield_images": args.meanfield_images}
    if args.meanfield_top1:
        out["meanfield_top1"] = True
    return out


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def resolve_probe_dir(args_probes: Path | None, spec: SweepSpec, *, progress: bool = True) -> Path:
    """The probe folder: ``--probes``, else the sweep file's ``probes``, else the default
    model's probes (made on first use by :func:`cimstat.probes.ensure_default_probes`)."""
    if args_probes is not None:
        return Path(args_probes)
    if spec.probes is not None:
        return Path(spec.probes)
    if spec.model not in (None, "default") or spec.weights is not None:
        raise SweepError(f"sweep {spec.name!r} uses model {spec.model!r}: give its probes with --probes DIR "
                         "(made by python -m probing.activations / probing.noise_prop) or 'probes' in the sweep file")
    from cimstat.probes import ensure_default_probes

    return Path(ensure_default_probes(progress=progress))


def _load_checked(args: argparse.Namespace) -> tuple[SweepSpec, Path, Any]:
    spec = load_sweep(args.sweep_file)
    if args.weights is not None:
        if not Path(args.weights).is_file():
            raise SweepError(f"--weights {args.weights}: no such file")
        spec = dataclasses.replace(spec, weights=Path(args.weights))
    if args.jobs < 1:
        raise SweepError(f"--jobs={args.jobs} must be at least 1")
    probe_dir = resolve_probe_dir(args.probes, spec, progress=not args.quiet)
    from cimstat.probes import load_probes

    probes = load_probes(probe_dir, require_noise_prop=True)
    spec.check_layer_names(probes.stats.layer_names)
    return spec, probe_dir, probes


def _command_line(prog: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([prog, *map(shlex.quote, args)])


def run_main(argv: Sequence[str] | None = None) -> int:
    """``python -m sweeps.run``: analytic estimates of every combination of a sweep file."""
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.run",
        description="Analytic estimates of every combination of a sweep file -> OUT/<name>/<UTC time>/summary.csv "
                    "and one PNG per swept parameter.")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    spec, probe_dir, probes = _load_checked(args)
    model_name, _ = probe_defaults(probes.stats.meta)
    combos = list(spec.combinations)
    options = {"probes": str(probe_dir.resolve()), "probe_fingerprint": probes.fingerprint,
               "model": spec.model or model_name, "weights": str(spec.weights) if spec.weights else None,
               **_engine_options(args)}
    run_dir, resumed = prepare_run_dir(spec, combos, kind="summary", out_root=args.out, options=options,
                                       resume=args.resume)
    if not args.quiet:
        print(f"{'resuming' if resumed else 'running'} sweep {spec.name!r}: {len(combos)} combinations "
              f"-> {run_dir.path}", file=sys.stderr)
    evaluator = EstimateEvaluator(probe_dir, spec.model or model_name, spec.weights, adc_per_image=args.adc_per_image,
                                  meanfield_images=args.meanfield_images, meanfield_top1=args.meanfield_top1)
    plots: list[Path] = []

    def finalize(rd, frame):
        plots.extend(plot_metrics(frame, spec.parameters, rd.path, title=f"sweep {spec.name} (estimate)"))

    result = run_combinations(spec, combos, evaluator, run_dir=run_dir, jobs=args.jobs, progress=not args.quiet,
                              finalize=finalize)
    _print_done(result, spec, plots, args.quiet, kind="summary")
    return 0


def _print_done(result: RunResult, spec: SweepSpec, plots: list[Path], quiet: bool, kind: str) -> None:
    if not quiet:
        print(compact_table(result.frame, spec.parameters, kind))
    if result.n_errors:
        print(f"{result.n_errors} combination(s) could not be evaluated; see the 'error' column", file=sys.stderr)
    print(f"{kind} CSV: {result.run_dir.csv_path}")
    if plots:
        print(f"plots: {', '.join(str(p) for p in plots)}")


def select_combinations(spec: SweepSpec, expr: str | None) -> list[Combination]:
    """The combinations of ``spec`` that ``--subset EXPR`` selects (all for None); SweepError if none."""
    combos = list(spec.combinations)
    if not expr:
        return combos
    import pandas as pd

    frame = pd.DataFrame([{"combo": c.index, "label": c.label, **{p: c.params.get(p) for p in spec.parameters}}
                          for c in combos])
    mask = subset_mask(frame, expr)
    chosen = [c for c, keep in zip(combos, mask) if keep]
    if not chosen:
        raise SweepError(f"--subset {expr!r} selects none of the {len(combos)} combinations")
    return chosen


def validate_main(argv: Sequence[str] | None = None) -> int:
    """``python -m sweeps.validate``: Monte Carlo next to the estimate for a sweep's combinations."""
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.validate",
        description="Monte Carlo referee next to the analytic estimate for (a subset of) a sweep's combinations, "
                    "on validation images disjoint from the probe images -> OUT/<name>/<UTC time>/validation.csv, "
                    "validation_scatter.png, validation.md.")
    _common_arguments(parser)
    parser.add_argument("--n-images", type=int, default=DEFAULT_MC_IMAGES,
                        help=f"validation-split images per Monte Carlo run (default {DEFAULT_MC_IMAGES})")
    parser.add_argument("--instances", type=int, default=DEFAULT_MC_INSTANCES,
                        help=f"chip instances per combination (default {DEFAULT_MC_INSTANCES})")
    parser.add_argument("--programmed-instances", type=int, default=None, metavar="N",
                        help="chip instances for combinations with programming error (one draw per chip: "
                             "its spread needs more chips than read noise does); default: --instances")
    parser.add_argument("--top1-images", type=int, default=None, metavar="M",
                        help="report the MC top-1 over the first M validation images: the float network runs on "
                             "all M, the MC on the first --n-images, and the float network is the control "
                             "variate of the accuracy drop (needs a split in random order; default: the whole "
                             "split for the default dataset, else --n-images)")
    parser.add_argument("--subset", default=None, metavar="EXPR",
                        help="which combinations: 'start:stop[:step]', '0,3,7', or a pandas query over the "
                             "parameter columns, e.g. \"adc_bits >= 6\" (backquote dotted names)")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (ImageNet validation folder); default: the sweep file's data_root")
    parser.add_argument("--batch-size", type=int, default=100, help="Monte Carlo batch size (default 100)")
    parser.add_argument("--no-mc-cache", action="store_true",
                        help="always rerun the Monte Carlo (default: reuse results cached under OUT/.mc-cache "
                             "for the same model, config, ranges, images, instances and simulator code)")
    parser.add_argument("--mc-refresh", action="store_true",
                        help="rerun the Monte Carlo even where cached and replace the cached results (e.g. to "
                             "add the per-image top-1 results that entries of an earlier simulator lack)")
    parser.add_argument("--device", default="cpu",
                        help="where the Monte Carlo runs: cpu (default) or cuda[:N] (a GPU; same chips, same cache)")
    parser.add_argument("--export-mc-jobs", type=Path, default=None, metavar="BUNDLE",
                        help="run nothing: write the Monte Carlo jobs of the combinations not cached yet (configs, "
                             "resolved ranges, images) to BUNDLE, for python -m sweeps.mc_jobs on another machine")
    parser.add_argument("--import-mc-results", type=Path, nargs="+", default=None, metavar="JSONL",
                        help="first put the results of python -m sweeps.mc_jobs into the Monte Carlo cache, then "
                             "validate as usual (the imported combinations only run their estimate)")
    parser.add_argument("--report", type=Path, default=None,
                        help="also write the Markdown report there (e.g. docs/validation.md)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report (--report) of the run given by --resume [RUN_DIR] "
                             "from the combinations finished so far, marked partial if the run is unfinished")
    args = parser.parse_args(argv)
    if args.programmed_instances is not None and args.programmed_instances < 1:
        raise SweepError(f"--programmed-instances={args.programmed_instances} must be a positive integer")
    if args.no_mc_cache and (args.export_mc_jobs or args.import_mc_results):
        raise SweepError("--export-mc-jobs and --import-mc-results work through the Monte Carlo cache; they cannot go "
                         "with --no-mc-cache")
    if args.export_mc_jobs and (args.import_mc_results or args.report_only):
        raise SweepError("--export-mc-jobs runs nothing; it cannot go with --import-mc-results or --report-only")
    if args.mc_refresh and args.no_mc_cache:
        raise SweepError("--mc-refresh replaces cached results; it cannot go with --no-mc-cache")
    if args.top1_images is not None and args.top1_images < args.n_images:
        raise SweepError(f"--top1-images={args.top1_images} must be at least --n-images={args.n_images}")
    for name in ("n_images", "instances", "batch_size"):
        if getattr(args, name) < 1:
            raise SweepError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    spec, probe_dir, probes = _load_checked(args)
    combos = select_combinations(spec, args.subset)
    model_name, dataset = probe_defaults(probes.stats.meta)
    model_name = spec.model or model_name
    dataset = spec.dataset or dataset
    data_root = args.data or spec.data_root
    options = {"probes": str(probe_dir.resolve()), "probe_fingerprint": probes.fingerprint, "model": model_name,
               "weights": str(spec.weights) if spec.weights else None, "dataset": dataset,
               "data_root": str(data_root) if data_root else None, "n_images": args.n_images,
               "instances": args.instances, "programmed_instances": args.programmed_instances, "subset": args.subset,
               "top1_images": args.top1_images, **_engine_options(args)}
    cache_dir = None if args.no_mc_cache else Path(args.out) / ".mc-cache"
    if args.export_mc_jobs:
        from cimstat.sweeps.offload import export_mc_jobs

        if args.device != "cpu":
            raise SweepError("--device is where this command runs the Monte Carlo; with --export-mc-jobs it runs "
                             "none (give the device to python -m sweeps.mc_jobs)")

        evaluator = ValidationEvaluator(probe_dir, model_name, spec.weights, dataset, data_root, args.n_images,
                                        args.instances, args.batch_size, cache_dir, args.programmed_instances,
                                        top1_images=args.top1_images)
        evaluator.setup()
        log = None if args.quiet else (lambda text: print(text, file=sys.stderr))
        n = export_mc_jobs(evaluator, combos, args.export_mc_jobs, include_cached=args.mc_refresh, progress=log)
        print(f"wrote {n} Monte Carlo job(s) of {len(combos)} combination(s) to {args.export_mc_jobs}; run them with "
              f"python -m sweeps.mc_jobs {args.export_mc_jobs} --device cuda --out results.jsonl")
        return 0
    if args.import_mc_results:
        from cimstat.sweeps.offload import import_mc_results

        n = import_mc_results(args.import_mc_results, cache_dir, log=lambda text: print(text, file=sys.stderr))
        print(f"imported {n} Monte Carlo result(s) into {cache_dir}", file=sys.stderr)
    from cimstat.montecarlo.measure import resolve_device

    resolve_device(args.device)  # fail before the first combination, not after it
    if args.report_only and (args.report is None or not args.resume):
        raise SweepError("--report-only needs --report PATH and --resume [RUN_DIR] (the run to report on)")
    if args.report_only and args.resume is True and RunDir.latest_incomplete(Path(args.out) / spec.name,
                                                                           "validation") is None:
        raise SweepError(f"--report-only: no unfinished validation run of {spec.name!r} under {args.out}; "
                         "name a finished one with --resume RUN_DIR (its validation.md is already written)")
    run_dir, resumed = prepare_run_dir(spec, combos, kind="validation", out_root=args.out, options=options,
                                       resume=args.resume)
    if not args.quiet:
        print(f"{'resuming' if resumed else 'running'} validation of {spec.name!r}: {len(combos)} combinations, "
              f"{args.n_images} images x {args.instances} instances -> {run_dir.path}", file=sys.stderr)
    evaluator = ValidationEvaluator(probe_dir, model_name, spec.weights, dataset, data_root, args.n_images,
                                    args.instances, args.batch_size,
                                    cache_dir, args.programmed_instances, adc_per_image=args.adc_per_image,
                                    meanfield_images=args.meanfield_images, meanfield_top1=args.meanfield_top1,
                                    device=args.device, top1_images=args.top1_images,
                                    refresh_cache=args.mc_refresh)
    plots: list[Path] = []
    command = _command_line("python -m sweeps.validate", None)

    def write_report(rd, frame, partial: str = "") -> None:
        info = {"command": command, "sweep": str(spec.path or spec.name), "probes": str(probe_dir),
                "n_probe_images": probes.stats.meta.get("n_images"), "model": model_name, "dataset": dataset,
                "n_images": args.n_images, "instances": args.instances,
                "programmed_instances": args.programmed_instances, "run_dir": str(rd.path),
                "created": rd.manifest().get("created", ""), "subset": args.subset, "partial": partial}
        text = validation_report(frame, spec.parameters, info).encode()
        if not partial:
            atomic_write_bytes(rd.path / "validation.md", text)
        if args.report is not None:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(args.report), text)

    def finalize(rd, frame):
        path = plot_validation(frame, rd.path, title=f"sweep {spec.name}: estimate vs Monte Carlo")
        if path is not None:
            plots.append(path)
        plots.extend(plot_metrics(frame, spec.parameters, rd.path,
                                  title=f"sweep {spec.name} (estimate; with the MC in designs.png)"))
        write_report(rd, frame)

    if args.report_only:
        frame = rows_to_frame(spec, combos, run_dir.read_journal(repair=False))
        partial = "" if run_dir.complete else (
            f"PARTIAL: {len(frame)} of {len(combos)} configurations finished; complete it with the same command "
            f"and --resume {run_dir.path}")
        write_report(run_dir, frame, partial)
        print(f"report: {args.report} ({len(frame)} of {len(combos)} configurations)")
        return 0

    result = run_combinations(spec, combos, evaluator, run_dir=run_dir, jobs=args.jobs, progress=not args.quiet,
                              finalize=finalize)
    _print_done(result, spec, plots, args.quiet, kind="validation")
    if args.report is not None:
        print(f"report: {args.report}")
    return 0


def mc_jobs_main(argv: Sequence[str] | None = None) -> int:
    """``python -m sweeps.mc_jobs``: measure a job bundle's Monte Carlo jobs (see :mod:`cimstat.sweeps.offload`)."""
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.mc_jobs",
        description="Run the Monte Carlo jobs exported by python -m sweeps.validate --export-mc-jobs (on a GPU "
                    "machine, say) -> one JSON line per finished job in --out; bring that file back and pass it "
                    "to python -m sweeps.validate --import-mc-results. Needs the same checkout, not the probes.")
    parser.add_argument("bundle", type=Path, help="job bundle written by --export-mc-jobs")
    parser.add_argument("--out", type=Path, required=True, help="results file (JSON lines; appended, resumable)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--weights", type=Path, default=None,
                        help="local weights file, where it lies elsewhere than on the exporting machine")
    parser.add_argument("--runners", type=int, default=1, metavar="N",
                        help="N runner processes side by side on the device, most costly jobs first (a GPU is kept "
                             "busier: 4 on one H200 measured the validation sweep in 4.3 min); default 1")
    parser.add_argument("--claims", type=Path, default=None, metavar="DIR",
                        help="runners side by side share this folder: each job goes to the first runner that claims "
                             "it (give each runner its own --out)")
    parser.add_argument("--largest-first", action="store_true",
                        help="most costly jobs first (default: cheapest first)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no job after this many seconds (the rest stay for a rerun)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (of each runner)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SweepError(f"--threads={args.threads} must be a positive integer")
        import torch

        torch.set_num_threads(args.threads)
    from cimstat.sweeps.offload import run_mc_jobs, run_mc_jobs_side_by_side

    if args.runners < 1:
        raise SweepError(f"--runners={args.runners} must be a positive integer")
    if args.runners > 1:
        if args.claims is not None or args.largest_first:
            raise SweepError("--runners manages its own claims and runs the most costly jobs first; it cannot go "
                             "with --claims or --largest-first")
        n = run_mc_jobs_side_by_side(args.bundle, args.out, args.runners, device=args.device, weights=args.weights,
                                     time_budget_s=args.time_budget, threads=args.threads)
        print(f"measured {n} job(s) with {args.runners} runners -> {args.out}")
        return 0
    n = run_mc_jobs(args.bundle, args.out, device=args.device, weights=args.weights, claims=args.claims,
                    largest_first=args.largest_first, time_budget_s=args.time_budget, progress=not args.quiet,
                    log=lambda text: print(text, file=sys.stderr, flush=True))
    print(f"measured {n} job(s) -> {args.out}")
    return 0
