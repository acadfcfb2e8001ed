"""How long each command takes to answer, beside the interpreter's own start-up.

Usage: python benchmarks/latency.py [--repeats 5] [--rows 10000] [--photos ../shared/photos]
       [--throughput] [--json out.json]

Every command runs as a user runs it (`python -m mgdedup ...` in a fresh process), `repeats`
times; the median wall time is reported, in the same run as `python -c pass` and
`python -c "import torch"` (the floor, and what a command pays when it imports PyTorch):

- `--help`, `--version`, a usage error (`dedup --threshold 2`), path errors (`classify` of a
  missing file, `index` of a missing folder);
- on a small real index (12 photos of --photos copied to a temporary folder, indexed at
  s* = 224 once): `index` with nothing new, `dedup` (copy score, evidence cached),
  `search` of an indexed photo (its stored row), `search` and `classify` of a photo that is
  not indexed (model loaded, one forward pass);
- `dedup` of a `rows`-row index of random descriptors with planted copies (cosine scores: a
  model without a copy score), whose files exist (empty) so no row is "gone";
- `dedup` of a `rows`-row index as the default model makes them (1280-d rows under the
  12-photo index's model, resolution and whitening, so the copy score applies; random
  descriptors and hashes, empty files), after a first run verified its candidate pairs:
  with every cache in place (a rerun, e.g. `dedup` then `dedup --format json` then
  `--action`), and with the candidates searched again (``candidates.npz`` removed before
  each run: the first `dedup` after the index changed, its pairs verified before).

Commands run with bytecode written (PYTHONDONTWRITEBYTECODE unset), as after a pip install;
each command runs once unmeasured first.

With --throughput, `benchmarks/embed_throughput.py --source PHOTOS` runs too (index rate on
12 MP JPEGs made from the photos, against the decode-only and forward-only limits of the same
run) and its JSON line is included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup_scale import generate  # noqa: E402

from mgdedup.index.store import IndexStore  # noqa: E402


def timed(args: list[str], repeats: int, env: dict[str, str], cwd: Path,
          before: Callable[[], None] | None = None) -> dict:
    seconds, codes = [], set()
    subprocess.run(args, capture_output=True, env=env, cwd=cwd, timeout=600)  # bytecode
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        done = subprocess.run(args, capture_output=True, env=env, cwd=cwd, timeout=600)
        seconds.append(time.perf_counter() - started)
        codes.add(done.returncode)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "exit_codes": sorted(codes)}


def synthetic_index(folder: Path, rows: int) -> Path:
    """A `rows`-row index of random 256-d descriptors with 1 % planted copies (cosine >=
    0.905), its files present as empty files."""
    index_dir = folder / ".mgdedup"
    index_dir.mkdir(parents=True)
    generate(index_dir, rows, 256, 0.01, 0.9, seed=0)
    with IndexStore.open(index_dir / "embeddings.h5", mode="a") as store:
        store.set_roots([str(folder)])
        for path in store.absolute_paths():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch()
    return index_dir


def copy_score_index(folder: Path, rows: int, like: Path) -> Path:
    """A `rows`-row index under the model, resolution and whitening of the index `like`
    (so `dedup` uses the copy score): random 1280-d descriptors with 1 % planted near
    copies, random perceptual hashes, unique digests, its files present as empty files."""
    from mgdedup.index.store import IndexMeta, RowBatch

    with IndexStore.open(like / "embeddings.h5") as store:
        model = store.meta
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, model.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = rows // 100
    picked = rng.choice(rows, 2 * m, replace=False)
    x[picked[m:]] = x[picked[:m]] + 0.3 * rng.standard_normal((m, model.dim), np.float32) \
        / np.sqrt(model.dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index_dir = folder / ".mgdedup"
    index_dir.mkdir(parents=True)
    meta = IndexMeta(model.model_id, model.model_name, model.resolution, model.p,
                     model.whitening_id, model.dim, [str(folder)], threshold=model.threshold)
    ones = np.ones(rows, np.int64)
    paths = [f"d{r // 1000:04d}/img{r:07d}.jpg" for r in range(rows)]
    with IndexStore.create(index_dir / "embeddings.h5", meta) as store:
        store.append(RowBatch(paths=paths, root=0 * ones, size=1000 + rng.integers(0, 10**6, rows),
                              mtime_ns=ones, digest=[f"{r:032x}" for r in range(rows)],
                              width=640 * ones, height=480 * ones, embeddings=x,
                              gem_norm=ones, white_norm=ones,
                              phash=rng.integers(0, 2**63, rows, dtype=np.uint64)))
    for path in paths:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).touch()
    return index_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    py = sys.executable
    mg = [py, "-m", "mgdedup"]
    work = Path(tempfile.mkdtemp(prefix="mgdedup-latency-"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(work / "config")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    report: dict = {"date": date.today().isoformat(), "machine": platform.platform(),
                    "cpus": os.cpu_count(), "repeats": args.repeats, "commands": {}}
    try:
        photos = work / "photos"
        photos.mkdir()
        sources = sorted(p for p in args.photos.rglob("*.jpg")
                         if "tuxpaint" not in p.parts and "lxqt" not in p.parts)
        for n, source in enumerate(sources[:12]):
            shutil.copy(source, photos / f"p{n:02d}.jpg")
        outsider = work / "outsider.jpg"
        shutil.copy(sources[12], outsider)
        subprocess.run([*mg, "index", str(photos), "-r", "224"], check=True, env=env,
                       capture_output=True)
        subprocess.run([*mg, "dedup", "--index", str(photos / ".mgdedup")], check=True,
                       env=env, capture_output=True)  # evidence cached, as a rerun finds it
        big = synthetic_index(work / "synthetic", args.rows)
        copies = copy_score_index(work / "copy-score", args.rows, photos / ".mgdedup")
        subprocess.run([*mg, "dedup", "--index", str(copies)], check=True, env=env,
                       capture_output=True)  # candidates verified once (empty files)
        indexed = str(photos / "p00.jpg")
        commands = {
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import torch'": [py, "-c", "import torch"],
            "--help": [*mg, "--help"],
            "--version": [*mg, "--version"],
            "usage error (dedup --threshold 2)": [*mg, "dedup", "--threshold", "2"],
            "path error (classify missing.jpg)": [*mg, "classify", str(work / "missing.jpg")],
            "path error (index missing/)": [*mg, "index", str(work / "missing")],
            "index, nothing new (12 photos)": [*mg, "index", str(photos), "-r", "224"],
            "dedup (12 photos, copy score, cached evidence)": [
                *mg, "dedup", "--index", str(photos / ".mgdedup")],
            "search an indexed photo": [*mg, "search", indexed, "--index",
                                        str(photos / ".mgdedup"), "-k", "3"],
            "search a new photo": [*mg, "search", str(outsider), "--index",
                                   str(photos / ".mgdedup"), "-k", "3"],
            "classify a new photo": [*mg, "classify", str(outsider)],
            f"dedup ({args.rows:,} rows, cosine, table)": [
                *mg, "dedup", "--index", str(big), "--threshold", "0.9"],
            f"dedup ({args.rows:,} rows, cosine, --format json)": [
                *mg, "dedup", "--index", str(big), "--threshold", "0.9", "--format", "json"],
        }
        copy_dedup = [*mg, "dedup", "--index", str(copies), "--format", "json"]
        commands[f"dedup ({args.rows:,} rows, copy score, cached, --format json)"] = copy_dedup
        commands[f"dedup ({args.rows:,} rows, copy score, candidates searched)"] = copy_dedup
        before = {f"dedup ({args.rows:,} rows, copy score, candidates searched)":
                  lambda: (copies / "candidates.npz").unlink(missing_ok=True)}
        for name, command in commands.items():
            report["commands"][name] = timed(command, args.repeats, env, work, before.get(name))
            print(f"{name:48s} {report['commands'][name]['median_s']:6.3f} s", file=sys.stderr)
        if args.throughput:
            done = subprocess.run([py, str(Path(__file__).with_name("embed_throughput.py")),
                                   "--source", str(args.photos)], capture_output=True,
                                  text=True, env=env)
            lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
            report["throughput"] = json.loads(lines[-1]) if lines else done.stderr[-2000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
