"""Indexes, caches, model files and file names are never trusted blindly: a full disk, a
kill in the middle of an append, damaged files, odd names, FIFOs, hostile values, orphaned
workers. Each case ends in a one-line error or a correct answer, never a traceback, a hang,
a crash or a silently wrong result.

Cases that might hang or crash the interpreter run in a subprocess with a timeout.
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

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, run
from conftest import content, snapshot

from mgdedup.imaging.synthetic import random_scene
from mgdedup.index.store import IndexStore
from mgdedup.model.model_file import model_to_dict
from mgdedup.model.registry import load_model

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
RESOLUTION = "64"


def make_folder(folder: Path, count: int, size: tuple[int, int] = (160, 120),
                seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in range(count):
        random_scene(rng, size).save(folder / f"img{n:03d}.png")
    return folder


def rows_of(index_dir: Path) -> dict[str, np.ndarray]:
    """Relative path -> descriptor, read with h5py (committed rows only)."""
    with h5py.File(index_dir / "embeddings.h5", "r") as f:
        n = int(f.attrs.get("rows", len(f["paths"])))
        paths = f["paths"].asstr(errors="surrogateescape")[:n]
        return dict(zip(paths, f["embeddings"][:n]))


def mgdedup_cli(*args: object, timeout: float = 120, env: dict | None = None
                ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgdedup", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder of 24 scenes and its index's rows, made without incident: the reference."""
    folder = make_folder(tmp_path_factory.mktemp("clean") / "photos", 24)
    assert run("index", folder, "-r", RESOLUTION, "--workers", "0").exit_code == 0
    return folder, rows_of(folder / ".mgdedup")


def assert_same_rows(index_dir: Path, reference: dict[str, np.ndarray]) -> None:
    got = rows_of(index_dir)
    assert sorted(got) == sorted(reference)  # every file once, nothing else
    for rel, vector in reference.items():
        assert np.abs(got[rel] - vector).max() < 1e-5, rel  # never an all-zero row


