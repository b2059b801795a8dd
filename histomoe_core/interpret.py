"""Attributions on the H&E patch, end to end through the vision encoder and the MoE (Captum).

Captum style: the constructor takes the model, :meth:`Attributor.attribute` takes data::

    attr = Attributor(HistoMoEEndToEnd(encoder, moe), genes=panel, meta_emb=meta)
    res = attr.attribute(patches, target="ERBB2", of="gene", method="ig")      # one gene's prediction
    res = attr.attribute(patches, target="e2", of="gate", method="occlusion")  # one expert's gate weight

``patches`` are uint8 (B, H, W, 3) arrays as :func:`~histomoe_core.data.patches.iter_patches` yields them
(preprocessed with the encoder's own ``preprocess``) or float (B, 3, H, W) tensors already preprocessed.
Baselines (``baselines=``): ``"blur"`` (default) is the patch itself blurred with a Gaussian of ``blur`` times the
patch width, so attributions say how the fine structure at each pixel (nuclei, fibres, gaps) moved the output
away from the patch's local colour; ``"white"`` is blank glass (no tissue); ``"zeros"`` the encoder's mean
colour; or any tensor / uint8 array like the inputs. Far-away baselines such as white make the path integral
steep near the baseline (the network output changes fast as the first tissue appears), so IG needs many more
steps to converge there.

For Integrated Gradients the completeness gap ``sum(attributions) - (f(x) - f(baseline))`` is returned as
``delta`` (``Attributions.relative_delta`` divides it by ``|f(x) - f(baseline)|``); it shrinks as ``n_steps`` grows,
except for the part of the output that is not differentiable in the pixels: a retrieval expert is piecewise
constant, and :meth:`Attributor.retrieval_change` gives the change IG cannot credit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

Of = Literal["gene", "gate"]
Method = Literal["ig", "gradient_shap", "occlusion"]
METHODS: tuple[str, ...] = ("ig", "gradient_shap", "occlusion")
METHOD_NAMES = {"ig": "Integrated Gradients", "gradient_shap": "GradientSHAP", "occlusion": "Occlusion"}


@dataclass
class Attributions:
    """Per-pixel attributions of one model output for a batch of patches."""

    values: np.ndarray  #: (B, 3, H, W) attributions in the encoder's input space
    method: str
    of: str  #: "gene" or "gate"
    target: int  #: output column (gene index in the panel, or expert index)
    target_name: str
    output: np.ndarray  #: (B,) f(x): the attributed output on the patches
    baseline_output: np.ndarray  #: (B,) f(baseline)
    delta: np.ndarray | None = None  #: (B,) IG convergence delta; None for GradientSHAP and occlusion

    @property
    def relative_delta(self) -> np.ndarray | None:
        """``|delta| / |f(x) - f(baseline)|`` per patch (IG completeness error as a fraction)."""
        if self.delta is None:
            return None
        gap = np.abs(self.output - self.baseline_output)
        return np.abs(self.delta) / np.maximum(gap, 1e-12)

    def heatmap(self, *, reduce: Literal["sum", "abs"] = "sum") -> np.ndarray:
        """(B, H, W) map: attributions summed over colour channels (signed) or their absolute sum."""
        v = np.abs(self.values) if reduce == "abs" else self.values
        return v.sum(axis=1)

    def summary(self) -> dict:
        out = {"method": METHOD_NAMES[self.method], "of": self.of, "target": self.target_name,
               "mean_output": float(self.output.mean()), "mean_baseline_output": float(self.baseline_output.mean())}
        if self.delta is not None:
            out["max_abs_delta"] = float(np.abs(self.delta).max())
            out["max_relative_delta"] = float(self.relative_delta.max())
        return out


class _Output(nn.Module):
    """The model reduced to one output table: predictions (B, G) or gate weights (B, E)."""

    def __init__(self, model: nn.Module, of: Of, meta_emb: Tensor | None) -> None:
        super().__init__()
        self.model, self.of, self.meta_emb = model, of, meta_emb

    def forward(self, images: Tensor, meta: Tensor | None = None) -> Tensor:
        out = self.model(images, meta if meta is not None else self.meta_emb)
        return out.pred if self.of == "gene" else out.gates


def _depends_on_input(f: nn.Module, x: Tensor, t: int) -> bool:
    """Whether output column ``t`` of ``f`` is connected to the input pixels in the autograd graph."""
    with torch.enable_grad():
        xi = x[:1].detach().clone().requires_grad_(True)
        out = f(xi)[:, t]
        if not out.requires_grad:
            return False
        (grad,) = torch.autograd.grad(out.sum(), xi, allow_unused=True)
    return grad is not None


class Attributor:
    """Attributions of one gene's predicted expression or one expert's gate weight to the patch pixels.

    ``model`` is a :class:`~histomoe_core.moe.HistoMoEEndToEnd` (encoder + MoE). ``genes`` names the panel so
    targets can be given by gene name; ``meta_emb`` is the metadata embedding (M,) used when the router
    reads metadata. The model is put in eval mode (dropout off) and its weights are not changed.
    """

    def __init__(self, model: nn.Module, *, genes: Sequence[str] | None = None, meta_emb: np.ndarray | Tensor | None = None,
                 device: str | torch.device | None = None) -> None:
        if not hasattr(model, "encoder") or not hasattr(model, "moe"):
            raise TypeError("Attributor needs an end-to-end model (HistoMoEEndToEnd(encoder, moe)), "
                            f"got {type(model).__name__}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.genes = [str(g) for g in genes] if genes is not None else None
        if self.genes is not None and len(self.genes) != model.moe.cfg.n_genes:
            raise ValueError(f"{len(self.genes)} gene names for a model predicting {model.moe.cfg.n_genes} genes")
        self.meta_emb = None if meta_emb is None else torch.as_tensor(np.asarray(meta_emb, np.float32), device=self.device)
        from histomoe_core.tl.prediction import model_expert_names

        self.experts = model_expert_names(model)

    # -- inputs --
    def preprocess(self, patches: np.ndarray | Tensor) -> Tensor:
        """uint8 (B, H, W, 3) -> the encoder's float (B, 3, H, W) input; float tensors pass through."""
        if isinstance(patches, Tensor):
            if patches.dim() != 4 or patches.shape[1] != 3:
                raise ValueError(f"image tensors must be preprocessed (B, 3, H, W), got {tuple(patches.shape)}")
            return patches.float().to(self.device)
        arr = np.asarray(patches)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"patches must be uint8 (B, H, W, 3) as iter_patches yields, got {arr.dtype} {arr.shape}")
        return self.model.encoder.preprocess(arr).float().to(self.device)

    def _baselines(self, x: Tensor, baselines, blur: float = 1 / 16) -> Tensor:
        if baselines is None or (isinstance(baselines, str) and baselines == "blur"):
            from torchvision.transforms.functional import gaussian_blur

            sigma = max(blur * x.shape[-1], 0.5)
            k = min(2 * int(3 * sigma) + 1, 2 * (min(x.shape[-2:]) // 2) - 1)
            return gaussian_blur(x.contiguous(), kernel_size=[k, k], sigma=[sigma, sigma]).contiguous()
        if isinstance(baselines, str) and baselines == "white":
            white = np.full((1, x.shape[2], x.shape[3], 3), 255, np.uint8)
            return self.preprocess(white).expand_as(x).contiguous()
        if isinstance(baselines, str):
            if baselines == "zeros":
                return torch.zeros_like(x)
            raise ValueError(f"unknown baseline {baselines!r}; use 'blur', 'white', 'zeros' or a tensor like the inputs")
        b = self.preprocess(baselines) if not isinstance(baselines, Tensor) else baselines.to(self.device).float()
        return b.expand_as(x).contiguous() if b.shape[0] == 1 else b

    def _target(self, target: int | str, of: Of) -> tuple[int, str]:
        names = self.genes if of == "gene" else self.experts
        size = self.model.moe.cfg.n_genes if of == "gene" else len(self.experts)
        if isinstance(target, str):
            if names is None or target not in names:
                raise KeyError(f"unknown {of} {target!r}; known: {names[:10] if names else 'pass genes= to Attributor'}")
            return names.index(target), target
        t = int(target)
        if not 0 <= t < size:
            raise IndexError(f"{of} target {t} out of range 0..{size - 1}")
        return t, names[t] if names else f"{of}{t}"

    @torch.no_grad()
    def predict(self, images: np.ndarray | Tensor) -> dict[str, np.ndarray]:
        """The end-to-end model's ``pred``, ``gates`` and ``expert_preds`` for the patches (eval mode)."""
        out = self.model(self.preprocess(images), self.meta_emb)
        return {k: getattr(out, k).float().cpu().numpy() for k in ("pred", "gates", "expert_preds")}

    @torch.no_grad()
    def retrieval_change(self, images: np.ndarray | Tensor, *, target: int | str, baselines=None,
                         blur: float = 1 / 16) -> np.ndarray:
        """(B,) change between baseline and patch of the retrieval experts' share of gene ``target``
        (``sum over retrieval experts of gate * prediction``); zeros for a model without retrieval experts.

        A retrieval expert is piecewise constant in the pixels (its output changes only when the set of nearest
        training spots changes), so gradient methods cannot credit its jumps: they stay in the IG delta however
        many steps are taken.
        """
        x = self.preprocess(images)
        moe = self.model.moe
        if getattr(moe, "retrieval", None) is None:
            return np.zeros(len(x))
        t, _ = self._target(target, "gene")
        r = slice(moe.cfg.n_experts, None)  # retrieval experts follow the learned ones in the gate order
        ox, ob = self.model(x, self.meta_emb), self.model(self._baselines(x, baselines, blur), self.meta_emb)
        part = lambda o: (o.gates[:, r] * o.expert_preds[:, r, t]).sum(1).float().cpu().numpy()  # noqa: E731
        return part(ox) - part(ob)

    # -- attribution --
    def attribute(
        self,
        images: np.ndarray | Tensor,
        *,
        target: int | str,
        of: Of = "gene",
        method: Method = "ig",
        baselines: str | np.ndarray | Tensor | None = None,
        blur: float = 1 / 16,
        n_steps: int = 32,
        internal_batch_size: int = 16,
        n_samples: int = 8,
        stdevs: float = 0.1,
        window: int = 32,
        stride: int = 16,
        seed: int = 0,
    ) -> Attributions:
        """Attribute output ``target`` (gene index/name for ``of="gene"``, expert index/name for ``of="gate"``).

        ``ig``: Integrated Gradients (``n_steps``, ``internal_batch_size``); ``gradient_shap``: ``n_samples``
        noisy points (``stdevs``) between baseline and input; ``occlusion``: a ``window`` px square of baseline
        slid with ``stride`` px.
        """
        from captum.attr import GradientShap, IntegratedGradients, Occlusion

        if of not in ("gene", "gate"):
            raise ValueError(f"of must be 'gene' or 'gate', got {of!r}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        t, name = self._target(target, of)
        x = self.preprocess(images)
        base = self._baselines(x, baselines, blur)
        f = _Output(self.model, of, self.meta_emb)
        torch.manual_seed(seed)
        delta = None
        if not _depends_on_input(f, x, t):
            # e.g. the gate of a router that reads only metadata: every attribution is exactly zero
            values = torch.zeros_like(x)
            delta = None if method == "occlusion" else torch.zeros(len(x))
        elif method == "ig":
            values, delta = IntegratedGradients(f).attribute(
                x, baselines=base, target=t, n_steps=n_steps, internal_batch_size=internal_batch_size,
                return_convergence_delta=True)
        elif method == "gradient_shap":
            # one image at a time: GradientSHAP expands the batch by n_samples
            # (its per-sample deltas are single-point estimates, not a convergence measure: not reported)
            values = torch.cat([GradientShap(f).attribute(x[i : i + 1], baselines=base[i : i + 1], target=t,
                                                          n_samples=n_samples, stdevs=stdevs) for i in range(len(x))])
        else:
            values = Occlusion(f).attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                            baselines=base, target=t, perturbations_per_eval=internal_batch_size)
        with torch.no_grad():
            out = f(x)[:, t].cpu().numpy()
            out_b = f(base)[:, t].cpu().numpy()
        return Attributions(
            values=values.detach().cpu().numpy(), method=method, of=of, target=t, target_name=name,
            output=out, baseline_output=out_b, delta=None if delta is None else delta.detach().cpu().numpy().reshape(-1),
        )


def spot_patches(sample, indices: Sequence[int], *, spec=None) -> np.ndarray:
    """uint8 (len(indices), H, W, 3) patches of the sample's spots at ``indices``, in that order."""
    from histomoe_core.data.patches import PatchSpec, iter_patches

    idx = np.asarray(indices, dtype=int)
    spec = spec if spec is not None else PatchSpec()
    got: dict[int, np.ndarray] = {}
    for rows, batch in iter_patches(sample, spec, batch_size=max(len(idx), 1), indices=np.unique(idx)):
        got.update(zip(rows.tolist(), batch))
    missing = [int(i) for i in idx if int(i) not in got]
    if missing:
        raise IndexError(f"{sample.sample_id}: no patch for spot indices {missing[:5]} (dropped or out of range)")
    return np.stack([got[int(i)] for i in idx])
