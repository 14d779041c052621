"""The demo cohort (workflow/rules/demo.smk): `demo-cohort`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli import command


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the slides and slides.tsv")
    p.add_argument("--n", type=int, default=24, help="number of slides")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--scale", type=float, default=1.0, help="slide size factor (0.3 for tests)")


@command("demo-cohort", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    """Write the synthetic demo cohort (pyramidal TIFFs + slides.tsv)."""
    from pipeline.synthetic.demo import make_demo_cohort

    sheet = make_demo_cohort(Path(args.out), n_slides=args.n, seed=args.seed, scale=args.scale)
    logging.info("demo cohort sheet: %s", sheet)
    return 0
