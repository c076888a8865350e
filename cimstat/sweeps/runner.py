"""Running a sweep's combinations: journal, ``--resume``, parallel processes, the final table.

The runner knows nothing of estimates or Monte Carlo: it is given an *evaluator*, a
picklable object with ``setup()`` (load probes, model, data — once per process) and
``__call__(combination) -> dict`` (the metric columns of one row). ``sweeps.run`` passes
:class:`cimstat.sweeps.evaluators.EstimateEvaluator`, ``sweeps.validate`` passes
:class:`cimstat.sweeps.evaluators.ValidationEvaluator`; tests pass small fakes.

Every finished combination is appended to the run's journal at once (see
:mod:`cimstat.sweeps.rundir`); a run that is killed and restarted with ``resume`` skips
the journaled combinations and runs the rest, so each ends up in the CSV exactly once.
A combination the evaluator rejects with a :class:`~cimstat.errors.CimstatError` (e.g. an
``EstimationError``: the engine cannot estimate it faithfully) is recorded with its message in
the ``error`` column; any other exception stops the run (fix it, then ``--resume``).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import pandas as pd
from tqdm import tqdm

from cimstat.errors import CimstatError, SweepError
from cimstat.sweeps.rundir import MARKER, RunDir, atomic_write
from cimstat.sweeps.spec import Combination, SweepSpec, format_value

__all__ = ["Evaluator", "RunResult", "run_combinations", "rows_to_frame", "prepare_run_dir"]

CSV_REFRESH_SECONDS = 5.0
"""The partial CSV is rewritten at most this often while a run is in progress."""


class Evaluator(Protocol):
    """What the runner calls: ``setup()`` once per process, then one call per combination."""

    def setup(self) -> None: ...

    def __call__(self, combo: Combination) -> dict[str, Any]: ...


@dataclass
class RunResult:
    run_dir: RunDir
    frame: pd.DataFrame
    n_run: int
    """Combinations evaluated by this call (the rest came from the journal)."""
    n_errors: int


def _manifest(spec: SweepSpec, combos: Sequence[Combination], options: Mapping[str, Any]) -> dict[str, Any]:
    return {"sweep": spec.name, "sweep_file": str(spec.path) if spec.path else None,
            "sweep_sha256": spec.source_sha256, "options": dict(options),
            "parameters": list(spec.parameters),
            "combos": [{"combo": c.index, "key": c.key} for c in combos],
            "command": " ".join(sys.argv)}


def prepare_run_dir(spec: SweepSpec, combos: Sequence[Combination], *, kind: str, out_root: Path,
                    options: Mapping[str, Any], resume: bool | str | Path = False) -> tuple[RunDir, bool]:
    """A new run folder, or the one to resume (checked to be the same sweep and options).

    ``resume``: False (new run), True (the newest unfinished run of this sweep and kind, or a
    new one if there is none), or a folder path. Returns ``(run_dir, resumed)``.
    """
    sweep_dir = Path(out_root) / spec.name
    manifest = _manifest(spec, combos, options)
    run: RunDir | None = None
    if resume is True:
        run = RunDir.latest_incomplete(sweep_dir, kind)
        if run is None:
            print(f"no unfinished {kind} run of sweep {spec.name!r} under {sweep_dir}; starting a new one",
                  file=sys.stderr)
    elif resume:
        run = RunDir.open_existing(Path(resume), kind)
    if run is None:
        return RunDir.create(sweep_dir, kind, manifest), False
    old = run.manifest()
    if old.get("sweep") != spec.name:
        raise SweepError(f"--resume {run.path}: that run is of sweep {old.get('sweep')!r}, not {spec.name!r}")
    old_keys = [c["key"] for c in old.get("combos", [])]
    if old_keys != [c.key for c in combos]:
        raise SweepError(f"--resume {run.path}: the sweep's combinations changed since that run started "
                         f"({len(old_keys)} then, {len(combos)} now, or different values); start a new run "
                         "without --resume")
    old_options = old.get("options", {})
    changed = sorted(k for k in set(old_options) | set(options)
                     if json.dumps(old_options.get(k), default=str) != json.dumps(options.get(k), default=str))
    if changed:
        detail = ", ".join(f"{k}: {old_options.get(k)!r} then, {options.get(k)!r} now" for k in changed)
        raise SweepError(f"--resume {run.path}: options differ from that run's ({detail}); use the same "
                         "options or start a new run without --resume")
    return run, True


def rows_to_frame(spec: SweepSpec, combos: Sequence[Combination], rows: Mapping[int, Mapping[str, Any]]) -> pd.DataFrame:
    """One DataFrame row per finished combination, in sweep order: ``combo``, ``label`` (if any),
    the swept parameters, then the evaluator's columns (``error`` last, if any)."""
    has_label = any(c.label for c in combos)
    records = []
    metric_cols: list[str] = []
    for combo in combos:
        row = rows.get(combo.index)
        if row is None:
            continue
        record: dict[str, Any] = {"combo": combo.index}
        if has_label:
            record["label"] = combo.label
        for param in spec.parameters:
            record[param] = format_value(combo.params[param]) if param in combo.params else ""
        for key, value in row.items():
            if key not in metric_cols:
                metric_cols.append(key)
            record[key] = value
        records.append(record)
    columns = ["combo"] + (["label"] if has_label else []) + list(spec.parameters)
    metric_cols = [c for c in metric_cols if c != "error"] + (["error"] if "error" in metric_cols else [])
    return pd.DataFrame.from_records(records, columns=columns + metric_cols)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


# ---------------------------------------------------------------------------- worker processes
_WORKER_EVALUATOR: Any = None


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker if the parent process dies (no orphans after a kill -9)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass


