"""Encoder registry: checkpoints the tests save themselves load into models that reproduce
the reference modules exactly; transforms are exact and batchable. No network, no hub."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import torchvision.transforms.functional as VF
from safetensors.torch import save_file
from torch import nn

from pipeline.features.encoders import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    RandomInitWarning,
    architecture,
    build_encoder,
    weights_sha256,
)
from pipeline.features.foundation import FOUNDATION_MODELS

UNI_CARD = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
SMALL_UNI = {"depth": 2}  # test-only: ViT-L width, 2 blocks instead of 24


def _tiles(n: int = 2, size: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _quiet_build(name: str, weights: Path | None = None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        return build_encoder(name, weights, **kw)


# --------------------------------------------------------------------- DSMIL SimCLR ResNet-18


class ResNetSimCLR(nn.Module):
    """DSMIL's simclr/models/resnet_simclr.py for resnet18 (features + l1/l2 projection MLP)."""

    def __init__(self, out_dim: int = 256):
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None, norm_layer=nn.InstanceNorm2d)
        self.features = nn.Sequential(*list(resnet.children())[:-1])
        self.l1 = nn.Linear(512, 512)
        self.l2 = nn.Linear(512, out_dim)

    def forward(self, x):
        return self.features(x).flatten(1)  # (B, 512): the representation DSMIL keeps


def _dsmil_reference_load(sd: OrderedDict) -> nn.Module:
    """DSMIL compute_feats.py verbatim in spirit: pop 4 head tensors, zip onto the ResNet."""
    resnet = torchvision.models.resnet18(weights=None, norm_layer=nn.InstanceNorm2d)
    resnet.fc = nn.Identity()
    sd = OrderedDict(sd)
    for _ in range(4):
        sd.popitem()
    new = OrderedDict((k0, v) for (_, v), (k0, _) in zip(sd.items(), resnet.state_dict().items(), strict=False))
    resnet.load_state_dict(new, strict=False)
    return resnet.eval()


@pytest.fixture(scope="module")
def simclr() -> ResNetSimCLR:
    torch.manual_seed(1)
    return ResNetSimCLR().eval()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "dataparallel", "model+dataparallel"])
def test_dsmil_simclr_checkpoint_matches_reference(tmp_path, simclr, wrap):
    sd = simclr.state_dict()
    if "dataparallel" in wrap:
        sd = OrderedDict((f"module.{k}", v) for k, v in sd.items())
    obj = {"state_dict": sd, "epoch": 3} if wrap == "state_dict" else {"model": sd} if wrap.startswith("model") else sd
    path = tmp_path / "model.pth"
    torch.save(obj, path)

    model, spec = build_encoder("resnet18_simclr", path)
    transform, out_dim, precision = spec.transform, spec.out_dim, spec.precision
    x = torch.stack([transform(t) for t in _tiles(size=96)])  # (2, 3, 96, 96): any size, no resize
    with torch.inference_mode():
        got, want = model(x), simclr(x)
        dsmil = _dsmil_reference_load(simclr.state_dict())(x)
    assert got.shape == (2, 512) and out_dim == 512 and precision == torch.float16
    assert torch.equal(got, want)
    assert torch.equal(got, dsmil)  # same result as DSMIL's own positional loading
    assert model.pretrained is True and not model.training
    assert transform.__self__.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_plain_resnet_and_dsmil_embedder_state_dicts(tmp_path, simclr):
    x = torch.stack([VF.to_tensor(t) for t in _tiles(1, size=96)])
    with torch.inference_mode():
        want = simclr(x)
    plain = torchvision.models.resnet18(weights=None, norm_layer=nn.InstanceNorm2d)  # fc: 1000 classes
    plain.load_state_dict({**plain.state_dict(), **_dsmil_reference_load(simclr.state_dict()).state_dict()})
    embedder = {f"feature_extractor.{k}": v for k, v in plain.state_dict().items() if not k.startswith("fc.")}
    embedder |= {"fc.weight": torch.zeros(2, 512), "fc.bias": torch.zeros(2)}  # DSMIL IClassifier head
    for name, sd in (("plain.pth", plain.state_dict()), ("embedder.pth", embedder)):
        torch.save(sd, tmp_path / name)
        model, _ = build_encoder("resnet18_simclr", tmp_path / name)
        with torch.inference_mode():
            assert torch.equal(model(x), want), name


