"""bench/tiling.py's interface (tiny mosaic: what is printed and compared, not the figures)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from conftest import shared_slide

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    shared_slide("CMU-1-Small-Region.svs")  # the mosaic's source
    make_slide = _load("make_slide")
    out = tmp_path_factory.mktemp("bench") / "mosaic.tiff"
    make_slide.make_mosaic_slide(out, 4096, 3072)
    return out


def test_tiling_last_line(mosaic, capsys):
    _load("tiling").main(["--slide", str(mosaic), "--repeat", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"seconds=([\d.]+) peak_rss_mib=(\d+) tiles_20x=(\d+) tiles_10x=(\d+) tiles_5x=(\d+)", last)
    assert m, last
    n20, n10, n5 = map(int, m.groups()[2:])
    assert float(m.group(1)) > 0 and n20 > n10 > n5 > 0  # at 0.25 µm/px a 4096 px slide holds 20x/10x/5x tiles


@pytest.mark.slow
def test_tiling_vs_hs2p(mosaic, capsys):
    """Both tilers on one slide and on CMU-1-Small-Region; the ratios line compares them (needs .[bench])."""
    pytest.importorskip("hs2p")
    _load("tiling").main(["--slide", str(mosaic), "--repeat", "1", "--vs", "hs2p"])
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.strip().startswith("hs2p ") for line in out), out
    m = re.fullmatch(r"seconds_ratio=([\d.]+) peak_rss_ratio=([\d.]+) cmu_ratio_20x=([\d.]+) "
                     r"cmu_ratio_10x=([\d.]+) cmu_ratio_5x=([\d.]+)", out[-1])
    assert m, out[-1]
    assert all(0.9 <= float(r) <= 1.1 for r in m.groups()[2:]), out[-1]  # CMU tile counts within 10 %
