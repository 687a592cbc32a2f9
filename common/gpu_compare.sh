#!/usr/bin/env bash
# The comparison on a lent GPU at long sequences, in one call (about 9 minutes). Usage, from the repository root:
#   OUT=<folder> PY=python3 bash common/gpu_compare.sh
# Writes $OUT/compare_n<N>.csv per length and $OUT/gpu_compare.log; re-plot them here with
#   python -m common.compare --from_csv <files> --out assets/gpu
# Every method runs at n = 4096; tree (which runs on the host CPU: its descent is index bookkeeping) is left out
# from n = 16,384 on, and knn (whose faiss flat search runs on the host CPU: faiss-cpu, as there is no faiss in
# the GPU image) and uniform (its gathers of B H n l D floats need 64 GiB) at n = 65,536. NS="16384" runs one length.
set -u
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi -L
$PY -c "import torch, faiss; print('torch', torch.__version__, 'faiss', faiss.__version__)"
run() {  # run N SECONDS [method ...]
  local n=$1 limit=$2; shift 2
  timeout "$limit" $PY -m common.compare --device cuda --n "$n" --inputs gaussian clustered --no-progress \
    --out "/tmp/compare_$n" ${@:+--methods "$@"} >> "$OUT/gpu_compare.log" 2>&1
  echo "n=$n exit $?" | tee -a "$OUT/gpu_compare.log"
  cp "/tmp/compare_$n/compare.csv" "$OUT/compare_n$n.csv" 2>/dev/null
}
for n in ${NS:-4096 16384 65536}; do
  case $n in
    4096) run 4096 100 ;;
    16384) run 16384 200 exact kdeformer knn performer reformer sblocal srf uniform ;;
    65536) run 65536 300 exact kdeformer performer reformer sblocal srf ;;
  esac
done
