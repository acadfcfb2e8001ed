"""What the index stores per image, as plain arrays: shared by the PyTorch path and the one
that runs without it (`mgdedup.embedding.light`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Descriptors:
    """What the index stores per image: enough to search AND to classify without the image."""

    descriptors: np.ndarray  # (N, k) float32, L2-normalised
    gem_norm: np.ndarray  # (N,) float32, ||g||
    white_norm: np.ndarray  # (N,) float32, ||Phi(l2n(g))|| before the final l2n (1 if no whitening)
