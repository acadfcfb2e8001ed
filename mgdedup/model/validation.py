"""Checks of every value a model file brings, before any of it is used or allocated.

A model file is untrusted input: `torch.load(weights_only=True)` keeps it from running code,
but not from carrying numbers that break everything downstream (a GeM exponent of 0 makes
every cosine 1.0, NaN makes every descriptor NaN) or tensors whose claimed size is not their
real one (a stride-0 view of one element claiming terabytes). Each check raises a one-line
MgdedupError naming the file and the field.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mgdedup.errors import MgdedupError

#: GeM exponents accepted (1: average pooling; the paper's grid stops at 10)
P_RANGE = (0.1, 100.0)
#: test resolutions accepted as keys of p* tables and whitenings (0: any resolution)
RESOLUTION_RANGE = (0, 16384)


def number(value: object, what: str, origin: str, low: float, high: float) -> float:
    """`value` as a finite float in [low, high]."""
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MgdedupError(f"{origin}: {what} is not a number ({value!r:.40})") from None
    if not math.isfinite(result) or not low <= result <= high:
        raise MgdedupError(f"{origin}: {what} = {result:g} is outside [{low:g}, {high:g}]")
    return result


def resolution(value: object, what: str, origin: str) -> int:
    low, high = RESOLUTION_RANGE
    result = number(value, what, origin, low, high)
    if result != int(result):
        raise MgdedupError(f"{origin}: {what} = {result:g} is not a whole number of pixels")
    return int(result)


def dense(tensor: object, what: str, origin: str, shape: tuple[int, ...] | None = None
          ) -> Tensor:
    """A real tensor: of `shape` when given, every element backed by its own storage (no
    stride-0 broadcast, no view past the end of its storage) and, if floating, finite."""
    if not isinstance(tensor, Tensor):
        raise MgdedupError(f"{origin}: {what} is not a tensor")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise MgdedupError(f"{origin}: {what} has shape {tuple(tensor.shape)}, expected "
                           f"{tuple(shape)}")
    if tensor.numel():
        if any(stride <= 0 for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
            raise MgdedupError(f"{origin}: {what} is not a dense tensor")
        last = tensor.storage_offset() + sum((size - 1) * stride for size, stride
                                             in zip(tensor.shape, tensor.stride()))
        if (last + 1) * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise MgdedupError(f"{origin}: {what} claims more elements than it stores")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MgdedupError(f"{origin}: {what} holds values that are not finite numbers")
    return tensor


def state_dict(state: object, expected: dict[str, Tensor], origin: str) -> dict[str, Tensor]:
    """A state dict with exactly the keys and shapes of `expected` (a freshly built network's),
    each tensor dense and finite."""
    if not isinstance(state, dict):
        raise MgdedupError(f"{origin}: the weights are not a dict of tensors")
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise MgdedupError(f"{origin}: the weights do not fit the network ({detail}; "
                           f"{len(missing)} missing, {len(extra)} unexpected)")
    for key, reference in expected.items():
        dense(state[key], f"weight {key}", origin, tuple(reference.shape))
    return state  # type: ignore[return-value]
