#!/usr/bin/env bash
# OpenKBP CPU training profile (issue 7), one command:
#   prepare -> train -> export -> predict the validation split -> evaluate on the original CT grid.
#
#   scripts/openkbp.sh                 36-minute profile (configs/openkbp.json)
#   scripts/openkbp.sh long            108-minute profile (configs/openkbp_long.json)
#   scripts/openkbp.sh release         the released model: a fixed step count (configs/openkbp_release.json),
#                                      then scripts/release_model.py chooses its post-processing on the
#                                      validation cases and writes it into hnseg_keras/released/
#
# Environment: OPENKBP_DATA (default ../shared/data/openkbp-hn), OPENKBP_WORK (default runs/openkbp),
# OPENKBP_BUDGET_MIN (training wall-time cap in minutes; default the config's max_train_minutes:
# 35.5 / 107.5, leaving the process start inside the issue's 36 / 108), HNSEG (default .venv/bin/hnseg).
# Every stage is resumable or skipped when done, so rerunning after an interruption continues.
# Results: $OPENKBP_WORK/<profile>/pred/evaluation/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${1:-short}
case "$PROFILE" in
  short) CONFIG=configs/openkbp.json; PREPARE=configs/openkbp_prepare.json; SHARDS_NAME=shards ;;
  long) CONFIG=configs/openkbp_long.json; PREPARE=configs/openkbp_prepare.json; SHARDS_NAME=shards ;;
  release) CONFIG=configs/openkbp_release.json; PREPARE=configs/openkbp_release_prepare.json; SHARDS_NAME=shards-release ;;
  *) echo "usage: scripts/openkbp.sh [short|long|release]" >&2; exit 2 ;;
esac
BUDGET_MIN=${OPENKBP_BUDGET_MIN:-}
DATA=${OPENKBP_DATA:-../shared/data/openkbp-hn}
WORK=${OPENKBP_WORK:-runs/openkbp}
if [[ -z "${HNSEG:-}" ]]; then
  if [[ -x .venv/bin/hnseg ]]; then HNSEG=.venv/bin/hnseg; else HNSEG=hnseg; fi
fi
PYTHON=${PYTHON:-$(dirname "$(command -v "$HNSEG")")/python}
[[ -x "$PYTHON" ]] || PYTHON=python

if [[ ! -d "$DATA/train" || ! -d "$DATA/validation" ]]; then
  echo "openkbp: no OpenKBP data at $DATA (expects train/ and validation/ case folders);" \
       "set OPENKBP_DATA to its folder. Skipping." >&2
  exit 0
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

# Prepare flags from the profile's prepare config (organs + slicing), so the JSON is the one source.
read -r -a PREPARE_FLAGS < <(PREPARE="$PREPARE" "$PYTHON" - <<'EOF'
import os
from hnseg_keras import configs
from hnseg_keras.data.prepare import PrepareConfig
c = configs.from_dict(PrepareConfig, configs.read_json(os.environ["PREPARE"]))
s = c.slicing
spacing = "none" if s.spacing_mm is None else s.spacing_mm
print("--organs", *c.organs, "--size", s.size, "--spacing", spacing, "--neighbours", s.neighbours,
      "--empty-margin", s.empty_slice_margin, "--empty-share", s.empty_slice_share)
EOF
)
ORGANS=$("$PYTHON" -c 'import sys; from hnseg_keras import configs; print(*configs.read_json(sys.argv[1])["organs"])' "$PREPARE")
SHARDS=$WORK/$SHARDS_NAME
RUN=$WORK/$PROFILE/run
EXPORT=$WORK/$PROFILE/export
PRED=$WORK/$PROFILE/pred

echo "== prepare -> $SHARDS" >&2
"$HNSEG" prepare "$DATA" --out "$SHARDS" "${PREPARE_FLAGS[@]}" --workers 2

echo "== train ($CONFIG, wall-time budget ${BUDGET_MIN:-of the config} min) -> $RUN   [load: $(cut -d' ' -f1-3 /proc/loadavg)]" >&2
# The config's max_train_minutes stops training after the epoch that would otherwise end past the
# budget (counted from the start of training: data loading, tracing and validation included).
TRAIN_START=$(date +%s)
"$HNSEG" train --config "$CONFIG" --data "$SHARDS/manifest.json" --out "$RUN" ${BUDGET_MIN:+--max-minutes "$BUDGET_MIN"}
echo "training process wall time: $(( ($(date +%s) - TRAIN_START) / 60 )) min $(( ($(date +%s) - TRAIN_START) % 60 )) s" >&2

echo "== export (final model) -> $EXPORT" >&2
[[ -f "$EXPORT/metadata.json" ]] || "$HNSEG" export "$RUN" --out "$EXPORT" --which final

if [[ "$PROFILE" == release ]]; then
  echo "== release: post-processing chosen on the validation cases -> hnseg_keras/released/" >&2
  "$PYTHON" scripts/release_model.py --run "$RUN" --export "$EXPORT" --data "$DATA" --work "$WORK/$PROFILE/choose"
  exit 0
fi

echo "== predict validation -> $PRED" >&2
"$HNSEG" predict "$DATA" --split validation --model "$EXPORT" --out "$PRED" --largest-component --force

echo "== evaluate" >&2
# shellcheck disable=SC2086  # ORGANS is a word list
"$HNSEG" evaluate --pred "$PRED" --gt "$DATA/validation" --organs $ORGANS --force
cat "$PRED/evaluation/results.md"
