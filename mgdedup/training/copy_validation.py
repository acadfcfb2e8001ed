"""Held-out copy retrieval: how `train --images` knows whether fine-tuning helps.

Fine-tuning on a folder of unlabelled photos can fit those photos instead of learning an
invariance that carries over (BENCHMARKS.md: the held-out gain peaks and then falls while the
training loss keeps going down). So a tenth of the folder (at most 100 images, chosen by a hash
of the path: adding photos keeps the choice) is held out of training; each held-out image gets
fixed copies (`mgdedup.imaging.edits`: the planted edits and full-augmentation crops) that query
a database of the held-out originals plus up to 200 training images as distractors. The score
is the mAP of those queries (one positive each, so the mean of 1/rank) on whitened descriptors,
the way `index` stores them: the whitening is refitted on the database for every model, as
`train --images` refits it at its end. The trainer evaluates the initial model and every
checkpoint and keeps the best, so a run never ends worse than where it started on images it
did not train on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mgdedup.embedding.batching import shape_groups
from mgdedup.imaging.edits import make_copies
from mgdedup.imaging.reading import ImageReadError, open_rgb
from mgdedup.imaging.transforms import resize_for_resolution
from mgdedup.model.whitening import fit_whitening
from mgdedup.tuning.whiten import DEFAULT_FLOOR_RANK

log = logging.getLogger(__name__)

#: a tenth of the folder is held out, at least MIN_HELD_OUT and at most MAX_HELD_OUT images
HELD_OUT_FRACTION = 0.1
MIN_HELD_OUT = 8
MAX_HELD_OUT = 100
#: folders smaller than this are trained on whole (too few images to hold some out)
MIN_IMAGES_FOR_HOLD_OUT = 40
#: training images that join the database as distractors (and the whitening sample)
DISTRACTORS = 200
AUGMENTED_COPIES = 4
#: a checkpoint whose ImageNet top-1 agrees with the initial model's on fewer held-out images
#: than this is not kept, however well it retrieves copies: classification must survive. At
#: 0.9 a run passed with 0.92 on its held-out tenth and 0.88 on 200 other photos (BENCHMARKS.md)
MIN_AGREEMENT = 0.95
BATCH = 32

#: (B, 3, H, W) float images in [0, 1] -> (GeM vectors, logits)
EmbedFn = Callable[[Tensor], tuple[Tensor, Tensor]]


def hash_order(paths: Sequence[Path], root: Path) -> list[int]:
    """Indices of `paths` sorted by a hash of the path relative to `root`: a fixed, content-
    independent order, so the held-out choice survives moving the folder or adding files."""
    def key(i: int) -> str:
        try:
            name = str(Path(paths[i]).relative_to(root))
        except ValueError:
            name = str(paths[i])
        return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()
    return sorted(range(len(paths)), key=key)


def held_out_count(total: int) -> int:
    """How many of `total` images to hold out (0: too few to spare any)."""
    if total < MIN_IMAGES_FOR_HOLD_OUT:
        return 0
    return min(MAX_HELD_OUT, max(MIN_HELD_OUT, round(total * HELD_OUT_FRACTION)))


def split_held_out(paths: Sequence[Path], root: Path) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) into `paths`, both in the original order."""
    order = hash_order(paths, root)
    held = set(order[:held_out_count(len(paths))])
    return ([i for i in range(len(paths)) if i not in held], sorted(held))


@dataclass
class CopyScore:
    """One model on the held-out copies."""

    map_whitened: float  # what selection uses: whitened descriptors, as `index` stores them
    map_l2n: float  # l2n(g), no whitening
    agreement: float  # top-1 agreement with the reference classes on the held-out originals
    queries: int
    database: int
    top1: list[int] = field(default_factory=list)  # classes of the held-out originals

    def to_dict(self) -> dict[str, float | int]:
        return {"map_whitened": self.map_whitened, "map_l2n": self.map_l2n,
                "agreement": self.agreement, "queries": self.queries, "database": self.database}


def reciprocal_ranks(queries: np.ndarray, owners: np.ndarray, database: np.ndarray
                     ) -> np.ndarray:
    """Per query, 1 / rank of its own database entry (row `owners[q]`) by inner product;
    only strictly more similar entries rank above it, so an exact duplicate of the original
    among the distractors (common in real folders) does not count as a miss."""
    sims = queries @ database.T
    own = sims[np.arange(len(queries)), owners]
    return 1.0 / ((sims > own[:, None]).sum(axis=1) + 1)


