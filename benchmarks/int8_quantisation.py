"""Static int8 (QDQ) quantisation of the ONNX trunk: is it fast enough, and does `dedup` still
decide the same?

Usage: python benchmarks/int8_quantisation.py [--photos ../shared/photos]
       [--work bench-out/copy-decisions] [--calibration 64] [--resolution 500]
       [--method minmax|percentile] [--json out.json]
       [--save-ranges mgdedup/assets/efficientnet-lite0-int8-ranges.json]

- Calibration: `--calibration` photos of the "fit" part of --photos (never the evaluated
  "eval" part), decoded as `index` decodes them at s*, through ONNX Runtime's calibrator
  (MinMax, or 99.999th percentile activation ranges over the photos' centres cropped to one
  shape, as the histogram collector needs); weights int8 per output channel,
  activations uint8, QDQ format (ONNX Runtime fuses it into integer convolutions). The ranges
  of one padding class's graph serve every class (the graphs differ only in their pads).
- Speed: one thread, the same decoded images (24 of the eval part) through the fp32 and the
  int8 graph in turn, best of 3 passes, milliseconds per image at s* = 224 and 500.
- Quality: the collection of `copy_decisions.py` (eval photos, look-alikes, 360 copies of 18
  kinds). It is indexed as `index` does (fp32, the shipped path); every row is embedded again
  here from the same decoded pixels through fp32 (checked equal to the index's rows) and int8
  graphs, GeM with p*, the whitening; an index whose rows are the int8 descriptors (all other
  columns the same) is written beside it. On both: mAP of copies retrieving their original,
  and `find_duplicates` at the default threshold and at 0.9 (pair precision, recall, smallest
  kind recall), as `copy_decisions.py` scores them.

`--save-ranges` writes the calibrated ranges in the form `mgdedup.embedding.int8_graph` reads
(the shipped file was written by `--method percentile --save-ranges ...`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from copy_decisions import evaluate, ranking  # noqa: E402
from copy_sets import copy_set_folder, index_folder, load_or_build, photos_of  # noqa: E402

from mgdedup.duplicates.find import find_duplicates  # noqa: E402
from mgdedup.embedding.onnx_cache import class_name, new_session, padding_class  # noqa: E402
from mgdedup.embedding.onnx_trunk import OnnxTrunk  # noqa: E402
from mgdedup.imaging.transforms import load_array  # noqa: E402
from mgdedup.index.build import update_index  # noqa: E402
from mgdedup.index.layout import IndexDir  # noqa: E402
from mgdedup.index.store import IndexStore  # noqa: E402
from mgdedup.model.registry import DEFAULT_MODEL, load_model  # noqa: E402


class Graphs:
    """fp32 and int8 sessions per padding class, the int8 ones quantised with one set of
    calibrated activation ranges (`ranges`, ONNX Runtime's calibration cache file)."""

    def __init__(self, trunk: OnnxTrunk, work: Path, ranges: Path, method: str) -> None:
        import onnxruntime as ort

        self.ort, self.trunk, self.work, self.ranges = ort, trunk, work, ranges
        self.method = method
        self.fp32: dict[str, object] = {}
        self.int8: dict[str, object] = {}
        self.quantise_seconds = 0.0

    def _fp32_model(self, shape: tuple[int, int]):
        import onnx

        self.trunk.session(*shape)  # writes and checks the class's fp32 graph when new
        return onnx.load(str(self.trunk.model_path(padding_class(*shape))))

    def calibrate(self, arrays: list[np.ndarray]) -> None:
        """Activation ranges from `arrays`, through the graph of the first array's class."""
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(arrays)

            def get_next(self) -> dict[str, np.ndarray] | None:
                item = next(self.items, None)
                return None if item is None else {"images": item[None]}

        if self.method == "percentile":
            # the histogram collector needs one shape: the centre of each, at the smallest
            h = min(a.shape[1] for a in arrays)
            w = min(a.shape[2] for a in arrays)
            arrays = [a[:, (a.shape[1] - h) // 2:(a.shape[1] - h) // 2 + h,
                        (a.shape[2] - w) // 2:(a.shape[2] - w) // 2 + w] for a in arrays]
        self.ranges.unlink(missing_ok=True)
        self._quantise(tuple(arrays[0].shape[1:]), Reader())

    def _quantise(self, shape: tuple[int, int], reader=None) -> Path:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        out = self.work / f"int8-{self.method}-{class_name(padding_class(*shape))}.onnx"
        method = CalibrationMethod.Percentile if self.method == "percentile" else \
            CalibrationMethod.MinMax
        extra = {"CalibPercentile": 99.999} if self.method == "percentile" else {}
        started = time.perf_counter()
        quantize_static(self._fp32_model(shape), str(out), reader,
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, calibration_cache_path=str(self.ranges),
                        extra_options=extra)
        self.quantise_seconds += time.perf_counter() - started
        return out

    def session(self, precision: str, shape: tuple[int, int]):
        name = class_name(padding_class(*shape))
        table = self.fp32 if precision == "fp32" else self.int8
        if name not in table:
            if precision == "fp32":
                self.trunk.session(*shape)
                path = self.trunk.model_path(padding_class(*shape))
            else:
                path = self._quantise(shape)
            table[name] = new_session(self.ort, path, 1)
        return table[name]

    def features(self, precision: str, array: np.ndarray) -> np.ndarray:
        session = self.session(precision, tuple(array.shape[1:]))
        return session.run(None, {"images": array[None]})[0]


def best_ms(graphs: Graphs, precision: str, arrays: list[np.ndarray], repeats: int = 3) -> float:
    for array in arrays:  # sessions made before timing
        graphs.features(precision, array)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for array in arrays:
            graphs.features(precision, array)
        best = min(best, time.perf_counter() - started)
    return round(1000 * best / len(arrays), 2)


def descriptors(model, resolution: int, graphs: Graphs, precision: str,
                arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(whitened descriptors, gem norms, whitening norms) as `index` computes them."""
    import torch

    from mgdedup.model.pooling import gem

    p = model.p_for(resolution)
    g = torch.cat([gem(torch.from_numpy(graphs.features(precision, a)), p, model.pool.eps)
                   for a in arrays])
    described = model.describe(g, resolution)
    return described.descriptors, described.gem_norm, described.white_norm


def with_rows(index_dir: Path, out_dir: Path, emb: np.ndarray, gem_norm: np.ndarray,
              white_norm: np.ndarray) -> Path:
    """A copy of an index whose rows hold other descriptors (every other column the same)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    source = IndexDir(index_dir)
    with source.open_store() as store:
        batch, meta = store.batch(), store.meta
    batch.embeddings, batch.gem_norm, batch.white_norm = emb, gem_norm, white_norm
    target = IndexDir(out_dir)
    with IndexStore.create(target.embeddings, meta) as store:
        store.append(batch)
    return out_dir


def decisions(index_dir: Path, copies) -> list[dict]:
    IndexDir(index_dir).verified.unlink(missing_ok=True)
    rows = []
    for threshold in (None, 0.9):
        started = time.perf_counter()
        result = find_duplicates(index_dir, threshold)
        scores = evaluate(result, copies)
        rows.append({"threshold": result.threshold, "seconds": round(time.perf_counter() -
                                                                       started, 1),
                     **{k: scores[k] for k in ("groups", "pairs", "precision", "recall",
                                               "min_kind_recall", "false_pairs")
                        if k in scores}})
    return rows


def save_ranges(cache: Path, out: Path, fingerprint: str, method: str, photos: int,
                resolution: int) -> None:
    """ONNX Runtime's calibration cache -> the ranges file `int8_graph.ranges_for` reads."""
    from mgdedup.embedding.int8_graph import RANGES_FORMAT

    def value(x) -> float:
        return float(x["data"]) if isinstance(x, dict) else float(x)

    data = json.loads(cache.read_text())["data"]
    ranges = {name: [value(v["lowest"]), value(v["highest"])] for name, v in sorted(data.items())}
    what = "99.999th percentile" if method == "percentile" else "minimum and maximum"
    out.write_text(json.dumps({
        "format": RANGES_FORMAT, "version": 1, "weights_fingerprint": fingerprint,
        "calibration": f"{what} of each activation over {photos} photos of the fit part of "
                       f"the development photo set at s* = {resolution} "
                       "(benchmarks/int8_quantisation.py --method percentile --save-ranges)",
        "ranges": ranges}, indent=0) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--work", type=Path, default=Path("bench-out/copy-decisions"))
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=500)
    parser.add_argument("--method", default="minmax", choices=("minmax", "percentile"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--save-ranges", type=Path, default=None)
    args = parser.parse_args()
    res = args.resolution

    folder = copy_set_folder(args.work, "eval", 150, 20, 0)
    copies = load_or_build(args.photos, folder, part="eval", originals=150, per_kind=20,
                           seed=0, backgrounds_from=None, same=())
    model = load_model(DEFAULT_MODEL)
    index_dir = index_folder(folder, DEFAULT_MODEL, res)
    update_index([folder], index_dir, model, DEFAULT_MODEL, res)

    work = args.work / "int8"
    work.mkdir(parents=True, exist_ok=True)
    graphs = Graphs(OnnxTrunk(model.trunk, model.info.trunk, threads=1), work,
                    work / f"ranges-{args.method}-r{res}.json", args.method)
    calibration = [load_array(p, res, with_hash=False)[0]
                   for p in photos_of(args.photos, "fit")[:args.calibration]]
    graphs.calibrate(calibration)
    if args.save_ranges is not None:
        save_ranges(graphs.ranges, args.save_ranges, graphs.trunk.fingerprint, args.method,
                    len(calibration), res)

    report: dict = {"date": date.today().isoformat(), "machine": platform.machine(),
                    "resolution": res, "method": args.method,
                    "calibration_photos": len(calibration), "speed_ms_per_image": {}}
    eval_photos = photos_of(args.photos, "eval")[:24]
    for speed_res in (224, 500):
        arrays = [load_array(p, speed_res, with_hash=False)[0] for p in eval_photos]
        report["speed_ms_per_image"][str(speed_res)] = {
            precision: best_ms(graphs, precision, arrays) for precision in ("fp32", "int8")}
    print(json.dumps(report["speed_ms_per_image"]), file=sys.stderr)

    with IndexDir(index_dir).open_store() as store:
        paths, stored = store.absolute_paths(), store.embeddings()
    arrays = [load_array(p, res, with_hash=False)[0] for p in paths]
    fp32 = descriptors(model, res, graphs, "fp32", arrays)
    int8 = descriptors(model, res, graphs, "int8", arrays)
    report["fp32_harness_max_abs_diff"] = float(np.abs(fp32[0] - stored).max())
    cosine = (fp32[0] * int8[0]).sum(axis=1)
    report["int8_vs_fp32_cosine"] = {"min": round(float(cosine.min()), 4),
                                     "mean": round(float(cosine.mean()), 4)}
    print(json.dumps({k: report[k] for k in ("fp32_harness_max_abs_diff",
                                             "int8_vs_fp32_cosine")}), file=sys.stderr)
    int8_dir = with_rows(index_dir, work / f"index-int8-{args.method}-r{res}", *int8)
    for name, where in (("fp32", index_dir), ("int8", int8_dir)):
        report[name] = {"ranking": ranking(where, copies), "decisions": decisions(where, copies)}
        print(name, json.dumps(report[name]), file=sys.stderr)
    report["quantise_seconds"] = round(graphs.quantise_seconds, 1)
    print(json.dumps(report, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
