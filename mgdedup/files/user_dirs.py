"""Where mgdedup keeps per-user files, following the XDG base directories on every platform.

- config (``$XDG_CONFIG_HOME/mgdedup``, default ``~/.config/mgdedup``): the last index written;
- cache (``$XDG_CACHE_HOME/mgdedup``, default ``~/.cache/mgdedup``): regenerable files, such
  as the ONNX graphs of a model and the embeddings of evaluation images;
- data (``$XDG_DATA_HOME/mgdedup``, default ``~/.local/share/mgdedup``): model files a user
  keeps by name (``weights/NAME.pt``).

Read at call time, so tests and users can point them elsewhere with the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "mgdedup"


def _base(variable: str, default: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / default


def config_dir() -> Path:
    return _base("XDG_CONFIG_HOME", ".config") / APP


def cache_dir(*parts: str) -> Path:
    """The cache folder, or a sub-folder of it (e.g. ``cache_dir("onnx")``)."""
    return _base("XDG_CACHE_HOME", ".cache").joinpath(APP, *parts)


def data_dir(*parts: str) -> Path:
    return _base("XDG_DATA_HOME", ".local/share").joinpath(APP, *parts)
