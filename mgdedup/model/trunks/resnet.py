"""ResNet-50 trunk, the network of the MultiGrain paper and of its published checkpoints.

Submodules keep torchvision's names at top level (`conv1, bn1, relu, maxpool, layer1..layer4,
fc`), so a plain torchvision `resnet50().state_dict()` loads with strict=True; the MultiGrain
layout (`features.*`, `classifier.*`) is renamed to this one by `mgdedup.model.foreign`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet50

from mgdedup.model.trunks.base import Trunk

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNet50Trunk(Trunk):
    """torchvision ResNet-50 without its average pooling: 2048 channels at stride 32."""

    feature_dim = 2048

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        net = resnet50(weights=None, num_classes=num_classes)  # never downloads anything
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        self.fc = net.fc
        # buffers, not parameters: not in the state dict, so torchvision dicts load strictly
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def normalize(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [0, 1]
        """ImageNet mean/std, as torchvision and the MultiGrain reference trained with."""
        return (images - self.mean) / self.std

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 2048, ~H/32, ~W/32), non-negative (after ReLU)."""
        x = self.relu(self.bn1(self.conv1(self.normalize(images))))  # (B, 64, H/2, W/2)
        x = self.maxpool(x)  # (B, 64, H/4, W/4)
        x = self.layer2(self.layer1(x))  # (B, 512, H/8, W/8)
        return self.layer4(self.layer3(x))  # (B, 2048, H/32, W/32)

    def forward(self, images: Tensor) -> Tensor:
        """Logits of the original network (average pooling), for checks against references."""
        return self.fc(self.forward_features(images).mean(dim=(-2, -1)))

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def blocks(self) -> list[nn.Module]:
        """Stem, then the 16 bottlenecks of layer1-4: 17 units."""
        return [nn.ModuleList([self.conv1, self.bn1]), *self.layer1, *self.layer2, *self.layer3,
                *self.layer4]
