"""Fit what the default model ships: its whitenings and its copy score, on the "fit" photos.

Usage: python benchmarks/fit_default_model.py [--photos ../shared/photos] [--work DIR]
       [--originals 500] [--per-kind 60] [--resolutions 224,500] [--whitening FILE]
       [--write]

1. A copy set of the fit part of the photos (benchmarks/copy_sets.py: every kind of copy,
   including AugLy's DISC2021-style ones, of `originals` photos; the photos of the eval part
   never enter).
2. Per resolution, the floored PCA whitening (rank 512) of l2n(g) of the photos AND their
   copies: the copies teach it which directions vary between copies of one image (a
   screenshot's frame, a pasted photo's background) and should weigh less. Its cosine
   threshold at precision 0.99 on the fit pairs is kept for `dedup --score cosine`.
   With --whitening FILE those whitenings are kept instead (a refit is equal only up to
   floating-point rounding, which changes the whitening's identity and so every index's).
3. The collection indexed with that whitening, its candidate pairs verified as `dedup` does,
   and the copy score fitted on them (mgdedup.tuning.copy_score_fit), labels from the set;
   its default threshold: the lowest at which the groups `dedup` makes from out-of-fold
   scores reach precision 0.99.

With --write the whitenings go to mgdedup/assets/efficientnet-lite0-whitening.pt and the
copy scores to mgdedup/assets/efficientnet-lite0-copy-score.json; without it to --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from copy_sets import KINDS, build_copy_set, load_copy_set  # noqa: E402

from mgdedup.duplicates.copy_score import pair_features  # noqa: E402
from mgdedup.duplicates.copy_search import collect_evidence  # noqa: E402
from mgdedup.duplicates.grouping import keeper_order  # noqa: E402
from mgdedup.evaluation.cache import EmbeddingCache, Item  # noqa: E402
from mgdedup.evaluation.metrics import pair_metrics  # noqa: E402
from mgdedup.index.build import update_index  # noqa: E402
from mgdedup.index.faiss_index import ensure_index  # noqa: E402
from mgdedup.index.layout import IndexDir  # noqa: E402
from mgdedup.model import registry  # noqa: E402
from mgdedup.model.whitening import compact_floored, fit_whitening  # noqa: E402
from mgdedup.tuning.copy_score_fit import fit_copy_scorer  # noqa: E402

ASSETS = Path(registry.__file__).resolve().parents[1] / "assets"
FLOOR_RANK = 512


def gem_vectors(model, files: list[Path], resolution: int, cache: Path) -> np.ndarray:
    embedding_cache = EmbeddingCache(model, resolution, cache_root=cache)
    g, ok = embedding_cache.gem([Item.file(p) for p in files])
    if not ok.all():
        raise SystemExit(f"{int((~ok).sum())} images of the fit set could not be read")
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--work", type=Path, default=Path("bench-out/fit-default"))
    parser.add_argument("--originals", type=int, default=500)
    parser.add_argument("--per-kind", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--resolutions", default="224,500")
    parser.add_argument("--whitening", type=Path, default=None)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    resolutions = [int(r) for r in args.resolutions.split(",")]

    folder = (args.work / f"fit-{args.originals}x{args.per_kind}-s{args.seed}").resolve()
    copies = load_copy_set(folder) if (folder / "truth.json").is_file() else \
        build_copy_set(args.photos, folder, part="fit", originals=args.originals,
                       per_kind=args.per_kind, seed=args.seed)
    files = list(copies.photos) + [c for c, _, _ in copies.copies]
    family = copies.family()
    labels = np.array([family[str(p.resolve())] for p in files])
    print(f"fit set: {len(copies.photos)} photos, {len(copies.copies)} copies", file=sys.stderr)

    base = registry.build_default_model()
    table, report = {}, {}
    for resolution in resolutions if args.whitening is None else ():
        g = gem_vectors(base, files, resolution, args.work / "gem-cache")
        x = torch.nn.functional.normalize(torch.from_numpy(g), dim=1).numpy()
        p = base.p_for(resolution)
        whitening = fit_whitening(x, resolution, p, floor_rank=FLOOR_RANK)
        y = torch.nn.functional.normalize(whitening.apply(torch.from_numpy(x)), dim=1).numpy()
        cosine = pair_metrics(y, labels, 0.99)
        whitening.threshold = None if cosine.threshold is None else round(cosine.threshold, 4)
        data = compact_floored(whitening, FLOOR_RANK)
        data["mean"], data["basis"] = data["mean"].half(), data["basis"].half()
        table[resolution] = data
        report[resolution] = {"fit_images": len(files), "cosine_micro_ap": cosine.micro_ap,
                              "cosine_threshold_p99": whitening.threshold}
    if args.whitening is None:
        whitening_file = (ASSETS if args.write else args.work) / "efficientnet-lite0-whitening.pt"
        whitening_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(table, whitening_file)
    else:
        whitening_file = args.whitening
        report = {resolution: {"whitening": str(whitening_file)} for resolution in resolutions}

    model = registry.build_default_model(whitening_file)  # as it will ship
    scores = {}
    for resolution in resolutions:
        started = time.perf_counter()
        index_dir = folder / f".mgdedup-fit-{resolution}"
        update_index([folder], index_dir, model, registry.DEFAULT_MODEL, resolution)
        with IndexDir(index_dir).open_store() as store:
            index = ensure_index(index_dir, store)
            paths = [str(Path(p).resolve()) for p in store.absolute_paths()]
            order = keeper_order(pixels=store.read("width").astype(np.int64)
                                 * store.read("height"), sizes=store.read("size"),
                                 paths=paths)
            # kept in the fitting index's verified.npz: a refit verifies nothing again
            candidates, evidence = collect_evidence(store, index, paths,
                                                    cache=IndexDir(index_dir).verified)
            whitening_id = store.meta.whitening_id
        row_family = np.array([family[p] for p in paths])
        x = pair_features(candidates, evidence)
        y = (row_family[candidates.i] == row_family[candidates.j]).astype(float)
        scorer = fit_copy_scorer(
            x, y, row_family[candidates.i], pairs=(candidates.i, candidates.j),
            row_family=row_family, keeper_order=order,
            fitted_on=f"{len(paths)} images ({len(copies.copies)} copies of "
            f"{min(args.originals, len(copies.photos))} of its {len(copies.photos)} "
            f"photos, {len(KINDS)} kinds), {len(y)} candidate pairs, "
            f"{int(y.sum())} copies, s*={resolution}")
        scores[resolution] = {"whitening_id": whitening_id, "scorer": scorer.to_dict()}
        report[resolution].update({"candidate_pairs": len(y), "copy_pairs": int(y.sum()),
                                   "default_threshold": scorer.default_threshold,
                                   "seconds": round(time.perf_counter() - started)})
        print(json.dumps(report[resolution]), file=sys.stderr)
    score_file = (ASSETS if args.write else args.work) / "efficientnet-lite0-copy-score.json"
    score_file.write_text(json.dumps({str(k): v for k, v in scores.items()}) + "\n")
    print(json.dumps({"whitening": str(whitening_file), "copy_score": str(score_file),
                      "report": report}, indent=1))


if __name__ == "__main__":
    main()
