"""What the perceptual hash costs `index`: 12 MP JPEGs indexed with and without it, one run.

Usage: python benchmarks/index_hash_cost.py [--images 48] [--source ../shared/photos]
       [--resolution 500] [--repeats 3]

The images are those of benchmarks/embed_throughput.py (4000x3000 q90 JPEGs: upscaled real
photos with film grain). `update_index` runs as `mgdedup index` runs it (backend and workers
chosen the same way), alternately as shipped and with the hash replaced by a constant (the
index as it was before the hash: nothing else differs), `--repeats` times each, best kept;
also the hash alone on the draft-decoded images, per image. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_throughput import best_rate, index_once, make_images  # noqa: E402

import mgdedup.imaging.transforms as transforms  # noqa: E402
from mgdedup.imaging.perceptual_hash import UNKNOWN, phash  # noqa: E402
from mgdedup.imaging.reading import open_rgb  # noqa: E402
from mgdedup.model.registry import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--source", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--resolution", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = make_images(folder, args.images, args.source)
        decoded = [open_rgb(p, lambda size: transforms.decode_size_for(size, args.resolution))[0]
                   for p in paths]
        started = time.perf_counter()
        for image in decoded:
            phash(image)
        hash_ms = 1000 * (time.perf_counter() - started) / len(decoded)

        def with_hash() -> int:
            transforms.phash = phash
            return index_once(folder, model, args.resolution, 16, None, "auto")

        def without_hash() -> int:  # DataLoader workers fork after this: they see it too
            transforms.phash = lambda image: UNKNOWN
            return index_once(folder, model, args.resolution, 16, None, "auto")

        rates: dict[str, list] = {"with_hash": [], "without_hash": []}
        for _ in range(args.repeats):  # alternated: a load change hits both
            rates["without_hash"].append(best_rate(1, without_hash))
            rates["with_hash"].append(best_rate(1, with_hash))
        transforms.phash = phash
    best = {name: max(runs, key=lambda r: r.per_s) for name, runs in rates.items()}
    print(json.dumps({
        "images": args.images, "resolution": args.resolution,
        "hash_ms_per_decoded_image": round(hash_ms, 2),
        "decoded_size": list(decoded[0].size),
        "images_per_s": {k: round(v.per_s, 2) for k, v in best.items()},
        "cpu_ms_per_image": {k: round(v.cpu_ms, 1) for k, v in best.items()},
        "all_runs": {k: [round(r.per_s, 2) for r in v] for k, v in rates.items()},
        "ratio": round(best["with_hash"].per_s / best["without_hash"].per_s, 3)}))


if __name__ == "__main__":
    main()
