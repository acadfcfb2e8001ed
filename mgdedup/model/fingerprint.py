"""The identity of a trunk's weights: what an index, a cached ONNX graph and an evaluation
cache record, so rows or graphs of other weights are never mixed in."""

from __future__ import annotations

import hashlib

from torch import nn


def weights_fingerprint(trunk: nn.Module, name: str) -> str:
    """``<trunk name>-<blake2b-64 of every state-dict entry>``, from the weights as they are
    now (names and bytes in key order, the classifier included)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(name.encode())
    for key, value in sorted(trunk.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return f"{name}-{digest.hexdigest()}"
