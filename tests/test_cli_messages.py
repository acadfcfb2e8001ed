"""What a person reads: one-line usage errors, honest dry runs and undo, an index that
never lists files an action moved, a one-off index that does not replace the remembered one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from cli_helpers import run

from mgdedup.index.layout import find_index


@pytest.mark.parametrize("args, fragment", [
    (("dedup", "--threshold", "2"), "--threshold"),
    (("dedup", "--format", "xml"), "'xml' is not one of"),
    (("search", "x.jpg", "-k", "0"), "-k"),
    (("dedup", "--keep", "biggest"), "--keep"),
    (("nosuch",), "No such command 'nosuch'"),
])
def test_usage_errors_are_one_line_with_exit_code_2(args, fragment):
    done = run(*args)
    assert done.exit_code == 2
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1, done.output
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert "╭" not in done.output and "Usage:" not in done.output
    assert lines[0].endswith("--help)")


def test_apply_without_action_is_a_usage_error(lib):
    _, index_dir = lib
    done = run("dedup", "--index", index_dir, "--apply")
    assert done.exit_code == 2
    assert done.output.strip() == ("error: --apply needs --action move|delete|hardlink|"
                                   "symlink (nothing to apply) (see: mgdedup dedup --help)")


def test_long_messages_are_not_wrapped_when_piped(lib, tmp_path):
    _, index_dir = lib
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("FORCE_COLOR", None)
    done = subprocess.run([sys.executable, "-m", "mgdedup", "dedup", "--index",
                           str(index_dir), "--action", "move", "--to", str(tmp_path / "d")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = [line for line in done.stderr.splitlines() if line.startswith("dry run:")]
    assert len(summary) == 1 and summary[0].endswith("files")
    index_line = [line for line in done.stderr.splitlines() if line.startswith("index: ")]
    assert index_line == [f"index: {index_dir}"]  # longer than 80 columns, one line


def test_after_apply_dedup_never_lists_moved_files_and_undo_twice(lib, tmp_path):
    root, index_dir = lib
    to = tmp_path / "dups"
    applied = run("dedup", "--index", index_dir, "--action", "move", "--to", to, "--apply")
    assert applied.exit_code == 0, applied.output
    moved = {str(p) for p in to.rglob("*") if p.is_file()}
    assert len(moved) == 6
    after = run("dedup", "--index", index_dir, "--format", "json")
    assert json.loads(after.stdout)["groups"] == []
    assert "6 files that an applied action moved away are left out" in after.stderr
    first = run("undo", "--index", index_dir)
    assert first.exit_code == 0 and "6 restored" in first.stderr
    second = run("undo", "--index", index_dir)
    assert second.exit_code == 0
    assert second.stderr.startswith("nothing left to undo: every file of the latest action")
    assert "(6 in place)" in second.stderr
    assert len(json.loads(run("dedup", "--index", index_dir, "--format", "json").stdout
                          )["groups"]) == 3  # back, and grouped again


def test_a_single_file_index_is_not_remembered(lib, tmp_path):
    root, index_dir = lib
    assert run("index", root, "-r", "224", "--workers", "0").exit_code == 0
    assert find_index(cwd=tmp_path) == index_dir.resolve()
    one = tmp_path / "one"
    one.mkdir()
    (one / "x.png").write_bytes((root / "a0.png").read_bytes())
    assert run("index", one / "x.png", "-r", "224", "--workers", "0").exit_code == 0
    assert find_index(cwd=tmp_path) == index_dir.resolve()  # still the collection
    assert run("index", one / "x.png", "-r", "224", "--workers", "0", "--remember"
               ).exit_code == 0
    assert find_index(cwd=tmp_path) == (one / ".mgdedup").resolve()


def test_dry_run_line_names_keeper_reason_and_score(lib, tmp_path):
    root, index_dir = lib
    dry = run("dedup", "--index", index_dir, "--action", "move", "--to", tmp_path / "d")
    pattern = re.compile(rf"^keep {re.escape(str(root))}/a\d\.png \((?P<why>[^)]+)\) <- move "
                         rf"{re.escape(str(root))}/\S+ \(P\(copy\) (?P<p>[01]\.\d{{3}})\) -> "
                         rf"{re.escape(str(tmp_path / 'd'))}/\S+$")
    lines = dry.stdout.splitlines()
    assert len(lines) == 6 and all(pattern.match(line) for line in lines), dry.stdout
    assert "dry run: nothing changed; add --apply to move 6 files" in dry.stderr


def test_demo_keeps_its_sample_and_says_where(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    done = run("demo", "-r", "224")
    assert done.exit_code == 0, done.output
    (sample,) = [p for p in tmp_path.iterdir() if p.name.startswith("mgdedup-demo-")]
    assert (sample / ".mgdedup" / "embeddings.h5").is_file()
    assert len(list((sample / "photos").iterdir())) == 10
    assert re.search(r"found [1-5] of 5 planted copies", done.stderr)
    assert done.stderr.rstrip().endswith(
        f"the sample and its index are in {sample.resolve()}: try `mgdedup review --index "
        f"{sample.resolve() / '.mgdedup'}`, or remove it with: rm -r {sample.resolve()}")
