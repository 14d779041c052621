"""SimCLR's batched on-device views against torchvision's per-image ops (the oracle), and their
parameters' distribution and seeding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from pipeline.features import simclr_views as sv


def _images(n: int = 5, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Float (n, 3, size, size) in [0, 1]: smooth colour fields plus noise, some saturated."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=size, mode="bilinear", align_corners=False)
    x = (base + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    x[0, :, :8] = 1.0  # white and grey patches: hue undefined, saturation 0
    x[1, :, :8] = 0.5
    return x


def _identity_params(n: int, size: int) -> torch.Tensor:
    p = torch.zeros(n, sv.N_PARAMS)
    p[:, sv.HEIGHT] = p[:, sv.WIDTH] = size
    p[:, sv.ORDER : sv.ORDER + 4] = torch.arange(4.0)
    p[:, sv.BRIGHT : sv.SAT + 1] = 1.0
    p[:, sv.SIG] = 1.0
    return p


@pytest.mark.parametrize("k, op, ref, factors", [
    (0, sv.brightness, TF.adjust_brightness, (0.6, 1.0, 1.37)),
    (1, sv.contrast, TF.adjust_contrast, (0.6, 0.93, 1.4)),
    (2, sv.saturation, TF.adjust_saturation, (0.6, 1.2, 1.4)),
    (3, sv.hue, TF.adjust_hue, (-0.1, 0.0, 0.073)),
])
def test_each_jitter_op_is_torchvisions_with_a_factor_per_image(k, op, ref, factors):
    x = _images(len(factors))
    got = op(x.clone(), torch.tensor(factors))
    want = torch.stack([ref(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_grayscale_and_blur_are_torchvisions():
    x = _images(3, 40)
    torch.testing.assert_close(sv.grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, num_output_channels=3))
    sig = torch.tensor([0.1, 0.9, 2.0])
    want = torch.stack([TF.gaussian_blur(x[i], [7, 7], [float(s), float(s)]) for i, s in enumerate(sig)])
    torch.testing.assert_close(sv.gaussian_blur(x, sig, 7), want, atol=1e-5, rtol=0)


def test_crop_resize_is_area_average_down_and_bilinear_up():
    x = _images(2, 64)
    tiles = (x * 255).round().to(torch.uint8)
    xf = tiles.float() / 255
    p = _identity_params(2, 64)
    down = sv.make_views(tiles, p.view(2, 1, -1), 16)  # whole tile, 4x down
    torch.testing.assert_close(down, F.interpolate(xf, size=16, mode="area"), atol=1e-5, rtol=0)
    up = sv.make_views(tiles, p.view(2, 1, -1), 96)  # 1.5x up
    torch.testing.assert_close(up, F.interpolate(xf, size=96, mode="bilinear", align_corners=False),
                               atol=1e-5, rtol=0)
    q = p.clone()  # a box: rows 8..40, columns 16..48 of tile 1, same size out = the pixels themselves
    q[:, sv.TOP], q[:, sv.LEFT], q[:, sv.HEIGHT], q[:, sv.WIDTH] = 8, 16, 32, 32
    torch.testing.assert_close(sv.make_views(tiles, q.view(2, 1, -1), 32)[1], xf[1, :, 8:40, 16:48])


def test_make_views_composes_the_ops_in_each_views_order():
    x = _images(2, 32)
    tiles = (x * 255).round().to(torch.uint8)
    xf = tiles.float() / 255
    p = _identity_params(4, 32).view(2, 2, -1)  # two tiles, two views each
    p[0, 1, sv.HFLIP] = 1
    p[1, 0, sv.VFLIP] = 1
    p[1, 0, sv.JIT], p[1, 0, sv.BRIGHT], p[1, 0, sv.HUE] = 1, 1.3, 0.05
    p[1, 0, sv.ORDER : sv.ORDER + 4] = torch.tensor([3.0, 1, 0, 2])  # hue first, then contrast, brightness
    p[1, 0, sv.CONTRAST] = 0.7
    p[1, 1, sv.GRAY], p[1, 1, sv.BLUR], p[1, 1, sv.SIG] = 1, 1, 1.5
    v = sv.make_views(tiles, p, 32)
    assert v.shape == (4, 3, 32, 32)
    torch.testing.assert_close(v[0], xf[0])
    torch.testing.assert_close(v[1], xf[0].flip(-1))
    want = TF.adjust_brightness(TF.adjust_contrast(TF.adjust_hue(xf[1].flip(-2), 0.05), 0.7), 1.3)
    torch.testing.assert_close(v[2], want, atol=2e-5, rtol=0)
    k = sv.blur_kernel_size(32)
    want = TF.gaussian_blur(TF.rgb_to_grayscale(xf[1], num_output_channels=3), [k, k], [1.5, 1.5])
    torch.testing.assert_close(v[3], want, atol=1e-5, rtol=0)


def test_params_follow_simclrs_distribution_and_their_seed():
    g = torch.Generator().manual_seed(0)
    p = torch.stack([sv.draw_view_params(256, g) for _ in range(4000)])
    area = p[:, sv.HEIGHT] * p[:, sv.WIDTH] / 256**2
    ratio = p[:, sv.WIDTH] / p[:, sv.HEIGHT]
    from torchvision.transforms import RandomResizedCrop  # its sampler: the reference distribution

    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 256, 256), list(sv.SCALE), list(sv.RATIO))[2:]
                        for _ in range(4000)], dtype=torch.float32)  # (4000, 2) h, w
    ref_area = ref[:, 0] * ref[:, 1] / 256**2
    assert area.min() >= 0.19 and area.max() <= 1.0
    for q in (0.1, 0.5, 0.9):
        assert float(area.quantile(q)) == pytest.approx(float(ref_area.quantile(q)), abs=0.03)
    assert ratio.min() >= 0.74 and ratio.max() <= 1.35
    assert (p[:, sv.TOP] + p[:, sv.HEIGHT]).max() <= 256 and (p[:, sv.LEFT] + p[:, sv.WIDTH]).max() <= 256
    for col, rate in ((sv.HFLIP, 0.5), (sv.VFLIP, 0.5), (sv.JIT, sv.P_JITTER), (sv.GRAY, sv.P_GRAY),
                      (sv.BLUR, sv.P_BLUR)):
        assert p[:, col].mean() == pytest.approx(rate, abs=0.03)
    assert p[:, sv.BRIGHT].min() >= 0.6 and p[:, sv.BRIGHT].max() <= 1.4 and p[:, sv.HUE].abs().max() <= 0.1
    assert torch.equal(p[:, sv.ORDER : sv.ORDER + 4].sort(1).values, torch.arange(4.0).expand(4000, 4))
    assert len({tuple(r.tolist()) for r in p[:, sv.ORDER : sv.ORDER + 4]}) == math.factorial(4)
    a = sv.draw_view_params(256, torch.Generator().manual_seed(7))
    assert torch.equal(a, sv.draw_view_params(256, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, sv.draw_view_params(256, torch.Generator().manual_seed(8)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_views_on_cuda_match_the_cpu():
    g = torch.Generator().manual_seed(1)
    tiles = (_images(8, 64) * 255).round().to(torch.uint8)
    p = torch.stack([sv.draw_view_params(64, g) for _ in range(16)]).view(8, 2, -1)
    torch.testing.assert_close(sv.make_views(tiles.cuda(), p, 48).cpu(), sv.make_views(tiles, p, 48),
                               atol=1e-4, rtol=0)
