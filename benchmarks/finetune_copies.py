"""Does `mgdedup train --images` (unlabelled fine-tuning) help copy detection, and does
distillation keep the classifier?

Usage: python benchmarks/finetune_copies.py [--photos DIR] [--train 400] [--heldout 100]
       [--iterations N] [--seed S] [--batch-size 24] [--resolution 224] [--eval-resolution 224]
       [--lr L] [--beta0 B] [--train-blocks K] [--agreement-photos DIR] [--workdir W]
       [--keep-last] [--validate-every N] [--curve] [--no-original-view]
       [--tuned W/tuned.pt (evaluate an earlier run again, no training)]

1. Training images: generated scenes (mgdedup.imaging.synthetic.random_scene), plus, with --photos,
   3/4 of the real photos in DIR (split by a hash of the path; tuxpaint/ and lxqt/ are
   excluded, that material is reserved).
2. Fine-tune the default model (EfficientNet-Lite0) with `run_training`: margin loss on RA
   batches of full-augmentation copies, lam x distillation from the frozen initial model.
3. On held-out images that training never saw (other generated scenes; with --photos the other
   1/4 of the photos), compare the initial and the fine-tuned model:
   - copy retrieval: each held-out original gets C "full"-augmentation copies
     (mgdedup.imaging.augment.augmented_copy) and one of each planted edit
     (mgdedup.imaging.edits.EDITS);
     a copy queries the originals; mAP with one positive per query (= mean 1/rank), and
     the change on the same queries with a 95 % bootstrap interval over originals;
   - classifier: top-1 agreement of the fine-tuned model with the initial one on the held-out
     originals (ImageNet classes), and with --agreement-photos on real photos that training
     never saw (the held-out quarter when --photos also trains on them).
By default training holds a tenth of its images out and writes the checkpoint that retrieves
their copies best (`--select-best`, what `train --images` does); `--keep-last` writes the last.
`--curve` also scores the benchmark's held-out copies (whitened) at every internal validation,
to see whether the internal choice tracks the independent held-out set.
Descriptors at --eval-resolution with the test protocol, p = 3, two ways for both models:
l2n(g), and whitened as `index` stores them, each model with a whitening fitted on the
training images (what `mgdedup train --images` does at its end; the initial model's shipped
whitening was fitted on other photos, so both get one fitted on the same images).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mgdedup.imaging.augment import augmented_copy
from mgdedup.imaging.edits import EDITS
from mgdedup.imaging.reading import ImageReadError, open_rgb
from mgdedup.imaging.scan import scan_images
from mgdedup.imaging.synthetic import random_scene
from mgdedup.imaging.transforms import resize_for_resolution, to_tensor
from mgdedup.model.model_file import load_model_file
from mgdedup.model.multigrain import MultiGrainModel
from mgdedup.model.registry import load_model
from mgdedup.training.config import TrainConfig
from mgdedup.training.copy_validation import reciprocal_ranks as copy_reciprocal_ranks
from mgdedup.training.loop import Trainer
from mgdedup.tuning.whiten import whiten_model

RESERVED = ("tuxpaint", "lxqt")
P = 3.0


def held_out_photo(path: Path) -> bool:
    return int(hashlib.sha1(str(path).encode()).hexdigest(), 16) % 4 == 0


def photos_split(folder: Path) -> tuple[list[Path], list[Path]]:
    files, _ = scan_images([folder])
    paths = [f.path for f in files if not any(part in RESERVED for part in f.path.parts)]
    return ([p for p in paths if not held_out_photo(p)], [p for p in paths if held_out_photo(p)])


def embed(model: MultiGrainModel, images: list[Image.Image], resolution: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(l2n(g) at p=3, whitened descriptor, top-1 class) for PIL images at the test protocol."""
    model.eval()
    gs, whitened, top1 = [], [], []
    with torch.no_grad():
        for start in range(0, len(images), 16):
            batch = torch.stack([to_tensor(resize_for_resolution(im, resolution))
                                 for im in images[start:start + 16]])
            g = model.gem(batch, P)
            gs.append(F.normalize(g, dim=1))
            whitened.append(torch.from_numpy(model.describe(g, resolution).descriptors))
            top1.append(model.logits(g).argmax(dim=1))
    return torch.cat(gs), torch.cat(whitened), torch.cat(top1)


