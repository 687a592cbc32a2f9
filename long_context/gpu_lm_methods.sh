#!/usr/bin/env bash
# The LM trained with srf alone on the GPU, and exact LMs trained for exactly as many steps as each method-trained
# LM (the same recipe and schedule but the attention: a like-for-like baseline), all evaluated at n = 4096 in bf16
# (issue 14); < 4 min on an H100. Every stage has a time limit and leaves its checkpoint when it hits it.
#   OUT=/some/dir bash long_context/gpu_lm_methods.sh       # writes ONE file: $OUT/longctx_lm_methods.tar.gz
#   TINY=1 OUT=/tmp/x bash long_context/gpu_lm_methods.sh   # the same stages at tiny sizes on the CPU (a check)
# srf runs with attn_fn='torch': its 'auto' took fla's chunk kernels at 128 features (it compared the head size,
# 32, with its 64-feature limit; fixed in 55a3535), which faulted in training (illegal memory access, 15:10 UTC).
# The archive holds long_context/: ckpt/lm_srf.pth, ckpt/lm_exact_steps<S>.pth (S = the steps of lm_knn.pth and of
# lm_srf.pth) with manifests; eval/long_context_eval.csv + figures (lm_exact.pth, lm_knn.pth, lm_srf.pth and the
# exact baselines, each with exact, its own method ('trained'), tree mid and knn / srf at the LM training options);
# the logs and loss curves; srf_backend_check.log (CUDA only, last: srf fwd+bwd at the LM's shape with attn_fn
# torch, fla at 64 and at 128 features, under CUDA_LAUNCH_BLOCKING=1).
WORK="${WORK:-/tmp/long_context_lm_methods_work}"
source "$(dirname "$0")/gpu_common.sh"
LM_KNN=long_context/checkpoints/lm_knn.pth
if [ "${TINY:-0}" = "1" ]; then
  SRF_FIT="--fit-time 5"; SRF_LM='{"nb_features":16,"attn_fn":"torch"}'
  EVAL="--n 128 --batches 1 --batch-size 1 --row-time-limit 10"
  T_SRF=90; T_EXACT=60; B_EVAL=40; T_CHECK=0
else
  SRF_FIT="--max-iters 2000 --fit-time 55"; SRF_LM='{"nb_features":128,"attn_fn":"torch"}'
  EVAL="--n 4096 --batches 3 --batch-size 4 --row-time-limit 12"
  T_SRF=95; T_EXACT=45; B_EVAL=30; T_CHECK=30
fi

steps_of() {  # the steps a checkpoint's training ran (its manifest)
  $PY -c "import json, sys; print(json.load(open(sys.argv[1] + '.json'))['final']['iter'])" "$1" 2>/dev/null
}

# 1. the LM with srf, alone on the GPU, its steps fitted to the time
train_lm lm_srf "$T_SRF" $SRF_FIT --attention srf --attention-options "$SRF_LM"
# 2. exact LMs with the steps of each method-trained LM (no fitting: the same max_iters, so the same schedule;
#    lm_exact.pth itself where the steps are its own)
CKPTS="$LM_EXACT $LM_KNN"
exact_steps=$(steps_of "$LM_EXACT")
[ -f "$CKPT/lm_srf.pth" ] && CKPTS="$CKPTS $CKPT/lm_srf.pth"
for model in $LM_KNN "$CKPT/lm_srf.pth"; do
  steps=$(steps_of "$model")
  [ -n "$steps" ] && [ "$steps" != "$exact_steps" ] || continue
  [ -f "$CKPT/lm_exact_steps$steps.pth" ] && continue
  train_lm "lm_exact_steps$steps" "$T_EXACT" --max-iters "$steps"
  [ -f "$CKPT/lm_exact_steps$steps.pth" ] && CKPTS="$CKPTS $CKPT/lm_exact_steps$steps.pth"
done
date -u +"%H:%M:%S training done"
ls -la "$CKPT"

# 3. every LM: exact, its own method (a method-trained one), tree mid, knn / srf at the LM training options
timeout -k 10 "$((B_EVAL + 15))" $PY -m long_context.evaluate $DEV --model lm --lm-checkpoint $CKPTS $EVAL \
  --methods tree --budgets mid --extra knn "$KNN_LM" --extra srf "$SRF_LM" --time-budget "$B_EVAL" \
  --out "$DEST/eval" > "$DEST/eval.log" 2>&1
echo "eval: exit $?; $(tail -n 1 "$DEST/eval.log")"
timeout 30 $PY -m long_context.plot --csv "$DEST/eval/long_context_eval.csv" --out "$DEST/eval" >> "$DEST/eval.log" 2>&1
date -u +"%H:%M:%S evaluation done"

# 4. (CUDA) which srf linear-attention core faults: fwd+bwd at the LM's shape, the expected fault last
if [ "$T_CHECK" -gt 0 ]; then
  CUDA_LAUNCH_BLOCKING=1 timeout -k 5 "$T_CHECK" $PY - > "$DEST/srf_backend_check.log" 2>&1 <<'EOF'
import time, torch, common
from common.linear_attention import resolve_backend
q = torch.randn(16, 4, 4096, 32, device="cuda", dtype=torch.bfloat16)
print("resolve_backend('auto', q of head size 32, causal, 128 features) ->",
      resolve_backend("auto", q, True, n_features=128), flush=True)
for attn_fn, m in (("torch", 128), ("fla", 64), ("fla", 128)):
    x = [torch.randn(16, 4, 4096, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    method = common.get_attention("srf", nb_features=m, attn_fn=attn_fn, seed=0)
    t0 = time.perf_counter()
    try:
        method(*x, causal=True).float().square().mean().backward()
        torch.cuda.synchronize()
        print(f"attn_fn={attn_fn} nb_features={m}: ok ({time.perf_counter() - t0:.1f} s)", flush=True)
    except Exception as err:
        print(f"attn_fn={attn_fn} nb_features={m}: {type(err).__name__}: {str(err)[:300]}", flush=True)
        break
EOF
  echo "srf backend check: exit $?"; cat "$DEST/srf_backend_check.log"
fi
tar -czf "$OUT/longctx_lm_methods.tar.gz" -C "$OUT" long_context && rm -rf "$DEST"
ls -la "$OUT/longctx_lm_methods.tar.gz"
date -u +"%H:%M:%S end"
