"""Batched entropic optimal transport between prototype sets (log-domain Sinkhorn).

Every bag b has its own valid rows (``row_mask[b]``) and columns (``col_mask[b]``); the
marginals are uniform over the valid ones (``1 / n_valid``) and zero elsewhere, so invalid
rows and columns carry no mass and get a plan of exactly 0. Bags stop independently: once a
bag's marginal error is below ``tol`` its potentials are frozen, so a bag's plan does not
depend on the other bags of the mini-batch; the loop ends when every bag has converged or
after ``max_iter`` iterations. The backward is by implicit differentiation of the optimality
conditions (one (n + k)-sized linear solve per bag, independent of the iteration count), or,
with ``implicit=False``, by autograd through the unrolled iterations.
"""

from __future__ import annotations

import math

import torch

# finite stand-in for -inf on masked kernel entries: exp() gives exactly 0 and, unlike -inf,
# logsumexp over an all-masked row stays finite in forward and backward
_NEG = -1e9


def prototype_cost(
    x: torch.Tensor, y: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor
) -> torch.Tensor:
    """L2 distances between x (B, n, d) and y (B, k, d) scaled per bag to [0, 1].

    The scale is the largest distance over valid pairs of the bag; invalid pairs are 0.
    """
    x2 = (x * x).sum(-1, keepdim=True)  # (B, n, 1)
    y2 = (y * y).sum(-1).unsqueeze(1)  # (B, 1, k)
    sq = (x2 + y2 - 2.0 * torch.bmm(x, y.transpose(1, 2))).clamp_min(1e-12)  # (B, n, k)
    dist = sq.sqrt()  # (B, n, k)
    pair = row_mask.unsqueeze(2) & col_mask.unsqueeze(1)  # (B, n, k)
    dist = dist.masked_fill(~pair, 0.0)  # (B, n, k)
    scale = dist.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)  # (B, 1, 1)
    return dist / scale  # (B, n, k) in [0, 1]


def spatial_cost(
    c_ref: torch.Tensor, c_t: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor
) -> torch.Tensor:
    """Squared distances between group centroids c_ref (B, n, 2) and c_t (B, k, 2) in units of
    the bag's group spacing (median distance of a valid reference group to its nearest valid
    neighbour), so one group of displacement costs 1 whatever the slide's size or resolution.

    Invalid pairs are 0. A bag with a single valid reference group uses its own scale-free
    spacing of 1 level-0 px (its one row's plan is fixed by the marginals anyway).
    """
    diff = c_ref.unsqueeze(2) - c_t.unsqueeze(1)  # (B, n, k, 2)
    sq = (diff * diff).sum(-1)  # (B, n, k)
    with torch.no_grad():  # the scale is a normaliser, not a path for gradients
        rr = torch.cdist(c_ref, c_ref)  # (B, n, n)
        pair_rr = row_mask.unsqueeze(2) & row_mask.unsqueeze(1)  # (B, n, n)
        eye = torch.eye(rr.shape[1], dtype=torch.bool, device=rr.device)
        rr = rr.masked_fill(~pair_rr | eye, math.inf)
        nearest = rr.amin(dim=2).masked_fill(~row_mask, math.nan)  # (B, n)
        nearest = nearest.masked_fill(torch.isinf(nearest), math.nan)
        spacing = torch.nanmedian(nearest, dim=1).values  # (B,)
        spacing = torch.where(torch.isfinite(spacing) & (spacing > 0), spacing,
                              torch.ones_like(spacing))
    pair = row_mask.unsqueeze(2) & col_mask.unsqueeze(1)  # (B, n, k)
    return (sq / (spacing * spacing)[:, None, None]).masked_fill(~pair, 0.0)  # (B, n, k)


