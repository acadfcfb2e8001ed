"""Actions on duplicates never lose a file: dry runs change nothing, undo restores everything."""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ORIGINALS, content, snapshot

from mgdedup.duplicates.actions.apply import apply_plan
from mgdedup.duplicates.actions.kinds import SKIP, Action
from mgdedup.duplicates.actions.manifest import read_manifest
from mgdedup.duplicates.actions.plan import describe_plan, plan_actions
from mgdedup.duplicates.actions.undo import latest_manifest, undo
from mgdedup.duplicates.find import DedupResult, find_duplicates
from mgdedup.errors import MgdedupError
from mgdedup.files.digest import file_digest


def keepers_of(result: DedupResult) -> list[Path]:
    return [Path(result.facts[g.keeper].path) for g in result.groups]


def test_index_has_groups(lib):
    root, index_dir = lib
    result = find_duplicates(index_dir)
    assert sorted(p.name for p in keepers_of(result)) == [f"a{i}.png" for i in range(ORIGINALS)]
    assert all(p.parent == root for p in keepers_of(result))
    assert result.duplicate_count >= ORIGINALS  # at least the exact copies


@pytest.mark.parametrize("action", list(Action))
def test_dry_run_changes_nothing(lib, tmp_path, action):
    root, index_dir = lib
    before = snapshot(root)
    to = tmp_path / "out" if action is Action.MOVE else None
    steps = plan_actions(index_dir, find_duplicates(index_dir), action, to)
    lines = describe_plan(steps)
    # "keep K (why) <- ACTION A (P(copy) s) ...": the keeper, the action, the duplicate
    assert len(lines) == len(steps)
    for line, step in zip(lines, steps):
        assert line.startswith(f"keep {step.keeper} (")
        verb = "skip" if step.kind == SKIP else action.value
        assert f" <- {verb} {step.source} (P(copy) {step.score:.3f})" in line
    assert snapshot(root) == before
    assert not (tmp_path / "out").exists() and not (index_dir / "trash").exists()


def test_move_keeps_structure_and_keepers(lib, tmp_path):
    root, index_dir = lib
    result = find_duplicates(index_dir)
    keepers = {p: file_digest(p) for p in keepers_of(result)}
    out = tmp_path / "out"
    steps = plan_actions(index_dir, result, Action.MOVE, out)
    assert steps and all(s.kind == "move" for s in steps)
    assert not {s.source for s in steps} & set(keepers)
    report = apply_plan(steps, index_dir)
    assert (report.done, report.skipped, report.failed) == (len(steps), 0, 0)
    for step in steps:
        assert step.destination == out / step.source.relative_to(root)
        assert not step.source.exists() and file_digest(step.destination) == step.digest
        assert step.destination.stat().st_mtime_ns == step.mtime_ns
    assert {p: file_digest(p) for p in keepers} == keepers
    lines = [json.loads(line) for line in report.manifest.read_text().splitlines()]
    assert lines[0]["manifest"] == "mgdedup-actions" and lines[0]["version"] == 2
    assert lines[0]["roots"] == [str(root.resolve())]
    # per step: its intent (every path it will create) before it starts, then its outcome
    assert [(line["step"], line["state"]) for line in lines[1:]] == \
        [(n, state) for n in range(len(steps)) for state in ("intent", "done")]
    intent = lines[1]
    assert set(intent) == {"step", "state", "op", "source", "stored", "link", "tmp_link",
                           "keeper", "digest", "size", "mtime_ns", "time"}
    assert intent["stored"] == str(steps[0].destination) and intent["op"] == "move"


def test_move_options_are_checked(lib, tmp_path):
    root, index_dir = lib
    result = find_duplicates(index_dir)
    with pytest.raises(MgdedupError, match="--to"):
        plan_actions(index_dir, result, Action.MOVE, None)
    with pytest.raises(MgdedupError, match="inside the indexed folder"):
        plan_actions(index_dir, result, Action.MOVE, root / "dups")
    with pytest.raises(MgdedupError, match="permanent"):
        plan_actions(index_dir, result, Action.MOVE, tmp_path / "out", permanent=True)


