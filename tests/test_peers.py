"""Each installed PyTorch peer computes the same meta-gradient as ours, in float64 (benchmarks.compare
checks this again on the real shapes before timing). Skips when the bench extra is not installed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PyTorch peers need the bench extra: pip install -e '.[bench]'")

from benchmarks import peers  # noqa: E402
from benchmarks.compare import check_peer  # noqa: E402
from benchmarks.ours import build_model  # noqa: E402
from benchmarks.workloads import Workload  # noqa: E402

TINY = {
    "conv4-2nd": Workload("tiny-conv4-2nd", "conv4", 3, 1, 2, 2, 0.4, 2, image_size=16, filters=4),
    "conv4-1st": Workload("tiny-conv4-1st", "conv4", 3, 1, 2, 1, 0.4, 2, second_order=False, image_size=16, filters=4),
    # colour images and a 2x2 final map: the head's rows are permuted between NHWC and NCHW flattening
    "conv4-colour": Workload("tiny-conv4-colour", "conv4", 3, 1, 2, 2, 0.1, 2, image_size=32, filters=4, channels=3),
    "sinusoid": Workload("tiny-sinusoid", "mlp", 1, 10, 10, 1, 0.01, 2),
}


@pytest.mark.parametrize("workload", list(TINY))
@pytest.mark.parametrize("name", list(peers.PEERS))
def test_peer_meta_gradient_matches_ours(x64, name, workload):
    try:
        cls = peers.load(name)
    except ImportError as e:
        pytest.skip(f"peer {name} is not installed: {e}")
    w = TINY[workload]
    try:
        err = check_peer(w, cls, build_model(w), tol=1e-9)
    except NotImplementedError as e:
        pytest.skip(str(e))
    assert err < 1e-9


def test_unknown_peer_is_a_clear_error():
    with pytest.raises(ValueError, match="peer 'nope'"):
        peers.load("nope")
