"""Foundation models by name: each builds the model card's timm architecture, loads a state dict
in the upstream key layout strictly, transforms tiles as the card does and gives the published
width; wrong or truncated weights fail in one line naming the file. Depth-1 twins (the card's
arguments with depth=1) keep CI fast; the full models are checked on the meta device."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.functional as VF
import yaml
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn

from pipeline.errors import ConfigError
from pipeline.features.encoders import (
    ENCODERS,
    EncoderSpec,
    RandomInitWarning,
    architecture,
    build_encoder,
)
from pipeline.features.foundation import FOUNDATION_MODELS

REPO = Path(__file__).parents[1]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
TWIN = {"depth": 1}

# Written out again from the model cards / config.json files (not imported), so a typo in
# pipeline/features/foundation.py cannot hide: arch, timm kwargs, (mean, std), resize -> crop, interpolation,
# precision, published width.
CARDS = {
    "uni2_h": ("vit_giant_patch14_224",
               dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                    mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
                    dynamic_img_size=True, **SWIGLU),
               IMAGENET, (224, 224), "bilinear", torch.bfloat16, 1536),
    "virchow2": ("vit_huge_patch14_224",
                 dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                      global_pool="", dynamic_img_size=True, **SWIGLU),
                 IMAGENET, (224, 224), "bicubic", torch.float16, 2560),
    # card: init_values, dynamic_img_size; config.json: input_size 224 (timm's DINOv2 default is 518)
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=False),
                    HOPTIMUS, (224, 224), "bilinear", torch.float16, 1536),
    "h_optimus_1": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=False),
                    HOPTIMUS, (224, 224), "bilinear", torch.float16, 1536),
    "prov_gigapath": ("vit_giant_patch14_dinov2",
                      dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                           init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
                      IMAGENET, (256, 224), "bicubic", torch.float16, 1536),
}
# (parameters in millions, as published, rounded), and upstream tensors that pin the token layout
PUBLISHED = {
    "uni": (303, {"pos_embed": (1, 197, 1024)}),
    "uni2_h": (681, {"pos_embed": (1, 256, 1536), "reg_token": (1, 8, 1536)}),  # no_embed_class
    "virchow2": (631, {"pos_embed": (1, 261, 1280), "reg_token": (1, 4, 1280)}),
    "h_optimus_0": (1135, {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536)}),
    "h_optimus_1": (1135, {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536)}),
    "prov_gigapath": (1135, {"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16)}),
}


def _tiles(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _card_model(name: str, **over) -> nn.Module:
    """The card's timm model with random weights (seeded by the caller; a fast normal fill
    instead of timm's truncated-normal init, which is 10x slower and beside the point here)."""
    arch, kw, *_ = CARDS[name]
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kw, **over})
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def _card_transform(name: str, tile: np.ndarray) -> torch.Tensor:
    """The card's torchvision pipeline on a tensor: Resize (+ CenterCrop), ToTensor, Normalize."""
    _, _, (mean, std), (resize, crop), interp, *_ = CARDS[name]
    x = VF.resize(VF.to_tensor(tile), [resize, resize], antialias=True,
                  interpolation=VF.InterpolationMode(interp)).clamp(0, 1)
    return VF.normalize(VF.center_crop(x, [crop, crop]), list(mean), list(std))


def _card_features(name: str, ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = ref(x)
    if name == "virchow2":  # card: cat([class token, mean of tokens 5: (after 4 registers)])
        return torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
    return out


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_architecture_has_published_width_and_layout_on_meta(name):
    model = architecture(name)  # meta: no memory, no init
    with torch.device("meta"):
        out = model(torch.empty(2, 3, 224, 224))
    fm = FOUNDATION_MODELS.get(name)
    assert out.shape == (2, fm.out_dim if fm else 1024)
    assert out.shape[1] == {"uni": 1024, "virchow2": 2560}.get(name, 1536)  # as published
    millions, shapes = PUBLISHED[name]
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions
    sd = model.state_dict()
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("head.") for k in sd)


