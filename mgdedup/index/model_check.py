"""The model that built an index: queries must be embedded exactly as its rows were."""

from __future__ import annotations

from mgdedup.errors import MgdedupError
from mgdedup.index.store import IndexMeta
from mgdedup.model.multigrain import MultiGrainModel
from mgdedup.model.registry import load_model


def model_for_index(meta: IndexMeta, override: str | None = None) -> MultiGrainModel:
    """Load the index's model (or `override`) and refuse one whose weights or whitening at the
    index's resolution differ from those that computed the stored rows."""
    spec = override if override is not None else meta.model_name
    try:
        model = load_model(spec)
    except MgdedupError as error:
        if override is not None:
            raise
        raise MgdedupError(f"the index was built with model {meta.model_name}, which cannot be "
                           f"loaded now ({error}); pass --model") from None
    whitening = model.whitening_for(meta.resolution)
    whitening_id = whitening.identifier if whitening is not None else ""
    if model.fingerprint() != meta.model_id or whitening_id != meta.whitening_id:
        raise MgdedupError(f"the index was built with another model ({meta.model_name}); "
                           f"{spec} computes different descriptors at resolution "
                           f"{meta.resolution}")
    return model
