#!/usr/bin/env bash
# The main job on the embedded default stack: set up, train MIND+REMI on MovieLens-1M (resuming if
# a run exists), evaluate it on the held-out test users, export the ONNX user tower + item vectors
# + manifest, benchmark the user tower; then start the whole stack (python -m infra up), publish
# the model to it, replay ML-1M events through Kafka and the PyFlink job into Redis, ask the
# recall service for a few users' movies, and measure the online hit rate on the next events (each
# of their users served first). The stack keeps running: python -m infra down stops it.
#   DATASET=beauty MODEL=mind infra/run.sh     other dataset (beauty or a file, as --dataset PATH) / model
#                                              (mind_remi, mind, youtube_dnn)
#   EVENTS=20000 RATE=2000 infra/run.sh        events replayed per run (a rerun continues the replay), events/s
#   ONLINE_EVENTS=2000 infra/run.sh            events of the online hit rate's slice (0: skip that step)
#   RUN=DIR STACK_DIR=DIR infra/run.sh         the training run's folder, the stack's folder (default var/stack)
set -euo pipefail
SCRIPT=$(realpath "$0")
# Paths given from the caller's folder, before moving to the repository's:
case "${DATASET:-}" in
  ""|ml-1m|beauty) ;;  # built-in names, whatever the caller's folder holds
  *) if [ -e "$DATASET" ]; then DATASET=$(realpath "$DATASET"); fi ;;
esac
if [ -n "${RUN:-}" ]; then RUN=$(realpath -m "$RUN"); fi
if [ -n "${MINDSTREAM_CONFIG:-}" ]; then export MINDSTREAM_CONFIG=$(realpath -m "$MINDSTREAM_CONFIG"); fi
STACK_DIR=$(realpath -m "${STACK_DIR:-$(dirname "$SCRIPT")/../var/stack}")  # python -m infra up's default
# A shell that still exports this stack's configuration from an earlier run: `up` writes it again below.
if [ -n "${MINDSTREAM_CONFIG:-}" ] && [ ! -e "$MINDSTREAM_CONFIG" ] && [ "$(realpath -m "$MINDSTREAM_CONFIG")" = "$STACK_DIR/mindstream.toml" ]; then
  unset MINDSTREAM_CONFIG
fi
cd "$(dirname "$SCRIPT")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,12p' "$SCRIPT" | sed 's/^# \{0,1\}//'
  exit 0
fi
DATASET=${DATASET:-ml-1m}
MODEL=${MODEL:-mind_remi}
case "$MODEL" in  # the models with a user tower (model_export.spec.MODEL_KINDS less mostpop); no venv yet to ask
  mind_remi|mind|youtube_dnn) ;;
  *) echo "MODEL=$MODEL cannot be served (no user tower to export): use mind_remi, mind or youtube_dnn;" \
          "python -m model_export train --model mostpop trains the popularity baseline alone" >&2; exit 2 ;;
esac
infra/bootstrap.sh
EVENTS=${EVENTS:-20000}
RATE=${RATE:-2000}
ONLINE_EVENTS=${ONLINE_EVENTS:-2000}
PY=.venv/bin/python
NAME=$(basename "$DATASET"); NAME=${NAME%.*}  # ml-1m, beauty, or a file's stem (as the model version names it)
RUN=${RUN:-$($PY -c "from infra.config import load_config; print(load_config().paths.artifacts_dir)")/$NAME-$MODEL}
echo "==> training $MODEL on $DATASET into $RUN (resumes an existing run)" >&2
$PY -m model_export train --dataset "$DATASET" --model "$MODEL" --out "$RUN" --resume
echo "==> test metrics (held-out users, papers' protocol)" >&2
$PY -m model_export evaluate --model-dir "$RUN" --dataset "$DATASET" --json
echo "==> exporting (ONNX user tower, item vectors, manifest; parity-checked)" >&2
$PY -m model_export export --model-dir "$RUN" --dataset "$DATASET"
echo "==> user-tower speed" >&2
$PY -m model_export bench --export-dir "$RUN/export"

echo "==> starting the stack: broker, Redis, Milvus Lite, recall service, exporter, Prometheus" >&2
$PY -m infra up --stack-dir "$STACK_DIR" >/dev/null  # its progress goes to stderr; the status is printed at the end
export MINDSTREAM_CONFIG=$STACK_DIR/mindstream.toml
# The stack's file is the one truth for its addresses: variables this shell holds for another
# deployment (a production broker, Redis, Milvus) must not send the steps below there.
pinned=$($PY -c 'import os; from infra.stack import pinned_variables; print(" ".join(sorted(pinned_variables() & set(os.environ))))')
for name in $pinned; do
  echo "note: $name is set in this shell; the stack's own value is used instead" >&2
  unset "$name"
done
echo "==> publishing the model to the stack (its registry and Milvus collection; the alias moves)" >&2
$PY -m model_export publish --export-dir "$RUN/export"
echo "==> starting the streaming job (it waits for a published model)" >&2
$PY -m infra up --stack-dir "$STACK_DIR" >/dev/null
# A rerun continues the replay where the last one stopped: replaying old events again would only
# dead-letter them as late.
next_file=$STACK_DIR/replay-$NAME.next
START=$(cat "$next_file" 2>/dev/null || true); START=${START:-0}
echo "==> replaying $DATASET events $START..$((START + EVENTS)) at $RATE events/s into Kafka" >&2
# The position moves only after a whole replay: a failed or interrupted one is sent again.
$PY -m streaming produce --dataset "$DATASET" --start "$START" --limit "$EVENTS" --rate "$RATE" \
  | $PY -c 'import json, sys; print(json.load(sys.stdin)["next_start"])' > "$next_file.tmp"
mv "$next_file.tmp" "$next_file"
$PY -m infra demo --dataset "$DATASET" --start "$START" --limit "$EVENTS" --users 3 --n 10
if [ "$ONLINE_EVENTS" -gt 0 ]; then
  echo >&2
  $PY -m infra online-replay --dataset "$DATASET" --start "$(cat "$next_file")" --limit "$ONLINE_EVENTS" --n 50 \
    | $PY -c 'import json, sys; print(json.load(sys.stdin)["next_start"])' > "$next_file.tmp"
  mv "$next_file.tmp" "$next_file"
fi
echo >&2
echo "==> the stack keeps running:" >&2
$PY -m infra status --stack-dir "$STACK_DIR" || true