def test_dsmil_checkpoint_that_does_not_fit_lists_keys(tmp_path, simclr):
    bn = torchvision.models.resnet18(weights=None)  # BatchNorm: extra norm tensors
    torch.save(bn.state_dict(), tmp_path / "bn.pth")
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): bn1\.weight") as e:
        build_encoder("resnet18_simclr", tmp_path / "bn.pth")
    assert "missing" not in str(e.value) and len(str(e.value).splitlines()) <= 4

    sd = OrderedDict(simclr.state_dict())
    sd["features.0.weight"] = torch.zeros(64, 3, 3, 3)  # wrong kernel size
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape \(1\): conv1\.weight \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"):
        build_encoder("resnet18_simclr", tmp_path / "shape.pth")

    del sd["features.7.1.conv2.weight"]  # a truncated checkpoint: named, not silently shifted
    sd["features.0.weight"] = simclr.state_dict()["features.0.weight"]
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"missing \(1\): layer4\.1\.conv2\.weight"):
        build_encoder("resnet18_simclr", tmp_path / "short.pth")

    sd = OrderedDict(simclr.state_dict())
    sd.move_to_end("features.4.0.conv1.weight")  # same names and shapes, shuffled positions
    torch.save(sd, tmp_path / "order.pth")
    with pytest.raises(ValueError, match="not in the ResNet's order"):
        build_encoder("resnet18_simclr", tmp_path / "order.pth")


# --------------------------------------------------------------------- UNI


def test_uni_architecture_is_the_model_card_vit_large():
    with torch.device("meta"):
        ref = timm.create_model("vit_large_patch16_224", pretrained=False, **UNI_CARD)
    want = {k: v.shape for k, v in ref.state_dict().items()}
    got = {k: v.shape for k, v in architecture("uni").state_dict().items()}
    assert list(got.items()) == list(want.items())
    # Independent of timm: ViT-L/16 at 224 px, 24 blocks with LayerScale, no head.
    d, depth, tokens = 1024, 24, 1 + (224 // 16) ** 2
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + d + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d) + d
    assert len(got) == 4 + 14 * depth + 2
    assert sum(s.numel() for s in got.values()) == d + tokens * d + (3 * 16 * 16 * d + d) + depth * per_block + 2 * d
    assert got["pos_embed"] == (1, tokens, d) and got["blocks.23.ls2.gamma"] == (d,)
    assert not any(k.startswith("head") for k in got)


def test_uni_state_dict_loads_strictly_and_matches_reference(tmp_path):
    torch.manual_seed(2)
    ref = timm.create_model("vit_large_patch16_224", pretrained=False, **UNI_CARD, **SMALL_UNI).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)

    model, spec = build_encoder("uni", path, model_kwargs=SMALL_UNI)
    transform, out_dim, precision = spec.transform, spec.out_dim, spec.precision
    x = torch.stack([transform(t) for t in _tiles()])  # (2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))
    assert x.shape == (2, 3, 224, 224) and out_dim == 1024 and precision == torch.bfloat16
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.state_dict().values())

    # the same small weights do not fit the real 24-block UNI: a short listing, cheap (meta)
    with pytest.raises(ValueError, match=r"missing \(\d+\): blocks\.2\.norm1\.weight.*\(\+\d+ more\)"):
        build_encoder("uni", path)
    torch.save({**ref.state_dict(), "head.weight": torch.zeros(3, 1024)}, tmp_path / "head.bin")
    with pytest.raises(ValueError, match=r"unexpected \(1\): head\.weight"):
        build_encoder("uni", tmp_path / "head.bin", model_kwargs=SMALL_UNI)  # strict: no silent drop


# --------------------------------------------------------------------- timm:<name>


def test_timm_model_with_local_weights_drops_classifier(tmp_path):
    torch.manual_seed(3)
    ref = timm.create_model("test_convnext", pretrained=False, num_classes=7).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")  # includes head.fc.*
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    model, spec = build_encoder("timm:test_convnext", tmp_path / "w.pth")
    model2, _ = build_encoder("timm:test_convnext", tmp_path / "w.safetensors")
    ref.reset_classifier(0)
    x = spec.batch_transform(torch.from_numpy(_tiles(2)))  # 256 -> 160 bicubic
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x)) and torch.equal(model2(x), ref(x))
    assert spec.input_size == (160, 160) and spec.interpolation == "bicubic" and spec.out_dim == 64
    assert spec.mean == (0.5, 0.5, 0.5)  # from timm's pretrained_cfg, not ImageNet defaults
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("not_an_encoder")
    with pytest.raises(ValueError, match="timm cannot build"):
        build_encoder("timm:no_such_model_xyz")


