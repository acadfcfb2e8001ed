#!/usr/bin/env bash
# MultiGrain ResNet-50 as in the paper (p=3, lam=0.5, m=3, |B|=512, 120 epochs, lr 0.2 x0.1 at
# 30/60/90) on ImageNet in the ImageFolder layout (ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*).
#
#   train/paper_resnet50.sh /data/imagenet            # all GPUs of this machine
#   GPUS=1 train/paper_resnet50.sh /data/imagenet     # one GPU (same global batch of 512)
#   AUGMENT=autoaugment train/paper_resnet50.sh ...   # the paper's "AA" row
#
# Re-running the same command after an interruption resumes from the last checkpoint.
set -euo pipefail
ROOT=${1:?usage: $0 IMAGENET_ROOT [extra mgdedup train flags]}
shift
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS=$(( GPUS > 0 ? GPUS : 1 ))
OUT=${OUT:-weights/mg-r50-p3-lam0.5.pt}
RUN_DIR=${RUN_DIR:-${OUT%.pt}.run}
AUGMENT=${AUGMENT:-full}
WORKERS=${WORKERS:-8}

ARGS=(train --imagenet "$ROOT" --out "$OUT" --run-dir "$RUN_DIR" --augment "$AUGMENT"
      --batch-size 512 --repeats 3 --lam 0.5 --p 3 --epochs 120 --milestones 30,60,90
      --workers "$WORKERS")
if [[ -f "$RUN_DIR/last.ckpt" ]]; then
  ARGS+=(--resume "$RUN_DIR/last.ckpt")
fi

if (( GPUS > 1 )); then
  exec torchrun --standalone --nproc-per-node "$GPUS" -m mgdedup "${ARGS[@]}" "$@"
else
  exec mgdedup "${ARGS[@]}" "$@"
fi
