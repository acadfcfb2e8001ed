"""Files written whole: atomically, with unique temporary names, and a place that cannot be
written is a one-line error from every command that writes one (never a traceback)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error, run

from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import replacing, write_bytes, write_text
from mgdedup.imaging.synthetic import random_scene


def test_replacing_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.pt"]  # the temporary file is gone


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "shared.json"
    names: list[Path] = []
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        try:
            with replacing(target) as tmp:
                names.append(tmp)
                tmp.write_text(str(number) * 1000)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(names)) == 8
    content = target.read_text()
    assert len(content) == 1000 and len(set(content)) == 1  # one writer's file, whole
    assert os.listdir(tmp_path) == ["shared.json"]


def test_write_errors_are_one_line_mgdedup_errors(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(MgdedupError, match=r"cannot write report .*a-file/out.html: "):
        write_text(blocker / "out.html", "<html>", "report")
    folder_in_the_way = tmp_path / "taken"
    folder_in_the_way.mkdir()
    with pytest.raises(MgdedupError, match="cannot write file"):
        write_bytes(folder_in_the_way, b"data")
    assert folder_in_the_way.is_dir() and not list(folder_in_the_way.iterdir())
    assert sorted(os.listdir(tmp_path)) == ["a-file", "taken"]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w") / "photos"
    folder.mkdir()
    for n in range(3):
        random_scene(np.random.default_rng(n), (160, 120)).save(folder / f"{n}.png")
    assert run("index", folder, "-r", "64", "--workers", "0").exit_code == 0
    return folder


def test_commands_writing_to_an_impossible_place_say_so_in_one_line(small_index, tmp_path,
                                                                    monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    index = small_index / ".mgdedup"
    one_line_error(run("dedup", "--index", index, "--format", "html", "--out",
                       blocker / "report.html"), "cannot write report")
    one_line_error(run("dedup", "--index", index, "--format", "json", "--out",
                       blocker / "groups.json"), "cannot write report")
    one_line_error(run("whiten", small_index, "-r", "64", "--out", blocker / "model.pt",
                       "--workers", "0", "--calibration-images", "0"),
                   "cannot write model file")
    real_replace = os.replace

    def disk_full(source, destination):
        if Path(destination).name == "decisions.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", disk_full)
    line = one_line_error(run("mark", "not-duplicate", small_index / "0.png",
                              small_index / "1.png", "--index", index),
                          "cannot write decisions", "No space left on device")
    assert "decisions.json" in line and not (index / "decisions.json").exists()
    assert not [name for name in os.listdir(index) if name.endswith(".tmp")]
