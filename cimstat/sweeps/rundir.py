"""Output folders of sweep runs: creation, the row journal, resuming, atomic files.

A run folder ``<out>/<sweep name>/<UTC timestamp>/`` holds

* ``INCOMPLETE`` — present from the moment the folder exists (the folder is assembled
  under a hidden name and renamed into place) until every combination is done and the
  final files are written; a folder without it is complete;
* ``run.json`` — what the run is: kind (``summary`` or ``validation``), sweep file and its
  sha256, the options (images, instances, probes, ...), and every combination's key;
* ``<kind>.jsonl`` — the journal: one JSON line per finished combination, appended with a
  single ``write`` on an ``O_APPEND`` descriptor as soon as it finishes. A process killed
  mid-write can leave at most one truncated last line, which :meth:`RunDir.read_journal`
  drops (and cuts off) on resume, so that combination is simply run again;
* ``<kind>.csv`` and PNG plots — written at the end (and the CSV refreshed during the run),
  each atomically (temporary file, then rename);
* ``.lock`` — an ``flock`` held by the process running it, so two processes never
  resume the same folder at once (the kernel drops it when the process dies).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from cimstat.errors import SweepError

__all__ = ["RunDir", "atomic_write", "atomic_write_bytes", "MARKER", "MANIFEST"]

MARKER = "INCOMPLETE"
MANIFEST = "run.json"
LOCK = ".lock"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` (e.g. a savefig or to_csv) and rename the result onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


class RunDir:
    """One run folder of one kind (``summary`` for estimates, ``validation`` for estimate + MC)."""

    def __init__(self, path: Path, kind: str):
        self.path = Path(path)
        self.kind = kind
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None

    # ------------------------------------------------------------------ paths
    @property
    def journal_path(self) -> Path:
        return self.path / f"{self.kind}.jsonl"

    @property
    def csv_path(self) -> Path:
        return self.path / f"{self.kind}.csv"

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    @property
    def complete(self) -> bool:
        return not self.marker_path.exists()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SweepError(f"run folder {self.path}: cannot read {MANIFEST} ({err})") from None

    # ------------------------------------------------------------------ creation / lookup
    @classmethod
    def create(cls, sweep_dir: Path, kind: str, manifest: Mapping[str, Any]) -> "RunDir":
        """A new run folder under ``sweep_dir``, born with its ``INCOMPLETE`` marker and manifest."""
        sweep_dir = Path(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        stamp = _utc_stamp()
        tmp = sweep_dir / f".{stamp}.creating-{os.getpid()}"
        tmp.mkdir()
        (tmp / MARKER).write_text(f"this {kind} run is not finished; resume it with --resume {sweep_dir / stamp}\n")
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "kind": kind, "created": stamp}, indent=1,
                                               default=str))
        for attempt in range(1000):
            final = sweep_dir / (stamp if attempt == 0 else f"{stamp}-{attempt + 1}")
            if final.exists():
                continue
            try:
                os.rename(tmp, final)
            except OSError:
                continue
            if attempt:
                (final / MARKER).write_text(f"this {kind} run is not finished; resume it with --resume {final}\n")
            return cls(final, kind)
        raise SweepError(f"cannot create a run folder under {sweep_dir}")  # pragma: no cover

    @classmethod
    def latest_incomplete(cls, sweep_dir: Path, kind: str) -> "RunDir | None":
        """The newest unfinished run of ``kind`` under ``sweep_dir`` (None if there is none)."""
        sweep_dir = Path(sweep_dir)
        if not sweep_dir.is_dir():
            return None
        candidates = []
        for path in sweep_dir.iterdir():
            if path.name.startswith(".") or not path.is_dir() or not (path / MARKER).exists():
                continue
            try:
                manifest = json.loads((path / MANIFEST).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if manifest.get("kind") == kind:
                candidates.append((path.stat().st_mtime, path.name, path))
        if not candidates:
            return None
        return cls(max(candidates)[2], kind)

    @classmethod
    def open_existing(cls, path: Path, kind: str) -> "RunDir":
        """An existing unfinished run folder given by the user for ``--resume``."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise SweepError(f"--resume {path}: not a sweep run folder (no {MANIFEST})")
        run = cls(path, kind)
        found = run.manifest().get("kind")
        if found != kind:
            raise SweepError(f"--resume {path}: that folder holds a {found!r} run, not a {kind!r} run")
        if run.complete:
            raise SweepError(f"--resume {path}: that run is already complete (no {MARKER} marker)")
        return run

    # ------------------------------------------------------------------ locking
    def lock(self) -> None:
        """Take the folder's lock; :class:`SweepError` if another live process holds it."""
        fd = os.open(self.path / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SweepError(f"run folder {self.path} is being run by another process; wait for it or stop it") \
                from None
        self._lock_fd = fd

    def close(self) -> None:
        for name in ("_journal_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    # ------------------------------------------------------------------ journal
    def read_journal(self, repair: bool = True) -> dict[int, dict[str, Any]]:
        """Finished rows by combination index. A truncated last line (a write cut short by a
        kill) is dropped and, with ``repair``, cut off the file."""
        path = self.journal_path
        if not path.exists():
            return {}
        data = path.read_bytes()
        rows: dict[int, dict[str, Any]] = {}
        good_end = 0
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break  # last line without newline: cut short
            line = data[pos:end]
            try:
                entry = json.loads(line)
                index = int(entry["combo"])
                row = entry["row"]
            except (ValueError, KeyError, TypeError):
                if data.find(b"\n", end + 1) >= 0:
                    raise SweepError(f"journal {path} is corrupt at byte {pos} (not the last line); "
                                     "it was not written by cimstat") from None
                break
            rows.setdefault(index, row)  # a repeated index keeps the first row
            pos = end + 1
            good_end = pos
        if repair and good_end < len(data):
            with open(path, "r+b") as fh:
                fh.truncate(good_end)
        return rows

    def append(self, index: int, key: str, row: Mapping[str, Any]) -> None:
        """Append one finished combination to the journal with one ``write`` call."""
        if self._journal_fd is None:
            self._journal_fd = os.open(self.journal_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        line = (json.dumps({"combo": index, "key": key, "row": dict(row)}, default=_json_default) + "\n").encode()
        written = os.write(self._journal_fd, line)
        while written < len(line):  # pragma: no cover - regular files write fully unless the disk is full
            written += os.write(self._journal_fd, line[written:])

    def keys_in_journal(self) -> dict[int, str]:
        """Combination index -> key as journaled (to check a resumed sweep is the same sweep)."""
        out: dict[int, str] = {}
        if not self.journal_path.exists():
            return out
        for line in self.journal_path.read_bytes().splitlines():
            try:
                entry = json.loads(line)
                out.setdefault(int(entry["combo"]), entry["key"])
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def mark_complete(self) -> None:
        """Remove temporary files a killed earlier attempt may have left, then the ``INCOMPLETE``
        marker (call after every final file is in place)."""
        for leftover in list(self.path.glob(".tmp-*")) + list(self.path.glob(".*.tmp-*")):
            leftover.unlink(missing_ok=True)
        if self.marker_path.exists():
            self.marker_path.unlink()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
