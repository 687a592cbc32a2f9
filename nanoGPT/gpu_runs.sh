#!/usr/bin/env bash
# The GPU measurements of nanoGPT/README.md, run on one lent H100 in a single call (budget ~7 minutes):
#  (a) the GPU config (config/train_shakespeare_char.py, 5000 iters) with exact attention, then every causal
#      method swapped into that model (nanoGPT.evaluate --attention=all) and a short sample;
#  (b) concurrently, the CPU config trained from scratch with each method (nanoGPT.compare_training), one
#      process per method on the same GPU.
# Usage: OUT=<folder> PY=python3 bash nanoGPT/gpu_runs.sh   (from the repository root); results in
# $OUT/gpu_results.tgz
set -u
PY=${PY:-python3}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-430} ))
left() { local s=$(( DEADLINE - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }  # timeout 0 would mean none
export PYTHONPATH=. OMP_NUM_THREADS=2
nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY -m nanoGPT.data.shakespeare_char.prepare
mkdir -p "$OUT/gpu_exact" "$OUT/compare"
# faiss is not in the GPU image, so knn is left out here (it runs on the CPU).
METHODS=${METHODS:-exact kdeformer performer reformer sblocal srf uniform}
(
  timeout $(left) $PY -m nanoGPT.train config/train_shakespeare_char.py --out_dir=/tmp/gpu_exact --progress=False \
    "--attention_options={'check_finite': False}" > "$OUT/gpu_exact/train.log" 2>&1
  cp /tmp/gpu_exact/loss_curve.csv "$OUT/gpu_exact/"
  timeout $(left) $PY -m nanoGPT.evaluate --out_dir=/tmp/gpu_exact --attention=all --device=cuda --max_batches=20 \
    "--methods=[$(echo $METHODS | sed "s/\([a-z]*\)/'\1'/g; s/ /, /g")]" --csv="$OUT/gpu_exact/swap_eval.csv" \
    > "$OUT/gpu_exact/swap_eval.log" 2>&1
  timeout $(left) $PY -m nanoGPT.sample --out_dir=/tmp/gpu_exact --device=cuda --num_samples=1 --max_new_tokens=500 \
    > "$OUT/gpu_exact/sample.txt" 2>&1
) &
for m in $METHODS; do
  timeout $(left) $PY -m nanoGPT.compare_training --methods $m --device cuda --out "$OUT/compare/$m" \
    --runs_dir /tmp/compare_runs --no-progress > "$OUT/compare/$m.log" 2>&1 &
done
wait
# Only 8 files come back from the lent machine: pack the results (and the per-method loss curves) into one.
mkdir -p "$OUT/gpu_exact/runs"
for d in /tmp/compare_runs/*/; do mkdir -p "$OUT/gpu_exact/runs/$(basename $d)"; cp "$d/loss_curve.csv" "$OUT/gpu_exact/runs/$(basename $d)/"; done
tar czf "$OUT/gpu_results.tgz" -C "$OUT" gpu_exact compare && rm -rf "$OUT/gpu_exact" "$OUT/compare"
nvidia-smi --query-gpu=name,memory.used --format=csv
echo "done with $(left) s left"