def reciprocal_ranks(queries: torch.Tensor, query_owner: np.ndarray, database: torch.Tensor
                     ) -> np.ndarray:
    """Per query: 1 / rank of the query's original among the originals (the same rule as
    `train --images`' own held-out validation)."""
    return copy_reciprocal_ranks(queries.numpy(), query_owner, database.numpy())


def retrieval_map(queries: torch.Tensor, query_owner: np.ndarray, database: torch.Tensor
                  ) -> float:
    """Mean over queries of 1 / rank of the query's original (one positive: mAP)."""
    return float(reciprocal_ranks(queries, query_owner, database).mean())


def paired_difference(after: np.ndarray, before: np.ndarray, owners: np.ndarray,
                      resamples: int = 2000, seed: int = 0) -> dict:
    """mAP after - before on the same queries, with a 95 % bootstrap interval that resamples
    whole originals (the copies of one image are not independent queries)."""
    rng = np.random.default_rng(seed)
    groups = np.unique(owners)
    per_group = np.array([(after[owners == g] - before[owners == g]).sum() for g in groups])
    counts = np.array([(owners == g).sum() for g in groups])
    draws = rng.integers(0, len(groups), (resamples, len(groups)))
    means = per_group[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": round(float((after - before).mean()), 4), "ci95": [round(float(low), 4),
            round(float(high), 4)], "better": int((after > before).sum()),
            "worse": int((after < before).sum())}


def evaluate(model: MultiGrainModel, originals: list[Image.Image], aug: list[Image.Image],
             aug_owner: np.ndarray, edits: list[Image.Image], edit_owner: np.ndarray,
             others: list[Image.Image], resolution: int) -> dict:
    database, white_db, top1 = embed(model, originals, resolution)
    aug_q, white_aug, _ = embed(model, aug, resolution)
    edit_q, white_edit, _ = embed(model, edits, resolution)
    others_top1 = embed(model, others, resolution)[2] if others else torch.zeros(0)
    rr_aug = reciprocal_ranks(aug_q, aug_owner, database)
    rr_aug_white = reciprocal_ranks(white_aug, aug_owner, white_db)
    return {"map_aug": float(rr_aug.mean()),
            "map_edits": retrieval_map(edit_q, edit_owner, database),
            "map_aug_white": float(rr_aug_white.mean()),
            "map_edits_white": retrieval_map(white_edit, edit_owner, white_db),
            "rr_aug": rr_aug, "rr_aug_white": rr_aug_white,
            "top1": top1, "others_top1": others_top1}


