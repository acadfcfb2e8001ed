"""Seeds of the augmented copies that calibration makes, without numpy or Pillow: the command
line reads the limit for `calibrate --aug-copies` before any heavy import."""

from __future__ import annotations

#: augmented copies per image that get distinct seeds
MAX_AUG_COPIES = 64


def augmented_seed(seed: int, position: int, copy: int) -> int:
    """Seed of augmented copy `copy` (< MAX_AUG_COPIES) of the image at `position` of a set
    made with `seed`."""
    return seed * 1_000_003 + position * MAX_AUG_COPIES + copy
