"""The trunk's ONNX graph in int8 (static QDQ), for indexing on CPU at twice the speed.

Why: the forward pass is most of `index`'s CPU time, and ONNX Runtime runs the quantised
graph 2.0-2.2x faster on this kind of CPU, with the copy decisions unchanged on the
benchmark collection (BENCHMARKS.md, "int8 quantisation of the trunk").

How: weights int8 per output channel, activations uint8 with fixed ranges, in QDQ form
(ONNX Runtime fuses it into integer convolutions). The activation ranges are calibrated
once, offline, on photos (`benchmarks/int8_quantisation.py --save-ranges`), and shipped for
the default model only (`assets/efficientnet-lite0-int8-ranges.json`, keyed by the weights'
fingerprint): quantising at run time from fixed ranges makes every machine's graph, and so
every index's rows, the same. A model without shipped ranges stays fp32.
"""

from __future__ import annotations

import inspect
import json
import logging
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

RANGES_FILE = Path(__file__).resolve().parents[1] / "assets" / "efficientnet-lite0-int8-ranges.json"
RANGES_FORMAT = "mgdedup-int8-ranges"


@lru_cache(maxsize=8)
def ranges_for(fingerprint: str, path: Path = RANGES_FILE) -> dict[str, tuple[float, float]] | None:
    """The shipped activation ranges of the trunk with these weights, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.debug("no int8 ranges (%s)", error)
        return None
    if not isinstance(data, dict) or data.get("format") != RANGES_FORMAT or \
            data.get("weights_fingerprint") != fingerprint:
        return None
    try:
        return {str(name): (float(lo), float(hi)) for name, (lo, hi) in data["ranges"].items()}
    except (KeyError, TypeError, ValueError) as error:
        log.warning("int8 ranges file %s is malformed (%s): using fp32", path, error)
        return None


@lru_cache(maxsize=1)
def quantiser_available() -> bool:
    """Whether this onnxruntime can quantise from given ranges (its calibration cache)."""
    try:
        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.calibrate import (  # noqa: F401
            TensorsData,
            save_tensors_data,
        )
    except ImportError:
        return False
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def int8_available(fingerprint: str) -> bool:
    return quantiser_available() and ranges_for(fingerprint) is not None


def quantised(model_bytes: bytes, ranges: dict[str, tuple[float, float]]) -> bytes:
    """The serialized fp32 graph `model_bytes` (weights inline) as an int8 QDQ graph."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    model = onnx.load_model_from_string(model_bytes)
    with tempfile.TemporaryDirectory(prefix="mgdedup-int8-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
            name: (np.float32(lo), np.float32(hi)) for name, (lo, hi) in ranges.items()}),
            cache)
        out = Path(tmp) / "int8.onnx"
        logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger
        try:
                quantize_static(model, str(out), None, quant_format=QuantFormat.QDQ,
                            per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=str(cache))
        finally:
            logging.disable(logging.NOTSET)
        return out.read_bytes()
