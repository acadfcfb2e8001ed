"""Nothing a user has is lost by an action: the same file under two paths, a keeper changed
after indexing, concurrent runs, a run or an undo killed at any moment, a manifest that cannot
be written, a folder swapped for a symlink. Each case reproduces what an adversarial run found.

Trees are compared by content and mtime of every file (`snapshot`): each file must be in
place, or restorable by `undo`, which must then say so truthfully.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error, run
from conftest import content, snapshot

from mgdedup.duplicates.actions.apply import apply_plan
from mgdedup.duplicates.actions.file_ops import copy_verified
from mgdedup.duplicates.actions.kinds import SKIP, Action
from mgdedup.duplicates.actions.plan import plan_actions
from mgdedup.duplicates.actions.undo import latest_manifest, undo
from mgdedup.duplicates.find import find_duplicates
from mgdedup.files.digest import file_digest

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
needs_root = pytest.mark.skipif(not ROOT, reason="mounting (bind, tmpfs) needs root")


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def distinct_contents(root: Path) -> set[str]:
    return {file_digest(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and ".mgdedup" not in p.parts}


# --- 1. one file under two paths --------------------------------------------------------------
def test_hard_links_are_one_file_never_a_pair(lib):
    root, index_dir = lib
    twin = root / "twin.png"
    os.link(root / "a0.png", twin)  # the same file under a second name
    assert run("index", root, "-r", "224", "--workers", "0").exit_code == 0
    result = find_duplicates(index_dir, threshold=0.95)
    pairs = {frozenset((result.facts[g.keeper].path, result.facts[m].path))
             for g in result.groups for m, _ in g.members}
    assert frozenset((str(root / "a0.png"), str(twin))) not in pairs
    for step in plan_actions(index_dir, result, Action.DELETE, permanent=True):
        if {step.source, step.keeper} & {root / "a0.png", twin}:
            assert os.stat(step.source).st_ino != os.stat(step.keeper).st_ino or \
                step.kind == SKIP


@needs_root
def test_a_folder_mounted_twice_loses_nothing(lib, tmp_path):
    """`mount --bind photos mirror`, then a permanent delete at 0.95: every image still has
    its bytes somewhere (before the fix photos/ was emptied)."""
    root, _ = lib
    library = tmp_path / "library"
    (library / "photos").mkdir(parents=True)
    for path in (root / "a0.png", root / "a1.png", root / "a2.png"):
        shutil.copy2(path, library / "photos" / path.name)
    shutil.copy2(root / "a0.png", library / "photos" / "copy-of-a0.png")  # one real copy
    mirror = library / "mirror"
    mirror.mkdir()
    if not _mount("--bind", str(library / "photos"), str(mirror)):
        pytest.skip("bind mounts are not permitted here")
    try:
        before = distinct_contents(library / "photos")
        assert run("index", library, "-r", "224", "--workers", "0").exit_code == 0
        result = run("dedup", "--index", library / ".mgdedup", "--threshold", "0.95",
                     "--action", "delete", "--permanent", "--apply")
        assert result.exit_code == 0, result.output
        assert distinct_contents(library / "photos") == before
        assert len(list((library / "photos").iterdir())) >= 3  # at most the real copy went
    finally:
        _umount(mirror)


# --- 2. a keeper changed after indexing -------------------------------------------------------
def test_a_keeper_changed_after_indexing_protects_its_duplicates(lib):
    root, index_dir = lib
    keeper = root / "a1.png"
    before = {p: file_digest(p) for p in (root / "sub" / "deep" / "a1.png",
                                          root / "small" / "a1.jpg")}
    shutil.copy(root / "a2.png", keeper)  # `cp other.jpg keeper.jpg` after indexing
    dry = run("dedup", "--index", index_dir, "--action", "delete", "--permanent")
    assert dry.exit_code == 0, dry.output
    skipped = [line for line in dry.stdout.splitlines() if " <- skip " in line]
    assert any("a1" in line and "keeper" in line and "changed since indexing" in line
               for line in skipped), dry.stdout
    applied = run("dedup", "--index", index_dir, "--action", "delete", "--permanent", "--apply")
    assert applied.exit_code == 0, applied.output
    for path, digest in before.items():  # the image's only remaining bytes are kept
        if path.exists():
            assert file_digest(path) == digest
    assert any(p.exists() for p in before)


def test_a_keeper_changed_between_plan_and_apply_is_rechecked(lib):
    root, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE, permanent=True)
    victim = next(s for s in steps if s.kind != SKIP)
    shutil.copy(next(p for p in root.glob("a*.png") if p != victim.keeper), victim.keeper)
    report = apply_plan(steps, index_dir)
    assert victim.source.exists()
    assert any(str(victim.source) in m and "keeper" in m for m in report.messages)


# --- 3. copies never remove what they did not create; runs never overlap --------------------
def test_a_copy_never_removes_a_destination_it_did_not_create(tmp_path):
    src, dst = tmp_path / "src.jpg", tmp_path / "dst.jpg"
    src.write_bytes(b"original bytes")
    dst.write_bytes(b"someone else's file")  # appeared meanwhile (another undo, the user)
    with pytest.raises(FileExistsError):
        copy_verified(src, dst)
    assert dst.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.jpg", "src.jpg"]


@needs_root
@pytest.mark.parametrize("trial", range(3))
def test_two_undo_runs_at_once_restore_everything(lib, tmp_path, trial):
    """Moved across filesystems (a tmpfs), then two `undo` processes started together:
    one restores, the other finds the lock or nothing left; every file is back."""
    root, index_dir = lib
    elsewhere = tmp_path / "other-fs"
    elsewhere.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(elsewhere)):
        pytest.skip("tmpfs mounts are not permitted here")
    try:
        before = content(snapshot(root))
        steps = plan_actions(index_dir, find_duplicates(index_dir), Action.MOVE, elsewhere)
        assert apply_plan(steps, index_dir).done == len(steps) > 0
        command = [sys.executable, "-m", "mgdedup", "undo", "--index", str(index_dir)]
        runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
        outputs = [r.communicate(timeout=120) for r in runs]
        assert content(snapshot(root)) == before, outputs
        for process, (_, stderr) in zip(runs, outputs):
            assert "Traceback" not in stderr
            assert process.returncode == 0 or "another mgdedup process" in stderr, stderr
    finally:
        _umount(elsewhere)


def test_a_second_apply_while_one_runs_is_a_one_line_error(lib):
    from mgdedup.index.lock import IndexLock

    _, index_dir = lib
    with IndexLock(index_dir, command="dedup --apply"):
        result = run("dedup", "--index", index_dir, "--action", "delete", "--apply")
    one_line_error(result, "another mgdedup process (mgdedup dedup --apply)")
    assert not (index_dir / "trash").exists()


# --- 4. killed at any moment ------------------------------------------------------------------
APPLY_SCRIPT = textwrap.dedent("""
    import errno, os, sys, time
    from mgdedup.duplicates.actions.apply import apply_plan
    from mgdedup.duplicates.actions.plan import plan_actions
    from mgdedup.duplicates.find import find_duplicates

    index_dir, action, to, cross = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4]
    steps = plan_actions(index_dir, find_duplicates(index_dir), action, to)
    slow = 0.02  # every file-system operation takes a while: kills land between them
    for name in ("rename", "link", "symlink", "unlink", "fsync", "replace"):
        real = getattr(os, name)
        def slowed(*args, _real=real, **kwargs):
            time.sleep(slow)
            return _real(*args, **kwargs)
        setattr(os, name, slowed)
    if cross == "1":  # as if --to or the trash lay on another filesystem
        real_rename = os.rename
        def no_cross(src, dst, *args):
            if "trash" in str(dst) or (to and str(dst).startswith(to)) or \\
                    not str(dst).startswith(os.path.dirname(index_dir)):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real_rename(src, dst, *args)
        os.rename = no_cross
    print("ready", len(steps), flush=True)
    apply_plan(steps, index_dir)
    print("finished", flush=True)
