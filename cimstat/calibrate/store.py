"""Calibrations on disk, keyed by everything they depend on.

One JSON file per calibration under ``<probe dir>/calibrations/``; its name is a hash of its
key and the file repeats the full key, which is compared field by field on every lookup, so a
calibration made for other probes, another model, other bits/slicing/encoding/rows/ADC mode
or thermal noise is never returned (a hash collision or a hand-edited file with a different
key is reported as :class:`~cimstat.errors.CalibrationError`). Writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from cimstat.errors import CalibrationError

__all__ = ["CalibrationStore", "key_digest"]

STORE_VERSION = 1


def _canonical(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: Mapping[str, Any]) -> str:
    """First 20 hex digits of SHA-256 over the canonical JSON of ``key``."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()[:20]


class CalibrationStore:
    """Get-or-compute access to stored calibrations; ``directory=None`` keeps them in memory only."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self._memory: dict[str, dict[str, Any]] = {}
        self.computed = 0
        """How many calibrations this store computed (not found) since it was made."""
        self.loaded = 0
        """How many calibrations this store found on disk."""

    def path(self, kind: str, key: Mapping[str, Any]) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{kind}-{key_digest({'kind': kind, **key})}.json"

    def lookup(self, kind: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored value for ``key``, or None when there is none. A file whose key differs raises."""
        full = {"kind": kind, **json.loads(_canonical(key))}
        digest = key_digest(full)
        if digest in self._memory:
            return self._memory[digest]
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CalibrationError(f"calibration file {path} is unreadable ({err}); delete it to recompute") from None
        if not isinstance(record, dict) or record.get("version") != STORE_VERSION or "value" not in record:
            raise CalibrationError(f"calibration file {path} has an unknown format (expected version "
                                   f"{STORE_VERSION}); delete it to recompute")
        if record.get("key") != full:
            stored = record.get("key") if isinstance(record.get("key"), dict) else {}
            diff = sorted(k for k in set(stored) | set(full) if stored.get(k) != full.get(k))
            raise CalibrationError(f"calibration file {path} was made for a different setting (fields {diff} "
                                   "differ); delete it to recompute")
        self._memory[digest] = record["value"]
        self.loaded += 1
        return record["value"]

    def save(self, kind: str, key: Mapping[str, Any], value: dict[str, Any]) -> None:
        full = {"kind": kind, **json.loads(_canonical(key))}
        self._memory[key_digest(full)] = value
        path = self.path(kind, key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": STORE_VERSION, "key": full, "value": value}, indent=1, default=float)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, kind: str, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The stored value for ``key``, computing and storing it when missing."""
        found = self.lookup(kind, key)
        if found is not None:
            return found
        value = compute()
        self.computed += 1
        self.save(kind, key, value)
        return value
