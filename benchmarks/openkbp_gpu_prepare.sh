#!/usr/bin/env bash
# Build .gpu/ (git-ignored) for benchmarks/openkbp_gpu_ablation.sh: the wheels the GPU machine lacks
# (it has JAX but no Keras) and the OpenKBP train split as arrays, native and 3.91 mm / k = 2 and k = 1.
# Shards are prepared first where missing (~4 min each on 2 cores). Carry .gpu with the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${OPENKBP_DATA:-../shared/data/openkbp-hn}
WORK=${OPENKBP_WORK:-runs/openkbp}
HNSEG=${HNSEG:-.venv/bin/hnseg}
[[ -d "$DATA/train" ]] || { echo "no OpenKBP data at $DATA; set OPENKBP_DATA" >&2; exit 2; }
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
mkdir -p .gpu/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl keras==3.15.1 optree==0.20.0 namex==0.1.0
ORGANS="BrainStem Mandible Parotid_L Parotid_R"
COMMON="--size 96 --empty-margin 3 --empty-share 0.1 --workers 2"
# shellcheck disable=SC2086
[[ -f "$WORK/shards/manifest.json" ]] || "$HNSEG" prepare "$DATA" --out "$WORK/shards" --organs $ORGANS \
  --spacing none --neighbours 1 $COMMON
# shellcheck disable=SC2086
[[ -f "$WORK/shards_s391k2/manifest.json" ]] || "$HNSEG" prepare "$DATA" --out "$WORK/shards_s391k2" \
  --organs $ORGANS --spacing 3.91 --neighbours 2 $COMMON
"$HNSEG" arrays "$WORK/shards" --out .gpu/native_k1_train.npz --force
"$HNSEG" arrays "$WORK/shards_s391k2" --out .gpu/s391k2_train.npz --force
"$HNSEG" arrays "$WORK/shards_s391k2" --out .gpu/s391k1_train.npz --neighbours 1 --force
du -sh .gpu
