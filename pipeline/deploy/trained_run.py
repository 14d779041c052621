"""A trained run as prediction needs it: its fold checkpoints, and the recorded contract.

The contract is what new slides must be processed with for the run's models to apply: the
tiling parameters (from the run's tile stores, else its manifest), the encoder serving each
magnification and the sha256 of its weights (from the checkpoints and the run's feature
stores), and where those weights are (the run's manifest, or a moved copy with the same hash).
Nothing of it is re-specified by hand; features on disk that disagree are refused, naming the
slide and the mismatch.

Layout read (as the workflow writes it): `<run>/models/<feature set>/<model>/fold_<k>/checkpoint.pt`,
`<run>/metrics/<feature set>/manifest.json`, `<run>/splits/splits.tsv`, `<run>/tiles/`,
`<run>/features/<encoder>/`.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import RunError
from pipeline.store import store_state

log = logging.getLogger(__name__)

# Feature store attributes a slide's features must share with the run's, per magnification.
ENCODER_KEYS = ("encoder", "weights_sha256", "out_dim", "input_size", "mean", "std", "transform", "tile_size")
# Tiling parameters that never change which tiles are kept or where (memory knobs only).
TILING_IGNORED = ("max_read_pixels",)


@dataclass
class TrainedRun:
    root: Path  # results/<cohort> of the training run
    feature_set: str  # models/<feature set>/ the models were trained on
    models: dict[str, list[Path]]  # model -> checkpoint of every fold, in fold order
    folds: list[str]  # fold_0 .. fold_{k-1}
    classes: list[str]  # class names, in the models' output order
    mags: list[str]  # magnifications of the feature set, finest first
    encoders: dict[str, str]  # magnification -> encoder name
    encoder_attrs: dict[str, dict[str, Any]]  # magnification -> ENCODER_KEYS (+ target_mpp) of the run's features
    tiling: dict[str, Any]  # TilingConfig as recorded by the run's tile stores
    weights: dict[str, str | None]  # encoder -> local weights file (None: random init), hash checked
    left_out: dict[str, str] = field(default_factory=dict)  # model -> why it cannot be used

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary for the prediction's metrics.json."""
        return {"root": str(self.root), "feature_set": self.feature_set, "folds": self.folds,
                "classes": self.classes, "encoders": self.encoders,
                "weights_sha256": {m: a.get("weights_sha256") for m, a in self.encoder_attrs.items()},
                "tiling": self.tiling, "models": sorted(self.models), "left_out": self.left_out}


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


