"""Slides as multi-magnification bags: features read once from the feature stores (RAM cache),
grouped for M2OTCA, padded into mini-batches with masks."""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.mil.bag_arrays import bag_arrays, mag_values, read_slide
from pipeline.mil.bag_reader import BagReader, reader_supported
from pipeline.store import read_attrs, store_status

log = logging.getLogger(__name__)


@dataclass
class Bag:
    slide_id: str
    label: int
    feats: dict[str, torch.Tensor]  # mag -> (N_t, D_t) float16
    group: dict[str, torch.Tensor]  # mag -> (N_t,) long
    coords: dict[str, np.ndarray]  # mag -> (N_t, 2) level-0 top-left x, y (for heatmaps)
    xy: dict[str, torch.Tensor]  # mag -> (N_t, 2) float32 level-0 tile centres (OT spatial cost)

    @classmethod
    def from_arrays(cls, slide_id: str, label: int, arrays: dict[str, dict[str, np.ndarray]]) -> Bag:
        """The bag of :func:`~pipeline.mil.bag_arrays.bag_arrays`' arrays (tensors share their memory)."""
        tensors = {k: {m: torch.from_numpy(a) for m, a in arrays[k].items()} for k in ("feats", "group", "xy")}
        return cls(slide_id, label, tensors["feats"], tensors["group"], arrays["coords"], tensors["xy"])


def make_bag(slide_id: str, label: int, feats: dict[str, np.ndarray], coords: dict[str, np.ndarray],
             regions: dict[str, np.ndarray], n_groups: int) -> Bag:
    """A bag from one slide's per-magnification features, coordinates and region ids: the groups
    (E1's sequential batches, defined by the finest magnification) and tile centres."""
    return Bag.from_arrays(slide_id, label, bag_arrays(slide_id, feats, coords, regions, n_groups))


def load_bag(slide_id: str, stores: dict[str, Path], label: int, n_groups: int) -> Bag:
    """One slide's features at every magnification; failed tiles are dropped (masked)."""
    return make_bag(slide_id, label, *read_slide(stores), n_groups)


class BagCache:
    """Bags of a cohort, loaded lazily and kept in RAM (features stay float16).

    Thread-safe: the trainer's prefetch thread loads bags (:meth:`stream`) while the main
    thread trains. A stream of at least `READ_AHEAD_MIN` bags not in RAM yet has them read by a
    child process (:mod:`pipeline.mil.bag_reader`), off this process's GIL, unless
    `read_in_child` is False; the bags are the same either way.
    """

    READ_AHEAD_MIN = 32  # fewer: not worth a child process (~0.3 s of CPU to start)
    READ_AHEAD = 16  # slides asked of the reader and not taken yet, at most (bounds its memory files)

    def __init__(self, stores: dict[str, dict[str, Path]], labels: dict[str, int], n_groups: int,
                 read_in_child: bool = True):
        self.stores, self.labels, self.n_groups = stores, labels, n_groups
        self.read_in_child = read_in_child
        self._bags: dict[str, Bag] = {}
        self._lock = threading.RLock()
        self._reader: BagReader | None = None
        self._asked: deque[str] = deque()  # slides asked of the reader and not received yet, in order
        self._asked_set: set[str] = set()
        self._failed: dict[str, BaseException] = {}  # the reader's errors, raised when their slide is needed
        self.read_by_reader = 0  # bags the reader process read (the others were read in this process)

    @classmethod
    def from_bags(cls, bags: list[Bag]) -> BagCache:
        """A cache over bags already in memory (synthetic benchmarks); `usable` keeps them all."""
        cache = cls({b.slide_id: {} for b in bags}, {b.slide_id: b.label for b in bags}, n_groups=0)
        cache._bags = {b.slide_id: b for b in bags}
        return cache

    def usable(self, slide_ids: list[str]) -> list[str]:
        """Slides whose feature stores are all finished and not failed (others are logged)."""
        ok = []
        for sid in slide_ids:
            bad = [str(p) for p in self.stores[sid].values() if store_status(p) != "ok"]
            if bad:
                log.warning("%s: left out, feature store failed or missing: %s", sid, bad[0])
            else:
                ok.append(sid)
        return ok

    def __getitem__(self, slide_id: str) -> Bag:
        bag = self._bags.get(slide_id)
        if bag is None:
            with self._lock:  # one loader at a time; a slide is read once
                if slide_id in self._asked_set:
                    self._receive_through(slide_id)
                if slide_id in self._failed:
                    raise self._failed.pop(slide_id)
                bag = self._bags.get(slide_id)
                if bag is None:
                    bag = load_bag(slide_id, self.stores[slide_id], self.labels[slide_id], self.n_groups)
                    self._bags[slide_id] = bag
        return bag

    def start_reader(self, slide_ids: list[str]) -> deque[str]:
        """Starts the reader process if `slide_ids` holds at least `READ_AHEAD_MIN` bags not in RAM
        nor asked for yet (it takes ~0.3 s to start: the trainer calls this before building its
        model); returns those slides."""
        todo = deque(s for s in dict.fromkeys(slide_ids) if s not in self._bags and s not in self._asked_set)
        if (self.read_in_child and len(todo) >= self.READ_AHEAD_MIN and self._reader is None
                and reader_supported()):
            self._reader = BagReader()
            weakref.finalize(self, self._reader.close)
        return todo

    def stream(self, slide_ids: list[str]) -> Iterator[Bag]:
        """The bags of `slide_ids`, in order, each kept in RAM; with enough of them not in RAM
        yet, a reader process reads those ahead, at most `READ_AHEAD` at a time (read here until
        it has started)."""
        todo = self.start_reader(slide_ids)
        for s in slide_ids:
            if todo and self._reader is not None and self._ready():
                with self._lock:
                    asked = []
                    while todo and len(self._asked) + len(asked) < self.READ_AHEAD:
                        t = todo.popleft()
                        if t not in self._bags and t not in self._asked_set:
                            asked.append(t)
                    if asked:
                        self._reader.request([(t, self.stores[t], self.n_groups, mag_values(self.stores[t]))
                                              for t in asked])
                        self._asked.extend(asked)
                        self._asked_set.update(asked)
            yield self[s]

    def _ready(self) -> bool:
        try:
            return self._reader.ready()
        except EOFError as e:
            self._reader_gone(e)
            return False

    def _reader_gone(self, why: object) -> None:
        code = self._reader.proc.wait()
        log.warning("the bag reader process ended (%s, exit code %s); reading the remaining bags here", why, code)
        self._reader.close()
        self._reader = None
        self._asked.clear()
        self._asked_set.clear()

    def _receive_through(self, slide_id: str) -> None:
        """Take the reader's answers up to `slide_id`'s (under the lock)."""
        while slide_id in self._asked_set:
            try:
                sid, got = self._reader.receive()
            except EOFError as e:
                self._reader_gone(f"{slide_id} not received: {e}" if str(e) else f"{slide_id} not received")
                return
            self._asked.popleft()
            self._asked_set.discard(sid)
            if isinstance(got, BaseException):
                self._failed[sid] = got
            else:
                self._bags[sid] = Bag.from_arrays(sid, self.labels[sid], got)
                self.read_by_reader += 1

    def __contains__(self, slide_id: str) -> bool:
        """Whether the slide is already in RAM."""
        return slide_id in self._bags

    def dims(self, slide_id: str) -> dict[str, int]:
        return {m: int(f.shape[1]) for m, f in self[slide_id].feats.items()}


