"""Generalised-mean (GeM) pooling, the heart of the MultiGrain embedding.

e_c = (mean_{h,w} max(x_chw, eps)^p)^(1/p). p = 1 is average pooling, p -> inf max pooling.
The exponent is a 0-dim tensor so that it travels in the state dict, can be changed at test
time (p* depends on the test resolution) and can be learned during training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GEM_EPS = 1e-6


def gem(features: Tensor, p: Tensor | float, eps: float = GEM_EPS) -> Tensor:
    """(B, C, H, W) -> (B, C) generalised mean over the spatial positions."""
    p = torch.as_tensor(p, dtype=features.dtype, device=features.device)
    pooled = features.clamp(min=eps).pow(p).mean(dim=(-2, -1))  # (B, C)
    return pooled.pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with exponent `p`: a buffer when fixed, a parameter when learned."""

    def __init__(self, p: float = 3.0, learn_p: bool = False, eps: float = GEM_EPS) -> None:
        super().__init__()
        self.eps = eps
        p_tensor = torch.tensor(float(p))
        if learn_p:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)

    def set_p(self, p: float) -> None:
        """Change the test-time exponent p* in place (keeps parameter/buffer status)."""
        with torch.no_grad():
            self.p.fill_(float(p))

    def forward(self, features: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C)
        return gem(features, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4g}, eps={self.eps}"
