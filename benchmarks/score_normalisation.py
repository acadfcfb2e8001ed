"""Does SSCD-style score normalisation raise micro-AP on an IN-aug-style set?

Usage: python benchmarks/score_normalisation.py PHOTOS_DIR [--resolution 224] [--families 150]
       [--copies 5] [--distractors 300] [--kind aug|edits] [--cache DIR]

Set: `--families` real photos (the copy_detection benchmark's held-out quarter, by a hash of
the path; tuxpaint/ and lxqt/ excluded: reserved), each with `--copies` copies made by the
"full" augmentation (`mgdedup.imaging.augment.augmented_copy` at s*, seeds fixed), plus
`--distractors` photos from the other quarters without copies. Every pair of the set is
scored; positives are pairs within a family (photo + its copies). The background of the
normalisation is the set itself, as `mgdedup dedup --score-norm` uses the collection.
Reported: micro-AP of raw cosine and of each normalisation variant (skip, k, beta).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from mgdedup.duplicates.score_norm import ScoreNorm, background_from_neighbours
from mgdedup.embedding.embedder import Embedder
from mgdedup.evaluation.metrics import micro_ap
from mgdedup.imaging.augment import augmented_copy
from mgdedup.imaging.edits import EDITS
from mgdedup.imaging.reading import ImageReadError, open_rgb
from mgdedup.imaging.scan import scan_images
from mgdedup.model.registry import DEFAULT_MODEL, load_model

RESERVED = ("tuxpaint", "lxqt")
VARIANTS = [ScoreNorm(skip, k, beta) for skip, k in ((0, 1), (0, 10), (2, 8), (5, 10), (10, 10))
            for beta in (0.5, 1.0)]


def build(photos: Path, resolution: int, families: int, copies: int, distractors: int,
          kind: str = "aug") -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of the set and the family of each row (-1-based unique ids for
    distractors, so they pair with nothing)."""
    files, _ = scan_images([photos])
    files = [f for f in files if not any(part in RESERVED for part in Path(f.rel).parts)]
    held_out = [int(hashlib.md5(f.rel.encode()).hexdigest(), 16) % 4 == 0 for f in files]
    family_paths = [f.path for f, h in zip(files, held_out) if h][:families]
    distractor_paths = [f.path for f, h in zip(files, held_out) if not h]
    rng = np.random.default_rng(0)
    distractor_paths = [distractor_paths[i] for i in
                        sorted(rng.choice(len(distractor_paths), distractors, replace=False))]
    embedder = Embedder(load_model(DEFAULT_MODEL), resolution, workers=1)
    with tempfile.TemporaryDirectory() as tmp:
        paths, family = [], []
        for number, path in enumerate(family_paths):
            try:
                image, _ = open_rgb(path, None)
            except ImageReadError:
                continue
            paths.append(path)
            family.append(number)
            if kind == "aug":
                made = [augmented_copy(image, resolution, seed=number * 100 + c)
                        for c in range(copies)]
            else:  # the planted edits, as calibration and the copy benchmark use them
                edit_rng = np.random.default_rng(number)
                made = [edit(image, edit_rng) for edit in EDITS.values()]
            for c, copy in enumerate(made):
                target = Path(tmp) / f"{number:05d}_{c}.png"
                copy.save(target)
                paths.append(target)
                family.append(number)
        paths += distractor_paths
        family += [-1 - i for i in range(len(distractor_paths))]
        x = np.zeros((len(paths), embedder.model.descriptor_dim(resolution)), np.float32)
        ok = np.zeros(len(paths), bool)
        for batch in embedder.embed_files(paths, digest=False):
            x[batch.positions] = batch.descriptors.descriptors
            ok[batch.positions] = True
    return x[ok], np.asarray(family)[ok]


def evaluate(x: np.ndarray, family: np.ndarray) -> dict:
    sim = x @ x.T
    upper = np.triu_indices(len(x), k=1)
    positive = family[upper[0]] == family[upper[1]]
    neighbours = sim.copy()
    np.fill_diagonal(neighbours, -np.inf)
    ranked = -np.sort(-neighbours, axis=1)[:, : len(x) - 1]
    report = {"images": len(x), "positive_pairs": int(positive.sum()),
              "pairs": len(positive), "raw": round(micro_ap(sim[upper], positive), 4)}
    for norm in VARIANTS:
        bg = background_from_neighbours(ranked, norm)
        scores = sim[upper] - norm.beta * (bg[upper[0]] + bg[upper[1]]) / 2
        report[f"skip{norm.skip}_k{norm.k}_beta{norm.beta:g}"] = \
            round(micro_ap(scores, positive), 4)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--families", type=int, default=150)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--distractors", type=int, default=300)
    parser.add_argument("--kind", choices=("aug", "edits"), default="aug",
                        help="copies by the full augmentation (IN-aug) or the 5 planted edits")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    name = (f"{'inaug' if args.kind == 'aug' else 'edits'}-{args.resolution}-{args.families}-"
            f"{args.copies}-{args.distractors}.npz")
    cache = args.cache / name if args.cache else None
    if cache is not None and cache.exists():
        data = np.load(cache)
        x, family = data["x"], data["family"]
    else:
        x, family = build(args.photos, args.resolution, args.families, args.copies,
                          args.distractors, args.kind)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, x=x, family=family)
    report = {"resolution": args.resolution, "kind": args.kind, **evaluate(x, family)}
    # families without distractors: the set's own density only
    members = family >= 0
    report["without_distractors"] = evaluate(x[members], family[members])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
