"""The defaults of `mgdedup calibrate` (`mgdedup.duplicates.precision`), without numpy: the
command line shows them in its options before any heavy import."""

from __future__ import annotations

DEFAULT_SAMPLE = 200
DEFAULT_AUG_COPIES = 2
DEFAULT_NEIGHBOURS = 10
#: images whose neighbours estimate F(t) (all of them in smaller collections)
DEFAULT_PROBE_ROWS = 5000
DEFAULT_COPY_RATE = 0.1
DEFAULT_TARGETS = (0.9, 0.95, 0.99)
