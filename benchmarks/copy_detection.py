"""Copy detection on real photos: how well each descriptor variant separates edited copies.

Usage: python benchmarks/copy_detection.py PHOTOS_DIR [--resolution 500] [--cache DIR]
       [--save-whitening FILE --dim D]

Photos are split by a hash of their path: 75% fit the whitening (with --synthetic generated
scenes, so graphics are covered too), 25% are evaluated; a generated held-out set with planted
copies is evaluated as well. Each
evaluated photo gets the five planted edits of `mgdedup.imaging.edits` (crop, JPEG 30, 1/3
size, mirror, brightness); every pair of evaluated images is scored, positives being an
original with its copies and copies among themselves. Reported per variant (raw l2n(g),
centred, PCA whitening of several sizes): micro-AP over all pairs, the threshold reaching
precision 0.99 and the recall there, and the recall at the fixed threshold 0.9.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mgdedup.embedding.embedder import Embedder
from mgdedup.evaluation.metrics import pair_metrics, precision_recall_at
from mgdedup.imaging.edits import write_copies
from mgdedup.imaging.scan import scan_images
from mgdedup.imaging.synthetic import make_collection
from mgdedup.model.registry import DEFAULT_MODEL, load_model
from mgdedup.model.whitening import Whitening, compact_floored, fit_whitening

RESERVED = ("tuxpaint", "lxqt")  # wallpaper / Tux Paint material is reserved for evaluation


def gem_vectors(embedder: Embedder, paths: list[Path]) -> np.ndarray:
    out = np.zeros((len(paths), embedder.model.feature_dim), np.float32)
    ok = np.zeros(len(paths), bool)
    for batch in embedder.embed_files(paths, digest=False, keep_gem=True):
        if batch.gem is not None:
            out[batch.positions] = batch.gem.numpy()
            ok[batch.positions] = True
    return out[ok]


def metrics(x: np.ndarray, family: np.ndarray) -> dict:
    result = pair_metrics(x, family, 0.99)
    at_09 = pair_metrics_at(x, family, 0.9)
    return {"micro_ap": round(result.micro_ap, 4),
            "t_p99": None if result.threshold is None else round(result.threshold, 4),
            "recall_p99": round(result.recall_at_threshold, 4),
            "recall_t0.9": round(at_09[0], 4), "precision_t0.9": round(at_09[1], 4)}


def pair_metrics_at(x: np.ndarray, family: np.ndarray, threshold: float) -> tuple[float, float]:
    """(recall, precision) of all pairs at a fixed threshold."""
    upper = np.triu_indices(len(x), k=1)
    precision, recall = precision_recall_at((x @ x.T)[upper], family[upper[0]] == family[upper[1]],
                                            threshold)
    return recall, precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("--resolution", type=int, default=500)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--save-whitening", type=Path, default=None)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--eval-limit", type=int, default=160)
    parser.add_argument("--synthetic", type=int, default=400,
                        help="generated scenes added to the whitening's fitting set")
    args = parser.parse_args()

    files, _ = scan_images([args.photos])
    files = [f for f in files if not any(part in RESERVED for part in Path(f.rel).parts)]
    in_eval = [int(hashlib.md5(f.rel.encode()).hexdigest(), 16) % 4 == 0 for f in files]
    fit_paths = [f.path for f, e in zip(files, in_eval) if not e]
    eval_paths = [f.path for f, e in zip(files, in_eval) if e][: args.eval_limit]

    model = load_model(DEFAULT_MODEL)
    embedder = Embedder(model, args.resolution)
    cache = args.cache / f"gem-{args.resolution}-p{embedder.p:g}.npz" if args.cache else None
    if cache is not None and cache.exists():
        data = np.load(cache)
        g_fit, g_eval, family = data["fit"], data["eval"], data["family"]
    else:
        g_fit = gem_vectors(embedder, fit_paths)
        with tempfile.TemporaryDirectory() as tmp:
            copies, copy_family, _ = write_copies(eval_paths, Path(tmp),
                                                  resolution=args.resolution)
            g_eval = gem_vectors(embedder, eval_paths + copies)
        family = np.concatenate([np.arange(len(eval_paths)), copy_family])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, fit=g_fit, eval=g_eval, family=family)

    g_syn_fit, g_syn_eval, syn_family = synthetic_gem(embedder, args.synthetic, args.cache)
    x_fit = F.normalize(torch.from_numpy(np.concatenate([g_fit, g_syn_fit])), dim=1).numpy()
    x_syn = F.normalize(torch.from_numpy(g_syn_eval), dim=1)
    x_eval = F.normalize(torch.from_numpy(g_eval), dim=1)
    report = {"resolution": args.resolution, "p": embedder.p, "fit_images": len(x_fit),
              "eval_images": len(eval_paths), "eval_copies": int(len(family) - len(eval_paths))}
    variants: dict[str, np.ndarray] = {"raw": x_eval.numpy()}
    centred = x_eval - torch.from_numpy(x_fit.mean(axis=0))
    variants["centred"] = F.normalize(centred, dim=1).numpy()
    fitted: dict[int, Whitening] = {}
    for dim in (64, 128, 256, 512):
        if dim >= len(x_fit):
            continue
        fitted[dim] = fit_whitening(x_fit, args.resolution, embedder.p, dim=dim)
        variants[f"pcaw{dim}"] = F.normalize(fitted[dim].apply(x_eval), dim=1).numpy()
        floored = fit_whitening(x_fit, args.resolution, embedder.p, floor_rank=dim)
        fitted[-dim] = floored  # negative key: floored at rank dim, full D dimensions
        variants[f"floor{dim}"] = F.normalize(floored.apply(x_eval), dim=1).numpy()
    synthetic_variants = {"raw": x_syn.numpy(),
                          **{(f"pcaw{d}" if d > 0 else f"floor{-d}"):
                             F.normalize(w.apply(x_syn), dim=1).numpy()
                             for d, w in fitted.items()}}
    for name, x in variants.items():
        report[name] = metrics(x, family)
        if name in synthetic_variants:
            report[name]["synthetic"] = metrics(synthetic_variants[name], syn_family)
    print(json.dumps(report, indent=1))
    if args.save_whitening is not None:
        whitening = fitted[-args.dim]
        # the default threshold must hold precision 0.99 on photos AND on generated graphics
        chosen = report[f"floor{args.dim}"]
        whitening.threshold = round(max(chosen["t_p99"], chosen["synthetic"]["t_p99"]), 4)
        save_whitening_asset(whitening, args.dim, args.save_whitening)


def synthetic_gem(embedder: Embedder, count: int, cache: Path | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GeM vectors of `count` generated scenes (fitting) and of a held-out generated set with
    planted copies (evaluation: 60 scenes, 12 copies per edit), with its families."""
    path = cache / f"syn-{embedder.resolution}-p{embedder.p:g}-{count}.npz" if cache else None
    if path is not None and path.exists():
        data = np.load(path)
        return data["fit"], data["eval"], data["family"]
    with tempfile.TemporaryDirectory() as tmp:
        fit = make_collection(Path(tmp) / "fit", originals=count, copies_per_edit=0, seed=1234)
        held = make_collection(Path(tmp) / "eval", originals=60, copies_per_edit=12, seed=5)
        g_fit = gem_vectors(embedder, fit.originals)
        g_eval = gem_vectors(embedder, held.originals + [c for _, c, _ in held.copies])
    family = np.array(list(range(60)) + [held.originals.index(o) for o, _, _ in held.copies])
    if path is not None:
        np.savez(path, fit=g_fit, eval=g_eval, family=family)
    return g_fit, g_eval, family


def save_whitening_asset(whitening: Whitening, floor_rank: int, path: Path) -> None:
    """Add this resolution's floored whitening to a {resolution: whitening} file, compact and
    in float16 so the shipped file stays small (descriptors change by < 1e-3)."""
    table = torch.load(path, weights_only=True) if path.exists() else {}
    data = compact_floored(whitening, floor_rank)
    data["mean"], data["basis"] = data["mean"].half(), data["basis"].half()
    table[int(whitening.resolution)] = data
    torch.save(table, path)


if __name__ == "__main__":
    main()
