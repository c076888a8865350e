"""PNG plots of sweep results (matplotlib, Agg backend, each file written atomically).

* :func:`plot_metrics`: for every swept parameter set on every combination (a grid axis), ``<param>.png``
  with one panel per metric (conv1 SNR, fc SNR, top-1) against that parameter; one line per combination of
  the other parameters when there are at most 8 of them, otherwise the points and their
  median per value. A parameter that only some points set (a list of designs) gets no plot of its own:
  labelled combinations get ``designs.png`` instead, every metric per design.
* :func:`plot_validation`: ``validation_scatter.png``, estimate (y) against Monte Carlo (x)
  for conv1 SNR, fc SNR and top-1, with the y = x line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cimstat.sweeps.rundir import atomic_write

__all__ = ["plot_metrics", "plot_designs", "plot_validation", "METRICS"]

METRICS: dict[str, str] = {"conv1_snr_db": "conv1 SNR (dB)", "fc_snr_db": "fc (logits) SNR (dB)",
                           "top1": "top-1 (%)"}
MAX_LINES = 8
MC_SE_COLUMNS: dict[str, str] = {"conv1_snr_db": "mc_conv1_snr_se_db", "fc_snr_db": "mc_fc_snr_se_db",
                                 "top1": "mc_top1_se_pp"}
"""The standard error column of each metric's Monte Carlo value (in the metric's plotted unit: dB, pp)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _x_positions(values: pd.Series) -> tuple[np.ndarray, list[str] | None]:
    """Numeric x if every value is a number, else categorical positions in first-seen order."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return numeric.to_numpy(dtype=float), None
    order = list(dict.fromkeys(values.astype(str)))
    return values.astype(str).map({v: i for i, v in enumerate(order)}).to_numpy(dtype=float), order


def _metric_values(frame: pd.DataFrame, metric: str) -> np.ndarray:
    """A metric column as plotted: top-1 (estimate or Monte Carlo, stored as fractions) in %, SNRs in dB."""
    y = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=float)
    return 100 * y if metric in ("top1", "mc_top1") else y


def _save(fig: Any, path: Path) -> None:
    plt = _pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def _set_everywhere(frame: pd.DataFrame, param: str) -> bool:
    """Whether every combination gives ``param`` a value (a blank cell: a point that leaves it at the base)."""
    column = frame[param]
    return bool(column.notna().all() and not (column.astype(str) == "").any())


def plot_designs(frame: pd.DataFrame, out_dir: Path, metrics: Sequence[str], title: str = "") -> Path | None:
    """``designs.png``: every metric per labelled combination (one row per design, in sweep order); where the
    frame has Monte Carlo columns (a validation run), the MC value and its standard error beside the estimate."""
    if "label" not in frame.columns or frame.empty:
        return None
    labels = frame["label"].fillna("").astype(str).tolist()
    if not all(labels):
        return None
    plt = _pyplot()
    if "seed" in frame.columns and frame["seed"].nunique() > 1:
        labels = [f"{lab} (seed {s})" for lab, s in zip(labels, frame["seed"])]
    pos = np.arange(len(labels))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 3.0, 0.9 + 0.28 * len(labels)),
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        y = _metric_values(frame, metric)
        ok = np.isfinite(y)
        ax.scatter(y[ok], pos[ok], s=18, label="estimate", zorder=3)
        mc_col = f"mc_{metric}"
        if mc_col in frame.columns:  # a validation run: the Monte Carlo beside each estimate, ± its standard error
            mc = _metric_values(frame, mc_col)
            se_col = MC_SE_COLUMNS[metric]
            se = _metric_values(frame, se_col) if se_col in frame.columns else np.zeros(len(frame))
            has = np.isfinite(mc)
            ax.errorbar(mc[has], pos[has] + 0.18, xerr=np.nan_to_num(se[has]), fmt="s",
                        ms=4, color="tab:orange", elinewidth=1, capsize=2, label="Monte Carlo ± se")
            if ax is axes[0][0]:
                ax.legend(fontsize=7)
        for p in pos[~ok]:  # no finite value: exact (infinite SNR) or not evaluated
            ax.text(0.02, p, "exact" if np.isinf(y[p]) else "n/a", transform=ax.get_yaxis_transform(),
                    va="center", fontsize=7, color="0.4")
        ax.set_xlabel(METRICS.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0][0].set_yticks(pos)
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(out_dir) / "designs.png"
    _save(fig, path)
    return path


def plot_metrics(frame: pd.DataFrame, parameters: Sequence[str], out_dir: Path,
                 metrics: Sequence[str] = tuple(METRICS), title: str = "") -> list[Path]:
    """One PNG per swept parameter set on every combination: every metric against it; ``designs.png`` when
    the combinations are labelled. Returns the files written."""
    plt = _pyplot()
    metrics = [m for m in metrics if m in frame.columns and pd.to_numeric(frame[m], errors="coerce").notna().any()]
    written: list[Path] = []
    if not metrics or frame.empty:
        return written
    designs = plot_designs(frame, out_dir, metrics, title)
    if designs is not None:
        written.append(designs)
    axes_params = [p for p in parameters if p in frame.columns and _set_everywhere(frame, p)]
    for param in axes_params:
        if frame[param].nunique() < 2:
            continue
        others = [p for p in axes_params if p != param and frame[p].nunique() > 1]
        x, categories = _x_positions(frame[param])
        groups = frame.groupby(others if len(others) > 1 else others[0], sort=False).groups if others \
            else {(): frame.index}
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            y = _metric_values(frame, metric)
            if len(groups) <= MAX_LINES:
                for key, idx in groups.items():
                    pos = frame.index.get_indexer(idx)
                    order = np.argsort(x[pos], kind="stable")
                    key = key if isinstance(key, tuple) else (key,)
                    label = ", ".join(f"{p}={v}" for p, v in zip(others, key)) or None
                    ax.plot(x[pos][order], y[pos][order], marker="o", ms=4, label=label)
                if others and ax is axes[0][0]:
                    ax.legend(fontsize=7)
            else:
                ax.scatter(x, y, s=10, alpha=0.4)
                med = pd.Series(y).groupby(x).median()
                ax.plot(med.index, med.values, color="k", marker="o", ms=4, label="median")
                if ax is axes[0][0]:
                    ax.legend(fontsize=7)
            if categories is not None:
                ax.set_xticks(range(len(categories)))
                ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(param)
            ax.set_ylabel(METRICS.get(metric, metric))
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / f"{_safe_name(param)}.png"
        _save(fig, path)
        written.append(path)
    return written


def plot_validation(frame: pd.DataFrame, out_dir: Path, title: str = "") -> Path | None:
    """``validation_scatter.png``: estimate against Monte Carlo for each metric present."""
    plt = _pyplot()
    pairs = [(m, f"mc_{m}") for m in METRICS if m in frame.columns and f"mc_{m}" in frame.columns]
    if not pairs or frame.empty:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.3 * len(pairs), 4.0), squeeze=False)
    for ax, (est_col, mc_col) in zip(axes[0], pairs):
        est, mc = _metric_values(frame, est_col), _metric_values(frame, mc_col)
        ok = np.isfinite(est) & np.isfinite(mc)
        ax.scatter(mc[ok], est[ok], s=16, alpha=0.8)
        if ok.any():
            lo, hi = float(min(est[ok].min(), mc[ok].min())), float(max(est[ok].max(), mc[ok].max()))
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="estimate = MC")
            ax.legend(fontsize=7)
        name = METRICS[est_col]
        ax.set_xlabel(f"Monte Carlo {name}")
        ax.set_ylabel(f"estimate {name}")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(out_dir) / "validation_scatter.png"
    _save(fig, path)
    return path
