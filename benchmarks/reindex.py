"""Re-running `mgdedup index` on a large folder where nothing changed (the stat-only path).

Usage: python benchmarks/reindex.py [--files 100000] [--resolution 224] [--profile]

1. Writes `files` distinct 8x8 PNGs (100 per folder) into a temporary folder.
2. Builds the index those files would have after a first `mgdedup index`, without embedding
   100k images (hours on 2 cores): the rows come straight from `scan_images` (the same
   path, size and mtime facts the indexer compares), real blake2b digests, the default
   model's metadata at `resolution` (so the run below accepts the index as its own) and
   random unit descriptors of the model's dimension; then `faiss.index` as `index` builds it.
3. Times `mgdedup index FOLDER --resolution R --out IDX` in a fresh process, exactly as a
   user runs it (interpreter start, imports, model load, scan, plan, FAISS check), and checks
   it reports every file unchanged and nothing embedded. Page cache warm (step 1 just wrote
   the files), as on a second run.
`--profile` runs the same update in-process under cProfile and prints the top functions.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image


def write_files(folder: Path, count: int) -> None:
    """Distinct tiny PNGs: pixel values spell the file number."""
    for k in range(count):
        sub = folder / f"d{k // 100:04d}"
        if k % 100 == 0:
            sub.mkdir(parents=True)
        pixels = np.full((8, 8, 3), 0, np.uint8)
        pixels.reshape(-1)[:8] = np.frombuffer(k.to_bytes(8, "little"), np.uint8)
        Image.fromarray(pixels).save(sub / f"img{k:06d}.png")


def build_first_index(folder: Path, idx_dir: Path, resolution: int) -> int:
    from mgdedup.files.digest import file_digest
    from mgdedup.imaging.scan import scan_images
    from mgdedup.index.build import model_meta
    from mgdedup.index.faiss_index import build_index, resolve_factory, save_index
    from mgdedup.index.layout import IndexDir
    from mgdedup.index.store import IndexStore, RowBatch
    from mgdedup.model.registry import canonical_spec, load_model

    spec = canonical_spec(None)
    model = load_model(spec)
    files, problems = scan_images([folder])
    assert not problems, problems[:3]
    meta = model_meta(model, spec, resolution, [str(folder.resolve())])
    rng = np.random.default_rng(0)
    idx_dir.mkdir(parents=True)
    with IndexStore.create(IndexDir(idx_dir).embeddings, meta) as store:
        for start in range(0, len(files), 8192):
            chunk = files[start:start + 8192]
            n = len(chunk)
            x = rng.standard_normal((n, meta.dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            store.append(RowBatch(
                paths=[f.rel for f in chunk], root=np.zeros(n, np.int32),
                size=[f.size for f in chunk], mtime_ns=[f.mtime_ns for f in chunk],
                digest=[file_digest(f.path) for f in chunk], width=np.full(n, 8),
                height=np.full(n, 8), embeddings=x, gem_norm=np.ones(n, np.float32),
                white_norm=np.ones(n, np.float32)))
        kind = resolve_factory(None, len(store), meta.dim)
        save_index(build_index(store, meta.dim, kind), IndexDir(idx_dir).faiss)
        (idx_dir / "errors.jsonl").write_text("")
        return len(store)


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--runs", type=int, default=2, help="timed re-index runs")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mgdedup-reindex-", dir=args.workdir))
    report: dict = {"date": date.today().isoformat(), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "files": args.files, "load_before": os.getloadavg()}
    try:
        folder, idx = work / "photos", work / "idx"
        t0 = time.perf_counter()
        write_files(folder, args.files)
        report["write_files_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        report["rows"] = build_first_index(folder, idx, args.resolution)
        report["first_index_s"] = round(time.perf_counter() - t0, 1)
        env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"))
        command = [sys.executable, "-m", "mgdedup", "index", str(folder), "--resolution",
                   str(args.resolution), "--out", str(idx)]
        report["command"] = "mgdedup " + " ".join(command[3:])
        runs, cpu = [], []
        for _ in range(args.runs):
            t0, c0 = time.perf_counter(), child_cpu()
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  check=False)
            runs.append(round(time.perf_counter() - t0, 2))
            cpu.append(round(child_cpu() - c0, 2))
            if done.returncode != 0 or f"0 indexed, 0 skipped; {args.files} unchanged" \
                    not in done.stderr:
                raise SystemExit(f"unexpected index run: {done.stderr}")
        report["reindex_s"] = runs
        report["reindex_cpu_s"] = cpu  # user + system: what a busy machine does not inflate
        report["summary_line"] = done.stderr.strip()
        t0, c0 = time.perf_counter(), child_cpu()
        startup = "import mgdedup.cli; from mgdedup.model.registry import load_model; load_model()"
        subprocess.run([sys.executable, "-c", startup], env=env, check=True)
        report["startup_and_model_load_s"] = round(time.perf_counter() - t0, 2)
        report["startup_and_model_load_cpu_s"] = round(child_cpu() - c0, 2)
        if args.profile:
            report["profile"] = profile(folder, idx, args.resolution)
        report["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


def profile(folder: Path, idx: Path, resolution: int) -> list[str]:
    """Top functions (cumulative) of one in-process unchanged update."""
    from mgdedup.index.build import update_index
    from mgdedup.model.registry import canonical_spec, load_model

    spec = canonical_spec(None)
    model = load_model(spec)
    profiler = cProfile.Profile()
    profiler.enable()
    update_index([folder], idx, model, spec, resolution)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue().splitlines()


if __name__ == "__main__":
    main()
