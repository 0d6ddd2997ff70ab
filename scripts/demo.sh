#!/usr/bin/env bash
# Train -> archive -> serve -> classify held-out images over HTTP -> stop. Run via `make demo`.
#   DATA        ImageFolder root (train/ [val/] [test/]); empty: sklearn digits written to data/digits
#   MODEL       model name (default: the data folder's name)
#   TRAIN_ARGS  extra training flags (python -m training.train --help)
#   ARCHIVE_ARGS archive flags (python -m training.archive --help); default: none, i.e. the
#               archive's default --backend auto (the fastest back-end on this CPU among those
#               within 1 point of fp32 top-1; model-config.yaml says which and why)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-}
if [ -z "$DATA" ]; then
  DATA=data/digits
  [ -d "$DATA/train" ] || $PY -m scripts.make_digits "$DATA"
fi
DATA=${DATA%/}
MODEL=${MODEL:-$(basename "$DATA")}
RUN=runs/$MODEL
HELD_OUT=$DATA/test
[ -d "$HELD_OUT" ] || HELD_OUT=$DATA/val
[ -d "$HELD_OUT" ] || HELD_OUT=$DATA/train

start=$(date +%s)
echo "== 1/4 train $MODEL on $DATA -> $RUN"
# shellcheck disable=SC2086
$PY -m training.train --data-dir "$DATA" --output-dir "$RUN" ${TRAIN_ARGS:-}
train_s=$(( $(date +%s) - start ))
echo "== 2/4 archive -> model_store/$MODEL.mar"
# shellcheck disable=SC2086
$PY -m training.archive --checkpoint "$RUN/checkpoint_best.pt" --model-name "$MODEL" ${ARCHIVE_ARGS:-}
echo "== 3/4 start TorchServe"
trap '$PY -m scripts.serve stop' EXIT
$PY -m scripts.serve start --models "$MODEL=$MODEL.mar"
echo "== 4/4 classify every image of $HELD_OUT over HTTP"
$PY -m scripts.classify --model "$MODEL" "$HELD_OUT" --show 3 --topk 3 --output "$RUN/http_eval.json"
echo "training took ${train_s} s, the whole demo $(( $(date +%s) - start )) s; outputs in $RUN"
echo "serve it again with: make serve MODEL=$MODEL"