def whitened_on(model: MultiGrainModel, folder: Path, resolution: int) -> MultiGrainModel:
    """`model` with a whitening fitted on the images of `folder` at `resolution`."""
    return whiten_model(model, [folder], resolution, calibration_images=0, workers=0)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--train", type=int, default=400, help="generated training scenes")
    parser.add_argument("--heldout", type=int, default=100, help="generated held-out scenes")
    parser.add_argument("--copies", type=int, default=4, help="augmented copies per original")
    parser.add_argument("--iterations", type=int, default=None,
                        help="one epoch of N iterations (default: train --images' own "
                             "schedule, 2 epochs of ceil(2 N / B))")
    parser.add_argument("--seed", type=int, default=0, help="training seed (data are fixed)")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--beta0", type=float, default=None, help="initial margin beta")
    parser.add_argument("--train-blocks", type=int, default=None,
                        help="train only the trunk's last K blocks (default: all)")
    parser.add_argument("--resolution", type=int, default=224, help="training crop")
    parser.add_argument("--eval-resolution", type=int, default=224)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tuned", type=Path, default=None,
                        help="evaluate this model of an earlier run (WORKDIR/tuned.pt), "
                             "no training")
    parser.add_argument("--agreement-photos", type=Path, default=None,
                        help="real photos for top-1 agreement (held-out quarter if --photos)")
    parser.add_argument("--agreement-count", type=int, default=200)
    parser.add_argument("--original-view", action=argparse.BooleanOptionalAction, default=None,
                        help="the first copy of each image in a batch is the image unaugmented "
                             "(default: as train --images, on)")
    parser.add_argument("--keep-last", action="store_true",
                        help="train on every image and keep the last model (no selection)")
    parser.add_argument("--validate-every", type=int, default=0,
                        help="internal held-out validation every N iterations (0: at the end)")
    parser.add_argument("--curve", action="store_true",
                        help="score the benchmark's held-out copies at every validation")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mg-finetune-"))
    train_dir = work / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    for i in range(args.train):
        random_scene(rng, (320, 240)).save(train_dir / f"gen{i:04d}.jpg", quality=92)
    heldout_paths: list[Path] = []
    if args.photos is not None:
        train_photos, heldout_paths = photos_split(args.photos)
        for i, path in enumerate(train_photos):
            (train_dir / f"photo{i:04d}{path.suffix.lower()}").symlink_to(path.resolve())
    rng = np.random.default_rng(12)
    originals = [random_scene(rng, (320, 240)) for _ in range(args.heldout)]
    for path in heldout_paths:
        try:
            originals.append(open_rgb(path, (448, 448))[0])
        except ImageReadError:
            continue
    aug, aug_owner, edits, edit_owner = [], [], [], []
    edit_rng = np.random.default_rng(13)
    for i, image in enumerate(originals):
        for c in range(args.copies):
            aug.append(augmented_copy(image, args.eval_resolution, seed=1000 * i + c))
            aug_owner.append(i)
        for edit in EDITS.values():
            edits.append(edit(image, edit_rng).convert("RGB"))
            edit_owner.append(i)
    aug_owner_a, edit_owner_a = np.array(aug_owner), np.array(edit_owner)
    others: list[Image.Image] = []
    if args.agreement_photos is not None:
        for path in photos_split(args.agreement_photos)[1][:args.agreement_count]:
            try:
                others.append(open_rgb(path, (448, 448))[0])
            except ImageReadError:
                continue

    initial = whitened_on(load_model("default"), train_dir, args.eval_resolution)
    before = evaluate(initial, originals, aug, aug_owner_a, edits, edit_owner_a, others,
                      args.eval_resolution)

    train_count = len(list(train_dir.iterdir()))
    config = TrainConfig(images=str(train_dir), init="default", out=str(work / "tuned.pt"),
                         run_dir=str(work / "run"),
                         epochs=1 if args.iterations else None, iters_per_epoch=args.iterations,
                         seed=args.seed,
                         batch_size=args.batch_size, lr=args.lr, lam=args.lam, milestones=[],
                         train_blocks=args.train_blocks, beta0=args.beta0,
                         whiten=False,  # the same refit as training's, at --eval-resolution only
                         resolution=args.resolution, workers=args.workers, log_every=5,
                         save_every=5,
                         select_best=not args.keep_last, original_view=args.original_view,
                         validate_every=args.validate_every,
                         device="cpu")
    curve: list[dict] = []
    trainer: Trainer | None = None

    def on_event(record: dict) -> None:
        if record["event"] != "copy_validation" or not args.curve or trainer is None:
            return
        snapshot = whitened_on(copy.deepcopy(trainer.model).eval(), train_dir,
                               args.eval_resolution)
        database, white_db, _ = embed(snapshot, originals, args.eval_resolution)
        queries, white_q, _ = embed(snapshot, aug, args.eval_resolution)
        curve.append({"iteration": record["iteration"],
                      "internal": round(record["map_whitened"], 4),
                      "internal_l2n": round(record["map_l2n"], 4),
                      "internal_agreement": round(record["agreement"], 4),
                      "heldout": round(retrieval_map(white_q, aug_owner_a, white_db), 4),
                      "heldout_l2n": round(retrieval_map(queries, aug_owner_a, database), 4)})
        print(json.dumps(curve[-1]), flush=True)

    started = time.perf_counter()
    if args.tuned is None:
        trainer = Trainer(config, progress=on_event)
        try:
            out = trainer.fit()
        finally:
            trainer.close()
    else:  # evaluate a finished run again (same generated data: the seeds are fixed)
        out, config.out = args.tuned, str(args.tuned)
        config.run_dir = str(args.tuned.parent / "run")
    seconds = time.perf_counter() - started
    tuned = whitened_on(load_model_file(out), train_dir, args.eval_resolution)
    after = evaluate(tuned, originals, aug, aug_owner_a, edits, edit_owner_a, others,
                     args.eval_resolution)
    agreement = float((before["top1"] == after["top1"]).double().mean())
    others_agreement = (float((before["others_top1"] == after["others_top1"]).double().mean())
                        if others else None)
    lines = (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r for r in records if r["event"] == "train"]
    selected = [r for r in records if r["event"] == "selected"]
    result = {
        "train_images": train_count, "heldout_originals": len(originals),
        "aug_queries": len(aug), "edit_queries": len(edits), "iterations": steps[-1]["iteration"],
        "seed": args.seed,
        "batch_size": args.batch_size, "lr": config.base_lr, "lam": args.lam,
        "train_blocks": args.train_blocks, "beta0": args.beta0,
        "original_view": config.original_views,
        "train_resolution": args.resolution, "eval_resolution": args.eval_resolution,
        "train_seconds": round(seconds, 1),
        "map_aug_before": round(before["map_aug"], 4), "map_aug_after": round(after["map_aug"], 4),
        "map_edits_before": round(before["map_edits"], 4),
        "map_edits_after": round(after["map_edits"], 4),
        "aug_change": paired_difference(after["rr_aug"], before["rr_aug"], aug_owner_a),
        "aug_white_change": paired_difference(after["rr_aug_white"], before["rr_aug_white"],
                                              aug_owner_a),
        "map_aug_white_before": round(before["map_aug_white"], 4),
        "map_aug_white_after": round(after["map_aug_white"], 4),
        "map_edits_white_before": round(before["map_edits_white"], 4),
        "map_edits_white_after": round(after["map_edits_white"], 4),
        "top1_agreement": round(agreement, 4),
        "agreement_photos": len(others),
        "top1_agreement_photos": None if others_agreement is None else round(others_agreement, 4),
        "margin_first": round(steps[0]["margin"], 4), "margin_last": round(steps[-1]["margin"], 4),
        "kl_first": round(steps[0]["distillation"], 4),
        "kl_last": round(steps[-1]["distillation"], 4),
        "selected_iteration": selected[-1]["iteration"] if selected else None,
        "validations": [{"iteration": r["iteration"], "map_whitened": round(r["map_whitened"], 4),
                         "agreement": round(r["agreement"], 4)}
                        for r in records if r["event"] == "copy_validation"],
        "curve": curve,
    }
    print("| metric | initial | fine-tuned |\n|---|---|---|")
    print(f"| mAP, full-augmentation copies -> originals | {result['map_aug_before']} | "
          f"{result['map_aug_after']} |")
    print(f"| mAP, planted edits -> originals | {result['map_edits_before']} | "
          f"{result['map_edits_after']} |")
    print(f"| mAP whitened, aug. copies | {result['map_aug_white_before']} | "
          f"{result['map_aug_white_after']} |")
    print(f"| mAP whitened, planted edits | {result['map_edits_white_before']} | "
          f"{result['map_edits_white_after']} |")
    for key, name in (("aug_change", "l2n(g)"), ("aug_white_change", "whitened")):
        change = result[key]
        print(f"| change, aug. copies, {name}: mean [95 % CI], queries better / worse | | "
              f"{change['diff']:+.4f} [{change['ci95'][0]:+.4f}, {change['ci95'][1]:+.4f}], "
              f"{change['better']} / {change['worse']} |")
    print(f"| top-1 agreement, held-out originals | 1.0 | {result['top1_agreement']} |")
    if others:
        print(f"| top-1 agreement, {len(others)} real photos | 1.0 | "
              f"{result['top1_agreement_photos']} |")
    print(json.dumps(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
