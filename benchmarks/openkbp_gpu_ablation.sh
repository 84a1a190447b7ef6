#!/usr/bin/env bash
# OpenKBP ablations on the borrowed GPU machine (Keras on JAX; it has no TensorFlow), run side by side.
# Each configuration trains for the number of steps it gets in 108 min on this project's 2-core CPU
# (S: 86 epochs x 250 = 21,500 steps; the wider S is 2.1x dearer per step there: 10,200), so the GPU
# answers "which 108-min CPU run is best" in minutes. The models come back and are scored here, on
# the CPU, by `hnseg predict` + `hnseg evaluate` on the original CT grids (results/openkbp.md).
#
# Inputs (carried, git-ignored): .gpu/whl/ (keras, optree, namex wheels), .gpu/*.npz from `hnseg arrays`.
# CONFIGS (default: all six below) picks configurations; MAX_MINUTES caps each run's training.
# Output in $OUT: <run>.keras.gz (weights, no optimizer) and runs.tar.gz (metadata, summaries, logs).
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

S="--filters 16 32 64 128 256"
WIDE="--filters 24 48 96 192 384"
NATIVE=.gpu/native_k1_train.npz
FIXED=.gpu/s391k2_train.npz
train() {  # name, arrays, flags...
  local name=$1 data=$2; shift 2
  python3 scripts/train_arrays.py "$data" --out "$RUNS/$name" --max-minutes "$MAX" --force "$@" \
    > "$RUNS/$name.log" 2>&1
  echo "$name: exit $? $(tail -n 1 "$RUNS/$name.log")"
}
flags() {  # the configurations: name -> arrays file and train_arrays.py flags
  case $1 in
    native_k1_S) echo "$NATIVE $S --steps 21500" ;;
    s391_k1_S) echo "$FIXED $S --neighbours 1 --steps 21500" ;;
    s391_k2_S) echo "$FIXED $S --neighbours 2 --steps 21500" ;;
    s391_k2_S_seed1) echo "$FIXED $S --neighbours 2 --steps 21500 --seed 1" ;;
    s391_k2_wide) echo "$FIXED $WIDE --neighbours 2 --steps 10200" ;;
    s391_k2_S_2x) echo "$FIXED $S --neighbours 2 --steps 43000" ;;
    *) echo "unknown configuration $1" >&2; return 1 ;;
  esac
}
for name in ${CONFIGS:-native_k1_S s391_k1_S s391_k2_S s391_k2_S_seed1 s391_k2_wide s391_k2_S_2x}; do
  spec=$(flags "$name") || exit 2
  # shellcheck disable=SC2086  # spec is a list of words
  train "$name" $spec ${STEPS_OVERRIDE:+--steps $STEPS_OVERRIDE} &
done
wait
for dir in "$RUNS"/*/; do
  name=$(basename "$dir")
  # gzip: a wide model's .keras is just over the 16 MiB a returned file may have
  [[ -f "$dir/final.keras" ]] && gzip -c "$dir/final.keras" > "$OUT/$name.keras.gz"
done
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*.keras' .
ls -la "$OUT"
