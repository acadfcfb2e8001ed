"""PCA whitening of descriptors and the classifier folded through it (MULTIGRAIN.md section 3).

Fitted on l2n(g) of unlabelled images at one (s*, p*): Phi(x) = S (x - m) has identity
covariance on the fitting set. The retrieval descriptor is l2n(Phi(l2n(g))). Folding: for the
classifier (W, b) on the raw GeM vector g,
    W g + b = ||g|| (W' y + b') + b,   y = Phi(l2n(g)),  W' = W S^+,  b' = W m,
exact when S has full rank, so classification needs only the stored descriptor and two norms.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mgdedup.errors import MgdedupError

#: whitening key meaning "fitted at an unknown resolution: apply at every resolution"
#: (converted published checkpoints do not record where they were whitened)
ANY_RESOLUTION = 0


@dataclass
class Whitening:
    """Phi(x) = matrix @ (x - mean); fitted at one test resolution and GeM exponent."""

    mean: Tensor  # (D,)
    matrix: Tensor  # (k, D)
    resolution: int
    p: float

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def identifier(self) -> str:
        """Short fingerprint, stored in the index so a mismatch is detected."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(self.mean.detach().cpu().numpy().astype(np.float32).tobytes())
        digest.update(self.matrix.detach().cpu().numpy().astype(np.float32).tobytes())
        return f"pcaw{self.dim}-{self.resolution}-{digest.hexdigest()}"

    def apply(self, x: Tensor) -> Tensor:
        """(N, D) normalised GeM vectors -> (N, k) whitened, not normalised."""
        mean = self.mean.to(x)
        matrix = self.matrix.to(x)
        return (x - mean) @ matrix.T

    def fold(self, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """(W, b) on g -> (W', b') on y: W' = W S^+ (C, k), b' = W m (C,)."""
        matrix = self.matrix.double()
        if matrix.shape[0] == matrix.shape[1]:
            inverse = torch.linalg.inv(matrix)
        else:
            inverse = torch.linalg.pinv(matrix)  # (D, k): the best linear reconstruction
        folded_weight = (weight.double() @ inverse).to(weight.dtype)
        folded_bias = (weight.double() @ self.mean.double()).to(weight.dtype)
        del bias  # the original bias is added outside the ||g|| factor
        return folded_weight, folded_bias

    def to_dict(self) -> dict:
        return {"mean": self.mean.float().cpu(), "matrix": self.matrix.float().cpu(),
                "resolution": int(self.resolution), "p": float(self.p)}

    @classmethod
    def from_dict(cls, data: dict) -> Whitening:
        try:
            return cls(mean=data["mean"].float(), matrix=data["matrix"].float(),
                       resolution=int(data["resolution"]), p=float(data["p"]))
        except (KeyError, AttributeError, TypeError) as error:
            raise MgdedupError(f"model file has a malformed whitening entry ({error})") from None


def fit_whitening(x: np.ndarray, resolution: int, p: float, dim: int | None = None,
                  eps: float = 1e-9) -> Whitening:
    """Fit PCA whitening on (N, D) L2-normalised vectors, keeping the top `dim` components.

    Eigen-decomposition of the covariance in float64; components with (near) zero variance
    cannot be whitened, so `dim` is capped at the numerical rank (at most N - 1).
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise MgdedupError("whitening needs at least 2 images")
    data = x.astype(np.float64)
    mean = data.mean(axis=0)
    centred = data - mean
    covariance = centred.T @ centred / (data.shape[0] - 1)  # (D, D)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    rank = int((eigenvalues > eigenvalues[0] * 1e-10 + eps).sum())
    keep = rank if dim is None else min(dim, rank)
    if keep < 1:
        raise MgdedupError("whitening failed: the images' descriptors have no variance")
    matrix = eigenvectors[:, :keep].T / np.sqrt(eigenvalues[:keep])[:, None]  # (k, D)
    return Whitening(mean=torch.from_numpy(mean).float(), matrix=torch.from_numpy(matrix).float(),
                     resolution=int(resolution), p=float(p))
