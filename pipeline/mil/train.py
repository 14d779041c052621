"""Training and evaluation of one MIL model on one fold.

Adam with weight decay, mini-batches of several slides (padded, masked), early stopping on
validation AUC with the best checkpoint kept. Everything that decides the result (resolved
config, seed, encoders, package version, store fingerprints) travels with the checkpoint.

Loading is hidden behind compute: :func:`iter_batches` reads the next bags from the feature
stores (first epoch; a reader process does it for large cohorts, :mod:`pipeline.mil.bag_reader`)
and pads them into a batch in a background thread while the model works on the current one.
The thread draws no random numbers and builds exactly the batches the loop would build itself,
so results do not depend on `prefetch` (nor on the reader: the same bags, tested). Adam uses
the fused kernel where the parameters' device has one (CPU and CUDA): one kernel instead of a
dozen passes over the parameters (measured on CPU, 1 thread: 1.7 ms instead of 4.5 ms per step
for M2OTCA at D = 512, 0.6 instead of 1.4 ms at D = 64, i.e. 1.5-3 % of a training step);
deterministic, but its rounding differs from the multi-tensor Adam in the last bits (~1e-8).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline import __version__
from pipeline.atomic import atomic_path, json_safe, write_text, write_tsv
from pipeline.config import check_model_options, checked_options
from pipeline.devices import resolve_device
from pipeline.mil.bags import BagCache, collate
from pipeline.mil.metrics import classification_metrics
from pipeline.mil.models import ModelConfig, create_model
from pipeline.mil.models.diagnostics import cross_attention_stats

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 40  # maximum epochs
    patience: int = 10  # stop after this many epochs without a better validation AUC
    min_epochs: int = 5  # never stop before this many epochs
    lr: float = 2e-4  # Adam learning rate
    weight_decay: float = 1e-4  # Adam (L2) weight decay
    batch_size: int = 4  # slides per step (padded, masked)
    seed: int = 0  # seeds python, numpy and torch
    prefetch: int = 2  # batches loaded ahead in a background thread (0 = none); never changes results
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:1, ...
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        d = checked_options(cls, d, "training")
        check_model_options(d.get("model"))  # a ConfigError naming the key, before any work
        return cls(**d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at CUDA init)
    torch.use_deterministic_algorithms(True, warn_only=True)


def to_device(batch: dict, labels: torch.Tensor, device: torch.device) -> tuple[dict, torch.Tensor]:
    """A collated batch (dicts of per-magnification tensors) on `device`."""
    if device.type == "cpu":
        return batch, labels
    moved = {k: {t: v.to(device, non_blocking=True) for t, v in part.items()} for k, part in batch.items()}
    return moved, labels.to(device, non_blocking=True)


def device_name(device: torch.device) -> str:
    """E.g. "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)", for checkpoints and logs."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _batches(ids: list[str], batch_size: int, rng: np.random.Generator | None) -> list[list[str]]:
    order = list(ids) if rng is None else [ids[i] for i in rng.permutation(len(ids))]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


_DONE = object()


