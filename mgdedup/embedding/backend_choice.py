"""Which forward backend an Embedder made with backend="auto" uses: how the CLI's --backend
reaches the Embedder that `update_index` builds, without a global setting, and without
importing PyTorch to say so."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from mgdedup.errors import MgdedupError

BACKENDS = ("auto", "torch", "onnx")
_preferred_backend: ContextVar[str] = ContextVar("mgdedup_backend", default="auto")


@contextmanager
def preferred_backend(backend: str) -> Iterator[None]:
    """Within the block, Embedders made with backend="auto" use `backend` instead."""
    if backend not in BACKENDS:
        raise MgdedupError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    token = _preferred_backend.set(backend)
    try:
        yield
    finally:
        _preferred_backend.reset(token)


def current_backend() -> str:
    return _preferred_backend.get()
