"""`python -m parity`: run every parity check, print a table, exit 1 on any failure."""
from __future__ import annotations

import argparse
import sys
import time

from parity.checks import Result, bf16_checks, generation_checks, model_checks, training_checks


def _table(results: list[Result]) -> str:
    lines = ["| check | case | max abs diff | tolerance | result |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.check} | {r.case} | {r.value:.3g} | {r.tolerance:.0e} | {'pass' if r.passed else 'FAIL'} |")
    return "\n".join(lines)


GROUPS = {"model": model_checks, "generation": generation_checks, "training": training_checks, "bf16": bf16_checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS), help="run these groups of checks (default: all)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = [r for name in (args.only or GROUPS) for check in GROUPS[name]() for r in check()]
    print(_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
