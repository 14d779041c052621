"""Building blocks: input projection, gated attention, masked and segment softmax pooling.

Shapes: B bags, N tiles (padded), D input feature dim, d hidden dim, K items (tiles or
prototypes) attended over, m groups, C classes. Masks are bool, True = real item.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig, order_magnifications


class MaskedStandardize(nn.Module):
    """Per-dimension standardisation of tile features over the real (unmasked) tiles.

    Frozen encoders give features with a large shared offset and small tile-to-tile variation
    (e.g. a random or InstanceNorm ResNet: std 0.05 around a mean of 0.8); standardising them is
    what lets a MIL head learn at a normal learning rate. Training uses the batch's masked
    statistics and accumulates their cumulative average; eval uses that average, so padding
    never changes a result. No parameters.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            w = (torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device) if mask is None
                 else mask.to(x.dtype))  # (B, N)
            n = w.sum().clamp_min(1.0)
            mean = (x * w[..., None]).sum((0, 1)) / n  # (D,)
            var = (((x - mean) ** 2) * w[..., None]).sum((0, 1)) / n  # (D,)
            with torch.no_grad():  # cumulative average over the batches seen
                k = self.num_batches.item()
                self.running_mean.mul_(k / (k + 1)).add_(mean.detach() / (k + 1))
                self.running_var.mul_(k / (k + 1)).add_(var.detach() / (k + 1))
                self.num_batches += 1
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps)  # (B, N, D)


class FeatureProjection(nn.Module):
    """Per-tile ``Standardize -> Linear(D, d) -> ReLU -> Dropout``.

    Takes the stores' float16 features as they are (half the bytes to pad and to move to a
    GPU) and computes in the parameters' dtype.
    """

    def __init__(self, in_dim: int, d: int, dropout: float) -> None:
        super().__init__()
        self.norm = MaskedStandardize(in_dim)
        self.fc = nn.Linear(in_dim, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.fc.weight.dtype)  # (B, N, D)
        return self.drop(torch.relu(self.fc(self.norm(x, mask))))  # (B, N, d)


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al., 2018): ``w^T (tanh(V h) * sigmoid(U h))``.

    V and U are fused into one ``Linear(d, 2 * attn_dim)`` so a single matmul serves both.
    ``w`` has no bias: softmax is shift-invariant, so a bias would never receive gradient.
    """

    def __init__(self, d: int, attn_dim: int) -> None:
        super().__init__()
        self.vu = nn.Linear(d, 2 * attn_dim)
        self.w = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        v, u = self.vu(h).chunk(2, dim=-1)  # (..., attn_dim) each
        return self.w(torch.tanh(v) * torch.sigmoid(u)).squeeze(-1)  # (...)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask``; rows with no real item give zeros."""
    neg = torch.finfo(scores.dtype).min
    att = torch.softmax(scores.masked_fill(~mask, neg), dim=-1)  # (B, K)
    return att * mask  # (B, K): exactly 0 on padding, all-zero rows stay finite


