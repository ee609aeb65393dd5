#!/usr/bin/env bash
# The main job on the embedded default stack. Today (model issue): set up, train MIND+REMI on
# MovieLens-1M (resuming if a run exists), evaluate it on the held-out test users, export the
# ONNX user tower + item vectors + manifest, and benchmark the user tower.
#   DATASET=beauty MODEL=mind infra/run.sh     other dataset / model
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
infra/bootstrap.sh
DATASET=${DATASET:-ml-1m}
MODEL=${MODEL:-mind_remi}
RUN=${RUN:-var/artifacts/$DATASET-$MODEL}
PY=.venv/bin/python
echo "==> training $MODEL on $DATASET into $RUN (resumes an existing run)" >&2
$PY -m model_export train --dataset "$DATASET" --model "$MODEL" --out "$RUN" --resume
echo "==> test metrics (held-out users, papers' protocol)" >&2
$PY -m model_export evaluate --model-dir "$RUN" --dataset "$DATASET" --json
echo "==> exporting (ONNX user tower, item vectors, manifest; parity-checked)" >&2
$PY -m model_export export --model-dir "$RUN" --dataset "$DATASET"
echo "==> user-tower speed" >&2
$PY -m model_export bench --export-dir "$RUN/export"
echo "==> done: artifacts in $RUN/export (manifest.json lists version, dims, K, metrics, hashes)" >&2
