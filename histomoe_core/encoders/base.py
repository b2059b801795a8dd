"""The uniform contract every vision encoder meets: a module that maps uint8 patches to (B, embed_dim) features.

A :class:`VisionEncoder` wraps a feature trunk (a timm model built with ``num_classes=0``, or the tiny test
net) together with everything needed to use it and to cache its output: its ``name``, ``embed_dim``,
``weights_id`` (hash of the weights, or ``"random-init"``), ``pretrained``, the preprocessing (``mean``,
``std``, ``input_px``, ``interpolation``) and ``cache_id()``, the data an embedding cache key is built from.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: the weights_id of encoders with no trained weights (their cache key uses a digest of the actual tensors)
RANDOM_INIT = "random-init"


class RandomInitWarning(UserWarning):
    """The encoder has randomly initialised weights: its features are not pretrained."""


def state_digest(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) of every parameter and buffer, in state-dict order."""
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else
                 t.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


class VisionEncoder(nn.Module):
    """A patch encoder: ``preprocess`` turns uint8 NHWC patches into a float NCHW batch, ``forward`` embeds it."""

    def __init__(
        self,
        trunk: nn.Module,
        *,
        name: str,
        embed_dim: int,
        weights_id: str,
        pretrained: bool,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        input_px: int = 224,
        interpolation: str = "bicubic",
        fixed_input: bool = False,
        source: str = "",
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.name = name
        self.embed_dim = int(embed_dim)
        self.weights_id = weights_id
        self.pretrained = bool(pretrained)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_px = int(input_px)
        self.interpolation = interpolation
        self.fixed_input = bool(fixed_input)
        self.source = source
        self._digest: str | None = None

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, embed_dim={self.embed_dim}, weights_id={self.weights_id!r}, "
                f"input_px={self.input_px}, source={self.source!r}")

    # ---------------------------------------------------------------- preprocessing
    def preprocess(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) patches -> normalised float32 (B, 3, H, W) tensor in ``channels_last`` memory.

        Patches are resized to ``input_px`` only when the trunk needs a fixed input size (e.g. a ViT);
        convolutional trunks take the patch size as it comes.
        """
        if isinstance(batch, np.ndarray):
            batch = np.ascontiguousarray(batch)
            x = torch.from_numpy(batch if batch.flags.writeable else batch.copy())
        else:
            x = batch
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{self.name}: preprocess expects uint8 patches of shape (B, H, W, 3), got "
                             f"{tuple(x.shape)} {x.dtype}")
        x = x.permute(0, 3, 1, 2).float()  # NHWC memory viewed as NCHW = channels_last
        if self.fixed_input and x.shape[-1] != self.input_px:
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode=self.interpolation,
                              antialias=True, align_corners=False).clamp_(0, 255)
            x = x.contiguous(memory_format=torch.channels_last)
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(1, 3, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)]).view(1, 3, 1, 1)
        return x.mul_(scale).sub_(shift)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trunk(x)
        if out.ndim != 2:  # trunks that return token or spatial maps: mean-pool them
            out = out.flatten(2).mean(-1) if out.ndim == 4 else out.mean(1)
        return out

    # ---------------------------------------------------------------- identity for caches
    def weights_digest(self) -> str:
        """Digest of the actual tensors (computed once): identifies random-init weights in cache keys."""
        if self._digest is None:
            self._digest = state_digest(self)
        return self._digest

    def cache_id(self) -> dict[str, Any]:
        """Everything about the encoder that its embeddings depend on (input to the cache key)."""
        weights = self.weights_id if self.weights_id != RANDOM_INIT else f"{RANDOM_INIT}:{self.weights_digest()}"
        return {"name": self.name, "weights": weights, "mean": self.mean, "std": self.std,
                "input_px": self.input_px if self.fixed_input else None, "interpolation": self.interpolation,
                "embed_dim": self.embed_dim}

    def describe(self) -> str:
        state = "pretrained" if self.pretrained else "RANDOM INIT (not pretrained)"
        return f"{self.name}: {self.embed_dim}-d, {state}, weights {self.weights_id}, {self.source}"


def warn_random_init(name: str) -> None:
    warnings.warn(
        f"encoder {name!r} has randomly initialised weights (no offline weights for it); its features are "
        "not pretrained. Use 'efficientnet_lite0' for offline ImageNet weights or an 'hf-hub:' name online.",
        RandomInitWarning,
        stacklevel=4,
    )
