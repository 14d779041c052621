"""`verify`: every store checked against its layout and inputs (pipeline/verify.py)."""

from __future__ import annotations

import argparse

from pipeline.cli import command


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="results folders (e.g. results/<cohort>) or tile/feature stores")


@command("verify", _verify_args)
def _verify(args: argparse.Namespace) -> int:
    """Check every store against its layout and inputs; exit 1 when anything is stale or broken."""
    from pipeline.verify import verify

    report = verify(args.paths)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.ok else 1