def iter_batches(cache: BagCache, chunks: list[list[str]], mags: list[str], prefetch: int = 2) -> Iterator[tuple[list, dict, torch.Tensor]]:
    """(bags, batch, labels) for each chunk of slide ids, in order.

    With `prefetch` > 0 a background thread loads (:meth:`BagCache.stream`, which may have a
    reader process read the bags ahead) and pads (collate) up to `prefetch` batches ahead of
    the consumer; an error there is raised here, and a consumer that stops early stops the
    thread. The batches are the same as without prefetching.
    """
    def load(bags: Iterator) -> Iterator[tuple[list, dict, torch.Tensor]]:
        for chunk in chunks:
            picked = [next(bags) for _ in chunk]
            yield (picked, *collate(picked, mags))

    if prefetch <= 0 or len(chunks) <= 1:
        yield from load(cache[s] for c in chunks for s in c)
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in load(cache.stream([s for c in chunks for s in c])):
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer
            put(e)

    thread = threading.Thread(target=work, name="bag-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


FUSED_ADAM_DEVICES = ("cpu", "cuda")  # device types with torch's fused Adam kernel (pinned by tests/test_private_apis.py)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with (L2) weight decay; the fused kernel where the parameters' device has one."""
    params = list(model.parameters())
    fused = all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, cache: BagCache, ids: list[str],
                mags: list[str], batch_size: int, rng: np.random.Generator, prefetch: int = 2,
                step_times: list[float] | None = None) -> list[float]:
    """One pass over `ids` in an order drawn from `rng`; returns the loss of every step.

    `step_times`, if given, receives the seconds of each step's compute alone (forward,
    backward, optimizer step), for benchmarks.
    """
    model.train()
    device = next(model.parameters()).device
    losses = []
    for _, batch, labels in iter_batches(cache, _batches(ids, batch_size, rng), mags, prefetch):
        start = time.perf_counter()
        batch, labels = to_device(batch, labels, device)
        out = model(batch, labels=labels)
        loss = F.cross_entropy(out["logits"], labels) + out.get("aux_loss", 0.0)  # CLAM's instance loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step_times is not None:
            step_times.append(time.perf_counter() - start)
    return losses


