"""Training throughput on CPU: images per second of `mgdedup train` steps.

Usage: python benchmarks/train_throughput.py [--trunks efficientnet_lite0,resnet50]
       [--batch-size 32] [--repeats 3] [--resolution 224] [--steps 5] [--threads N]

For each trunk, one training step (forward, joint loss = lam CE + (1 - lam) margin, backward,
SGD) is timed on a fixed in-memory batch through `Trainer.step`, the code `mgdedup train` runs;
the first step is a warm-up. Separately, the "full" augmentation of a generated 640x480 image
is timed, since on CPU the DataLoader workers must keep up with the steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mgdedup.imaging.augment import FullAugmentation
from mgdedup.imaging.synthetic import random_scene
from mgdedup.training.config import TrainConfig
from mgdedup.training.loop import Trainer


def tiny_imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in range(2):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            random_scene(rng, (96, 72)).save(folder / f"{i}.png")
    return root


def step_rate(trunk: str, data: Path, work: Path, args: argparse.Namespace) -> float:
    """Images per second of Trainer.step for one trunk."""
    config = TrainConfig(imagenet=str(data), init="default" if trunk == "efficientnet_lite0"
                         else None, run_dir=str(work / trunk), batch_size=args.batch_size,
                         repeats=args.repeats, resolution=args.resolution, workers=0,
                         device="cpu", freeze_bn=False, lr=0.001)
    trainer = Trainer(config)
    groups = -(-args.batch_size // args.repeats)
    ids = torch.arange(groups).repeat_interleave(args.repeats)[: args.batch_size]
    labels = ids % 2
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution)
    trainer.step(images, labels, ids)  # warm-up
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(images, labels, ids)
        trainer.iteration += 1
    return args.steps * args.batch_size / (time.perf_counter() - started)


def augment_rate(resolution: int, count: int = 40) -> float:
    image = random_scene(np.random.default_rng(1), (640, 480))
    augment = FullAugmentation(resolution)
    started = time.perf_counter()
    for _ in range(count):
        augment(image)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trunks", default="efficientnet_lite0,resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size} (m={args.repeats}), {args.resolution}x{args.resolution}, "
          f"load average {load:.1f}")
    print("| trunk | img/s (train step) | s/step |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = tiny_imagefolder(Path(tmp) / "data")
        for trunk in args.trunks.split(","):
            rate = step_rate(trunk, data, Path(tmp), args)
            print(f"| {trunk} | {rate:.1f} | {args.batch_size / rate:.2f} |", flush=True)
    print("| full augmentation of a 640x480 image (1 process) | "
          f"{augment_rate(args.resolution):.0f}"
          f" | |")


if __name__ == "__main__":
    main()
