"""What the model needs from a trunk, whatever network it is.

A trunk is a convolutional classification network cut before its global pooling. It owns its
input normalisation (so preprocessing never drifts from the weights) and exposes its original
linear classifier, which MultiGrain applies to the GeM vector instead of the average-pooled one.
"""

from __future__ import annotations

from torch import Tensor, nn


class Trunk(nn.Module):
    """Base class: subclasses define `feature_dim`, `normalize`, `forward_features`, `classifier`.

    Inputs are RGB float tensors in [0, 1], shape (B, 3, H, W), any H and W.
    """

    #: channels of the feature map (the GeM vector's dimension)
    feature_dim: int

    def normalize(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [0, 1]
        """Scale [0, 1] RGB the way the weights were trained."""
        raise NotImplementedError

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim, h, w) non-negative feature map."""
        raise NotImplementedError

    @property
    def classifier(self) -> nn.Linear:
        """The network's own linear layer, feature_dim -> num_classes."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The feature extractor as units in forward order (stem, residual blocks, head): what
        fine-tuning can freeze from the input side (`mgdedup train --train-blocks`)."""
        raise NotImplementedError
