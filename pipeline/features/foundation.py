"""Pathology foundation models by name: each model card's exact timm architecture, input size,
normalisation, output pooling, width and precision, so `features.encoders` can say `virchow2`
instead of a `timm:` name that knows none of these quirks. Weights only from a local file.

Sources (checked against the cards' code and TRIDENT's loaders, mahmoodlab/TRIDENT
trident/patch_encoder_models/load.py, which builds the same timm models from local files):
- UNI2-h: huggingface.co/MahmoodLab/UNI2-h model card, `timm_kwargs` (TRIDENT: bf16).
- Virchow2: huggingface.co/paige-ai/Virchow2 model card and config.json (`model_args`,
  `pretrained_cfg`: 224 px, bicubic, ImageNet mean/std); card's output
  `cat([output[:, 0], output[:, 5:].mean(1)])` = 2560 and its fp16 autocast.
- H-optimus-0 / -1: huggingface.co/bioptimus/H-optimus-0 (and -1) model cards
  (`init_values=1e-5, dynamic_img_size=False`, own mean/std, fp16 autocast, output (1, 1536))
  and config.json (vit_giant_patch14_reg4_dinov2, 224 px, global_pool token).
- Prov-GigaPath tile encoder: huggingface.co/prov-gigapath/prov-gigapath config.json
  (`model_args`: patch 16 on the vit_giant_patch14_dinov2 body, depth 40, 224 px) and
  github.com/prov-gigapath/prov-gigapath demo/3_load_tile_encoder.py (Resize(256, bicubic),
  CenterCrop(224), ImageNet mean/std; its pipeline runs the tile encoder under fp16 autocast).

Not registered: CONCH v1.5 (a modified iBOT ViT-L with CoCa's attentional pooler, shipped as
custom code needing einops/einops_exts; its checkpoint is not a timm model) and Phikon-v2
(a `transformers` Dinov2Model checkpoint: a key remap onto timm could not be verified against
its reference here without `transformers`); use them through `timm:` only if converted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # bioptimus model cards
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


class ClassMeanViT(VisionTransformer):
    """Virchow's tile embedding: [class token, mean of patch tokens] (register tokens left out).

    Same parameters and state-dict keys as the timm ViT it is swapped onto (`global_pool=""`,
    so forward_features ends with the final norm); only the head's pooling differs.
    """

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        # x: (B, 1 + R + N, D) -> (B, 2D); tokens 1..R are registers
        return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


@dataclass(frozen=True)
class FoundationModel:
    """One registered foundation model: the card's architecture and its use at inference."""

    arch: str  # timm architecture name the card builds
    kwargs: Mapping[str, Any]  # timm constructor arguments, as on the card
    out_dim: int  # published feature width
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    precision: torch.dtype  # CUDA autocast dtype the card (or TRIDENT) uses
    interpolation: str  # resize of tiles that are not already `input_size`
    weights: str  # where a user obtains the file (gated; each under its own licence)
    input_size: int = 224
    resize_size: int | None = None  # resize to this, then center-crop to input_size
    pool: str = "timm"  # "timm": the model's own head; "class+mean": ClassMeanViT

    def build(self, overrides: Mapping[str, Any]) -> nn.Module:
        """The timm model with the card's arguments (`overrides` shrink it for tests)."""
        model = timm.create_model(self.arch, pretrained=False, **{**self.kwargs, **overrides})
        if self.pool == "class+mean":
            if type(model) is not VisionTransformer:
                raise TypeError(f"{self.arch}: class+mean pooling needs a timm VisionTransformer")
            model.__class__ = ClassMeanViT  # same module tree and keys, Virchow's pooling
        return model

    def width(self, model: nn.Module) -> int:
        """Feature width of a built model (the published one unless a test shrank it)."""
        d = int(model.num_features)  # type: ignore[arg-type]
        return 2 * d if self.pool == "class+mean" else d


_SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)

_H_OPTIMUS = FoundationModel(
    arch="vit_giant_patch14_reg4_dinov2",
    kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0, global_pool="token"),
    out_dim=1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, precision=torch.float16,
    interpolation="bilinear",  # card feeds 224-px tiles as they are; others resized as TRIDENT
    weights="huggingface.co/bioptimus/H-optimus-0 `pytorch_model.bin` (gated, Apache-2.0)",
)

FOUNDATION_MODELS: dict[str, FoundationModel] = {
    # ViT-H/14 (1536 wide, 24 blocks, SwiGLU, 8 registers) on the vit_giant_patch14_224 name.
    "uni2_h": FoundationModel(
        arch="vit_giant_patch14_224",
        kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                    embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                    reg_tokens=8, dynamic_img_size=True, **_SWIGLU),
        out_dim=1536, mean=IMAGENET_MEAN, std=IMAGENET_STD, precision=torch.bfloat16,
        interpolation="bilinear",  # card: transforms.Resize(224) (PIL bilinear), CenterCrop(224)
        weights="huggingface.co/MahmoodLab/UNI2-h `pytorch_model.bin` (gated, CC-BY-NC-ND-4.0)",
    ),
    # ViT-H/14 (1280 wide, 32 blocks, SwiGLU, 4 registers with position embeddings).
    "virchow2": FoundationModel(
        arch="vit_huge_patch14_224",
        kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                    mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, **_SWIGLU),
        out_dim=2560, mean=IMAGENET_MEAN, std=IMAGENET_STD, precision=torch.float16,
        interpolation="bicubic", pool="class+mean",
        weights="huggingface.co/paige-ai/Virchow2 `pytorch_model.bin` (gated, CC-BY-NC-ND-4.0)",
    ),
    # ViT-g/14 with 4 registers (DINOv2 body); class token out.
    "h_optimus_0": _H_OPTIMUS,
    "h_optimus_1": replace(  # same architecture and transform, newer weights
        _H_OPTIMUS, weights="huggingface.co/bioptimus/H-optimus-1 `pytorch_model.bin` (gated, licence on the card)"),
    # ViT-g body with 16-px patches (the config overrides the name's 14), no registers.
    "prov_gigapath": FoundationModel(
        arch="vit_giant_patch14_dinov2",
        kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                    num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
        out_dim=1536, mean=IMAGENET_MEAN, std=IMAGENET_STD, precision=torch.float16,
        interpolation="bicubic", resize_size=256,
        weights="huggingface.co/prov-gigapath/prov-gigapath `pytorch_model.bin` (gated, licence on the card)",
    ),
}


def foundation_spec(fm: FoundationModel) -> Callable[[nn.Module], dict[str, Any]]:
    """EncoderSpec fields for a built model of `fm`."""

    def spec(m: nn.Module) -> dict[str, Any]:
        side = (fm.input_size, fm.input_size)
        resize = (fm.resize_size, fm.resize_size) if fm.resize_size else None
        return dict(out_dim=fm.width(m), input_size=side, resize_size=resize, mean=fm.mean,
                    std=fm.std, precision=fm.precision, interpolation=fm.interpolation)

    return spec
