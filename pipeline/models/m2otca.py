"""M2OTCA: multiple-magnification optimal-transport-based cross-attention MIL.

Zhu, Meijering & Wang, Medical Image Analysis 112 (2026) 104082. Per magnification t
(20x = finest = reference, then 10x, 5x), batched over B padded bags:

- E1: ``Linear(D_t, d) -> ReLU -> Dropout`` per tile, gated-attention scores, segment softmax
  inside each of the m groups (same tissue at every magnification, see ``grouping.py``) as a
  masked softmax over a (B, m, N) group-membership mask, then one ``bmm`` of those weights
  with the tile embeddings (``layers.segment_attention_pool``) -> prototypes P1_t (B, m, d);
  empty groups are masked.
- E2: gated-attention MIL over the valid prototypes -> branch logits y_t (B, C), attention (B, m).
- OT cross-attention (t != 20x): cost = L2(P1_20[u], P1_t[j]) scaled to [0, 1] per bag over
  valid pairs; plan T from batched log-domain Sinkhorn with uniform marginals over the valid
  prototypes; P2_t = m_valid * T @ P1_t, where m_valid = number of valid 20x prototypes of the
  bag. T's rows sum to 1 / m_valid, so row u of P2_t is a convex combination of the t
  prototypes matched to 20x group u (rows are indexed by the 20x groups). The gradient
  through T is the implicit-function gradient of the Sinkhorn fixed point (``ot.py``).
- Gradient cross-attention: w_u = ReLU(mean_d dy_c^20 / dP1_20[u]) with c the 20x branch's
  predicted class (``grad_class="label"`` uses the label, only while training). w is then
  rescaled per bag to sum to m_valid (mean 1 over valid prototypes); when every entry is 0
  (e.g. the class row of the 20x classifier has a negative mean, so all gradients share its
  sign) w falls back to uniform 1, so the low-magnification prototypes never all vanish.
  P2_t <- w[:, :, None] * P2_t. Without OT (ablation M_B) P2_t = w * P1_t: group k is the same
  tissue at every magnification, so 20x weights index the t prototypes directly.
- E2_t over P2_t -> y_t; bag logits = Linear([y_20; y_10; y_5]). The loss (cross-entropy on
  ``logits``) is the trainer's; nothing on the low-magnification path is detached, so every
  parameter gets gradient (10x/5x E1 through T and P2_t, 20x E1 also through the OT cost).

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
P2_t, T, P1_t and P1_20 through the product ``w * P2_t``.

Ablations: M_A = no cross-attention (y_t = E2_t(P1_t)), M_B = gradient cross-attention only,
M_C = OT only, full = OT + gradient.

Outputs: ``logits`` (B, C); ``branch_logits`` t -> (B, C); ``proto_attention`` t -> (B, m) over
t's own prototypes (for t != 20x the E2 attention over P2_t rows mapped back through
m_valid * T, so it still sums to 1); ``tile_attention`` t -> (B, N_t) = within-group attention
times the tile's group ``proto_attention``, summing to 1 over the real tiles;
``grad_weights`` (B, m) when the gradient cross-attention is on.
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
                    "(pipeline.bags.collate adds them); use ot_cost='feature' without them"
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
        out.update(
            logits=logits,
            branch_logits=branch_logits,
            tile_attention=tile_att,
            proto_attention=proto_att,
        )
        return out
