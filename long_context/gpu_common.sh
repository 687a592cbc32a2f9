# Sourced by gpu_train_methods.sh and gpu_lm_methods.sh (not run on its own): the output folders, the python, the
# device arguments (TINY=1: the CPU at tiny sizes), the LM recipe and knn's LM options both scripts train with, and
# train_lm. The caller sets WORK (its training folders) before calling train_lm.
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
DEST="$OUT/long_context"
CKPT="$DEST/ckpt"
mkdir -p "$CKPT"
PY="${PYTHON:-python}"
LM_EXACT=long_context/checkpoints/lm_exact.pth
if [ "${TINY:-0}" = "1" ]; then
  DEV="--device cpu --dtype float32 --threads 1"
  LM_ARGS="--quick"
  KNN_LM='{"index":"ivf_blocks","nprobe":2,"num_samples":8}'
else
  DEV="--device cuda --dtype bfloat16 --threads 4"
  # lm_exact.pth's recipe (16 x 4,096 characters a step, lr 2e-3, 100 warm-up steps, cosine over max_iters)
  LM_ARGS="--block-size 4096 --set batch_size=16 --set eval_interval=500"
  # knn on the GPU trains with its routed device index (faiss is CPU-only), nprobe 8 key blocks per query block
  KNN_LM='{"index":"ivf_blocks","nprobe":8,"num_samples":64}'
fi
date -u +"%H:%M:%S start"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null || true

train_lm() {  # name, time limit, extra args...: train, export the checkpoint even after a kill
  local name=$1 limit=$2; shift 2
  timeout -s TERM -k 20 "$limit" $PY -m long_context.train_lm $DEV $LM_ARGS "$@" --work-dir "$WORK/$name" \
    --out "$CKPT/$name.pth" > "$DEST/train_$name.log" 2>&1
  local status=$?
  if [ $status -ne 0 ]; then
    echo "train_lm exited with $status: exporting the last checkpoint" >> "$DEST/train_$name.log"
    $PY -m long_context.train_lm $DEV $LM_ARGS "$@" --work-dir "$WORK/$name" --out "$CKPT/$name.pth" --export-only \
      >> "$DEST/train_$name.log" 2>&1
  fi
  cp "$WORK/$name/loss_curve.csv" "$DEST/${name}_loss_curve.csv" 2>/dev/null
  echo "$name: exit $status; $(grep -h 'ms per step' "$DEST/train_$name.log" | tail -n 1)"
}
