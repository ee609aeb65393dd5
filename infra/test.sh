#!/usr/bin/env bash
# The test suite: sets up .venv (and fetches MovieLens-1M on first use), then runs pytest.
# Extra arguments go to pytest, e.g. infra/test.sh -k routing; test paths may be given from any
# folder (they are made absolute before the script moves to the repository's root).
set -euo pipefail
args=()
value_of=""  # the option whose value this argument is: an expression, never a path
for arg in "$@"; do
  path=${arg%%::*}
  if [ -z "$value_of" ] && [ -n "$path" ] && [ -e "$path" ]; then arg="$(realpath "$path")${arg#"$path"}"; fi
  case "$arg" in -k|-m|-p|-o) value_of=$arg ;; *) value_of="" ;; esac
  args+=("$arg")
done
if [ -n "${MINDSTREAM_CONFIG:-}" ]; then export MINDSTREAM_CONFIG=$(realpath -m "$MINDSTREAM_CONFIG"); fi
cd "$(dirname "$0")/.."
infra/bootstrap.sh
exec .venv/bin/python -m pytest -q "${args[@]}"
