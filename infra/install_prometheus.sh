#!/usr/bin/env bash
# Installs Prometheus and promtool into var/prometheus/bin from Debian's `prometheus` package
# (2.42 on bookworm), without installing the package: `apt-get download` + `dpkg -x`, so no root
# and no system service. Idempotent: does nothing when var/prometheus/bin/prometheus runs, or when
# prometheus and promtool are on PATH (the stack uses those then: infra/monitoring.py).
#   PROMETHEUS_HOME=DIR infra/install_prometheus.sh     install elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
HOME_DIR=${PROMETHEUS_HOME:-var/prometheus}
if "$HOME_DIR/bin/prometheus" --version >/dev/null 2>&1 && "$HOME_DIR/bin/promtool" --version >/dev/null 2>&1; then
  exit 0
fi
if prometheus --version >/dev/null 2>&1 && promtool --version >/dev/null 2>&1; then
  exit 0
fi
for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found: on a non-Debian machine put prometheus and promtool (2.x) on PATH or into $HOME_DIR/bin" >&2; exit 2; }
done
echo "==> installing Prometheus from Debian's package into $HOME_DIR/bin" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download prometheus >/dev/null 2>"$work/apt.err"); then
  # the package lists may be missing on a fresh machine; refreshing them needs root
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    (cd "$work" && apt-get download prometheus >/dev/null)
  else
    cat "$work/apt.err" >&2
    echo "error: apt-get download prometheus failed; run 'sudo apt-get update' once, then this script again" >&2
    exit 2
  fi
fi
dpkg -x "$work"/prometheus_*.deb "$work/root"
mkdir -p "$HOME_DIR/bin"
for tool in prometheus promtool; do
  install -m 0755 "$work/root/usr/bin/$tool" "$HOME_DIR/bin/$tool.part"
  mv "$HOME_DIR/bin/$tool.part" "$HOME_DIR/bin/$tool"
done
"$HOME_DIR/bin/prometheus" --version 2>&1 | head -1 >&2
