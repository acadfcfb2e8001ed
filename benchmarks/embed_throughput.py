"""Embedding throughput on 12 MP JPEGs: `index` end to end vs a naive loop vs the forward ceiling.

Usage: python benchmarks/embed_throughput.py [--images 48] [--source FOLDER]
           [--resolutions 224,500] [--workers auto,1] [--backend auto] [--repeats 1]
           [--precision fp32|int8]

In one run, for each s*:
  index     `mgdedup.index.build.update_index` into a fresh temporary index (scan, decode with JPEG
            draft scaling and, with ONNX Runtime, the forward pass in DataLoader workers, HDF5
            write, FAISS build): the CLI path. --workers auto is what `index` picks; 1 with
            ONNX Runtime is one worker doing both. --precision int8: the rows from the
            int8 graph (`index --precision int8`; the ceilings stay fp32).
  naive     full decode (`PIL.Image.open(...).convert("RGB")`), resize to the same geometry,
            one image at a time through the same model in PyTorch.
  ceiling   forward only (trunk + GeM) on random tensors of the s* shape (224x224, 500x375),
            for PyTorch (batch --batch-size) and ONNX Runtime: one process using every core
            (batch 1 and --batch-size) and one single-threaded process per core ("Nx1",
            as `index` runs it); the ceiling of the backend `index` used is the best of these.
Images are 4000x3000 q90 JPEGs made in a temporary folder: real photos from --source upscaled,
with film grain so the files have a camera photo's entropy (3-5 MB, which is what sets the
Huffman decoding cost that no draft scaling avoids); generated scenes without --source.
Every rate is images/s, all measured in the same run; --repeats keeps the best of N (the
machine may be shared). Prints a Markdown table and one JSON line.

With --inaug FOLDER it also checks that the faster backend retrieves as well as fp32 PyTorch:
IN-aug mAP (`mgdedup.evaluation.inaug`, --inaug-k sources x 5 augmented copies, reserved
subfolders excluded) of the stored descriptors from each backend, and their largest difference.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mgdedup.cpus import available_cpus
from mgdedup.embedding.embedder import Embedder, default_workers, preferred_backend
from mgdedup.embedding.onnx_trunk import OnnxTrunk
from mgdedup.imaging.synthetic import random_scene
from mgdedup.imaging.transforms import resize_for_resolution, to_tensor
from mgdedup.index.build import update_index
from mgdedup.model.multigrain import MultiGrainModel
from mgdedup.model.pooling import gem
from mgdedup.model.registry import DEFAULT_MODEL, load_model

SIZE = (4000, 3000)
RESERVED = ("tuxpaint", "lxqt")  # reserved material: never used here


def photo_sources(folder: Path) -> list[Path]:
    """JPEG photos below `folder`, reserved subfolders excluded, in a stable order."""
    found = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")
             and not any(part in RESERVED for part in p.relative_to(folder).parts)]
    return found


def make_images(folder: Path, count: int, source: Path | None, seed: int = 0) -> list[Path]:
    """`count` 4000x3000 JPEGs in `folder`: upscaled photos (or scenes) plus film grain."""
    rng = np.random.default_rng(seed)
    sources = photo_sources(source) if source is not None else []
    paths = []
    for i in range(count):
        if sources:
            with Image.open(sources[i % len(sources)]) as im:
                image = im.convert("RGB")
            w, h = image.size  # centre-crop to 4:3, then upscale
            if w * 3 > h * 4:
                cw = h * 4 // 3
                image = image.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
            else:
                ch = w * 3 // 4
                image = image.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
            image = image.resize(SIZE, Image.Resampling.BICUBIC)
        else:
            image = random_scene(rng, SIZE)
        pixels = np.asarray(image, dtype=np.int16)
        grain = rng.normal(0.0, 4.0, pixels.shape[:2] + (1,)).astype(np.int16)
        image = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
        path = folder / f"img_{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


@dataclass
class Rate:
    """Images/s, and CPU milliseconds per image (this process, its threads and its finished
    children, e.g. DataLoader workers): the CPU cost is much less disturbed by other load on
    a shared machine, and 1000 * cores / cpu_ms bounds the images/s a quiet machine can reach."""

    per_s: float
    cpu_ms: float


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def best_rate(repeats: int, run: Callable[[], int]) -> Rate:
    """Best of `repeats` runs of `run` (which returns how many images it did)."""
    rates = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), _cpu_seconds()
        done = run()
        rates.append(Rate(done / (time.perf_counter() - start),
                          1000 * (_cpu_seconds() - cpu) / done))
    return max(rates, key=lambda rate: rate.per_s)


def forward_rate(forward: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int, int],
                 batch: int, seconds: float) -> Rate:
    """`forward` on one random batch, repeated for `seconds` after a warm-up call."""
    x = torch.rand(batch, *shape)
    forward(x)
    done, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - start < seconds:
        forward(x)
        done += batch
    return Rate(done / (time.perf_counter() - start), 1000 * (_cpu_seconds() - cpu) / done)


def _forward_alone(trunk: torch.nn.Module, name: str, shape: tuple[int, int, int], p: float,
                   seconds: float) -> tuple[int, float, float]:
    """In a child process: a single-threaded ONNX Runtime forward loop (images, start, end)."""
    torch.set_num_threads(1)
    onnx = OnnxTrunk(trunk, name, threads=1)
    x = torch.rand(1, *shape)
    gem(onnx.forward_features(x), p)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        gem(onnx.forward_features(x), p)
        done += 1
    return done, start, time.perf_counter()


def forward_rate_processes(embedder: Embedder, shape: tuple[int, int, int], processes: int,
                           seconds: float) -> Rate:
    """Single-threaded ONNX Runtime forward passes in `processes` processes at once."""
    model = embedder.model
    cpu = _cpu_seconds()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        runs = pool.starmap(_forward_alone, [(model.trunk, model.info.trunk, shape, embedder.p,
                                              seconds)] * processes)
        pool.close()
        pool.join()
    done = sum(r[0] for r in runs)
    wall = max(r[2] for r in runs) - min(r[1] for r in runs)
    return Rate(done / wall, 1000 * (_cpu_seconds() - cpu) / done)


def naive_run(model: MultiGrainModel, paths: list[Path], resolution: int) -> int:
    """Full decode + resize + one image at a time through the PyTorch model."""
    p = model.p_for(resolution)
    with torch.inference_mode():
        for path in paths:
            with Image.open(path) as im:
                image = im.convert("RGB")
            x = to_tensor(resize_for_resolution(image, resolution))[None]
            model.gem(x.contiguous(memory_format=torch.channels_last), p)
    return len(paths)


def index_once(folder: Path, model: MultiGrainModel, resolution: int, batch_size: int,
               workers: int | None, backend: str, precision: str | None = None) -> int:
    """One `update_index` of `folder` into a fresh temporary index, as the CLI runs it."""
    with tempfile.TemporaryDirectory() as out, preferred_backend(backend):
        summary = update_index([folder], Path(out) / "idx", model, DEFAULT_MODEL, resolution,
                               batch_size=batch_size, workers=workers, precision=precision)
    return summary.embedded


def forward_ceilings(embedder: Embedder, shape: tuple[int, int, int], batch_size: int,
                     seconds: float) -> dict[str, Rate]:
    """Forward-only images/s (trunk + GeM) for PyTorch and, when available, ONNX Runtime."""
    model, p = embedder.model, embedder.p

    def torch_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.gem(x.contiguous(memory_format=torch.channels_last), p)
    ceilings = {"torch": forward_rate(torch_forward, shape, batch_size, seconds)}
    if embedder.onnx is not None:
        onnx = embedder.onnx

        def onnx_forward(x: torch.Tensor) -> torch.Tensor:
            model.pool.set_p(p)
            return model.pool(onnx.forward_features(x))
        ceilings["onnx b1"] = forward_rate(onnx_forward, shape, 1, seconds)
        ceilings[f"onnx b{batch_size}"] = forward_rate(onnx_forward, shape, batch_size, seconds)
        cpus = available_cpus()
        ceilings[f"onnx {cpus}x1"] = forward_rate_processes(embedder, shape, cpus, seconds)
    return ceilings


def inaug_comparison(model: MultiGrainModel, folder: Path, resolution: int, k: int
                     ) -> dict[str, float]:
    """IN-aug mAP of the stored descriptors computed by PyTorch and by ONNX Runtime."""
    from mgdedup.evaluation.inaug import InaugTensors, build_inaug, inaug_metrics, readable

    inaug = readable(build_inaug(folder, k, seed=0, layout="flat", exclude=RESERVED))
    tensors = InaugTensors(inaug, resolution)
    copies = [t for i in range(len(tensors)) for t in tensors[i][1]]
    result: dict[str, float] = {"images": float(len(copies))}
    descriptors = {}
    for backend in ("torch", "onnx"):
        embedder = Embedder(model, resolution, backend=backend, workers=0)
        if embedder.backend != backend:
            continue
        gem = torch.cat([embedder.gem(copies[i:i + 16]) for i in range(0, len(copies), 16)])
        descriptors[backend] = model.describe(gem, resolution).descriptors
        result[f"map_{backend}"] = inaug_metrics(descriptors[backend], inaug.groups)["map"]
    if len(descriptors) == 2:
        result["max_abs_diff"] = float(np.abs(descriptors["torch"] - descriptors["onnx"]).max())
    return result


def _cell(rate: Rate) -> str:
    return f"{rate.per_s:.1f} ({rate.cpu_ms:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--naive-images", type=int, default=16,
                        help="images for the naive loop (it is slow; the rate is what counts)")
    parser.add_argument("--source", type=Path, default=None,
                        help="folder of photos to upscale (default: generated scenes)")
    parser.add_argument("--resolutions", default="224,500")
    parser.add_argument("--workers", default="auto",
                        help="comma list, e.g. 0,1,2 (auto: what `index` picks)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--precision", default=None, choices=("fp32", "int8"))
    parser.add_argument("--seconds", type=float, default=4.0, help="per ceiling measurement")
    parser.add_argument("--inaug", type=Path, default=None,
                        help="photo folder: also compare IN-aug mAP of torch and onnx")
    parser.add_argument("--inaug-k", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = load_model(DEFAULT_MODEL)
    backend = Embedder(model, 500, backend=args.backend, workers=0).backend  # + thread counts
    workers_list = [None if w == "auto" else int(w) for w in args.workers.split(",")]
    rows, record = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        start = time.perf_counter()
        paths = make_images(folder, args.images, args.source)
        megabytes = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
        print(f"made {len(paths)} 4000x3000 JPEGs ({megabytes:.1f} MB each) in "
              f"{time.perf_counter() - start:.0f} s")
        for resolution in (int(r) for r in args.resolutions.split(",")):
            shape = (3, 224, 224) if resolution <= 224 else (3, resolution * 3 // 4, resolution)
            index_rates = {workers: best_rate(args.repeats, functools.partial(
                index_once, folder, model, resolution, args.batch_size, workers, args.backend,
                args.precision))
                for workers in workers_list}
            naive = best_rate(args.repeats, functools.partial(
                naive_run, model, paths[:args.naive_images], resolution))
            probe = Embedder(model, resolution, backend=args.backend, workers=0)
            ceilings = forward_ceilings(probe, shape, args.batch_size, args.seconds)
            ceiling = max((v for k, v in ceilings.items() if k.startswith(backend)),
                          key=lambda rate: rate.per_s)
            for workers, rate in index_rates.items():
                if workers is None:
                    workers = f"auto ({default_workers(backend == 'onnx')})"
                rows.append((resolution, f"{shape[2]}x{shape[1]}", workers, rate, naive,
                             ceilings, ceiling))
                record.append({
                    "resolution": resolution, "workers": workers, "backend": backend,
                    "index": asdict(rate), "naive": asdict(naive),
                    "ceilings": {k: asdict(v) for k, v in ceilings.items()},
                    "index_over_naive": round(rate.per_s / naive.per_s, 2),
                    "index_over_ceiling": round(rate.per_s / ceiling.per_s, 3)})

    load = os.getloadavg()
    print(f"\nbackend {backend}; {available_cpus()} CPUs available, torch threads "
          f"{torch.get_num_threads()}; {platform.processor() or platform.machine()}; "
          f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("images/s (CPU ms per image)\n")
    names = list(rows[0][5]) if rows else []
    print("| s* | input | workers | index | naive | "
          + " | ".join(f"ceiling {n}" for n in names) + " | index/naive | index/ceiling |")
    print("|---|---|---|---|---|" + "---|" * len(names) + "---|---|")
    for resolution, size, workers, rate, naive, ceilings, ceiling in rows:
        print(f"| {resolution} | {size} | {workers} | {_cell(rate)} | {_cell(naive)} | "
              + " | ".join(_cell(ceilings[n]) for n in names)
              + f" | {rate.per_s / naive.per_s:.2f}x | {rate.per_s / ceiling.per_s:.0%} |")
    maps = {}
    if args.inaug is not None:
        print("\n| s* | IN-aug images | mAP torch fp32 | mAP onnx fp32 | max abs diff |")
        print("|---|---|---|---|---|")
        for resolution in (int(r) for r in args.resolutions.split(",")):
            m = maps[resolution] = inaug_comparison(model, args.inaug, resolution, args.inaug_k)
            print(f"| {resolution} | {m['images']:.0f} | {100 * m.get('map_torch', np.nan):.2f} | "
                  f"{100 * m.get('map_onnx', np.nan):.2f} | {m.get('max_abs_diff', np.nan):.1e} |")
    print(json.dumps({"images": args.images, "backend": backend, "load": load,
                      "results": record, "inaug": maps}))


if __name__ == "__main__":
    main()