def test_name_collision_gets_suffix(lib, tmp_path):
    root, index_dir = lib
    out = tmp_path / "out"
    taken = out / "sub" / "deep" / "a0.png"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"already here")
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.MOVE, out)
    step = next(s for s in steps if s.source == root / "sub" / "deep" / "a0.png")
    assert step.destination == out / "sub" / "deep" / "a0 (1).png"
    taken_late = out / "small" / "a0.jpg"  # appears between plan and apply
    taken_late.parent.mkdir(parents=True)
    taken_late.write_bytes(b"late")
    report = apply_plan(steps, index_dir)
    assert report.failed == 0
    assert taken.read_bytes() == b"already here" and taken_late.read_bytes() == b"late"
    assert file_digest(step.destination) == step.digest
    if (root / "small" / "a0.jpg") in {s.source for s in steps}:
        assert (out / "small" / "a0 (1).jpg").exists()


def test_delete_goes_to_trash(lib):
    root, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE)
    trash = index_dir / "trash" / steps[0].run_id
    assert all(s.destination == trash / s.source.relative_to(root) for s in steps)
    report = apply_plan(steps, index_dir)
    assert report.done == len(steps)
    assert all(not s.source.exists() and file_digest(s.destination) == s.digest for s in steps)
    assert report.manifest == index_dir / "actions" / f"{steps[0].run_id}.jsonl"


@pytest.mark.parametrize("action", [Action.HARDLINK, Action.SYMLINK])
def test_link_replaces_duplicate(lib, action):
    root, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), action)
    report = apply_plan(steps, index_dir)
    assert report.done == len(steps) and report.failed == 0
    for step in steps:
        assert os.path.samefile(step.source, step.keeper)
        assert step.source.is_symlink() == (action is Action.SYMLINK)
        if action is Action.SYMLINK:
            assert os.readlink(step.source) == str(step.keeper)
        assert file_digest(step.destination) == step.digest  # original bytes kept
    assert not [p for p in root.rglob(".*mgdedup-*")]  # no temporary link left behind


def test_changed_files_are_skipped(lib):
    root, index_dir = lib
    result = find_duplicates(index_dir)
    touched = root / "sub" / "deep" / "a1.png"
    os.utime(touched, ns=(0, touched.stat().st_mtime_ns + 10**9))
    same_stat = root / "sub" / "deep" / "a2.png"  # same size and mtime, other bytes
    st = same_stat.stat()
    data = bytearray(same_stat.read_bytes())
    data[-20] ^= 0xFF
    same_stat.write_bytes(bytes(data))
    os.utime(same_stat, ns=(st.st_atime_ns, st.st_mtime_ns))
    steps = {s.source: s for s in plan_actions(index_dir, result, Action.DELETE)}
    assert steps[touched].kind == SKIP and "changed since indexing" in steps[touched].reason
    assert steps[same_stat].kind == SKIP and "content differs" in steps[same_stat].reason
    assert "changed since indexing" in describe_plan([steps[touched]])[0]


def test_change_between_plan_and_apply_is_skipped(lib):
    _root, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE)
    victim = steps[0].source
    victim.write_bytes(victim.read_bytes() + b"edited")
    report = apply_plan(steps, index_dir)
    assert report.skipped == 1 and report.done == len(steps) - 1
    assert victim.read_bytes().endswith(b"edited")


