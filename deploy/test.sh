#!/usr/bin/env bash
# Install everything (including test tools), then lint, type-check and run the whole test suite on the
# real default model. Extra arguments go to pytest (e.g. -k openai -x).
set -euo pipefail
cd "$(dirname "$0")/.."
STEERSERVE_EXTRAS=dev bash deploy/install.sh
. .venv/bin/activate
ruff check .
mypy steerserve
python -m pytest -q -rs "$@"
