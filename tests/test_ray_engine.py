"""`index --engine ray`: on a local Ray cluster (2 CPUs, started here with `ray start`), the
index written is the one a single-process run writes, a dead actor's batch is run again, and
a worker whose model differs from the index's is refused."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run
from conftest import copy_tree

from mgdedup.distributed.options import RayOptions
from mgdedup.errors import MgdedupError
from mgdedup.index.store import IndexStore
from mgdedup.model.facts import ModelFacts

RES = 64
if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
    pytest.skip("Ray Data is not installed (pip install 'mgdedup[ray]')",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(session_cache):
    """The address of a 2-CPU Ray cluster on this machine, stopped at the end. Its workers
    inherit this environment, so they share the test session's model cache."""
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed")
    port = _free_port()
    # short: Ray's sockets live below it, and a Unix socket path has at most 107 bytes
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # the cluster and this process (which imports Ray later) agree on token authentication
    # (a fresh machine has no ~/.ray/auth_token, so the cluster gets its own token here)
    auth_before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env = {**os.environ, "XDG_CACHE_HOME": str(session_cache), "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run(
        ["ray", "start", "--head", "--num-cpus", "2", "--num-gpus", "0",
         "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp,
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in auth_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rows_by_path(index_dir: Path) -> dict[str, dict[str, object]]:
    with IndexStore.open(index_dir / "embeddings.h5") as store:
        paths = store.absolute_paths()
        columns = {c: store.read(c) for c in ("size", "mtime_ns", "digest", "width", "height",
                                              "phash", "gem_norm", "white_norm")}
        embeddings = store.embeddings()
    assert len(set(paths)) == len(paths)
    return {p: {"emb": embeddings[k], **{c: v[k] for c, v in columns.items()}}
            for k, p in enumerate(paths)}


def error_paths(index_dir: Path) -> set[str]:
    import json

    lines = (index_dir / "errors.jsonl").read_text().splitlines()
    return {json.loads(line)["path"] for line in lines}


def assert_same_rows(expected: dict, found: dict) -> None:
    assert sorted(found) == sorted(expected)
    for path, row in expected.items():
        np.testing.assert_allclose(found[path]["emb"], row["emb"], atol=1e-5, rtol=0)
        for column in ("size", "mtime_ns", "digest", "width", "height", "phash"):
            assert found[path][column] == row[column], (path, column)
        for column in ("gem_norm", "white_norm"):
            assert found[path][column] == pytest.approx(row[column], rel=1e-5)


@pytest.fixture(scope="module")
def folder(planted, tmp_path_factory) -> Path:
    photos = copy_tree(planted.folder, tmp_path_factory.mktemp("ray") / "photos")
    (photos / "notes.jpg").write_text("not an image")  # reported and skipped by both paths
    return photos


def test_ray_index_equals_the_local_index(cluster, folder, tmp_path) -> None:
    local, distributed = tmp_path / "local", tmp_path / "ray"
    result = run("index", folder, "-r", RES, "--workers", "0", "--out", local)
    assert result.exit_code == 0, result.output
    result = run("index", folder, "-r", RES, "--out", distributed, "--engine", "ray",
                 "--ray-address", cluster)
    assert result.exit_code == 0, result.output
    assert "40 indexed, 1 skipped" in result.output
    assert_same_rows(rows_by_path(local), rows_by_path(distributed))
    assert error_paths(distributed) == error_paths(local) == {str(folder / "notes.jpg")}

    # incremental like the local path: nothing new starts no Ray job, one new file is embedded
    result = run("index", folder, "-r", RES, "--out", distributed, "--engine", "ray",
                 "--ray-address", cluster)
    assert result.exit_code == 0 and "0 indexed" in result.output, result.output
    shutil.copy(planted_original(folder), folder / "added.png")
    result = run("index", folder, "-r", RES, "--out", distributed, "--engine", "ray",
                 "--ray-address", cluster)
    assert result.exit_code == 0 and "1 indexed" in result.output, result.output
    run("index", folder, "-r", RES, "--workers", "0", "--out", local)
    assert_same_rows(rows_by_path(local), rows_by_path(distributed))
    (folder / "added.png").unlink()


def planted_original(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*") if p.suffix in {".png", ".jpg"}
                  and p.name != "notes.jpg")[0]


class ActorThatDiesOnce:
    """Mixed into EmbedActor below: the first batch anywhere kills its worker process."""

    marker: str = ""

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("died once")
            os._exit(1)
        return super().__call__(batch)


def _embedding(cluster: str, facts: ModelFacts, actor_class: type | None = None):
    from mgdedup.distributed.ray_embedding import EmbedActor, RayEmbedding

    return RayEmbedding("default", RES, facts, options=RayOptions(address=cluster, actors=2),
                        batch_size=4, actor_class=actor_class or EmbedActor)


def _facts() -> ModelFacts:
    from mgdedup.model.registry import load_model

    return ModelFacts.of(load_model("default"), RES)


def test_a_dead_actor_is_replaced_and_its_batch_run_again(cluster, folder, tmp_path) -> None:
    import ray

    from mgdedup.distributed.ray_embedding import EmbedActor
    from mgdedup.embedding.embedder import Embedder
    from mgdedup.model.registry import load_model

    # pickled by value: Ray's workers cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    dies_once = type("DiesOnce", (ActorThatDiesOnce, EmbedActor),
                     {"marker": str(tmp_path / "died")})
    paths = sorted(p for p in folder.rglob("*.png"))[:12]
    batches = list(_embedding(cluster, _facts(), dies_once).embed_files(paths))
    assert (tmp_path / "died").exists()  # a worker did die
    found = {paths[i]: b.descriptors.descriptors[k] for b in batches
             for k, i in enumerate(b.positions)}
    assert sorted(found) == paths and sum(len(b.positions) for b in batches) == len(paths)
    local = Embedder(load_model("default"), RES, workers=0)
    expected = {paths[i]: b.descriptors.descriptors[k] for b in local.embed_files(paths)
                for k, i in enumerate(b.positions)}
    for path in paths:
        np.testing.assert_allclose(found[path], expected[path], atol=1e-5, rtol=0)


def test_a_worker_with_another_model_is_refused(cluster, folder) -> None:
    facts = _facts()
    forged = ModelFacts(model_id="0" * 16, p=facts.p, whitening_id=facts.whitening_id,
                        dim=facts.dim, threshold=facts.threshold)
    paths = sorted(folder.rglob("*.png"))[:4]
    with pytest.raises(MgdedupError, match=r"differs from the index's \(model_id\)"):
        list(_embedding(cluster, forged).embed_files(paths))


def test_ray_options_are_checked_before_anything_runs(folder) -> None:
    for args, fragment, code in (
            (("--engine", "ray", "--shard", "1/2"), "drop --shard", 2),
            (("--ray-actors", "2"), "need --engine ray", 2),
            (("--engine", "spark"), "expected one of local, ray", 1)):
        result = run("index", folder, "-r", RES, *args)
        assert result.exit_code == code, result.output
        assert fragment in result.output and "Traceback" not in result.output
        assert not (folder / ".mgdedup").exists()  # refused before anything was written