def test_paths_outside_roots_are_skipped(lib, tmp_path):
    root, index_dir = lib
    result = find_duplicates(index_dir)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy2(root / "a0.png", outside / "x.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    rows = [row for row, _ in result.groups[0].members][:1] + \
        [row for row, _ in result.groups[1].members][:1]
    facts = list(result.facts)
    facts[rows[0]] = replace(facts[rows[0]], path=str(outside / "x.png"))
    facts[rows[1]] = replace(facts[rows[1]], path=str(root / "linked" / "x.png"))
    crafted = DedupResult(result.threshold, result.groups, facts)
    steps = {str(s.source): s for s in plan_actions(index_dir, crafted, Action.DELETE)}
    for row in rows:
        step = steps[facts[row].path]
        assert step.kind == SKIP and "outside the indexed folders" in step.reason
    apply_plan(list(steps.values()), index_dir)
    assert (outside / "x.png").exists()


def test_keeper_is_never_a_source(lib):
    _, index_dir = lib
    result = find_duplicates(index_dir)
    keeper_row = result.groups[0].keeper
    result.groups[1].members.append((keeper_row, 1.0))  # a crafted, inconsistent result
    steps = plan_actions(index_dir, result, Action.DELETE)
    keeper = Path(result.facts[keeper_row].path)
    assert [s.kind for s in steps if s.source == keeper] == [SKIP]
    apply_plan(steps, index_dir)
    assert keeper.exists()


@pytest.mark.parametrize("action", list(Action))
def test_undo_restores_everything(lib, tmp_path, action):
    root, index_dir = lib
    before = snapshot(root)
    to = tmp_path / "out" if action is Action.MOVE else None
    steps = plan_actions(index_dir, find_duplicates(index_dir), action, to)
    report = apply_plan(steps, index_dir)
    assert report.done == len(steps) > 0 and snapshot(root) != before
    undone = undo(latest_manifest(index_dir))
    assert (undone.restored, undone.skipped, undone.failed) == (len(steps), 0, 0)
    assert snapshot(root) == before  # same bytes, mtimes and even inodes (renames)
    again = undo(latest_manifest(index_dir))
    assert (again.restored, again.already_undone) == (0, len(steps))
    assert again.nothing_left and any("nothing left to undo" in m for m in again.messages)
    assert snapshot(root) == before


def test_undo_across_filesystems(lib, tmp_path, monkeypatch):
    """A rename that fails with EXDEV falls back to a verified copy, both ways."""
    root, index_dir = lib
    before = snapshot(root)

    def no_rename(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", no_rename)
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.MOVE, tmp_path / "out")
    assert apply_plan(steps, index_dir).done == len(steps)
    assert all(not s.source.exists() and s.destination.exists() for s in steps)
    assert undo(latest_manifest(index_dir)).restored == len(steps)
    assert content(snapshot(root)) == content(before)


def test_undo_never_overwrites(lib):
    _root, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE)
    apply_plan(steps, index_dir)
    newcomer = steps[0].source
    newcomer.write_bytes(b"new file, same name")
    report = undo(latest_manifest(index_dir))
    assert (report.restored, report.skipped) == (len(steps) - 1, 1)
    assert newcomer.read_bytes() == b"new file, same name"
    assert file_digest(steps[0].destination) == steps[0].digest  # still safe in the trash
    newcomer.unlink()  # the user clears the way: a second undo finishes the job
    again = undo(latest_manifest(index_dir))
    assert (again.restored, again.already_undone) == (1, len(steps) - 1)
    assert file_digest(newcomer) == steps[0].digest


def test_undo_leaves_a_foreign_link_alone(lib):
    root, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.SYMLINK)
    apply_plan(steps, index_dir)
    other = next(k for k in (root / f"a{i}.png" for i in range(ORIGINALS)) if k != steps[0].keeper)
    steps[0].source.unlink()
    steps[0].source.symlink_to(other)  # not the link we made
    report = undo(latest_manifest(index_dir))
    assert report.skipped == 1 and os.readlink(steps[0].source) == str(other)
    assert file_digest(steps[0].destination) == steps[0].digest  # still safe in the trash


def test_permanent_delete_is_not_undoable(lib):
    _, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.DELETE, permanent=True)
    assert all(s.destination is None for s in steps)
    assert all("PERMANENTLY" in line for line in describe_plan(steps))
    report = apply_plan(steps, index_dir)
    assert report.done == len(steps) and not any(s.source.exists() for s in steps)
    recorded = read_manifest(report.manifest)
    assert len(recorded.steps) == len(steps) and not recorded.problems
    assert all(s.stored is None and s.state == "done" for s in recorded.steps)
    undone = undo(report.manifest)
    assert undone.not_undoable == len(steps) and undone.restored == 0


def test_latest_manifest_without_runs(lib):
    _, index_dir = lib
    with pytest.raises(MgdedupError, match="nothing to undo"):
        latest_manifest(index_dir)


def test_failed_step_does_not_stop_the_run(lib, tmp_path):
    _root, index_dir = lib
    steps = plan_actions(index_dir, find_duplicates(index_dir), Action.MOVE, tmp_path / "out")
    blocked = steps[0].destination.parent
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"a file where a folder is needed")
    report = apply_plan(steps, index_dir)
    assert report.failed >= 1 and report.done + report.failed == len(steps)
    assert steps[0].source.exists()

