"""What embedding a batch of files gives, whichever path computed it (PyTorch, ONNX Runtime
in workers, a Ray actor, or the light path without PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mgdedup.model.descriptors import Descriptors


@dataclass
class EmbeddedBatch:
    """Descriptors for the readable images of one batch, and the reasons for the others."""

    positions: list[int]  # into the input path list
    sizes: list[tuple[int, int]]
    digests: list[str]
    descriptors: Descriptors
    errors: list[tuple[int, str]]
    #: (B, C) raw GeM vectors when asked for (exact classification): a torch tensor from
    #: the PyTorch path, a numpy array from the light one
    gem: Any = None
    phashes: list[int] = field(default_factory=list)  # perceptual hash per readable image
