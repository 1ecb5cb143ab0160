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