def _worker_init(evaluator: Any, threads: int) -> None:
    global _WORKER_EVALUATOR
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills the workers
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass
    evaluator.setup()
    _WORKER_EVALUATOR = evaluator


def _evaluate(evaluator: Any, combo: Combination) -> tuple[int, dict[str, Any] | None, str | None]:
    """(index, row, crash traceback): a CimstatError becomes a row with an ``error`` column."""
    try:
        return combo.index, dict(evaluator(combo)), None
    except CimstatError as err:
        return combo.index, {"error": f"{type(err).__name__}: {err}"}, None
    except Exception:  # noqa: BLE001 - reported by the parent with the traceback
        return combo.index, None, traceback.format_exc()


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker_loop(conn: Any, evaluator: Any, threads: int) -> None:
    """A worker process: receive a combination, send back ``(index, row, crash)``; ``None`` ends it."""
    _worker_init(evaluator, threads)
    while True:
        combo = conn.recv()
        if combo is None:
            return
        conn.send(_evaluate(_WORKER_EVALUATOR, combo))


def _evaluations(evaluator: Any, todo: Sequence[Combination], jobs: int) -> Iterable[tuple[int, Any, Any]]:
    """Rows as they finish. With ``jobs > 1``: one spawned process per job, each with its own pipe
    (no lock shared with a worker, so killing workers mid-task can never deadlock the parent);
    leaving early (Ctrl-C, SIGTERM, an error) kills them at once."""
    if jobs <= 1 or len(todo) <= 1:
        evaluator.setup()
        for combo in todo:
            yield _evaluate(evaluator, combo)
        return
    import multiprocessing
    from multiprocessing.connection import wait

    jobs = min(jobs, len(todo))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    workers = []
    try:
        for _ in range(jobs):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker_loop, args=(child_end, evaluator, threads), daemon=True)
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        pending = list(todo)
        busy: dict[Any, Any] = {}
        for proc, conn in workers:
            if pending:
                conn.send(pending.pop(0))
                busy[conn] = proc
        while busy:
            for conn in wait(list(busy) + [p.sentinel for p in busy.values()]):
                if conn not in busy:  # a worker process died without answering
                    dead = [c for c, p in busy.items() if p.sentinel == conn]
                    if dead and not dead[0].poll():
                        raise SweepError(f"a worker process died (exit code {busy[dead[0]].exitcode}); "
                                         "rerun with --resume")
                    continue
                try:
                    result = conn.recv()
                except EOFError:
                    raise SweepError(f"a worker process died (exit code {busy[conn].exitcode}); rerun with "
                                     "--resume") from None
                yield result
                proc = busy.pop(conn)
                if pending:
                    conn.send(pending.pop(0))
                    busy[conn] = proc
        for proc, conn in workers:
            conn.send(None)
        for proc, _ in workers:
            proc.join(timeout=10)
    finally:
        for proc, conn in workers:
            if proc.is_alive():
                proc.kill()
            conn.close()
        for proc, _ in workers:
            proc.join(timeout=10)


def run_combinations(spec: SweepSpec, combos: Sequence[Combination], evaluator: Evaluator, *,
                     run_dir: RunDir, jobs: int = 1, progress: bool = True,
                     finalize: Callable[[RunDir, pd.DataFrame], None] | None = None,
                     description: str = "") -> RunResult:
    """Evaluate every combination not yet in ``run_dir``'s journal, journal each row as it
    finishes, then write ``<kind>.csv`` (+ whatever ``finalize`` writes) and drop the marker."""
    if jobs < 1:
        raise SweepError(f"--jobs={jobs} must be at least 1")
    run_dir.lock()
    old_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _main_thread() else None
    try:
        done = run_dir.read_journal()
        journal_keys = run_dir.keys_in_journal()
        by_index = {c.index: c for c in combos}
        for index, key in journal_keys.items():
            if index not in by_index or by_index[index].key != key:
                raise SweepError(f"journal {run_dir.journal_path} holds combination #{index} of another sweep; "
                                 "start a new run without --resume")
        todo = [c for c in combos if c.index not in done]
        rows = dict(done)
        n_errors = sum(1 for r in rows.values() if "error" in r)
        last_csv = time.monotonic()
        bar = tqdm(total=len(combos), initial=len(combos) - len(todo), disable=not progress,
                   desc=description or f"{spec.name} ({run_dir.kind})", unit="combo", file=sys.stderr)
        evaluations = _evaluations(evaluator, todo, jobs)
        try:
            for index, row, crash in evaluations:
                if crash is not None:
                    raise SweepError(f"combination #{index} {by_index[index].params} failed; fix it and rerun "
                                     f"with --resume {run_dir.path}\n{crash}")
                run_dir.append(index, by_index[index].key, row)
                rows[index] = row
                n_errors += "error" in row
                bar.update(1)
                if time.monotonic() - last_csv > CSV_REFRESH_SECONDS:
                    _write_csv(run_dir.csv_path, rows_to_frame(spec, combos, rows))
                    last_csv = time.monotonic()
        finally:
            evaluations.close()  # kills the worker processes, if any, at once
            bar.close()
        frame = rows_to_frame(spec, combos, rows)
        missing = [c.index for c in combos if c.index not in rows]
        if missing:  # pragma: no cover - defensive: every todo item yields one row or raises
            raise SweepError(f"combinations {missing} produced no row; rerun with --resume {run_dir.path}")
        _write_csv(run_dir.csv_path, frame)
        if finalize is not None:
            finalize(run_dir, frame)
        run_dir.mark_complete()
        return RunResult(run_dir=run_dir, frame=frame, n_run=len(todo), n_errors=n_errors)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {run_dir.path} keeps its {MARKER} marker; finish it with --resume {run_dir.path}",
              file=sys.stderr)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        run_dir.close()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