@pytest.mark.parametrize("name", list(CARDS))
def test_twin_loads_upstream_layout_strictly_and_matches_the_card(tmp_path, name):
    torch.manual_seed(5)
    ref = _card_model(name, **TWIN)
    path = tmp_path / ("model.safetensors" if name == "h_optimus_1" else "pytorch_model.bin")
    sd = ref.state_dict()  # the upstream layout: the checkpoints are these timm modules' state dicts
    save_file(sd, path) if path.suffix == ".safetensors" else torch.save(sd, path)

    model, spec = build_encoder(name, path, model_kwargs=TWIN)
    *_, precision, width = CARDS[name]
    tiles = _tiles(1, 256)
    x = spec.batch_transform(torch.from_numpy(tiles))  # (1, 3, 224, 224)
    want_x = torch.stack([_card_transform(name, t) for t in tiles])
    torch.testing.assert_close(x, want_x, rtol=0, atol=1e-5)
    with torch.inference_mode():
        feats, want = model(x), _card_features(name, ref, x)
    assert feats.shape == (1, width) == (1, spec.out_dim) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, want, rtol=0, atol=0)
    assert spec.precision == precision and spec.attrs()["precision"] == str(precision).removeprefix("torch.")
    assert spec.pretrained and spec.attrs()["encoder"] == name and len(spec.weights_sha256 or "") == 64


@pytest.mark.parametrize("name", list(CARDS))
@pytest.mark.parametrize("size", [224, 256, 300])
def test_transform_is_the_cards_for_any_tile_size(name, size):
    spec = EncoderSpec(name=name, **ENCODERS[name].spec(architecture(name, TWIN)))
    tile = _tiles(1, size)[0]
    got = spec.transform(tile)
    assert got.shape == (3, 224, 224) and got.is_contiguous()
    torch.testing.assert_close(got, _card_transform(name, tile), rtol=0, atol=1e-5)
    assert (spec.mean, spec.std) == CARDS[name][2]


def test_weights_of_another_model_fail_in_one_line_naming_the_file(tmp_path):
    # UNI's layout (ViT-L/16, no registers), shrunk: 2 blocks where the twin has 1
    uni = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5,
                            embed_dim=64, num_heads=4, depth=2)
    path = tmp_path / "uni.bin"
    torch.save(uni.state_dict(), path)
    with pytest.raises(ConfigError) as e:
        build_encoder("h_optimus_0", path, model_kwargs=TWIN)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"weights do not fit encoder 'h_optimus_0' ({path}); ")
    assert re.search(r"missing \(1\): reg_token; unexpected \(\d+\): blocks\.1\.norm1\.weight", msg)
    assert "shape (" in msg and "patch_embed.proj.weight (64, 3, 16, 16) vs model (1536, 3, 14, 14)" in msg

    torch.manual_seed(0)  # same width and keys, other model: shapes differ, listed on the line
    torch.save(_card_model("prov_gigapath", depth=1).state_dict(), path)
    with pytest.raises(ConfigError, match=r"^weights do not fit encoder 'uni2_h' .*; missing \(1\): reg_token; shape"):
        build_encoder("uni2_h", path, model_kwargs=TWIN)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_weights_fail_in_one_line_naming_the_file(tmp_path, suffix):
    sd = {"cls_token": torch.zeros(1, 1, 64), "pos_embed": torch.randn(1, 197, 64)}
    path = tmp_path / f"w{suffix}"
    save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as e:
        build_encoder("virchow2", path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"weights file {path}: the file is truncated or corrupt (")


def test_random_init_twin_is_seeded_and_finite():
    with pytest.warns(RandomInitWarning):
        m1, spec = build_encoder("virchow2", model_kwargs=TWIN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        m2, _ = build_encoder("virchow2", model_kwargs=TWIN)
    x = spec.batch_transform(torch.from_numpy(_tiles(1, 256)))
    with torch.inference_mode():
        a, b = m1(x), m2(x)
    assert a.shape == (1, 2560) and torch.isfinite(a).all() and torch.equal(a, b)


def test_schema_and_readme_list_exactly_the_registry():
    """One list: the config schema's encoder names and the README's table are the registry's."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    enc = schema["properties"]["features"]["properties"]["encoders"]["additionalProperties"]
    names = re.fullmatch(r"\^\((.+)\|timm:\[A-Za-z0-9_.-\]\+\)\$", enc["pattern"]).group(1).split("|")
    assert names == list(ENCODERS)
    v = jsonschema.Draft202012Validator(enc)
    assert all(v.is_valid(n) for n in [*ENCODERS, "timm:vit_small_patch16_224.augreg_in1k"])
    assert not any(v.is_valid(n) for n in ["virchow3", "UNI", "timm:", "uni2-h"])
    readme = (REPO / "README.md").read_text().split("\n## Encoders\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|", readme, flags=re.M)
    assert rows == list(ENCODERS)
