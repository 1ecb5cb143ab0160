"""Shared fixtures: float64 for gradient checks, the shared data folder, the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def x64():
    """Run a test in float64 (finite-difference checks need it); restores the previous setting."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def shared_data() -> Path:
    """The folder named by MAML_SHARED_DATA (set by .ci/run); tests needing it skip when it is absent."""
    path = os.environ.get("MAML_SHARED_DATA")
    if not path or not Path(path).is_dir():
        pytest.skip(f"real data not available: set MAML_SHARED_DATA to ../shared/data (got {path!r})")
    return Path(path)


# The files with the longest runs (compiling Conv4 programs, real-data runs, killed and restarted jobs),
# longest first. pytest-xdist (`--dist loadfile --no-loadscope-reorder`, setup.cfg) hands whole files to
# whichever worker is free in collection order; collecting these first spreads them over the workers, and
# the many short files then fill the gaps. (xdist's default order, most tests first, put these files,
# which have few but long tests, last, and the three heaviest ran back to back on one worker.)
HEAVY_FIRST = ("test_curvature_experiment.py", "test_omniglot_experiment.py", "test_omniglot_algorithms.py",
               "test_faults.py", "test_logging.py", "test_sinusoid_experiment.py", "test_family.py",
               "test_omniglot_data.py", "test_parallel.py", "test_bad_inputs.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: file order kept otherwise
