"""How `index --engine ray` reaches a cluster: parsed and checked without importing Ray, so a
typo or a missing extra is a one-line error before anything is scanned or loaded."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mgdedup.errors import MgdedupError

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class RayOptions:
    """`address`: a running cluster ("auto", "HOST:PORT", "ray://HOST:10001"); None:
    $RAY_ADDRESS, else a cluster started on this machine with `ray start`, else a new
    one-machine cluster for this run. `actors`: model actors (default: one per CPU of the
    cluster, or one per GPU with --device cuda)."""

    address: str | None = None
    actors: int | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise MgdedupError(f"--ray-actors {self.actors}: give at least 1")


def check_engine(engine: str) -> None:
    """Refuse an unknown engine, or Ray when its extra is not installed."""
    if engine not in ENGINES:
        raise MgdedupError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "ray" and (importlib.util.find_spec("ray") is None
                            or importlib.util.find_spec("pyarrow") is None):
        raise MgdedupError("--engine ray needs Ray Data: pip install 'mgdedup[ray]'")
