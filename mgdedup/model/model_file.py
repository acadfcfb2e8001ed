"""Model files: one self-describing file per model, loaded without trusting its contents.

Layout of a model file (a `torch.save` dict, readable with `torch.load(weights_only=True)`):
    format          "mgdedup-model"
    format_version  1
    name, trunk, source     str
    state_dict      trunk weights including its classifier
    training_p      float, GeM exponent the weights were trained with
    p_star          {resolution: p*} measured per test resolution
    class_names     list[str]
    whitenings      {resolution: {"mean", "matrix", "resolution", "p"}}
Foreign checkpoints (torchvision ResNet-50, published MultiGrain) are converted on load.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mgdedup.errors import MgdedupError, first_line
from mgdedup.files.atomic import replacing
from mgdedup.model import validation
from mgdedup.model.multigrain import ModelInfo, MultiGrainModel
from mgdedup.model.trunks import build_trunk
from mgdedup.model.whitening import ANY_RESOLUTION, Whitening

MODEL_FORMAT = "mgdedup-model"
MODEL_FORMAT_VERSION = 1


#: the 1000 ImageNet class names in index order, one per line, copied from torchvision's
#: ResNet50_Weights.IMAGENET1K_V1.meta["categories"] (BSD-3-Clause); importing torchvision only
#: to read them cost ~2 s per command
IMAGENET_CLASSES_FILE = Path(__file__).resolve().parents[1] / "assets" / "imagenet-classes.txt"


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in index order (no torchvision import, no download)."""
    try:
        names = IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise MgdedupError(f"cannot read {IMAGENET_CLASSES_FILE} ({error.strerror}); "
                           "reinstall mgdedup") from None
    if len(names) != 1000:
        raise MgdedupError(f"{IMAGENET_CLASSES_FILE} lists {len(names)} classes, not 1000; "
                           "reinstall mgdedup")
    return names


def load_untrusted(path: Path) -> object:
    """torch.load with weights_only=True: a model file from anywhere cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise MgdedupError(f"model file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise MgdedupError(f"refusing to load {path}: not a plain weights file "
                           f"({first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - any failure means the file is unusable
        raise MgdedupError(f"cannot read model file {path}: {first_line(error)}") from None


def model_to_dict(model: MultiGrainModel) -> dict:
    info = model.info
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "name": info.name,
        "trunk": info.trunk,
        "source": info.source,
        "state_dict": {k: v.detach().cpu() for k, v in model.trunk.state_dict().items()},
        "training_p": float(info.training_p),
        "p_star": {int(k): float(v) for k, v in info.p_star.items()},
        "class_names": list(info.class_names),
        "whitenings": {int(k): w.to_dict() for k, w in model.whitenings.items()},
    }


def save_model(model: MultiGrainModel, path: Path) -> None:
    """Write atomically, so a crash never leaves half a model; a folder that cannot be
    written is a one-line MgdedupError."""
    with replacing(path, "model file") as tmp:
        with open(tmp, "wb") as handle:  # write errors surface as OSError, not RuntimeError
            torch.save(model_to_dict(model), handle)


def model_from_dict(data: dict, origin: str = "model file") -> MultiGrainModel:
    """Rebuild a model from the dict layout above."""
    version = data.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise MgdedupError(f"{origin} has model format version {version}; this mgdedup reads "
                           f"version {MODEL_FORMAT_VERSION}")
    try:
        p_star = data.get("p_star", {})
        names = data.get("class_names", [])
        whitenings = data.get("whitenings", {})
        if not isinstance(p_star, dict) or not isinstance(whitenings, dict) \
                or not isinstance(names, list | tuple):
            raise TypeError("p_star and whitenings must be dicts, class_names a list")
        info = ModelInfo(
            name=str(data["name"]), trunk=str(data["trunk"]), source=str(data.get("source", "")),
            training_p=validation.number(data["training_p"], "training_p", origin,
                                         *validation.P_RANGE),
            p_star={validation.resolution(k, "a p* resolution", origin):
                    validation.number(v, f"p* at {k}", origin, *validation.P_RANGE)
                    for k, v in p_star.items()},
            class_names=[str(c) for c in names],
        )
        trunk = build_trunk(info.trunk)
        state = validation.state_dict(data["state_dict"], trunk.state_dict(), origin)
        trunk.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise MgdedupError(f"{origin} is malformed: {first_line(error)}") from None
    classes = trunk.classifier.out_features
    if len(info.class_names) > classes:  # fewer: the first classes are named (fine-tuning)
        raise MgdedupError(f"{origin}: {len(info.class_names)} class names for a classifier "
                           f"of {classes} classes")
    fitted = {validation.resolution(k, "a whitening resolution", origin):
              Whitening.from_dict(w, trunk.feature_dim, origin) for k, w in whitenings.items()}
    return MultiGrainModel(trunk, info, fitted).eval()


def load_model_file(path: Path) -> MultiGrainModel:
    """Load an mgdedup model file, or convert a torchvision / MultiGrain ResNet-50 checkpoint."""
    path = Path(path)
    data = load_untrusted(path)
    if isinstance(data, dict) and data.get("format") == MODEL_FORMAT:
        return model_from_dict(data, origin=str(path))
    if not isinstance(data, dict):
        raise MgdedupError(f"{path} is not a model file (found a {type(data).__name__})")
    from mgdedup.model.foreign import convert_state_dict

    converted = convert_state_dict(data)
    trunk = build_trunk(converted.trunk_name)
    try:
        trunk.load_state_dict(validation.state_dict(converted.trunk_state, trunk.state_dict(),
                                                    str(path)), strict=True)
    except RuntimeError as error:
        raise MgdedupError(f"{path}: weights do not fit {converted.trunk_name}: "
                           f"{first_line(error)}") from None
    info = ModelInfo(name=path.stem, trunk=converted.trunk_name, training_p=converted.p,
                     class_names=imagenet_class_names(), source=converted.source)
    whitenings = {}
    if converted.whitening_mean is not None and converted.whitening_matrix is not None:
        # The published checkpoints do not say at which resolution they were whitened.
        whitenings[ANY_RESOLUTION] = Whitening(converted.whitening_mean, converted.whitening_matrix,
                                               resolution=ANY_RESOLUTION, p=converted.p)
    return MultiGrainModel(trunk, info, whitenings).eval()
