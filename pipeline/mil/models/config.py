"""Typed configuration shared by every MIL model in :mod:`pipeline.mil.models`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OT_COSTS = ("spatial", "feature+spatial", "feature")
GRAD_WEIGHTINGS = ("input", "mean")
GRAD_APPLY = ("attention", "scale")
GRAD_CLASSES = ("positive", "predicted", "label")
# M2OTCA exactly as the paper's listing: feature cost, mean-gradient weights of the predicted class
PAPER_CROSS_ATTENTION = {"ot_cost": "feature", "grad_weighting": "mean", "grad_class": "predicted",
                         "grad_apply": "scale", "grad_floor": 0.0, "branch_loss": 0.0}


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
    # cost of the OT cross-attention between 20x group u and group j of a coarser magnification:
    # "spatial" (squared distance between the groups' tissue centroids, in units of the bag's
    # group spacing: the plan keeps tissue aligned), "feature" (the paper: L2 distance between the
    # prototypes, scaled per bag to [0, 1]; position-blind) or "feature+spatial" (their sum)
    ot_cost: str = "spatial"
    # weight of the spatial term in the OT cost (an adjacent group costs ot_spatial_weight)
    ot_spatial_weight: float = 1.0
    # entropic regularisation of the OT cross-attention
    sinkhorn_eps: float = 0.1
    # maximum number of log-domain Sinkhorn iterations
    sinkhorn_max_iter: int = 100
    # stop a bag's Sinkhorn once the L2 error of its column marginal is below this (0: always
    # run sinkhorn_max_iter iterations)
    sinkhorn_tol: float = 1e-3
    # gradient cross-attention weight of 20x prototype u, from g = d target / d P1_20[u]:
    # "input" (ReLU(g . P1_20[u]), the prototype's first-order contribution to the target, as in
    # Grad-CAM's gradient x activation) or "mean" (the paper: ReLU(mean_d g), whose sign follows
    # the mean of the classifier row rather than the evidence)
    grad_weighting: str = "input"
    # target of the gradient cross-attention: "positive" (log-odds of any class but the first,
    # e.g. tumor vs normal: the same target for every bag, so the weights mark the evidence even
    # when the 20x branch alone predicts the first class), "predicted" (the paper: the 20x branch's
    # argmax logit) or "label" (ground truth while training with labels, "predicted" otherwise)
    grad_class: str = "positive"
    # how the weights w act on a coarser magnification's prototypes P2 (rows = 20x groups), with
    # c = grad_floor + (1 - grad_floor) * w (mean 1 over valid groups): "scale" (the paper:
    # P2 <- c * P2, which also changes each prototype's magnitude) or "attention" (E2's attention
    # over P2 is multiplied by c and renormalised: the 20x gradients decide where the coarser
    # branch looks, its features stay as they are)
    grad_apply: str = "attention"
    # share of the weight every group keeps whatever its gradient: 0 is the paper (a group with
    # w = 0 is erased, so evidence away from the 20x evidence is lost, which hurts tasks that do
    # not need co-location)
    grad_floor: float = 0.5
    # M2OTCA: weight of the branches' own cross-entropy (each magnification's logits y_t against
    # the label, mean over magnifications), returned as ``aux_loss``; 0 = the paper (the fused
    # logits alone are supervised, so a branch's class scores may mean anything, e.g. the 20x
    # branch may learn evidence as the first class, and the "positive" gradient target loses
    # its meaning)
    branch_loss: float = 0.5
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
        for name in ("dropout", "ot_spatial_weight", "grad_floor", "branch_loss", "sinkhorn_eps",
                     "sinkhorn_tol", "clam_bag_weight"):
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
        if self.branch_loss < 0:
            raise ValueError(f"ModelConfig.branch_loss must be >= 0, got {self.branch_loss}")
        if not 0.0 <= self.grad_floor <= 1.0:
            raise ValueError(f"ModelConfig.grad_floor must be in [0, 1], got {self.grad_floor}")
        if self.ot_spatial_weight < 0:
            raise ValueError(
                f"ModelConfig.ot_spatial_weight must be >= 0, got {self.ot_spatial_weight}"
            )
        for name, allowed in (
            ("ot_cost", OT_COSTS),
            ("grad_weighting", GRAD_WEIGHTINGS),
            ("grad_class", GRAD_CLASSES),
            ("grad_apply", GRAD_APPLY),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
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
