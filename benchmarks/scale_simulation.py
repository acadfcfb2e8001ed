"""Search and dedup at 10M-100M rows, by simulation: what `--factory auto` builds, measured at
sizes this machine holds, and the formulas that carry the numbers to 10M and 100M.

Usage: python benchmarks/scale_simulation.py [--dim 1280] [--rows 250000,1000000]
           [--factories auto,IVF1024,PQ64] [--planted 2000] [--random-queries 2000]
           [--on-disk] [--out bench-out/scale-simulation.json]

Data (per row count N): N random unit vectors of `dim` (the default model's descriptor size at
s* = 500 is 1280), written to a memory-mapped file under bench-out/ (never kept in git), with
`planted` rows replaced by near-copies of other rows at an exact cosine drawn uniformly in
[0.42, 0.99] (0.4229 is the default cosine threshold). Random isotropic vectors have no
cluster structure: the worst case for an inverted file, so recall here is a lower bound.

Per factory, in a fresh process (its peak RSS is VmHWM):
  build    train + fill (mgdedup.index.faiss_index.build_index, lists in RAM or on disk)
  knn      the copy path's candidate search: the 20 nearest neighbours of every planted
           copy, its original and `random-queries` rows (as `dedup` queries every row);
           a planted pair is found when either side finds the other (find_candidates)
  range    the cosine path: pairs >= 0.4229 around the same queries, searched LOSSY_MARGIN
           lower on lossy indexes and re-scored from the rows, as `dedup --score cosine`
           (recall of the pairs planted at or above 0.4229)
Reported: build s, peak MiB, bytes per row, ms per query (so s per 1M queries), recall of
the planted pairs by cosine bin, and the largest error of the index's own scores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from dedup_scale import cpu_seconds, peak_rss_mib  # one copy of the process meters

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 65536
NEIGHBOURS = 20
COSINE_THRESHOLD = 0.4229
BINS = [0.42, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def generate(path: Path, rows: int, dim: int, planted: int, seed: int) -> dict:
    """The vectors in a float32 memmap at `path`; returns the planted pairs."""
    rng = np.random.default_rng(seed)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, BLOCK):
        block = rng.standard_normal((min(BLOCK, rows - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[start:start + len(block)] = block
    picked = rng.choice(rows, size=2 * planted, replace=False)
    src, dst = picked[:planted], picked[planted:]
    cos = rng.uniform(BINS[0], 0.99, planted).astype(np.float32)
    original = np.asarray(x[np.sort(src)])[np.argsort(np.argsort(src))]
    noise = rng.standard_normal((planted, dim), dtype=np.float32)
    noise -= (noise * original).sum(1, keepdims=True) * original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = cos[:, None] * original + np.sqrt(1 - cos ** 2)[:, None] * noise
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    for row, vector in zip(dst.tolist(), copies):
        x[row] = vector
    x.flush()
    true_cos = np.einsum("ij,ij->i", original, copies)
    return {"src": src, "dst": dst, "cos": true_cos}


def step(vectors: str, factory: str, on_disk: bool, pairs: dict, random_queries: int,
         queue: mp.Queue) -> None:
    """Build `factory` over the memmap and search it (run in a spawned process)."""
    sys.path.insert(0, str(ROOT))
    from mgdedup.index import faiss_index as fi

    x = np.load(vectors, mmap_mode="r")
    n, dim = x.shape
    idle = peak_rss_mib()
    list_file = Path(vectors).with_suffix(".ivfdata") if on_disk else None
    wall, cpu = time.perf_counter(), cpu_seconds()
    blocks = ((s, np.asarray(x[s:s + BLOCK])) for s in range(0, n, BLOCK))
    ivf_lists = fi.faiss.try_extract_index_ivf(fi._new_index(dim, factory))
    train_rows = max(fi.TRAIN_ROWS, fi.TRAIN_ROWS_PER_LIST * ivf_lists.nlist) \
        if ivf_lists is not None else fi.TRAIN_ROWS
    if factory == "Flat" or (ivf_lists is not None and not on_disk and not fi.is_lossy(
            fi._new_index(dim, factory))):
        source = x  # an array: sampled for training, and IVF-Flat lists filled exactly
    else:
        source = blocks  # a stream: trained on its first rows (random rows anyway)
    index = fi.build_index(source, dim, factory, train_rows=train_rows, list_file=list_file)
    build = {"build_s": round(time.perf_counter() - wall, 1),
             "build_cpu_s": round(cpu_seconds() - cpu, 1),
             "build_peak_mib": round(peak_rss_mib() - idle)}
    src, dst, cos = pairs["src"], pairs["dst"], pairs["cos"]
    rng = np.random.default_rng(1)
    extra = rng.choice(n, size=random_queries, replace=False)
    rows = np.concatenate([dst, src, extra])
    order = np.argsort(rows)
    queries = np.empty((len(rows), dim), np.float32)
    queries[order] = np.asarray(x[rows[order]])
    lossy = fi.is_lossy(index)

    def rows_of(wanted: np.ndarray) -> np.ndarray:
        return np.asarray(x[wanted])

    wall = time.perf_counter()
    scores, ids = fi.knn(index, queries, NEIGHBOURS + 1)
    knn_s = time.perf_counter() - wall
    if lossy:
        scores, ids = fi.rescored_neighbours(queries, ids, rows_of)
    m = len(dst)
    by_copy = (ids[:m] == src[:, None]).any(1)
    by_original = (ids[m:2 * m] == dst[:, None]).any(1)
    knn_found = by_copy | by_original

    t = np.float32(COSINE_THRESHOLD - (fi.LOSSY_MARGIN if lossy else 0.0))
    wall = time.perf_counter()
    lims, approx, found = index.range_search(queries, float(np.nextafter(t, np.float32(-1))))
    range_s = time.perf_counter() - wall
    owner = np.repeat(np.arange(len(rows)), np.diff(lims.astype(np.int64)))
    exact = np.einsum("ij,ij->i", queries[owner], rows_of(np.sort(found))[
        np.argsort(np.argsort(found))]) if len(found) else np.zeros(0, np.float32)
    error = float(np.abs(exact - approx).max()) if len(found) else 0.0
    keep = exact >= np.float32(COSINE_THRESHOLD)
    hits = set(zip(owner[keep].tolist(), found[keep].tolist()))
    range_found = np.array([(k, int(src[k])) in hits or (m + k, int(dst[k])) in hits
                            for k in range(m)])

    def by_bin(found_mask: np.ndarray, at_least: float = -1.0) -> dict[str, float]:
        """Recall overall and by cosine bin, of the pairs planted at >= `at_least`."""
        counted = cos >= at_least
        out = {"all": round(float(found_mask[counted].mean()), 4)}
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            inside = (cos >= lo) & (cos < hi) & counted
            if inside.any():
                out[f"{lo:.2f}-{hi:.2f}"] = round(float(found_mask[inside].mean()), 4)
        return out

    ivf = fi.faiss.try_extract_index_ivf(index)
    code = ivf.code_size if ivf is not None else 4 * dim
    queue.put({**build, "factory": factory, "rows": n, "dim": dim, "on_disk": on_disk,
               "nlist": ivf.nlist if ivf is not None else None,
               "nprobe": ivf.nprobe if ivf is not None else None,
               "code_bytes": code, "bytes_per_row": code + (8 if ivf is not None else 0),
               "queries": len(rows), "knn_ms_per_query": round(1000 * knn_s / len(rows), 3),
               "range_ms_per_query": round(1000 * range_s / len(rows), 3),
               "knn_recall": by_bin(knn_found),
               "range_recall": by_bin(range_found, COSINE_THRESHOLD),
               "max_score_error": round(error, 5), "peak_mib": round(peak_rss_mib())})
    if list_file is not None:
        list_file.unlink(missing_ok=True)


def in_child(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=step, args=(*args, queue))
    proc.start()
    while True:  # a child that died never answers: fail instead of waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # noqa: BLE001 - queue.Empty
            if not proc.is_alive():
                raise SystemExit(f"the measuring process died (exit code {proc.exitcode})") \
                    from None
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--rows", default="250000,1000000")
    parser.add_argument("--factories", default="auto",
                        help="comma-separated: 'auto' (mgdedup's choice for each N), a FAISS "
                             "factory, or SQ8 / PQ<m> on auto's inverted file")
    parser.add_argument("--planted", type=int, default=2000)
    parser.add_argument("--random-queries", type=int, default=2000)
    parser.add_argument("--on-disk", action="store_true", help="also build each IVF index "
                        "with its lists on disk (memory-mapped)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "scale-simulation")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mgdedup.index.faiss_index import auto_factory

    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(r) for r in args.rows.split(",")]:
        vectors = args.work / f"vectors-{n}x{args.dim}.npy"
        t0 = time.perf_counter()
        pairs = generate(vectors, n, args.dim, args.planted, seed=n)
        print(f"generated {n} x {args.dim} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        for factory in args.factories.split(","):
            if factory == "auto":
                factory = auto_factory(n, args.dim)
            elif factory.startswith(("PQ", "SQ")):  # the coarse quantizer auto would use
                factory = f"{auto_factory(max(n, 250_001), args.dim).split(',')[0]},{factory}"
            for on_disk in ([False, True] if args.on_disk and factory != "Flat" else [False]):
                result = in_child(str(vectors), factory, on_disk, pairs, args.random_queries)
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
        vectors.unlink()
    report = {"date": date.today().isoformat(), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "args": {
                  k: str(v) for k, v in vars(args).items()}, "results": results}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
