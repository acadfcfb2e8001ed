"""`dedup` at scale: range search + grouping on N random unit descriptors with planted copies,
against the dense N x N similarity matrix (the imagededup approach).

Usage: python benchmarks/dedup_scale.py [--rows 1000000] [--dim 256] [--threshold 0.5]
           [--factory auto] [--dense-budget-gb 4] [--exact-queries 5000] [--skip-dense]

Data: `rows` random unit vectors (seeded); `dup-fraction` of them are replaced by planted
near-duplicates of other rows, with cosine similarity to their original drawn uniformly in
[threshold + 0.005, 0.995]. The rows go to a temporary index folder through IndexStore (the
real `embeddings.h5` format; nothing is kept). Random isotropic vectors have no cluster
structure: they are the worst case for an inverted file, so recall here is a lower bound.

Each step runs in a fresh (spawned) process whose peak RSS (VmHWM) is reported:
  build   ensure_index: train + fill the FAISS index (what `index` does after embedding)
  dedup   load faiss.index, range_pairs over the HDF5 rows, keeper_order + star_groups
          (the work of `mgdedup dedup` minus printing)
  find_duplicates (--find-duplicates) the library call behind `mgdedup dedup`, end to end
  dense   X @ X.T >= t on the largest N whose float32 matrix + bool mask + X fit the budget
Recall: of the planted pairs (by similarity bin), and of all pairs of `exact-queries` random
rows against an exact blocked search over all rows. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

BLOCK = 65536


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork +
    exec, so a spawned child would report its parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system time of this process: what other load on the machine does not inflate
    (wall time on an idle 2-core machine is about half of it for the parallel parts)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def generate(idx_dir: Path, rows: int, dim: int, dup_fraction: float, threshold: float,
             seed: int) -> dict[str, np.ndarray]:
    """Write the rows to idx_dir/embeddings.h5; return the planted pairs and their cosines."""
    from mgdedup.index.store import IndexMeta, IndexStore, RowBatch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = int(rows * dup_fraction)
    picked = rng.choice(rows, size=2 * m, replace=False)
    src, dst = picked[:m], picked[m:]
    cos = rng.uniform(min(threshold + 0.005, 0.99), 0.995, m).astype(np.float32)
    noise = rng.standard_normal((m, dim), dtype=np.float32)
    noise -= (noise * x[src]).sum(1, keepdims=True) * x[src]  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] = cos[:, None] * x[src] + np.sqrt(1 - cos ** 2)[:, None] * noise
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    true_cos = np.einsum("ij,ij->i", x[src], x[dst])
    meta = IndexMeta("bench", "bench", 224, 3.0, "", dim, ["/bench"])
    with IndexStore.create(idx_dir / "embeddings.h5", meta) as store:
        for start in range(0, rows, BLOCK):
            stop = min(rows, start + BLOCK)
            n = stop - start
            ones = np.ones(n, np.int64)
            store.append(RowBatch(
                paths=[f"d{r // 1000:04d}/img{r:07d}.jpg" for r in range(start, stop)],
                root=0 * ones, size=1000 + rng.integers(0, 10**6, n), mtime_ns=ones,
                digest=[f"{r:032x}" for r in range(start, stop)], width=640 * ones,
                height=480 * ones, embeddings=x[start:stop], gem_norm=np.ones(n),
                white_norm=np.ones(n)))
    return {"i": np.minimum(src, dst), "j": np.maximum(src, dst), "cos": true_cos}


def step_build(idx_dir: str, factory: str, nprobe: int | None, queue: mp.Queue) -> None:
    import mgdedup.index.faiss_index
    from mgdedup.index.faiss_index import ensure_index, resolve_factory
    from mgdedup.index.store import IndexStore

    if nprobe is not None:  # saved with the index, so the dedup step uses it too
        mgdedup.index.faiss_index.DEFAULT_NPROBE = nprobe
    t0 = time.perf_counter()
    with IndexStore.open(Path(idx_dir) / "embeddings.h5") as store:
        kind = resolve_factory(factory, len(store), store.meta.dim)
        index = ensure_index(idx_dir, store, kind)
    queue.put({"cpu_s": round(cpu_seconds(), 1), "factory": kind, "nprobe":
               mgdedup.index.faiss_index.DEFAULT_NPROBE if "IVF" in kind
               else None, "ntotal": int(index.ntotal),
               "seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_mib": round(peak_rss_mib())})


def step_dedup(idx_dir: str, threshold: float, out: str, queue: mp.Queue) -> None:
    from mgdedup.duplicates.grouping import keeper_order, star_groups
    from mgdedup.index.faiss_index import ensure_index, range_pairs
    from mgdedup.index.store import IndexStore

    idle = peak_rss_mib()
    t0 = time.perf_counter()
    with IndexStore.open(Path(idx_dir) / "embeddings.h5") as store:
        index = ensure_index(idx_dir, store)  # fresh: loaded, not rebuilt
        t1 = time.perf_counter()
        i, j, s = range_pairs(index, store.iter_embeddings(16384), threshold)
        t2 = time.perf_counter()
        paths = store.absolute_paths()
        order = keeper_order(store.read("width").astype(np.int64) * store.read("height"),
                             store.read("size"), paths)
        groups = star_groups(len(store), i, j, s, order)
        t3 = time.perf_counter()
    np.savez(out, i=i, j=j, s=s)
    queue.put({"cpu_s": round(cpu_seconds(), 1),
               "load_s": round(t1 - t0, 1), "range_search_s": round(t2 - t1, 1),
               "grouping_s": round(t3 - t2, 1), "total_s": round(t3 - t0, 1),
               "pairs": len(i), "groups": len(groups),
               "members": sum(len(g.members) for g in groups),
               "peak_rss_mib": round(peak_rss_mib()), "idle_rss_mib": round(idle)})


def step_find_duplicates(idx_dir: str, threshold: float, queue: mp.Queue) -> None:
    """`mgdedup dedup` as the CLI runs it (find_duplicates: file facts, decisions, groups)."""
    from mgdedup.duplicates.find import find_duplicates

    t0 = time.perf_counter()
    result = find_duplicates(Path(idx_dir), threshold)
    queue.put({"seconds": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_seconds(), 1),
               "groups": len(result.groups), "peak_rss_mib": round(peak_rss_mib())})


def step_dense(idx_dir: str, n: int, threshold: float, queue: mp.Queue) -> None:
    """The dense baseline: the full similarity matrix, thresholded (imagededup computes the
    whole cosine matrix the same way before reading pairs from it)."""
    from mgdedup.index.store import IndexStore

    with IndexStore.open(Path(idx_dir) / "embeddings.h5") as store:
        x = store.embeddings(0, n)
    idle = peak_rss_mib()
    t0 = time.perf_counter()
    sims = x @ x.T
    i, _ = np.nonzero(np.triu(sims >= np.float32(threshold), 1))
    seconds = time.perf_counter() - t0
    queue.put({"n": n, "seconds": round(seconds, 1), "cpu_s": round(cpu_seconds(), 1),
               "pairs": len(i),
               "peak_rss_mib": round(peak_rss_mib()), "idle_rss_mib": round(idle)})


def in_child(target, *args) -> dict:
    """Run `target` in a fresh interpreter: its ru_maxrss is its own peak."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def exact_pairs_of(idx_dir: Path, queries: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """All pairs (query row, any row) >= threshold, by exact blocked search."""
    from mgdedup.index.faiss_index import _range_flat
    from mgdedup.index.store import IndexStore

    t = np.float32(threshold)
    radius = float(np.nextafter(t, np.float32(-np.inf)))
    found: set[tuple[int, int]] = set()
    with IndexStore.open(idx_dir / "embeddings.h5") as store:
        q = store.read("embeddings", queries)
        for start, block in store.iter_embeddings(BLOCK):
            lims, scores, ids = _range_flat(np.ascontiguousarray(q), block, radius)
            rows = np.repeat(queries, np.diff(lims))
            cols = ids + start
            keep = (scores >= t) & (cols != rows)
            found.update(zip(np.minimum(rows, cols)[keep].tolist(),
                             np.maximum(rows, cols)[keep].tolist()))
    return found


def dense_rows(budget_bytes: float, dim: int) -> int:
    """Largest N with N^2 float32 similarities + N^2 bool mask + N^2 bool triu + X in budget."""
    return int((-4 * dim + np.sqrt(16 * dim ** 2 + 4 * 6 * budget_bytes)) / (2 * 6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dup-fraction", type=float, default=0.01)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--factory", default="auto", help="'auto', 'Flat', 'IVF4096,Flat', ...")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="IVF lists probed per query (default: mgdedup's)")
    parser.add_argument("--dense-budget-gb", type=float, default=4.0)
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--find-duplicates", action="store_true",
                        help="also time mgdedup.duplicates.find.find_duplicates end to end")
    parser.add_argument("--exact-queries", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where the temporary index goes (default: the system temp dir).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mgdedup-bench-", dir=args.workdir))
    report: dict = {"date": date.today().isoformat(), "machine": platform.processor()
                    or platform.machine(), "cpus": os.cpu_count(), "rows": args.rows,
                    "dim": args.dim, "threshold": args.threshold,
                    "load_before": os.getloadavg()}
    try:
        idx_dir = work / "idx"
        t0 = time.perf_counter()
        planted = generate(idx_dir, args.rows, args.dim, args.dup_fraction, args.threshold,
                           args.seed)
        report["generate_s"] = round(time.perf_counter() - t0, 1)
        report["planted_pairs"] = len(planted["i"])
        report["build"] = in_child(step_build, str(idx_dir), args.factory, args.nprobe)
        print(json.dumps(report["build"]), file=sys.stderr, flush=True)
        pairs_file = str(work / "pairs.npz")
        report["dedup"] = in_child(step_dedup, str(idx_dir), args.threshold, pairs_file)
        print(json.dumps(report["dedup"]), file=sys.stderr, flush=True)

        if args.find_duplicates:
            report["find_duplicates"] = in_child(step_find_duplicates, str(idx_dir),
                                                 args.threshold)
            print(json.dumps(report["find_duplicates"]), file=sys.stderr, flush=True)
        got = np.load(pairs_file)
        found = set(zip(got["i"].tolist(), got["j"].tolist()))
        hit = np.array([(a, b) in found for a, b in zip(planted["i"].tolist(),
                                                        planted["j"].tolist())])
        edges = [args.threshold, 0.6, 0.7, 0.8, 0.9, 1.0]
        report["planted_recall"] = round(float(hit.mean()), 4)
        report["planted_recall_by_cos"] = {
            f"{lo:.2f}-{hi:.2f}": round(float(hit[(planted["cos"] >= lo)
                                                  & (planted["cos"] < hi)].mean()), 4)
            for lo, hi in itertools.pairwise(edges) if lo < hi
            and ((planted["cos"] >= lo) & (planted["cos"] < hi)).any()}
        if args.exact_queries:
            rng = np.random.default_rng(args.seed + 1)
            # half random rows, half planted rows, so the sample holds pairs to miss
            k = args.exact_queries // 2
            queries = np.unique(np.concatenate([
                rng.choice(args.rows, k, replace=False),
                rng.choice(planted["i"], min(k, len(planted["i"])), replace=False)]))
            t0 = time.perf_counter()
            exact = exact_pairs_of(idx_dir, queries, args.threshold)
            qset = set(queries.tolist())
            approx = {p for p in found if p[0] in qset or p[1] in qset}
            report["exact_sample"] = {
                "queries": len(queries), "exact_pairs": len(exact),
                "found": len(exact & approx), "false": len(approx - exact),
                "recall": round(len(exact & approx) / max(1, len(exact)), 4),
                "seconds": round(time.perf_counter() - t0, 1)}
        if not args.skip_dense:
            n = min(args.rows, dense_rows(args.dense_budget_gb * 2 ** 30, args.dim))
            dense = in_child(step_dense, str(idx_dir), n, args.threshold)
            scale = (args.rows / n) ** 2
            dense["budget_gib"] = args.dense_budget_gb
            dense["extrapolated_matrix_gib_at_rows"] = round(4 * args.rows ** 2 / 2 ** 30)
            dense["extrapolated_seconds_at_rows"] = round(dense["seconds"] * scale)
            report["dense"] = dense
        report["load_after"] = os.getloadavg()
        report["uptime"] = subprocess.run(["uptime"], check=False, capture_output=True,
                                          text=True).stdout.strip()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