def segment_attention_pool(
    scores: torch.Tensor, h: torch.Tensor, group: torch.Tensor, valid: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention pooling inside each of ``m`` groups per bag, in one vectorised pass.

    Segment softmax as a masked softmax over a (B, m, N) group-membership mask, then one
    ``bmm`` pools the tiles of every group. With m (30) well below d (256) this costs less
    than a single elementwise pass over the (B, N, d) embeddings, needs no Python loop over
    groups, and, unlike ``index_add``/scatter sums (atomics on CUDA), is deterministic on GPU.

    Args:
        scores: (B, N) attention logits.
        h: (B, N, d) tile embeddings.
        group: (B, N) long group index in [0, m); ignored where ``valid`` is False.
        valid: (B, N) bool, True = real tile.
        m: number of groups.

    Returns:
        pooled: (B, m, d) group prototypes, zero for empty groups.
        alpha: (B, N) within-group attention, sums to 1 over each non-empty group, 0 on padding.
        group_valid: (B, m) bool, True where the group has at least one tile.
    """
    groups = torch.arange(m, device=group.device).view(1, m, 1)  # (1, m, 1)
    member = (group.unsqueeze(1) == groups) & valid.unsqueeze(1)  # (B, m, N)
    att = masked_softmax(scores.unsqueeze(1).expand(-1, m, -1), member)  # (B, m, N)
    pooled = torch.bmm(att, h)  # (B, m, d)
    return pooled, att.sum(dim=1), member.any(dim=2)  # (B, m, d), (B, N), (B, m)


def group_centroids(
    xy: torch.Tensor, group: torch.Tensor, valid: torch.Tensor, m: int
) -> torch.Tensor:
    """Mean tile centre of each of ``m`` groups: xy (B, N, 2) level-0 px -> (B, m, 2), 0 where a
    group is empty. Summed in float64, so 20,000 tiles at 100k px stay exact to a pixel."""
    groups = torch.arange(m, device=group.device).view(1, m, 1)  # (1, m, 1)
    member = ((group.unsqueeze(1) == groups) & valid.unsqueeze(1)).double()  # (B, m, N)
    total = torch.bmm(member, xy.double())  # (B, m, 2)
    return (total / member.sum(2, keepdim=True).clamp_min(1.0)).float()  # (B, m, 2)


class AttentionHead(nn.Module):
    """Gated-attention MIL pooling over K items followed by a linear classifier.

    Used as E2 over prototypes (M2OTCA) and as the bag head of ABMIL. No dropout inside, so it
    is deterministic given its input (the Grad-CAM recomputation relies on this).
    """

    def __init__(self, d: int, attn_dim: int, n_classes: int) -> None:
        super().__init__()
        self.attn = GatedAttention(d, attn_dim)
        self.classifier = nn.Linear(d, n_classes)

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, K, d), mask (B, K) -> logits (B, C), attention (B, K), embedding (B, d).

        ``prior`` (B, K) >= 0 multiplies the attention before it is renormalised (softmax of
        score + log prior); items with prior 0 get none, unless every real item has 0.
        """
        scores = self.attn(h)  # (B, K)
        if prior is not None:
            usable = mask & (prior > 0)  # (B, K)
            mask = torch.where(usable.any(1, keepdim=True), usable, mask)  # all-zero prior: ignored
            scores = scores + torch.log(prior.clamp_min(torch.finfo(prior.dtype).tiny))
        att = masked_softmax(scores, mask)  # (B, K)
        z = torch.bmm(att.unsqueeze(1), h).squeeze(1)  # (B, d)
        return self.classifier(z), att, z  # (B, C), (B, K), (B, d)


class LateFusion(nn.Module):
    """One branch per magnification, bag logits = a linear layer over ``[y_20; y_10; y_5]``.

    ``branch(in_dim, n_classes, cfg, mag)`` builds a module with ``.branch(feats (B, N, D),
    mask (B, N), labels (B,) or None)`` returning ``(logits (B, C), tile attention (B, N))``
    (ABMIL_3, TransMIL_3) or ``(logits, tile attention, aux loss or None)`` (CLAM-SB_3). When
    any branch gives an aux loss, the output has ``aux_loss = aux_scale * mean of them``
    (``aux_scale`` 1.0 unless a subclass sets it); otherwise it has no ``aux_loss`` key.
    """

    def __init__(self, in_dims: dict[str, int], n_classes: int, cfg: ModelConfig,
                 branch: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.mags = order_magnifications(in_dims)
        self.aux_scale = 1.0
        self.branches = nn.ModuleDict({t: branch(in_dims[t], n_classes, cfg, t) for t in self.mags})
        self.fuse = nn.Linear(len(self.mags) * n_classes, n_classes)

    def forward(self, batch: dict, labels: torch.Tensor | None = None) -> dict:
        branch_logits, tile_att, aux = {}, {}, []
        for t in self.mags:
            y, att, *extra = self.branches[t].branch(batch["feats"][t], batch["mask"][t], labels)
            branch_logits[t], tile_att[t] = y, att  # (B, C), (B, N_t)
            if extra and extra[0] is not None:
                aux.append(extra[0])  # scalar
        logits = self.fuse(torch.cat([branch_logits[t] for t in self.mags], dim=-1))  # (B, C)
        out = {
            "logits": logits,
            "branch_logits": branch_logits,
            "tile_attention": tile_att,
            "proto_attention": {},
        }
        if aux:
            out["aux_loss"] = self.aux_scale * torch.stack(aux).mean()
        return out
