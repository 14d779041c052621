"""SimCLR's data: tiles sampled from tile stores, read from the slides, with two views' parameters.

Sampling takes at most `tiles_per_slide` tiles of each slide (every usable slide represented,
chosen by a seeded generator); DataLoader workers open their own slide handles and read the
tiles straight from the slide files. Each view's random choices come from a generator seeded
by (seed, epoch, item), so the views do not depend on the number of workers or on a resume;
the views themselves are made by `simclr_views.make_views`, on the GPU, or for a CPU run in
the workers (`collate_views`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import ConfigError
from pipeline.features.simclr_views import draw_view_params, make_views
from pipeline.slides import open_slide
from pipeline.store import read_tile_store, store_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideTiles:
    """The sampled tiles of one slide at one magnification."""

    store: str  # tile store path (named in errors)
    slide_path: str  # slide file the workers read
    base_mpp: float  # level-0 µm/px of the slide
    tile_mpp: float  # µm/px of this magnification
    size: int  # tile side in px at tile_mpp
    coords: np.ndarray  # (n, 2) int64 level-0 top-left x, y


def sample_tiles(stores: list[str | Path], mags: list[str], tiles_per_slide: int,
                 seed: int = 0) -> list[SlideTiles]:
    """At most `tiles_per_slide` tiles per slide and magnification, in store order.

    A store that failed tiling is skipped with a warning; a store without `mag`, or no tiles
    left at all, raises ConfigError naming the file.
    """
    if tiles_per_slide < 1:
        raise ConfigError(f"tiles_per_slide must be >= 1, got {tiles_per_slide}")
    out: list[SlideTiles] = []
    for i, store in enumerate(stores):
        status, attrs = store_state(store)
        if status == "failed":
            log.warning("%s: tiling failed earlier (%s); left out of pretraining", store, attrs.get("error"))
            continue
        if status != "ok":
            raise ConfigError(f"tile store {store}: not a finished tile store (status {status})")
        ts = read_tile_store(store)
        for j, mag in enumerate(mags):
            if mag not in ts.tiles:
                raise ConfigError(f"tile store {store}: no magnification {mag} (it has {', '.join(ts.tiles)})")
            coords = ts.tiles[mag].coords
            if len(coords) == 0:
                log.warning("tile store %s: no tiles at %s; left out of pretraining", store, mag)
                continue
            rng = np.random.default_rng([seed, i, j])
            keep = np.sort(rng.choice(len(coords), min(tiles_per_slide, len(coords)), replace=False))
            tiling = ts.meta.tiling
            out.append(SlideTiles(store=str(store), slide_path=ts.meta.slide_path,
                                  base_mpp=float(ts.meta.base_mpp),
                                  tile_mpp=float(tiling["magnifications"][mag]),
                                  size=int(tiling["tile_size"]), coords=coords[keep]))
    if not out:
        names = ", ".join(str(s) for s in stores[:3]) + (" ..." if len(stores) > 3 else "")
        raise ConfigError(f"tile store(s) {names}: no tiles at {', '.join(mags)} to pretrain on")
    return out


class SimCLRTiles(Dataset):
    """Item i -> (uint8 (3, S, S) tile, (2, N_PARAMS) its two views' parameters); each worker
    opens its own slide handles. `set_epoch` changes the views (not the tiles)."""

    def __init__(self, slides: list[SlideTiles], seed: int = 0):
        sizes = {s.size for s in slides}
        if len(sizes) > 1:
            raise ConfigError("tile stores with different tile sizes ("
                              + ", ".join(f"{s.size} px in {s.store}" for s in {s.size: s for s in slides}.values())
                              + "): pretrain them separately")
        self.slides, self.size = slides, sizes.pop()
        self.index = np.concatenate([np.stack([np.full(len(s.coords), k), np.arange(len(s.coords))], 1)
                                     for k, s in enumerate(slides)])  # (N, 2) slide, row
        self.seed, self.epoch = seed, 0
        self._handles: dict[int, object] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _slide(self, k: int):
        if self._pid != os.getpid():  # forked worker: its own handles
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            s = self.slides[k]
            self._handles[k] = open_slide(s.slide_path, mpp=s.base_mpp)
        return self._handles[k]

    def read(self, i: int) -> np.ndarray:
        """uint8 (S, S, 3) tile i, as extraction reads it."""
        k, row = (int(v) for v in self.index[i])
        s = self.slides[k]
        x, y = (int(v) for v in s.coords[row])
        return self._slide(k).read(x, y, s.size, s.tile_mpp)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tile = torch.from_numpy(np.ascontiguousarray(self.read(i))).permute(2, 0, 1)  # (3, S, S) uint8
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, int(i)])
                                                .generate_state(1)[0]))
        params = torch.stack([draw_view_params(self.size, gen) for _ in range(2)])  # (2, N_PARAMS)
        return tile, params


def collate_views(items: list[tuple[torch.Tensor, torch.Tensor]], crop: int) -> torch.Tensor:
    """A batch's views made where the batch is collated: a DataLoader worker when the model is
    on the CPU (the augmentation then runs beside the step, not in it)."""
    tiles, params = torch.utils.data.default_collate(items)  # (B, 3, S, S) uint8, (B, 2, P)
    return make_views(tiles, params, crop)  # (2B, 3, crop, crop)
