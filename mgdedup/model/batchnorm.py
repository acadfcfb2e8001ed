"""BatchNorm folded into the convolution before it: one formula for inference (the trunks and
the ONNX graph writer) and for fine-tuning with frozen statistics.

In eval mode ``bn(conv(x)) = conv'(x)`` with, per output channel c,
``s_c = gamma_c / sqrt(var_c + eps)``, ``W'_c = s_c W_c`` and
``b'_c = beta_c - mean_c s_c (+ s_c b_c when the conv has a bias)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def folded_conv(weight: Tensor, bn: nn.BatchNorm2d, bias: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """(W', b') of the conv (weight (Cout, Cin/groups, kh, kw), optional bias) followed by
    `bn` with its running statistics. Differentiable; the weight keeps its memory format."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (Cout,)
    folded_weight = weight * scale.view(-1, *([1] * (weight.ndim - 1)))
    folded_bias = bn.bias - bn.running_mean * scale
    if bias is not None:
        folded_bias = folded_bias + bias * scale
    return folded_weight, folded_bias


def fold_batchnorm(trunk: nn.Module) -> int:
    """Move each BatchNorm's scale into the convolution before it, in place (same function in
    eval mode): what fine-tuning with frozen statistics trains.

    With BatchNorm in eval mode, a conv weight W acts as W * gamma / sqrt(var + eps); in the
    pretrained EfficientNet-Lite0 that factor reaches 75, so SGD steps on W are up to ~5000x
    too large for those channels and fine-tuning collapses within a few iterations. After
    folding, the conv holds W' and the BN is x + b' (weight 1, mean 0, var 1 - eps): the
    network computes the same outputs and keeps its state-dict layout, but SGD sees
    well-conditioned weights. Pairs are (conv, BN) in registration order, the BN right after
    a conv with as many output channels. Returns the number of pairs folded.
    """
    folded = 0
    previous: nn.Module | None = None
    with torch.no_grad():
        for module in trunk.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                conv = previous
                previous = None
                if not isinstance(conv, nn.Conv2d) or conv.out_channels != module.num_features \
                        or module.running_var is None or not module.affine:
                    continue
                weight, bias = folded_conv(conv.weight, module, conv.bias)
                conv.weight.copy_(weight)
                if conv.bias is not None:
                    conv.bias.zero_()
                module.weight.fill_(1.0)
                module.bias.copy_(bias)
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
                folded += 1
            elif isinstance(module, nn.Conv2d):
                previous = module
    return folded
