"""IN-aug score, mAP and micro-AP of the default model for every p of a grid, per resolution.

Usage: python benchmarks/tune_p_default.py PHOTOS_DIR [--k 300] [--seed 0]
       [--resolutions 224,500] [--grid 1,1.5,...] [--out result.json]

The same measurement as `mgdedup tune-p` (mgdedup.tuning.p_star.tune), on a flat seeded pick of k
photos (tuxpaint/ and lxqt/ excluded: reserved for independent evaluation), with a finer
grid and all three metrics printed as a Markdown table for BENCHMARKS.md. p* is chosen on the
integer grid 1..10 (the paper's protocol); half steps are reported for information.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mgdedup.evaluation.inaug import build_inaug
from mgdedup.model.registry import DEFAULT_MODEL, load_model
from mgdedup.tuning.p_star import best_p, score_grid

RESERVED = ("tuxpaint", "lxqt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolutions", default="224,500")
    parser.add_argument("--grid", default=",".join(str(p / 2) for p in range(2, 21)))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    grid = [float(p) for p in args.grid.split(",")]
    model = load_model(DEFAULT_MODEL)
    inaug = build_inaug(args.photos, args.k, args.seed, layout="flat", exclude=RESERVED)
    report: dict = {"k": len(inaug.sources), "seed": args.seed, "copies": inaug.copies,
                    "resolutions": {}}
    for resolution in (int(r) for r in args.resolutions.split(",")):
        start = time.monotonic()
        metrics, rows = score_grid(model, inaug, resolution, grid)
        seconds = time.monotonic() - start
        integer = {p: m for p, m in metrics.items() if p == int(p) and 1 <= p <= 10}
        chosen = best_p(integer, model.p_for(resolution))
        report["resolutions"][resolution] = {"rows": rows, "seconds": round(seconds, 1),
                                             "p_star": chosen,
                                             "metrics": {str(p): m for p, m in metrics.items()}}
        print(f"\n### s* = {resolution}: {rows} copies, {seconds:.0f} s, p* = {chosen:g}\n")
        print("| p | IN-aug score (/5) | mAP | micro-AP |\n|---|---|---|---|")
        for p, m in metrics.items():
            mark = "**" if p == chosen else ""
            print(f"| {mark}{p:g}{mark} | {m['score']:.4f} | {m['map']:.4f} | "
                  f"{m['micro_ap']:.4f} |")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
