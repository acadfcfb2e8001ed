"""Training checkpoints: a model file plus what it takes to continue the run exactly.

`last.ckpt` is an ordinary mgdedup model file (mgdedup.model.model_file.model_to_dict layout) with
one more key, "training":
    epoch, iteration (global), epoch_iteration      where to continue
    optimizer, scheduler, scaler                    their state dicts
    margin                                          the margin loss state (learned beta)
    pool                                            GeM state (p, learned or not)
    sampler                                         RepeatedAugmentationSampler.state_dict()
    rng                                             torch / cuda / numpy / python RNG states
    config                                          TrainConfig.to_dict()
So `mgdedup index --model RUN/last.ckpt` works during training, and every value is a tensor or
a plain Python value: the file loads with torch.load(weights_only=True) like any model file.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import replacing
from mgdedup.model.model_file import load_untrusted, model_to_dict
from mgdedup.model.multigrain import MultiGrainModel

log = logging.getLogger(__name__)

TRAINING_KEY = "training"
TRAINING_FORMAT_VERSION = 1


def rng_states() -> dict:
    """All global RNG states as tensors and lists (numpy's tuple would need pickle)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": [int(v) for v in internal],
                   "gauss": None if gauss is None else float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [state.cpu() for state in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]),
                     python_state["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine %d devices: CUDA RNG "
                        "not restored", len(cuda_states), torch.cuda.device_count())


def _cpu(value: object) -> object:
    """State dicts with every tensor moved to the CPU (so the file loads without a GPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def save_checkpoint(path: Path, model: MultiGrainModel, training: dict) -> None:
    """Write model file + training state atomically, so an interruption at any moment leaves
    the previous checkpoint intact."""
    data = model_to_dict(model)
    data[TRAINING_KEY] = {"format_version": TRAINING_FORMAT_VERSION, **_cpu(training)}
    with replacing(path, "checkpoint") as tmp:
        with open(tmp, "wb") as handle:
            torch.save(data, handle)


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model file dict, training state) of a checkpoint, loaded with weights_only=True."""
    data = load_untrusted(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get(TRAINING_KEY), dict):
        raise MgdedupError(f"{path} is not a training checkpoint (no training state); a plain "
                           f"model file can start a run with --init instead")
    training = data[TRAINING_KEY]
    version = training.get("format_version")
    if version != TRAINING_FORMAT_VERSION:
        raise MgdedupError(f"{path} has training state version {version}; this mgdedup reads "
                           f"version {TRAINING_FORMAT_VERSION}")
    return data, training
