#!/usr/bin/env bash
# Installs Prometheus and promtool into [monitoring].prometheus_home/bin (var/prometheus/bin by
# default) from Debian's `prometheus` package (2.42 on bookworm), without installing the package:
# `apt-get download` + `dpkg -x`, so no root and no system service. Idempotent: does nothing when
# they run from there, or when prometheus and promtool are on PATH (the stack uses those then:
# infra/monitoring.py). Best effort: the stack runs without Prometheus, so where this cannot install
# it (no apt-get, no package lists) it says why and exits 0; `python -m infra up` then leaves it out.
#   MINDSTREAM_MONITORING__PROMETHEUS_HOME=DIR infra/install_prometheus.sh     install elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
skip() {
  echo "warning: Prometheus not installed: $1. The stack runs without it (\`python -m infra up\` leaves it out; the monitoring" \
       "tests fail); put prometheus and promtool (2.x) on PATH, or fix the cause and run infra/install_prometheus.sh again" >&2
  exit 0
}
# The one definition of the folder: the configuration's (infra/config.py), as the stack reads it.
HOME_DIR=$(.venv/bin/python -c 'from infra.config import load_config; print(load_config().monitoring.prometheus_home)') \
  || skip "cannot read [monitoring].prometheus_home (run infra/bootstrap.sh first)"
if "$HOME_DIR/bin/prometheus" --version >/dev/null 2>&1 && "$HOME_DIR/bin/promtool" --version >/dev/null 2>&1; then
  exit 0
fi
if prometheus --version >/dev/null 2>&1 && promtool --version >/dev/null 2>&1; then
  exit 0
fi
for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || skip "$tool not found (Debian's package is the source here)"
done
echo "==> installing Prometheus from Debian's package into $HOME_DIR/bin" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download prometheus >/dev/null 2>"$work/apt.err"); then
  # the package lists may be missing on a fresh machine; refreshing them needs root
  if [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>>"$work/apt.err"; then
    (cd "$work" && apt-get download prometheus >/dev/null 2>>"$work/apt.err") || skip "apt-get download prometheus failed: $(tail -1 "$work/apt.err")"
  else
    skip "apt-get download prometheus failed ($(tail -1 "$work/apt.err")); run 'sudo apt-get update' once"
  fi
fi
dpkg -x "$work"/prometheus_*.deb "$work/root" || skip "dpkg -x could not unpack the package"
mkdir -p "$HOME_DIR/bin"
for tool in prometheus promtool; do
  part="$HOME_DIR/bin/.$tool.$$.part"  # this process's own: two installs at once never rename each other's away
  install -m 0755 "$work/root/usr/bin/$tool" "$part"
  mv "$part" "$HOME_DIR/bin/$tool"
done
"$HOME_DIR/bin/prometheus" --version 2>&1 | head -1 >&2
