"""Decoding and embedding on a Ray cluster, for `mgdedup index --engine ray`.

The `index` process (the driver) scans the folders and decides what to embed exactly as the
local path does, under the index's lock. The files to embed become a Ray Dataset of
(position, path) rows; `map_batches` runs it through a fixed pool of model actors, one per
CPU (or GPU), each holding one `Embedder`: the same decoding, ONNX Runtime / PyTorch forward
pass, GeM and whitening as the local path, single-threaded on CPU. Ray restarts an actor whose
process or node died and runs its batches again. Unreadable files are not
failures: they come back as rows with a reason, like the local path's.

The rows stream back to the driver, which appends them to the index as they arrive: a killed
run keeps every appended batch and the next run embeds only the rest, the error list and the
FAISS rebuild are the local path's, and the result is the index a local run writes (the CI
test compares them row by row). A descriptor is 2.5-5 KB, so even a cluster embedding
thousands of images per second sends the driver a few MB/s; the images themselves are read by
the actors, never shipped.

Every node must see the files under the same absolute paths (a shared file system) and run
the same mgdedup and model file: each actor checks that its model's facts (fingerprint, p*,
whitening, dimension) are the index's before embedding anything.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mgdedup.distributed.options import RayOptions
from mgdedup.errors import MgdedupError
from mgdedup.model.facts import ModelFacts

log = logging.getLogger(__name__)

#: the most rows in one Ray block: the dataset is cut into about 4 blocks per actor so that
#: actors finishing early take more, but never blocks so small that scheduling dominates
MAX_BLOCK_ROWS = 4096


class EmbedActor:
    """One model on one CPU (or GPU) of the cluster: (position, path) batches -> rows."""

    def __init__(self, model_name: str, resolution: int, facts: dict[str, Any], *,
                 backend: str, device: str, batch_size: int, threads: int,
                 precision: str = "fp32") -> None:
        import torch

        from mgdedup.embedding.embedder import Embedder
        from mgdedup.model.registry import load_model

        torch.set_num_threads(threads)
        model = load_model(model_name)
        found = asdict(ModelFacts.of(model, resolution))
        differs = [key for key, value in facts.items() if found.get(key) != value]
        if differs:
            raise MgdedupError(
                f"the model {model_name} on {socket.gethostname()} differs from the index's "
                f"({', '.join(differs)}): install the same mgdedup and model on every node")
        self.dim = int(found["dim"])
        self.embedder = Embedder(model, resolution, device=device, batch_size=batch_size,
                                 workers=0, backend=backend, threads=threads,
                                 precision=precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [Path(str(p)) for p in batch["path"].tolist()]
        n = len(paths)
        out: dict[str, np.ndarray] = {
            "position": np.asarray(batch["position"], dtype=np.int64),
            "ok": np.zeros(n, dtype=bool),
            "error": np.full(n, "", dtype=object),
            "width": np.zeros(n, dtype=np.int32),
            "height": np.zeros(n, dtype=np.int32),
            "digest": np.full(n, "", dtype=object),
            "phash": np.zeros(n, dtype=np.uint64),
            "descriptor": np.zeros((n, self.dim), dtype=np.float32),
            "gem_norm": np.zeros(n, dtype=np.float32),
            "white_norm": np.zeros(n, dtype=np.float32),
        }
        for embedded in self.embedder.embed_files(paths):
            for row, i in enumerate(embedded.positions):
                out["ok"][i] = True
                out["width"][i], out["height"][i] = embedded.sizes[row]
                out["digest"][i] = embedded.digests[row]
                out["phash"][i] = embedded.phashes[row]
                out["descriptor"][i] = embedded.descriptors.descriptors[row]
                out["gem_norm"][i] = embedded.descriptors.gem_norm[row]
                out["white_norm"][i] = embedded.descriptors.white_norm[row]
            for i, reason in embedded.errors:
                out["error"][i] = reason
        return out


class RayEmbedding:
    """Embeds files on a Ray cluster; `embed_files` yields what `Embedder.embed_files` does
    (EmbeddedBatch, positions into the given list), in the order the batches finish."""

    def __init__(self, model_name: str, resolution: int, facts: ModelFacts, *,
                 options: RayOptions, device: str = "cpu", batch_size: int = 16,
                 backend: str = "auto", actor_class: type = EmbedActor,
                 precision: str = "fp32") -> None:
        """`actor_class`: EmbedActor or a subclass of it (tests inject worker deaths)."""
        self.model_name, self.resolution, self.facts = model_name, int(resolution), facts
        self.options, self.device = options, device
        self.batch_size, self.backend, self.actor_class = batch_size, backend, actor_class
        self.precision = precision  # the index's: every actor computes its rows in it
        self.actors = 0  # known once connected

    def embed_files(self, paths: Sequence[Path], *,
                    on_progress: Callable[[int], None] | None = None) -> Iterator[Any]:
        started = _connect(self.options.address)
        import ray

        try:
            self.actors = self._actor_count()
            log.info("embedding %d files with %d Ray actors", len(paths), self.actors)
            for out in self._dataset(paths).iter_batches(batch_size=None,
                                                         batch_format="numpy"):
                yield _embedded_batch(out)
                if on_progress is not None:
                    on_progress(len(out["position"]))
        except ray.exceptions.RayError as error:
            raise MgdedupError(f"the Ray run failed: {_root_cause(error)} (the batches "
                               "embedded so far are kept; run the command again to "
                               "continue)") from None
        finally:
            if started:
                ray.shutdown()

    def _actor_count(self) -> int:
        import ray

        resources = ray.cluster_resources()
        if self.device.startswith("cuda"):
            gpus = int(resources.get("GPU", 0))
            if gpus == 0:
                raise MgdedupError(f"--device {self.device}: the Ray cluster has no GPU")
            available = gpus
        else:
            available = max(1, int(resources.get("CPU", 1)))
        if self.options.actors and self.options.actors > available:
            log.warning("--ray-actors %d: the cluster has %d %s now; the other actors wait "
                        "until it grows", self.options.actors, available,
                        "GPUs" if self.device.startswith("cuda") else "CPUs")
        return self.options.actors or available

    def _dataset(self, paths: Sequence[Path]) -> Any:
        import pyarrow as pa
        import ray

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI draws its own bar
        context.print_on_execution_start = False
        context.execution_options.preserve_order = False  # rows are appended as they come
        table = pa.table({"position": np.arange(len(paths), dtype=np.int64),
                          "path": [str(p) for p in paths]})
        rows = max(self.batch_size,
                   min(MAX_BLOCK_ROWS, math.ceil(len(paths) / (4 * self.actors))))
        blocks = [table.slice(start, rows) for start in range(0, len(paths), rows)]
        gpu = self.device.startswith("cuda")
        # Ray Data's fault tolerance: an actor whose process or node died is started again
        # and its batches are run again; an error raised by our code fails the run at once
        return ray.data.from_arrow(blocks).map_batches(
            self.actor_class,
            fn_constructor_kwargs={
                "model_name": self.model_name, "resolution": self.resolution,
                "facts": asdict(self.facts), "backend": self.backend,
                "device": self.device, "batch_size": self.batch_size, "threads": 1,
                "precision": self.precision},
            batch_size=self.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0)


def _connect(address: str | None) -> bool:
    """Join the cluster at `address` (None: Ray's own search, else a new local one); True if
    this call started the connection, which the caller then ends."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and "RAY_AUTH_MODE" not in os.environ and _has_ray_token():
        # a cluster started with `ray start` asks for its token, but Ray only sends one to
        # a named address when told to, before it is imported
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if ray.is_initialized():
        return False
    # Ray's own notices go to its log files, not to the user's terminal: the CLI draws the
    # progress, and failures reach the driver as exceptions (`_root_cause`)
    import ray.data  # noqa: F401 - configures the "ray.data" loggers, quietened below

    for handler in logging.getLogger("ray.data").handlers:  # its console one, not its file
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.ERROR)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise MgdedupError(f"cannot reach the Ray cluster at {address or 'this machine'}: "
                           f"{str(error).splitlines()[0]}") from None
    return True