def _solve(
    c: torch.Tensor,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    eps: float,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Log-domain Sinkhorn iterations: plan (B, n, k), iterations run, column error (B,)."""
    bsz, n, k = c.shape
    pair = row_mask.unsqueeze(2) & col_mask.unsqueeze(1)  # (B, n, k)
    kern = (-c / eps).masked_fill(~pair, _NEG)  # (B, n, k) log-kernel
    n_r = row_mask.sum(1, keepdim=True).clamp_min(1).to(c.dtype)  # (B, 1)
    n_c = col_mask.sum(1, keepdim=True).clamp_min(1).to(c.dtype)  # (B, 1)
    log_a, log_b = -n_r.log(), -n_c.log()  # (B, 1) each
    b_marg = col_mask.to(c.dtype) / n_c  # (B, k)

    f = c.new_zeros(bsz, n)  # (B, n) row potential (divided by eps)
    g = c.new_zeros(bsz, k)  # (B, k) column potential
    active = torch.ones(bsz, dtype=torch.bool, device=c.device)  # (B,)
    err = c.new_full((bsz,), math.inf)  # (B,)
    n_iter = 0
    for _ in range(max_iter):
        lse_c = torch.logsumexp(kern + f.unsqueeze(2), dim=1)  # (B, k)
        col = torch.exp(g + lse_c) * col_mask  # (B, k) current column marginal
        err = torch.where(active, torch.linalg.vector_norm(col - b_marg, dim=1), err).detach()
        active = active & (err >= tol)  # (B,)
        if not bool(active.any()):
            break
        n_iter += 1
        g_new = (log_b - lse_c).masked_fill(~col_mask, 0.0)  # (B, k)
        g = torch.where(active.unsqueeze(1), g_new, g)  # (B, k)
        lse_r = torch.logsumexp(kern + g.unsqueeze(1), dim=2)  # (B, n)
        f_new = (log_a - lse_r).masked_fill(~row_mask, 0.0)  # (B, n)
        f = torch.where(active.unsqueeze(1), f_new, f)  # (B, n)

    plan = torch.exp(kern + f.unsqueeze(2) + g.unsqueeze(1)).masked_fill(~pair, 0.0)  # (B, n, k)
    if bool(active.any()):  # max_iter reached: report the final error
        col = plan.detach().sum(1)  # (B, k)
        err = torch.where(active, torch.linalg.vector_norm(col - b_marg, dim=1), err)
    return plan, n_iter, err


class _ImplicitPlan(torch.autograd.Function):
    """Identity on the solved plan whose backward is the implicit-function gradient w.r.t. C.

    With T = exp(F + G - C / eps) and the marginal constraints T 1 = a, T^T 1 = b, the
    adjoint system H [l; u] = [W 1; W^T 1] (W = dL/dT * T, H = [[diag(a), T], [T^T, diag(b)]],
    whose null vector (1, -1) is removed by adding z z^T) gives
    dL/dC = T * (l_i + u_j - dL/dT) / eps: exact at the optimum, one small batched solve
    instead of back-propagating through every iteration.
    """

    @staticmethod
    def forward(ctx, cost, plan, row_mask, col_mask, eps):  # cost: input for autograd only
        ctx.save_for_backward(plan)  # masked rows / columns of the plan are exactly 0
        ctx.eps = eps
        return plan.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_plan):
        (plan,) = ctx.saved_tensors
        t = plan.double()  # (B, n, k); the (n + k)-sized solve is cheap in float64
        gp = grad_plan.double()  # (B, n, k)
        w = gp * t  # (B, n, k)
        rows, cols = t.sum(2) > 0, t.sum(1) > 0  # (B, n), (B, k): rows / columns with mass
        a = t.sum(2) + (~rows).double()  # (B, n); 1 on empty rows keeps H regular
        b = t.sum(1) + (~cols).double()  # (B, k)
        h = torch.cat(
            [
                torch.cat([torch.diag_embed(a), t], dim=2),  # (B, n, n + k)
                torch.cat([t.transpose(1, 2), torch.diag_embed(b)], dim=2),  # (B, k, n + k)
            ],
            dim=1,
        )  # (B, n + k, n + k)
        z = torch.cat([rows.double(), -cols.double()], dim=1)  # (B, n + k) null vector
        h = h + z.unsqueeze(2) * z.unsqueeze(1)  # (B, n + k, n + k)
        rhs = torch.cat([w.sum(2), w.sum(1)], dim=1)  # (B, n + k)
        sol = torch.linalg.solve(h, rhs)  # (B, n + k)
        n = plan.shape[1]
        lam, mu = sol[:, :n], sol[:, n:]  # (B, n), (B, k)
        grad_cost = t * (lam.unsqueeze(2) + mu.unsqueeze(1) - gp) / ctx.eps  # (B, n, k)
        return grad_cost.to(grad_plan.dtype), None, None, None, None


def sinkhorn(
    cost: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
    eps: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-3,
    return_info: bool = False,
    implicit: bool = True,
):
    """Entropic OT plan for ``cost`` (B, n, k) (or (n, k)) with uniform marginals.

    Solves ``min <T, C> - eps H(T)`` s.t. ``T 1 = a``, ``T^T 1 = b`` with a, b uniform over the
    valid rows / columns. Each iteration updates g (columns) then f (rows), so on return the
    row marginals are exact and the column marginals have L2 error < ``tol`` (unless
    ``max_iter`` was reached). Half-precision costs are solved in float32.

    Gradients: with ``implicit`` (default) the iterations run without autograd and the
    backward is the implicit-function gradient (:class:`_ImplicitPlan`); otherwise autograd
    differentiates through the unrolled iterations.

    Returns the plan (B, n, k) in the cost's dtype, and with ``return_info`` also a dict with
    ``n_iter`` (iterations run) and ``err`` (B,) final column-marginal L2 error.
    """
    squeeze = cost.dim() == 2
    if squeeze:
        cost = cost.unsqueeze(0)
        row_mask = None if row_mask is None else row_mask.unsqueeze(0)
        col_mask = None if col_mask is None else col_mask.unsqueeze(0)
    out_dtype = cost.dtype
    c = cost if cost.dtype in (torch.float32, torch.float64) else cost.float()  # (B, n, k)
    bsz, n, k = c.shape
    if row_mask is None:
        row_mask = torch.ones(bsz, n, dtype=torch.bool, device=c.device)
    if col_mask is None:
        col_mask = torch.ones(bsz, k, dtype=torch.bool, device=c.device)

    if implicit and torch.is_grad_enabled() and c.requires_grad:
        with torch.no_grad():
            plan, n_iter, err = _solve(c, row_mask, col_mask, eps, max_iter, tol)
        plan = _ImplicitPlan.apply(c, plan, row_mask, col_mask, eps)  # (B, n, k)
    else:
        plan, n_iter, err = _solve(c, row_mask, col_mask, eps, max_iter, tol)  # (B, n, k)
    plan = plan.to(out_dtype)
    if squeeze:
        plan = plan.squeeze(0)  # (n, k)
    if return_info:
        return plan, {"n_iter": n_iter, "err": err}
    return plan
