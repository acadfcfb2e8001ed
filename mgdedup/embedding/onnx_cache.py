"""The ONNX graphs of the trunk as cached files, without PyTorch: which graph serves an input
size, where it lives, whether it still has the bytes that were checked against PyTorch, and an
ONNX Runtime session over it. `mgdedup.embedding.onnx_trunk` writes and checks the graphs;
`mgdedup.embedding.light` runs them when PyTorch is not loaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mgdedup.files import user_dirs
from mgdedup.files.atomic import write_bytes
from mgdedup.files.digest import file_digest

log = logging.getLogger(__name__)

#: bumped whenever the graph written for a class changes, so old cache files are not reused
GRAPH_VERSION = 1
#: stride-2 convs in EfficientNet-Lite0 (stem + first block of four stages): 2^5 = 32
STRIDE2_LAYERS = 5

_shared_allocator = False


class OnnxUnavailable(RuntimeError):
    """The ONNX path cannot be used here (missing package, unsupported trunk, failed check)."""


def cache_dir() -> Path:
    """Where exported graphs live: regenerable, so under the user's cache directory."""
    return user_dirs.cache_dir("onnx")


def _parities(size: int) -> tuple[int, ...]:
    bits = []
    for _ in range(STRIDE2_LAYERS):
        bits.append(size % 2)
        size = -(-size // 2)  # ceil(size / 2): the TF "same" output size
    return tuple(bits)


def padding_class(height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Parities of the inputs of the stride-2 convs along H and W: what fixes all padding."""
    return _parities(height), _parities(width)


def class_name(key: tuple[tuple[int, ...], tuple[int, ...]]) -> str:
    return "h" + "".join(map(str, key[0])) + "-w" + "".join(map(str, key[1]))


def import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise OnnxUnavailable("onnxruntime is not installed") from error
    return onnxruntime


def _share_allocator(ort: Any) -> bool:
    """One CPU arena for every session of the process (once per process). Each session has its
    own arena otherwise, and keeps its peak: with one session per padding class, a collection
    of many image shapes held ~650 MB per class (measured: 4 classes, 3.4 GB)."""
    global _shared_allocator
    if not _shared_allocator:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            # extend by what is asked (strategy 1), not to the next power of two
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
            _shared_allocator = True
        except Exception as error:  # noqa: BLE001 - ORT errors are bare Exceptions
            log.debug("no shared ONNX Runtime allocator (%s): one arena per session", error)
    return _shared_allocator


#: what the trunk's graphs compute in: "fp32" (equal to PyTorch to ~1e-6) or "int8" (static
#: QDQ, `mgdedup.embedding.int8_graph`); an index records which one made its rows
PRECISIONS = ("fp32", "int8")


def graph_path(cache: Path, fingerprint: str, ort_version: str,
               key: tuple[tuple[int, ...], tuple[int, ...]], precision: str = "fp32") -> Path:
    """Cache file of a class's graph: the weights, the graph writer, the runtime that
    checked it and the precision. An int8 graph holds its own (int8) weights."""
    return cache / (f"{fingerprint}-v{GRAPH_VERSION}-ort{ort_version}-{precision}-"
                    f"{class_name(key)}.onnx")


def weights_path(cache: Path, fingerprint: str) -> Path:
    """The one weights file every class's graph of this model refers to."""
    return cache / f"{fingerprint}-v{GRAPH_VERSION}.weights"


def graph_files(cache: Path, fingerprint: str, ort_version: str,
                key: tuple[tuple[int, ...], tuple[int, ...]], precision: str = "fp32"
                ) -> tuple[Path, Path]:
    """(graph, weights) of a class: both must match their seals before a session is made
    over them. An int8 graph holds its own weights, so it is its own weights file."""
    graph = graph_path(cache, fingerprint, ort_version, key, precision)
    return graph, weights_path(cache, fingerprint) if precision == "fp32" else graph


def new_session(ort: Any, path: Path, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle threads sleep instead of spinning: decoding workers share these cores, and
    # spinning halved the throughput (and doubled the CPU time per image) when they did.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _share_allocator(ort):
        options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


SEAL_SUFFIX = ".blake2b"
#: files verified by this process: path -> (size, mtime_ns) when they matched their seal
_verified: dict[str, tuple[int, int]] = {}


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _seal(path: Path) -> None:
    """Record the digest of a checked cache file beside it (`_sealed` compares)."""
    write_bytes(path.with_name(path.name + SEAL_SUFFIX), file_digest(path).encode("ascii"),
                "ONNX cache seal")
    stamp = _file_stamp(path)
    if stamp is not None:
        _verified[str(path)] = stamp


def _sealed(path: Path) -> bool:
    """Whether a cache file still has the bytes it had when it was checked against PyTorch (a
    replaced or damaged graph or weights file is never used)."""
    stamp = _file_stamp(path)
    if stamp is None:
        return False
    if _verified.get(str(path)) == stamp:
        return True
    try:
        recorded = path.with_name(path.name + SEAL_SUFFIX).read_text(encoding="ascii").strip()
        actual = file_digest(path)
    except (OSError, UnicodeDecodeError):
        return False
    if recorded != actual:
        return False
    _verified[str(path)] = stamp
    return True
