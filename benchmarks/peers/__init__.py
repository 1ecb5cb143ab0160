"""PyTorch peers: the same meta-training step written the way each library's users write it.

Each peer is a class `Peer(workload, params, batch, dtype)` with `step()` (one meta-iteration: meta-gradient
and an Adam update) and `meta_grad()` (the mean meta-gradient as numpy arrays named like `params`).
`available()` lists the peers whose packages import, with the reason for each that does not.
"""

from __future__ import annotations

import importlib

PEERS = {
    "torchfunc": ("benchmarks.peers.torchfunc", "TorchFuncVmap"),
    "torchfunc-loop": ("benchmarks.peers.torchfunc", "TorchFuncLoop"),
    "higher": ("benchmarks.peers.higher_peer", "Higher"),
    "l2l": ("benchmarks.peers.l2l_peer", "L2L"),
}


def load(name: str):
    """The peer class `name`, or raise ImportError saying which package is missing."""
    if name not in PEERS:
        raise ValueError(f"peer {name!r}; expected one of {sorted(PEERS)}")
    module, cls = PEERS[name]
    return getattr(importlib.import_module(module), cls)


def available() -> tuple[dict[str, type], dict[str, str]]:
    """`(peers that import, {name: why not} for the others)`."""
    ok, missing = {}, {}
    for name in PEERS:
        try:
            ok[name] = load(name)
        except ImportError as e:
            missing[name] = str(e)
    return ok, missing
