"""Commands that need no PyTorch never import it (start-up is then a fraction of a second),
and what lets them skip the model (the model facts cache) can never let wrong rows in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run

from mgdedup.model import facts
from mgdedup.model.registry import DEFAULT_MODEL

PROBE = """
import os, runpy, sys
sys.argv = ["mgdedup", *sys.argv[1:]]
try:
    runpy.run_module("mgdedup", run_name="__main__")
except SystemExit as stop:
    code = stop.code
else:
    code = 0
heavy = sorted(m for m in os.environ["PROBE_MODULES"].split(",") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
print(f"CODE={code}", file=sys.stderr)
"""


def imports_of(*args: object, cwd: Path | None = None,
               modules: tuple[str, ...] = ("torch", "torchvision", "onnx")
               ) -> tuple[list[str], str]:
    """(which of `modules` the command imported, its stderr), run in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PROBE_MODULES": ",".join(modules)})
    line = [x for x in done.stderr.splitlines() if x.startswith("HEAVY=")]
    assert line, done.stderr
    return [m for m in line[-1][len("HEAVY="):].split(",") if m], done.stderr


def test_help_and_argument_errors_import_no_array_or_image_library(tmp_path):
    """--help, --version, a bad option value and a mistyped folder answer from the command
    line layer alone (numpy, Pillow, h5py and FAISS cost ~0.2-0.4 s to import)."""
    (tmp_path / "notes.txt").write_text("not a folder")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args, code in ((("--help",), 0), (("--version",), 0), (("dedup", "--help"), 0),
                       (("index", "--help"), 0), (("dedup", "--threshold", "2"), 2),
                       (("index", tmp_path / "missing-folder"), 1),
                       (("index", fifo), 1),
                       (("classify", tmp_path / "missing.jpg", tmp_path / "notes.txt"), 1)):
        heavy, stderr = imports_of(*args, modules=("numpy", "PIL", "h5py", "faiss"))
        assert heavy == [], f"mgdedup {' '.join(map(str, args))} imported {heavy}: {stderr}"
        assert f"CODE={code}" in stderr.splitlines(), stderr
    one_line_error(run("index", tmp_path / "missing-folder"), "no such folder")
    one_line_error(run("index", fifo), "not a folder or a file")


def test_commands_without_a_forward_pass_never_import_torch(lib, tmp_path):
    root, index_dir = lib
    photo = root / "a0.png"
    for args in (("--help",), ("--version",), ("dedup", "--help"),
                 ("dedup", "--index", index_dir, "--format", "json"),
                 ("dedup", "--index", index_dir, "--action", "move", "--to", tmp_path / "d"),
                 ("dedup", "--index", index_dir, "--format", "html", "--out",
                  tmp_path / "r.html"),
                 ("undo", "--index", index_dir),
                 ("mark", "not-duplicate", photo, root / "small" / "a0.jpg", "--index",
                  index_dir),
                 ("dedup", "--threshold", "2"),
                 ("classify", tmp_path / "missing.jpg"),
                 ("index", tmp_path / "missing-folder"),
                 ("search", tmp_path / "missing.jpg", "--index", index_dir),
                 ("search", photo, "--index", index_dir, "-k", "2")):
        heavy, stderr = imports_of(*args)
        assert heavy == [], f"mgdedup {' '.join(map(str, args))} imported {heavy}: {stderr}"


def test_index_with_nothing_new_loads_no_model(lib):
    root, index_dir = lib
    assert run("index", root, "-r", "224", "--workers", "0").exit_code == 0  # facts cached
    heavy, stderr = imports_of("index", root, "-r", "224", "--workers", "0")
    assert heavy == [], stderr
    assert "0 indexed, 0 skipped; 9 unchanged" in stderr


def test_search_of_an_indexed_file_reuses_its_row(lib):
    root, index_dir = lib
    reused = run("search", root / "a1.png", "--index", index_dir, "-k", "3", "--json")
    copy = root / "elsewhere.png"
    shutil.copy(root / "a1.png", copy)  # the same pixels, not indexed: embedded
    embedded = run("search", copy, "--index", index_dir, "-k", "3", "--json")
    first, second = json.loads(reused.stdout)[0], json.loads(embedded.stdout)[0]
    # the same neighbours at the same cosines (the stored row is the embedded one); their
    # order may differ where scores tie: byte-identical files score 1.0 for the indexed
    # query, whose digest is known
    mine = {r["path"]: r["cosine"] for r in first["results"]}
    theirs = {r["path"]: r["cosine"] for r in second["results"]}
    assert set(mine) == set(theirs)
    for path, cosine in mine.items():
        assert cosine == pytest.approx(theirs[path], abs=1e-5)


def test_damaged_facts_cache_is_ignored(lib):
    root, index_dir = lib
    assert run("index", root, "-r", "224", "--workers", "0").exit_code == 0
    key = facts.source_key(DEFAULT_MODEL)
    path = facts._cache_file(key)
    assert facts.cached_facts(DEFAULT_MODEL, 224) is not None
    document = json.loads(path.read_text())
    document["facts"]["224"]["dim"] = 7  # edited without its digest
    path.write_text(json.dumps(document))
    assert facts.cached_facts(DEFAULT_MODEL, 224) is None
    path.write_text("{not json")
    assert facts.cached_facts(DEFAULT_MODEL, 224) is None
    done = run("index", root, "-r", "224", "--workers", "0")  # loads the model, rewrites
    assert done.exit_code == 0 and facts.cached_facts(DEFAULT_MODEL, 224) is not None


def test_forged_facts_never_let_another_models_rows_in(lib, tmp_path):
    """A cache claiming that another model file is the index's model: with nothing new
    nothing is written; with a new file the loaded model is checked and refused."""
    import torch

    from mgdedup.errors import MgdedupError
    from mgdedup.index.build import update_index
    from mgdedup.index.store import IndexStore
    from mgdedup.model.model_file import save_model
    from mgdedup.model.registry import load_model

    root, index_dir = lib
    with IndexStore.open(index_dir / "embeddings.h5") as store:
        meta, rows = store.meta, len(store)
    import copy

    other = copy.deepcopy(load_model(DEFAULT_MODEL))
    with torch.no_grad():
        next(other.trunk.parameters()).add_(0.01)  # other weights: another model id
    other._fingerprint = None  # computed again from the changed weights
    other_file = tmp_path / "other.pt"
    save_model(other, other_file)
    spec = str(other_file.resolve())
    claimed = facts.ModelFacts(meta.model_id, meta.p, meta.whitening_id, meta.dim,
                               meta.threshold)
    assert facts.ModelFacts.of(other, 224) != claimed
    facts.remember_facts(spec, 224, claimed)  # a cache entry that lies, digest and all
    update_index([root], index_dir, None, spec, 224, workers=0)  # nothing new: nothing done
    (root / "new.png").write_bytes((root / "a0.png").read_bytes())
    (root / "new.png").touch()
    shutil.copy(root / "small" / "a0.jpg", root / "new.jpg")
    with pytest.raises(MgdedupError, match="holds descriptors of model"):
        update_index([root], index_dir, None, spec, 224, workers=0)
    with IndexStore.open(index_dir / "embeddings.h5") as store:
        assert len(store) == rows and store.meta.model_id == meta.model_id


def test_shipped_class_names_are_torchvisions():
    from torchvision.models import ResNet50_Weights

    from mgdedup.model.model_file import imagenet_class_names

    assert imagenet_class_names() == list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def test_search_of_an_indexed_file_reuses_dedups_verification(lib, monkeypatch):
    """The pairs dedup verified (IDX/verified.npz) are not verified again for an indexed
    query: no local features are extracted, and scores stay those of dedup's evidence
    (byte-identical files 1.0, as dedup scores them)."""
    from mgdedup.duplicates import local_match
    from mgdedup.queries.search import search_index

    root, index_dir = lib
    groups = json.loads(run("dedup", "--index", index_dir, "--format", "json").stdout)["groups"]
    group = next(g for g in groups if Path(g["keeper"]).name == "a1.png")

    def refuse(*args, **kwargs):
        raise AssertionError("a pair dedup verified was verified again")

    monkeypatch.setattr(local_match, "extract_file", refuse)
    monkeypatch.setattr(local_match.FeatureCache, "get", refuse)
    (result,) = search_index(index_dir, [Path(group["keeper"])], k=5)
    by_path = dict(result.results)
    for member in group["members"]:
        if Path(member["path"]).read_bytes() == Path(group["keeper"]).read_bytes():
            assert by_path[member["path"]] == 1.0
        else:  # same evidence; cosine, rank and background are the query's own
            assert by_path[member["path"]] == pytest.approx(member["score"], abs=1e-3)
