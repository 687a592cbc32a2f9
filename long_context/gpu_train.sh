#!/usr/bin/env bash
# Train the long-context models on one GPU in bf16 (issue 14); about 4 min on an H100.
#   OUT=/some/dir bash long_context/gpu_train.sh             # writes under $OUT/long_context/
#   TINY=1 OUT=/tmp/x bash long_context/gpu_train.sh         # the same steps at tiny sizes on the CPU (a check)
# Writes: lm_exact.pth(+.json) (character LM, block 4096, learned positions), recall_long.pth(+.json) (the recall
# model fine-tuned at n = 1024, 4096 and 16384; trained from scratch first if long_context/checkpoints/recall_exact.pth
# is absent), train_lm.log, train_recall.log, lm_loss_curve.csv. Each training has a time limit and still writes
# its checkpoint when it hits it.
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
DEST="$OUT/long_context"
mkdir -p "$DEST"
PY="${PYTHON:-python}"
WORK="${WORK:-/tmp/long_context_lm_work}"
if [ "${TINY:-0}" = "1" ]; then
  DEV="--device cpu --dtype float32"
  LM_ARGS="--quick"; LM_LIMIT=120
  RECALL_SCRATCH="--quick"
  RECALL_FT="--lengths 64 96 --max-iters 6 --eval-interval 3 --eval-batches 1 --batch-size 4"
  RECALL_LIMIT=120
else
  DEV="--device cuda --dtype bfloat16"
  LM_ARGS="--block-size 4096 --max-iters 2000 --set batch_size=16 --set eval_interval=500"; LM_LIMIT=170
  RECALL_SCRATCH="--lengths 32 --batch-size 256 --curriculum-iters 150 --max-iters 2000 --time-limit 60"
  RECALL_FT="--lengths 1024 4096 16384 --batch-size 8 --max-iters 600 --learning-rate 1e-3 --warmup-iters 50 --eval-interval 200 --eval-batches 2 --time-limit 60"
  RECALL_LIMIT=150
fi
date -u +"%H:%M:%S start"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true

# 1. the character LM (nanoGPT.train; SIGTERM at the limit saves its checkpoint, exported below either way)
timeout -s TERM "$LM_LIMIT" $PY -m long_context.train_lm $DEV $LM_ARGS --work-dir "$WORK" --out "$DEST/lm_exact.pth" \
  > "$DEST/train_lm.log" 2>&1
status=$?
if [ $status -ne 0 ]; then
  echo "train_lm exited with $status: exporting the last checkpoint" >> "$DEST/train_lm.log"
  $PY -m long_context.train_lm $DEV $LM_ARGS --work-dir "$WORK" --out "$DEST/lm_exact.pth" --export-only \
    >> "$DEST/train_lm.log" 2>&1
fi
cp "$WORK/loss_curve.csv" "$DEST/lm_loss_curve.csv" 2>/dev/null
tail -n 3 "$DEST/train_lm.log"
date -u +"%H:%M:%S LM done"

# 2. the recall model: from scratch if none is committed, then fine-tuned at long n
INIT=long_context/checkpoints/recall_exact.pth
{
  if [ ! -f "$INIT" ]; then
    INIT="$DEST/recall_exact.pth"
    timeout "$RECALL_LIMIT" $PY -m long_context.train_recall $DEV $RECALL_SCRATCH --out "$INIT"
  fi
  timeout "$RECALL_LIMIT" $PY -m long_context.train_recall $DEV $RECALL_FT --init "$INIT" --out "$DEST/recall_long.pth"
} > "$DEST/train_recall.log" 2>&1
tail -n 3 "$DEST/train_recall.log"
date -u +"%H:%M:%S recall done"
ls -la "$DEST"
