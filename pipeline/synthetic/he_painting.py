"""Painting H&E-like tissue: haematoxylin/eosin concentration maps turned to RGB by Beer-Lambert.

A few irregular tissue pieces of fibrous pink stroma with spindle and lymphocyte nuclei, plus
benign variation (lymphoid aggregates, vessels, fat, stain and thickness variation); lesions
(for "tumor" slides) are crowded, irregular glands lined by large, dark, pleomorphic nuclei:
atypia shows at 20x (0.5 µm/px), gland architecture at 5x. Geometry comes only from the numpy
Generator passed in. The demo cohort (:mod:`pipeline.synthetic.demo`) renders its slides here.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

OD_BG = np.array([0.04, 0.045, 0.035])  # faint glass/mountant tint
H_VEC = np.array([0.60, 0.75, 0.28])  # haematoxylin optical density per unit (R, G, B)
E_VEC = np.array([0.10, 0.85, 0.42])  # eosin (pink)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std float32 noise of `shape` correlated over ~sigma px (made small, upsampled)."""
    f = max(1, int(sigma / 3))
    small = (max(2, shape[0] // f + 1), max(2, shape[1] // f + 1)) if f > 1 else tuple(shape)
    n = cv2.GaussianBlur(rng.standard_normal(small, np.float32), (0, 0), max(sigma / f, 0.5))
    sub = n[:: max(1, small[0] // 256), :: max(1, small[1] // 256)]  # statistics from a subsample
    n = (n - sub.mean()) / (sub.std() + 1e-6)
    return cv2.resize(n, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR) if f > 1 else n


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, irregular: float,
          aspect: float = 1.0, n: int = 96, rot: float | None = None) -> np.ndarray:
    """Closed irregular contour (n, 2) int32: a circle whose radius has random low harmonics."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in range(2, 9):
        rad += irregular / k * rng.uniform(0.3, 1.0) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.35, None) * r
    rot = rng.uniform(0, np.pi) if rot is None else rot
    x, y = rad * np.cos(t) * aspect, rad * np.sin(t) / aspect
    pts = np.stack([cx + x * np.cos(rot) - y * np.sin(rot), cy + x * np.sin(rot) + y * np.cos(rot)], 1)
    return np.round(pts).astype(np.int32)


def _nuclei(rng: np.random.Generator, cx, cy, a, b, phi, irregular: float, k: int = 16) -> np.ndarray:
    """(N, k, 2) int32 nucleus outlines: ellipses (half-axes a, b, angle phi) with smooth dents."""
    cx, cy, a, b, phi = (np.asarray(v, np.float64).reshape(-1, 1) for v in (cx, cy, a, b, phi))
    n = cx.shape[0]
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)[None, :]
    wob = 1 + irregular * (rng.uniform(-1, 1, (n, 1)) * np.cos(2 * t + rng.uniform(0, 6.3, (n, 1)))
                           + rng.uniform(-1, 1, (n, 1)) * np.cos(3 * t + rng.uniform(0, 6.3, (n, 1))))
    x, y = a * np.cos(t) * wob, b * np.sin(t) * wob
    px, py = cx + x * np.cos(phi) - y * np.sin(phi), cy + x * np.sin(phi) + y * np.cos(phi)
    return np.round(np.stack([px, py], -1)).astype(np.int32)


def _fill_nuclei(hmap: np.ndarray, polys: np.ndarray, od: np.ndarray) -> None:
    """Paint nucleus polygons into the haematoxylin map, grouped into a few intensity bins."""
    vals = np.clip(np.round(od * 100 / 6) * 6, 0, 255).astype(int)  # 0.06-OD bins
    for v in np.unique(vals):
        cv2.fillPoly(hmap, list(polys[vals == v]), int(v), lineType=cv2.LINE_8)


def _inside(mask: np.ndarray, x: np.ndarray, y: np.ndarray, q: int = 1) -> np.ndarray:
    """Which level-0 points (x, y) fall on a True pixel of `mask` drawn at 1/q resolution."""
    xi, yi = np.floor(np.asarray(x) / q).astype(int), np.floor(np.asarray(y) / q).astype(int)
    ok = (xi >= 0) & (yi >= 0) & (xi < mask.shape[1]) & (yi < mask.shape[0])
    out = np.zeros(xi.shape, bool)
    out[ok] = mask[yi[ok], xi[ok]]
    return out


def _tissue(rng: np.random.Generator, h: int, w: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue at 1/q resolution: 1-3 irregular pieces covering ~40 % of the slide.

    Returns the boolean mask and a soft uint8 version (128 = edge) to upsample for smooth rims.
    """
    hq, wq = h // q + 1, w // q + 1
    m = np.zeros((hq, wq), np.uint8)
    k = int(rng.integers(1, 4))
    along_x = wq >= hq  # pieces side by side along the slide's long axis
    long_side, short_side = (wq, hq) if along_x else (hq, wq)
    for i in range(k):
        f = (i + 0.5) / k + rng.uniform(-0.03, 0.03)
        cl, cs = f * long_side, rng.uniform(0.46, 0.54) * short_side
        cx, cy = (cl, cs) if along_x else (cs, cl)
        # half-extents available along / across the piece's long axis
        half_l, half_s = (short_side / 2, long_side / (2 * k)) if k > 1 else (long_side / 2, short_side / 2)
        r = min(math.sqrt(0.4 * hq * wq / (math.pi * k)) * rng.uniform(0.9, 1.1), 0.7 * math.sqrt(half_l * half_s))
        aspect = float(np.clip(rng.uniform(1.0, 1.3) * math.sqrt(k), 1.4 * r / half_s, 0.7 * half_l / r))
        rot = (0.0 if (k > 1) != along_x else np.pi / 2) + rng.uniform(-0.2, 0.2)
        cv2.fillPoly(m, [_blob(rng, cx, cy, r, 0.4, aspect=aspect, rot=rot)], 255)
    mf = cv2.GaussianBlur(m.astype(np.float32) / 255, (0, 0), 2) + 0.15 * _smooth_noise(rng, m.shape, 1.5)
    b = max(2, min(hq, wq) // 50)  # glass margin
    mf[:b], mf[-b:], mf[:, :b], mf[:, -b:] = 0, 0, 0, 0
    return mf > 0.5, np.clip(mf * 256, 0, 255).astype(np.uint8)


def _stroma(rng: np.random.Generator, h: int, w: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Eosin OD*100 (uint8) of wavy collagen bundles with clefts, and the fibre angle at 1/q res.

    Fibres are white noise averaged along a smooth direction field (line-integral convolution)
    at half resolution.
    """
    hh, hw = h // 2 + 1, w // 2 + 1
    tq = (h // q + 1, w // q + 1)
    theta = rng.uniform(0, np.pi) + 0.9 * _smooth_noise(rng, tq, 700 / q) + 0.3 * _smooth_noise(rng, tq, 40 / q)
    dx = cv2.resize(np.cos(theta), (tq[1] * q // 2, tq[0] * q // 2), interpolation=cv2.INTER_LINEAR)[:hh, :hw]
    dy = cv2.resize(np.sin(theta), (tq[1] * q // 2, tq[0] * q // 2), interpolation=cv2.INTER_LINEAR)[:hh, :hw]
    fib = cv2.GaussianBlur(rng.standard_normal((hh, hw), np.float32), (0, 0), 0.9)
    xx = np.arange(hw, dtype=np.float32)[None, :].repeat(hh, 0)
    yy = np.arange(hh, dtype=np.float32)[:, None].repeat(hw, 1)
    for s in (1.5, 4.5, 13.5):  # 3 x 3 x 3 = 27-tap box along the local fibre direction
        fib = fib + sum(cv2.remap(fib, cv2.scaleAdd(dx, t, xx), cv2.scaleAdd(dy, t, yy), cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REFLECT) for t in (-s, s))
    del xx, yy, dx, dy
    fib /= fib[::8, ::8].std() + 1e-6
    bundles = _smooth_noise(rng, (hh, hw), 10)
    e = 55 + 18 * fib + 12 * bundles + 10 * _smooth_noise(rng, (hh, hw), 150)
    e[(fib + 0.9 * bundles) < -1.9] = 5  # clefts between bundles
    return cv2.resize(np.clip(e, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR), theta


def _gland(rng: np.random.Generator, emap, hmap, cx: float, cy: float, rg: float, atypia: float) -> tuple:
    """Draw one malignant gland (or solid nest) into the maps; returns (nuclei, their OD, nucleoli xy)."""
    outer = _blob(rng, cx, cy, rg, 0.25 + 0.3 * atypia, aspect=rng.uniform(0.75, 1.3), n=48)
    cv2.fillPoly(emap, [outer], int(rng.uniform(26, 36)))
    cv2.fillPoly(hmap, [outer], int(rng.uniform(14, 22)))  # amphophilic (bluish) cytoplasm
    c = np.array([cx, cy])
    if rng.random() < 0.15 * atypia:  # a solid nest of tumour cells: nuclei everywhere inside
        n = int(np.pi * rg * rg / 420)
        ang, rr = rng.uniform(0, 2 * np.pi, n), rg * np.sqrt(rng.uniform(0, 0.8, n))
        px, py, phi = cx + rr * np.cos(ang), cy + rr * np.sin(ang), rng.uniform(0, np.pi, n)
    else:
        thick = rng.uniform(24, 38)  # epithelium height (px; 12-19 µm)
        rad = np.linalg.norm(outer - c, axis=1)
        lumen = np.round(c + (outer - c) * np.clip(1 - thick / rad, 0.15, 0.8)[:, None]).astype(np.int32)
        cv2.fillPoly(emap, [lumen], int(rng.choice([2, 3, 12])))  # empty or with pale secretion
        cv2.fillPoly(hmap, [lumen], 0)
        per = np.linalg.norm(np.diff(outer, axis=0, append=outer[:1]), axis=1).sum()
        n = int(per / rng.uniform(13, 17) * (1 + atypia * rng.uniform(0.2, 0.8)))
        idx = rng.uniform(0, len(outer), n)
        i0 = np.floor(idx).astype(int) % len(outer)
        f = (idx - np.floor(idx))[:, None]
        edge = outer[i0] * (1 - f) + outer[(i0 + 1) % len(outer)] * f
        er = np.linalg.norm(edge - c, axis=1)
        d = thick * rng.uniform(0.3, 0.5 + 0.4 * atypia, n)  # distance from the basement membrane
        p = c + (edge - c) * np.clip(1 - d / er, 0.1, 1)[:, None]
        px, py = p[:, 0], p[:, 1]
        phi = np.arctan2(py - cy, px - cx) + rng.normal(0, 0.25, n)  # long axis radial (polarity)
    s = 1 + atypia * rng.uniform(0.0, 0.55, len(px))  # pleomorphism: size varies cell to cell
    a, b = rng.uniform(8.5, 11, len(px)) * s, rng.uniform(5.5, 7.0, len(px)) * s
    polys, od = _nuclei(rng, px, py, a, b, phi, 0.06 + 0.1 * atypia), rng.uniform(1.0, 1.45, len(px))
    has = rng.random(len(px)) < 0.7 * atypia  # prominent nucleoli, slightly off centre
    dots = np.stack([px + rng.normal(0, 2, len(px)), py + rng.normal(0, 2, len(px))], 1)[has]
    return polys, od, dots


def _fat(rng: np.random.Generator, emap: np.ndarray, lob: np.ndarray, tissue: np.ndarray) -> None:
    """Adipocytes inside contour `lob`: empty polygonal cells (a Voronoi tiling) with thin pink septa."""
    h, w = emap.shape
    x0, y0 = np.maximum(lob.min(0), 0)
    x1, y1 = np.minimum(lob.max(0) + 1, (w, h))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return
    sp = rng.uniform(75, 120)  # adipocytes ~40-60 µm across
    gy, gx = np.mgrid[0:y1 - y0:sp * 0.87, 0:x1 - x0:sp]
    gx = gx + (np.arange(gx.shape[0]) % 2)[:, None] * sp / 2 + rng.uniform(-0.25, 0.25, gx.shape) * sp
    gy = gy + rng.uniform(-0.25, 0.25, gy.shape) * sp
    sub = cv2.Subdiv2D((0, 0, int(x1 - x0), int(y1 - y0)))
    for x, y in zip(gx.ravel(), gy.ravel(), strict=True):
        sub.insert((float(np.clip(x, 0, x1 - x0 - 1)), float(np.clip(y, 0, y1 - y0 - 1))))
    facets, _ = sub.getVoronoiFacetList([])
    cells = np.full((y1 - y0, x1 - x0), 3, np.uint8)
    cv2.polylines(cells, [np.round(f).astype(np.int32) for f in facets], True, int(rng.uniform(55, 80)), 2)
    inside = np.zeros_like(cells)
    cv2.fillPoly(inside, [lob - (x0, y0)], 1)
    inside &= tissue[y0:y1, x0:x1]
    roi = emap[y0:y1, x0:x1]
    roi[inside > 0] = cells[inside > 0]


def _vessels(rng: np.random.Generator, emap: np.ndarray, free: np.ndarray, q: int, spot) -> list[tuple]:
    """Small vessels: thin eosinophilic wall, flat endothelial nuclei, empty or plasma-filled lumen."""
    nuc = []
    for _ in range(int(rng.integers(4, 12))):
        cx, cy = spot()
        r, ecc, ang = rng.uniform(10, 40), rng.uniform(0.6, 1.0), rng.uniform(0, 180)
        wall = rng.uniform(1.25, 1.5)
        cv2.ellipse(emap, ((cx, cy), (2 * r * wall, 2 * r * ecc * wall), ang), int(rng.uniform(60, 85)), -1)
        cv2.ellipse(emap, ((cx, cy), (2 * r, 2 * r * ecc), ang), int(rng.choice([3, 3, 18])), -1)
        t, a = rng.uniform(0, 2 * np.pi, int(r / 5) + 2), np.deg2rad(ang)
        ex, ey = (r + 2) * np.cos(t), (r * ecc + 2) * np.sin(t)
        nuc.append((_nuclei(rng, cx + ex * np.cos(a) - ey * np.sin(a), cy + ex * np.sin(a) + ey * np.cos(a),
                            rng.uniform(7, 10, len(t)), rng.uniform(2, 2.8, len(t)), t + a + np.pi / 2, 0.05),
                    rng.uniform(0.8, 1.1, len(t))))
        cv2.circle(free.view(np.uint8), (int(cx / q), int(cy / q)), int(r * wall / q) + 1, 0, -1)
    return nuc


def _lesions(rng: np.random.Generator, emap, hmap, tm: np.ndarray, free: np.ndarray, q: int, spot,
             nuc: list) -> list:
    """1-4 carcinoma foci of crowded, back-to-back malignant glands; returns their contours.

    Radii are log-uniform from ~120 µm (a few 20x tiles) to ~1 mm; 30 % of slides get a small
    first focus. Contours: level-0 (x, y) polygons of each focus within the tissue (4 µm grid).
    """
    contours = []
    h, w = emap.shape
    for i in range(int(rng.integers(1, 5))):
        top = max(260.0, min(1900.0, 0.28 * min(h, w)))
        rl = math.exp(rng.uniform(math.log(240), math.log(top)))
        if i == 0 and rng.random() < 0.3:
            rl = rng.uniform(220, 320)
        cx, cy = spot()
        region = _blob(rng, cx, cy, rl, 0.6, aspect=rng.uniform(0.75, 1.35))
        reg = np.zeros_like(tm, np.uint8)
        cv2.fillPoly(reg, [region // q], 1)
        reg &= tm.view(np.uint8)
        found, _ = cv2.findContours(reg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours += [(c[:, 0] * q + q // 2).tolist() for c in found if len(c) >= 3]
        reg = reg.astype(bool)
        rg = rng.uniform(38, 70)  # mean gland radius (px); glands on a jittered hexagonal grid
        sp = rg * rng.uniform(2.0, 2.3)
        (x0, y0), (x1, y1) = region.min(0) - sp, region.max(0) + sp
        gy, gx = np.mgrid[y0:y1:sp * 0.87, x0:x1:sp]
        gx = gx + (np.arange(gx.shape[0]) % 2)[:, None] * sp / 2
        gx, gy = gx + rng.uniform(-0.3, 0.3, gx.shape) * sp, gy + rng.uniform(-0.3, 0.3, gy.shape) * sp
        keep = _inside(reg, gx, gy, q)
        atypia = rng.uniform(0.6, 1.0)
        for x, y in zip(gx[keep], gy[keep], strict=True):
            nuc.append(_gland(rng, emap, hmap, x, y, rg * rng.uniform(0.7, 1.3), atypia))
        free &= ~reg
    return contours


def render_slide(rng: np.random.Generator, h: int, w: int, tumor: bool) -> tuple[np.ndarray, list]:
    """Level-0 RGB uint8 image of one slide and its lesion contours (level-0 px, x/y)."""
    q = 8  # masks at 1/8 resolution (4 µm/px)
    tm, soft = _tissue(rng, h, w, q)
    full = cv2.resize(soft, (soft.shape[1] * q, soft.shape[0] * q), interpolation=cv2.INTER_LINEAR)[:h, :w]
    full = (full > 127).view(np.uint8)  # level-0 tissue (0/1) with smooth rims
    del soft
    tissue_yx = np.argwhere(tm) * q
    free = tm.copy()  # where stromal nuclei may go (1/q res)
    emap, theta = _stroma(rng, h, w, q)
    hmap = np.zeros((h, w), np.uint8)
    nuc: list[tuple] = []  # (nucleus polygons, haematoxylin OD[, nucleoli xy])

    def spot() -> tuple[float, float]:
        y, x = tissue_yx[rng.integers(len(tissue_yx))]
        return float(x + rng.uniform(0, q)), float(y + rng.uniform(0, q))

    for _ in range(int(rng.integers(0, 3))):  # fat lobules (benign, both classes)
        cx, cy = spot()
        lob = _blob(rng, cx, cy, rng.uniform(150, 450), 0.4)
        _fat(rng, emap, lob, full)
        cv2.fillPoly(free.view(np.uint8), [lob // q], 0)
    nuc += _vessels(rng, emap, free, q, spot)
    contours = _lesions(rng, emap, hmap, tm, free, q, spot, nuc) if tumor else []
    # lymphoid aggregates (benign, both classes): dense small round dark nuclei
    lymph = [np.empty((0, 2))]
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = spot()
        r = rng.uniform(100, 300)
        n = int(np.pi * r * r / 320)
        ang, rr = rng.uniform(0, 2 * np.pi, n), r * np.sqrt(rng.uniform(0, 1, n)) * (1 + 0.15 * rng.standard_normal(n))
        lymph.append(np.stack([cx + rr * np.cos(ang), cy + rr * np.sin(ang)], 1))
    # scattered stromal nuclei: spindle fibroblasts and lymphocytes
    area = float(free.sum()) * q * q
    n_fib, n_ly = int(area / rng.uniform(3500, 6000)), int(area / rng.uniform(12000, 25000))
    fx, fy = rng.uniform(0, w, n_fib), rng.uniform(0, h, n_fib)
    ok = _inside(free, fx, fy, q)
    fx, fy = fx[ok], fy[ok]
    phi = theta[(fy / q).astype(int), (fx / q).astype(int)] + rng.normal(0, 0.2, len(fx))  # along the fibres
    nuc.append((_nuclei(rng, fx, fy, rng.uniform(9, 14, len(fx)), rng.uniform(2.2, 3.3, len(fx)), phi, 0.1),
                rng.uniform(0.85, 1.2, len(fx))))
    lx, ly = rng.uniform(0, w, n_ly), rng.uniform(0, h, n_ly)
    ok = _inside(free, lx, ly, q)
    lp = np.concatenate([np.stack([lx[ok], ly[ok]], 1), *lymph])
    lp = lp[_inside(tm, lp[:, 0], lp[:, 1], q)]
    rl = rng.uniform(5.0, 6.5, len(lp))
    nuc.append((_nuclei(rng, lp[:, 0], lp[:, 1], rl, rl * rng.uniform(0.85, 1.0, len(lp)),
                        rng.uniform(0, np.pi, len(lp)), 0.05), rng.uniform(1.3, 1.6, len(lp))))
    for polys, od, *_ in nuc:
        _fill_nuclei(hmap, polys, od)
    dots = np.concatenate([d[2] for d in nuc if len(d) > 2] + [np.empty((0, 2))])
    r = rng.uniform(1.6, 2.6, len(dots))  # nucleoli, drawn over the nuclei they sit in
    _fill_nuclei(hmap, _nuclei(rng, dots[:, 0], dots[:, 1], r, r, np.zeros(len(dots)), 0.1, k=8),
                 np.full(len(dots), 2.1))
    # coarse chromatin, soft edges, section-thickness variation, then glass outside tissue
    tex = cv2.GaussianBlur(rng.integers(60, 200, (h // 2 + 1, w // 2 + 1), np.uint8), (0, 0), 0.6)
    tex = cv2.resize(tex, (w, h), interpolation=cv2.INTER_LINEAR)
    hmap = cv2.GaussianBlur(cv2.multiply(hmap, tex, scale=1 / 128), (0, 0), 0.7)
    del tex
    emap = cv2.GaussianBlur(emap, (0, 0), 0.6)
    thick = np.clip(128 * (1 + 0.12 * _smooth_noise(rng, (h // q + 1, w // q + 1), 50)), 80, 180).astype(np.uint8)
    thick = cv2.resize(thick, (thick.shape[1] * q, thick.shape[0] * q), interpolation=cv2.INTER_LINEAR)[:h, :w]
    thick = cv2.multiply(thick, full)  # 0 on glass
    emap = cv2.multiply(emap, thick, scale=1 / 128)
    hmap = cv2.multiply(hmap, thick, scale=1 / 128)
    return _to_rgb(rng, hmap, emap), contours


def _to_rgb(rng: np.random.Generator, hmap: np.ndarray, emap: np.ndarray) -> np.ndarray:
    """Beer-Lambert colour from the OD*100 maps, with per-slide stain variation.

    exp(-(H + E)) = exp(-H) * exp(-E): two 8-bit look-ups and one multiply per channel.
    """
    hv, ev = H_VEC + rng.normal(0, 0.03, 3), E_VEC + rng.normal(0, 0.03, 3)
    hv = hv / np.linalg.norm(hv) * rng.uniform(0.85, 1.15)
    ev = ev / np.linalg.norm(ev) * rng.uniform(0.8, 1.15)
    v = np.arange(256) / 100.0
    chans = []
    for c in range(3):
        lh = np.round(255 * np.exp(-v * hv[c])).astype(np.uint8)
        le = np.round(255 * np.exp(-v * ev[c] - OD_BG[c])).astype(np.uint8)
        chans.append(cv2.multiply(cv2.LUT(hmap, lh), cv2.LUT(emap, le), scale=1 / 255))
    return cv2.merge(chans)
