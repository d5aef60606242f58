#!/bin/bash
# The fine-tuning question a 2-core CPU cannot answer (70 CPU-minutes per Lite0 model at
# 224 px): does fine-tuning ImageNet Lite0 end to end beat the frozen small-set ensemble on
# the real sets when compute is not the limit? Four settings x two sets x the benchmark's two
# splits, 5-fold CV each, one process per run, all on one GPU at once (16 runs: about 16 CPU
# cores for their data loaders). `--select last`: no epoch is chosen on the fold being
# scored. Compare each run's AUC with the README's small-set table (same splits, same folds).
#
# Run (on a machine with a CUDA GPU and the project installed):
#   bash research/recipe_lab/gpu_finetune.sh [DATA_ROOT (../shared/data)] [OUT (bench_out/gpu_ft)]
set -u
ROOT=${1:-../shared/data}
OUT=${2:-bench_out/gpu_ft}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
setting() {  # name, then the training options that make it
  local name=$1; shift
  for set in head_ct rsna_png; do for seed in 0 1; do
    ( OMP_NUM_THREADS=1 timeout "${LIMIT:-1800}" "$PY" benchmarks/real_data.py --datasets $set \
        --seed $seed --with-other --recipe finetune --device cuda --select last --workers 1 \
        --data-root "$ROOT" --out "$OUT/$name-$set-s$seed" "$@" \
        > "$OUT/$name-$set-s$seed.log" 2>&1 ) &
  done; done
}
setting plain --crop none --epochs 12             # the finetune recipe's defaults
setting brain12 --crop brain --epochs 12          # the small-set recipe's brain crop
setting brain30 --crop brain --epochs 30
setting brain20hi --crop brain --epochs 20 --lr 3e-3
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -E "ROC AUC|accuracy|training time" "$f"; done
