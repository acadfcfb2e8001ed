"""Incremental indexing: embed what is new or changed, drop what is gone, keep the rest.

The HDF5 rows are the source of truth and are appended batch by batch, so an interrupted run
keeps its finished batches and the next run continues from there. Files that cannot be read go
to `errors.jsonl` with a reason; they never stop the run. One writer at a time: an update
holds `IDX/lock` (see `mgdedup.index.lock`); readers never wait for it. `faiss.index` is rebuilt
whenever it is stale, so a run killed between its last append and the FAISS save is repaired
by the next run even when nothing is left to embed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mgdedup.distributed.options import RayOptions
from mgdedup.embedding.onnx_cache import PRECISIONS
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import replacing, write_text
from mgdedup.files.names import json_text
from mgdedup.imaging.scan import ScannedFile, scan_images
from mgdedup.index.faiss_index import (
    build_and_save,
    check_factory,
    is_stale,
    resolve_factory,
)
from mgdedup.index.layout import IndexDir, remember_index
from mgdedup.index.lock import IndexLock
from mgdedup.index.store import DamagedIndex, IndexMeta, IndexStore, RowBatch, salvage
from mgdedup.model.facts import ModelFacts, facts_for, remember_facts

if TYPE_CHECKING:  # PyTorch is imported only when something is embedded
    from mgdedup.embedding.results import EmbeddedBatch
    from mgdedup.model.multigrain import MultiGrainModel

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    index_dir: Path
    total: int  # rows in the index after the run
    embedded: int  # new or changed files embedded in this run
    unchanged: int
    removed: int  # rows dropped: files deleted or changed since the last run
    skipped: int  # files that could not be read (listed in errors.jsonl)
    #: (rows kept or None, where the damaged file went) when the index had to be salvaged
    salvaged: tuple[int | None, Path] | None = None

    @property
    def errors_path(self) -> Path:
        return IndexDir(self.index_dir).errors


@dataclass
class ProgressHooks:
    """How the caller hears about progress (the CLI draws a bar; the library stays silent)."""

    start: Callable[[int], None] = lambda total: None
    advance: Callable[[int], None] = lambda count: None
    #: what is happening before the first image is embedded ("scanning", "loading the model")
    status: Callable[[str], None] = lambda text: None


@dataclass(frozen=True)
class Shard:
    """Worker `k` of `n` (1-based, as written on the command line: ``--shard 2/4``).

    A file belongs to the shard picked by a hash of its path relative to its root, so every
    worker decides alone, without talking to the others, and a file keeps its shard when
    files are added or removed (only the new ones are assigned).
    """

    k: int
    n: int

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise MgdedupError(f"--shard {self.k}/{self.n}: K must be between 1 and N")

    @classmethod
    def parse(cls, spec: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if match is None:
            raise MgdedupError(f"--shard {spec!r}: expected K/N, e.g. 2/4 (worker 2 of 4)")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"

    def owns(self, rel: str) -> bool:
        """True if the file at `rel` (relative to its root, ``/``-separated) is ours."""
        return shard_of(rel, self.n) == self.k


def shard_of(rel: str, n: int) -> int:
    """The shard (1..n) of a path relative to its root: blake2b, stable across runs,
    machines and Python versions (unlike ``hash()``)."""
    digest = hashlib.blake2b(rel.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n + 1


def model_meta(model: MultiGrainModel | ModelFacts, model_name: str, resolution: int,
               roots: list[str]) -> IndexMeta:
    """What rows embedded by `model` (or a model with these facts) at `resolution` are;
    needs no Embedder, so a run with nothing to embed never builds one."""
    facts = model if isinstance(model, ModelFacts) else ModelFacts.of(model, resolution)
    return IndexMeta(
        model_id=facts.model_id, model_name=model_name, resolution=resolution, p=facts.p,
        whitening_id=facts.whitening_id, dim=facts.dim, roots=roots,
        threshold=facts.threshold,
    )


def check_compatible(found: IndexMeta, wanted: IndexMeta, index_dir: Path) -> None:
    """Refuse to mix descriptors of different models, resolutions or exponents in one index,
    or the files of different shards."""
    if found.shard != wanted.shard:
        def what(shard: str | None) -> str:
            return f"shard {shard}" if shard else "a whole (unsharded) index"

        raise MgdedupError(f"{index_dir} holds {what(found.shard)}; this run asks for "
                           f"{what(wanted.shard)}: use another --out (or --rebuild)")
    why = found.mismatch(wanted)
    if why is not None:
        raise MgdedupError(
            f"{index_dir} holds descriptors of model {found.model_name} at resolution "
            f"{found.resolution} (p*={found.p:g}); this run asks for {wanted.model_name} at "
            f"{wanted.resolution} (p*={wanted.p:g}), and their {why}: use --rebuild to "
            "replace it or --out for a separate index"
        )


def update_index(roots: Sequence[Path], index_dir: Path, model: MultiGrainModel | None,
                 model_name: str, resolution: int, *, batch_size: int = 16,
                 workers: int | None = None, rebuild: bool = False, device: str = "cpu",
                 progress: ProgressHooks | None = None, shard: Shard | str | None = None,
                 factory: str | None = None, remember: bool | None = None,
                 ray: RayOptions | None = None, precision: str | None = None) -> IndexSummary:
    """Bring the index in `index_dir` up to date with the images below `roots`.

    `remember`: make it the index later commands use by default (`find_index`); None:
    unless every root is a single file (a one-off index must not replace the user's
    collection as the one `dedup` or `undo` finds).

    `shard` ("K/N" or a Shard): embed only this worker's share of the files; the index
    records it, and `mgdedup merge` combines the N shard indexes. `factory`: FAISS factory
    string to build and remember ("auto": back to the automatic choice); None keeps the one
    the index remembers. `model` None: the model `model_name` names, loaded only when
    something is embedded (an index with nothing new is checked against its cached facts,
    `mgdedup.model.facts`, and PyTorch is never imported). `ray`: embed on a Ray cluster
    (`mgdedup.distributed.ray_embedding`) instead of this machine's cores; everything else,
    and the index written, is the same. `precision`: what the trunk computes the rows in,
    "fp32" or "int8" (ONNX Runtime on CPU, models with calibrated ranges: twice as fast,
    the same copy decisions, but classification moves; BENCHMARKS.md); None: an existing
    index's own, fp32 for a new one. Asking an existing index for another one is refused.
    """
    if precision is not None and precision not in PRECISIONS:
        raise MgdedupError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    progress = progress or ProgressHooks()
    index_dir = Path(index_dir).resolve()
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            # checked here too: the Embedder is only built when something needs embedding
            raise MgdedupError(f"--device {device}: no CUDA GPU is available here")
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    if factory is not None:
        # fail fast on a typo, before any scanning
        dim = model.descriptor_dim(resolution) if model is not None else \
            facts_for(model_name, resolution)[0].dim
        factory = check_factory(factory, dim)
    # scan before locking: a missing folder or one without images must not get an index dir
    progress.status("scanning " + ", ".join(str(r) for r in roots))
    files, scan_errors = scan_images([Path(r).expanduser() for r in roots],
                                     skip_dirs=(".mgdedup", index_dir.name),
                                     known=_known_files(IndexDir(index_dir).embeddings, rebuild))
    inside = str(index_dir) + os.sep
    files = [f for f in files if not str(f.path).startswith(inside)]
    if not files:
        where = ", ".join(str(r) for r in roots)
        unreadable = f" ({len(scan_errors)} unreadable files)" if scan_errors else ""
        raise MgdedupError(f"no images found in {where}{unreadable}")
    if shard is not None:  # an empty share is fine: the shard index is then empty
        files = [f for f in files if shard.owns(f.rel)]
        scan_errors = [e for e in scan_errors if _error_shard(e[0], roots, shard.n) == shard.k]
    with IndexLock(index_dir):  # one writer per index; readers never take it
        summary = _update_locked(roots, files, scan_errors, index_dir, model, model_name,
                                 resolution, batch_size=batch_size, workers=workers,
                                 rebuild=rebuild, device=device, progress=progress,
                                 shard=shard, factory=factory, ray=ray, precision=precision)
    if remember is None:
        remember = not all(Path(r).expanduser().is_file() for r in roots)
    if remember:
        remember_index(index_dir)
    return summary


def _load(model_name: str) -> MultiGrainModel:
    from mgdedup.model.registry import load_model

    return load_model(model_name)


def _known_files(h5_path: Path, rebuild: bool) -> dict[tuple[str, str], tuple[int, int]]:
    """(root, rel) -> (size, mtime_ns) of the rows already indexed, so the scan only stats
    them (read without the lock: a snapshot is enough, `_plan` decides under the lock)."""
    if rebuild or not h5_path.is_file():
        return {}
    try:
        with IndexStore.open(h5_path) as store:
            roots = store.meta.roots
            return {(roots[r], rel): (size, mtime) for r, rel, size, mtime in zip(
                store.root_ids().tolist(), store.read("paths").tolist(),
                store.read("size").tolist(), store.read("mtime_ns").tolist())}
    except MgdedupError:
        return {}  # unreadable now: the update under the lock reports it


def _error_shard(path: Path, roots: Sequence[Path], n: int) -> int:
    """The shard reporting an unreadable file: by its path below the root it was found in
    (shard 1 when it lies below none, e.g. a broken symlink given as a root)."""
    for root in roots:
        root = _root_of(Path(root))
        try:
            return shard_of(Path(path).relative_to(root).as_posix(), n)
        except ValueError:
            continue
    return 1


def _update_locked(roots: Sequence[Path], files: list[ScannedFile],
                   scan_errors: list[tuple[Path, str]], index_dir: Path,
                   model: MultiGrainModel, model_name: str, resolution: int, *,
                   batch_size: int, workers: int | None, rebuild: bool, device: str,
                   progress: ProgressHooks, shard: Shard | None = None,
                   factory: str | None = None, ray: RayOptions | None = None,
                   precision: str | None = None) -> IndexSummary:
    layout = IndexDir(index_dir)
    h5_path = layout.embeddings
    if rebuild:
        for path in (layout.embeddings, layout.faiss):
            path.unlink(missing_ok=True)
    scanned_roots = sorted({str(f.root) for f in files} | {str(_root_of(r)) for r in roots})

    shard_spec = str(shard) if shard is not None else None
    salvaged = None
    if h5_path.exists():
        try:
            _open_checked(h5_path).close()
        except DamagedIndex:
            salvaged = salvage(h5_path)
            layout.faiss.unlink(missing_ok=True)
    if model is not None:
        remember_facts(model_name, resolution, ModelFacts.of(model, resolution))
    elif not h5_path.exists():
        progress.status("loading the model")
        model = _load(model_name)  # a new index: there is something to embed
    if h5_path.exists():
        store = IndexStore.open(h5_path, mode="a")
        if model is not None:
            facts = ModelFacts.of(model, resolution)
        else:
            facts, model = facts_for(model_name, resolution)  # model: when it was loaded
        wanted = model_meta(facts, model_name, resolution, store.meta.roots)
        wanted.shard = shard_spec
        wanted.precision = precision or store.meta.precision
        check_compatible(store.meta, wanted, index_dir)
        all_roots = list(store.meta.roots)
        for root in scanned_roots:
            if root not in all_roots:
                all_roots.append(root)
        store.set_roots(all_roots)  # writes nothing when no root is new
    else:
        all_roots = scanned_roots
        meta = model_meta(model, model_name, resolution, all_roots)
        meta.shard = shard_spec
        meta.precision = precision or "fp32"
        store = _create_store(h5_path, meta)
    old_factory = store.meta.factory
    if factory is not None:
        store.set_options(factory=None if factory.lower() == "auto" else factory,
                          shard=shard_spec)

    try:
        to_embed, stale_rows, unchanged = _plan(store, files, set(scanned_roots))
        if stale_rows:
            store.remove_rows(np.array(sorted(stale_rows), dtype=np.int64))
        root_index = {root: i for i, root in enumerate(all_roots)}
        errors = [(str(path), reason) for path, reason in scan_errors]
        embedded = 0
        progress.start(len(to_embed))
        if to_embed and model is None:
            progress.status(f"loading the model for {len(to_embed)} new images")
            model = _load(model_name)
            # the facts came from a cache: the loaded model must agree before rows are added
            loaded = model_meta(model, model_name, resolution, store.meta.roots)
            loaded.shard = shard_spec
            loaded.precision = store.meta.precision
            check_compatible(store.meta, loaded, index_dir)
        embedder = None
        if to_embed and ray is not None:
            from mgdedup.distributed.ray_embedding import RayEmbedding
            from mgdedup.embedding.backend_choice import current_backend

            progress.status(f"starting Ray for {len(to_embed)} new images")
            embedder = RayEmbedding(model_name, resolution, ModelFacts.of(model, resolution),
                                    options=ray, device=device, batch_size=batch_size,
                                    backend=current_backend(),
                                    precision=store.meta.precision)
        elif to_embed:
            from mgdedup.embedding.embedder import Embedder
            from mgdedup.embedding.light import remember_arrays

            embedder = Embedder(model, resolution, device=device, batch_size=batch_size,
                                workers=workers, precision=store.meta.precision)
            remember_arrays(model_name, model, resolution)  # search of new images: light
        batches = embedder.embed_files([f.path for f in to_embed],
                                       on_progress=_embedding_status(progress)) \
            if embedder else []
        for batch in batches:
            errors.extend((str(to_embed[i].path), reason) for i, reason in batch.errors)
            if batch.positions:
                store.append(_rows(batch, to_embed, root_index))
                embedded += len(batch.positions)
        total = len(store)
        _write_errors(layout.errors, errors)
        # also when nothing changed now: a run killed after its last append left it stale
        if stale_rows or embedded or store.meta.factory != old_factory \
                or is_stale(layout.faiss, h5_path):
            kind = resolve_factory(store.meta.factory, total, store.meta.dim)
            log.info("building FAISS index %r over %d rows", kind, total)
            build_and_save(store, kind, layout.faiss)
    finally:
        store.close()
    return IndexSummary(index_dir=index_dir, total=total, embedded=embedded,
                        unchanged=unchanged, removed=len(stale_rows), skipped=len(errors),
                        salvaged=salvaged)


def _embedding_status(progress: ProgressHooks) -> Callable[[int], None]:
    """`progress.advance` that first replaces the status ("loading the model", "starting
    Ray") with "embedding", once the first images are done."""
    started = False

    def advance(count: int) -> None:
        nonlocal started
        if not started:
            progress.status("embedding")
            started = True
        progress.advance(count)

    return advance


def _open_checked(h5_path: Path) -> IndexStore:
    """The index opened for appending, its columns read once: damage anywhere in what a run
    reads raises DamagedIndex here, before anything is written."""
    store = IndexStore.open(h5_path, mode="a")
    try:
        store.absolute_paths()
        for name in ("size", "mtime_ns", "digest"):
            store.read(name)
        if store.interrupted:  # a run died mid-append: write the committed rows afresh
            log.warning("the last run on %s was interrupted while writing; rewriting its "
                        "rows", h5_path)
            store.compact()
    except BaseException:
        store.close()
        raise
    return store


def _create_store(h5_path: Path, meta: IndexMeta) -> IndexStore:
    """A new empty index, created aside and renamed into place: a run killed while creating
    it leaves no half-made file that the next run would refuse as corrupt."""
    with replacing(h5_path, "index file") as tmp:
        IndexStore.create(tmp, meta).close()
    return IndexStore.open(h5_path, mode="a")


def _root_of(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    return path.parent if path.is_file() else path


def _plan(store: IndexStore, files: list[ScannedFile],
          scanned_roots: set[str]) -> tuple[list[ScannedFile], set[int], int]:
    """Which files to embed, which rows are stale (deleted or changed), how many are kept."""
    roots = store.meta.roots
    rels = store.read("paths")
    root_ids = store.root_ids()
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
        phash=np.array(batch.phashes, dtype=np.uint64),
    )


def _write_errors(path: Path, errors: list[tuple[str, str]]) -> None:
    """Rewritten each run: it lists what the index is missing now."""
    write_text(path, "".join(json_text({"path": file_path, "reason": reason}) + "\n"
                             for file_path, reason in errors), "error list")
