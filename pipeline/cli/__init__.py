"""Command line: `python -m pipeline <command>` (also the `m2otca-pipeline` console script).

Every command is a thin wrapper over a library function. Bad input (a `PipelineError`: slide,
sheet, config or option, annotation file, trained run; or an input file that does not exist)
exits 2 with ONE line on stderr naming the slide or file and the cause; anything else exits 1,
also with one line (a traceback only with --debug). `--record-failure` instead writes a failed
store for a slide error, so a workflow goes on with the other slides.

The commands live in one module per stage, as the workflow's rule files and the package's
subpackages do (tiling, features, mil, report, deploy, demo, verify); argument values that
several stages parse alike are in `args`. Importing this package registers them all.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipelineError, one_line

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register `fn(args) -> exit code` as a sub-command."""

    def deco(fn):
        COMMANDS[name] = (add_args, fn)
        return fn

    return deco


# The stage modules register their commands with `command`, so they are imported after it.
from pipeline.cli import demo, deploy, features, mil, report, tiling, verify  # noqa: E402, F401

# `--help` lists the commands in this order (the order they were added in); one not named here
# comes last. tests/test_layout.py checks that every command is named.
HELP_ORDER = ("tile", "extract", "splits", "train", "evaluate", "summarize-metrics", "plot-roc",
              "plot-cross-attention", "heatmaps", "manifest", "summarize-tiles", "demo-cohort", "verify",
              "predict", "summarize-predictions", "export-qupath", "cohort-qc", "pretrain", "evaluate-lesions")


def _in_help_order() -> None:
    rank = {name: i for i, name in enumerate(HELP_ORDER)}
    for name in sorted(COMMANDS, key=lambda n: rank.get(n, len(rank))):
        COMMANDS[name] = COMMANDS.pop(name)


_in_help_order()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn) in COMMANDS.items():
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None
        p = sub.add_parser(name, help=summary and summary.replace("%", "%%"))  # argparse formats help with %
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.captureWarnings(True)  # warnings go to the log (stdout); stderr is for the error line
    try:
        return int(args.func(args) or 0)
    except PipelineError as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # an input named on the command line (or in the sheet) is not there
        if args.debug:
            raise
        print(f"error: {e.filename or one_line(e)}: file not found", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one readable line
        if args.debug:
            raise
        where = getattr(args, "slide", None) or getattr(args, "store", None) or ""
        prefix = f"{Path(where).name}: " if where else ""
        print(f"error: {prefix}{type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