# --------------------------------------------------------------------- random init, transforms


def test_random_init_warns_and_is_flagged_and_seeded():
    before = torch.random.get_rng_state()
    with pytest.warns(RandomInitWarning, match="RANDOM"):
        m1, spec = build_encoder("resnet18_simclr")
    with pytest.warns(RandomInitWarning):
        m2, _ = build_encoder("resnet18_simclr")
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert m1.pretrained is False and spec.pretrained is False and spec.weights_sha256 is None
    assert spec.attrs()["pretrained"] is False and spec.attrs()["random_init_seed"] == 0
    x = spec.batch_transform(torch.from_numpy(_tiles(1, size=96)))
    with torch.inference_mode():
        assert torch.equal(m1(x), m2(x))  # deterministic: resumes stay byte-identical


@pytest.mark.parametrize("name", ["resnet18_simclr", "uni", "timm:test_vit"])
def test_transform_shape_dtype_range_and_batch_equivalence(name):
    _, spec = _quiet_build(name, model_kwargs=SMALL_UNI if name == "uni" else None)
    tiles = _tiles(3)
    per_tile = [spec.transform(t) for t in tiles]
    batch = spec.batch_transform(torch.from_numpy(tiles))
    side = spec.input_size or (256, 256)
    assert batch.shape == (3, 3, *side) and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack(per_tile))
    if spec.mean is None:  # ToTensor only, exactly torchvision's arithmetic
        assert torch.equal(per_tile[0], VF.to_tensor(tiles[0]))
        assert 0.0 <= batch.min() and batch.max() <= 1.0
    else:  # Resize(antialias) + Normalize, as torchvision does it on tensors
        ref = VF.resize(VF.to_tensor(tiles[0]), list(side), antialias=True,
                        interpolation=VF.InterpolationMode(spec.interpolation))
        ref = VF.normalize(ref.clamp(0, 1), list(spec.mean), list(spec.std or ()))
        torch.testing.assert_close(per_tile[0], ref, rtol=0, atol=1e-5)
        lo = min((0 - m) / s for m, s in zip(spec.mean, spec.std or (), strict=True))
        hi = max((1 - m) / s for m, s in zip(spec.mean, spec.std or (), strict=True))
        assert lo - 1e-6 <= batch.min() and batch.max() <= hi + 1e-6
    assert pickle.loads(pickle.dumps(spec.transform))(tiles[0]).equal(per_tile[0])  # DataLoader workers
    with pytest.raises(ValueError, match="uint8"):
        spec.transform(tiles[0].astype(np.float32))


def test_uni_spec_is_imagenet_224():
    _, spec = _quiet_build("uni", model_kwargs=SMALL_UNI)
    assert (spec.input_size, spec.mean, spec.std) == ((224, 224), IMAGENET_MEAN, IMAGENET_STD)
    assert isinstance(spec, EncoderSpec) and "bilinear, antialias" in spec.attrs()["transform"]


@pytest.mark.parametrize("name", [*(n for n in ENCODERS if n not in FOUNDATION_MODELS), "timm:test_vit"])
def test_each_encoder_gives_out_dim_without_nan(name):  # foundation models: tests/test_foundation.py
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)  # UNI: 2 blocks, real width and head
        model, spec = build_encoder(name, model_kwargs=SMALL_UNI if name == "uni" else None)
    transform, out_dim, precision = spec.transform, spec.out_dim, spec.precision
    with torch.inference_mode():
        feats = model(transform(_tiles(1)[0])[None])  # (1, out_dim)
    assert feats.shape == (1, out_dim) and torch.isfinite(feats).all()
    assert out_dim == {"resnet18_simclr": 512, "uni": 1024}.get(name, 64)
    assert precision in (torch.float16, torch.bfloat16)


def test_weights_sha256_streams(tmp_path):
    p = tmp_path / "w.bin"
    data = np.random.default_rng(0).bytes(3 << 20 | 123)  # > 1 chunk, ragged tail
    p.write_bytes(data)
    assert weights_sha256(p) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        build_encoder("uni", tmp_path / "absent.bin")
