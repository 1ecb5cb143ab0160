"""Shared fixtures: float64 for gradient checks, the shared data folder, the repository root, a local http server;
for every test process, XLA's compilation cache and the release of each test file's compiled programs."""

from __future__ import annotations

import http.server
import os
import threading
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


@pytest.fixture
def http_dir(monkeypatch):
    """Serve a folder over http://127.0.0.1 (the download path, offline): yields `(served, base URL)`; set
    `served["dir"]` to the folder to serve."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served["dir"]), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """XLA's persistent compilation cache for this test process (one per xdist worker, in its temp dir):
    a test that runs an experiment several times (a run, then its resumption) compiles each program once.
    Subprocesses the tests start do not inherit it."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "xla-cache"))
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """After each test file, drop JAX's in-memory caches, so that the file's compiled programs are freed.

    JAX keeps every compiled program of a process, and XLA's CPU runtime maps memory for each of its kernels
    (about 1,400 mappings for a small 5-step second-order Conv4 step, 2,500 with Winograd): a test worker
    that ran most of the suite reached Linux's limit of 65,530 mappings per process (`vm.max_map_count`)
    and was killed inside the compiler. A separate run of each file would free them likewise."""
    yield
    jax.clear_caches()
