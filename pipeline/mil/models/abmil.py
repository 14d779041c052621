"""Attention-based MIL baselines: ABMIL on one magnification and ABMIL_3 over three.

ABMIL (Ilse et al., 2018, gated attention): per tile ``Linear(D, d) -> ReLU -> Dropout``,
gated attention over the real tiles (masked softmax, so padding never changes the output),
attention-weighted mean, linear classifier. ABMIL_3 runs one independent ABMIL branch per
magnification and maps the concatenated branch logits ``[y_20; y_10; y_5]`` to the bag logits
with a linear layer (the same fusion as M2OTCA, without prototypes or cross-attention).

CLAM-SB (Lu et al., 2021, single attention branch) adds C binary instance classifiers trained
on the k most and least attended tiles: for the bag's class the top k are positives and the
bottom k negatives, for every other class the top k are negatives (CLAM's ``subtyping``
variant, so every instance classifier learns). CLAM-SB_3 = one CLAM-SB branch per
magnification with the ABMIL_3 fusion. In training, when labels are given, the output has
``aux_loss`` (scalar) = (1 - bag_weight) / bag_weight * mean instance loss, for the trainer to
add to its cross-entropy (CLAM's bag_weight * CE + (1 - bag_weight) * instance loss, rescaled).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig
from .layers import AttentionHead, FeatureProjection, LateFusion


class ABMIL(nn.Module):
    """Gated-attention MIL on the tiles of one magnification ``mag``."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig, mag: str) -> None:
        super().__init__()
        self.mag = mag
        self.proj = FeatureProjection(in_dim, cfg.d, cfg.dropout)
        self.head = AttentionHead(cfg.d, cfg.attn_dim, n_classes)

    def branch(
        self, feats: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, N, D), mask (B, N) -> logits (B, C), tile attention (B, N); labels unused."""
        h = self.proj(feats, mask)  # (B, N, d)
        logits, att, _ = self.head(h, mask)  # (B, C), (B, N)
        return logits, att

    def forward(self, batch: dict, labels: torch.Tensor | None = None) -> dict:
        logits, att = self.branch(batch["feats"][self.mag], batch["mask"][self.mag])
        return {
            "logits": logits,  # (B, C)
            "branch_logits": {self.mag: logits},
            "tile_attention": {self.mag: att},  # (B, N)
            "proto_attention": {},
        }


class ABMIL3(LateFusion):
    """One ABMIL branch per magnification; linear layer over the concatenated branch logits."""

    def __init__(self, in_dims: dict[str, int], n_classes: int, cfg: ModelConfig) -> None:
        super().__init__(in_dims, n_classes, cfg, ABMIL)


class CLAMSB(ABMIL):
    """CLAM-SB on one magnification: ABMIL plus attention-ranked instance classifiers.

    A branch for :class:`CLAMSB3`: its ``branch`` also returns the instance loss.
    """

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig, mag: str) -> None:
        super().__init__(in_dim, n_classes, cfg, mag)
        self.n_classes, self.k = n_classes, cfg.clam_k_sample
        self.instance = nn.Linear(cfg.d, 2 * n_classes)  # C binary classifiers, fused

    def instance_loss(
        self, h: torch.Tensor, att: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean CE of the instance classifiers on the top / bottom k attended real tiles."""
        b, n, d = h.shape
        k = min(self.k, n)
        top = att.masked_fill(~mask, -1.0).topk(k, dim=1).indices  # (B, k)
        bottom = att.masked_fill(~mask, 2.0).topk(k, dim=1, largest=False).indices  # (B, k)
        real = torch.arange(k, device=h.device) < mask.sum(1, keepdim=True)  # (B, k)
        is_cls = F.one_hot(labels.long(), self.n_classes).bool()  # (B, C)
        rows = torch.arange(b, device=h.device).unsqueeze(1)  # (B, 1)

        def ce(idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            x = h[rows, idx]  # (B, k, d); indexing, as its backward is deterministic on CUDA
            logit = self.instance(x).view(b, k, self.n_classes, 2)  # (B, k, C, 2)
            return F.cross_entropy(logit.reshape(-1, 2), target.reshape(-1), reduction="none").view(
                b, k, self.n_classes
            )  # (B, k, C)

        top_target = is_cls.unsqueeze(1).expand(b, k, -1).long()  # (B, k, C)
        ce_top = ce(top, top_target)  # (B, k, C)
        ce_bottom = ce(bottom, torch.zeros_like(top_target))  # (B, k, C)
        w_top = real.unsqueeze(2).expand(-1, -1, self.n_classes).to(h.dtype)  # (B, k, C)
        w_bottom = w_top * is_cls.unsqueeze(1)  # (B, k, C): bottom k only for the bag's class
        total = (ce_top * w_top + ce_bottom * w_bottom).sum(1)  # (B, C)
        count = (w_top + w_bottom).sum(1).clamp_min(1.0)  # (B, C)
        return (total / count).mean()

    def branch(
        self, feats: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> logits (B, C), tile attention (B, N), instance loss (training with labels)."""
        h = self.proj(feats, mask)  # (B, N, d)
        logits, att, _ = self.head(h, mask)  # (B, C), (B, N)
        inst = None
        if self.training and labels is not None:
            inst = self.instance_loss(h, att, mask, labels)
        return logits, att, inst


class CLAMSB3(LateFusion):
    """One CLAM-SB branch per magnification; linear layer over the concatenated logits."""

    def __init__(self, in_dims: dict[str, int], n_classes: int, cfg: ModelConfig) -> None:
        super().__init__(in_dims, n_classes, cfg, CLAMSB)
        self.aux_scale = (1.0 - cfg.clam_bag_weight) / cfg.clam_bag_weight
