#!/usr/bin/env bash
# Runs the benchmark against Flask-SocketIO and a naive flask-sock loop
# (bench/README.md). Installs what it needs: the package and bench/requirements.txt
# in .venv, and (as root, when missing) Debian's redis-server for the Redis variant.
# Arguments go to bench/run.py, e.g. `bench/run.sh --quick`.
set -euo pipefail
source "$(dirname "$0")/../scripts/venv.sh"

stamp=.venv/.bench-$(cksum < bench/requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ]; then
  python -m pip install --quiet -r bench/requirements.txt
  rm -f .venv/.bench-*
  touch "$stamp"
fi
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed to pin the processes" >&2; exit 1; }
exec python bench/run.py "$@"