@functools.cache
def _sha256(path: str, size: int, mtime: float) -> str:
    from pipeline.features.encoders import weights_sha256

    return weights_sha256(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a weights file, cached per (path, size, mtime): UNI is 1.2 GB."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime)


def _manifest(root: Path, feature_set: str) -> dict[str, Any]:
    p = root / "metrics" / feature_set / "manifest.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise RunError(f"trained run {root}: unreadable manifest {p}: {e}") from e


def _folds(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Fold names from the splits table (what was trained), else the manifest's config."""
    splits = root / "splits" / "splits.tsv"
    if splits.exists():
        header = splits.read_text().split("\n", 1)[0].split("\t")
        folds = [c.strip() for c in header if c.strip().startswith("fold_")]
        if folds:
            return folds
    k = (manifest.get("config") or {}).get("splits", {}).get("folds")
    if k:
        return [f"fold_{i}" for i in range(int(k))]
    raise RunError(f"trained run {root}: neither {splits} nor a manifest says how many folds were trained")


def pick_feature_set(root: Path, feature_set: str | None) -> str:
    """The requested feature set, or the run's only one."""
    root = Path(root)
    found = sorted(p.name for p in (root / "models").glob("*") if p.is_dir())
    if feature_set:
        if feature_set not in found:
            raise RunError(f"trained run {root}: no models for feature set {feature_set!r} (found {found})")
        return feature_set
    if len(found) != 1:
        raise RunError(f"trained run {root}: {len(found)} feature sets {found} under models/; "
                       "name one (predict.feature_set)")
    return found[0]


def _features_dir(root: Path, recorded: str) -> Path:
    """A checkpoint's feature folder: the run's own `features/<encoder>` (the run may have moved),
    else as recorded (relative to the working folder)."""
    own = root / "features" / Path(recorded).name
    return own if own.is_dir() else Path(recorded)


def _reference_attrs(root: Path, ckpt: dict[str, Any], mag: str) -> dict[str, Any]:
    """Feature store attributes of the first usable training slide at `mag`."""
    d = _features_dir(root, ckpt["features"][mag])
    for sid in ckpt.get("train_ids", []):
        status, attrs = store_state(d / f"{sid}.zarr")
        if status == "ok":
            return attrs
    raise RunError(f"trained run {root}: no finished feature store of its training slides in {d}")


def _tiling(root: Path, ckpt: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    for sid in ckpt.get("train_ids", []):
        status, attrs = store_state(root / "tiles" / f"{sid}.zarr")
        if status == "ok" and "tiling" in attrs:
            return dict(attrs["tiling"])
    tiling = (manifest.get("config") or {}).get("tiling")
    if tiling:
        return dict(tiling)
    raise RunError(f"trained run {root}: no tile store of its training slides in {root / 'tiles'} "
                   "and no manifest: its tiling parameters are unknown")


def _weights(root: Path, encoders: dict[str, str], attrs: dict[str, dict[str, Any]],
             manifest: dict[str, Any], override: dict[str, str | None] | None) -> dict[str, str | None]:
    """Encoder -> weights file whose sha256 is the one the run's features were made with."""
    recorded = ((manifest.get("config") or {}).get("features") or {}).get("weights") or {}
    out: dict[str, str | None] = {}
    for mag, name in encoders.items():
        want = attrs[mag].get("weights_sha256")
        per_mag = isinstance(want, dict)  # one model per magnification (features.weights keyed by it)
        if per_mag:
            want, name = want.get(mag), mag
        path = (override or {}).get(name) or recorded.get(name) or None
        if want is None:  # random init: no file, and none may be given
            if path:
                raise RunError(f"trained run {root}: encoder {name} was random-init there, but weights {path} are given")
            out[name] = None
            continue
        if not path:
            raise RunError(f"trained run {root}: encoder {name} used weights with sha256 {want[:12]}…, "
                           "but its manifest names no file; give it in predict.weights")
        if not Path(path).is_file():
            raise RunError(f"trained run {root}: weights file of {name} not found: {path} "
                           "(moved? give its new place in predict.weights)")
        got = file_sha256(path)
        if got != want:
            raise RunError(f"trained run {root}: weights {path} have sha256 {got[:12]}…, the run's {name} "
                           f"features were made with {want[:12]}…")
        out[name] = str(path)
    return out


def load_trained_run(root: str | Path, feature_set: str | None = None, models: list[str] | None = None,
                     weights: dict[str, str | None] | None = None) -> TrainedRun:
    """Read a trained run; a model with a fold missing (or at odds with the others) is left out
    with one logged line, and a run with no usable model at all raises RunError."""
    root = Path(root)
    if not (root / "models").is_dir():
        raise RunError(f"trained run {root}: no models/ folder (not a results/<cohort> folder of a trained run?)")
    fs = pick_feature_set(root, feature_set)
    manifest = _manifest(root, fs)
    folds = _folds(root, manifest)
    present = sorted(p.name for p in (root / "models" / fs).iterdir() if p.is_dir())
    wanted = list(models) if models else present
    usable: dict[str, list[Path]] = {}
    left_out: dict[str, str] = {}
    first: dict[str, Any] | None = None
    for m in wanted:
        ckpts = [root / "models" / fs / m / f / "checkpoint.pt" for f in folds]
        missing = [c for c in ckpts if not c.is_file()]
        if missing:
            left_out[m] = f"{len(missing)} of {len(folds)} folds missing, first {missing[0]}"
            continue
        ck = _load_checkpoint(ckpts[0])
        if first is None:
            first = ck
        else:
            odd = [k for k in ("classes", "mags", "encoders") if ck.get(k) != first.get(k)]
            if odd:
                left_out[m] = f"{ckpts[0]}: {', '.join(odd)} differ from the run's other models"
                continue
        usable[m] = ckpts
    for m, why in left_out.items():
        log.error("trained run %s: model %s left out: %s", root, m, why)
    if first is None:
        raise RunError(f"trained run {root}: no complete model in models/{fs} "
                       f"({'; '.join(f'{m}: {w}' for m, w in left_out.items()) or 'none trained'})")
    mags = list(first["mags"])
    encoders = {m: first["encoders"][m] for m in mags}
    keep = (*ENCODER_KEYS, "target_mpp", "pretrained")
    attrs = {}
    for m in mags:
        a = _reference_attrs(root, first, m)
        attrs[m] = {k: a.get(k) for k in keep}
        attrs[m]["target_mpp"] = (a.get("target_mpp") or {}).get(m)
    tiling = _tiling(root, first, manifest)
    return TrainedRun(root=root, feature_set=fs, models=usable, folds=folds, classes=list(first["classes"]),
                      mags=mags, encoders=encoders, encoder_attrs=attrs, tiling=tiling,
                      weights=_weights(root, encoders, attrs, manifest, weights), left_out=left_out)


def _short(v: Any) -> str:
    if v is None:
        return "none (random init)"
    s = json.dumps(v) if not isinstance(v, str) else v
    return s[:12] + "…" if len(s) == 64 and all(c in "0123456789abcdef" for c in s) else s


def feature_mismatch(run: TrainedRun, mag: str, attrs: dict[str, Any]) -> str | None:
    """Why a slide's feature store at `mag` does not match the run (None when it does)."""
    want = run.encoder_attrs[mag]
    for k in ENCODER_KEYS:
        if attrs.get(k) != want.get(k):
            return f"{mag} features {k} {_short(attrs.get(k))}, the trained run's {_short(want.get(k))}"
    got_mpp = (attrs.get("target_mpp") or {}).get(mag)
    if want.get("target_mpp") is not None and got_mpp != want["target_mpp"]:
        return f"{mag} features at {got_mpp} µm/px, the trained run's at {want['target_mpp']} µm/px"
    return None


def tiling_mismatch(run: TrainedRun, tiling: dict[str, Any]) -> str | None:
    """Why a tile store's tiling parameters differ from the run's (None when they agree)."""
    for k in sorted(set(run.tiling) & set(tiling)):
        if k not in TILING_IGNORED and tiling[k] != run.tiling[k]:
            return f"tiled with {k}={json.dumps(tiling[k])}, the trained run with {k}={json.dumps(run.tiling[k])}"
    return None
