#!/usr/bin/env bash
# Install everything (including test tools), then lint, type-check and run the whole test suite on the
# real default model. Extra arguments go to pytest (e.g. -k openai -x).
# The live-server tests run on the engine `serve` picks (vllm where installed); when that is vllm, the
# HTTP tests run a second time on the hf engine, so both engines are checked from the client's side.
set -euo pipefail
cd "$(dirname "$0")/.."
STEERSERVE_EXTRAS=dev bash deploy/install.sh
. .venv/bin/activate
ruff check .
mypy steerserve
python -m pytest -q -rs --durations=25 "$@"
if [ $# -eq 0 ] && python -c "import vllm" 2>/dev/null; then
  STEERSERVE_TEST_ENGINE=hf python -m pytest -q -rs tests/test_api.py tests/test_openai_client.py tests/test_openai_parity.py
fi
# The README's supported-architectures table must be what this run's tests recorded.
if [ $# -eq 0 ] && [ -f tests/artifacts/architectures.json ]; then
  python scripts/arch_table.py --check || { echo "README's architecture table differs from this run's results: run python scripts/arch_table.py" >&2; exit 1; }
fi
