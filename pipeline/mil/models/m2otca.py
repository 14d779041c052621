"""M2OTCA: multiple-magnification optimal-transport-based cross-attention MIL.

Zhu, Meijering & Wang, Medical Image Analysis 112 (2026) 104082. Per magnification t
(20x = finest = reference, then 10x, 5x), batched over B padded bags:

- E1: ``Linear(D_t, d) -> ReLU -> Dropout`` per tile, gated-attention scores, segment softmax
  inside each of the m groups (same tissue at every magnification, see
  ``pipeline.mil.bag_arrays.assign_groups``) as a masked softmax over a (B, m, N) group-membership
  mask, then one ``bmm`` of those weights
  with the tile embeddings (``layers.segment_attention_pool``) -> prototypes P1_t (B, m, d);
  empty groups are masked.
- E2: gated-attention MIL over the valid prototypes -> branch logits y_t (B, C), attention (B, m).
- OT cross-attention (t != 20x): plan T from batched log-domain Sinkhorn with uniform
  marginals over the valid prototypes, on a cost chosen by ``ot_cost``:
  "spatial" (default) = squared distance between the groups' tissue centroids (mean tile
  centre, level-0 px, ``batch["xy"]``) in units of the bag's group spacing; "feature" (the
  paper) = L2(P1_20[u], P1_t[j]) scaled to [0, 1] per bag; "feature+spatial" = their sum.
  P2_t = m_valid * T @ P1_t, m_valid = number of valid 20x prototypes of the bag; T's rows
  sum to 1 / m_valid, so row u of P2_t is a convex combination of the t prototypes matched to
  20x group u (rows are indexed by the 20x groups). The gradient through T (feature costs) is
  the implicit-function gradient of the Sinkhorn fixed point (``ot.py``).
  Why "spatial": group u is the same tissue at every magnification (the nested grid), so the
  identity is the spatial truth. The paper's cost is position-blind and, with uniform
  marginals and a cost dominated by the prototypes' norms, gives a nearly uniform plan (every
  20x group receives ~ the bag mean of the t prototypes: measured mass on aligned pairs ~1/m),
  which erases WHERE the coarse evidence sits; ``diagnostics.py`` reads this out per bag.
- Gradient cross-attention: g = d s / d P1_20 through the 20x head, for a target s chosen by
  ``grad_class``: "positive" (default: log-odds of any class but the first, the same for
  every bag), "predicted" (the paper: the 20x argmax logit) or "label" (ground truth while
  training). w_u = ReLU(g_u . P1_20[u]) (``grad_weighting="input"``, default: the prototype's
  first-order contribution to s, Grad-CAM's gradient x activation) or ReLU(mean_d g_u) (the
  paper, whose sign follows the mean of the classifier row). w is rescaled per bag to sum to
  m_valid (mean 1 over valid prototypes); when every entry is 0 it falls back to uniform 1.
  With c = grad_floor + (1 - grad_floor) * w, ``grad_apply="attention"`` (default)
  multiplies E2_t's attention over P2_t by c (renormalised: the 20x gradients decide where
  the coarser branch looks, its features are untouched, and every group keeps grad_floor of
  its say, so evidence away from the 20x evidence still counts); "scale" (the paper, with
  grad_floor 0) sets P2_t <- c * P2_t. Without OT (ablation M_B) P2_t = P1_t: group k is the
  same tissue at every magnification, so 20x weights index the t prototypes directly.
- E2_t over P2_t -> y_t; bag logits = Linear([y_20; y_10; y_5]). The loss (cross-entropy on
  ``logits``) is the trainer's; nothing on the low-magnification path is detached, so every
  parameter gets gradient (10x/5x E1 through T and P2_t, 20x E1 also through the feature
  cost when there is one). With ``branch_loss`` > 0 (default 0.5) each branch is supervised
  too: ``aux_loss`` = branch_loss * mean_t CE(y_t, label), for the trainer to add. Why: the
  fusion is a full linear layer, so under the fused loss alone a branch's class scores may
  mean anything; measured on the benchmark, a 20x branch scored 20x evidence as the FIRST
  class (y_20 ~ -7 on tumour slides, +7 on normal ones), which turned the "positive"
  gradient target away from the evidence and left the 5x branch untrained (co-location task,
  one seed: held-out AUC 0.67 with 300 and 0.77 with 1,000 training slides; 0.97 with 300
  once the branches are supervised).
- ``m2otca_paper`` (``PAPER_CROSS_ATTENTION``) is the paper's choice of every option above.

Design decision — w is a CONSTANT (Grad-CAM), not differentiable: it is computed on a detached
leaf copy of P1_20 inside ``torch.inference_mode(False)`` + ``torch.enable_grad()``, by
re-running the small 20x E2 head (no dropout, so it equals the forward's head) and one
``autograd.grad`` over it. Reasons: (1) Grad-CAM defines the weights as importance read-outs,
not as a path to train the 20x head through its own gradient map; a differentiable w needs
``create_graph=True`` and double backward through the head, making the 20x head optimise its
gradient pattern and, with the ReLU, giving piece-wise zero second-order signals; (2) the same
code then works in training, under ``torch.no_grad()`` and under an outer
``torch.inference_mode()`` (inference tensors are cloned into normal tensors first); (3) it
is cheap: one forward+backward of an (B, m, d) head. The gradient of the loss still reaches
P2_t, T and P1_t (and P1_20 through a feature cost).

Ablations: M_A = no cross-attention (y_t = E2_t(P1_t)), M_B = gradient cross-attention only,
M_C = OT only, full = OT + gradient.

Outputs: ``logits`` (B, C); ``branch_logits`` t -> (B, C); ``proto_attention`` t -> (B, m) over
t's own prototypes (for t != 20x the E2 attention over P2_t rows mapped back through
m_valid * T, so it still sums to 1); ``tile_attention`` t -> (B, N_t) = within-group attention
times the tile's group ``proto_attention``, summing to 1 over the real tiles;
``grad_weights`` (B, m) when the gradient cross-attention is on; ``ot_plan`` t -> (B, m, m)
(detached) when OT is on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig, order_magnifications
from .layers import (
    AttentionHead,
    FeatureProjection,
    GatedAttention,
    group_centroids,
    segment_attention_pool,
)
from .ot import prototype_cost, sinkhorn, spatial_cost


class PrototypeEncoder(nn.Module):
    """E1: per-tile projection and gated-attention pooling inside each of m groups."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.m = cfg.n_groups
        self.proj = FeatureProjection(in_dim, cfg.d, cfg.dropout)
        self.attn = GatedAttention(cfg.d, cfg.attn_dim)

    def forward(
        self, feats: torch.Tensor, mask: torch.Tensor, group: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """feats (B, N, D), mask (B, N), group (B, N) -> P1 (B, m, d), valid (B, m),
        within-group attention (B, N), real-tile mask (B, N)."""
        valid = mask & (group >= 0)  # (B, N)
        if group.numel() and int(group.max()) >= self.m:  # a loader/model n_groups mismatch
            raise ValueError(f"group index {int(group.max())} >= n_groups={self.m}")
        h = self.proj(feats, valid)  # (B, N, d)
        scores = self.attn(h)  # (B, N)
        p1, alpha, group_valid = segment_attention_pool(scores, h, group, valid, self.m)
        return p1, group_valid, alpha, valid  # (B, m, d), (B, m), (B, N), (B, N)


class M2OTCA(nn.Module):
    """M2OTCA and its ablations (``use_ot`` / ``use_grad`` switch the cross-attentions)."""

    def __init__(
        self,
        in_dims: dict[str, int],
        n_classes: int,
        cfg: ModelConfig,
        use_ot: bool = True,
        use_grad: bool = True,
    ) -> None:
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError(f"M2OTCA needs at least two magnifications, got {list(in_dims)}")
        self.cfg = cfg
        self.use_ot, self.use_grad = use_ot, use_grad
        self.mags = order_magnifications(in_dims)  # finest (reference) first
        self.ref = self.mags[0]
        self.e1 = nn.ModuleDict({t: PrototypeEncoder(in_dims[t], cfg) for t in self.mags})
        self.e2 = nn.ModuleDict(
            {t: AttentionHead(cfg.d, cfg.attn_dim, n_classes) for t in self.mags}
        )
        self.fuse = nn.Linear(len(self.mags) * n_classes, n_classes)

    def grad_weights(
        self, p1_ref: torch.Tensor, valid_ref: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        """Gradient cross-attention weights (B, m), a constant; see the module docstring.

        ``target`` (B,) picks one class logit per bag; None uses the "positive" target, the
        log-odds of any class but the first against the first.
        """
        with torch.inference_mode(False), torch.enable_grad():
            # normal (non-inference) leaf copies, so this works under an outer inference_mode
            leaf = p1_ref.detach().clone().requires_grad_(True)  # (B, m, d)
            mask = valid_ref.clone()  # (B, m)
            logits, _, _ = self.e2[self.ref](leaf, mask)  # (B, C)
            if target is None:
                score = torch.logsumexp(logits[:, 1:], dim=-1) - logits[:, 0]  # (B,)
            else:
                # a one-hot product instead of gather keeps the backward deterministic on CUDA
                pick = F.one_hot(target.detach().clone().long(), logits.shape[-1])  # (B, C)
                score = (logits * pick).sum(-1)  # (B,)
            # bags are independent in E2, so d(sum_b s_b)/dP1_b = ds_b/dP1_b
            (grad,) = torch.autograd.grad(score.sum(), leaf)  # (B, m, d)
            if self.cfg.grad_weighting == "input":
                raw = (grad * leaf.detach()).sum(dim=-1)  # (B, m): first-order contribution
            else:
                raw = grad.mean(dim=-1)  # (B, m): the paper's channel-mean gradient
            w = torch.relu(raw) * mask  # (B, m)
            total = w.sum(dim=1, keepdim=True)  # (B, 1)
            n_valid = mask.sum(dim=1, keepdim=True).to(w.dtype)  # (B, 1)
            uniform = mask.to(w.dtype)  # (B, m)
            w = torch.where(total > 0, w * n_valid / total.clamp_min(1e-30), uniform)  # (B, m)
        return w.detach()

    def _target(self, ref_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The class whose gradient weighs the prototypes (None = the "positive" log-odds)."""
        if self.cfg.grad_class == "positive":
            return None
        if self.cfg.grad_class == "label" and self.training and labels is not None:
            return labels  # (B,)
        return ref_logits.detach().argmax(dim=-1)  # (B,)

    def ot_cost(self, batch: dict, p1: dict, pvalid: dict, tvalid: dict, t: str) -> torch.Tensor:
        """(B, m, m) OT cost between the 20x groups (rows) and the groups of ``t`` (columns)."""
        ref, cfg = self.ref, self.cfg
        cost = 0.0
        if cfg.ot_cost != "spatial":
            cost = prototype_cost(p1[ref], p1[t], pvalid[ref], pvalid[t])  # (B, m, m) in [0, 1]
        if cfg.ot_cost != "feature":
            if "xy" not in batch:
                raise ValueError(
                    f"ot_cost={cfg.ot_cost!r} needs the tiles' level-0 centres in batch['xy'] "
                    "(pipeline.mil.bags.collate adds them); use ot_cost='feature' without them"
                )
            cent = {
                s: group_centroids(batch["xy"][s], batch["group"][s], tvalid[s], cfg.n_groups)
                for s in (ref, t)
            }  # (B, m, 2) each
            spatial = spatial_cost(cent[ref], cent[t], pvalid[ref], pvalid[t])  # (B, m, m)
            cost = cost + cfg.ot_spatial_weight * spatial
        return cost

    def forward(self, batch: dict, labels: torch.Tensor | None = None) -> dict:
        p1, pvalid, alpha, tvalid = {}, {}, {}, {}
        for t in self.mags:
            p1[t], pvalid[t], alpha[t], tvalid[t] = self.e1[t](
                batch["feats"][t], batch["mask"][t], batch["group"][t]
            )  # (B, m, d), (B, m), (B, N_t), (B, N_t)

        ref = self.ref
        branch_logits, proto_att = {}, {}
        branch_logits[ref], proto_att[ref], _ = self.e2[ref](p1[ref], pvalid[ref])  # (B, C), (B, m)

        out: dict = {}
        w = None
        if self.use_grad:
            target = self._target(branch_logits[ref], labels)
            w = self.grad_weights(p1[ref], pvalid[ref], target)  # (B, m)
            out["grad_weights"] = w

        n_ref = pvalid[ref].sum(dim=1).to(p1[ref].dtype)  # (B,)
        plans = {}
        for t in self.mags[1:]:
            mix = None
            if self.use_ot:
                plan = sinkhorn(
                    self.ot_cost(batch, p1, pvalid, tvalid, t),
                    pvalid[ref],
                    pvalid[t],
                    eps=self.cfg.sinkhorn_eps,
                    max_iter=self.cfg.sinkhorn_max_iter,
                    tol=self.cfg.sinkhorn_tol,
                )  # (B, m, m), rows sum to 1 / m_valid
                plans[t] = plan.detach()
                mix = plan * n_ref[:, None, None]  # (B, m, m) row-stochastic
                p2 = torch.bmm(mix, p1[t])  # (B, m, d), rows indexed by 20x groups
                p2_valid = pvalid[ref]  # (B, m)
            else:
                p2, p2_valid = p1[t], pvalid[t]  # (B, m, d), (B, m)
            prior = None
            if w is not None:
                c = self.cfg.grad_floor + (1.0 - self.cfg.grad_floor) * w  # (B, m)
                if self.cfg.grad_apply == "scale":
                    p2 = p2 * c.unsqueeze(-1)  # (B, m, d)
                else:
                    prior = c  # (B, m)
            branch_logits[t], att, _ = self.e2[t](p2, p2_valid, prior)  # (B, C), (B, m)
            # attention over t's own prototypes: mass of P2 row u spread by its mixing weights
            proto_att[t] = att if mix is None else torch.bmm(att.unsqueeze(1), mix).squeeze(1)
        if plans:
            out["ot_plan"] = plans

        tile_att = {}
        for t in self.mags:
            g = batch["group"][t].clamp_min(0)  # (B, N_t)
            tile_att[t] = alpha[t] * proto_att[t].gather(1, g) * tvalid[t]  # (B, N_t)

        logits = self.fuse(torch.cat([branch_logits[t] for t in self.mags], dim=-1))  # (B, C)
        if self.training and labels is not None and self.cfg.branch_loss > 0:
            ce = torch.stack([F.cross_entropy(branch_logits[t], labels) for t in self.mags])
            out["aux_loss"] = self.cfg.branch_loss * ce.mean()
        out.update(
            logits=logits,
            branch_logits=branch_logits,
            tile_attention=tile_att,
            proto_attention=proto_att,
        )
        return out
