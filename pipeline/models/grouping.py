"""E1 group assignment: m groups of consecutive regions with about equal 20x tile counts.

Tiles are stored in spatial order sorted by region id (a region is the tissue patch shared by
the magnifications, e.g. one coarse tile). The boundaries are the region ids of the 20x tiles
at the cumulative-count quantiles ``k * N_20 // m`` (k = 1..m-1); group of a region id r at
ANY magnification = number of boundaries <= r. Hence:

- groups are runs of consecutive regions, a region is never split across groups;
- group k covers the same regions (the same tissue) at every magnification;
- each group holds about ``N_20 / m`` 20x tiles (up to the size of one region);
- a region with no 20x tile falls into the group of the nearest preceding boundary;
- with fewer regions than m, or regions larger than ``N_20 / m``, some boundaries coincide and
  the groups between them are empty (the model masks them, nothing is faked).
"""

from __future__ import annotations

import torch

REFERENCE_MAG = "20x"


def group_boundaries(region_20x: torch.Tensor, m: int) -> torch.Tensor:
    """(m - 1,) non-decreasing region ids at the 20x cumulative-count quantiles."""
    if m < 1:
        raise ValueError(f"number of groups must be >= 1, got {m}")
    ref = torch.sort(region_20x.reshape(-1).long()).values  # (N_20,)
    n = ref.numel()
    if n == 0:
        return ref.new_empty(0)  # (0,): every tile falls into group 0
    pos = torch.arange(1, m, device=ref.device) * n // m  # (m - 1,)
    return ref[pos]  # (m - 1,)


def assign_groups(
    region_20x: torch.Tensor, regions: dict[str, torch.Tensor], m: int
) -> dict[str, torch.Tensor]:
    """Group index in [0, m) for every tile of every magnification.

    Args:
        region_20x: (N_20,) region id of each 20x tile (non-decreasing).
        regions: magnification -> (N_t,) region id of each tile. The result has the same keys;
            ``"20x"`` is added from ``region_20x`` if missing.
        m: number of groups.

    Returns:
        magnification -> (N_t,) long group index.
    """
    bounds = group_boundaries(region_20x, m)  # (m - 1,)
    regions = dict(regions)
    regions.setdefault(REFERENCE_MAG, region_20x)
    return {
        t: torch.bucketize(r.reshape(-1).long().to(bounds.device), bounds, right=True)  # (N_t,)
        for t, r in regions.items()
    }
