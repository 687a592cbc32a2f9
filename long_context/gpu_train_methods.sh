#!/usr/bin/env bash
# Train the long-context models with the methods themselves (kNN attention and SRF were trained with their
# approximation in their papers) and the exact LM 3x longer, then evaluate every new checkpoint with its own method
# and with exact, on one GPU in bf16 (issue 14). At most ~9 min on an H100: every stage has a time limit and
# still leaves its checkpoint when it hits it (the LM runs fit their step count to their time with --fit-time;
# nanoGPT.train saves on SIGTERM; the recall fine-tune writes its checkpoint at every evaluation).
#   OUT=/some/dir bash long_context/gpu_train_methods.sh     # writes ONE file: $OUT/longctx_methods.tar.gz
#   TINY=1 OUT=/tmp/x bash long_context/gpu_train_methods.sh # the same stages at tiny sizes on the CPU (a check)
# The archive holds long_context/:
#   ckpt/recall_long_{knn,srf}.pth(+.json): recall_exact.pth fine-tuned at n = 1024, 4096, 16384 with knn / srf
#     (the recipe of recall_long.pth, which was fine-tuned with exact);
#   ckpt/lm_{knn,srf}.pth(+.json): the character LM (block 4096) trained from scratch with knn / srf;
#   ckpt/lm_exact_long.pth(+.json): the exact LM with up to 3x the steps of lm_exact.pth (6,000);
#   eval_recall_exact/: recall_long.pth (exact-trained) with tree (3 budgets) and with knn / srf at the options
#     the method-trained models were trained with, n = 65536, 16384, 4096;
#   eval_knn/, eval_srf/: the knn- / srf-trained LM (n = 4096) and recall model (same n) with their own method
#     (budget 'trained': the training options; srf also its mid budget) beside exact;
#   eval_lm_exact_long/: the 3x LM with every causal method (tree included), 3 budgets, the layer sweep, and knn /
#     srf at the LM's training options, n = 4096; eval_lm_exact/: lm_exact.pth with knn / srf at those options;
#   each eval_*/: long_context_eval.csv, long_context_{pareto,layers}.png, the logs; train_*.log, loss curves.
# Its run on the H100 (2026-11-25 15:10 UTC) made the committed recall_long_{knn,srf}.pth, lm_knn.pth and
# assets/long_context/gpu/methods/. Two of its parts did not serve: lm_exact_long reached 1,186 steps (four lanes
# sharing the GPU: fewer than lm_exact.pth's 2,000; not kept) and lm_srf faulted in fla's kernels (srf's 'auto'
# took them at 128 features). gpu_lm_methods.sh redoes the LM part: srf alone with attn_fn='torch', and exact LMs
# with the steps of each method-trained LM.
WORK="${WORK:-/tmp/long_context_methods_work}"
source "$(dirname "$0")/gpu_common.sh"
INIT=long_context/checkpoints/recall_exact.pth
RECALL_EXACT=long_context/checkpoints/recall_long.pth
if [ "${TINY:-0}" = "1" ]; then
  KNN_RECALL='{"index":"ivf_blocks","nprobe":2,"num_samples":8}'; SRF_RECALL='{"nb_features":32}'
  SRF_LM='{"nb_features":16}'
  RECALL_FT="--lengths 64 96 --max-iters 6 --eval-interval 3 --eval-batches 1 --batch-size 4 --time-limit 20"
  LM_EXACT_ARGS="--max-iters 12 --fit-time 10"; LM_METHOD_ARGS="--fit-time 10"
  RECALL_N="--n 256 128"; LM_N="--lm-n 128"; LM_ONLY_N="--n 128"
  EVAL="--batches 1 --batch-size 2 --row-time-limit 10"; LM_EVAL="--batches 1 --batch-size 1 --row-time-limit 10"
  T_TRAIN=120; T_FT=60; B_E1=25; B_E2=20; B_E3=20; B_E4=25; B_E5=15; KILL_PAD=40
