"""Human-readable output of sweeps: the compact console table and the validation report.

:func:`validation_report` turns a ``validation.csv`` frame into the Markdown of
``docs/validation.md``: error statistics against the issue's targets, per-layer isolated-SNR
errors, and one table row per configuration with estimate, Monte Carlo and error. Every
number comes from the frame; nothing is typed in by hand.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cimstat.sweeps.evaluators import LAYER_SNR_PREFIX, MC_LAYER_SNR_PREFIX, column_layer, layer_column

__all__ = ["compact_table", "validation_report", "validation_stats", "FC_MIN_MC_SNR_DB"]

FC_MIN_MC_SNR_DB = 10.0
"""fc-SNR errors are judged only where the Monte Carlo fc SNR is at least this (dB)."""
MAX_CONSOLE_ROWS = 60


def _num(frame: pd.DataFrame, col: str) -> np.ndarray:
    if col not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)


def compact_table(frame: pd.DataFrame, parameters: Sequence[str], kind: str = "summary") -> str:
    """The few columns a user reads first, formatted; long sweeps show head and tail."""
    cols = ["combo"] + (["label"] if "label" in frame.columns else []) + [p for p in parameters if p in frame.columns]
    show = frame[cols].copy()
    if kind == "validation":
        pairs = [("conv1_snr_db", "conv1 est"), ("mc_conv1_snr_db", "conv1 MC"), ("err_conv1_db", "err dB"),
                 ("fc_snr_db", "fc est"), ("mc_fc_snr_db", "fc MC"), ("err_fc_db", "err dB "),
                 ("top1", "top1 est %"), ("mc_top1", "top1 MC %"), ("err_top1_pp", "err pp")]
    else:
        pairs = [("conv1_snr_db", "conv1 dB"), ("fc_snr_db", "fc dB"), ("top1", "top1 %"),
                 ("est_seconds", "est ms")]
    for col, title in pairs:
        if col in frame.columns:
            values = _num(frame, col)
            if col in ("top1", "mc_top1"):
                values = 100 * values
            elif col == "est_seconds":
                values = 1000 * values
            show[title] = [f"{v:.2f}" if math.isfinite(v) else "-" for v in values]
    if "error" in frame.columns:
        show["error"] = frame["error"].fillna("").astype(str).str.slice(0, 60)
    if len(show) > MAX_CONSOLE_ROWS:
        half = MAX_CONSOLE_ROWS // 2
        text = show.head(half).to_string(index=False)
        tail = show.tail(half).to_string(index=False).split("\n", 1)[1]
        return f"{text}\n  ... {len(show) - 2 * half} more rows in the CSV ...\n{tail}"
    return show.to_string(index=False)


def _stat(values: np.ndarray) -> tuple[float, float, int]:
    v = np.abs(values[np.isfinite(values)])
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(np.median(v)), float(v.max()), int(v.size)


def top1_drop_error_pp(frame: pd.DataFrame) -> np.ndarray:
    """Per configuration, the error of the predicted top-1 *drop*: ``(top1 - top1_clean) - (mc_top1 -
    mc_top1_clean)`` in pp. Each drop is taken against the float network on its own images (the probe images
    for the estimate, the MC images for the MC), so the difference between the two image samples' clean
    accuracies cancels; NaN where a column is missing."""
    cols = ("top1", "top1_clean", "mc_top1", "mc_top1_clean")
    if any(c not in frame.columns for c in cols):
        return np.full(len(frame), math.nan)
    est, clean, mc, mc_clean = (_num(frame, c) for c in cols)
    return 100 * ((est - clean) - (mc - mc_clean))


def top1_error_in_standard_errors(frame: pd.DataFrame) -> np.ndarray:
    """Per configuration, ``(top1 - mc_top1) / √(SE_MC² + SE_est²)``: the MC's top-1 error bar (its images and
    chips, ``mc_top1_se_pp``) and the estimate's image-sampling one (``top1_se``: the two are on different images);
    NaN where a column is missing."""
    cols = ("err_top1_pp", "mc_top1_se_pp", "top1_se")
    if any(c not in frame.columns for c in cols):
        return np.full(len(frame), math.nan)
    err, se_mc, se_est = _num(frame, "err_top1_pp"), _num(frame, "mc_top1_se_pp"), 100 * _num(frame, "top1_se")
    se = np.sqrt(se_mc ** 2 + se_est ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(se > 0, err / np.where(se > 0, se, 1.0), np.nan)


def validation_stats(frame: pd.DataFrame) -> dict[str, Any]:
    """Error statistics of a validation frame (absolute errors; dB and percentage points)."""
    out: dict[str, Any] = {}
    out["conv1_median_db"], out["conv1_max_db"], out["conv1_n"] = _stat(_num(frame, "err_conv1_db"))
    mc_fc = _num(frame, "mc_fc_snr_db")
    fc_err = _num(frame, "err_fc_db")
    judged = mc_fc >= FC_MIN_MC_SNR_DB
    out["fc_median_db"], out["fc_max_db"], out["fc_n"] = _stat(np.where(judged, fc_err, np.nan))
    out["fc_low_n"] = int((np.isfinite(mc_fc) & ~judged).sum())
    out["fc_low_median_db"], out["fc_low_max_db"], _ = _stat(np.where(np.isfinite(mc_fc) & ~judged, fc_err, np.nan))
    route = frame["route"].astype(str).to_numpy() if "route" in frame.columns else np.full(len(frame), "linear")
    top1_err = _num(frame, "err_top1_pp")
    out["meanfield_n"] = int((route == "meanfield").sum())
    for name in ("linear", "meanfield"):
        out[f"top1_{name}_route"] = _stat(np.where(route == name, top1_err, np.nan))
    out["top1_median_pp"], out["top1_max_pp"], out["top1_n"] = _stat(_num(frame, "err_top1_pp"))
    out["drop_median_pp"], out["drop_max_pp"], out["drop_n"] = _stat(top1_drop_error_pp(frame))
    # the top-1 error in units of its standard error: the MC's (images, chips) and the estimate's own (its images)
    z = top1_error_in_standard_errors(frame)
    out["top1_z_median"], out["top1_z_max"], out["top1_z_n"] = _stat(z)
    out["top1_z_beyond_2"] = int((np.abs(z[np.isfinite(z)]) > 2).sum())
    # MC top-1 error bars over the split without per-image results (cached by an earlier simulator)
    kind = frame["mc_top1_se_kind"] if "mc_top1_se_kind" in frame.columns else pd.Series("", index=frame.index)
    out["top1_unpaired_n"] = int(((kind == "unpaired").to_numpy() & np.isfinite(_num(frame, "mc_top1"))).sum())
    # configurations whose top-1 the engine declined (NaN estimate next to a Monte Carlo value)
    out["top1_declined_n"] = int((np.isfinite(_num(frame, "mc_top1")) & ~np.isfinite(_num(frame, "top1"))).sum())
    layer_errors: dict[str, np.ndarray] = {}
    for col in frame.columns:
        name = column_layer(col, MC_LAYER_SNR_PREFIX)
        if name is not None:
            est_col = layer_column(LAYER_SNR_PREFIX, name)
            if est_col in frame.columns:
                with np.errstate(invalid="ignore"):  # inf - inf: a layer exact in both -> NaN, not judged
                    layer_errors[name] = _num(frame, est_col) - _num(frame, col)
    out["layers"] = {name: _stat(err) for name, err in layer_errors.items() if np.isfinite(err).any()}
    out["exact_layers"] = [name for name, err in layer_errors.items() if not np.isfinite(err).any()]
    all_err = np.concatenate(list(layer_errors.values())) if layer_errors else np.array([])
    out["layer_median_db"], out["layer_max_db"], out["layer_n"] = _stat(all_err)
    for col in ("mc_conv1_snr_se_db", "mc_fc_snr_se_db", "mc_top1_se_pp", "est_seconds", "mc_seconds", "top1_se"):
        v = _num(frame, col)
        v = v[np.isfinite(v)]
        out[col] = (float(np.median(v)), float(v.max())) if v.size else (math.nan, math.nan)
    out["top1_se_pp"] = tuple(100 * v for v in out.pop("top1_se"))
    devices = frame["mc_device"].dropna().astype(str) if "mc_device" in frame.columns else None
    out["mc_devices"] = ", ".join(f"{n} on {d}" for d, n in devices.value_counts().items()) if devices is not None \
        and len(devices) else ""
    out["n_configs"] = len(frame)
    out["n_errors"] = int(frame["error"].notna().sum()) if "error" in frame.columns else 0
    return out


def _top1_images(frame: pd.DataFrame, info: Mapping[str, Any]) -> int | None:
    """The split images the MC top-1 is reported over, where that is more than the MC's own (else None)."""
    m = _num(frame, "mc_top1_images")
    m = m[np.isfinite(m)]
    n = info.get("n_images")
    if not m.size or not isinstance(n, int) or m.max() <= n:
        return None
    return int(m.max())


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _verdict(value: float, target: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return "met" if value <= target else "**missed**"


def validation_report(frame: pd.DataFrame, parameters: Sequence[str], info: Mapping[str, Any]) -> str:
    """Markdown of ``docs/validation.md`` for a validation frame and the run's facts ``info``
    (``command``, ``sweep``, ``probes``, ``n_probe_images``, ``model``, ``dataset``,
    ``n_images``, ``instances``, ``created``, ``run_dir``)."""
    s = validation_stats(frame)
    partial = info.get("partial") or ""
    subset = info.get("subset")
    lines = ["# Validation: analytic estimate vs Monte Carlo", ""]
    if partial:
        lines += [f"**{partial}.**", ""]
    lines += [
             f"Generated by `{info.get('command', '')}` on {info.get('created', '')} "
             f"(run folder `{info.get('run_dir', '')}`); do not edit by hand — rerun the command.", "",
             f"- sweep: `{info.get('sweep', '')}` ({s['n_configs']} configurations"
             + (f" selected by `--subset {subset}`" if subset else "")
             + (f", {s['n_errors']} not estimable" if s["n_errors"] else "") + ")",
             f"- model: `{info.get('model', '')}`; probes: `{info.get('probes', '')}` "
             f"({info.get('n_probe_images', '?')} images of the probe split)",
             f"- Monte Carlo: {info.get('n_images', '?')} images of the `{info.get('dataset', '')}` validation split "
             f"(disjoint from the probe split), {info.get('instances', '?')} chip instances per configuration"
             + (f" ({info['programmed_instances']} where programming error is on)"
                if info.get("programmed_instances") else ""),
             *([f"- MC top-1: over the first {m} images of the validation split (the {info.get('n_images', '?')} MC "
                "images among them): the float network's top-1 on all of them plus the drop the MC measured on "
                "its images, each image paired with the float network (a control variate; "
                "`cimstat.sweeps.evaluators.top1_over_split`); the MC images' own top-1 is `mc_top1_sample` in "
                "the CSV"] if (m := _top1_images(frame, info)) else []),
             "- errors are estimate − MC; SNR in dB, top-1 in percentage points (pp)", "",
             "## Error statistics", "",
             "| quantity | median abs error | max abs error | configs | target | |",
             "|---|---|---|---|---|---|",
             f"| conv1 isolated SNR | {_f(s['conv1_median_db'])} dB | {_f(s['conv1_max_db'])} dB | {s['conv1_n']} "
             f"| max ≤ 0.5 dB | {_verdict(s['conv1_max_db'], 0.5)} |",
             f"| every layer's isolated SNR | {_f(s['layer_median_db'])} dB | {_f(s['layer_max_db'])} dB | "
             f"{s['layer_n']} (config, layer) pairs | median ≤ 0.5, max ≤ 1.0 dB | "
             f"{_verdict(max(s['layer_median_db'] / 0.5, s['layer_max_db'] / 1.0), 1.0)} |",
             f"| fc (logits) SNR where MC fc SNR ≥ {FC_MIN_MC_SNR_DB:g} dB | {_f(s['fc_median_db'])} dB | "
             f"{_f(s['fc_max_db'])} dB | {s['fc_n']} (+{s['fc_low_n']} below) | max ≤ 1.0 dB | "
             f"{_verdict(s['fc_max_db'], 1.0)} |",
             f"| top-1 | {_f(s['top1_median_pp'])} pp | {_f(s['top1_max_pp'])} pp | {s['top1_n']}"
             + (f" (+{s['top1_declined_n']} declined)" if s.get("top1_declined_n") else "")
             + f" | max ≤ 1.5 pp | {_verdict(s['top1_max_pp'], 1.5) if not s.get('top1_declined_n') else '**missed**'} |",
             *([f"| fc SNR where MC fc SNR < {FC_MIN_MC_SNR_DB:g} dB (reported) | {_f(s['fc_low_median_db'])} dB | "
                f"{_f(s['fc_low_max_db'])} dB | {s['fc_low_n']} | – | |"] if s.get("fc_low_n") else []),
             *([f"| top-1, linear route | {_f(s['top1_linear_route'][0])} pp | {_f(s['top1_linear_route'][1])} pp | "
                f"{s['top1_linear_route'][2]} | – | |",
                f"| top-1, mean-field route (collapse regime) | {_f(s['top1_meanfield_route'][0])} pp | "
                f"{_f(s['top1_meanfield_route'][1])} pp | {s['top1_meanfield_route'][2]} | – | |"]
               if s.get("meanfield_n") else []),
             f"| top-1 drop from the float network (each on its own images; diagnostic) | "
             f"{_f(s['drop_median_pp'])} pp | {_f(s['drop_max_pp'])} pp | {s['drop_n']} | – | |",
             *([f"| top-1 error in standard errors, `|err| / √(SE_MC² + SE_est²)` (diagnostic) | "
                f"{_f(s['top1_z_median'])} | {_f(s['top1_z_max'])} | {s['top1_z_n']} ({s['top1_z_beyond_2']} "
                "beyond 2) | – | |"] if s.get("top1_z_n") else []),
             "",
             *([f"The mean-field route gave fc SNR and top-1 on {s['meanfield_n']} configuration(s) (marked `mf` in "
                "the table): where the linearised fc SNR is below `cimstat.engine.network.TOP1_MIN_FC_SNR_DB`, a "
                "layer's isolated SNR below `TOP1_MIN_LAYER_SNR_DB` or the layers' error-to-signal ratios add up to "
                "more than `TOP1_MAX_LAYER_NSR_SUM`, the engine carries every activation of the probe images as a "
                "Gaussian through the network (`cimstat.engine.meanfield`); `route`, `route_note`, "
                "`fc_snr_db_linear` and `top1_linear` are in the CSV.", ""] if s.get("meanfield_n") else []),
             *([f"Top-1 declined on {s['top1_declined_n']} configuration(s): the engine returns no top-1 where "
                "the linearised propagation does not hold and the mean-field route cannot run (`top1_note` in the "
                "CSV says why). Counted as missed.", ""]
               if s.get("top1_declined_n") else []),
             "Monte Carlo standard errors (median / max over configurations): conv1 SNR "
             f"{_f(s['mc_conv1_snr_se_db'][0], 3)} / {_f(s['mc_conv1_snr_se_db'][1], 3)} dB, fc SNR "
             f"{_f(s['mc_fc_snr_se_db'][0], 3)} / {_f(s['mc_fc_snr_se_db'][1], 3)} dB (over chip instances), top-1 "
             f"{_f(s['mc_top1_se_pp'][0])} / {_f(s['mc_top1_se_pp'][1])} pp (image sampling and instance spread"
             + (f"; the estimate's own image-sampling error `top1_se` {_f(s['top1_se_pp'][0])} / "
                f"{_f(s['top1_se_pp'][1])} pp" if np.isfinite(s.get("top1_se_pp", (math.nan,))[0]) else "")
             + (f"; {s['top1_unpaired_n']} of them from results cached without per-image data, whose error bar "
                "is the unpaired one of their own images" if s.get("top1_unpaired_n") else "") + "). "
             "The SNR standard errors measure the chip-to-chip and noise spread only (0 for a configuration "
             "without random noise); the estimate is made on the probe images and the MC on other images, so "
             "both errors also contain the difference between the two image samples (the float top-1 of each "
             "sample is `top1_clean` and `mc_top1_clean` in the CSV). The top-1 drop row compares the predicted "
             "and the measured loss of accuracy, each against the float network on its own images, so the two "
             "samples' clean accuracies cancel: it isolates the engine's error from the image sampling.",
             f"Time per configuration (median / max): estimate {_f(1000 * s['est_seconds'][0], 1)} / "
             f"{_f(1000 * s['est_seconds'][1], 1)} ms, Monte Carlo {_f(s['mc_seconds'][0], 1)} / "
             f"{_f(s['mc_seconds'][1], 1)} s" + (f" ({s['mc_devices']})" if s.get("mc_devices") else "") + ".", ""]
    if s["layers"]:
        lines += ["## Isolated SNR error per layer (abs, dB, over configurations)", "",
                  "| layer | median | max |", "|---|---|---|"]
        lines += [f"| {name} | {_f(med)} | {_f(mx)} |" for name, (med, mx, _) in s["layers"].items()]
        lines.append("")
        if s["exact_layers"]:
            lines += [f"Exact (infinite SNR in both) in every configuration: {', '.join(s['exact_layers'])}.", ""]
    lines += ["## Every configuration", "",
              "SNR in dB, top-1 in %; `MC ± se` is the Monte Carlo mean and its standard error; `mf`: fc SNR "
              "and top-1 from the mean-field route.", "",
              "| # | configuration | conv1 est | conv1 MC ± se | err | fc est | fc MC | err | top-1 est | "
              "top-1 MC ± se | err pp | drop err pp |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    drop = top1_drop_error_pp(frame)
    for i, (_, row) in enumerate(frame.iterrows()):
        desc = row.get("label") or ""
        params = ", ".join(f"{p}={row[p]}" for p in parameters if p in row and str(row[p]) != "")
        desc = f"**{desc}** {params}" if desc else params

        def g(col: str, scale: float = 1.0) -> float:
            try:
                return float(row[col]) * scale
            except (KeyError, TypeError, ValueError):
                return math.nan

        if "error" in row and isinstance(row["error"], str) and row["error"]:
            lines.append(f"| {row['combo']} | {desc} | {row['error']} ||||||||||")
            continue
        lines.append(
            f"| {row['combo']} | {desc} | {_f(g('conv1_snr_db'))} | {_f(g('mc_conv1_snr_db'))} ± "
            f"{_f(g('mc_conv1_snr_se_db'), 3)} | {_f(g('err_conv1_db'))} | {_f(g('fc_snr_db'))} | "
            f"{_f(g('mc_fc_snr_db'))} | {_f(g('err_fc_db'))} | {_f(g('top1', 100))}"
            f"{' mf' if str(row.get('route', '')) == 'meanfield' else ''} | "
            f"{_f(g('mc_top1', 100))} ± {_f(g('mc_top1_se_pp'))} | {_f(g('err_top1_pp'))} | {_f(drop[i])} |")
    lines.append("")
    return "\n".join(lines)
