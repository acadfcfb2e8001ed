"""Fine-tuning only the top of the trunk (`mgdedup train --train-blocks K`).

On a small collection and a CPU, training every layer is slow (the backward pass goes down to
the first convolution) and lets the early, generic filters drift. Freezing the trunk's first
blocks keeps them as trained on ImageNet; autograd then stops at the first trainable block, so
a step costs little more than a forward pass below it. The classifier stays trainable.
"""

from __future__ import annotations

from torch import nn

from mgdedup.errors import MgdedupError


def freeze_early_blocks(trunk: nn.Module, trainable: int) -> int:
    """Freeze every block of `trunk.blocks()` but the last `trainable`; returns how many
    parameters were frozen. BatchNorm statistics are not touched here (see --freeze-bn)."""
    blocks = trunk.blocks()
    if not 1 <= trainable <= len(blocks):
        raise MgdedupError(f"--train-blocks {trainable}: this trunk has {len(blocks)} blocks "
                           f"(stem, residual blocks, head); give 1 to {len(blocks)}")
    frozen = 0
    for block in blocks[:len(blocks) - trainable]:
        for parameter in block.parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen += parameter.numel()
    return frozen
