"""Shared by the training tests: a tiny trunk and generated labelled / unlabelled folders.

Importable by name (pytest puts tests/ on sys.path) so that DDP worker processes started
with the spawn method can unpickle what they run.
"""

from __future__ import annotations

import colorsys
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from mgdedup.imaging.synthetic import random_scene
from mgdedup.model.multigrain import ModelInfo, MultiGrainModel
from mgdedup.model.trunks.base import Trunk


class TinyTrunk(Trunk):
    """Three strided convs with BatchNorm: a trunk small enough for 2 shared CPU cores."""

    feature_dim = 32

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def normalize(self, images: Tensor) -> Tensor:
        return images * 2.0 - 1.0

    def forward_features(self, images: Tensor) -> Tensor:
        return self.features(self.normalize(images))

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def blocks(self) -> list[nn.Module]:
        return [self.features[0:3], self.features[3:6], self.features[6:9]]


def tiny_model(seed: int = 0, num_classes: int = 10) -> MultiGrainModel:
    torch.manual_seed(seed)
    info = ModelInfo(name="tiny", trunk="tiny", training_p=3.0)
    return MultiGrainModel(TinyTrunk(num_classes), info)


def class_image(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Class = hue of the background and the kind of shape drawn on it; the rest is random."""
    hue = label / 10.0
    background = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.7, 0.8))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
        extent = int(rng.integers(8, size // 2))
        box = (x0, y0, x0 + extent, y0 + extent)
        (draw.ellipse if label % 2 else draw.rectangle)(box, fill=colour)
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def make_imagefolder(root: Path, classes: int = 10, per_class: int = 6, val_per_class: int = 2,
                     seed: int = 0, size: int = 64) -> Path:
    """ROOT/train/<class>/*.png and ROOT/val/<class>/*.png of class_image drawings."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                class_image(label, rng, size).save(folder / f"{i:03d}.png")
    return root


def make_unlabelled(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (96, 72)
                    ) -> list[Path]:
    """`count` generated scenes (mgdedup.imaging.synthetic) as JPEG files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"scene{i:04d}.jpg"
        random_scene(rng, size).save(path, quality=92)
        paths.append(path)
    return paths


def state_digest(module: nn.Module) -> str:
    """Hash of every parameter and buffer, for comparing processes bit for bit."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
