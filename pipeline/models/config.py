"""Typed configuration shared by every MIL model in :mod:`pipeline.models`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GRAD_CLASSES = ("predicted", "label")


@dataclass
class ModelConfig:
    """Hyper-parameters of the MIL models (M2OTCA, its ablations and the baselines)."""

    # hidden dimension d of projected tile features, prototypes and bag embeddings
    d: int = 256
    # hidden dimension of every gated-attention network (V, U branches)
    attn_dim: int = 128
    # number m of sequential-batch prototypes (groups of consecutive regions) per magnification
    n_groups: int = 30
    # dropout after the per-tile input projection (E1 and the ABMIL baselines); E2 has none,
    # so the Grad-CAM recomputation of the 20x head is exactly the head used in the forward
    dropout: float = 0.25
    # entropic regularisation of the OT cross-attention (cost is scaled to [0, 1])
    sinkhorn_eps: float = 0.1
    # maximum number of log-domain Sinkhorn iterations
    sinkhorn_max_iter: int = 100
    # stop a bag's Sinkhorn once the L2 error of its column marginal is below this (0: always
    # run sinkhorn_max_iter iterations)
    sinkhorn_tol: float = 1e-3
    # class c of the gradient cross-attention: "predicted" (20x branch argmax, always used at
    # evaluation) or "label" (ground truth, only when the model is training and labels are given)
    grad_class: str = "predicted"
    # CLAM-SB baseline: attention-ranked tiles per bag and class for the instance loss
    clam_k_sample: int = 8
    # CLAM-SB baseline: weight of the bag loss in bag_weight * CE + (1 - bag_weight) * instance
    # loss; the model returns ``aux_loss`` = (1 - bag_weight) / bag_weight * instance loss, to
    # be added to the trainer's cross-entropy
    clam_bag_weight: float = 0.7

    def __post_init__(self) -> None:
        for name in ("d", "attn_dim", "n_groups", "sinkhorn_max_iter", "clam_k_sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("dropout", "sinkhorn_eps", "sinkhorn_tol", "clam_bag_weight"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"ModelConfig.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.sinkhorn_eps <= 0:
            raise ValueError(f"ModelConfig.sinkhorn_eps must be > 0, got {self.sinkhorn_eps}")
        if self.sinkhorn_tol < 0:
            raise ValueError(f"ModelConfig.sinkhorn_tol must be >= 0, got {self.sinkhorn_tol}")
        if not 0.0 < self.clam_bag_weight <= 1.0:
            raise ValueError(
                f"ModelConfig.clam_bag_weight must be in (0, 1], got {self.clam_bag_weight}"
            )
        if self.grad_class not in GRAD_CLASSES:
            raise ValueError(
                f"ModelConfig.grad_class must be one of {GRAD_CLASSES}, got {self.grad_class!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ModelConfig:
        """Build a config from a mapping; ``None`` values keep the default, unknown keys fail."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config key(s) {unknown}; allowed keys: {sorted(known)}"
            )
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def magnification_value(key: str) -> float:
    """Numeric magnification of a key such as ``"20x"`` (20.0)."""
    try:
        return float(key.lower().rstrip("x"))
    except ValueError as exc:
        raise ValueError(f"magnification keys look like '20x', got {key!r}") from exc


def order_magnifications(keys) -> list[str]:
    """Magnification keys from finest to coarsest, e.g. ``["20x", "10x", "5x"]``."""
    return sorted(keys, key=magnification_value, reverse=True)
