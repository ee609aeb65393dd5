#!/usr/bin/env bash
# Creates .venv and installs the pinned packages of pyproject.toml, once per pyproject version.
# Used by the README's two commands; safe to run again (it does nothing when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: Python 3.11 is required (PyFlink 2.0 and the pinned set); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
# A venv whose creation was interrupted has a python but no pip: make it again (--clear) rather than
# fail on every later run.
.venv/bin/python -m pip --version >/dev/null 2>&1 || "$PYTHON" -m venv --clear .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing packages into .venv (first run: a few minutes, ~2.5 GB)" >&2
  # pip 23's resolver gives up on this set; pip >= 26 resolves it in seconds
  .venv/bin/python -m pip install --quiet --upgrade "pip>=26"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  .venv/bin/python -m pip check
  touch "$stamp"
fi
.venv/bin/python -m infra jars >/dev/null  # Flink's Kafka connector, extracted once into var/jars
infra/install_prometheus.sh  # Prometheus + promtool from Debian's package into var/prometheus, once
# the recall service's gRPC stubs, generated from recall.proto (git-ignored; regenerated when stale)
.venv/bin/python -m recall_service stubs >/dev/null
