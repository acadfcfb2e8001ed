"""Thresholds that commands read without loading a model (no PyTorch import here)."""

#: duplicate threshold for descriptors without a measured one (plain l2n(g): precision 1.0 on
#: the real-photo copy benchmark, see BENCHMARKS.md); the copy score carries its own
DEFAULT_THRESHOLD = 0.9