def predict(model: torch.nn.Module, cache: BagCache, ids: list[str], mags: list[str], batch_size: int,
            prefetch: int = 2) -> dict[str, Any]:
    """Class probabilities, branch logits, tile attention and cross-attention read-outs
    (:mod:`pipeline.mil.models.diagnostics`, one value per slide) for `ids` (model in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    probs, branch, attn, stats = [], {}, {}, {}
    for bags, batch, labels in iter_batches(cache, _batches(ids, batch_size, None), mags, prefetch):
        batch, _ = to_device(batch, labels, device)
        with torch.inference_mode():
            out = model(batch)
        probs.append(torch.softmax(out["logits"].float(), -1).cpu().numpy())
        for k, v in cross_attention_stats(out).items():
            stats.setdefault(k, []).append(v.numpy())
        for t, v in (out.get("branch_logits") or {}).items():
            branch.setdefault(t, []).append(v.float().cpu().numpy())
        for t, a in (out.get("tile_attention") or {}).items():
            a = a.float().cpu()
            for i, b in enumerate(bags):
                attn.setdefault(b.slide_id, {})[t] = a[i, : len(b.feats[t])].numpy()
    return {
        "prob": np.concatenate(probs) if probs else np.zeros((0, 0)),
        "branch_logits": {t: np.concatenate(v) for t, v in branch.items()},
        "tile_attention": attn,
        "diagnostics": {k: np.concatenate(v) for k, v in stats.items()},
    }


def train_fold(model_name: str, cache: BagCache, train_ids: list[str], val_ids: list[str], classes: list[str],
               mags: list[str], cfg: TrainConfig, out_dir: str | Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Train with early stopping on validation AUC; writes `checkpoint.pt` and `history.tsv`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    mcfg = ModelConfig.from_dict(cfg.model)
    cache.start_reader(train_ids + val_ids)  # ready by the first epoch: it starts while the model is built
    dims = cache.dims(train_ids[0])
    model = create_model(model_name, {m: dims[m] for m in mags}, len(classes), mcfg).to(device)
    opt = make_optimizer(model, cfg)
    log.info("%s: training on %s", model_name, device_name(device))
    rng = np.random.default_rng(cfg.seed)
    y_val = np.array([cache.labels[s] for s in val_ids], dtype=np.int64)  # without loading the bags
    best = (-np.inf, np.inf)  # (val AUC, val loss): higher AUC, then lower loss
    best_state, best_epoch, history, stale = None, -1, [], 0
    for epoch in range(cfg.epochs):
        losses = train_epoch(model, opt, cache, train_ids, mags, cfg.batch_size, rng, cfg.prefetch)
        if val_ids:
            val = predict(model, cache, val_ids, mags, cfg.batch_size, cfg.prefetch)
            m = classification_metrics(y_val, val["prob"], classes)
            val_loss = float(F.nll_loss(torch.log(torch.from_numpy(val["prob"]).clamp_min(1e-8)), torch.from_numpy(y_val)))
            score = (m["auc"] if np.isfinite(m["auc"]) else 0.5, val_loss)
        else:
            m, val_loss, score = {"auc": float("nan")}, float("nan"), (0.0, float(np.mean(losses)))
        diag = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                for k, v in (val["diagnostics"] if val_ids else {}).items()}
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                        "val_auc": m["auc"], **diag})
        log.info("%s epoch %d: train loss %.4f, val loss %.4f, val AUC %.4f", model_name, epoch,
                 history[-1]["train_loss"], val_loss, m["auc"])
        if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best, best_epoch, stale = score, epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience and epoch + 1 >= cfg.min_epochs:
                break
    ckpt = {
        "model_name": model_name,
        "state_dict": best_state,
        "best_epoch": best_epoch,
        "classes": classes,
        "mags": mags,
        "in_dims": {m: dims[m] for m in mags},
        "train_config": dataclasses.asdict(cfg),
        "model_config": dataclasses.asdict(mcfg),
        "seed": cfg.seed,
        "device": device_name(device),  # CPU and CUDA results agree to rounding, not bit for bit
        "package_version": __version__,
        **provenance,
    }
    # History first, checkpoint last: a checkpoint on disk always has its own history beside it.
    write_tsv(out_dir / "history.tsv", pd.DataFrame(history))
    with atomic_path(out_dir / "checkpoint.pt") as tmp:
        torch.save(ckpt, tmp)
    return ckpt


def load_model(ckpt: dict[str, Any], device: str = "cpu") -> torch.nn.Module:
    model = create_model(ckpt["model_name"], ckpt["in_dims"], len(ckpt["classes"]), ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(resolve_device(device)).eval()


def evaluate_fold(ckpt: dict[str, Any], cache: BagCache, test_ids: list[str], out_dir: str | Path) -> dict[str, Any]:
    """Predictions (per-slide probabilities and branch logits), metrics and ROC data on `test_ids`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained_on = ckpt["train_config"].get("device", "cpu")
    model = load_model(ckpt, "cpu" if trained_on == "cpu" else "auto")  # a GPU checkpoint evaluates anywhere
    classes, mags = ckpt["classes"], ckpt["mags"]
    res = predict(model, cache, test_ids, mags, 8)
    y = np.array([cache.labels[s] for s in test_ids], dtype=np.int64)
    pred = pd.DataFrame({"slide_id": test_ids, "label": [classes[i] for i in y]})
    for c, name in enumerate(classes):
        pred[f"prob_{name}"] = res["prob"][:, c] if len(test_ids) else []
    for t, v in res["branch_logits"].items():
        for c, name in enumerate(classes):
            pred[f"logit_{t}_{name}"] = v[:, c]
    for k, v in res["diagnostics"].items():
        pred[k] = v
    metrics = classification_metrics(y, res["prob"], classes)
    metrics.update({"model": ckpt["model_name"], "n_test": len(test_ids), "best_epoch": ckpt["best_epoch"]})
    with atomic_path(out_dir / "predictions.csv") as tmp:
        pred.to_csv(tmp, index=False)
    arrays = {}
    for sid, per_mag in res["tile_attention"].items():
        for t, a in per_mag.items():
            arrays[f"{sid}|{t}|attention"] = a
            arrays[f"{sid}|{t}|coords"] = cache[sid].coords[t]
    with atomic_path(out_dir / "attention.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    write_text(out_dir / "metrics.json", json.dumps(json_safe(metrics), indent=2, allow_nan=False))  # last: marks the evaluation done; NaN -> null
    return metrics
