"""benchmarks/copy_detection.py with the default model's p* at one resolution overridden.

Usage: python benchmarks/copy_detection_at_p.py --p P PHOTOS_DIR --resolution S [copy_detection
       options, e.g. --cache DIR --dim 512 --save-whitening FILE]

Used to refit the shipped whitening (and its threshold) at a tuned p* and to compare the copy
benchmark's micro-AP before/after (BENCHMARKS.md, "p* of the default model"); the p only
changes `registry.DEFAULT_P_STAR_TABLE` for this process, before the model is built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import copy_detection

from mgdedup.model import registry


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--p", type=float, required=True)
    parser.add_argument("--resolution", type=int, default=500)
    known, rest = parser.parse_known_args()
    registry.DEFAULT_P_STAR_TABLE[known.resolution] = known.p
    sys.argv = [sys.argv[0], *rest, "--resolution", str(known.resolution)]
    copy_detection.main()


if __name__ == "__main__":
    main()
