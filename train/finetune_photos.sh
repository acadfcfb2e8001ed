#!/usr/bin/env bash
# Fine-tune the default model (EfficientNet-Lite0) on your own unlabelled photos: the margin
# loss on augmented copies adapts the embedding to this kind of picture, distillation from
# the initial model keeps `mgdedup classify` working. Measure before adopting the result:
# on generated scenes it did not yet beat the initial model (BENCHMARKS.md). Then fit a
# whitening for the new weights (the old one does not fit them) and index with the result.
#
#   train/finetune_photos.sh ~/photos [tuned.pt]
#
# CPU-friendly defaults (batch 48 = 16 photos x 3 copies, 160 px crops); on a GPU use e.g.
# BATCH=192 RESOLUTION=224. Re-running resumes an interrupted run.
set -euo pipefail
PHOTOS=${1:?usage: $0 PHOTOS_DIR [OUT.pt]}
OUT=${2:-tuned.pt}
RUN_DIR=${RUN_DIR:-${OUT%.pt}.run}
BATCH=${BATCH:-48}
RESOLUTION=${RESOLUTION:-160}
EPOCHS=${EPOCHS:-10}

ARGS=(train --images "$PHOTOS" --init "${INIT:-default}" --out "$OUT" --run-dir "$RUN_DIR"
      --batch-size "$BATCH" --resolution "$RESOLUTION" --epochs "$EPOCHS"
      --workers "${WORKERS:-2}")
if [[ -f "$RUN_DIR/last.ckpt" ]]; then
  ARGS+=(--resume "$RUN_DIR/last.ckpt")
fi
mgdedup "${ARGS[@]}"

WHITENED=${OUT%.pt}-whitened.pt
if [[ ! -f "$WHITENED" ]]; then
  mgdedup whiten "$PHOTOS" --model "$OUT" --resolution 500 --out "$WHITENED"
fi
echo "index with: mgdedup index $PHOTOS --model $WHITENED --resolution 500"
