"""Benchmark: one M2OTCA training step vs a plain gated-attention layer over the same tiles.

At N = 10,000 / 2,500 / 625 tiles (20x / 10x / 5x), D = 512, B = 1:

- ``step_ms``: median time of an M2OTCA training step (forward, cross-entropy, backward,
  Adam step);
- ``attention_ms``: median time of forward + backward of a plain ABMIL gated-attention layer
  (projection, gated attention, pooling, classifier) over the same 13,125 instances;
- ``ratio`` = step_ms / attention_ms (goal <= 1.3 on CPU);
- ``epoch_ratio``: an epoch over a cohort read from the Zarr feature stores vs the sum of its
  steps (goal <= 1.2). Not measured yet (needs the data loading): ``nan``; fill in
  :func:`measure_epoch_ratio`.

The two measurements are interleaved rep by rep so machine noise hits both alike. On a
machine shared with other jobs, multi-threaded wall times are unreliable (a descheduled
OpenMP thread stalls every parallel op, and M2OTCA has more ops than the plain layer): use
``--threads 1 --clock cpu`` there. Random features make Sinkhorn converge in a few
iterations; ``--sinkhorn-tol 0`` forces all ``sinkhorn_max_iter`` iterations (worst case).
The last line printed is ``step_ms=<x> attention_ms=<x> ratio=<x> epoch_ratio=<x>``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import ModelConfig, create_model  # noqa: E402
from pipeline.models.abmil import ABMIL  # noqa: E402
from pipeline.models.grouping import assign_groups  # noqa: E402

TILES = {"20x": 10_000, "10x": 2_500, "5x": 625}


def make_batch(dim: int, n_groups: int, seed: int = 0) -> dict:
    """One synthetic bag (B = 1): 625 regions, 16 / 4 / 1 tiles per region at 20x / 10x / 5x."""
    gen = torch.Generator().manual_seed(seed)
    n_regions = TILES["5x"]
    regions = {
        t: torch.arange(n_regions).repeat_interleave(n // n_regions) for t, n in TILES.items()
    }
    groups = assign_groups(regions["20x"], regions, n_groups)
    return {
        "feats": {t: torch.randn(1, n, dim, generator=gen) for t, n in TILES.items()},
        "mask": {t: torch.ones(1, n, dtype=torch.bool) for t, n in TILES.items()},
        "group": {t: groups[t].unsqueeze(0) for t in TILES},
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_steps(
    dim: int,
    reps: int,
    warmup: int,
    seed: int,
    profile: bool = False,
    clock: str = "wall",
    cfg: ModelConfig | None = None,
) -> tuple[float, float]:
    """Median ms of an M2OTCA training step and of a plain gated-attention forward+backward."""
    torch.manual_seed(seed)
    cfg = cfg or ModelConfig()
    now = CLOCKS[clock]

    def time_ms(fn) -> float:
        start = now()
        fn()
        return (now() - start) * 1e3

    in_dims = {t: dim for t in TILES}
    batch = make_batch(dim, cfg.n_groups, seed)
    labels = torch.tensor([1])

    model = create_model("m2otca", in_dims, 2, cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)

    baseline = ABMIL(dim, 2, cfg, "all").train()
    all_feats = torch.cat([batch["feats"][t] for t in TILES], dim=1)  # (1, 13125, D)
    all_mask = torch.ones(all_feats.shape[:2], dtype=torch.bool)  # (1, 13125)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(batch, labels)
        torch.nn.functional.cross_entropy(out["logits"], labels).backward()
        opt.step()

    def attention() -> None:
        baseline.zero_grad(set_to_none=True)
        logits, _ = baseline.branch(all_feats, all_mask)
        torch.nn.functional.cross_entropy(logits, labels).backward()

    for _ in range(warmup):
        step()
        attention()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    step_t, att_t = [], []
    for _ in range(reps):
        step_t.append(time_ms(step))
        att_t.append(time_ms(attention))
    return statistics.median(step_t), statistics.median(att_t)


def measure_epoch_ratio() -> float:
    """Epoch over a Zarr cohort (loading hidden) / sum of its steps. TODO once loading exists:
    time one epoch of the real trainer over the cohort, time the same steps on cached batches,
    return their ratio."""
    return math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--profile", action="store_true", help="print a profile of one step")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine with --threads 1)",
    )
    parser.add_argument(
        "--sinkhorn-tol",
        type=float,
        default=None,
        help="override the Sinkhorn tolerance (e.g. 0 to force all max_iter iterations)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_dict({"sinkhorn_tol": args.sinkhorn_tol})

    step_ms, attention_ms = measure_steps(
        args.dim, args.reps, args.warmup, args.seed, args.profile, args.clock, cfg
    )
    epoch_ratio = measure_epoch_ratio()
    print(
        f"threads={torch.get_num_threads()} clock={args.clock} tiles={sum(TILES.values())} "
        f"dim={args.dim} sinkhorn_tol={cfg.sinkhorn_tol}"
    )
    print(
        f"step_ms={step_ms:.1f} attention_ms={attention_ms:.1f} "
        f"ratio={step_ms / attention_ms:.3f} epoch_ratio={epoch_ratio:.3f}"
    )


if __name__ == "__main__":
    main()
