"""Tile encoders: one registry, one loader, one transform contract.

`build_encoder(name, weights)` returns the model in eval mode on the CPU and its
`EncoderSpec`: a per-tile `transform` (RGB uint8 (H, W, 3) numpy -> float32 (3, S, S) tensor),
the feature width `out_dim`, the autocast dtype `precision` to use on CUDA; the spec also
normalises whole uint8 batches on the GPU (`batch_transform`) and describes itself for store
attributes.

Registered names: `resnet18_simclr` (DSMIL's SimCLR ResNet-18), `uni` (UNI ViT-L/16), the
foundation models of `pipeline.features.foundation` (`uni2_h`, `virchow2`, `h_optimus_0`, `h_optimus_1`,
`prov_gigapath`) and `timm:<model name>` for any timm architecture with local weights.
Nothing is downloaded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.features.foundation import FOUNDATION_MODELS, foundation_spec
from pipeline.hashing import file_sha256

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
RANDOM_INIT_SEED = 0  # random init is seeded so reruns and resumes stay byte-identical

# torchvision ResNet children in order; `features.<i>` in a DSMIL checkpoint is child i.
_RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
_SIMCLR_HEAD = ("l1.", "l2.")  # SimCLR projection MLP, not part of the encoder
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# what safetensors / unpickling say about a file cut short
_TRUNCATED = ("not fully covered", "incomplete metadata", "Ran out of input", "unexpected EOF")


class RandomInitWarning(UserWarning):
    """An encoder was built without weights: its features carry no pretrained meaning."""


@dataclass(frozen=True)
class EncoderSpec:
    """What the extractor and the feature store need to know about an encoder."""

    name: str
    out_dim: int
    input_size: tuple[int, int] | None  # (H, W) the model sees; None = the tile as given
    mean: tuple[float, float, float] | None  # None = no normalisation (ToTensor only)
    std: tuple[float, float, float] | None
    precision: torch.dtype  # preferred autocast dtype on CUDA
    interpolation: str = "bilinear"  # used only when the tile is resized (antialiased)
    resize_size: tuple[int, int] | None = None  # resize to this, then center-crop to input_size
    pretrained: bool = False
    weights_sha256: str | None = None

    def batch_transform(self, x: Tensor) -> Tensor:
        """(B, H, W, 3) uint8 on any device -> (B, 3, S, S) float32 on that device.

        Same arithmetic as torchvision's ToTensor (x / 255), then an antialiased resize
        when the tile differs from `resize_size` (else `input_size`), a center crop to
        `input_size` as torchvision's CenterCrop, then Normalize ((x - mean) / std).
        """
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 batch, got {tuple(x.shape)} {x.dtype}")
        y = x.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, H, W) in [0, 1]
        size = self.resize_size or self.input_size
        if size is not None and tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode=self.interpolation,
                              align_corners=False, antialias=True)  # (B, 3, R, R)
            y = y.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clamps to uint8 likewise
        if self.resize_size is not None and self.input_size is not None:
            (h, w), (ch, cw) = y.shape[-2:], self.input_size
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            y = y[..., top : top + ch, left : left + cw].contiguous()  # (B, 3, S, S)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
            y = y.sub_(mean).div_(std)
        return y

    def transform(self, tile: np.ndarray) -> Tensor:
        """RGB uint8 (H, W, 3) numpy tile -> float32 (3, S, S) tensor, as `batch_transform`."""
        arr = np.asarray(tile)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 tile, got {arr.shape} {arr.dtype}")
        if not arr.flags.writeable:
            arr = arr.copy()  # torch.from_numpy warns on read-only arrays
        return self.batch_transform(torch.from_numpy(arr)[None])[0].contiguous()

    def describe_transform(self) -> str:
        """One line for the store's `transform` attribute."""
        steps = ["ToTensor (uint8 / 255)"]
        if self.resize_size is not None and self.input_size is not None:
            steps.append(f"resize to {self.resize_size[0]}x{self.resize_size[1]} "
                         f"({self.interpolation}, antialias) if the tile differs; "
                         f"center crop {self.input_size[0]}x{self.input_size[1]}")
        elif self.input_size is not None:
            steps.append(f"resize to {self.input_size[0]}x{self.input_size[1]} "
                         f"({self.interpolation}, antialias) if the tile differs")
        if self.mean is not None:
            steps.append(f"Normalize(mean={list(self.mean)}, std={list(self.std or ())})")
        return "; ".join(steps)

    def attrs(self) -> dict[str, Any]:
        """JSON-safe provenance for the feature store's attributes."""
        return {
            "encoder": self.name,
            "out_dim": self.out_dim,
            "input_size": list(self.input_size) if self.input_size else None,
            "resize_size": list(self.resize_size) if self.resize_size else None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "interpolation": self.interpolation,
            "transform": self.describe_transform(),
            "precision": str(self.precision).removeprefix("torch."),
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "random_init_seed": None if self.pretrained else RANDOM_INIT_SEED,
        }


