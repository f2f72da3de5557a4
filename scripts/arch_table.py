"""Write the README's supported-architectures table from the test results (``tests/arch_results.py``).

    python -m pytest tests/test_architectures.py tests/test_vllm_moe.py   # records tests/artifacts/architectures.json
    python scripts/arch_table.py                                          # rewrites the table in README.md

A row per architecture that ``steerserve.anatomy`` serves; a cell is "yes" only where the check ran and
passed, "FAIL" where it ran and failed, and "-" where no test checked it. ``--check`` exits 1 when the
README's table differs from the results (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steerserve.anatomy import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "artifacts" / "architectures.json"
BEGIN, END = "<!-- arch-table:begin (scripts/arch_table.py) -->", "<!-- arch-table:end -->"
CHECKS = (("identity", "hooks idle = bit-identical"), ("unsteered", "unsteered hf = vllm"), ("add", "add"),
          ("ablate", "ablate"), ("actadd", "actadd"), ("closed_loop", "closed loop"),
          ("expert_mask_hf", "expert masks (hf)"), ("expert_mask", "expert masks hf = vllm"),
          ("gguf", "GGUF layers round-trip"))
OUTPUT = {"sum": "(hidden, residual), summed", "first": "(stream, an ignored intermediate)", "single": "one tensor"}


def table(results: dict[str, dict[str, bool]]) -> str:
    head = ["architecture", "family", "vLLM block returns", *(label for _, label in CHECKS)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in FAMILIES:
        for arch in a.architectures:
            got = results.get(arch, {})
            cells = ["-" if key not in got else "yes" if got[key] else "FAIL" for key, _ in CHECKS]
            rows.append(f"| `{arch}` | {a.family}{' (MoE)' if a.moe else ''} | {OUTPUT[a.vllm_output]} | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the README differs")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    text = args.readme.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = f"{text[:start]}\n{table(results)}\n{text[stop:]}"
    if args.check:
        return int(new != text)
    args.readme.write_text(new)
    print(f"wrote {sum(1 for line in table(results).splitlines()) - 2} rows into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
