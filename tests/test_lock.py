"""One writer per index: IDX/lock refuses a second `index`, stale locks are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_helpers import run

from mgdedup.errors import MgdedupError
from mgdedup.imaging.synthetic import random_scene
from mgdedup.index.lock import GARBAGE_GRACE_S, IndexLock
from mgdedup.index.store import IndexStore


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        random_scene(rng, size=(96, 72)).save(images / f"{i}.png")
    return images


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid no longer names a process (reuse this fast is unlikely)
    return child.pid


def _index_ok(folder, idx):
    result = run("index", folder, "--out", idx, "--resolution", "224", "--workers", "0")
    assert result.exit_code == 0, result.output
    with IndexStore.open(idx / "embeddings.h5") as store:
        assert len(store) == 3
    assert not (idx / "lock").exists()
    assert [p.name for p in idx.iterdir() if p.name.startswith("lock")] == []
    return result


def test_second_writer_fails_fast_with_one_line(folder, tmp_path):
    idx = tmp_path / "idx"
    with IndexLock(idx) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        started = time.monotonic()
        result = run("index", folder, "--out", idx, "--resolution", "224", "--workers", "0")
        assert time.monotonic() - started < 10
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert f"another mgdedup process (mgdedup index) is writing {idx.resolve()}" in lines[0]
        assert f"pid {os.getpid()} on {socket.gethostname()} since {holder['started']}" \
            in lines[0]
        assert lock.path.exists()  # the refused run leaves the holder's lock alone
        assert not (idx / "embeddings.h5").exists()
    assert not lock.path.exists()
    _index_ok(folder, idx)


def test_readers_do_not_take_the_lock(folder, tmp_path):
    idx = tmp_path / "idx"
    _index_ok(folder, idx)
    with IndexLock(idx):
        result = run("dedup", "--index", idx, "--format", "json")
        assert result.exit_code == 0, result.output
        result = run("search", folder / "0.png", "--index", idx, "--json")
        assert result.exit_code == 0, result.output


def test_lock_of_a_dead_process_is_taken_over(folder, tmp_path, caplog):
    idx = tmp_path / "idx"
    idx.mkdir()
    pid = _dead_pid()
    (idx / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                          "started": "2024-01-01T00:00:00+00:00"}))
    with caplog.at_level("WARNING", logger="mgdedup.index.lock"), IndexLock(idx) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert any(f"pid {pid}" in r.getMessage() and "not running" in r.getMessage()
               for r in caplog.records), caplog.text
    (idx / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                          "started": "2024-01-01T00:00:00+00:00"}))
    _index_ok(folder, idx)  # and through the CLI


def test_lock_of_another_host_is_respected(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "lock").write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.invalid",
                                          "started": "2024-01-01T00:00:00+00:00"}))
    with pytest.raises(MgdedupError, match="on elsewhere.invalid since 2024-01-01"):
        IndexLock(idx).acquire()


@pytest.mark.parametrize("content", [b"", b"garbage\x00\xff", b'{"pid": "x"}', b"[1, 2]",
                                     b'{"pid": 1'])
def test_garbage_lock_is_refused_while_fresh_and_taken_over_when_old(folder, tmp_path,
                                                                      content):
    idx = tmp_path / "idx"
    idx.mkdir()
    lock_file = idx / "lock"
    lock_file.write_bytes(content)
    with pytest.raises(MgdedupError, match="another mgdedup process .*is writing .*unreadable"):
        IndexLock(idx).acquire()
    assert lock_file.read_bytes() == content
    old = time.time() - GARBAGE_GRACE_S - 5
    os.utime(lock_file, (old, old))
    with IndexLock(idx):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()


def test_no_index_folder_left_behind_by_a_failed_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("index", empty, "--resolution", "224", "--workers", "0")
    assert result.exit_code == 1
    assert "no images" in result.stderr
    assert not (empty / ".mgdedup").exists()


def test_lock_is_not_reentrant_and_release_is_idempotent(tmp_path):
    lock = IndexLock(tmp_path / "idx")
    lock.acquire()
    with pytest.raises(MgdedupError, match=f"pid {os.getpid()}"):
        IndexLock(tmp_path / "idx").acquire()
    lock.release()
    lock.release()
    assert not (tmp_path / "idx").exists()
