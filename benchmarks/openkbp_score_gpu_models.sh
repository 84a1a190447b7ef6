#!/usr/bin/env bash
# Score the models that benchmarks/openkbp_gpu_ablation.sh brought back, here on the CPU:
# unpack each <run>.keras.gz with its config.json and data.json, segment the 33 OpenKBP validation cases
# (`hnseg predict --largest-component`, as the profile does) and evaluate them on the original grid.
#
#   benchmarks/openkbp_score_gpu_models.sh FOLDER_WITH_KERAS_GZ DEST [RUN ...]
#
# Results: DEST/<run>/pred/evaluation/results.{md,json}; one summary line per run on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?folder with <run>.keras.gz and runs.tar.gz}
DEST=${2:?destination folder}
shift 2
DATA=${OPENKBP_DATA:-../shared/data/openkbp-hn}
HNSEG=${HNSEG:-.venv/bin/hnseg}
ORGANS="BrainStem Mandible Parotid_L Parotid_R"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
[[ -d "$DATA/validation" ]] || { echo "no OpenKBP data at $DATA; set OPENKBP_DATA" >&2; exit 2; }
runs=("$@")
if [[ ${#runs[@]} -eq 0 ]]; then
  for f in "$SRC"/*.keras.gz; do runs+=("$(basename "$f" .keras.gz)"); done
fi
mkdir -p "$DEST/.meta"
tar -xzf "$SRC"/runs*.tar.gz -C "$DEST/.meta"
for run in "${runs[@]}"; do
  dir=$DEST/$run
  mkdir -p "$dir"
  gunzip -c "$SRC/$run.keras.gz" > "$dir/final.keras"
  cp "$DEST/.meta/$run/config.json" "$DEST/.meta/$run/data.json" "$dir/"  # the run folder describes the model
  "$HNSEG" predict "$DATA" --split validation --model "$dir/final.keras" --out "$dir/pred" \
    --largest-component --force > "$dir/predict.log" 2>&1
  "$HNSEG" evaluate --pred "$dir/pred" --gt "$DATA/validation" --organs $ORGANS --force > "$dir/evaluate.log" 2>&1
  python3 - "$run" "$dir/pred/evaluation/results.json" <<'PY'
import json, statistics, sys
run, path = sys.argv[1:]
cases = json.load(open(path))["cases"].values()
organs = ["BrainStem", "Mandible", "Parotid_L", "Parotid_R"]
dice = [100 * statistics.mean(c[o]["dice"] for c in cases if c.get(o, {}).get("dice") is not None) for o in organs]
print(f"{run}: " + " ".join(f"{o} {d:.1f}" for o, d in zip(organs, dice)) + f" | mean {statistics.mean(dice):.2f}")
PY
done
