"""The model bundle: one self-contained, versioned folder holding everything a prediction needs.

Layout of ``BUNDLE/``::

    bundle.json            # manifest: format version, encoder (name, weights sha256, cache id), patch spec,
                           # gene panel, target kind, normalisation, model (kind, chosen spec, selection),
                           # contexts, metadata encoder and training strings, provenance, file sha256s
    model.pt               # HistoMoE / MLP: {"config", "state_dict"}; baselines: model.pkl (the fitted estimator)
    train_embeddings.npz   # training image embeddings (float16) for the novelty score, and their mean / sd

:func:`save_bundle` writes into a temporary folder beside the target and renames it into place, so a bundle is
either complete or absent. :func:`load_bundle` checks the format, every file's sha256 and (unless told not to)
that this machine's encoder of that name has the same weights.
"""
from __future__ import annotations

import datetime as _dt
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from histomoe_core import cache
from histomoe_core.errors import HistoMoEError

FORMAT = "histomoe-bundle"
#: bump when the layout or the meaning of a field changes; older bundles are refused with a retrain hint
VERSION = 1
MANIFEST = "bundle.json"
EMBEDDINGS = "train_embeddings.npz"


class BundleError(HistoMoEError):
    """A bundle that cannot be used here (missing, corrupt, from another version or encoder)."""


@dataclass
class Bundle:
    """A loaded bundle: its manifest, the fitted estimator, and the training embeddings' summary."""

    path: Path
    manifest: dict
    estimator: Any  #: ``fit``-ted estimator with ``predict`` (and ``predict_full`` for MoE models)
    train_x: np.ndarray = field(repr=False)  #: (N, D) float32 training embeddings
    x_mean: np.ndarray = field(repr=False)
    x_sd: np.ndarray = field(repr=False)

    @property
    def genes(self) -> list[str]:
        return list(self.manifest["genes"])

    @property
    def encoder(self) -> str:
        return self.manifest["encoder"]["name"]

    @property
    def patch(self) -> dict:
        return dict(self.manifest["patch"])

    @property
    def contexts(self) -> list[str]:
        return list(self.manifest["contexts"])

    def reads_metadata(self) -> bool:
        return bool(self.manifest["metadata"]["reads_metadata"])


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("histomoe-core")
    except PackageNotFoundError:
        return "unknown"


def _estimator_files(est, tmp: Path) -> dict:
    """Write the fitted estimator; return the manifest's ``model.file`` entry."""
    if hasattr(est, "model"):
        import torch

        torch.save({"config": est.model.cfg.as_dict(), "state_dict": est.model.state_dict()}, tmp / "model.pt")
        return {"file": "model.pt", "format": "torch-state-dict"}
    with open(tmp / "model.pkl", "wb") as f:
        pickle.dump(est, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"file": "model.pkl", "format": "pickle"}


def save_bundle(out: Path, *, estimator, manifest: Mapping[str, Any], train_x: np.ndarray) -> Path:
    """Write a bundle folder at ``out`` atomically (replacing an existing bundle there); returns ``out``."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not a bundle; choose another --out")
    x = np.asarray(train_x, np.float32)
    man = {"format": FORMAT, "version": VERSION, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "package_version": package_version(), **dict(manifest)}
    with cache.atomic_dir(out) as tmp:
        man["model"] = {**dict(man.get("model", {})), **_estimator_files(estimator, tmp)}
        np.savez(tmp / EMBEDDINGS, x=x.astype(np.float16), mean=x.mean(0), sd=x.std(0) + 1e-6)
        man["files"] = {p.name: cache.sha256sum(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(man, indent=1, default=_json_default))
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def read_manifest(path: Path) -> dict:
    """The manifest of the bundle at ``path``, checked for format and version."""
    path = Path(path)
    f = path / MANIFEST if path.is_dir() else path
    if not f.exists():
        raise BundleError(f"{path} is not a model bundle (no {MANIFEST}); make one with `histomoe train ... --out {path}`")
    try:
        man = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {path} is corrupt ({MANIFEST}: {e}); retrain it with `histomoe train`") from e
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise BundleError(f"{f} is not a HistoMoE bundle manifest; retrain with `histomoe train`")
    if man.get("version") != VERSION:
        raise BundleError(f"bundle {path} has format version {man.get('version')}, this histomoe reads version "
                          f"{VERSION}; retrain it with `histomoe train` (or use histomoe {man.get('package_version')})")
    return man


def _check_files(root: Path, man: dict) -> None:
    for name, want in man.get("files", {}).items():
        p = root / name
        if not p.exists():
            raise BundleError(f"bundle {root} is incomplete: {name} is missing; retrain it with `histomoe train`")
        if cache.sha256sum(p) != want:
            raise BundleError(f"bundle {root} is corrupt: {name} does not match its sha256; copy the bundle again "
                              "or retrain it with `histomoe train`")


def check_encoder(man: dict, encoder=None) -> None:
    """Refuse when this machine's encoder of the bundle's name (or ``encoder``) has other weights."""
    from histomoe_core.encoders import create_encoder

    want = man["encoder"]
    enc = encoder if encoder is not None else create_encoder(want["name"])
    have = json.loads(json.dumps(enc.cache_id(), default=_json_default))
    if have != want["cache_id"]:
        raise BundleError(
            f"bundle was trained on encoder {want['name']!r} with weights {want['cache_id'].get('weights')}, but "
            f"the encoder here is {have.get('name')!r} with weights {have.get('weights')}; install the same weights "
            "or retrain the bundle with `histomoe train --encoder ...` on this machine")


def _load_estimator(root: Path, man: dict):
    entry = man["model"]
    if entry["format"] == "pickle":
        with open(root / entry["file"], "rb") as f:
            return pickle.load(f)
    import torch

    from histomoe_core.moe import HistoMoE, MoEConfig
    from histomoe_core.train import MoERegressor

    blob = torch.load(root / entry["file"], map_location="cpu", weights_only=True)
    model = HistoMoE(MoEConfig.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    spec = {k: v for k, v in entry["spec"].items() if k not in ("kind", "centre", "train")}
    est = MoERegressor(name=entry["name"], **{k: v for k, v in spec.items()
                                               if k in ("init", "freeze_init", "ridge_alpha", "retrieval_exclude")})
    est.model = model.eval()
    return est


def load_bundle(path: Path, *, check_weights: bool = True, encoder=None) -> Bundle:
    """The bundle at ``path`` (see the module docstring); ``check_weights``: compare the encoder's weights."""
    root = Path(path)
    man = read_manifest(root)
    _check_files(root, man)
    if check_weights:
        check_encoder(man, encoder)
    try:
        est = _load_estimator(root, man)
        with np.load(root / EMBEDDINGS, allow_pickle=False) as z:
            x, mean, sd = z["x"].astype(np.float32), z["mean"], z["sd"]
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise BundleError(f"bundle {root} cannot be loaded ({type(e).__name__}: {e}); retrain it with "
                          "`histomoe train`") from e
    return Bundle(root, man, est, x, mean, sd)
