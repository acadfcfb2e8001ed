#!/usr/bin/env bash
# Fine-tune the default model (EfficientNet-Lite0) on your own unlabelled photos: the margin
# loss on augmented copies adapts the embedding to this kind of picture, distillation from
# the initial model keeps `mgdedup classify` working, and the whitenings are refitted on the
# photos at the end, so the result indexes as it is. Measure on your own data before
# adopting it (benchmarks/finetune_copies.py): on generated scenes it kept the classifier
# (top-1 agreement with the initial model 0.94-0.98) but did not reliably improve held-out
# copy retrieval (within +-0.01 mAP, BENCHMARKS.md).
#
#   train/finetune_photos.sh ~/photos [tuned.pt]
#
# Defaults as measured (batch 24 = 8 photos x 3 copies, 224 px crops, lr 1e-4); on a GPU use
# e.g. BATCH=192. Re-running resumes an interrupted run.
set -euo pipefail
PHOTOS=${1:?usage: $0 PHOTOS_DIR [OUT.pt]}
OUT=${2:-tuned.pt}
RUN_DIR=${RUN_DIR:-${OUT%.pt}.run}
BATCH=${BATCH:-24}
RESOLUTION=${RESOLUTION:-224}
EPOCHS=${EPOCHS:-2}

ARGS=(train --images "$PHOTOS" --init "${INIT:-default}" --out "$OUT" --run-dir "$RUN_DIR"
      --batch-size "$BATCH" --resolution "$RESOLUTION" --epochs "$EPOCHS"
      --workers "${WORKERS:-2}")
if [[ -f "$RUN_DIR/last.ckpt" ]]; then
  ARGS+=(--resume "$RUN_DIR/last.ckpt")
fi
mgdedup "${ARGS[@]}"

echo "index with: mgdedup index $PHOTOS --model $OUT --resolution 500"
