"""SimCLR pretraining: DSMIL layout through the registry, determinism, kill -9 resume, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tissue_image, venv_env, write_tiff

from pipeline.config import TilingConfig
from pipeline.errors import ConfigError
from pipeline.features.encoders import build_encoder
from pipeline.features.pretrain import (
    KILL_ENV,
    PretrainConfig,
    SimCLR,
    checkpoint_path,
    dsmil_state_dict,
    nt_xent,
    pretrain,
)
from pipeline.features.simclr_data import SimCLRTiles, sample_tiles
from pipeline.features.simclr_views import N_PARAMS
from pipeline.tiling.stage import tile_to_store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = dict(epochs=2, batch_size=4, crop=64, tiles_per_slide=2, num_workers=0, device="cpu")  # 1 step/epoch


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    out = []
    for i in range(2):
        slide = write_tiff(d / f"s{i}.tif", tissue_image(1200, 1200, seed=10 + i, blobs=3), mpp=0.5, levels=3)
        tile_to_store(slide, d / f"s{i}.zarr", TilingConfig(tile_size=64))
        out.append(d / f"s{i}.zarr")
    return out


def test_sampling_caps_each_slide_and_views_are_seeded(stores, tmp_path):
    slides = sample_tiles(stores, ["20x", "10x"], tiles_per_slide=3, seed=1)
    assert len(slides) == 4 and all(len(s.coords) == 3 for s in slides)  # every slide, capped
    ds = SimCLRTiles(slides, seed=1)
    (tile, a), (tile2, b) = ds[5], ds[5]
    assert tile.shape == (3, 64, 64) and tile.dtype == torch.uint8 and a.shape == (2, N_PARAMS)
    assert torch.equal(tile, tile2) and torch.equal(a, b) and not torch.equal(a[0], a[1])  # seeded; views differ
    ds.set_epoch(1)
    assert torch.equal(ds[5][0], tile) and not torch.equal(ds[5][1], a)  # same tile, new views
    slide = write_tiff(tmp_path / "big.tif", tissue_image(1200, 1200, seed=3, blobs=3), mpp=0.5, levels=3)
    tile_to_store(slide, tmp_path / "big.zarr", TilingConfig(tile_size=128))
    with pytest.raises(ConfigError, match=r"different tile sizes \(64 px in .*s0.zarr, 128 px in .*big.zarr\)"):
        SimCLRTiles(sample_tiles([stores[0], tmp_path / "big.zarr"], ["20x"], 2))


def test_nt_xent_prefers_matching_pairs():
    z = torch.randn(8, 16)
    assert nt_xent(z, z + 0.01 * torch.randn(8, 16), 0.5) < nt_xent(z, torch.randn(8, 16), 0.5)


def test_weights_load_through_registry_in_dsmil_layout(stores, tmp_path):
    out = tmp_path / "w.pth"
    s = pretrain(stores, ["20x"], out, PretrainConfig(**{**TINY, "epochs": 1}))
    sd = torch.load(out, weights_only=True)
    assert all(k.startswith("features.") for k in sd) and not any(k.startswith(("l1.", "l2.")) for k in sd)
    model, spec = build_encoder("resnet18_simclr", out)  # the existing DSMIL path, strict
    assert spec.pretrained and spec.weights_sha256 == s["sha256"] and s["tiles"] == 4
    trained = SimCLR()
    trained.encoder.load_state_dict(model.state_dict())
    assert dsmil_state_dict(trained.encoder).keys() == sd.keys()


def _cli(args, env_extra=None):
    env = venv_env(PYTHONPATH=os.pathsep.join(sys.path), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _cli_args(stores, out):
    return ["pretrain", *map(str, stores), "--mag", "20x", "--out", str(out), "--epochs", "2", "--batch-size", "4",
            "--crop", "64", "--tiles-per-slide", "2", "--workers", "0", "--device", "cpu"]


def test_kill9_resume_is_byte_identical_and_never_leaves_partial_weights(stores, tmp_path):
    ref = tmp_path / "ref.pth"
    pretrain(stores, ["20x"], ref, PretrainConfig(**TINY))
    out = tmp_path / "killed.pth"
    r = _cli(_cli_args(stores, out), {KILL_ENV: "epoch:0"})  # SIGKILL right after epoch 1's checkpoint
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and checkpoint_path(out).exists()  # no weights at the final path yet
    # another process, same seed; its views made in 2 DataLoader workers instead of the main process
    s = pretrain(stores, ["20x"], out, PretrainConfig(**{**TINY, "num_workers": 2}))
    assert s["resumed_at_epoch"] == 1
    assert out.read_bytes() == ref.read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_input_one_line_naming_file(stores, tmp_path):
    with pytest.raises(ConfigError, match=r"s0\.zarr: no magnification 40x"):
        pretrain(stores[:1], ["40x"], tmp_path / "w.pth", PretrainConfig(**TINY))
    with pytest.raises(ConfigError, match=r"s0\.zarr.*4 tiles at 20x, fewer than one batch of 16"):
        pretrain(stores, ["20x"], tmp_path / "w.pth", PretrainConfig(**{**TINY, "batch_size": 16}))
    r = _cli(_cli_args(stores[:1], tmp_path / "w.pth")[:-2] + ["--device", "cpu", "--batch-size", "64"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "s0.zarr" in r.stderr
    assert not (tmp_path / "w.pth").exists()


def test_extract_rejects_truncated_or_foreign_weights(stores, tmp_path):
    from pipeline.features.encoders import ENCODERS
    from pipeline.features.extract import ExtractConfig, extract_features

    good = tmp_path / "w.pth"
    pretrain(stores, ["20x"], good, PretrainConfig(**{**TINY, "epochs": 1}))
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[:5000])
    with torch.device("meta"):
        other = ENCODERS["uni"].factory({"depth": 1, "embed_dim": 64, "num_heads": 2})
    foreign = tmp_path / "vit.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in other.state_dict().items()}, foreign)
    for w, cause in ((bad, "truncated or corrupt"), (foreign, "weights do not fit")):
        with pytest.raises(ValueError, match=cause) as e:
            extract_features(stores[0], tmp_path / "f.zarr", "resnet18_simclr", {"20x": str(w), "10x": str(good)},
                             mags=["20x", "10x"], cfg=ExtractConfig(num_workers=0))
        assert str(w) in str(e.value)


def test_per_magnification_weights_recorded_in_the_store(stores, tmp_path):
    from pipeline.features.extract import ExtractConfig, extract_features
    from pipeline.store import read_feature_store

    w = tmp_path / "w.pth"
    s = pretrain(stores, ["20x"], w, PretrainConfig(**{**TINY, "epochs": 1}))
    cfg = ExtractConfig(batch_size=16, num_workers=0)
    extract_features(stores[0], tmp_path / "f.zarr", "resnet18_simclr", {"10x": str(w), "5x": None},
                     mags=["10x", "5x"], cfg=cfg)
    extract_features(stores[0], tmp_path / "g.zarr", "resnet18_simclr", None, mags=["10x", "5x"], cfg=cfg)
    meta, feats = read_feature_store(tmp_path / "f.zarr")
    assert meta.get("weights_sha256") == {"10x": s["sha256"], "5x": None}
    assert meta.get("pretrained") == {"10x": True, "5x": False}
    _, rand = read_feature_store(tmp_path / "g.zarr")
    assert not np.array_equal(feats["10x"].features, rand["10x"].features)  # 10x: the pretrained model
    np.testing.assert_array_equal(feats["5x"].features, rand["5x"].features)  # 5x: random init


def test_rule_pretrain_encoder_feeds_extraction_per_magnification(tmp_path):
    from conftest import shared_slide, snakemake_cmd, write_cohort

    (tmp_path / "dsmil_5x.pth").write_bytes(b"x")  # hashed when the DAG is built, never loaded (-n)
    write_cohort(tmp_path, [("cmu", shared_slide("CMU-1-Small-Region.svs"), "tumor")],
                 f"features:\n  weights: {{resnet18_simclr: null, '5x': {tmp_path / 'dsmil_5x.pth'}}}\n"
                 "  pretrain: {enabled: true, per_magnification: true}\n")
    r = subprocess.run(snakemake_cmd(tmp_path, "-n", "-p", "--nolock", "features"), capture_output=True, text=True,
                       env=venv_env(PYTHONPATH=os.pathsep.join(sys.path)), timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "--mag 20x --out results/tiny/pretrain/20x.pth" in out and "pretrain/5x.pth" not in out
    assert ("--weights 20x=results/tiny/pretrain/20x.pth --weights 10x=results/tiny/pretrain/10x.pth "
            f"--weights 5x={tmp_path / 'dsmil_5x.pth'}") in out
