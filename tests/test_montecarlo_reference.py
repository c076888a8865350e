"""An obviously-correct, loop-by-loop numpy/Python implementation of the hardware contract
(the module docstring of cimstat/hardware.py), for tiny layers, noiseless. Used only by the
Monte Carlo tests to pin the simulator's semantics; it shares no code with cimstat.montecarlo.
"""
from __future__ import annotations

import numpy as np


def widths_of(total: int, spec) -> list[int]:
    if spec is None:
        return [total]
    if isinstance(spec, int):
        out = [spec] * (total // spec)
        if total % spec:
            out.append(total % spec)
        return out
    assert sum(spec) == total
    return list(spec)


def offsets_of(widths: list[int]) -> list[int]:
    return [sum(widths[:j]) for j in range(len(widths))]


def weight_codes(w: np.ndarray, bits: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    qmax = 2 ** (bits - 1) - 1
    steps = np.empty(w.shape[0])
    for c in range(w.shape[0]):
        m = np.abs(w[c]).max() if per_channel else np.abs(w).max()
        steps[c] = m / qmax if m > 0 else 1.0
    q = np.zeros(w.shape, dtype=np.int64)
    for c in range(w.shape[0]):
        for k in range(w.shape[1]):
            q[c, k] = int(min(max(np.round(w[c, k] / steps[c]), -qmax), qmax))
    return q, steps


def input_codes(x: np.ndarray, x_max: float, bits: int, signed: bool) -> tuple[np.ndarray, float]:
    if signed:
        hi = 2 ** (bits - 1) - 1
        lo = -hi
    else:
        lo, hi = 0, 2 ** bits - 1
    step = x_max / hi
    q = np.zeros(x.shape, dtype=np.int64)
    for idx in np.ndindex(x.shape):
        q[idx] = int(min(max(np.round(x[idx] / step), lo), hi))
    return q, step


def adc(p: float, bits: int | None, full_scale: float | None, signed: bool) -> float:
    if bits is None:
        return float(p)
    hi = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    lo = -hi if signed else 0
    step = full_scale / hi
    return step * min(max(np.round(p / step), lo), hi)


def integer_layer(x: np.ndarray, w: np.ndarray, cfg, signed: bool, x_max: float,
                  adc_table: np.ndarray | None) -> np.ndarray:
    """Digital result in code units ``(V, C)`` for input vectors ``x (V, K)`` and weights ``w (C, K)``."""
    bi, bw = cfg.input_bits, cfg.weight_bits
    differential = cfg.weight_encoding.value == "differential"
    difference = differential and cfg.adc_mode.value == "difference"
    qw, _ = weight_codes(w, bw, cfg.weight_scale.value == "per_channel")
    q, _ = input_codes(x, x_max, bi, signed)
    split = signed and cfg.signed_input_encoding.value == "split"
    in_mag = bi - 1 if split else bi
    in_w = widths_of(in_mag, cfg.input_slice_bits)
    in_o = offsets_of(in_w)
    w_mag = bw - 1 if differential else bw
    w_w = widths_of(w_mag, cfg.weight_slice_bits)
    w_o = offsets_of(w_w)
    V, K = x.shape
    C = w.shape[0]
    n = K if cfg.rows_per_array is None else min(cfg.rows_per_array, K)
    tiles = [list(range(t, min(t + n, K))) for t in range(0, K, n)]
    out = np.zeros((V, C))
    for v in range(V):
        if not signed:
            sources = [(1, [int(a) for a in q[v]])]
        elif split:
            sources = [(1, [max(int(a), 0) for a in q[v]]), (-1, [max(-int(a), 0) for a in q[v]])]
        else:
            sources = [(1, [int(a) + 2 ** (bi - 1) for a in q[v]])]
        for c in range(C):
            total = 0.0
            for sign, codes in sources:
                for i, (iw, io) in enumerate(zip(in_w, in_o)):
                    xs = [(a >> io) & (2 ** iw - 1) for a in codes]
                    pass_value = 0.0
                    for j, (ww, wo) in enumerate(zip(w_w, w_o)):
                        r = None if adc_table is None else float(adc_table[i][j])
                        for rows in tiles:
                            if differential:
                                gp = [(max(int(qw[c, k]), 0) >> wo) & (2 ** ww - 1) for k in rows]
                                gn = [(max(-int(qw[c, k]), 0) >> wo) & (2 ** ww - 1) for k in rows]
                                pp = sum(xs[k] * g for k, g in zip(rows, gp))
                                pn = sum(xs[k] * g for k, g in zip(rows, gn))
                                if difference:
                                    conv = adc(pp - pn, cfg.adc_bits, r, True)
                                else:
                                    conv = adc(pp, cfg.adc_bits, r, False) - adc(pn, cfg.adc_bits, r, False)
                            else:
                                g = [((int(qw[c, k]) + 2 ** (bw - 1)) >> wo) & (2 ** ww - 1) for k in rows]
                                conv = adc(sum(xs[k] * gk for k, gk in zip(rows, g)), cfg.adc_bits, r, False)
                            pass_value += 2 ** wo * conv
                    if not differential:
                        pass_value -= 2 ** (bw - 1) * sum(xs)
                    total += sign * 2 ** io * pass_value
            if signed and not split:
                total -= 2 ** (bi - 1) * int(qw[c].sum())
            out[v, c] = total
    return out


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, padding: int) -> np.ndarray:
    """``(N, C, H, W)`` -> ``(N·positions, C·kh·kw)`` patches, rows in (C, kh, kw) order, row-major positions."""
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    xp[:, :, padding:padding + h, padding:padding + w] = x
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    rows = []
    for i in range(n):
        for a in range(ho):
            for b in range(wo):
                patch = xp[i, :, a * stride:a * stride + kh, b * stride:b * stride + kw]
                rows.append(patch.reshape(-1))
    return np.array(rows)


# ---- the reference checks itself on cases that need no slicing knowledge -------------------
def test_reference_unsliced_ideal_is_the_integer_product():
    from cimstat.hardware import LayerConfig

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 6))
    w = rng.normal(size=(2, 6))
    for signed, enc in ((False, "split"), (True, "split"), (True, "offset")):
        cfg = LayerConfig(input_bits=5, weight_bits=4, signed_input_encoding=enc)
        xin = x if signed else np.abs(x)
        q, _ = input_codes(xin, 1.0, 5, signed)
        qw, _ = weight_codes(w, 4, False)
        assert np.array_equal(integer_layer(xin, w, cfg, signed, 1.0, None), q @ qw.T)


def test_reference_im2col_matches_a_direct_convolution():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 2, 4, 4))
    k = rng.normal(size=(3, 2, 3, 3))
    cols = im2col(x, 3, 3, stride=1, padding=1)
    y = cols @ k.reshape(3, -1).T  # (positions, C_out)
    direct = np.zeros((4, 4, 3))
    xp = np.pad(x[0], ((0, 0), (1, 1), (1, 1)))
    for a in range(4):
        for b in range(4):
            for c in range(3):
                direct[a, b, c] = np.sum(xp[:, a:a + 3, b:b + 3] * k[c])
    assert np.allclose(y, direct.reshape(16, 3))
