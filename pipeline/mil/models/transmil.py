"""TransMIL baseline (Shao et al., NeurIPS 2021) and TransMIL_3 over three magnifications.

TransMIL, per bag: ``Linear(D, d) -> ReLU`` per tile (here :class:`FeatureProjection`, which
also standardises and applies dropout); the L tiles are "squared": the sequence is padded to
s * s tokens, s = ceil(sqrt(L)), by repeating its first s * s - L tiles (at most L, so every
tile appears once or twice); a learnable class token is prepended; then

    TransLayer -> PPEG -> TransLayer -> LayerNorm -> class token -> Linear(d, C)

TransLayer = ``x + Attn(LayerNorm(x))``, 8 heads of d / 8 dims, q/k/v without bias, output
projection and dropout 0.1 (TransMIL has no MLP block). PPEG = the tile tokens laid out
row-major on the s x s grid, ``x + DWConv7(x) + DWConv5(x) + DWConv3(x)`` (depthwise, zero
padding), class token passed through. Shapes: B bags, N tiles (padded), d hidden dim, C
classes, S batch grid side, T = 1 + S * S tokens, h heads.

Differences from the reference code, none changing what is computed for a bag except (1):

1. Attention is EXACT softmax attention (``F.scaled_dot_product_attention``), not TransMIL's
   Nystrom approximation of the same softmax attention (and without the 33-tap depthwise
   residual conv on v that the ``nystrom-attention`` package adds). Nystrom saves time and
   memory; exact attention costs O(T^2) time (measured, CPU, 1 thread, torch 2.14: a
   training step of transmil_3 at 5,000 / 1,250 / 312 tiles 1.3 s, at 20,000 / 5,000 / 1,250
   tiles 17 s) but O(T) memory where SDPA has a fused kernel (CPU flash attention, CUDA
   memory-efficient / flash; +530 MiB peak RSS at 20,000 tiles on CPU, key-padding mask
   included); only SDPA's math fallback would hold the O(h * T^2) attention matrix. The
   CUDA fused backward is not deterministic under ``use_deterministic_algorithms(True,
   warn_only=True)`` (PyTorch warns once), so GPU training repeats only up to rounding.
2. Batched with masks: bag b's s_b x s_b grid is the top-left corner of one S x S batch grid
   (S = ceil(sqrt(N))), key-padding masks hide the grid cells outside it, and those cells are
   zeroed before the PPEG convolution, so with zero padding the convolution sees exactly the
   bag's own grid. Tiles are taken in order from the real (mask True) rows wherever they are,
   so padded rows never change a bag's output, and an empty bag gives the class token alone.
3. The second layer computes only the class token's row of attention: it is the only row the
   classifier reads, so this is exact and halves the quadratic cost.
4. PPEG's three convolutions and the identity are summed into one 7 x 7 depthwise kernel
   (the same linear map, one pass instead of three).

``tile_attention``: the second layer's attention from the class token, averaged over heads,
class-token self-attention left out and renormalised, the two copies of a repeated tile
summed: sums to 1 over a bag's real tiles, exactly 0 on padding (all zero for an empty bag).
TransMIL_3 = one TransMIL branch per magnification, bag logits = a linear layer over the
concatenated branch logits ``[y_20; y_10; y_5]`` (as ABMIL_3).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig
from .layers import FeatureProjection, LateFusion

HEADS = 8  # TransMIL: 8 heads of d / 8 dims
ATTN_DROPOUT = 0.1  # TransMIL: dropout after the attention output projection


class TransLayer(nn.Module):
    """Pre-norm multi-head self-attention with a residual: ``x + Attn(LayerNorm(x))``."""

    def __init__(self, d: int, heads: int = HEADS, dropout: float = ATTN_DROPOUT) -> None:
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, h, T, d / h)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), keep (B, T) bool (True = real token) -> (B, T, d)."""
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)  # (B, T, d) each
        o = F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v), attn_mask=keep[:, None, None, :]
        )  # (B, h, T, d / h); every row keeps the class token, so no row is fully masked
        return x + self.drop(self.out(o.transpose(1, 2).flatten(2)))  # (B, T, d)

    def forward_cls(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the class token's output row -> cls (B, d), its attention (B, h, T)."""
        d = x.shape[-1]
        y = self.norm(x)  # (B, T, d)
        q = F.linear(y[:, :1], self.qkv.weight[:d])  # (B, 1, d)
        k, v = F.linear(y, self.qkv.weight[d:]).chunk(2, dim=-1)  # (B, T, d) each
        scores = self._heads(q) @ self._heads(k).transpose(-1, -2) * self.scale  # (B, h, 1, T)
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        att = torch.softmax(scores, dim=-1)  # (B, h, 1, T)
        o = (att @ self._heads(v)).transpose(1, 2).flatten(2)  # (B, 1, d)
        return x[:, 0] + self.drop(self.out(o)).squeeze(1), att.squeeze(2)  # (B, d), (B, h, T)


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + DWConv7(x) + DWConv5(x) + DWConv3(x)``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.proj5 = nn.Conv2d(d, d, 5, padding=2, groups=d)
        self.proj3 = nn.Conv2d(d, d, 3, padding=1, groups=d)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, d, S, S) -> (B, d, S, S), as one 7 x 7 depthwise convolution."""
        w = (
            self.proj7.weight
            + F.pad(self.proj5.weight, (1, 1, 1, 1))
            + F.pad(self.proj3.weight, (2, 2, 2, 2))
        )  # (d, 1, 7, 7)
        identity = torch.zeros_like(w)
        identity[:, :, 3, 3] = 1.0
        bias = self.proj7.bias + self.proj5.bias + self.proj3.bias  # (d,)
        return F.conv2d(grid, w + identity, bias, padding=3, groups=grid.shape[1])


def square_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Where each bag's squared tile sequence sits on the batch's S x S grid.

    Bag b with L real tiles (in row order r_0 < r_1 < ...) gets the s x s corner of the grid,
    s = ceil(sqrt(L)); its cell (i, j) holds sequence position k = i * s + j, i.e. tile
    r_(k mod L) (TransMIL repeats the first s * s - L tiles).

    Args:
        mask: (B, N) bool, True = real tile.

    Returns:
        src: (B, S * S) long, row of ``mask`` feeding each grid cell (0 outside the bag).
        cell_valid: (B, S * S) bool, True inside the bag's s x s corner.
        tile_cells: (B, N, 2) long, the grid cells of each row's first and second copy, S * S
            (one past the last cell) where there is none (padding rows, unrepeated tiles).
        S: grid side, ceil(sqrt(N)).
    """
    b, n = mask.shape
    side = math.isqrt(n)
    side += side * side < n  # S = ceil(sqrt(N)), from the shape alone (no device sync)
    dev = mask.device
    length = mask.sum(1, keepdim=True)  # (B, 1)
    s = length.float().sqrt().round().long()
    s = s + (s * s < length)  # (B, 1) exact ceil(sqrt(L))
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, N): real rows first
    rank = torch.argsort(order, dim=1)  # (B, N): position of each row in the real-first order

    cell = torch.arange(side * side, device=dev)  # (S*S,)
    i, j = cell // max(side, 1), cell % max(side, 1)  # (S*S,) each
    cell_valid = (i < s) & (j < s)  # (B, S*S)
    k = i * s + j  # (B, S*S): bag-local sequence position
    src = order.gather(1, (k % length.clamp_min(1)) * cell_valid)  # (B, S*S)

    copies = torch.stack([rank, rank + length], dim=-1)  # (B, N, 2): sequence positions k
    s1 = s.clamp_min(1).unsqueeze(-1)  # (B, 1, 1)
    exists = (copies < (s * s).unsqueeze(-1)) & mask.unsqueeze(-1)  # (B, N, 2)
    tile_cells = torch.where(exists, (copies // s1) * side + copies % s1, side * side)  # (B, N, 2)
    return src, cell_valid, tile_cells, side


class TransMIL(nn.Module):
    """TransMIL on the tiles of one magnification ``mag`` (exact attention, see module doc)."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig, mag: str) -> None:
        super().__init__()
        if cfg.d % HEADS:
            raise ValueError(f"TransMIL needs ModelConfig.d divisible by {HEADS}, got {cfg.d}")
        self.mag = mag
        self.proj = FeatureProjection(in_dim, cfg.d, cfg.dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.d))  # TransMIL: standard normal
        self.layer1 = TransLayer(cfg.d)
        self.ppeg = PPEG(cfg.d)
        self.layer2 = TransLayer(cfg.d)
        self.norm = nn.LayerNorm(cfg.d)
        self.classifier = nn.Linear(cfg.d, n_classes)

    def branch(
        self, feats: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, N, D), mask (B, N) -> logits (B, C), tile attention (B, N); labels unused."""
        h = self.proj(feats, mask)  # (B, N, d)
        b, n, d = h.shape
        src, cell_valid, tile_cells, side = square_layout(mask)
        rows = torch.arange(b, device=h.device).unsqueeze(1)  # (B, 1)
        # indexing, not gather: its backward (accumulating the repeated tiles) is
        # deterministic on CUDA
        grid = h[rows, src] * cell_valid.unsqueeze(-1).to(h.dtype)  # (B, S*S, d)
        x = torch.cat([self.cls_token.expand(b, -1, -1), grid], dim=1)  # (B, T, d)
        keep = F.pad(cell_valid, (1, 0), value=True)  # (B, T): class token always kept

        x = self.layer1(x, keep)  # (B, T, d)
        if side > 0:
            cells = x[:, 1:] * cell_valid.unsqueeze(-1).to(x.dtype)  # (B, S*S, d): 0 outside
            cells = self.ppeg(cells.transpose(1, 2).unflatten(-1, (side, side)))  # (B, d, S, S)
            x = torch.cat([x[:, :1], cells.flatten(2).transpose(1, 2)], dim=1)  # (B, T, d)
        cls, att = self.layer2.forward_cls(x, keep)  # (B, d), (B, h, T)
        logits = self.classifier(self.norm(cls))  # (B, C)

        with torch.no_grad():  # a read-out for heatmaps, no gradient path
            a = att.mean(1)[:, 1:]  # (B, S*S): cls -> grid cells, head mean, cls itself left out
            a = a / a.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
            a = F.pad(a, (0, 1))  # (B, S*S + 1): a trailing 0 for "no such copy" (index S*S)
            tile_att = a.gather(1, tile_cells.flatten(1)).view(b, n, 2).sum(-1)  # (B, N)
        return logits, tile_att


class TransMIL3(LateFusion):
    """One TransMIL branch per magnification; linear layer over the concatenated logits."""

    def __init__(self, in_dims: dict[str, int], n_classes: int, cfg: ModelConfig) -> None:
        super().__init__(in_dims, n_classes, cfg, TransMIL)
