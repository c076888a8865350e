"""``--subset``: choosing which combinations of a sweep to validate."""
from __future__ import annotations

from typing import Any

import numpy as np

from cimstat.errors import SweepError

__all__ = ["subset_mask"]


def subset_mask(frame: Any, expr: str) -> np.ndarray:
    """Rows of ``frame`` selected by ``--subset``: a slice ``start:stop[:step]`` over the
    combination order, a comma list of combination numbers, or a pandas query expression
    over the columns (backquote names with dots or colons: ``\\`conv1.weight_bits\\` >= 8``)."""
    text = expr.strip()
    n = len(frame)
    if not text:
        raise SweepError("--subset is empty")
    if ":" in text and all(p.strip() == "" or p.strip().lstrip("-").isdigit() for p in text.split(":")):
        parts = [int(p) if p.strip() else None for p in text.split(":")]
        if len(parts) > 3:
            raise SweepError(f"--subset {expr!r}: a slice has at most start:stop:step")
        mask = np.zeros(n, dtype=bool)
        mask[slice(*parts)] = True
        return mask
    if all(p.strip().isdigit() for p in text.split(",")):
        wanted = {int(p) for p in text.split(",")}
        bad = sorted(w for w in wanted if w not in set(frame["combo"]))
        if bad:
            raise SweepError(f"--subset {expr!r}: no combination number(s) {bad}; the sweep has 0..{n - 1}")
        return frame["combo"].isin(wanted).to_numpy()
    try:
        selected = frame.query(text, engine="python")
    except Exception as err:  # noqa: BLE001 - a user expression: one line
        raise SweepError(f"--subset {expr!r} is not a valid expression over the columns "
                         f"{list(frame.columns)}: {type(err).__name__}: {err}") from None
    return frame.index.isin(selected.index)