def collate(bags: list[Bag], mags: list[str]) -> tuple[dict, torch.Tensor]:
    """Pad bags to the longest per magnification: feats (B, N, D) float16, mask (B, N), group (B, N),
    xy (B, N, 2) float32 tile centres.

    Built in numpy: collate runs in the trainer's prefetch thread, where torch ops would start
    a second OpenMP team competing with the training step's (see :mod:`pipeline.mil.bag_arrays`).
    """
    feats, mask, group, xy = {}, {}, {}, {}
    for m in mags:
        n = max(1, max(len(b.feats[m]) for b in bags))
        d = bags[0].feats[m].shape[1]
        f = np.zeros((len(bags), n, d), dtype=np.float16)  # (B, N, D), as stored (models cast)
        k = np.zeros((len(bags), n), dtype=bool)  # (B, N)
        g = np.full((len(bags), n), -1, dtype=np.int64)  # (B, N)
        c = np.zeros((len(bags), n, 2), dtype=np.float32)  # (B, N, 2)
        for i, b in enumerate(bags):
            L = len(b.feats[m])
            f[i, :L] = b.feats[m].numpy()
            k[i, :L] = True
            g[i, :L] = b.group[m].numpy()
            c[i, :L] = b.xy[m].numpy()
        feats[m], mask[m], group[m] = torch.from_numpy(f), torch.from_numpy(k), torch.from_numpy(g)
        xy[m] = torch.from_numpy(c)
    labels = torch.tensor([b.label for b in bags], dtype=torch.long)
    return {"feats": feats, "mask": mask, "group": group, "xy": xy}, labels


def feature_fingerprints(stores: dict[str, Path]) -> dict[str, str]:
    """The tile fingerprints recorded by a slide's feature stores (for checkpoints)."""
    return {m: read_attrs(p).get("tiles_sha256", "") for m, p in stores.items()}


def cohort_cache(sheet: str | Path, feature_dirs: dict[str, Path], n_groups: int) -> tuple[BagCache, list[str]]:
    """A BagCache over every slide of the sheet, and the class names (sorted labels)."""
    from pipeline.slides.sheet import read_sheet

    rows = read_sheet(sheet, check_files=False)
    classes = sorted({r.label for r in rows})
    stores = {r.slide_id: {m: Path(d) / f"{r.slide_id}.zarr" for m, d in feature_dirs.items()} for r in rows}
    labels = {r.slide_id: classes.index(r.label) for r in rows}
    return BagCache(stores, labels, n_groups), classes
