#!/usr/bin/env bash
# Installs the Node client's pinned packages (package-lock.json) into var/node (git-ignored).
# Does nothing when they are installed already. Needs node and npm on PATH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
target="$here/../../../var/node"
mkdir -p "$target"
if cmp -s "$here/package-lock.json" "$target/package-lock.json" && [ -d "$target/node_modules/@grpc/grpc-js" ]; then
  exit 0
fi
cp "$here/package.json" "$target/package.json"
if [ -f "$here/package-lock.json" ]; then
  cp "$here/package-lock.json" "$target/package-lock.json"
  npm ci --prefix "$target" --no-audit --no-fund --loglevel=error
else  # first install: writes the lock file to commit
  npm install --prefix "$target" --no-audit --no-fund --loglevel=error
  cp "$target/package-lock.json" "$here/package-lock.json"
fi