# ----------------------------------------------------------------------------- weights


def weights_sha256(path: str | Path) -> str:
    """Hex sha256 of a weights file (the workflow hashes it the same way, without torch)."""
    return file_sha256(path)


def _truncated(path: Path, e: Exception) -> bool:
    """Whether a failed load looks like a file cut short: a PyTorch zip archive (it starts with
    the zip magic yet does not load), a safetensors header promising more bytes, or a pickle
    that ends early."""
    with open(path, "rb") as f:
        head = f.read(4)
    return (head == b"PK\x03\x04" or isinstance(e, EOFError)
            or any(s in str(e) for s in _TRUNCATED))


def unreadable_weights(path: Path, e: Exception) -> ConfigError:
    """The one-line error for a weights file torch/safetensors cannot load."""
    size = path.stat().st_size
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if size == 0:
        why = "the file is empty"
    elif "Unsupported global" in str(e):
        why = "it holds pickled Python objects, not only tensors; save the state dict (torch.save(model.state_dict(), path))"
    elif _truncated(path, e):
        cause = lines[0][:100] if lines else "end of file"
        why = f"the file is truncated or corrupt ({size:,} bytes; {type(e).__name__}: {cause}); copy it again"
    else:
        cause = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else "")
        why = f"not a PyTorch or safetensors checkpoint ({type(e).__name__}: {cause[:120]})"
    return ConfigError(f"weights file {path}: {why}")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint: unwraps `state_dict`/`model` wrappers and `module.` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # text, empty, truncated, pickled objects: one line naming the file
        raise unreadable_weights(path, e) from e
    for _ in range(4):  # e.g. {"state_dict": {"model": {...}}}
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = None
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{path}: no state dict of tensors found (top level: {top})")
        obj = inner
    else:
        raise ValueError(f"{path}: state dict nested too deeply")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _listing(label: str, items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"; {label} ({len(items)}): " + ", ".join(items[:limit]) + more


def check_fit(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str) -> None:
    """Raise a one-line ConfigError (a ValueError; the CLI exits 2) naming missing/unexpected
    keys and shape mismatches."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in given and given[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        msg = f"weights do not fit {what}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                msg += _listing(label, items)
        raise ConfigError(msg)


def _dsmil_name(key: str) -> str:
    """`features.4.0.conv1.weight` -> `layer1.0.conv1.weight` (DSMIL child index -> name)."""
    head, _, rest = key.removeprefix("features.").partition(".")
    if head.isdigit() and int(head) < len(_RESNET_CHILDREN):
        return f"{_RESNET_CHILDREN[int(head)]}.{rest}"
    return key


def resnet_state_dict(sd: Mapping[str, Tensor], target: Mapping[str, Tensor],
                      what: str) -> dict[str, Tensor]:
    """Map a DSMIL SimCLR / DSMIL embedder / plain ResNet state dict onto `target`'s keys.

    SimCLR checkpoints (`features.<i>.*` + `l1`/`l2` head) are mapped by position, as
    DSMIL's compute_feats.py does (zip over state-dict items), after dropping the head by
    name instead of DSMIL's blind `popitem()` x4. Each pair must agree in shape and in name
    (`features.<i>` = the i-th ResNet child), so a different layout errors, never shifts.
    """
    if any(k.startswith("features.") for k in sd):
        body = [(k, v) for k, v in sd.items() if not k.startswith(_SIMCLR_HEAD)]
        check_fit(target, {_dsmil_name(k): v for k, v in body}, what)  # names + shapes
        if [_dsmil_name(k) for k, _ in body] != list(target):
            raise ConfigError(f"weights do not fit {what}: tensors are not in the ResNet's order")
        return {tk: v for (_, v), tk in zip(body, target, strict=True)}
    if any(k.startswith("feature_extractor.") for k in sd):  # DSMIL IClassifier embedder.pth
        sd = {k.removeprefix("feature_extractor."): v for k, v in sd.items()
              if k.startswith("feature_extractor.")}
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


# ----------------------------------------------------------------------------- building


def _instantiate(factory: Callable[[], nn.Module], on_meta: bool) -> nn.Module:
    """Build the module; on the meta device when weights will replace every tensor anyway
    (skips UNI's ~4 s random init), otherwise with a seeded, RNG-isolated random init."""
    if on_meta:
        with torch.device("meta"):
            model = factory()
        persistent = set(model.state_dict())
        if all(name in persistent for name, _ in model.named_buffers()):
            return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return factory()


def _load(model: nn.Module, sd: Mapping[str, Tensor], what: str) -> nn.Module:
    """Strict load; `assign` for meta-built models, then everything to float32 on the CPU."""
    check_fit(model.state_dict(), sd, what)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(sd, strict=True, assign=on_meta)
    return model.float()


@dataclass(frozen=True)
class _Recipe:
    """How to build one registered encoder."""

    factory: Callable[[Mapping[str, Any]], nn.Module]
    spec: Callable[[nn.Module], dict[str, Any]]  # out_dim, input_size, mean, std, ...
    adapt: Callable[[Mapping[str, Tensor], nn.Module, str], dict[str, Tensor]]  # -> model keys


def _resnet18_simclr(kw: Mapping[str, Any]) -> nn.Module:
    # DSMIL: torchvision resnet18(norm_layer=nn.InstanceNorm2d), i.e. affine=False and
    # track_running_stats=False: no norm parameters, identical in train and eval.
    return timm.create_model("resnet18", pretrained=False, num_classes=0,
                             norm_layer=nn.InstanceNorm2d, **kw)


def _uni(kw: Mapping[str, Any]) -> nn.Module:
    # The UNI model card's timm call (MahmoodLab/UNI).
    args: dict[str, Any] = dict(img_size=224, patch_size=16, init_values=1e-5,
                                num_classes=0, dynamic_img_size=True)
    return timm.create_model("vit_large_patch16_224", pretrained=False, **{**args, **kw})


def _as_is(sd: Mapping[str, Tensor], model: nn.Module, what: str) -> dict[str, Tensor]:
    return dict(sd)


def _resnet_adapt(sd: Mapping[str, Tensor], model: nn.Module, what: str) -> dict[str, Tensor]:
    return resnet_state_dict(sd, model.state_dict(), what)


def _drop_classifier(sd: Mapping[str, Tensor], model: nn.Module, what: str) -> dict[str, Tensor]:
    """Drop the classifier's keys (timm's pretrained_cfg['classifier']) the headless model lacks."""
    heads = model.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    target = model.state_dict()
    return {k: v for k, v in sd.items() if k in target or not k.startswith(prefixes)}


ENCODERS: dict[str, _Recipe] = {
    # fp16 for the ResNet: InstanceNorm after every conv keeps activations O(1), so fp16
    # cannot overflow, and its 10-bit mantissa is 8x finer than bf16's 7 bits (CPU autocast,
    # random init, 256 px: relative feature error 8e-4 in fp16 vs 6e-3 in bf16).
    "resnet18_simclr": _Recipe(
        factory=_resnet18_simclr,
        spec=lambda m: dict(out_dim=512, input_size=None, mean=None, std=None,
                            precision=torch.float16),
        adapt=_resnet_adapt,
    ),
    # bf16 for the ViT-L: fp32's exponent range (no overflow in attention logits/MLPs).
    # Resize 256 -> 224 bilinear with antialias, as UNI's Resize(224) on PIL images.
    "uni": _Recipe(
        factory=_uni,
        spec=lambda m: dict(out_dim=m.num_features, input_size=(224, 224), mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, precision=torch.bfloat16, interpolation="bilinear"),
        adapt=_as_is,
    ),
    # pipeline.features.foundation: each model card's timm arguments, transform, pooling and precision
    **{name: _Recipe(factory=fm.build, spec=foundation_spec(fm), adapt=_as_is)
       for name, fm in FOUNDATION_MODELS.items()},
}


def _timm_recipe(arch: str) -> _Recipe:
    """`timm:<arch>`: num_classes=0; size, mean/std, interpolation from timm's pretrained_cfg."""

    def factory(kw: Mapping[str, Any]) -> nn.Module:
        try:
            return timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kw})
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ValueError(f"timm cannot build {arch!r}: {e}") from e

    def spec(m: nn.Module) -> dict[str, Any]:
        cfg = resolve_data_config({}, model=m)  # reads m.pretrained_cfg; no network
        _, h, w = cfg["input_size"]
        interp = cfg.get("interpolation", "bilinear")
        return dict(out_dim=int(getattr(m, "head_hidden_size", None) or m.num_features),
                    input_size=(h, w), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                    precision=torch.bfloat16,
                    interpolation=interp if interp in ("bilinear", "bicubic") else "bilinear")

    return _Recipe(factory=factory, spec=spec, adapt=_drop_classifier)


