"""The decisions `mgdedup dedup` makes, on a collection that looks like users' ones.

Usage: python benchmarks/copy_decisions.py [--photos ../shared/photos] [--work DIR]
       [--originals 150] [--per-kind 20] [--resolution 500] [--model M]
       [--before-whitening OLD.pt] [--threshold T ...] [--sheet groups.png]
       [--json results.json]
       [--part all --photos /usr/share/backgrounds --name wallpapers
        --backgrounds-from ../shared/photos --same REGEX ...]

The collection (benchmarks/copy_sets.py): every photo of the held-out "eval" part of the
photos (look-alike shots of the same food or scene included: two different photos of mangoes
must stay apart), and `per-kind` copies of each of 18 kinds (13 DISC2021-style kinds made with
AugLy, 5 mild planted edits) of `originals` of them. The collection is indexed with the model
as `mgdedup index` does, and grouped by `find_duplicates` exactly as `mgdedup dedup` groups it,
at the default threshold and at each --threshold. With --before-whitening (the whitening
file of an earlier release, e.g. `git show v0.1:mgdedup/assets/...`), the same trunk with
those whitenings is measured in the same run, as that release decided (cosine scores, star
groups, its measured threshold), and the new whitening with cosine scores alone: the rows
before and after, and what the whitening and the copy score each bring. Reported:

- decisions: pair precision (keeper-member pairs whose two files share an original), copy
  recall per kind (a copy counts as found when it is in its original's group), overall
  recall, the false pairs (between two real photos: look-alikes; or involving a copy);
- ranking (independent of any threshold): mAP of each copy querying the collection for its
  original (1 / rank), micro-AP of all pairs by raw cosine;
- a contact sheet PNG of the groups that hold a false pair, then of some correct groups, to
  look at before believing a number;
- the seconds each decision took and the pairs it verified (the first copy-score run
  verifies every candidate pair; later ones reuse `IDX/verified.npz`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from copy_sets import (  # noqa: E402
    KINDS,
    CopySet,
    copy_set_folder,
    index_folder,
    load_or_build,
)

from mgdedup.duplicates.find import DedupResult, find_duplicates  # noqa: E402
from mgdedup.evaluation.metrics import micro_ap  # noqa: E402
from mgdedup.imaging.reading import open_rgb  # noqa: E402
from mgdedup.index.build import update_index  # noqa: E402
from mgdedup.index.layout import IndexDir  # noqa: E402
from mgdedup.model.registry import (  # noqa: E402
    DEFAULT_MODEL,
    build_default_model,
    canonical_spec,
    load_model,
)


def evaluate(result: DedupResult, copies: CopySet) -> dict:
    """Pair precision, recall per kind and the false pairs of one dedup result."""
    family, kind_of = copies.family(), copies.kind_of()
    photos = {str(p.resolve()) for p in copies.photos}
    group_of: dict[str, int] = {}
    flagged, false_pairs = 0, []
    for number, group in enumerate(result.groups):
        keeper = result.facts[group.keeper].path
        group_of[keeper] = number
        for row, score in group.members:
            member = result.facts[row].path
            group_of[member] = number
            flagged += 1
            if family[member] != family[keeper]:
                kind = "look-alike" if keeper in photos and member in photos else "copy"
                false_pairs.append({"keeper": keeper, "member": member,
                                    "score": round(score, 4), "kind": kind,
                                    "member_kind": kind_of.get(member, "photo"),
                                    "keeper_kind": kind_of.get(keeper, "photo")})
    found: dict[str, list[bool]] = defaultdict(list)
    for copy, original, kind in copies.copies:
        c, o = str(copy.resolve()), str(original.resolve())
        found[kind].append(c in group_of and group_of.get(o) == group_of[c])
    per_kind = {kind: round(float(np.mean(v)), 3) for kind, v in sorted(found.items())}
    total = [x for v in found.values() for x in v]
    return {"threshold": result.threshold, "groups": len(result.groups), "pairs": flagged,
            "precision": round(1 - len(false_pairs) / flagged, 4) if flagged else 1.0,
            "recall": round(float(np.mean(total)), 4), "recall_per_kind": per_kind,
            "min_kind_recall": min(per_kind.values()),
            "false_pairs": len(false_pairs),
            "look_alike_false_pairs": sum(p["kind"] == "look-alike" for p in false_pairs),
            "false_pair_list": sorted(false_pairs, key=lambda p: -p["score"])}


def ranking(index_dir: Path, copies: CopySet) -> dict:
    """`ranking_of` the descriptors of an index."""
    with IndexDir(index_dir).open_store() as store:
        x = store.embeddings()
        paths = [str(Path(p).resolve()) for p in store.absolute_paths()]
    return ranking_of(x, paths, copies)


def ranking_of(x: np.ndarray, paths: list[str], copies: CopySet) -> dict:
    """mAP of copies retrieving their original (the mean of 1 / its rank among all other
    images; ties count against it), micro-AP of all pairs by raw cosine."""
    row = {p: i for i, p in enumerate(paths)}
    family = copies.family()
    labels = np.array([family[p] for p in paths])
    similarity = x @ x.T
    reciprocal = []
    for copy, original, _ in copies.copies:
        q, o = row[str(copy.resolve())], row[str(original.resolve())]
        scores = similarity[q].copy()
        scores[q] = -np.inf
        others = np.delete(scores, [q, o])
        reciprocal.append(1.0 / (1 + int((others >= scores[o]).sum())))
    upper = np.triu_indices(len(x), k=1)
    return {"map": round(float(np.mean(reciprocal)), 4),
            "micro_ap": round(micro_ap(similarity[upper], labels[upper[0]] == labels[upper[1]]),
                              4)}


def contact_sheet(result: DedupResult, copies: CopySet, path: Path, max_groups: int = 24,
                  thumb: int = 112) -> None:
    """Groups as rows of thumbnails (keeper first, red frame: a member of another family)."""
    family = copies.family()
    rows = []
    for group in result.groups:
        keeper = result.facts[group.keeper].path
        wrong = [family[result.facts[r].path] != family[keeper] for r, _ in group.members]
        rows.append((any(wrong), group, wrong))
    rows.sort(key=lambda r: not r[0])  # groups with a false pair first
    rows = rows[:max_groups]
    width = max([2 + len(g.members) for _, g, _ in rows] + [2])
    sheet = Image.new("RGB", (width * (thumb + 6), max(1, len(rows)) * (thumb + 22)), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (_, group, wrong) in enumerate(rows):
        entries = [(group.keeper, None, False)] + [(r, s, w) for (r, s), w in
                                                   zip(group.members, wrong)]
        for x, (row, score, bad) in enumerate(entries[:width]):
            try:
                image, _ = open_rgb(result.facts[row].path, (thumb, thumb))
                image.thumbnail((thumb, thumb))
            except Exception:  # noqa: BLE001 - a sheet never dies on one file
                image = Image.new("RGB", (thumb, thumb), "grey")
            left, top = x * (thumb + 6) + 3, y * (thumb + 22) + 3
            sheet.paste(image, (left, top))
            colour = "red" if bad else ("green" if score is None else "black")
            draw.rectangle((left - 2, top - 2, left + image.width + 1, top + image.height + 1),
                           outline=colour, width=2)
            label = "keep" if score is None else f"{score:.3f}"
            draw.text((left, top + thumb + 2), label, fill=colour)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--work", type=Path, default=Path("bench-out/copy-decisions"))
    parser.add_argument("--part", default="eval", choices=("eval", "fit", "all"))
    parser.add_argument("--backgrounds-from", type=Path, default=None)
    parser.add_argument("--same", action="append", default=[],
                        help="photos whose relative paths match this regular expression "
                        "identically are one image (repeatable)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--originals", type=int, default=150)
    parser.add_argument("--per-kind", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=500)
    parser.add_argument("--model", default=None)
    parser.add_argument("--before-whitening", type=Path, default=None)
    parser.add_argument("--threshold", type=float, action="append", default=None)
    parser.add_argument("--sheet", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    folder = copy_set_folder(args.work, args.name or args.part, args.originals, args.per_kind,
                             args.seed)
    copies = load_or_build(args.photos, folder, part=args.part, originals=args.originals,
                           per_kind=args.per_kind, seed=args.seed,
                           backgrounds_from=args.backgrounds_from, same=tuple(args.same))
    spec = canonical_spec(args.model)
    indexes = [("", load_model(spec))]
    if args.before_whitening is not None:
        if spec != DEFAULT_MODEL:
            raise SystemExit("--before-whitening compares whitenings of the default model")
        indexes.insert(0, ("before-", build_default_model(args.before_whitening)))
    report = {"model": spec, "resolution": args.resolution, "photos": len(copies.photos),
              "copies": len(copies.copies), "kinds": list(KINDS), "ranking": {},
              "decisions": []}
    thresholds = [None, *(args.threshold or [0.9])]
    for prefix, model in indexes:
        index_dir = index_folder(folder, spec, args.resolution, prefix)
        started = time.perf_counter()
        summary = update_index([folder], index_dir, model, spec, args.resolution,
                               workers=args.workers)
        print(f"indexed {summary.total} images ({summary.embedded} new) in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        report["ranking"][prefix.rstrip("-") or "default"] = ranking(index_dir, copies)
        variants = [("before", "cosine")] if prefix else \
            ([("whitening, cosine", "cosine")] if args.before_whitening else []) + \
            [("default", None)]
        IndexDir(index_dir).verified.unlink(missing_ok=True)  # the first run verifies all
        for name, scoring in variants:
            for threshold in thresholds:
                started = time.perf_counter()
                verified: list[int] = []
                result = find_duplicates(index_dir, threshold, scoring=scoring,
                                         workers=args.workers, on_verify=verified.append)
                scores = {"variant": name, "score": result.score_kind,
                          "seconds": round(time.perf_counter() - started, 1),
                          "pairs_verified": sum(verified),
                          **evaluate(result, copies),
                          "threshold_source": result.threshold_source}
                report["decisions"].append(scores)
                print(f"{name} @ {result.threshold:g}: P {scores['precision']} "
                      f"R {scores['recall']} min kind {scores['min_kind_recall']}",
                      file=sys.stderr)
                if args.sheet is not None:
                    label = "default" if threshold is None else f"t{threshold:g}"
                    args.sheet.parent.mkdir(parents=True, exist_ok=True)
                    variant = name.split(",")[0].replace(" ", "-")
                    contact_sheet(result, copies, args.sheet.with_name(
                        f"{args.sheet.stem}-{variant}-{label}{args.sheet.suffix}"))
    shown = {**report, "decisions": [{k: v for k, v in d.items() if k != "false_pair_list"}
                                     | {"worst_false_pairs": d["false_pair_list"][:8]}
                                     for d in report["decisions"]]}
    print(json.dumps(shown, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
