#!/usr/bin/env bash
# Evaluate every causal method, 3 budgets each, in the long-context models on one GPU in bf16 (issue 14);
# about 5 min on an H100 (each part stops cleanly at its time budget and keeps the rows it measured).
#   OUT=/some/dir bash long_context/gpu_eval.sh              # writes under $OUT/long_context/
#   TINY=1 OUT=/tmp/x bash long_context/gpu_eval.sh          # the same commands at tiny sizes on the CPU
# Checkpoints: RECALL (default long_context/checkpoints/recall_long.pth, else recall_exact.pth) and LM (default
# long_context/checkpoints/lm_exact.pth). Writes recall/long_context_eval.csv (n = 65536, 16384, 4096; layer
# sweep at 65536), lm/long_context_eval.csv (n = 4096, 1024; layer sweep at 4096), their logs, and the figures.
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
DEST="$OUT/long_context"
mkdir -p "$DEST"
PY="${PYTHON:-python}"
RECALL="${RECALL:-long_context/checkpoints/recall_long.pth}"
[ -f "$RECALL" ] || RECALL=long_context/checkpoints/recall_exact.pth
LM="${LM:-long_context/checkpoints/lm_exact.pth}"
if [ "${TINY:-0}" = "1" ]; then
  DEV="--device cpu --dtype float32 --threads 1"
  RECALL_ARGS="--n 256 128 --sweep-n 256 --batches 1 --batch-size 2 --time-budget 60 --row-time-limit 20"
  LM_ARGS="--n 128 --sweep-n 128 --batches 1 --batch-size 1 --time-budget 60 --row-time-limit 20"
else
  DEV="--device cuda --dtype bfloat16"
  RECALL_ARGS="--n 65536 16384 4096 --sweep-n 65536 --batches 4 --batch-size 8 --time-budget 180 --row-time-limit 20"
  LM_ARGS="--n 4096 1024 --sweep-n 4096 --batches 4 --batch-size 4 --time-budget 100 --row-time-limit 15"
fi
date -u +"%H:%M:%S start"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true
$PY -m long_context.evaluate --model recall --recall-checkpoint "$RECALL" $DEV $RECALL_ARGS --sweep first last \
  --out "$DEST/recall" > "$DEST/eval_recall.log" 2>&1
echo "recall: exit $?"; tail -n 2 "$DEST/eval_recall.log"
date -u +"%H:%M:%S recall done"
if [ -f "$LM" ]; then
  $PY -m long_context.evaluate --model lm --lm-checkpoint "$LM" $DEV $LM_ARGS --sweep first last \
    --out "$DEST/lm" > "$DEST/eval_lm.log" 2>&1
  echo "lm: exit $?"; tail -n 2 "$DEST/eval_lm.log"
else
  echo "no LM checkpoint at $LM: LM evaluation skipped"
fi
date -u +"%H:%M:%S lm done"
$PY -m long_context.plot --csv "$DEST"/*/long_context_eval.csv --out "$DEST" > "$DEST/plot.log" 2>&1
echo "plot: exit $?"
ls -la "$DEST" "$DEST"/*/
