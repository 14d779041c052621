"""Attention heatmaps: each branch's tile attention painted over the slide, 20x | 10x | 5x."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.slides import open_slide


def load_attention(npz: str | Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """slide_id -> mag -> (attention (N,), coords (N, 2)) from an evaluation's attention.npz."""
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    with np.load(npz) as z:
        for key in z.files:
            sid, mag, kind = key.split("|")
            if kind == "attention":
                out.setdefault(sid, {})[mag] = (z[key], z[f"{sid}|{mag}|coords"])
    return out


def attention_canvas(shape: tuple[int, int], scale: float, coords: np.ndarray, attn: np.ndarray,
                     side: float) -> np.ndarray:
    """(H, W) float image, NaN off-tissue: each tile's footprint filled with its rank-scaled attention."""
    canvas = np.full(shape, np.nan, np.float32)
    if len(attn) == 0:
        return canvas
    ranks = np.argsort(np.argsort(attn)) / max(1, len(attn) - 1)  # rank scale: robust to peaky softmax
    s = side / scale
    for (x, y), v in zip(coords, ranks):
        x0, y0 = int(x / scale), int(y / scale)
        canvas[y0 : y0 + max(1, int(round(s))), x0 : x0 + max(1, int(round(s)))] = v
    return canvas


def render_heatmap(slide_path: str | Path, per_mag: dict[str, tuple[np.ndarray, np.ndarray]],
                   tile_px: dict[str, float], out: str | Path, title: str = "", mpp: float | None = None,
                   max_side: int = 900) -> None:
    """Three panels (one per magnification) of attention over the slide thumbnail, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open_slide(slide_path, mpp=mpp) as slide:
        W, H = slide.info.width, slide.info.height
        scale = max(W, H) / max_side  # level-0 px per thumbnail px
        thumb = slide.thumbnail(scale * slide.info.mpp)
    mags = list(per_mag)
    fig, axes = plt.subplots(1, len(mags), figsize=(4.2 * len(mags), 4.2 * H / W + 0.8), dpi=110, squeeze=False)
    for ax, mag in zip(axes[0], mags):
        attn, coords = per_mag[mag]
        canvas = attention_canvas(thumb.shape[:2], scale, coords, attn, tile_px[mag])
        ax.imshow(thumb)
        im = ax.imshow(np.ma.masked_invalid(canvas), cmap="inferno", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{mag} ({len(attn)} tiles)", fontsize=10)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.025, pad=0.01, label="attention (rank within slide)")
    fig.suptitle(title, fontsize=11)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
