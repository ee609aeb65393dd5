#!/usr/bin/env bash
# Creates .venv and installs the pinned packages of pyproject.toml, every package (the transitive
# ones too) at the version of infra/constraints.txt, once per version of those two files.
# Used by the README's two commands; safe to run again (it does nothing when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
# First, before minutes of installing and training: PyFlink runs the streaming job in a JVM, and
# without Java 17 the main command would fail only at the job's start. PyFlink takes $JAVA_HOME's
# java when it is set, else the one on PATH.
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
java_version=$("$JAVA" -version 2>&1) || java_version=""
java_major=0
if [[ $java_version =~ version\ \"([0-9]+)(\.([0-9]+))? ]]; then
  java_major=${BASH_REMATCH[1]}
  if [ "$java_major" = 1 ]; then java_major=${BASH_REMATCH[3]:-0}; fi  # "1.8.0_392" is Java 8
fi
if [ "$java_major" -lt 17 ]; then
  found=${java_version%%$'\n'*}
  echo "error: Java 17 or newer is required (PyFlink 2.0 runs the streaming job in a JVM); found: ${found:-no $JAVA}." \
       "Install it (Debian/Ubuntu: sudo apt-get install openjdk-17-jre-headless) or set JAVA_HOME to one" >&2
  exit 2
fi
# One bootstrap at a time (the README's two commands started together on a fresh machine, CI beside a
# developer): a second one waits, then finds everything done, instead of clearing the venv under the
# first one's pip.
exec 9>>.bootstrap.lock
flock 9
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: Python 3.11 is required (PyFlink 2.0 and the pinned set); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
# A venv whose creation was interrupted has a python but no pip, and one made by another Python (an
# older checkout's, a copied folder) cannot hold the pinned set: make it again (--clear) rather than
# fail on every later run.
if ! .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then
  if [ -e .venv ]; then
    echo "note: .venv is no working Python 3.11 environment ($(.venv/bin/python --version 2>&1 || echo 'no python')): making it again" >&2
  fi
  "$PYTHON" -m venv --clear .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml infra/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing packages into .venv (first run: a few minutes, ~2.5 GB)" >&2
  rm -f .venv/.installed-*  # another set's stamp: back to that set (an older checkout) must install it again
  # pip 23's resolver gives up on this set; the constraints' pip (26) resolves it in seconds
  .venv/bin/python -m pip install --quiet --upgrade -c infra/constraints.txt pip
  .venv/bin/python -m pip install --quiet -c infra/constraints.txt --build-constraint infra/constraints.txt -e ".[dev]"
  .venv/bin/python -m pip check
  touch "$stamp"
fi
.venv/bin/python -m infra jars >/dev/null  # Flink's Kafka connector, extracted once into var/jars
infra/install_prometheus.sh  # Prometheus + promtool from Debian's package, once; best effort (the stack runs without it)
# the recall service's gRPC stubs, generated from recall.proto (git-ignored; regenerated when stale)
.venv/bin/python -m recall_service stubs >/dev/null
