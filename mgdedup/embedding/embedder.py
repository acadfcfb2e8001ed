"""Turning image files into stored descriptors, batch by batch.

Two pipelines, both in DataLoader worker processes and both yielding batches in input order:

- ONNX Runtime on CPU (the default there): each worker decodes an image AND runs the trunk
  and GeM on it with its own single-threaded session, and sends back the C-d GeM vector.
  The cores never wait for each other, and no decoded image crosses a process boundary
  (a 500x375 float tensor is 2.2 MB). On CPU this beat one decoding worker feeding a
  multi-threaded session in the main process (BENCHMARKS.md, embedding throughput).
- PyTorch (CUDA, `--backend torch`, or no ONNX path): workers decode, the main process runs
  the forward pass, overlapping them. At s* > 224 images keep their aspect ratio, so a batch
  holds tensors of several shapes: those of one shape are stacked and run together (no
  padding, which would change the GeM vector), the rest alone.

ONNX Runtime gives descriptors equal to PyTorch's to ~1e-6 (`mgdedup.embedding.onnx_trunk`).
GeM with p* is computed in torch on the feature map either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mgdedup.cpus import available_cpus, die_with_parent
from mgdedup.embedding import onnx_trunk
from mgdedup.embedding.backend_choice import BACKENDS, current_backend, preferred_backend  # noqa: F401
from mgdedup.embedding.batching import as_item, as_list, shape_groups
from mgdedup.embedding.onnx_cache import PRECISIONS
from mgdedup.embedding.onnx_trunk import OnnxTrunk
from mgdedup.embedding.results import EmbeddedBatch
from mgdedup.errors import MgdedupError
from mgdedup.files.digest import file_digest
from mgdedup.imaging.perceptual_hash import UNKNOWN as UNKNOWN_HASH
from mgdedup.imaging.reading import ImageReadError
from mgdedup.imaging.transforms import load_for_index
from mgdedup.model.multigrain import Descriptors, MultiGrainModel, for_inference
from mgdedup.model.pooling import gem as gem_pool

log = logging.getLogger(__name__)


@dataclass
class DecodedImage:
    """One worker result: a tensor ready for the trunk (or, when the worker ran the trunk, the
    image's GeM vector), or the reason it could not be read."""

    position: int
    tensor: Tensor | None
    size: tuple[int, int]  # original (width, height) after EXIF orientation
    digest: str
    error: str | None = None
    # (C,) when computed in the worker: numpy, pickled by value (a torch tensor would travel
    # as one shared-memory segment and file descriptor per image)
    gem: np.ndarray | None = None
    phash: int = int(UNKNOWN_HASH)  # of the whole decoded image

    @property
    def readable(self) -> bool:
        return self.tensor is not None or self.gem is not None


class WorkerForward:
    """Trunk + GeM run inside a DataLoader worker through the worker's own ONNX Runtime
    sessions, built on first use in that process (sessions and their thread pools must not
    cross a fork). If ONNX Runtime fails there, the worker says so once and from then on hands
    the decoded tensors back, for the main process to embed."""

    def __init__(self, onnx: OnnxTrunk, p: float, eps: float, threads: int,
                 max_sessions: int) -> None:
        self.trunk, self.name, self.cache = onnx.trunk, onnx.name, onnx.cache
        self.fingerprint, self.precision = onnx.fingerprint, onnx.precision
        self.p, self.eps = float(p), eps
        self.threads, self.max_sessions = threads, max_sessions
        self._onnx: OnnxTrunk | None = None
        self._failed = False

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_onnx": None}  # spawn: the sessions stay behind

    def __call__(self, item: DecodedImage) -> DecodedImage:
        if self._failed or item.tensor is None:
            return item
        try:
            if self._onnx is None:
                self._onnx = OnnxTrunk(self.trunk, self.name, threads=self.threads,
                                       cache=self.cache, max_sessions=self.max_sessions,
                                       fingerprint=self.fingerprint, precision=self.precision)
            with torch.inference_mode():
                features = self._onnx.forward_features(item.tensor.unsqueeze(0))
                vector = gem_pool(features, self.p, self.eps)[0]
        except Exception as error:  # noqa: BLE001 - ORT errors subclass Exception only
            log.warning("ONNX Runtime failed in a worker process (%s): embedding in the main "
                        "process instead", error)
            self._failed = True
            return item
        item.gem, item.tensor = vector.numpy(), None
        return item


class ImageFiles(Dataset):
    """Decodes files for one test resolution (and, given `forward`, embeds them); never raises
    for a bad file."""

    def __init__(self, paths: Sequence[Path], resolution: int, digest: bool = True,
                 forward: WorkerForward | None = None) -> None:
        self.paths = list(paths)
        self.resolution = resolution
        self.digest = digest
        self.forward = forward

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> DecodedImage:
        path = self.paths[position]
        try:
            tensor, size, hashed = load_for_index(path, self.resolution)
            digest = file_digest(path) if self.digest else ""
        except ImageReadError as error:
            return DecodedImage(position, None, (0, 0), "", str(error))
        except OSError as error:
            return DecodedImage(position, None, (0, 0), "", f"cannot read file: {error.strerror}")
        item = DecodedImage(position, tensor, size, digest, phash=int(hashed))
        return self.forward(item) if self.forward is not None else item


#: most worker processes that each run their own ONNX Runtime sessions (each holds its own
#: weights, ~65 MB a session); on more cores each gets several threads
MAX_FORWARD_WORKERS = 8


def default_workers(forward_in_workers: bool = False) -> int:
    """Worker processes. Decoding only: leave the cores to the forward pass on small machines.
    Decoding and forward pass: one per core (up to MAX_FORWARD_WORKERS)."""
    if forward_in_workers:
        return min(available_cpus(), MAX_FORWARD_WORKERS)
    return max(1, min(4, available_cpus() - 1))



def _onnx_trunk(model: MultiGrainModel, backend: str,
                threads: int | None = None, precision: str = "fp32") -> OnnxTrunk | None:
    """The ONNX Runtime trunk for `backend` on CPU, or None (PyTorch) with the reason logged.
    int8 has no PyTorch path: it is ONNX Runtime or an error."""
    if precision == "int8":
        if backend == "torch":
            raise MgdedupError("int8 rows are computed by ONNX Runtime: --backend torch "
                               "cannot add to this index (rebuild it with --precision fp32)")
        try:
            return OnnxTrunk(model.trunk, model.info.trunk, threads=threads, precision="int8")
        except Exception as error:  # noqa: BLE001 - ORT errors subclass Exception only
            raise MgdedupError(f"this index holds int8 rows, which need ONNX Runtime here "
                               f"({error}); rebuild it with --precision fp32") from None
    if backend == "torch":
        return None
    if not onnx_trunk.supports(model.trunk):
        log_level = logging.WARNING if backend == "onnx" else logging.DEBUG
        log.log(log_level, "no ONNX path for trunk %s: using PyTorch", model.info.trunk)
        return None
    try:
        return OnnxTrunk(model.trunk, model.info.trunk, threads=threads)
    except Exception as error:  # noqa: BLE001 - ORT errors subclass Exception only
        log.warning("ONNX Runtime backend unavailable (%s): using PyTorch", error)
        return None


class Embedder:
    """Model + test resolution + p*: the one place images become descriptors.

    `backend`: "auto" runs the trunk in ONNX Runtime on CPU when it is installed and its graph
    checks out against PyTorch, else in PyTorch; "onnx" asks for ONNX Runtime (PyTorch with a
    warning when it cannot be used); "torch" always PyTorch. CUDA always uses PyTorch.
    `self.backend` says which one runs.
    """

    def __init__(self, model: MultiGrainModel, resolution: int, *, device: str = "cpu",
                 batch_size: int = 16, workers: int | None = None,
                 backend: str = "auto", p: float | None = None,
                 threads: int | None = None, precision: str = "fp32") -> None:
        """`p`: the GeM exponent, default the model's p* at `resolution` (an index or a cache
        passes the p its rows were computed with). `threads`: forward-pass threads in this
        process (default: every available CPU; a cluster actor owning one CPU passes 1).
        `precision`: "fp32", or "int8" (ONNX Runtime on CPU only: an index's rows are all
        of one precision, so int8 never falls back to PyTorch)."""
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise MgdedupError(f"--device {device}: no CUDA GPU is available here")
        if backend not in BACKENDS:
            raise MgdedupError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
        if backend == "auto":
            backend = current_backend()
        self.model = for_inference(model, device)
        self.resolution = int(resolution)
        self.p = float(model.p_for(self.resolution) if p is None else p)
        self.device = torch.device(device)
        self.batch_size = batch_size
        cpus = threads or available_cpus()
        if self.device.type == "cpu" and torch.get_num_threads() > cpus:
            torch.set_num_threads(cpus)  # more threads than cores only thrash
        if precision not in PRECISIONS:
            raise MgdedupError(f"unknown precision '{precision}' (known: "
                               f"{', '.join(PRECISIONS)})")
        if precision == "int8" and self.device.type != "cpu":
            raise MgdedupError(f"int8 rows are computed on the CPU: --device {device} cannot "
                               "add to this index (rebuild it with --precision fp32)")
        self.precision = precision
        self.onnx: OnnxTrunk | None = None
        if self.device.type == "cpu":
            self.onnx = _onnx_trunk(self.model, backend, threads, precision)
        elif backend == "onnx":
            log.warning("--backend onnx is CPU-only: using PyTorch on %s", self.device)
        self.workers = default_workers(self.onnx is not None) if workers is None else workers
        log.debug("embedding backend: %s, %d workers%s", self.backend, self.workers,
                  " (forward pass in the workers)" if self.forward_in_workers else "")

    @property
    def forward_in_workers(self) -> bool:
        """True when the worker processes run the trunk too (ONNX Runtime on CPU)."""
        return self.onnx is not None and self.workers > 0

    @property
    def backend(self) -> str:
        """"onnx" or "torch": the one that runs now."""
        return "onnx" if self.onnx is not None else "torch"

    @torch.inference_mode()
    def gem(self, tensors: Sequence[Tensor]) -> Tensor:
        """List of (3, H, W) tensors of any shapes -> (B, C) GeM vectors in input order."""
        output = torch.empty(len(tensors), self.model.feature_dim)
        for indices in shape_groups([tuple(tensor.shape) for tensor in tensors]):
            batch = torch.stack([tensors[i] for i in indices])
            output[indices] = self._gem_batch(batch).float().cpu()
        return output

    def _gem_batch(self, batch: Tensor) -> Tensor:
        """(B, 3, H, W) of one shape -> (B, C) GeM vectors, by the active backend."""
        if self.onnx is not None:
            try:
                features = self.onnx.forward_features(batch)
            except Exception as error:  # noqa: BLE001 - failed check or ORT error: stop using it
                if self.precision == "int8":
                    raise MgdedupError(f"ONNX Runtime failed ({error}); this index's rows "
                                       "are int8, which PyTorch cannot compute") from None
                log.warning("ONNX Runtime backend failed (%s): using PyTorch", error)
                self.onnx = None
            else:
                return gem_pool(features, self.p, self.model.pool.eps)
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model.gem(batch, self.p)

    def embed_files(self, paths: Sequence[Path], *, digest: bool = True, keep_gem: bool = False,
                    on_progress: Callable[[int], None] | None = None) -> Iterator[EmbeddedBatch]:
        """Yield one EmbeddedBatch per `batch_size` files, in input order."""
        for items in self._decoded_batches(paths, digest):
            good = [item for item in items if item.readable]
            errors = [(item.position, item.error or "unreadable") for item in items
                      if not item.readable]
            gem = None
            if good:
                gem = self._gem_of(good)
                finite = torch.isfinite(gem).all(dim=1)
                if not bool(finite.all()):  # never stored: NaN matches nothing, silently
                    errors += [(item.position, "the model gave values that are not finite "
                                "numbers for this image") for item, ok in
                               zip(good, finite.tolist()) if not ok]
                    good = [item for item, ok in zip(good, finite.tolist()) if ok]
                    gem = gem[finite]
            if good:
                descriptors = self.model.describe(gem, self.resolution)
            else:
                dim = self.model.descriptor_dim(self.resolution)
                descriptors = Descriptors(np.zeros((0, dim), np.float32),
                                          np.zeros(0, np.float32), np.zeros(0, np.float32))
            yield EmbeddedBatch(positions=[item.position for item in good],
                                sizes=[item.size for item in good],
                                digests=[item.digest for item in good],
                                phashes=[item.phash for item in good],
                                descriptors=descriptors, errors=errors,
                                gem=gem if keep_gem and good else None)
            if on_progress is not None:
                on_progress(len(items))

    def _decoded_batches(self, paths: Sequence[Path],
                         digest: bool) -> Iterator[list[DecodedImage]]:
        """Lists of `batch_size` worker results in input order. With the forward pass in the
        workers they hand out single images, so no worker idles at the end of a run while
        another finishes a whole batch."""
        if not self.forward_in_workers:
            loader = DataLoader(ImageFiles(paths, self.resolution, digest),
                                batch_size=self.batch_size, num_workers=self.workers,
                                collate_fn=as_list, worker_init_fn=die_with_parent,
                                prefetch_factor=4 if self.workers else None)
            yield from loader
            return
        assert self.onnx is not None
        threads = max(1, available_cpus() // self.workers)
        forward = WorkerForward(self.onnx, self.p, self.model.pool.eps, threads,
                                max_sessions=max(4, onnx_trunk.MAX_SESSIONS // self.workers))
        loader = DataLoader(ImageFiles(paths, self.resolution, digest, forward), batch_size=None,
                            num_workers=self.workers, collate_fn=as_item,
                            worker_init_fn=die_with_parent,
                            prefetch_factor=max(4, self.batch_size // self.workers))
        items: list[DecodedImage] = []
        for item in loader:
            items.append(item)
            if len(items) == self.batch_size:
                yield items
                items = []
        if items:
            yield items

    def _gem_of(self, items: list[DecodedImage]) -> Tensor:
        """(B, C) GeM vectors of readable items: computed by the workers, or here."""
        output = torch.empty(len(items), self.model.feature_dim)
        pending = [i for i, item in enumerate(items) if item.gem is None]
        for i, item in enumerate(items):
            if item.gem is not None:
                output[i] = torch.from_numpy(item.gem)
        if pending:  # decoded only (PyTorch pipeline, or ONNX Runtime failed in a worker)
            output[pending] = self.gem([items[i].tensor for i in pending])  # type: ignore[misc]
        return output
