"""Trunks by name: the name stored in a model file rebuilds the right network."""

from __future__ import annotations

from mgdedup.errors import MgdedupError
from mgdedup.model.trunks.base import Trunk

TRUNK_NAMES = ("efficientnet_lite0", "resnet50")


def build_trunk(name: str) -> Trunk:
    """An untrained trunk of the named architecture (weights come from a state dict)."""
    if name == "efficientnet_lite0":
        from mgdedup.model.trunks.efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0()
    if name == "resnet50":
        from mgdedup.model.trunks.resnet import ResNet50Trunk

        return ResNet50Trunk()
    raise MgdedupError(f"unknown trunk '{name}' (known: {', '.join(TRUNK_NAMES)})")
