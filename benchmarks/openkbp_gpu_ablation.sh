#!/usr/bin/env bash
# OpenKBP ablations on the borrowed GPU machine (Keras on JAX; it has no TensorFlow), run side by side.
# Each configuration trains for the number of steps it gets in 108 min on this project's 2-core CPU
# (S: 86 epochs x 250 = 21,500 steps; the wider S is 2.1x dearer per step there: 10,200), so the GPU
# answers "which 108-min CPU run is best" in minutes. The models come back and are scored here, on
# the CPU, by `hnseg predict` + `hnseg evaluate` on the original CT grids (results/openkbp.md).
#
# Inputs (carried, git-ignored): .gpu/whl/ (keras, optree, namex wheels), .gpu/*.npz from `hnseg arrays`.
# CONFIGS (default: all six below) picks configurations; MAX_MINUTES caps each run's training;
# EPOCHS_OVERRIDE shortens every run (a smoke test).
# Output in $OUT: <run>.keras.gz (final model) and runs.tar.gz (config.json, data.json, summaries, logs).
set -uo pipefail
if ! python3 -c "import keras" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
RUNS=${RUNS:-/tmp/gpu-runs}
MAX=${MAX_MINUTES:-6}
mkdir -p "$OUT" "$RUNS"
python3 -c "import keras, jax; print('keras', keras.__version__, 'jax', jax.__version__, jax.devices())" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# `hnseg train` on arrays: the OpenKBP config (S, 80 px crops, batch 16, no warps or mixup) with a
# half-cosine schedule over EPOCHS x 250 steps, stopped by the wall-time budget.
WIDE="--set model.filters=[24,48,96,192,384]"
NATIVE=.gpu/native_k1_train.npz
K1=.gpu/s391k1_train.npz
FIXED=.gpu/s391k2_train.npz
train() {  # name, arrays, epochs of 250 steps, hnseg train flags...
  local name=$1 data=$2 epochs=$3; shift 3
  rm -rf "${RUNS:?}/$name"  # a fresh run (a finished run folder would be returned as it is)
  python3 -m hnseg_keras.cli train --data "$data" --config configs/openkbp.json --out "$RUNS/$name" \
    --epochs "${EPOCHS_OVERRIDE:-$epochs}" --steps-per-epoch 250 --max-minutes "$MAX" --set lr_schedule=cosine \
    --set pipeline.parallel_calls=4 "$@" > "$RUNS/$name.log" 2>&1
  echo "$name: exit $? $(tail -n 1 "$RUNS/$name.log")"
}
flags() {  # the configurations: name -> arrays file, epochs of 250 steps, extra flags
  case $1 in
    native_k1_S) echo "$NATIVE 86" ;;
    s391_k1_S) echo "$K1 86" ;;
    s391_k2_S) echo "$FIXED 86" ;;
    s391_k2_S_seed1) echo "$FIXED 86 --set seed=1 --set pipeline.seed=1" ;;
    s391_k2_wide) echo "$FIXED 41 $WIDE" ;;
    s391_k2_S_2x) echo "$FIXED 172" ;;
    *) echo "unknown configuration $1" >&2; return 1 ;;
  esac
}
for name in ${CONFIGS:-native_k1_S s391_k1_S s391_k2_S s391_k2_S_seed1 s391_k2_wide s391_k2_S_2x}; do
  spec=$(flags "$name") || exit 2
  # shellcheck disable=SC2086  # spec is a list of words
  train "$name" $spec &
done
wait
for dir in "$RUNS"/*/; do
  name=$(basename "$dir")
  # gzip: a returned file may have at most 16 MiB
  [[ -f "$dir/final.keras" ]] && gzip -c "$dir/final.keras" > "$OUT/$name.keras.gz"
done
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*.keras' .
ls -la "$OUT"
