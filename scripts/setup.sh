#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv with the pinned requirements (offline-capable, CPU torch).
# `--test` also installs Debian's Chromium + driver for the headless-browser test (needs root/apt).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: /usr/bin/chromium missing and apt-get unavailable: the browser test will be skipped" >&2
  fi
fi
