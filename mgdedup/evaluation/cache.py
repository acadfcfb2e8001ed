"""Embeddings of benchmark images, computed once per (model, s*, p*) and kept in index format.

One cache is an ordinary index file (mgdedup.index.store, format_version 1) in
``<cache root>/<model fingerprint>-<s*>-p<p*>/embeddings.h5``; the cache root is ``--cache``,
else ``$XDG_CACHE_HOME/mgdedup/eval`` (``~/.cache/mgdedup/eval``). Rows store the *raw* GeM
vector g losslessly in the index columns: ``embeddings`` = l2n(g) (no whitening, so
``whitening_id`` is ``""``) and ``gem_norm`` = ||g||, hence g = embeddings * gem_norm. Every
benchmark then derives from the same rows both the classifier's logits (on g) and the
retrieval descriptors (the model's current whitening applied at read time, so refitting a
whitening never invalidates a cache).

Row identity: ``roots`` holds the folders rows live in (a file's own parent folder) and
``paths`` the name below it; derived images carry a suffix naming the derivation
(``name.jpg#rot90``, ``name.jpg#inaug-500-0-3``: IN-aug copy 3 at size 500, seed 0). A row is
reused while its source file keeps its size and mtime; otherwise the image is embedded again
and the new row, appended last, wins. ``digest`` is the file's blake2b-128 for plain files and
a blake2b-128 of the derived name for derived rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mgdedup.cpus import die_with_parent
from mgdedup.embedding.batching import as_list
from mgdedup.embedding.embedder import Embedder, default_workers
from mgdedup.errors import MgdedupError
from mgdedup.files.user_dirs import cache_dir
from mgdedup.imaging.augment import augmented_copy
from mgdedup.imaging.reading import ImageReadError, open_rgb
from mgdedup.imaging.transforms import resize_for_resolution, to_tensor
from mgdedup.index.layout import IndexDir
from mgdedup.index.store import IndexMeta, IndexStore, RowBatch
from mgdedup.model.multigrain import MultiGrainModel

log = logging.getLogger(__name__)

#: rows appended per write (one short HDF5 open each)
WRITE_ROWS = 256


def default_cache_root() -> Path:
    return cache_dir("eval")


@dataclass(frozen=True)
class Item:
    """One image to embed: a file as it is, or an image derived from it."""

    source: Path  # the file decoded (absolute)
    root: Path  # folder the row is stored under
    rel: str  # name of the row below root ('/'-separated, derived suffix included)
    rotate: int = 0  # degrees, counter-clockwise (PIL Image.rotate), multiple of 90
    copy_size: int = 0  # > 0: an augmented_copy of this size
    copy_seed: int = 0

    @property
    def derived(self) -> bool:
        return bool(self.rotate or self.copy_size)

    @classmethod
    def file(cls, path: Path | str) -> Item:
        path = Path(path).absolute()
        return cls(path, path.parent, path.name)


def render(item: Item, resolution: int) -> torch.Tensor:
    """A derived item -> (3, H, W) tensor through the normal s* pipeline."""
    image, _ = open_rgb(item.source, None)
    if item.rotate:
        image = image.rotate(item.rotate, expand=True)
    if item.copy_size:
        image = augmented_copy(image, item.copy_size, item.copy_seed)
    return to_tensor(resize_for_resolution(image, resolution))


class _Derived(Dataset):
    def __init__(self, items: Sequence[Item], resolution: int) -> None:
        self.items = list(items)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return position, render(self.items[position], self.resolution), ""
        except ImageReadError as error:
            return position, None, str(error)
        except OSError as error:
            return position, None, f"cannot read file: {error.strerror}"


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


class EmbeddingCache:
    """GeM vectors of Items for one (model, s*, p*), from the cache or embedded and added."""

    def __init__(self, model: MultiGrainModel, resolution: int, *, p: float | None = None,
                 cache_root: Path | None = None, device: str = "cpu", batch_size: int = 16,
                 workers: int | None = None) -> None:
        self.model = model
        self.resolution = int(resolution)
        self.p = float(model.p_for(self.resolution) if p is None else p)
        root = Path(cache_root) if cache_root is not None else default_cache_root()
        self.folder = root / f"{model.fingerprint()}-{self.resolution}-p{self.p:g}"
        self.path = IndexDir(self.folder).embeddings
        self.device, self.batch_size = device, batch_size
        self.workers = default_workers() if workers is None else workers
        self.embedded = 0  # images embedded (not found in the cache) by this object

    def _embedder(self) -> Embedder:
        return Embedder(self.model, self.resolution, device=self.device,
                        batch_size=self.batch_size, workers=self.workers, p=self.p)

    def _meta(self, roots: list[str]) -> IndexMeta:
        return IndexMeta(model_id=self.model.fingerprint(), model_name=self.model.info.name,
                         resolution=self.resolution, p=self.p, whitening_id="",
                         dim=self.model.feature_dim, roots=roots)

    def _open(self) -> IndexStore | None:
        if not self.path.is_file():
            return None
        store = IndexStore.open(self.path, "a")
        mismatch = self._meta(store.meta.roots).mismatch(store.meta)
        if mismatch:
            raise MgdedupError(f"evaluation cache {self.path} does not match the model "
                               f"({mismatch}); remove it")
        return store

    def _lookup(self, store: IndexStore | None) -> dict[tuple[str, str], tuple[int, int, int]]:
        """(root, rel) -> (row, size, mtime_ns); the last row of a key wins."""
        if store is None or not len(store):
            return {}
        roots = store.meta.roots
        found = {}
        for row, (r, rel, size, mtime) in enumerate(zip(
                store.root_ids().tolist(), store.read("paths"),
                store.read("size").tolist(), store.read("mtime_ns").tolist())):
            found[(roots[r], str(rel))] = (row, size, mtime)
        return found

    def gem(self, items: Sequence[Item], on_progress: Callable[[int], None] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """((N, C) float32 GeM vectors, (N,) bool readable) for the items, in order.

        Items found in the cache with an unchanged source are read back; the others are
        embedded once and appended. Unreadable images get a zero row and False.
        """
        items = list(items)
        out = np.zeros((len(items), self.model.feature_dim), np.float32)
        ok = np.zeros(len(items), bool)
        store = self._open()
        known = self._lookup(store)
        stats = [_stat(item.source) for item in items]
        hit_rows, hit_positions, missing = [], [], []
        for position, (item, stat) in enumerate(zip(items, stats)):
            entry = known.get((os.path.normpath(str(item.root)), item.rel))
            if entry is not None and entry[1:] == stat:
                hit_rows.append(entry[0])
                hit_positions.append(position)
            else:
                missing.append(position)
        if hit_rows:
            rows = np.array(hit_rows)
            order = np.argsort(rows)
            x = np.asarray(store.read("embeddings", rows[order]), np.float32)  # type: ignore[union-attr]
            norm = np.asarray(store.read("gem_norm", rows[order]), np.float32)  # type: ignore[union-attr]
            target = np.array(hit_positions)[order]
            out[target] = x * norm[:, None]
            ok[target] = True
            if on_progress is not None:
                on_progress(len(hit_rows))
        log.info("evaluation cache %s: %d cached, %d to embed", self.path, len(hit_rows),
                 len(missing))
        if missing:
            store = self._embed_missing(store, items, stats, missing, out, ok, on_progress)
        return out, ok

    def _embed_missing(self, store: IndexStore | None, items: list[Item],
                       stats: list[tuple[int, int]], missing: list[int], out: np.ndarray,
                       ok: np.ndarray, on_progress: Callable[[int], None] | None
                       ) -> IndexStore:
        roots = list(store.meta.roots) if store is not None else []
        for position in missing:
            root = os.path.normpath(str(items[position].root))
            if root not in roots:
                roots.append(root)
        if store is None:
            store = IndexStore.create(self.path, self._meta(roots))
        else:
            store.set_roots(roots)
        root_index = {r: i for i, r in enumerate(roots)}
        embedder = self._embedder()
        pending: list[tuple[int, np.ndarray, str, tuple[int, int]]] = []

        def flush() -> None:
            if not pending:
                return
            positions = [p for p, _, _, _ in pending]
            g = np.stack([v for _, v, _, _ in pending]).astype(np.float32)
            norm = np.linalg.norm(g, axis=1)
            store.append(RowBatch(
                paths=[items[p].rel for p in positions],
                root=np.array([root_index[os.path.normpath(str(items[p].root))]
                               for p in positions]),
                size=np.array([stats[p][0] for p in positions]),
                mtime_ns=np.array([stats[p][1] for p in positions]),
                digest=[d for _, _, d, _ in pending],
                width=np.array([s[0] for _, _, _, s in pending], np.int32),
                height=np.array([s[1] for _, _, _, s in pending], np.int32),
                embeddings=g / np.maximum(norm, 1e-12)[:, None], gem_norm=norm,
                white_norm=np.ones(len(positions), np.float32)))
            pending.clear()

        def keep(position: int, vector: np.ndarray, digest: str, size: tuple[int, int]
                 ) -> None:
            out[position] = vector
            ok[position] = True
            self.embedded += 1
            pending.append((position, vector, digest, size))
            if len(pending) >= WRITE_ROWS:
                flush()

        plain = [p for p in missing if not items[p].derived]
        derived = [p for p in missing if items[p].derived]
        if plain:
            for batch in embedder.embed_files([items[p].source for p in plain], digest=True,
                                              keep_gem=True, on_progress=on_progress):
                for k, i in enumerate(batch.positions):
                    keep(plain[i], batch.gem[k].numpy(), batch.digests[k],  # type: ignore[index]
                         batch.sizes[k])
                for i, reason in batch.errors:
                    log.warning("cannot embed %s: %s", items[plain[i]].source, reason)
        if derived:
            loader = DataLoader(_Derived([items[p] for p in derived], self.resolution),
                                batch_size=self.batch_size, num_workers=self.workers,
                                collate_fn=as_list, worker_init_fn=die_with_parent,
                                prefetch_factor=2 if self.workers else None)
            for batch in loader:
                good = [(i, t) for i, t, _ in batch if t is not None]
                for i, _, reason in batch:
                    if reason:
                        log.warning("cannot embed %s: %s", items[derived[i]].source, reason)
                if good:
                    g = embedder.gem([t for _, t in good]).numpy()
                    for k, (i, t) in enumerate(good):
                        item = items[derived[i]]
                        digest = hashlib.blake2b(item.rel.encode(), digest_size=16).hexdigest()
                        keep(derived[i], g[k], digest, (int(t.shape[2]), int(t.shape[1])))
                if on_progress is not None:
                    on_progress(len(batch))
        flush()
        return store
