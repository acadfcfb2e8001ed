"""Shared fixtures: an isolated config directory and generated collections with planted copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from mgdedup.synthetic import PlantedCollection, make_collection


@pytest.fixture(autouse=True)
def isolated_config(tmp_path_factory, monkeypatch):
    """Never read or write the developer's ~/.config/mgdedup."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> PlantedCollection:
    """40 images: 30 generated scenes and 10 edited copies (2 per edit), read-only for tests."""
    return make_collection(tmp_path_factory.mktemp("planted"), originals=30, copies_per_edit=2,
                           seed=1)


def family_of(collection: PlantedCollection) -> dict[str, int]:
    """Absolute path -> id of the original it was made from."""
    family = {str(p.resolve()): i for i, p in enumerate(collection.originals)}
    for original, copy, _ in collection.copies:
        family[str(copy.resolve())] = family[str(original.resolve())]
    return family


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".mgdedup"))
    return dst
