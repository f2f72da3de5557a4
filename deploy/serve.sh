#!/usr/bin/env bash
# Serve the default model (SmolLM2-135M-Instruct) with steering on http://127.0.0.1:8000.
# Extra arguments go to `steerserve serve` (e.g. --host 0.0.0.0 --port 9000 --model PATH --engine hf).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
exec .venv/bin/steerserve serve "$@"
