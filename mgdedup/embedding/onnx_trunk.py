"""ONNX Runtime forward path for the EfficientNet-Lite0 trunk on CPU (issue 5).

Why: on this kind of machine the same network runs 2-3x faster in ONNX Runtime than in PyTorch
eager (BENCHMARKS.md, embedding throughput), and the forward pass is most of the indexing time.

Export strategy. TF "same" padding makes every stride-2 conv's padding depend on the parity of
its input size (see `mgdedup.model.trunks.efficientnet_lite`): an ONNX Conv takes its pads as static
attributes, and `torch.onnx.export` cannot trace the trunk as it is (the BatchNorm-folded kernel
is computed in the forward pass, and the padding branch depends on the input shape). So the
graph is written directly with `onnx.helper` from the trunk's weights, BatchNorm folded exactly
as `conv_bn` folds it, once per *padding class*: the parities of the inputs of the five stride-2
convs along H and along W (a function of H mod 32 and W mod 32). Within a class H, W and the
batch are dynamic axes, so one 500x375 graph serves every 4:3 landscape photo at s* = 500.
Writing a graph takes milliseconds. Each class's graph is checked against the PyTorch trunk on
a small input of the same class when it is written (a graph that disagrees is deleted and never
used), then cached as `$XDG_CACHE_HOME/mgdedup/onnx/<weights fingerprint>-<variant>.onnx`
(written atomically; the variant names the writer's version, the onnxruntime version, the
precision and the class), so later runs load it without any PyTorch forward, which would cost
0.3-1 s per new shape for oneDNN's kernel set-up. torch.onnx.export is not used: its TorchScript
exporter rejects the trunk ("convolution for kernel of unknown shape", the folded kernel), and
since ONNX Conv pads are static any exporter would need one graph per class as well.

GeM (with p*) stays in torch on the returned feature map: the same code as the PyTorch path,
and <1 % of the time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mgdedup.cpus import available_cpus
from mgdedup.embedding.onnx_cache import (  # noqa: F401 - padding_class, _verified: for tests
    GRAPH_VERSION,
    PRECISIONS,
    STRIDE2_LAYERS,
    OnnxUnavailable,
    _seal,
    _sealed,
    _verified,
    cache_dir,
    class_name,
    graph_files,
    graph_path,
    new_session,
    padding_class,
    weights_path,
)
from mgdedup.embedding.onnx_cache import import_ort as _import_ort
from mgdedup.files.atomic import write_bytes
from mgdedup.model.batchnorm import folded_conv
from mgdedup.model.fingerprint import weights_fingerprint

log = logging.getLogger(__name__)

OPSET = 17
#: max |ORT - torch| / max|torch| on the check input of a class; fp32 differences are ~1e-6
CHECK_TOLERANCE = 1e-4
#: an int8 graph is kept when its GeM vector of the check input has at least this cosine to
#: PyTorch's (a wrong graph, e.g. other pads or weights, is far below)
INT8_MIN_COSINE = 0.95
#: images per ONNX Runtime call. On CPU batch 1 ran as fast as batch 16 or faster (A/B under
#: load, 500x375: 58-78 vs 72-91 CPU ms per image through the shared arena), and the activation
#: memory ORT keeps reserved grows with the batch (~650 MB at 16 x 500x375, ~40 MB per image).
MAX_BATCH = 1
#: sessions kept per OnnxTrunk (least recently used dropped): each holds ~65 MB of weights and
#: prepacked copies, and a collection of many aspect ratios can meet 64 classes at s* = 500;
#: a dropped one is reloaded from the cached file in ~0.05 s.
MAX_SESSIONS = 16

def supports(trunk: torch.nn.Module) -> bool:
    """Only our own EfficientNet-Lite0 has a graph writer; other trunks stay in torch."""
    from mgdedup.model.trunks.efficientnet_lite import EfficientNetLite0

    return isinstance(trunk, EfficientNetLite0)


class _GraphWriter:
    """Accumulates ONNX nodes and initialisers for one padding class."""

    def __init__(self, key: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.h_bits, self.w_bits = iter(key[0]), iter(key[1])
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv_bn(self, x: str, conv: Any, bn: Any) -> str:
        """Conv with BatchNorm folded exactly as `efficientnet_lite.conv_bn` folds it, and the
        TF "same" pads of this class as static (top, left, bottom, right) attributes."""
        with torch.no_grad():
            weight, bias = folded_conv(conv.weight, bn)
            weight = weight.contiguous()
        kh, kw = conv.kernel_size
        if conv.stride == (1, 1):
            pads = [kh // 2, kw // 2, kh // 2, kw // 2]
        else:
            # stride 2: total = k - 2 for an even input, k - 1 for an odd one; extra at the end
            th, tw = kh - 2 + next(self.h_bits), kw - 2 + next(self.w_bits)
            pads = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
        w = self.const("w", weight.numpy().astype(np.float32))
        b = self.const("b", bias.numpy().astype(np.float32))
        return self.node("Conv", [x, w, b], kernel_shape=[kh, kw], strides=list(conv.stride),
                         pads=pads, group=conv.groups, dilations=[1, 1])

    def relu6(self, x: str) -> str:
        lo = self.const("zero", np.array(0.0, np.float32))
        hi = self.const("six", np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi])


def build_lite0_graph(trunk: torch.nn.Module,
                      key: tuple[tuple[int, ...], tuple[int, ...]]) -> bytes:
    """Serialized ONNX model: images (B, 3, H, W) in [0, 1] -> features (B, 1280, h, w)."""
    from onnx import TensorProto, checker, helper

    g = _GraphWriter(key)
    # (x*255 - 127)/128, as EfficientNetLite0.normalize (two ops, same constants)
    x = g.node("Mul", ["images", g.const("scale", np.array(255.0 / 128.0, np.float32))])
    x = g.node("Sub", [x, g.const("shift", np.array(127.0 / 128.0, np.float32))])
    x = g.relu6(g.conv_bn(x, trunk._conv_stem, trunk._bn0))
    for block in trunk._blocks:
        inputs = x
        if block.has_expand:
            x = g.relu6(g.conv_bn(x, block._expand_conv, block._bn0))
        x = g.relu6(g.conv_bn(x, block._depthwise_conv, block._bn1))
        x = g.conv_bn(x, block._project_conv, block._bn2)
        if block.has_skip:
            x = g.node("Add", [x, inputs])
    x = g.relu6(g.conv_bn(x, trunk._conv_head, trunk._bn1))
    g.nodes.append(helper.make_node("Identity", [x], ["features"]))
    graph = helper.make_graph(
        g.nodes, "mgdedup_efficientnet_lite0_features",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                       ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                       ["batch", trunk.feature_dim, "fh", "fw"])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mgdedup")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    checker.check_model(model)
    return model.SerializeToString()


def split_weights(model_bytes: bytes, weights_name: str) -> tuple[bytes, bytes]:
    """(graph, weights): the initialisers moved to one external file `weights_name`.

    Every padding class has the same initialisers in the same order (classes differ only in
    Conv pads), so all classes of one model share one weights file and each cached graph is a
    few kB instead of ~19 MB.
    """
    from onnx import ModelProto, TensorProto

    model = ModelProto()
    model.ParseFromString(model_bytes)
    blob = bytearray()
    for tensor in model.graph.initializer:
        raw = tensor.raw_data
        offset = len(blob)
        blob += raw
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", weights_name), ("offset", str(offset)),
                           ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return model.SerializeToString(), bytes(blob)


class OnnxTrunk:
    """Runs `trunk.forward_features` through ONNX Runtime, one session per padding class."""

    def __init__(self, trunk: torch.nn.Module, name: str = "efficientnet_lite0", *,
                 threads: int | None = None, cache: Path | None = None,
                 max_sessions: int | None = None, fingerprint: str | None = None,
                 precision: str = "fp32") -> None:
        self.ort = _import_ort()
        import importlib.util

        # the graph writer needs onnx, imported only when a graph is written (0.8 s)
        if importlib.util.find_spec("onnx") is None:
            raise OnnxUnavailable("onnx is not installed")
        if not supports(trunk):
            raise OnnxUnavailable(f"no ONNX graph writer for {type(trunk).__name__}")
        self.trunk = trunk.eval()
        self.name = name
        self.max_sessions = max(1, max_sessions or MAX_SESSIONS)
        # a worker process is handed the parent's (hashing the weights again costs ~50 ms)
        self.fingerprint = fingerprint or weights_fingerprint(trunk, name)
        self.threads = threads or available_cpus()
        self.cache = cache or cache_dir()
        self.sessions: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], Any] = OrderedDict()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        self.precision = precision
        self.ranges = None
        if precision == "int8":
            from mgdedup.embedding import int8_graph

            self.ranges = int8_graph.ranges_for(self.fingerprint) \
                if int8_graph.quantiser_available() else None
            if self.ranges is None:
                raise OnnxUnavailable(f"no int8 graph for {name} here (no calibrated ranges "
                                      "for these weights, or onnxruntime too old)")
            # the fp32 graphs it is quantised from, checked against PyTorch as always
            self.fp32 = OnnxTrunk(trunk, name, threads=threads, cache=cache, max_sessions=1,
                                  fingerprint=self.fingerprint)

    def model_path(self, key: tuple[tuple[int, ...], tuple[int, ...]]) -> Path:
        """Cache file: the weights, the graph writer and the runtime that checked it."""
        return graph_path(self.cache, self.fingerprint, self.ort.__version__, key,
                          self.precision)

    def weights_path(self) -> Path:
        """The one weights file every class's graph of this model refers to."""
        return weights_path(self.cache, self.fingerprint)

    def _write_checked(self, key: tuple[tuple[int, ...], tuple[int, ...]],
                       rewrite_weights: bool = False) -> Any:
        """Write the graph of a class, check it against PyTorch, keep the file only if good."""
        if self.precision == "int8":
            return self._write_int8(key)
        path, weights = self.model_path(key), self.weights_path()
        log.info("writing ONNX graph %s", path)
        graph, blob = split_weights(build_lite0_graph(self.trunk, key), weights.name)
        wrote_weights = False
        if rewrite_weights or not weights.is_file() or weights.stat().st_size != len(blob):
            write_bytes(weights, blob, "ONNX weights")
            wrote_weights = True
        write_bytes(path, graph, "ONNX graph")
        try:
            session = self._new_session(path)
            self._check(session, key)
        except BaseException:
            path.unlink(missing_ok=True)
            if wrote_weights:
                weights.unlink(missing_ok=True)
            raise
        _seal(weights)  # from now on trusted only while their bytes are these
        _seal(path)
        return session

    def _write_int8(self, key: tuple[tuple[int, ...], tuple[int, ...]]) -> Any:
        """Quantise the class's checked fp32 graph with the shipped ranges; keep it only if
        it still computes the trunk (`INT8_MIN_COSINE` on the check input)."""
        import onnx

        from mgdedup.embedding.int8_graph import quantised

        path = self.model_path(key)
        fp32_path = self.fp32.model_path(key)
        self.fp32.sessions.clear()
        self.fp32.session(*_class_example(key))  # writes and checks the fp32 graph if needed
        log.info("writing int8 ONNX graph %s", path)
        fp32_bytes = onnx.load(str(fp32_path)).SerializeToString()  # weights inline
        self.fp32.sessions.clear()  # its session is not needed again (~65 MB)
        write_bytes(path, quantised(fp32_bytes, self.ranges), "ONNX graph")
        try:
            session = self._new_session(path)
            self._check(session, key)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        _seal(path)
        return session

    def _new_session(self, path: Path) -> Any:
        return new_session(self.ort, path, self.threads)

    def session(self, height: int, width: int) -> Any:
        """The session for inputs of this size. A class's graph is checked against PyTorch when
        it is written; a cached file is that checked graph (its name holds the weights' digest,
        the writer's version and the runtime's), so loading it costs no PyTorch forward."""
        key = padding_class(height, width)
        if key in self.sessions:
            self.sessions.move_to_end(key)
            return self.sessions[key]
        while len(self.sessions) >= self.max_sessions:
            self.sessions.popitem(last=False)
        path, weights = graph_files(self.cache, self.fingerprint, self.ort.__version__, key,
                                    self.precision)
        if not path.is_file():
            session = self._write_checked(key)
        elif not (_sealed(path) and _sealed(weights)):
            # replaced atomically, never deleted: other processes may be loading these files
            log.warning("cached ONNX graph %s or its weights differ from what was checked; "
                        "writing them again", path)
            session = self._write_checked(key, rewrite_weights=not _sealed(weights))
        else:
            try:
                session = self._new_session(path)
            except Exception as error:  # noqa: BLE001 - ORT errors are bare Exceptions
                log.warning("cached ONNX graph %s unusable (%s); writing it again", path, error)
                path.unlink(missing_ok=True)
                session = self._write_checked(key)
        self.sessions[key] = session
        return session

    def _check(self, session: Any, key: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        """Compare with the PyTorch trunk on a small input of the same padding class."""
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(1, 3, _smallest_size(key[0]), _smallest_size(key[1]),
                            generator=generator)
        with torch.inference_mode():
            expected = self.trunk.forward_features(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        if got.shape != expected.shape:
            raise OnnxUnavailable(f"ONNX output shape {got.shape} != torch {expected.shape}")
        if self.precision == "int8":
            cosine = _gem_cosine(got, expected)
            log.debug("int8 ONNX class %s: GeM cosine to PyTorch %.4f", class_name(key), cosine)
            if not cosine >= INT8_MIN_COSINE:
                raise OnnxUnavailable(f"int8 ONNX output differs from torch (GeM cosine "
                                      f"{cosine:.3f})")
            return
        error = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-6))
        log.debug("ONNX class %s: relative max difference %.2e", class_name(key), error)
        if not error <= CHECK_TOLERANCE:
            raise OnnxUnavailable(f"ONNX output differs from torch by {error:.2e} (relative)")

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float32 in [0, 1] on CPU -> (B, C, h, w) feature map as a torch tensor."""
        batch = images.detach().to(torch.float32).contiguous().numpy()
        session = self.session(batch.shape[2], batch.shape[3])
        parts = [session.run(None, {"images": batch[i:i + MAX_BATCH]})[0]
                 for i in range(0, len(batch), MAX_BATCH)]
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


def _gem_cosine(a: np.ndarray, b: np.ndarray, p: float = 3.0) -> float:
    """Cosine of the GeM vectors of two (1, C, h, w) feature maps: what the int8 graph must
    keep (its feature maps differ from fp32 by the quantisation steps)."""
    ga = np.power(np.maximum(a, 1e-6), p).mean(axis=(2, 3)).ravel() ** (1 / p)
    gb = np.power(np.maximum(b, 1e-6), p).mean(axis=(2, 3)).ravel() ** (1 / p)
    return float(ga @ gb / max(float(np.linalg.norm(ga) * np.linalg.norm(gb)), 1e-12))


def _class_example(key: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[int, int]:
    return _smallest_size(key[0]), _smallest_size(key[1])


def _smallest_size(parities: tuple[int, ...]) -> int:
    """Smallest size >= 33 of this padding class (a 2x2 feature map at least: cheap to check)."""
    for size in range(33, 33 + 2 ** STRIDE2_LAYERS):
        if padding_class(size, size)[0] == parities:
            return size
    raise ValueError(f"no size has stride-2 parities {parities}")
