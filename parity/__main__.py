"""`python -m parity`: run every parity check, print a table, exit 1 on any failure."""
from __future__ import annotations

import argparse
import sys
import time

from parity.checks import Result, bf16_checks, generation_checks, model_checks, training_checks
from parity.hf_checks import hf_checks, missing


def _table(results: list[Result]) -> str:
    lines = ["| check | case | max abs diff | tolerance | result |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.check} | {r.case} | {r.value:.3g} | {r.tolerance:.3g} | {'pass' if r.passed else 'FAIL'} |")
    return "\n".join(lines)


GROUPS = {"model": model_checks, "generation": generation_checks, "training": training_checks, "bf16": bf16_checks,
          "hf": hf_checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS), help="run these groups of checks (default: all)")
    args = parser.parse_args(argv)
    import absl.logging  # orbax's routine notices are absl warnings
    absl.logging.set_verbosity(absl.logging.ERROR)
    start = time.perf_counter()
    groups = list(args.only or GROUPS)
    if "hf" in groups and (why := missing()):
        print(f"hf checks skipped: {why}")
        groups.remove("hf")
    results = [r for name in groups for check in GROUPS[name]() for r in check()]
    print(_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
