"""What every slide reader returns: `SlideInfo` (geometry, vendor, base mpp) and `Slide`, whose
`read(x0, y0, size, mpp)` gives an RGB uint8 tile at any coarser µm/px; a reader implements
only `_read_level`. `ReaderRefused` is how a reader passes a file it recognised but cannot
decode to the next reader of the factory (`pipeline.slides.factory.READERS`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import SlideError


class ReaderRefused(Exception):
    """A reader recognised the file but cannot read it (e.g. an unsupported TIFF compression);
    the factory tries the next reader and, when none can, names every refusal in one SlideError."""


@dataclass
class SlideInfo:
    """What the pipeline records about a slide: geometry, vendor and where its mpp came from."""

    path: str
    backend: str  # "openslide" (DICOM included) or "tifffile"
    vendor: str
    width: int  # level-0 size (px)
    height: int
    mpp: float  # level-0 µm/px
    mpp_source: str  # "override", "openslide", "tiff-resolution" or "objective-power"
    level_downsamples: list[float] = field(default_factory=list)
    level_dimensions: list[tuple[int, int]] = field(default_factory=list)


def composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (not premultiplied) over white -> RGB uint8; transparent = outside the scanned area."""
    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)  # a contiguous copy, ~15x faster than numpy's strided one
    a = rgba[..., 3]
    if a.min() < 255:  # blend only the see-through pixels: no full-size float copies
        see_through = a < 255
        af = a[see_through].astype(np.float32)[:, None] / 255.0  # (K, 1)
        rgb[see_through] = (rgb[see_through] * af + 255.0 * (1.0 - af) + 0.5).astype(np.uint8)
    return rgb


class Slide:
    """A whole-slide image with a resolved base mpp; subclasses implement `_read_level`."""

    info: SlideInfo

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) from `level`, (x, y) in that level's pixels; outside = white."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def name(self) -> str:
        return Path(self.info.path).name

    def best_level(self, downsample: float) -> int:
        """Index of the level with the largest downsample not above `downsample`."""
        ds = self.info.level_downsamples
        ok = [i for i, d in enumerate(ds) if d <= downsample * (1 + 1e-3)]
        return max(ok, key=lambda i: ds[i]) if ok else 0

    def read(self, x0: int, y0: int, size: int, mpp: float) -> np.ndarray:
        """RGB uint8 (size, size, 3) tile whose top-left is level-0 (x0, y0), at `mpp` µm/px."""
        return self.read_rect(x0, y0, size, size, mpp)

    def read_rect(self, x0: float, y0: float, w: int, h: int, mpp: float) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `mpp` µm/px from the best pyramid level, area-resized."""
        ds = mpp / self.info.mpp
        level = self.best_level(ds)
        lds = self.info.level_downsamples[level]
        lx, ly = int(round(x0 / lds)), int(round(y0 / lds))
        lw = max(1, int(round(w * ds / lds)))
        lh = max(1, int(round(h * ds / lds)))
        try:
            img = self._read_level(level, lx, ly, lw, lh)
        except SlideError:
            raise
        except Exception as e:  # decoder errors name the tile, not a traceback
            raise SlideError(self.name, f"cannot read tile at level-0 ({int(x0)}, {int(y0)}): {e}") from e
        if (lw, lh) != (w, h):
            interp = cv2.INTER_AREA if lw >= w else cv2.INTER_LINEAR
            img = cv2.resize(img, (w, h), interpolation=interp)
        return img

    def thumbnail(self, mpp: float, max_read_pixels: int = 4_000_000) -> np.ndarray:
        """The whole slide at `mpp` µm/px, read in blocks so no read exceeds `max_read_pixels`.

        Pixel (i, j) of the result covers level-0 [j*s, (j+1)*s) x [i*s, (i+1)*s), s = mpp / base mpp.
        To reduce blocks as they come (e.g. to saturation), iterate `thumbnail_blocks` instead.
        """
        out = np.empty((*self.thumbnail_shape(mpp), 3), np.uint8)
        for by, bx, img in self.thumbnail_blocks(mpp, max_read_pixels):
            out[by : by + img.shape[0], bx : bx + img.shape[1]] = img
        return out

    def thumbnail_shape(self, mpp: float) -> tuple[int, int]:
        """(h, w) of `thumbnail(mpp)`: the slide's level-0 size over mpp / base mpp, rounded up."""
        s = mpp / self.info.mpp
        return max(1, math.ceil(self.info.height / s)), max(1, math.ceil(self.info.width / s))

    def thumbnail_blocks(self, mpp: float, max_read_pixels: int = 4_000_000, align: int = 1):
        """Yield (y, x, RGB block) tiling `thumbnail(mpp)`, one pyramid read per block.

        Blocks are read from the best level (the largest downsample not above mpp / base mpp)
        and area-resized only when that level is not already at `mpp`; their sides are
        multiples of `align` (but the last row/column), so a caller may reduce them further by
        that factor without seams. The last row/col may run past the slide; that part is white.
        """
        s = mpp / self.info.mpp
        out_h, out_w = self.thumbnail_shape(mpp)
        level = self.best_level(s)
        lds = self.info.level_downsamples[level]
        r = s / lds  # level pixels per output pixel (>= 1 up to rounding)
        block = max(16, int(math.sqrt(max_read_pixels) / max(r, 1.0)))  # output px per block side
        block = max(align, block // align * align)
        for by in range(0, out_h, block):
            for bx in range(0, out_w, block):
                bh, bw = min(block, out_h - by), min(block, out_w - bx)
                lx0, ly0 = int(round(bx * r)), int(round(by * r))
                lx1, ly1 = int(round((bx + bw) * r)), int(round((by + bh) * r))
                try:
                    img = self._read_level(level, lx0, ly0, max(1, lx1 - lx0), max(1, ly1 - ly0))
                except Exception as e:
                    raise SlideError(self.name, f"cannot read level {level} near ({lx0}, {ly0}): {e}") from e
                if img.shape[:2] != (bh, bw):
                    interp = cv2.INTER_AREA if img.shape[1] >= bw else cv2.INTER_LINEAR
                    img = cv2.resize(img, (bw, bh), interpolation=interp)
                yield by, bx, img