else
  # knn: the mid budget it declares at 16,384 keys for the recall model (the LM's form is in gpu_common.sh);
  # srf: its mid budget at the largest training length
  KNN_RECALL='{"index":"ivf_blocks","nprobe":8,"num_samples":128}'; SRF_RECALL='{"nb_features":256}'
  SRF_LM='{"nb_features":128}'
  # the fine-tune of recall_long.pth (600 steps of 8 sequences at n = 1024, 4096, 16384), with a time limit
  RECALL_FT="--lengths 1024 4096 16384 --batch-size 8 --max-iters 600 --learning-rate 1e-3 --warmup-iters 50 --eval-interval 200 --eval-batches 2 --time-limit 55"
  # lm_exact.pth's run (2,000 steps); the exact one 3x as long, each fitted to its time
  LM_EXACT_ARGS="--max-iters 6000 --fit-time 125"; LM_METHOD_ARGS="--max-iters 2000 --fit-time 110"
  RECALL_N="--n 65536 16384 4096"; LM_N="--lm-n 4096"; LM_ONLY_N="--n 4096"
  EVAL="--batches 3 --batch-size 8 --row-time-limit 15"; LM_EVAL="--batches 3 --batch-size 4 --row-time-limit 12"
  T_TRAIN=170; T_FT=80; B_E1=45; B_E2=30; B_E3=30; B_E4=80; B_E5=20; KILL_PAD=25
fi

# ---- 1. training: four lanes side by side on the one GPU (small models: each alone leaves it mostly idle) ----
train_recall() {  # method, options
  timeout -s TERM -k 20 "$T_FT" $PY -m long_context.train_recall $DEV $RECALL_FT --init "$INIT" --attention "$1" \
    --attention-options "$2" --out "$CKPT/recall_long_$1.pth" > "$DEST/train_recall_$1.log" 2>&1
  echo "recall_long_$1: exit $?; $(grep -h '^iter=' "$DEST/train_recall_$1.log" | tail -n 1)"
}
train_lm lm_exact_long "$T_TRAIN" $LM_EXACT_ARGS &
train_lm lm_knn "$T_TRAIN" $LM_METHOD_ARGS --attention knn --attention-options "$KNN_LM" &
train_lm lm_srf "$T_TRAIN" $LM_METHOD_ARGS --attention srf --attention-options "$SRF_LM" &
{ train_recall knn "$KNN_RECALL"; train_recall srf "$SRF_RECALL"; } &
wait
date -u +"%H:%M:%S training done"
ls -la "$CKPT"

# ---- 2. evaluation, one stage at a time (attention times are measured alone on the GPU) ----
evaluate() {  # stage name, time budget, args...
  local name=$1 budget=$2; shift 2
  timeout -k 10 "$((budget + KILL_PAD))" $PY -m long_context.evaluate $DEV --time-budget "$budget" "$@" \
    --out "$DEST/eval_$name" > "$DEST/eval_$name.log" 2>&1
  echo "eval_$name: exit $?; $(tail -n 1 "$DEST/eval_$name.log")"
  timeout 30 $PY -m long_context.plot --csv "$DEST/eval_$name/long_context_eval.csv" --out "$DEST/eval_$name" \
    >> "$DEST/eval_$name.log" 2>&1
}
# (--methods exact: exact plus, for a method-trained checkpoint, its 'trained' row; the other methods' rows of
# recall_long.pth and lm_exact.pth are in the committed eval CSVs, same seeds; the LM runs first in the stages
# that evaluate both models)
evaluate recall_exact "$B_E1" --model recall --recall-checkpoint "$RECALL_EXACT" $RECALL_N $EVAL \
  --methods tree --extra knn "$KNN_RECALL" --extra srf "$SRF_RECALL"
trained_models() {  # the models trained with method $1 whose checkpoint exists (a failed training skips its model)
  local models=""
  [ -f "$CKPT/lm_$1.pth" ] && models="lm"
  [ -f "$CKPT/recall_long_$1.pth" ] && models="$models recall"
  echo "${models:-none}"
}
evaluate knn "$B_E2" --model $(trained_models knn) --recall-checkpoint "$CKPT/recall_long_knn.pth" \
  --lm-checkpoint "$CKPT/lm_knn.pth" $RECALL_N $LM_N $EVAL --methods exact
evaluate srf "$B_E3" --model $(trained_models srf) --recall-checkpoint "$CKPT/recall_long_srf.pth" \
  --lm-checkpoint "$CKPT/lm_srf.pth" $RECALL_N $LM_N $EVAL --methods srf --budgets mid
evaluate lm_exact_long "$B_E4" --model lm --lm-checkpoint "$CKPT/lm_exact_long.pth" $LM_ONLY_N $LM_EVAL \
  --extra knn "$KNN_LM" --extra srf "$SRF_LM" --sweep first last
evaluate lm_exact "$B_E5" --model lm --lm-checkpoint "$LM_EXACT" $LM_ONLY_N $LM_EVAL --methods exact \
  --extra knn "$KNN_LM" --extra srf "$SRF_LM"
date -u +"%H:%M:%S evaluation done"
tar -czf "$OUT/longctx_methods.tar.gz" -C "$OUT" long_context && rm -rf "$DEST"
ls -la "$OUT/longctx_methods.tar.gz"
date -u +"%H:%M:%S end"
