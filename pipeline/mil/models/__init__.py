"""MIL models for multi-magnification WSI classification (imports only torch).

``create_model(name, in_dims, n_classes, cfg)`` builds any model of ``MODEL_NAMES``:

- ``m2otca``: full M2OTCA (OT + gradient cross-attention) as configured (default: a spatial OT
  cost that keeps tissue aligned, gradient x input weights of the "positive" target);
- ``m2otca_paper``: full M2OTCA with the paper's cross-attention whatever the config says
  (feature OT cost, mean-gradient weights of the 20x branch's predicted class);
- ``m2otca_a``: ablation M_A, no cross-attention;
- ``m2otca_b``: ablation M_B, gradient cross-attention only;
- ``m2otca_c``: ablation M_C, OT cross-attention only;
- ``abmil_20x`` / ``abmil_10x`` / ``abmil_5x``: gated-attention ABMIL on one magnification;
- ``abmil_3``: one ABMIL per magnification, linear layer over the concatenated logits;
- ``clam_sb_3``: one CLAM-SB per magnification, same fusion;
- ``transmil_3``: one TransMIL per magnification (exact attention instead of Nystrom), same
  fusion.

Every model takes ``forward(batch, labels=None)`` with ``batch["feats"][t]`` (B, N_t, D_t),
``batch["mask"][t]`` (B, N_t) bool, ``batch["group"][t]`` (B, N_t) long (-1 = padding) and,
for M2OTCA's spatial plan, ``batch["xy"][t]`` (B, N_t, 2) level-0 tile centres, and returns a dict with ``logits`` (B, C), ``branch_logits``, ``tile_attention`` and
``proto_attention`` (dicts keyed by magnification). Models with an auxiliary training loss
(``clam_sb_3``, in training mode with ``labels``) also return ``aux_loss``, a scalar to ADD to
the cross-entropy on ``logits``; the others never return it, so a trainer can always use
``loss = cross_entropy(out["logits"], labels) + out.get("aux_loss", 0)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from .abmil import ABMIL, ABMIL3, CLAMSB3
from .config import PAPER_CROSS_ATTENTION, ModelConfig
from .m2otca import M2OTCA
from .ot import sinkhorn
from .transmil import TransMIL, TransMIL3

Builder = Callable[[dict[str, int], int, ModelConfig], nn.Module]  # (in_dims, n_classes, cfg) -> model


def _m2otca(use_ot: bool, use_grad: bool, paper: bool = False) -> Builder:
    def build(in_dims: dict[str, int], n_classes: int, cfg: ModelConfig) -> nn.Module:
        cfg = dataclasses.replace(cfg, **PAPER_CROSS_ATTENTION) if paper else cfg
        return M2OTCA(dict(in_dims), n_classes, cfg, use_ot=use_ot, use_grad=use_grad)

    return build


def _abmil(mag: str) -> Builder:
    def build(in_dims: dict[str, int], n_classes: int, cfg: ModelConfig) -> nn.Module:
        if mag not in in_dims:
            raise KeyError(f"model abmil_{mag} needs magnification {mag!r}; in_dims has {list(in_dims)}")
        return ABMIL(in_dims[mag], n_classes, cfg, mag)

    return build


# The registry (as ENCODERS and slides.READERS): name -> builder; the config schema's model
# enum is checked against it by a test.
MODELS: dict[str, Builder] = {
    "m2otca": _m2otca(use_ot=True, use_grad=True),
    "m2otca_paper": _m2otca(use_ot=True, use_grad=True, paper=True),
    "m2otca_a": _m2otca(use_ot=False, use_grad=False),
    "m2otca_b": _m2otca(use_ot=False, use_grad=True),
    "m2otca_c": _m2otca(use_ot=True, use_grad=False),
    "abmil_20x": _abmil("20x"),
    "abmil_10x": _abmil("10x"),
    "abmil_5x": _abmil("5x"),
    "abmil_3": lambda in_dims, n_classes, cfg: ABMIL3(dict(in_dims), n_classes, cfg),
    "clam_sb_3": lambda in_dims, n_classes, cfg: CLAMSB3(dict(in_dims), n_classes, cfg),
    "transmil_3": lambda in_dims, n_classes, cfg: TransMIL3(dict(in_dims), n_classes, cfg),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def create_model(
    name: str, in_dims: dict[str, int], n_classes: int, cfg: ModelConfig | None = None
) -> nn.Module:
    """Build model ``name`` for per-magnification input dims ``in_dims`` and ``n_classes``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    return MODELS[name](in_dims, n_classes, cfg if cfg is not None else ModelConfig())


__all__ = [
    "MODELS",
    "MODEL_NAMES",
    "ModelConfig",
    "create_model",
    "sinkhorn",
    "M2OTCA",
    "ABMIL",
    "ABMIL3",
    "CLAMSB3",
    "TransMIL",
    "TransMIL3",
]