""")

KILL_CASES = [(action, cross) for action, cross in
              (("move", "0"), ("move", "1"), ("delete", "0"), ("delete", "1"),
               ("hardlink", "0"), ("symlink", "0"), ("symlink", "1"))]


@pytest.mark.parametrize("seed", range(20))
def test_apply_killed_at_any_moment_is_undone_completely(lib, tmp_path, seed):
    root, index_dir = lib
    rng = np.random.default_rng(seed)
    action, cross = KILL_CASES[seed % len(KILL_CASES)]
    to = str(tmp_path / "moved") if action == "move" else ""
    before = content(snapshot(root))
    process = subprocess.Popen([sys.executable, "-c", APPLY_SCRIPT, str(index_dir), action, to,
                                cross], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    ready = process.stdout.readline().split()
    assert ready[:1] == ["ready"], process.stderr.read()
    time.sleep(float(rng.uniform(0.0, 0.03 * 6 * int(ready[1]))))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    try:
        manifest = latest_manifest(index_dir)
    except Exception:  # killed before the manifest existed: nothing may have changed
        assert content(snapshot(root)) == before
        return
    report = undo(manifest)
    assert content(snapshot(root)) == before, (action, cross, report.messages)
    assert report.complete and report.failed == 0, report.messages  # and it says so
    assert not [p for p in root.rglob(".*mgdedup-*")]  # no hidden link or copy left
    again = undo(manifest)
    assert again.nothing_left and again.restored == 0


UNDO_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from mgdedup.duplicates.actions.undo import undo
    for name in ("rename", "link", "unlink", "fsync", "utime"):
        real = getattr(os, name)
        def slowed(*args, _real=real, **kwargs):
            time.sleep(0.02)
            return _real(*args, **kwargs)
        setattr(os, name, slowed)
    print("ready", flush=True)
    undo(sys.argv[1])
""")


