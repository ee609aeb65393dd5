#!/usr/bin/env bash
# The test suite: sets up .venv (and fetches MovieLens-1M on first use), then runs pytest.
# Extra arguments go to pytest, e.g. infra/test.sh -k routing
set -euo pipefail
cd "$(dirname "$0")/.."
infra/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