# --- 7. a full disk, a kill during an append, a damaged file ---------------------------------
@pytest.mark.skipif(not ROOT, reason="a small tmpfs needs root to mount")
def test_a_full_disk_is_one_line_and_the_next_run_completes(clean, tmp_path):
    folder, reference = clean
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("tmpfs mounts are not permitted here")
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * 700_000)
        full = mgdedup_cli("index", folder, "-r", RESOLUTION, "--workers", "0", "--out",
                           disk / "idx", "--batch-size", "4",
                           env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert full.returncode == 1, (full.returncode, full.stderr)  # not a crash (139)
        lines = [line for line in full.stderr.splitlines() if line.strip()]
        assert "Traceback" not in full.stderr and len(lines) == 1
        assert lines[0].startswith("error:") and "no space left" in lines[0].lower(), lines
        filler.unlink()
        again = mgdedup_cli("index", folder, "-r", RESOLUTION, "--workers", "0", "--out",
                            disk / "idx", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert again.returncode == 0, again.stderr
        assert_same_rows(disk / "idx", reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


KILLED_INDEX = textwrap.dedent("""
    import sys, time
    import h5py
    from mgdedup.index.build import update_index
    from mgdedup.model.registry import load_model
    real = h5py.Dataset.__setitem__
    def slowly(self, key, value):  # every column write takes a while: kills land inside
        time.sleep(0.01)
        return real(self, key, value)
    h5py.Dataset.__setitem__ = slowly
    model = load_model()
    print("ready", flush=True)
    update_index([sys.argv[1]], sys.argv[2], model, "efficientnet-lite0", 64, workers=0,
                 batch_size=2)
""")


@pytest.mark.parametrize("seed", range(8))
def test_an_index_killed_during_appends_is_completed_correctly(clean, tmp_path, seed):
    folder, reference = clean
    index_dir = tmp_path / "idx"
    process = subprocess.Popen([sys.executable, "-c", KILLED_INDEX, str(folder),
                                str(index_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    time.sleep(float(np.random.default_rng(seed).uniform(0.5, 4.0)))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    result = run("index", folder, "-r", RESOLUTION, "--workers", "0", "--out", index_dir)
    assert result.exit_code == 0, result.output
    assert_same_rows(index_dir, reference)


DAMAGED_READERS = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from mgdedup.cli import app
    work = sys.argv[1]
    results = []
    for command in (["dedup", "--index", work, "--format", "json"],
                    ["classify", "--index", work, "--json"],
                    ["search", work + "/img000.png", "--index", work, "-k", "2"],
                    ["index", work, "-r", "64", "--workers", "0"]):
        result = CliRunner().invoke(app, command)
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        results.append({"command": command[0], "code": result.exit_code,
                        "stderr": result.stderr, "crashed": crashed})
    print(json.dumps(results))
""")


@pytest.mark.parametrize("seed", range(25))
def test_random_damage_to_the_index_is_one_line_or_salvaged(clean, tmp_path, seed):
    """16 random bytes of embeddings.h5 overwritten: every reader answers or fails in one
    line (in a subprocess: a crash would show), and `index` salvages or rebuilds to the rows
    of an undamaged run."""
    folder, reference = clean
    work = tmp_path / "photos"
    shutil.copytree(folder, work, copy_function=shutil.copy2)
    with IndexStore.open(work / ".mgdedup" / "embeddings.h5", "a") as store:
        store.set_roots([str(work.resolve())])
    (work / ".mgdedup" / "faiss.index").unlink()
    h5 = work / ".mgdedup" / "embeddings.h5"
    data = bytearray(h5.read_bytes())
    rng = np.random.default_rng(seed)
    for offset in rng.choice(len(data), size=16, replace=False):
        data[int(offset)] = int(rng.integers(0, 256))
    h5.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-c", DAMAGED_READERS, str(work)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr  # the interpreter survived every command
    for result in json.loads(done.stdout):
        assert not result["crashed"] and result["code"] in (0, 1), result
        if result["code"] == 1:
            lines = [line for line in result["stderr"].splitlines() if line.strip()]
            assert lines[-1].startswith("error:") and len(lines) <= 2, result
    assert json.loads(done.stdout)[-1]["code"] == 0  # index repaired it
    assert_same_rows(work / ".mgdedup", reference)


def test_a_root_column_out_of_range_is_one_line(clean, tmp_path):
    folder, reference = clean
    work = tmp_path / "photos"
    shutil.copytree(folder, work, copy_function=shutil.copy2)
    with h5py.File(work / ".mgdedup" / "embeddings.h5", "a") as f:
        f["root"][3] = 7  # names a root the index does not list
    one_line_error(run("dedup", "--index", work / ".mgdedup"), "corrupt")
    one_line_error(run("classify", "--index", work / ".mgdedup"), "corrupt")
    result = run("index", work, "-r", RESOLUTION, "--workers", "0")
    assert result.exit_code == 0 and "damaged" in result.stderr, result.output
    assert list((work / ".mgdedup").glob("embeddings.h5.damaged-*"))  # kept for the user
    with IndexStore.open(work / ".mgdedup" / "embeddings.h5") as store:
        assert sorted(store.read("paths")) == sorted(reference)


# --- 8, 9. names that are not UTF-8, or look like markup and control sequences ---------------
def test_undecodable_names_are_indexed_acted_on_and_restored(tmp_path):
    folder = make_folder(tmp_path / "photos", 3)
    bad = Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png"))  # a latin-1 name
    shutil.copy2(folder / "img000.png", bad)
    result = run("index", folder, "-r", RESOLUTION, "--workers", "0")
    assert result.exit_code == 0 and "4 indexed" in result.stderr, result.output
    document = json.loads(run("dedup", "--index", folder, "--threshold", "0.99",
                              "--format", "json").stdout)
    paths = {f["path"] for g in document["groups"] for f in g["files"]}
    assert str(bad) in paths  # the JSON string is the name, byte for byte
    table = run("dedup", "--index", folder, "--threshold", "0.99").stdout
    assert "caf\\xe9.png" in table
    before = content(snapshot(folder))
    moved = run("dedup", "--index", folder, "--threshold", "0.99", "--action", "move",
                "--to", tmp_path / "dups", "--apply")
    assert moved.exit_code == 0 and "1 done" in moved.stderr, moved.output
    assert run("undo", "--index", folder).exit_code == 0
    assert content(snapshot(folder)) == before


def test_markup_and_control_characters_in_names_are_printed_as_text(tmp_path):
    folder = tmp_path / "photos"
    (folder / "dir[").mkdir(parents=True)
    names = ["dir[/]x.png", "[bold red]x.png", "\x1b[31mred.png"]
    source = random_scene(np.random.default_rng(3), (160, 120))
    for name in names:
        source.save(folder / name)
    result = run("index", folder, "-r", RESOLUTION, "--workers", "0")
    assert result.exit_code == 0, result.output
    for args in (("dedup", "--index", folder, "--threshold", "0.99"),
                 ("dedup", "--index", folder, "--threshold", "0.99", "--action", "delete"),
                 ("dedup", "--index", folder, "--threshold", "0.99", "--action", "delete",
                  "--apply"), ("undo", "--index", folder)):
        done = run(*args)
        assert done.exit_code == 0, done.output
        assert "\x1b" not in done.output  # escape sequences never reach the terminal
        if "--apply" not in args and args[0] != "undo":  # these list the files
            shown = done.output.replace("\n", "")
            assert "x.png" in shown and "\\x1b[31mred.png" in shown, shown
    table = run("dedup", "--index", folder, "--threshold", "0.99").stdout.replace("\n", "")
    for name in ("\\x1b[31mred.png", "[bold red]x.png", "dir[/]x.png"):  # all three, as text
        assert name in table, table


# --- 10. hostile values in a model file -------------------------------------------------------
def _model_file(tmp_path: Path, name: str, change) -> Path:
    data = model_to_dict(load_model())
    change(data)
    path = tmp_path / f"{name}.pt"
    torch.save(data, path)
    return path


@pytest.mark.parametrize("name,change,fragment", [
    ("p-zero", lambda d: d["p_star"].update({500: 0.0}), "p* at 500 = 0"),
    ("p-nan", lambda d: d["p_star"].update({500: float("nan")}), "p* at 500 = nan"),
    ("training-p", lambda d: d.update(training_p=float("inf")), "training_p"),
    ("stride-0", lambda d: d["state_dict"].update(
        {"_fc.weight": torch.zeros(1).expand(1000, 1280)}), "not a dense tensor"),
    ("nan-weight", lambda d: d["state_dict"].update(  # a new tensor: never the cached model's
        {"_fc.bias": torch.full((1000,), float("nan"))}), "not finite"),
    ("whitening-shape", lambda d: d["whitenings"][500].update(mean=torch.zeros(7)),
     "mean has shape (7,)"),
    ("whitening-threshold", lambda d: d["whitenings"][500].update(threshold=5.0),
     "threshold = 5"),
    ("whitening-type", lambda d: d["whitenings"].update({500: "abc"}), "whitening"),
])
def test_hostile_model_values_are_one_line_errors(tmp_path, name, change, fragment):
    path = _model_file(tmp_path, name, change)
    folder = make_folder(tmp_path / "photos", 2)
    one_line_error(run("index", folder, "--model", path, "--workers", "0"), fragment)
    assert not (folder / ".mgdedup").exists()


# --- 11. a search structure that lies ---------------------------------------------------------
def test_an_altered_faiss_index_groups_nothing_wrong_and_is_rebuilt(clean, tmp_path):
    import faiss

    folder, reference = clean
    work = tmp_path / "photos"
    shutil.copytree(folder, work, copy_function=shutil.copy2)
    with IndexStore.open(work / ".mgdedup" / "embeddings.h5", "a") as store:
        store.set_roots([str(work.resolve())])
        dim, rows = store.meta.dim, len(store)
    fake = faiss.IndexFlatIP(dim)
    same = np.zeros((rows, dim), np.float32)
    same[:, 0] = 1.0  # every image "identical": cosine 1.0 for every pair
    fake.add(same)
    faiss.write_index(fake, str(work / ".mgdedup" / "faiss.index"))
    result = run("dedup", "--index", work, "--threshold", "0.9", "--format", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    stored = rows_of(work / ".mgdedup")
    for group in document["groups"]:  # only pairs the rows themselves support
        keeper = stored[os.path.relpath(group["keeper"], work)]
        for member in group["members"]:
            cosine = float(keeper @ stored[os.path.relpath(member["path"], work)])
            assert member["score"] == pytest.approx(cosine, abs=1e-5) and cosine >= 0.9
    index = faiss.read_index(str(work / ".mgdedup" / "faiss.index"))
    held = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(-1, index.d)
    assert not np.array_equal(held, same)  # rebuilt from the rows


# --- 12. FIFOs ---------------------------------------------------------------------------------
SWAP_FOR_FIFO = textwrap.dedent("""
    import os, sys
    import mgdedup.index.build as build
    from mgdedup.model.registry import load_model
    folder = sys.argv[1]
    scan = build.scan_images
    def scan_then_swap(*args, **kwargs):
        found = scan(*args, **kwargs)
        victim = os.path.join(folder, "img001.png")
        os.unlink(victim)
        os.mkfifo(victim)  # a FIFO where a file was listed: reading it would block forever
        return found
    build.scan_images = scan_then_swap
    summary = build.update_index([folder], os.path.join(folder, ".mgdedup"), load_model(),
                                 "efficientnet-lite0", 64, workers=0)
    print(summary.embedded, summary.skipped)
""")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_file_swapped_for_a_fifo_never_hangs_index(tmp_path):
    folder = make_folder(tmp_path / "photos", 4)
    done = subprocess.run([sys.executable, "-c", SWAP_FOR_FIFO, str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "1"]
    errors = (folder / ".mgdedup" / "errors.jsonl").read_text()
    assert "img001.png" in errors and "FIFO" in errors


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_where_an_indexed_file_was_never_hangs_a_command(tmp_path):
    folder = make_folder(tmp_path / "photos", 6)
    assert run("index", folder, "-r", RESOLUTION, "--workers", "0").exit_code == 0
    victim = folder / "img002.png"
    victim.unlink()
    os.mkfifo(victim)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    for command in (("dedup", "--index", folder, "--threshold", "-1", "--format", "html",
                     "--out", tmp_path / "r.html"),
                    ("calibrate", "--index", folder, "--sample", "6", "--workers", "0"),
                    ("search", victim, "--index", folder),
                    ("classify", victim, folder / "img000.png"),
                    ("dedup", "--index", folder, "--threshold", "-1", "--action", "delete")):
        done = mgdedup_cli(*command, timeout=180, env=env)  # a hang fails by timeout
        assert "Traceback" not in done.stderr, (command, done.stderr)
        assert done.returncode in (0, 1), (command, done.stderr)
    page = (tmp_path / "r.html").read_text()
    assert "FIFO" in page  # its card says why there is no thumbnail


# --- 13. nothing left behind by a killed run --------------------------------------------------
SLOW_INDEX = textwrap.dedent("""
    import sys, time
    import mgdedup.embedding.embedder as embedder
    real = embedder.load_for_index
    def slow(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)
    embedder.load_for_index = slow  # the workers (forked) decode slowly too
    from mgdedup.index.build import update_index
    from mgdedup.model.registry import load_model
    update_index([sys.argv[1]], sys.argv[2], load_model(), "efficientnet-lite0", 64, workers=2)
""")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_workers_die_with_a_killed_index(tmp_path):
    folder = make_folder(tmp_path / "photos", 40)
    process = subprocess.Popen([sys.executable, "-c", SLOW_INDEX, str(folder),
                                str(tmp_path / "idx")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    workers: set[int] = set()
    while time.monotonic() < deadline and len(workers) < 2:
        workers = _children(process.pid)
        time.sleep(0.2)
    assert len(workers) >= 2, "the index run never started its workers"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)], "workers outlived their parent"


def test_scratch_folders_of_killed_calibrations_are_removed(clean, tmp_path):
    folder, _ = clean
    work = tmp_path / "photos"
    shutil.copytree(folder, work, copy_function=shutil.copy2)
    with IndexStore.open(work / ".mgdedup" / "embeddings.h5", "a") as store:
        store.set_roots([str(work.resolve())])
    scratch = work / ".mgdedup" / "tmp"
    dead = scratch / "calibrate-999999999-deadbeef"  # no such process
    dead.mkdir(parents=True)
    (dead / "00000_crop.jpg").write_bytes(b"x" * 1000)
    mine = scratch / f"calibrate-{os.getpid()}-cafecafe"  # a live process: left alone
    mine.mkdir()
    result = run("calibrate", "--index", work, "--sample", "4", "--aug-copies", "0",
                 "--workers", "0")
    assert result.exit_code == 0, result.output
    assert not dead.exists() and mine.exists()
    assert sorted(p.name for p in scratch.iterdir()) == [mine.name]  # its own one is gone


# --- 14. hand-edited side files ---------------------------------------------------------------
@pytest.mark.parametrize("content_", ['{"duplicate": "abc"}', "[1, 2]",
                                      '{"not-duplicate": [["a", "a"]]}', "{not json"])
def test_a_malformed_decisions_file_is_one_line(clean, tmp_path, content_):
    folder, _ = clean
    work = tmp_path / "photos"
    shutil.copytree(folder, work, copy_function=shutil.copy2)
    (work / ".mgdedup" / "decisions.json").write_text(content_)
    one_line_error(run("dedup", "--index", work / ".mgdedup"), "decisions.json")


def test_a_malformed_calibration_is_estimated_again(clean, tmp_path):
    folder, _ = clean
    work = tmp_path / "photos"
    shutil.copytree(folder, work, copy_function=shutil.copy2)
    with IndexStore.open(work / ".mgdedup" / "embeddings.h5", "a") as store:
        store.set_roots([str(work.resolve())])
    assert run("calibrate", "--index", work, "--sample", "4", "--aug-copies", "0",
               "--workers", "0").exit_code == 0
    path = work / ".mgdedup" / "calibration.json"
    data = json.loads(path.read_text())
    for entry in data["modes"].values():
        entry["rows"] = "abc"
    path.write_text(json.dumps(data))
    result = run("dedup", "--index", work, "--precision", "0.5", "--format", "json")
    assert result.exit_code == 0, result.output
    assert "calibrating the threshold" in result.stderr  # ignored, estimated again