@pytest.mark.parametrize("seed", range(6))
def test_undo_killed_at_any_moment_is_finished_by_the_next_undo(lib, seed):
    root, index_dir = lib
    action = ("delete", "symlink", "hardlink")[seed % 3]
    before = content(snapshot(root))
    steps = plan_actions(index_dir, find_duplicates(index_dir), action)
    manifest = apply_plan(steps, index_dir).manifest
    process = subprocess.Popen([sys.executable, "-c", UNDO_SCRIPT, str(manifest)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    time.sleep(float(np.random.default_rng(seed).uniform(0.0, 0.03 * 4 * len(steps))))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    report = undo(manifest)
    assert report.complete, report.messages  # never "stored copy missing" for a file back
    assert content(snapshot(root)) == before


# --- 5. a manifest that cannot be written -----------------------------------------------------
def test_no_file_is_touched_when_the_manifest_cannot_be_created(lib):
    root, index_dir = lib
    before = snapshot(root)
    (index_dir / "actions").write_text("a file where the actions folder should be")
    result = run("dedup", "--index", index_dir, "--action", "delete", "--apply")
    one_line_error(result, "cannot record the actions", "nothing was changed")
    assert snapshot(root) == before
    assert not (index_dir / "trash").exists()


def test_a_manifest_that_fails_mid_run_stops_the_run_and_undo_sees_every_step(lib, monkeypatch):
    root, index_dir = lib
    before = content(snapshot(root))
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE)
    from mgdedup.duplicates.actions.manifest import ManifestWriter

    writes = {"count": 0}
    real_write = ManifestWriter._write

    def full_disk(self, entry):  # the 4th line (step 1's intent) cannot be written
        writes["count"] += 1
        if writes["count"] == 4:
            raise OSError(28, "No space left on device")
        return real_write(self, entry)

    monkeypatch.setattr(ManifestWriter, "_write", full_disk)
    report = apply_plan(steps, index_dir)
    monkeypatch.undo()
    assert report.stopped and "No space left on device" in report.stopped
    assert report.done == 1 and len(steps) > 2  # step 0 done, nothing after the failure
    undone = undo(report.manifest)
    assert undone.complete and content(snapshot(root)) == before


# --- 6. undo and a folder swapped for a symlink; bad manifest lines --------------------------
def test_undo_never_restores_through_a_symlinked_folder_out_of_the_roots(lib, tmp_path):
    root, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE)
    report = apply_plan(steps, index_dir)
    deep = root / "sub" / "deep"
    assert any(s.source.parent == deep for s in steps)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(deep)
    deep.symlink_to(outside, target_is_directory=True)  # the folder now leads elsewhere
    undone = undo(report.manifest)
    assert list(outside.iterdir()) == []  # nothing written outside the indexed folders
    assert not undone.complete and undone.skipped >= 1
    assert any("outside the indexed folders" in m for m in undone.messages)
    trash = [s.destination for s in steps if s.source.parent == deep]
    assert all(p.exists() for p in trash)  # the bytes wait in the trash


def test_bad_manifest_lines_are_skipped_with_a_reason_and_the_rest_restored(lib):
    root, index_dir = lib
    before = content(snapshot(root))
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE)
    manifest = apply_plan(steps, index_dir).manifest
    lines = manifest.read_text().splitlines()
    intent = json.loads(lines[1])
    broken = dict(intent, step=99)
    del broken["digest"]
    lines[2:2] = ["5", "[]", json.dumps(broken), '{"step": "x", "state": "intent"}']
    manifest.write_text("\n".join(lines) + "\n")
    result = run("undo", manifest)
    assert result.exit_code == 1 and "Traceback" not in result.output  # honest: 4 lines bad
    assert result.stderr.count("passed over") == 4
    assert content(snapshot(root)) == before  # every real step restored
    assert f"{len(steps)} restored" in result.stderr


def test_undo_after_undo_says_nothing_is_left(lib):
    root, index_dir = lib
    apply_plan(plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE), index_dir)
    assert run("undo", "--index", index_dir).exit_code == 0
    again = run("undo", "--index", index_dir)
    assert again.exit_code == 0 and "nothing left to undo" in again.stderr
