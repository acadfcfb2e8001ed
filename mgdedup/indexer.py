"""Incremental indexing: embed what is new or changed, drop what is gone, keep the rest.

The HDF5 rows are the source of truth and are appended batch by batch, so an interrupted run
keeps its finished batches and the next run continues from there. Files that cannot be read go
to `errors.jsonl` with a reason; they never stop the run. One writer at a time: an update
holds `IDX/lock` (see `mgdedup.lock`); readers never wait for it. `faiss.index` is rebuilt
whenever it is stale, so a run killed between its last append and the FAISS save is repaired
by the next run even when nothing is left to embed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgdedup.embed import EmbeddedBatch, Embedder
from mgdedup.errors import MgdedupError
from mgdedup.locate import ERRORS_NAME, FAISS_NAME, H5_NAME, remember_index
from mgdedup.lock import IndexLock
from mgdedup.model import MultiGrainModel
from mgdedup.scan import ScannedFile, scan_images
from mgdedup.search import build_index, is_stale, save_index
from mgdedup.store import IndexMeta, IndexStore, RowBatch

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    index_dir: Path
    total: int  # rows in the index after the run
    embedded: int  # new or changed files embedded in this run
    unchanged: int
    removed: int  # rows dropped: files deleted or changed since the last run
    skipped: int  # files that could not be read (listed in errors.jsonl)

    @property
    def errors_path(self) -> Path:
        return self.index_dir / ERRORS_NAME


@dataclass
class ProgressHooks:
    """How the caller hears about progress (the CLI draws a bar; the library stays silent)."""

    start: Callable[[int], None] = lambda total: None
    advance: Callable[[int], None] = lambda count: None


def expected_meta(embedder: Embedder, model_name: str, roots: list[str]) -> IndexMeta:
    whitening = embedder.model.whitening_for(embedder.resolution)
    return IndexMeta(
        model_id=embedder.model.fingerprint(), model_name=model_name,
        resolution=embedder.resolution, p=float(embedder.p),
        whitening_id=whitening.identifier if whitening is not None else "",
        dim=embedder.model.descriptor_dim(embedder.resolution), roots=roots,
        threshold=embedder.model.default_threshold(embedder.resolution),
    )


def check_compatible(found: IndexMeta, wanted: IndexMeta, index_dir: Path) -> None:
    """Refuse to mix descriptors of different models, resolutions or exponents in one index."""
    if found.mismatch(wanted) is not None:
        raise MgdedupError(
            f"{index_dir} holds descriptors of model {found.model_name} at resolution "
            f"{found.resolution} (p*={found.p:g}); this run asks for {wanted.model_name} at "
            f"{wanted.resolution} (p*={wanted.p:g}): use --rebuild to replace it or --out for "
            "a separate index"
        )


def update_index(roots: Sequence[Path], index_dir: Path, model: MultiGrainModel,
                 model_name: str, resolution: int, *, batch_size: int = 16,
                 workers: int | None = None, rebuild: bool = False, device: str = "cpu",
                 progress: ProgressHooks | None = None) -> IndexSummary:
    """Bring the index in `index_dir` up to date with the images below `roots`."""
    progress = progress or ProgressHooks()
    index_dir = Path(index_dir).resolve()
    # scan before locking: a missing folder or one without images must not get an index dir
    files, scan_errors = scan_images([Path(r).expanduser() for r in roots],
                                     skip_dirs=(".mgdedup", index_dir.name))
    files = [f for f in files if index_dir not in f.path.parents]
    if not files:
        where = ", ".join(str(r) for r in roots)
        unreadable = f" ({len(scan_errors)} unreadable files)" if scan_errors else ""
        raise MgdedupError(f"no images found in {where}{unreadable}")
    with IndexLock(index_dir):  # one writer per index; readers never take it
        summary = _update_locked(roots, files, scan_errors, index_dir, model, model_name,
                                 resolution, batch_size=batch_size, workers=workers,
                                 rebuild=rebuild, device=device, progress=progress)
    remember_index(index_dir)
    return summary


def _update_locked(roots: Sequence[Path], files: list[ScannedFile],
                   scan_errors: list[tuple[Path, str]], index_dir: Path,
                   model: MultiGrainModel, model_name: str, resolution: int, *,
                   batch_size: int, workers: int | None, rebuild: bool, device: str,
                   progress: ProgressHooks) -> IndexSummary:
    embedder = Embedder(model, resolution, device=device, batch_size=batch_size, workers=workers)
    h5_path = index_dir / H5_NAME
    if rebuild:
        for name in (H5_NAME, FAISS_NAME):
            (index_dir / name).unlink(missing_ok=True)
    scanned_roots = sorted({str(f.root) for f in files} | {str(_root_of(r)) for r in roots})

    if h5_path.exists():
        store = IndexStore.open(h5_path, mode="a")
        check_compatible(store.meta, expected_meta(embedder, model_name, store.meta.roots),
                         index_dir)
        all_roots = list(store.meta.roots)
        for root in scanned_roots:
            if root not in all_roots:
                all_roots.append(root)
        store.set_roots(all_roots)
    else:
        all_roots = scanned_roots
        store = _create_store(h5_path, expected_meta(embedder, model_name, all_roots))

    try:
        to_embed, stale_rows, unchanged = _plan(store, files, set(scanned_roots))
        if stale_rows:
            store.remove_rows(np.array(sorted(stale_rows), dtype=np.int64))
        root_index = {root: i for i, root in enumerate(all_roots)}
        errors = [(str(path), reason) for path, reason in scan_errors]
        embedded = 0
        progress.start(len(to_embed))
        for batch in embedder.embed_files([f.path for f in to_embed],
                                          on_progress=progress.advance):
            errors.extend((str(to_embed[i].path), reason) for i, reason in batch.errors)
            if batch.positions:
                store.append(_rows(batch, to_embed, root_index))
                embedded += len(batch.positions)
        total = len(store)
        _write_errors(index_dir / ERRORS_NAME, errors)
        # also when nothing changed now: a run killed after its last append left it stale
        if stale_rows or embedded or is_stale(index_dir / FAISS_NAME, h5_path):
            save_index(build_index(store, store.meta.dim), index_dir / FAISS_NAME)
    finally:
        store.close()
    return IndexSummary(index_dir=index_dir, total=total, embedded=embedded,
                        unchanged=unchanged, removed=len(stale_rows), skipped=len(errors))


def _create_store(h5_path: Path, meta: IndexMeta) -> IndexStore:
    """A new empty index, created aside and renamed into place: a run killed while creating
    it leaves no half-made file that the next run would refuse as corrupt."""
    tmp = h5_path.with_name(h5_path.name + ".new")
    tmp.unlink(missing_ok=True)  # left by a killed run; we hold the lock
    IndexStore.create(tmp, meta).close()
    os.replace(tmp, h5_path)
    return IndexStore.open(h5_path, mode="a")


def _root_of(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    return path.parent if path.is_file() else path


def _plan(store: IndexStore, files: list[ScannedFile],
          scanned_roots: set[str]) -> tuple[list[ScannedFile], set[int], int]:
    """Which files to embed, which rows are stale (deleted or changed), how many are kept."""
    roots = store.meta.roots
    rels = store.read("paths")
    root_ids = store.read("root")
    sizes = store.read("size")
    mtimes = store.read("mtime_ns")
    existing = {(roots[r], rel): i for i, (r, rel) in enumerate(zip(root_ids, rels))}
    to_embed: list[ScannedFile] = []
    stale: set[int] = set()
    seen: set[int] = set()
    for scanned in files:
        row = existing.get((str(scanned.root), scanned.rel))
        if row is None:
            to_embed.append(scanned)
            continue
        seen.add(row)
        if int(sizes[row]) != scanned.size or int(mtimes[row]) != scanned.mtime_ns:
            stale.add(row)
            to_embed.append(scanned)
    for (root, _), row in existing.items():
        if root in scanned_roots and row not in seen:
            stale.add(row)  # under a scanned root but gone (or no longer an image)
    unchanged = len(seen) - len(stale & seen)
    return to_embed, stale, unchanged


def _rows(batch: EmbeddedBatch, files: list[ScannedFile], root_index: dict[str, int]) -> RowBatch:
    chosen = [files[i] for i in batch.positions]
    d = batch.descriptors
    return RowBatch(
        paths=[f.rel for f in chosen],
        root=np.array([root_index[str(f.root)] for f in chosen], dtype=np.int32),
        size=np.array([f.size for f in chosen], dtype=np.int64),
        mtime_ns=np.array([f.mtime_ns for f in chosen], dtype=np.int64),
        digest=list(batch.digests),
        width=np.array([w for w, _ in batch.sizes], dtype=np.int32),
        height=np.array([h for _, h in batch.sizes], dtype=np.int32),
        embeddings=d.descriptors, gem_norm=d.gem_norm, white_norm=d.white_norm,
    )


def _write_errors(path: Path, errors: list[tuple[str, str]]) -> None:
    """Rewritten each run: it lists what the index is missing now."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for file_path, reason in errors:
            handle.write(json.dumps({"path": file_path, "reason": reason}, ensure_ascii=False))
            handle.write("\n")
    os.replace(tmp, path)

