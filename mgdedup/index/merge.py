"""Combining shard indexes (``mgdedup index --shard K/N``) into one index: ``mgdedup merge``.

Any job scheduler can run the N workers of one collection, each writing its own index folder;
this module checks they are compatible and writes the union as one ordinary index.

Rules, decided once for every merge:
- The inputs must agree on what the rows mean: model fingerprint, resolution, p*, whitening
  and dimension, and index the same root folders. Anything else is refused with one line:
  descriptors of different models cannot be compared.
- Shards must all be of the same N and each K may appear once. Missing shards are allowed
  (the merged index simply lacks their files; a later plain `mgdedup index` of the folder
  embeds just those) and reported. Whole (unsharded) indexes of the same folders may be
  merged too.
- A file (same root, same relative path) in several inputs is kept once: the row with the
  newer file modification time, on a tie the input named later. Hash-based shard assignment
  never produces such duplicates, so they only come from overlapping inputs; their count is
  reported.
- The result is written aside (a temporary file beside it) and renamed into place, so a killed
  merge leaves no half-written index; an existing index at the destination is only replaced
  with ``overwrite``. Then ``faiss.index`` is built (the inputs' common factory, or automatic)
  and the folder is remembered as the last index, as `mgdedup index` does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import replacing, write_text
from mgdedup.index.faiss_index import build_and_save, check_factory, resolve_factory
from mgdedup.index.layout import IndexDir, find_index, remember_index
from mgdedup.index.lock import IndexLock
from mgdedup.index.store import IndexMeta, IndexStore

log = logging.getLogger(__name__)

COPY_ROWS = 32768


@dataclass
class MergeSummary:
    index_dir: Path
    total: int  # rows in the merged index
    inputs: int
    duplicates: int = 0  # rows dropped because a newer row of the same file was kept
    missing_shards: list[str] = field(default_factory=list)  # "K/N" not among the inputs
    factory: str = "Flat"


def merge_indexes(sources: Sequence[Path], out_dir: Path, *, factory: str | None = None,
                  overwrite: bool = False,
                  progress: Callable[[int], None] | None = None) -> MergeSummary:
    """Write the union of the indexes `sources` (folders or embeddings.h5 files) to
    `out_dir`. `factory`: FAISS factory of the result (default: the inputs' common one, else
    automatic). `progress(rows)` after each copied block."""
    if not sources:
        raise MgdedupError("give the shard indexes to merge")
    dirs = [find_index(Path(s)) for s in sources]
    out_dir = Path(out_dir).expanduser().resolve()
    for i, d in enumerate(dirs):
        if d == out_dir:
            raise MgdedupError(f"--out {out_dir} is one of the inputs; merge into another "
                               "folder")
        if d in dirs[:i]:
            raise MgdedupError(f"{d} is given twice")
    stores = [IndexDir(d).open_store() for d in dirs]
    try:
        metas = [s.meta for s in stores]
        missing = _check_inputs(dirs, metas)
        meta = metas[0]
        if factory is not None:
            factory = check_factory(factory, meta.dim)
            chosen = None if factory.lower() == "auto" else factory
        else:
            factories = {m.factory for m in metas}
            chosen = factories.pop() if len(factories) == 1 else None
        keep = _rows_to_keep(stores)
        duplicates = sum(int((~k).sum()) for k in keep)
        layout = IndexDir(out_dir)
        target = layout.embeddings
        if target.exists() and not overwrite:
            raise MgdedupError(f"{out_dir} already holds an index; pass --overwrite to "
                               "replace it, or choose another --out")
        out_meta = IndexMeta(model_id=meta.model_id, model_name=meta.model_name,
                             resolution=meta.resolution, p=meta.p,
                             whitening_id=meta.whitening_id, dim=meta.dim,
                             roots=list(meta.roots), threshold=meta.threshold, factory=chosen,
                             precision=meta.precision)
        with IndexLock(out_dir):
            total = _write(stores, keep, out_meta, target, progress)
            _merge_errors(dirs, layout.errors)
            kind = resolve_factory(chosen, total, meta.dim)
            layout.faiss.unlink(missing_ok=True)
            with IndexStore.open(target) as merged:
                build_and_save(merged, kind, layout.faiss)
    finally:
        for s in stores:
            s.close()
    remember_index(out_dir)
    log.info("merged %d indexes into %s: %d rows, %d duplicates dropped", len(dirs), out_dir,
             total, duplicates)
    return MergeSummary(index_dir=out_dir, total=total, inputs=len(dirs),
                        duplicates=duplicates, missing_shards=missing, factory=kind)


def _check_inputs(dirs: list[Path], metas: list[IndexMeta]) -> list[str]:
    """Refuse incompatible inputs (one line each); return the shards not given."""
    first = metas[0]
    for d, m in zip(dirs[1:], metas[1:]):
        why = first.mismatch(m)
        if why is not None:
            raise MgdedupError(f"cannot merge {dirs[0]} and {d}: {why}; they were indexed "
                               "with different models or settings")
        if set(m.roots) != set(first.roots):
            raise MgdedupError(f"cannot merge {dirs[0]} and {d}: they index different "
                               f"folders ({', '.join(first.roots)} vs {', '.join(m.roots)})")
    shards: dict[str, Path] = {}
    counts = set()
    for d, m in zip(dirs, metas):
        if m.shard is None:
            continue
        if m.shard in shards:
            raise MgdedupError(f"shard {m.shard} is given twice ({shards[m.shard]} and {d})")
        shards[m.shard] = d
        counts.add(int(m.shard.split("/")[1]))
    if len(counts) > 1:
        raise MgdedupError(f"the shards split the files in different ways (N = "
                           f"{', '.join(str(n) for n in sorted(counts))}); merge shards of one "
                           "`--shard K/N` run")
    if not counts:
        return []
    n = counts.pop()
    return [f"{k}/{n}" for k in range(1, n + 1) if f"{k}/{n}" not in shards]


def _rows_to_keep(stores: list[IndexStore]) -> list[np.ndarray]:
    """Per input, a mask of the rows to copy: one row per (root, path), the newest file."""
    best: dict[tuple[str, str], tuple[int, int, int]] = {}  # key -> (mtime, input, row)
    keep = [np.ones(len(s), dtype=bool) for s in stores]
    for k, store in enumerate(stores):
        roots = store.meta.roots
        mtimes = store.read("mtime_ns").tolist()
        for row, (r, rel) in enumerate(zip(store.root_ids().tolist(), store.read("paths"))):
            key = (roots[r], rel)
            seen = best.get(key)
            if seen is None:
                best[key] = (mtimes[row], k, row)
            elif mtimes[row] >= seen[0]:  # newer, or as new and named later: this one wins
                keep[seen[1]][seen[2]] = False
                best[key] = (mtimes[row], k, row)
            else:
                keep[k][row] = False
    return keep


def _write(stores: list[IndexStore], keep: list[np.ndarray], meta: IndexMeta, target: Path,
           progress: Callable[[int], None] | None) -> int:
    """Copy the kept rows block by block into a file beside `target`, then rename it."""
    position = {root: i for i, root in enumerate(meta.roots)}
    with replacing(target, "index file") as tmp:
        out = IndexStore.create(tmp, meta)
        try:
            for store, mask in zip(stores, keep):
                remap = np.array([position[r] for r in store.meta.roots], dtype=np.int32)
                for start in range(0, len(store), COPY_ROWS):
                    part = mask[start:start + COPY_ROWS]
                    if not part.any():
                        continue
                    batch = store.batch(start, start + len(part)).select(part)
                    batch.root = remap[batch.root]
                    out.append(batch)
                    if progress:
                        progress(len(out))
            total = len(out)
        finally:
            out.close()
    return total


def _merge_errors(dirs: list[Path], path: Path) -> None:
    """The inputs' unreadable files, so the merged index still lists what it is missing."""
    lines: list[str] = []
    for d in dirs:
        try:
            text = IndexDir(d).errors.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except OSError as error:
            raise MgdedupError(f"cannot read {IndexDir(d).errors}: {error.strerror}") from None
        for line in text.splitlines():
            try:
                json.loads(line)
            except ValueError:
                continue
            lines.append(line)
    write_text(path, "".join(line + "\n" for line in lines), "error list")