def _pixels(image: Image.Image, resolution: int) -> Tensor:
    """The test-protocol input of `image` as uint8 (3, H, W): 4x less memory than float."""
    array = np.asarray(resize_for_resolution(image.convert("RGB"), resolution), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class CopyValidation:
    """Fixed held-out originals, their copies and distractors, prepared once; `score(embed)`
    measures any model on them."""

    def __init__(self, originals: Sequence[Path], distractors: Sequence[Path], resolution: int,
                 seed: int = 0, augmented_copies: int = AUGMENTED_COPIES) -> None:
        self.resolution = int(resolution)
        rng = np.random.default_rng(seed)
        decode_size = (2 * self.resolution, 2 * self.resolution)
        self.originals: list[Tensor] = []
        self.queries: list[Tensor] = []
        owners: list[int] = []
        for path in originals:
            image = self._open(path, decode_size)
            if image is None:
                continue
            owner = len(self.originals)
            self.originals.append(_pixels(image, self.resolution))
            for _, copy in make_copies(image, rng, resolution=self.resolution,
                                       aug_copies=augmented_copies, seed=seed, position=owner):
                self.queries.append(_pixels(copy, self.resolution))
                owners.append(owner)
        self.owners = np.asarray(owners, dtype=np.int64)
        self.distractors = [_pixels(image, self.resolution) for image in
                            (self._open(p, decode_size) for p in distractors) if image is not None]

    @staticmethod
    def _open(path: Path, decode_size: tuple[int, int]) -> Image.Image | None:
        try:
            return open_rgb(path, decode_size)[0]
        except ImageReadError as error:
            log.warning("held-out validation skips %s: %s", path, error)
            return None

    def __len__(self) -> int:
        return len(self.originals)

    def _embed(self, embed: EmbedFn, images: list[Tensor], device: torch.device
               ) -> tuple[Tensor, Tensor]:
        """GeM vectors and logits of uint8 images, batched by shape (s* > 224 keeps aspect)."""
        gs: list[Tensor | None] = [None] * len(images)
        logits: list[Tensor | None] = [None] * len(images)
        for positions in shape_groups([tuple(image.shape) for image in images], BATCH):
            batch = torch.stack([images[i] for i in positions]).to(device).float().div_(255.0)
            g, out = embed(batch)
            for row, i in enumerate(positions):
                gs[i], logits[i] = g[row].float().cpu(), out[row].float().cpu()
        return torch.stack(gs), torch.stack(logits)  # type: ignore[arg-type]

    @torch.no_grad()
    def score(self, embed: EmbedFn, device: torch.device | str = "cpu",
              reference_top1: Sequence[int] | None = None) -> CopyScore:
        """mAP of the copies against originals + distractors, whitened and not, and top-1
        agreement on the originals with `reference_top1` (the initial model's `top1`; 1.0
        without one)."""
        device = torch.device(device)
        g_orig, logits = self._embed(embed, self.originals, device)
        g_query, _ = self._embed(embed, self.queries, device)
        x_orig = F.normalize(g_orig, dim=1).numpy()
        x_query = F.normalize(g_query, dim=1).numpy()
        if self.distractors:
            g_dis, _ = self._embed(embed, self.distractors, device)
            x_db = np.concatenate([x_orig, F.normalize(g_dis, dim=1).numpy()])
        else:
            x_db = x_orig
        whitening = fit_whitening(x_db, resolution=self.resolution, p=1.0,
                                  floor_rank=DEFAULT_FLOOR_RANK)

        def whiten(x: np.ndarray) -> np.ndarray:
            return F.normalize(whitening.apply(torch.from_numpy(x)), dim=1).numpy()

        rr_white = reciprocal_ranks(whiten(x_query), self.owners, whiten(x_db))
        rr_l2n = reciprocal_ranks(x_query, self.owners, x_db)
        top1 = logits.argmax(dim=1)
        agreement = 1.0 if reference_top1 is None else \
            float((top1 == torch.as_tensor(reference_top1)).double().mean())
        return CopyScore(map_whitened=float(rr_white.mean()), map_l2n=float(rr_l2n.mean()),
                         agreement=agreement, queries=len(self.queries), database=len(x_db),
                         top1=[int(v) for v in top1.tolist()])
