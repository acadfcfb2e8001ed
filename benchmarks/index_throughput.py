"""Images per second of `mgdedup index` on a folder of real photos, end to end.

Usage: python benchmarks/index_throughput.py FOLDER [--resolutions 224,500] [--workers N]

Each resolution indexes FOLDER from scratch into a temporary index (decode, embed, HDF5 write,
FAISS build), through the same code path as the CLI. Prints one JSON line per resolution.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mgdedup.index.build import update_index
from mgdedup.model.registry import DEFAULT_MODEL, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--resolutions", default="224,500")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model = load_model(DEFAULT_MODEL)
    for resolution in (int(r) for r in args.resolutions.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = update_index([args.folder], Path(tmp) / "idx", model, DEFAULT_MODEL,
                                   resolution, batch_size=args.batch_size, workers=args.workers)
            seconds = time.perf_counter() - start
        print(json.dumps({
            "resolution": resolution, "images": summary.embedded, "skipped": summary.skipped,
            "seconds": round(seconds, 2), "images_per_s": round(summary.embedded / seconds, 2),
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
        }))


if __name__ == "__main__":
    main()
