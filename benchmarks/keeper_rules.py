"""How often each keeper rule keeps the true original, on the copy benchmark's groups.

Usage: python benchmarks/keeper_rules.py [--work bench-out/copy-decisions] [--part eval]
       [--originals 150] [--per-kind 20] [--seed 0] [--resolution 500] [--json out.json]

The copy set and its index are those of `benchmarks/copy_decisions.py` (built here when
missing). The groups are found once, as `mgdedup dedup` finds them at the default threshold;
then each group's keeper is chosen by every rule of `mgdedup.duplicates.keepers` from what
the rule saw of its files (EXIF, the verified cover, pixels, bytes, times), in two settings:

- "as written": the files' own modification times. In the copy set, the photos keep their
  original times and every copy is written later, as a copy made by a person would be;
- "same times": every file given one time, as after a download or a copy that does not
  keep times; what the content alone tells.

Reported per rule and setting: over the copies found in their original's group, the share
whose group keeps the original (or a photo declared the same image), per copy kind and
overall, and how many photos carry camera EXIF.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from copy_sets import copy_set_folder, index_folder, load_or_build  # noqa: E402

from mgdedup.duplicates.find import DedupResult, find_duplicates  # noqa: E402
from mgdedup.duplicates.keepers import KEEP_RULES, KeeperRule, Traits  # noqa: E402
from mgdedup.index.build import update_index  # noqa: E402
from mgdedup.model.registry import DEFAULT_MODEL, load_model  # noqa: E402


def keeper_accuracy(result: DedupResult, copies, rule: KeeperRule,
                    same_times: bool) -> dict:
    family = copies.family()
    photos = {str(p.resolve()) for p in copies.photos}
    kind_of = copies.kind_of()
    hits: dict[str, list[bool]] = defaultdict(list)
    for group in result.groups:
        rows = [group.keeper, *(row for row, _ in group.members)]
        traits: dict[int, Traits] = {row: result.traits[row] for row in rows}
        if same_times:
            traits = {row: replace(t, mtime_ns=0) for row, t in traits.items()}
        keeper = min(rows, key=lambda row: rule.key(traits[row]))
        keeper_path = result.facts[keeper].path
        for row in rows:
            path = result.facts[row].path
            if path not in kind_of:
                continue
            if not any(family[result.facts[r].path] == family[path] and
                       result.facts[r].path in photos for r in rows):
                continue  # its original is not in this group: no right keeper to find
            hits[kind_of[path]].append(keeper_path in photos
                                       and family[keeper_path] == family[path])
    total = [x for v in hits.values() for x in v]
    return {"overall": round(sum(total) / len(total), 3) if total else None,
            "copies": len(total),
            "per_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--work", type=Path, default=Path("bench-out/copy-decisions"))
    parser.add_argument("--part", default="eval", choices=("eval", "fit", "all"))
    parser.add_argument("--originals", type=int, default=150)
    parser.add_argument("--per-kind", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=500)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    folder = copy_set_folder(args.work, args.part, args.originals, args.per_kind, args.seed)
    copies = load_or_build(args.photos, folder, part=args.part, originals=args.originals,
                           per_kind=args.per_kind, seed=args.seed)
    index_dir = index_folder(folder, DEFAULT_MODEL, args.resolution)
    update_index([folder], index_dir, load_model(DEFAULT_MODEL), DEFAULT_MODEL,
                 args.resolution)
    started = time.perf_counter()
    result = find_duplicates(index_dir)
    seconds = time.perf_counter() - started
    photos = {str(p.resolve()) for p in copies.photos}
    exif = sum(t.camera_exif for t in result.traits.values() if t.path in photos)
    report = {"photos": len(copies.photos), "copies": len(copies.copies),
              "groups": len(result.groups), "threshold": result.threshold,
              "dedup_seconds": round(seconds, 1),
              "grouped_photos_with_camera_exif": exif,
              "grouped_photos": sum(t.path in photos for t in result.traits.values()),
              "rules": {}}
    for name in KEEP_RULES:
        report["rules"][name] = {
            setting: keeper_accuracy(result, copies, KeeperRule(name), setting == "same times")
            for setting in ("as written", "same times")}
        row = report["rules"][name]
        print(f"{name:12s} as written {row['as written']['overall']}  same times "
              f"{row['same times']['overall']}", file=sys.stderr)
    print(json.dumps(report, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
