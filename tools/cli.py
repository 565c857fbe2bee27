"""Blockfit's command line.

    plan --model 7b --gpu rtx4090 --vram 24            # what fits and how fast
    blockfit plan ...                                  # the same
    blockfit train --plan p.json --data tokens.bin     # run it
    blockfit simulate --plan p.json                    # predict it on any hardware

Every subcommand lives in its own module with `register(subparsers)`; this file only dispatches and turns a
UserError (bad input, impossible request) into one paragraph on stderr and its exit code: 2, or 3 when
training stopped on a non-finite loss or gradient (runtime.trainer.NonFiniteStop).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from planner.errors import UserError

# subcommand -> module with register(subparsers); modules missing from an install are skipped
SUBCOMMANDS = {
    "plan": "tools.plan_cmd",
    "train": "tools.train_cmd",
    "simulate": "tools.simulate_cmd",
    "sweep": "tools.sweep_cmd",
    "calibrate": "tools.calibrate_cmd",
    "compare": "tools.compare_cmd",
    "cheapest": "tools.cheapest_cmd",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors also exit 2, in one paragraph
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="blockfit", description="Block coordinate descent training that fits your GPU.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for mod in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        module.register(sub)
    return p


def run(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own error (already printed)
        return int(e.code or 0)
    args.argv = list(argv)   # the command line as given (train --nproc-per-node relaunches it under torchrun)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main() -> None:
    sys.exit(run(sys.argv[1:]))


def plan_main() -> None:
    """The `plan` console script: `plan ARGS` is `blockfit plan ARGS`."""
    sys.exit(run(["plan"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
