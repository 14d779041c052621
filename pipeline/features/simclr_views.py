"""SimCLR's views (Chen et al. 2020, as DSMIL uses them), made a batch at a time on the device.

`draw_view_params` draws one view's random choices on the CPU from a per-tile seeded
generator, so views do not depend on workers, batch size or a resume. `make_views`
applies a batch of them where the model runs, in a handful of batched ops: crop + resize
(area-averaged like an antialiased resize, through torchvision's `roi_align`), both flips,
colour jitter in a per-view random order, grayscale and Gaussian blur. Each op is
torchvision's per-image op with a per-view factor (tests/test_simclr_views.py checks them
against `torchvision.transforms.v2.functional`). Per-image transforms in DataLoader workers
cost ~30 ms a view: 14 workers fed an H200 232 views/s against the model's 5,400/s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

SCALE = (0.2, 1.0)  # RandomResizedCrop area fraction
RATIO = (3 / 4, 4 / 3)  # and aspect ratio
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (applied with p = 0.8)
P_JITTER, P_GRAY, P_BLUR = 0.8, 0.2, 0.5
SIGMA = (0.1, 2.0)  # Gaussian blur sigma range
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale

# one view's parameter vector: crop box (px in the tile), flips, jitter flag + factors + order, gray, blur
TOP, LEFT, HEIGHT, WIDTH, HFLIP, VFLIP, JIT, BRIGHT, CONTRAST, SAT, HUE, ORDER = range(12)
GRAY, BLUR, SIG = 16, 17, 18  # ORDER .. ORDER + 3 hold the jitter ops' permutation
N_PARAMS = 19


def blur_kernel_size(crop: int) -> int:
    """Blur kernel side: ~10 % of the view, odd, at least 3 (SimCLR's choice)."""
    return max(3, int(0.1 * crop) // 2 * 2 + 1)


def draw_view_params(size: int, gen: torch.Generator) -> Tensor:
    """(N_PARAMS,) float32: the random choices of one view of a `size` x `size` tile."""

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    p = torch.zeros(N_PARAMS)
    top, left, h, w = 0, 0, size, size  # RandomResizedCrop's fallback for a square tile
    for _ in range(10):  # RandomResizedCrop.get_params
        area = size * size * u(*SCALE)
        ratio = math.exp(u(math.log(RATIO[0]), math.log(RATIO[1])))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= size and 0 < ch <= size:
            top = int(torch.randint(0, size - ch + 1, (), generator=gen))
            left = int(torch.randint(0, size - cw + 1, (), generator=gen))
            h, w = ch, cw
            break
    p[TOP], p[LEFT], p[HEIGHT], p[WIDTH] = top, left, h, w
    p[HFLIP], p[VFLIP] = u(0, 1) < 0.5, u(0, 1) < 0.5
    p[JIT] = u(0, 1) < P_JITTER
    for k, j in enumerate(JITTER[:3]):
        p[BRIGHT + k] = u(1 - j, 1 + j)
    p[HUE] = u(-JITTER[3], JITTER[3])
    p[ORDER : ORDER + 4] = torch.randperm(4, generator=gen).float()
    p[GRAY] = u(0, 1) < P_GRAY
    p[BLUR] = u(0, 1) < P_BLUR
    p[SIG] = u(*SIGMA)
    return p


def make_views(tiles: Tensor, params: Tensor, crop: int) -> Tensor:
    """uint8 (B, 3, S, S) tiles and (B, V, N_PARAMS) -> float (B * V, 3, crop, crop) in [0, 1],
    each tile's V views adjacent; runs on the tiles' device."""
    b, v = params.shape[:2]
    p = params.reshape(b * v, N_PARAMS).to(tiles.device, torch.float32)  # (N, P)
    x = tiles.float().div_(255)  # (B, 3, S, S)
    tile = torch.arange(b * v, device=x.device).div(v, rounding_mode="floor").float()  # (N,)
    boxes = torch.stack([tile, p[:, LEFT], p[:, TOP], p[:, LEFT] + p[:, WIDTH], p[:, TOP] + p[:, HEIGHT]], 1)
    # aligned: pixel i spans [i, i + 1); adaptive sampling averages ceil(box / crop) points per
    # output pixel, so a downscale is area-averaged, an upscale bilinear
    y = roi_align(x, boxes, output_size=crop, spatial_scale=1.0, sampling_ratio=-1, aligned=True)  # (N, 3, c, c)
    y = torch.where(p[:, HFLIP, None, None, None] > 0.5, y.flip(-1), y)
    y = torch.where(p[:, VFLIP, None, None, None] > 0.5, y.flip(-2), y)
    jitter = p[:, JIT] > 0.5
    for r in range(4):  # the r-th op of each view's own order
        for k, op in enumerate((brightness, contrast, saturation, hue)):
            sel = jitter & (p[:, ORDER + r] == k)
            if sel.any():
                y[sel] = op(y[sel], p[sel, BRIGHT + k])
    gray = p[:, GRAY, None, None, None] > 0.5
    y = torch.where(gray, grayscale(y).expand_as(y), y)
    sel = p[:, BLUR] > 0.5
    if sel.any():
        y[sel] = gaussian_blur(y[sel], p[sel, SIG], blur_kernel_size(crop))
    return y  # (N, 3, crop, crop)


# ----------------------------------------------------------------------------- per-view ops
# x: float (N, 3, H, W) in [0, 1]; f: (N,) one factor per image


def _per_image(f: Tensor) -> Tensor:
    return f.view(-1, 1, 1, 1)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    f = _per_image(f)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def grayscale(x: Tensor) -> Tensor:
    """(N, 1, H, W) luma, torchvision's weights."""
    r, g, b = x.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _per_image(f)).clamp_(0, 1)


def contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x), f)


def hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by `shift` turns (RGB -> HSV -> RGB, as torchvision's adjust_hue)."""
    maxc, _ = x.max(dim=-3)
    minc, _ = x.min(dim=-3)
    eq = maxc == minc
    chroma = maxc - minc
    sat = chroma / torch.where(eq, torch.ones_like(maxc), maxc)
    div = torch.where(eq, torch.ones_like(chroma), chroma)
    r, g, b = x.unbind(-3)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(eq, torch.zeros_like(h), h)
    h = ((h / 6.0 + 1.0).fmod(1.0) + shift.view(-1, 1, 1)).remainder(1.0)  # (N, H, W)
    h6 = h * 6.0
    i = torch.floor(h6)
    frac = h6 - i
    i = i.long() % 6
    val = maxc
    p = (val * (1 - sat)).clamp(0, 1)
    q = (val * (1 - sat * frac)).clamp(0, 1)
    t = (val * (1 - sat * (1 - frac))).clamp(0, 1)
    # sector -> (r, g, b) from (val, q, p, t)
    table = torch.stack([torch.stack(c, dim=-3) for c in (
        (val, q, p, p, t, val), (t, val, val, q, p, p), (p, p, t, val, val, q))], dim=-4)  # (N, 3, 6, H, W)
    return table.gather(-3, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(-3)


def gaussian_blur(x: Tensor, sigma: Tensor, k: int) -> Tensor:
    """Separable Gaussian blur, one sigma per image, reflect padding (torchvision's)."""
    n, c, hgt, wid = x.shape
    t = torch.linspace(-(k // 2), k // 2, k, device=x.device)  # (k,)
    ker = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N * C, k)
    y = F.pad(x.reshape(1, n * c, hgt, wid), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, ker.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, ker.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, hgt, wid)