def _recipe(name: str) -> _Recipe:
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return _timm_recipe(name[len(TIMM_PREFIX):])
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}, {TIMM_PREFIX}<timm model>")
    return ENCODERS[name]


def architecture(name: str, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The encoder's module on the meta device (no memory, no init): for key/shape checks."""
    recipe = _recipe(name)
    with torch.device("meta"):
        return recipe.factory(dict(model_kwargs or {}))


def build_encoder(name: str, weights: str | Path | None = None, *,
                  model_kwargs: Mapping[str, Any] | None = None) -> tuple[nn.Module, EncoderSpec]:
    """Model (eval, float32, CPU, no grad) and its spec. `model_kwargs` override the
    architecture (tests use it to shrink UNI); the store records only the name."""
    recipe = _recipe(name)
    kw = dict(model_kwargs or {})
    model = _instantiate(lambda: recipe.factory(kw), on_meta=weights is not None)
    what = f"encoder {name!r}"
    if weights is not None:
        sd = read_state_dict(weights)
        fit = f"{what} ({weights})"
        model = _load(model, recipe.adapt(sd, model, fit), fit)
        digest = weights_sha256(weights)
        log.info("%s: loaded %s (%d tensors, sha256 %s)", name, weights, len(sd), digest[:12])
    else:
        digest = None
        msg = (f"{what}: no weights given, using RANDOM initialisation (seed {RANDOM_INIT_SEED}); "
               "its features are not pretrained and only fit for tests")
        log.warning(msg)
        warnings.warn(msg, RandomInitWarning, stacklevel=3)
    model.eval().requires_grad_(False)
    spec = EncoderSpec(name=name, pretrained=weights is not None, weights_sha256=digest,
                       **recipe.spec(model))
    model.pretrained = spec.pretrained  # type: ignore[assignment]
    return model, spec

