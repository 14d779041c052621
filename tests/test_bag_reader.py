"""The bag reader process (pipeline.mil.bag_reader): the same bags as read in this process, its
errors, its death, an abandoned stream, its read-ahead bound, the package it runs, no torch."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.mil.bags import cohort_cache
from pipeline.synthetic.bags import MAGS, SynthConfig, make_cohort

N_GROUPS = 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 slides (2 with failed feature stores), 2 classes."""
    cfg = SynthConfig(n_slides=24, seed=3, dim=16, regions=(12, 24), lesion_regions=(2, 3))
    return make_cohort(tmp_path_factory.mktemp("cohort"), cfg, failed_slides=2)


@pytest.fixture(scope="module")
def loaded(cohort):
    cache, classes = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
    cache.read_in_child = False
    ids = cache.usable(cohort.slides)
    return cache, classes, ids


def _same_bag(a, b) -> bool:
    return a.slide_id == b.slide_id and a.label == b.label and all(
        torch.equal(getattr(a, k)[t], getattr(b, k)[t]) for k in ("feats", "group", "xy") for t in MAGS
    ) and all(np.array_equal(a.coords[t], b.coords[t]) for t in MAGS)


def _reader_ready(cache, timeout: float = 30.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not cache._reader.ready():
        assert time.monotonic() < end, "the bag reader process did not start"
        time.sleep(0.05)


def test_stream_reads_in_a_reader_process_the_same_bags(cohort, loaded, monkeypatch):
    ref, _, ids = loaded
    expected = {s: ref[s] for s in ids}
    monkeypatch.setattr("pipeline.mil.bags.BagCache.READ_AHEAD_MIN", 2)
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
    order = ids[5:] + ids[:5] + ids[:2]  # any order, repeats allowed
    it = cache.stream(order)
    got = [next(it)]  # read here: the reader is starting
    _reader_ready(cache)
    got += list(it)
    assert [b.slide_id for b in got] == order and all(_same_bag(g, expected[g.slide_id]) for g in got)
    assert cache.read_by_reader == len(ids) - 1 and got[-2] is cache[ids[0]]  # a repeat: the cached bag
    inline, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
    inline.read_in_child = False
    assert all(_same_bag(g, expected[g.slide_id]) for g in inline.stream(order))
    assert inline._reader is None and inline.read_by_reader == 0


def test_stream_reader_errors_death_and_abandon(cohort, loaded, monkeypatch, caplog, tmp_path):
    import gc
    import shutil

    from pipeline.errors import SlideError

    ref, _, ids = loaded
    expected = {s: ref[s] for s in ids}
    monkeypatch.setattr("pipeline.mil.bags.BagCache.READ_AHEAD_MIN", 2)
    # a damaged store: the reader's SlideError reaches the consumer with its type and one line
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache.stores[ids[3]]["20x"], bad)
    for chunk in (bad / "20x" / "features" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    cache.stores[ids[3]] = {t: bad for t in MAGS}
    it = cache.stream(ids)
    next(it)
    _reader_ready(cache)
    assert [next(it).slide_id for _ in range(2)] == ids[1:3] and cache.read_by_reader == 2
    with pytest.raises(SlideError, match=rf"^{ids[3]}: feature store .*bad\.zarr is damaged \(.*checksum mismatch"):
        next(it)
    # a reader that dies (killed, out of memory): logged, the rest read here, the same bags
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
    it = cache.stream(ids)
    got = [next(it)]
    _reader_ready(cache)
    got.append(next(it))
    cache._reader.proc.kill()
    with caplog.at_level(logging.WARNING, logger="pipeline.mil.bags"):
        got += list(it)
    assert [g.slide_id for g in got] == ids and all(_same_bag(g, expected[g.slide_id]) for g in got)
    assert "the bag reader process ended" in caplog.text and "reading the remaining bags here" in caplog.text
    # an abandoned stream: the slides asked of the reader (here all: a window wider than the cohort)
    # still arrive, in any order asked for
    monkeypatch.setattr("pipeline.mil.bags.BagCache.READ_AHEAD", len(ids))
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
    it = cache.stream(ids)
    next(it)
    _reader_ready(cache)
    next(it)
    it.close()
    assert _same_bag(cache[ids[-1]], expected[ids[-1]]) and cache.read_by_reader == len(ids) - 1
    proc = cache._reader.proc
    del cache, it
    gc.collect()
    assert proc.wait(10) is not None  # the cache gone: its reader process ends


def test_read_ahead_is_bounded_and_the_package_is_this_one(cohort, loaded, monkeypatch, tmp_path):
    """At most READ_AHEAD slides wait in memory files; the child runs this package even from a
    folder holding another `pipeline` (which `python -m` would have put first)."""
    ref, _, ids = loaded
    decoy = tmp_path / "pipeline"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy pipeline package was imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("pipeline.mil.bags.BagCache.READ_AHEAD_MIN", 2)
    monkeypatch.setattr("pipeline.mil.bags.BagCache.READ_AHEAD", 3)
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
    it = cache.stream(ids)
    got = [next(it)]
    _reader_ready(cache)
    waiting = []
    for b in it:
        got.append(b)
        waiting.append(len(cache._asked))
    assert [b.slide_id for b in got] == ids and all(_same_bag(b, ref[b.slide_id]) for b in got)
    assert cache.read_by_reader == len(ids) - 1 and max(waiting) <= 3 and max(waiting) >= 2


def test_no_reader_where_the_platform_lacks_one(cohort, loaded, monkeypatch):
    ref, _, ids = loaded
    monkeypatch.setattr("pipeline.mil.bags.BagCache.READ_AHEAD_MIN", 2)
    monkeypatch.setattr("pipeline.mil.bags.reader_supported", lambda: False)
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
    assert all(_same_bag(b, ref[b.slide_id]) for b in cache.stream(ids))
    assert cache._reader is None and cache.read_by_reader == 0


def test_the_reader_never_imports_torch():
    """The child builds whole bags without torch, so it starts in a fraction of a second."""
    code = "import sys; import pipeline.mil.bag_reader; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_training_with_the_reader_is_training_without_it(cohort, loaded, monkeypatch, tmp_path):
    """Fresh caches, one read by the reader process and one in this process: the same checkpoint
    and history, bit for bit."""
    from pipeline.mil.train import TrainConfig, train_fold

    _, classes, ids = loaded
    monkeypatch.setattr("pipeline.mil.bags.BagCache.READ_AHEAD_MIN", 2)
    cfg = TrainConfig(epochs=2, patience=10, min_epochs=1, lr=2e-3, batch_size=3, seed=7,
                      model={"d": 16, "attn_dim": 8, "n_groups": N_GROUPS, "dropout": 0.25})
    runs = {}
    for name, child in (("reader", True), ("inline", False)):
        cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, N_GROUPS)
        cache.read_in_child = child
        if child:  # started and ready before training, else a tiny cohort is read before it starts
            cache.start_reader(ids)
            _reader_ready(cache)
        train_fold("m2otca", cache, ids[:-6], ids[-6:], classes, list(MAGS), cfg, tmp_path / name, {"fold": "f"})
        runs[name] = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=False),
                      (tmp_path / name / "history.tsv").read_bytes(), cache.read_by_reader)
    (a, hist_a, n_a), (b, hist_b, n_b) = runs["reader"], runs["inline"]
    assert n_a > 0 and n_b == 0  # the reader read bags in one run only
    assert hist_a == hist_b and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_errors_cross_with_their_type_and_message():
    """A SlideError by its parts, a picklable exception as itself, any other as a RuntimeError
    naming it (an exception class local to the child cannot be unpickled by the parent)."""
    import socket

    from pipeline.errors import SlideError
    from pipeline.mil.bag_reader import _rebuild, _send_error

    class Local(Exception):
        pass

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        got = []
        for e in (SlideError("s1", "feature store x is damaged"), ValueError("bad value"), Local("odd")):
            _send_error(a, "s1", e)
            sid, error, size = pickle.loads(b.recv(1 << 16))
            got.append((sid, _rebuild(error), size))
    (s1, e1, n1), (_, e2, _), (_, e3, _) = got
    assert s1 == "s1" and n1 == 0 and type(e1) is SlideError and str(e1) == "s1: feature store x is damaged"
    assert e1.slide == "s1" and type(e2) is ValueError and str(e2) == "bad value"
    assert type(e3) is RuntimeError and str(e3) == "s1: Local: odd"
