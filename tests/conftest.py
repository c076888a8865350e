"""Shared session fixtures.

``default_probes``: a small probe set of the default model (256 probe images for ``stat.pkl``,
32 of them for ``noise_prop.pkl``, jacobian method), created once under
``<repo>/.cache/test-probes/default`` and reused while the weights, schema and settings are
unchanged (a file lock serialises concurrent test sessions). Returns a
:class:`cimstat.probes.ProbeSet`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TEST_PROBE_IMAGES = 256
TEST_NOISE_IMAGES = 32


def probe_cache_dir() -> Path:
    from cimstat.probes import repo_root

    return repo_root() / ".cache" / "test-probes" / "default"


@pytest.fixture(scope="session")
def default_probes_dir() -> Path:
    from cimstat.probes import ensure_default_probes

    return ensure_default_probes(probe_cache_dir(), n_stat_images=TEST_PROBE_IMAGES,
                                 n_noise_images=TEST_NOISE_IMAGES, progress=False)


@pytest.fixture(scope="session")
def default_probes(default_probes_dir):
    from cimstat.probes import load_probes

    return load_probes(default_probes_dir, require_noise_prop=True)


def kill_after_journal(proc, root: Path, pattern: str, min_lines: int, timeout_s: float) -> Path:
    """SIGKILL ``proc`` as soon as a journal matching ``root.glob(pattern)`` holds ``min_lines``
    lines; returns the journal (fails the test, with the process's stderr, when none appears)."""
    import signal
    import time

    journal = None
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        found = list(root.glob(pattern))
        if found and found[0].read_text().count("\n") >= min_lines:
            journal = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert journal is not None, proc.stderr.read().decode()[-3000:]
    return journal
