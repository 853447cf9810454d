"""`python -m parity`: run the parity checks, print a table, exit 1 on any failure.

  python -m parity                                   # every check of the harness, on models it builds
  python -m parity --only model bf16                 # some groups
  python -m parity --checkpoint out/shakespeare      # a checkpoint of yours: run folder, ckpt.pt,
                                                     # .safetensors or Hugging Face folder
  python -m parity --checkpoint ckpt.pt --text input.txt --json   # + real text, one JSON object for CI

Exit status: 0 every row passed; 1 a row failed, or the weights/logits hold NaN/Inf (one line
names the tensor); 2 the checkpoint or an argument cannot be used (one line says why).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from jaxgpt import cli
from jaxgpt.config import CliParser
from jaxgpt.errors import UserError
from parity.checks import Result, bf16_checks, generation_checks, model_checks, training_checks
from parity.hf_checks import hf_checks, missing
from parity.recipe_checks import recipe_checks


def _table(results: list[Result]) -> str:
    lines = ["| check | case | value | tolerance | result |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.check} | {r.case} | {r.value:.3g} | {r.tolerance:.3g} | {'pass' if r.passed else 'FAIL'} |")
    return "\n".join(lines)


GROUPS = {"model": model_checks, "generation": generation_checks, "training": training_checks, "bf16": bf16_checks,
          "recipe": recipe_checks, "hf": hf_checks}


def check_user_checkpoint(args: argparse.Namespace) -> int:
    from parity.report import NonFinite, check_checkpoint

    try:
        report = check_checkpoint(args.checkpoint, text=args.text, tokens=args.tokens, tolerance=args.tolerance,
                                  which=args.which)
    except NonFinite as e:
        if args.json:
            print(json.dumps({"checkpoint": args.checkpoint, "passed": False, "error": str(e)}))
        else:
            print(f"FAIL: {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json()) if args.json else report.table())
    if not args.json:
        print(f"\n{'all rows passed' if report.passed else 'FAILED'}: {args.checkpoint}")
    return 0 if report.passed else 1


def main(argv: list[str]) -> int:
    parser = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS), help="run these groups of checks (default: all)")
    parser.add_argument("--checkpoint", help="check this checkpoint instead of the harness's own models")
    parser.add_argument("--which", choices=["best", "latest"], default="best", help="which checkpoint of a run folder")
    parser.add_argument("--text", help="--checkpoint: also compare logits on this UTF-8 text file")
    parser.add_argument("--tokens", type=int, help="--checkpoint: decoding rows length (default: block_size + 32)")
    parser.add_argument("--tolerance", type=float, help="--checkpoint: loosen the logits tolerance to this (said so)")
    parser.add_argument("--json", action="store_true", help="--checkpoint: print one JSON object")
    args = parser.parse_args(argv)
    if args.checkpoint:
        if args.only:
            raise UserError("--only selects the harness's own groups; it does not combine with --checkpoint")
        return check_user_checkpoint(args)
    if args.text or args.tokens or args.tolerance or args.json:
        raise UserError("--text, --tokens, --tolerance and --json go with --checkpoint")
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
    cli.run(main)
