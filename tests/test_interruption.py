"""Nothing lost, nothing broken: `index` killed or interrupted at any moment, then re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from cli_helpers import run
from PIL import Image

import mgdedup.index.build
from mgdedup.embedding.embedder import Embedder
from mgdedup.errors import MgdedupError
from mgdedup.index.store import IndexStore

REPO = Path(__file__).resolve().parents[1]



def _noise_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + count):
        path = folder / f"noise_{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _rows(h5: Path) -> int:
    try:
        with IndexStore.open(h5) as store:
            return len(store)
    except (MgdedupError, OSError):
        return 0  # not created yet (or momentarily unreadable): keep polling


def _assert_complete(idx: Path, images: list[Path]) -> None:
    with IndexStore.open(idx / "embeddings.h5") as store:
        paths = store.absolute_paths()
        rows = len(store)
        assert store.embeddings().shape[0] == rows
    assert sorted(paths) == sorted(str(p.resolve()) for p in images)  # each exactly once
    assert rows == len(images)
    index = faiss.read_index(str(idx / "faiss.index"))
    assert index.ntotal == rows
    assert not (idx / "lock").exists()


def _start_index(folder: Path, config: Path) -> subprocess.Popen:
    env = dict(os.environ, XDG_CONFIG_HOME=str(config),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(
        [sys.executable, "-m", "mgdedup", "index", str(folder), "--resolution", "224",
         "--workers", "0", "--batch-size", "4"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_run_then_rerun_gives_every_image_once(tmp_path):
    folder = tmp_path / "images"
    idx = folder / ".mgdedup"
    images = _noise_images(folder, 60)
    for attempt in range(3):  # if a run finishes before we catch it, retry with more images
        proc = _start_index(folder, tmp_path / "config")
        deadline = time.monotonic() + 120
        rows = 0
        while proc.poll() is None and time.monotonic() < deadline:
            rows = _rows(idx / "embeddings.h5")
            if 0 < rows < len(images):
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if 0 < rows < len(images):
                break
            pytest.fail(f"no rows after 120 s; stderr: {proc.stderr.read().decode()}")
        proc.stderr.close()
        assert proc.returncode == 0
        images += _noise_images(folder, 200 * (attempt + 1), start=len(images))
    else:
        pytest.fail("every run finished before it could be killed")
    proc.stderr.close()
    assert (idx / "lock").exists()  # the killed writer's lock is left behind, now stale
    assert 0 < _rows(idx / "embeddings.h5") < len(images)

    result = run("index", folder, "--resolution", "224", "--workers", "0", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "taking over stale index lock" in result.stderr
    _assert_complete(idx, images)


def _interrupt_after_first_batch(monkeypatch):
    original = Embedder.embed_files

    def embed_files(self, paths, **kwargs):
        batches = original(self, paths, **kwargs)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(Embedder, "embed_files", embed_files)


def test_keyboard_interrupt_keeps_finished_batches_and_releases_lock(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    idx = folder / ".mgdedup"
    images = _noise_images(folder, 10)
    with monkeypatch.context() as patch:
        _interrupt_after_first_batch(patch)
        result = run("index", folder, "--resolution", "224", "--workers", "0",
                     "--batch-size", "4")
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], result.stderr
    assert _rows(idx / "embeddings.h5") == 4
    assert not (idx / "lock").exists()

    result = run("index", folder, "--resolution", "224", "--workers", "0", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "6 indexed, 0 skipped; 4 unchanged" in result.stderr
    _assert_complete(idx, images)


def test_stale_faiss_is_rebuilt_when_nothing_is_left_to_embed(tmp_path, monkeypatch):
    """A run killed after its last append but before saving faiss.index."""
    folder = tmp_path / "images"
    idx = folder / ".mgdedup"
    images = _noise_images(folder, 4)
    assert run("index", folder, "--resolution", "224", "--workers", "0").exit_code == 0
    images += _noise_images(folder, 3, start=4)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(mgdedup.index.build, "build_and_save", killed)
        result = run("index", folder, "--resolution", "224", "--workers", "0")
    assert result.exit_code == 130, result.output
    assert _rows(idx / "embeddings.h5") == 7
    assert faiss.read_index(str(idx / "faiss.index")).ntotal == 4  # the old, stale one

    result = run("index", folder, "--resolution", "224", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "0 indexed, 0 skipped; 7 unchanged" in result.stderr
    _assert_complete(idx, images)
    # and a dedup right after sees every row
    result = run("dedup", "--index", idx, "--format", "json")
    assert result.exit_code == 0, result.output
