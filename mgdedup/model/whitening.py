"""PCA whitening of descriptors and the classifier folded through it (docs/multigrain.md,
section 3).

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
from mgdedup.model import validation

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
    #: cosine threshold reaching precision 0.99 on copies (see mgdedup.imaging.edits), if measured
    threshold: float | None = None

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

    def fold(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """W on g -> (W', b') on y: W' = W S^+ (C, k), b' = W m (C,). The original bias b is
        not folded: it is added outside the ||g|| factor."""
        matrix = self.matrix.double()
        if matrix.shape[0] == matrix.shape[1]:
            inverse = torch.linalg.inv(matrix)
        else:
            inverse = torch.linalg.pinv(matrix)  # (D, k): the best linear reconstruction
        folded_weight = (weight.double() @ inverse).to(weight.dtype)
        folded_bias = (weight.double() @ self.mean.double()).to(weight.dtype)
        return folded_weight, folded_bias

    def to_dict(self) -> dict:
        data = {"mean": self.mean.float().cpu(), "matrix": self.matrix.float().cpu(),
                "resolution": int(self.resolution), "p": float(self.p)}
        if self.threshold is not None:
            data["threshold"] = float(self.threshold)
        return data

    @classmethod
    def from_dict(cls, data: object, dim: int | None = None,
                  origin: str = "model file") -> Whitening:
        """A whitening from its stored form, every field checked first (`dim`: the trunk's
        feature dimension D the whitening must apply to)."""
        if not isinstance(data, dict):
            raise MgdedupError(f"{origin} has a malformed whitening entry (not a dict)")
        where = f"{origin}, whitening"
        try:
            mean = validation.dense(data["mean"], "mean", where)
            d = int(mean.shape[0]) if mean.ndim == 1 else -1
            if mean.ndim != 1 or (dim is not None and d != dim):
                raise MgdedupError(f"{where}: mean has shape {tuple(mean.shape)}, expected "
                                   f"({dim if dim is not None else 'D'},)")
            if "matrix" in data:
                matrix = validation.dense(data["matrix"], "matrix", where)
                if matrix.ndim != 2 or matrix.shape[1] != d or not 1 <= matrix.shape[0] <= d:
                    raise MgdedupError(f"{where}: matrix has shape {tuple(matrix.shape)}, "
                                       f"expected (k <= {d}, {d})")
                matrix = matrix.float()
            else:
                matrix = _matrix_from_compact(data, d, where)
            threshold = data.get("threshold")
            return cls(mean=mean.float(), matrix=matrix,
                       resolution=validation.resolution(data["resolution"], "resolution", where),
                       p=validation.number(data["p"], "p", where, *validation.P_RANGE),
                       threshold=None if threshold is None else
                       validation.number(threshold, "threshold", where, -1.0, 1.0))
        except KeyError as error:
            raise MgdedupError(f"{origin} has a malformed whitening entry (no {error})") from None


def fit_whitening(x: np.ndarray, resolution: int, p: float, dim: int | None = None,
                  floor_rank: int | None = None) -> Whitening:
    """Fit PCA whitening on (N, D) L2-normalised vectors.

    dim: keep the top `dim` components (a k x D projection; classification from the stored
        descriptor is then approximate).
    floor_rank: keep every direction but raise the eigenvalues below the `floor_rank`-th to
        it ("floored" whitening): the map stays invertible, so the folded classifier is exact,
        and weak directions are not blown up by noise. On real photos it also retrieves
        better than truncation (BENCHMARKS.md).
    Neither: full whitening of the numerical rank (at most N - 1 components).
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise MgdedupError("whitening needs at least 2 images")
    mean, eigenvalues, eigenvectors, rank = _eigen(x)
    if floor_rank is not None:
        floor = eigenvalues[min(floor_rank, rank) - 1]
        scales = 1.0 / np.sqrt(np.maximum(eigenvalues, floor))  # (D,)
        matrix = (eigenvectors * scales) @ eigenvectors.T  # (D, D) symmetric, invertible
        return Whitening(mean=torch.from_numpy(mean).float(),
                         matrix=torch.from_numpy(matrix).float(),
                         resolution=int(resolution), p=float(p))
    keep = rank if dim is None else min(dim, rank)
    matrix = eigenvectors[:, :keep].T / np.sqrt(eigenvalues[:keep])[:, None]  # (k, D)
    return Whitening(mean=torch.from_numpy(mean).float(), matrix=torch.from_numpy(matrix).float(),
                     resolution=int(resolution), p=float(p))


def _eigen(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Mean, eigenvalues (descending), eigenvectors (columns) and numerical rank of the
    covariance, in float64."""
    data = x.astype(np.float64)
    mean = data.mean(axis=0)
    centred = data - mean
    covariance = centred.T @ centred / (data.shape[0] - 1)  # (D, D)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    rank = int((eigenvalues > max(eigenvalues[0], 0.0) * 1e-10 + 1e-12).sum())
    if rank < 1:
        raise MgdedupError("whitening failed: the images' descriptors have no variance")
    return mean, np.maximum(eigenvalues, 0.0), eigenvectors, rank


def compact_floored(whitening: Whitening, floor_rank: int) -> dict:
    """A floored whitening as its top eigenvectors, their scales and the floor scale: a
    third of the full D x D matrix, for shipping (`from_dict` rebuilds the matrix)."""
    matrix = whitening.matrix.double()
    scales, basis = torch.linalg.eigh((matrix + matrix.T) / 2)  # ascending: strongest first
    floor_scale = float(scales[-1])  # weak directions all share the largest scale
    keep = int((scales < floor_scale * (1 - 1e-4)).sum())
    keep = min(max(keep, 1), floor_rank)
    data = whitening.to_dict()
    del data["matrix"]
    data.update({"basis": basis[:, :keep].T.float().contiguous(),
                 "scales": scales[:keep].float(), "floor_scale": floor_scale})
    return data


def _matrix_from_compact(data: dict, dim: int, origin: str) -> Tensor:
    """M = f I + B^T diag(s - f) B, B the stored orthonormal rows (k, D)."""
    basis = validation.dense(data["basis"], "basis", origin)
    if basis.ndim != 2 or basis.shape[1] != dim or not 1 <= basis.shape[0] <= dim:
        raise MgdedupError(f"{origin}: basis has shape {tuple(basis.shape)}, expected "
                           f"(k <= {dim}, {dim})")
    scales = validation.dense(data["scales"], "scales", origin, (basis.shape[0],)).double()
    basis = basis.double()
    floor_scale = validation.number(data["floor_scale"], "floor_scale", origin, 1e-12, 1e12)
    eye = torch.eye(basis.shape[1], dtype=torch.float64)
    return (floor_scale * eye + basis.T @ torch.diag(scales - floor_scale) @ basis).float()
