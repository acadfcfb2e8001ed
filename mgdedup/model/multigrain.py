"""The MultiGrain model: trunk -> GeM(p*) -> {classifier, whitened L2-normalised descriptor}.

One GeM vector g per image serves both tasks: the classifier is applied to g itself, and the
retrieval descriptor is l2n(Phi(l2n(g))) (Phi = PCA whitening, identity when absent).
"""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgdedup.model.descriptors import Descriptors  # noqa: F401 - re-exported
from mgdedup.model.fingerprint import weights_fingerprint
from mgdedup.model.pooling import GeM
from mgdedup.model.pooling import gem as gem_pool
from mgdedup.model.thresholds import DEFAULT_THRESHOLD
from mgdedup.model.trunks.base import Trunk
from mgdedup.model.whitening import ANY_RESOLUTION, Whitening

#: p* used at a resolution when the model carries no measured table (docs/multigrain.md, section 4)
DEFAULT_P_STAR = 3.0


@dataclass
class ModelInfo:
    """Metadata that makes a model file self-describing."""

    name: str
    trunk: str
    training_p: float
    p_star: dict[int, float] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    source: str = ""


class MultiGrainModel(nn.Module):
    """Trunk + GeM + the trunk's classifier, plus optional whitenings keyed by resolution."""

    def __init__(self, trunk: Trunk, info: ModelInfo,
                 whitenings: dict[int, Whitening] | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.info = info
        self.pool = GeM(p=info.training_p)
        self.whitenings: dict[int, Whitening] = dict(whitenings or {})
        self._fingerprint: str | None = None

    # --- configuration -------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return self.trunk.feature_dim

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def p_for(self, resolution: int) -> float:
        """p* for a test resolution: the measured table, linearly interpolated between its
        resolutions and clamped at its ends; DEFAULT_P_STAR when the model has no table."""
        table = sorted(self.info.p_star.items())
        if not table:
            return DEFAULT_P_STAR
        sizes = [size for size, _ in table]
        position = bisect.bisect_left(sizes, resolution)
        if position < len(sizes) and sizes[position] == resolution:
            return float(table[position][1])
        if position == 0:
            return float(table[0][1])
        if position == len(sizes):
            return float(table[-1][1])
        (s0, p0), (s1, p1) = table[position - 1], table[position]
        return float(p0 + (p1 - p0) * (resolution - s0) / (s1 - s0))

    def whitening_for(self, resolution: int) -> Whitening | None:
        """Whitening is specific to one (s*, p*): the one fitted at this resolution, else one
        fitted for any resolution, else the one fitted nearest to it (closest scale ratio),
        which whitens far better than none at all."""
        if int(resolution) in self.whitenings:
            return self.whitenings[int(resolution)]
        if ANY_RESOLUTION in self.whitenings:
            return self.whitenings[ANY_RESOLUTION]
        if not self.whitenings:
            return None
        nearest = min(self.whitenings, key=lambda size: abs(math.log(size / resolution)))
        return self.whitenings[nearest]

    def default_threshold(self, resolution: int) -> float:
        """The measured duplicate threshold of this resolution's descriptors."""
        whitening = self.whitening_for(resolution)
        if whitening is not None and whitening.threshold is not None:
            return whitening.threshold
        return DEFAULT_THRESHOLD

    def descriptor_dim(self, resolution: int) -> int:
        """Length of the stored descriptor at this resolution (whitening may reduce it)."""
        whitening = self.whitening_for(resolution)
        return whitening.dim if whitening is not None else self.feature_dim

    def fingerprint(self) -> str:
        """Identity of the weights (trunk + classifier), stored in every index built with them.
        Computed once per model: code that changes weights in place (training) calls
        `weights_fingerprint` itself."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.trunk, self.info.trunk)
        return self._fingerprint

    # --- forward passes ----------------------------------------------------------------
    def gem(self, images: Tensor, p: float) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C) raw GeM vectors at the test exponent p (the
        module's own `pool.p`, the training exponent, is left as it is)."""
        return gem_pool(self.trunk.forward_features(images), p, self.pool.eps)

    def logits(self, g: Tensor) -> Tensor:
        """(B, C) GeM vectors -> (B, num_classes): the classifier sees the unnormalised g."""
        return self.trunk.classifier(g)

    def describe(self, g: Tensor, resolution: int) -> Descriptors:
        """(B, C) GeM vectors -> stored descriptors for a given test resolution."""
        g = g.float()
        gem_norm = g.norm(dim=1)
        x = F.normalize(g, dim=1)
        whitening = self.whitening_for(resolution)
        if whitening is None:
            y = x
        else:
            y = whitening.apply(x)
        white_norm = y.norm(dim=1)
        return Descriptors(
            descriptors=F.normalize(y, dim=1).cpu().numpy().astype(np.float32),
            gem_norm=gem_norm.cpu().numpy().astype(np.float32),
            white_norm=(white_norm if whitening is not None else torch.ones_like(white_norm))
            .cpu().numpy().astype(np.float32),
        )

    def logits_from_descriptors(self, stored: Descriptors, resolution: int) -> Tensor:
        """Classify from what the index stores, without the image (folded classifier)."""
        classifier = self.trunk.classifier
        weight, bias = classifier.weight.detach().float(), classifier.bias.detach().float()
        y = torch.from_numpy(stored.descriptors) * torch.from_numpy(stored.white_norm)[:, None]
        whitening = self.whitening_for(resolution)
        if whitening is None:
            inner = y @ weight.T  # (N, classes): <w_c, l2n(g)>
        else:
            folded_weight, folded_bias = whitening.fold(weight)
            inner = y @ folded_weight.T + folded_bias
        return torch.from_numpy(stored.gem_norm)[:, None] * inner + bias


def for_inference(model: MultiGrainModel, device: str | torch.device = "cpu") -> MultiGrainModel:
    """`model` in eval mode on `device`: the model itself when it already is, else a copy.
    Models are shared (the registry caches them, a trainer keeps training its own), so code
    that only embeds never changes one's mode or device in place."""
    device = torch.device(device)
    current = next(model.parameters()).device
    same = current.type == device.type and (device.index is None
                                            or current.index == device.index)
    if same and not model.training:
        return model
    return copy.deepcopy(model).eval().to(device)