def _has_ray_token() -> bool:
    """Whether this machine holds a Ray cluster token where Ray looks for one."""
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (
        Path(token_file) if token_file else Path.home() / ".ray" / "auth_token").is_file()


def _embedded_batch(out: dict[str, np.ndarray]) -> Any:
    """One output batch of the actors as the EmbeddedBatch the index writer appends."""
    from mgdedup.embedding.results import EmbeddedBatch
    from mgdedup.model.descriptors import Descriptors

    ok = np.asarray(out["ok"], dtype=bool)
    positions = np.asarray(out["position"], dtype=np.int64)
    errors = [(int(p), str(reason)) for p, reason in zip(positions[~ok], out["error"][~ok])]
    return EmbeddedBatch(
        positions=positions[ok].tolist(),
        sizes=list(zip(out["width"][ok].tolist(), out["height"][ok].tolist())),
        digests=[str(d) for d in out["digest"][ok]],
        phashes=[int(h) for h in out["phash"][ok]],
        descriptors=Descriptors(np.ascontiguousarray(out["descriptor"][ok], np.float32),
                                np.asarray(out["gem_norm"][ok], np.float32),
                                np.asarray(out["white_norm"][ok], np.float32)),
        errors=errors)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost error a Ray failure wraps (an actor's MgdedupError
    reaches the driver inside one or two Ray exceptions)."""
    cause: BaseException = error
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = str(cause).strip().splitlines()
    mine = [line for line in text if "MgdedupError" in line]
    return (mine[-1].split("MgdedupError:", 1)[-1].strip() if mine
            else (text[-1] if text else type(cause).__name__))
