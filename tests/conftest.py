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
