"""Read-outs of what M2OTCA's cross-attention does to a bag (imports only torch).

On the nested grid, group u is the same tissue at every magnification, so the identity is the
spatial truth of the OT plan: a plan that keeps tissue aligned puts its mass on the diagonal; a
position-blind plan spreads each 20x group over the whole bag (the paper's cost does: 1 / m on
the diagonal). The gradient weights do something only when they single groups out.

Per bag (NaN where a quantity does not apply, e.g. no OT in the model or no valid group):

- ``ot_aligned_<t>``: share of the plan's mass on aligned pairs (u, u); 1 = aligned, ~1/m = uniform;
- ``ot_support_<t>``: effective number of t groups a 20x group draws from, exp(entropy) of each
  valid row of the row-normalised plan, averaged over rows; 1 = one-to-one, m = uniform;
- ``gw_peak``: max / mean of the gradient weights over valid groups; 1 = flat;
- ``gw_top10``: share of the weights on the top 10 % of valid groups (at least one); 0.1 = flat.
"""

from __future__ import annotations

import torch

STAT_NAMES = ("ot_aligned", "ot_support", "gw_peak", "gw_top10")


def plan_stats(plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """plan (B, n, n) with zero rows/cols for invalid groups -> aligned mass (B,), support (B,)."""
    p = plan.detach().double()  # (B, n, n)
    total = p.sum(dim=(1, 2))  # (B,)
    aligned = torch.diagonal(p, dim1=1, dim2=2).sum(1) / total  # (B,); NaN when empty
    rows = p.sum(2)  # (B, n)
    valid = rows > 0  # (B, n)
    q = p / rows.clamp_min(1e-300).unsqueeze(2)  # (B, n, n) row-stochastic on valid rows
    ent = -(q * torch.log(q.clamp_min(1e-300))).sum(2)  # (B, n)
    support = (torch.exp(ent) * valid).sum(1) / valid.sum(1)  # (B,); NaN when no valid row
    return aligned.float(), support.float()


def weight_stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient weights (B, m) -> peak (B,), top10 (B,).

    M2OTCA scales a bag's weights to sum to its number of valid groups (mean 1 over them; a
    valid group may weigh 0 after the ReLU), so that number is the rounded sum.
    """
    w = w.detach().double()  # (B, m)
    n = torch.round(w.sum(1))  # (B,) valid groups
    peak = w.amax(1) / (w.sum(1) / n)  # (B,); NaN for a bag without valid group
    k = torch.ceil(0.1 * n).long()  # (B,) top 10 %, at least one
    ranked = torch.sort(w, dim=1, descending=True).values  # (B, m)
    keep = torch.arange(w.shape[1], device=w.device).unsqueeze(0) < k.unsqueeze(1)  # (B, m)
    top = (ranked * keep).sum(1) / w.sum(1)  # (B,)
    return peak.float(), top.float()


def cross_attention_stats(out: dict) -> dict[str, torch.Tensor]:
    """Per-bag stats (B,) on the CPU from a model output: the plan ones per magnification when the
    model has an OT plan, the weight ones when it has gradient weights, nothing otherwise."""
    stats: dict[str, torch.Tensor] = {}
    for t, plan in (out.get("ot_plan") or {}).items():
        aligned, support = plan_stats(plan)
        stats[f"ot_aligned_{t}"], stats[f"ot_support_{t}"] = aligned.cpu(), support.cpu()
    w = out.get("grad_weights")
    if w is not None:
        peak, top = weight_stats(w)
        stats["gw_peak"], stats["gw_top10"] = peak.cpu(), top.cpu()
    return stats
