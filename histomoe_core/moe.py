"""HistoMoE: expert heads over (frozen) image embeddings, weighted by a router that reads the image
embedding, the metadata embedding, or both.

Three small modules, in the style of st-moe (the auxiliary losses are returned, never hidden):

- :class:`Router` turns the router input into logits and gates: dense (softmax over all experts) or
  top-k (softmax over the k largest logits, zeros elsewhere), optionally with noisy gating (Shazeer et al. 2017).
- :class:`Experts` evaluates E heads (``"linear"`` or ``"mlp"``, from the ``EXPERTS`` registry) in one batched
  einsum, giving per-expert predictions ``(B, E, G)``. An optional :class:`RetrievalExpert` (BLEEP-style
  mean of the k nearest training spots) joins as one more routed expert, and an optional shared expert is
  added to every prediction.
- :class:`HistoMoE` joins them and returns a :class:`MoEOutput`.

The input first passes :class:`InputNorm` (fixed buffers: standardisation and an optional PCA projection,
fit on the training embeddings with :meth:`HistoMoE.fit_input`), so router and experts see the same
features as the ridge baseline; the buffers travel in the state dict.

Auxiliary losses (``MoEOutput.aux``, unweighted, training mode only):

- ``"balance"``: Switch load-balancing loss ``E * sum_e f_e * P_e`` (``f_e`` fraction of the batch dispatched to
  expert e, top-1 for dense routing; ``P_e`` mean router probability). Equals 1 under uniform routing.
- ``"z"``: router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE).
- ``"guide"``: cross-entropy of the router logits toward the expert tied to each spot's context label
  (``expert_of_context``, default ``context % n_routed_experts``); present only when ``context`` is given.

The weights live in :class:`MoEConfig` (``balance_weight``, ``z_weight``, ``guide_weight``);
:meth:`HistoMoE.loss` combines prediction MSE and the weighted auxiliary losses.

Rebuild a saved model with ``HistoMoE(MoEConfig.from_dict(json.load(...)))`` then ``load_state_dict``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histomoe_core.pca import standard_pca
from histomoe_core.registry import Registry

RouterInput = Literal["image", "meta", "both", "spatial", "image+spatial"]
#: what each router input reads: the image features, the metadata embedding, the spatial-context features
ROUTER_READS = {"image": ("image",), "meta": ("meta",), "both": ("image", "meta"), "spatial": ("spatial",),
                "image+spatial": ("image", "spatial")}
EXPERTS: Registry[nn.Module] = Registry("expert")


@dataclass(frozen=True)
class MoEConfig:
    """Everything that defines a HistoMoE (dimensions, routing, experts, loss weights)."""

    in_dim: int  #: image embedding dimension
    n_genes: int  #: output dimension (gene panel size)
    meta_dim: int = 0  #: metadata embedding dimension (0: no metadata)
    #: spatial-context features only the router reads (:mod:`~histomoe_core.spatial_context`; 0: none)
    spatial_dim: int = 0
    n_experts: int = 4  #: learned (routed) experts
    top_k: int | None = None  #: None = dense soft routing
    router_input: RouterInput = "image"
    router_hidden: int = 0  #: 0 = linear router, else one hidden layer
    noisy_gating: bool = False
    expert: str = "mlp"  #: name in ``EXPERTS`` ("linear", "mlp")
    hidden: int = 128
    dropout: float = 0.1
    shared_expert: bool = False  #: an always-on head added to the routed mixture
    shared_hidden: int = 0  #: 0 = linear shared expert
    pca_dim: int | None = None  #: project standardised embeddings on the top principal components
    input_dropout: float = 0.0  #: dropout on the (normalised) features the experts read, in training
    retrieval_k: int | tuple[int, ...] = 0  #: > 0 adds a retrieval expert (mean of the k nearest training
    #: spots); a tuple adds one retrieval expert per k
    n_contexts: int = 0  #: number of context labels (organ / cancer type); 0 = none
    expert_of_context: tuple[int, ...] | None = None  #: expert tied to each context (default c % n_experts)
    balance_weight: float = 0.01
    z_weight: float = 1e-3
    guide_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.router_input not in ROUTER_READS:
            raise ValueError(f"router_input must be one of {', '.join(map(repr, ROUTER_READS))}, got {self.router_input!r}")
        if "meta" in ROUTER_READS[self.router_input] and self.meta_dim <= 0:
            raise ValueError(f"router_input={self.router_input!r} needs meta_dim > 0 (the metadata embedding size)")
        if "spatial" in ROUTER_READS[self.router_input] and self.spatial_dim <= 0:
            raise ValueError(f"router_input={self.router_input!r} needs spatial_dim > 0: a spatial context kind with "
                             "use 'router' or 'both' in the benchmark's spatial_context")
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if self.top_k is not None and not 1 <= self.top_k <= self.n_routed:
            raise ValueError(f"top_k must be None (soft) or between 1 and {self.n_routed}, got {self.top_k}")
        if isinstance(self.retrieval_k, list):
            object.__setattr__(self, "retrieval_k", tuple(self.retrieval_k))
        if self.expert_of_context is not None:
            object.__setattr__(self, "expert_of_context", tuple(int(e) for e in self.expert_of_context))
            if any(not 0 <= e < self.n_routed for e in self.expert_of_context):
                raise ValueError(f"expert_of_context entries must be expert indices < {self.n_routed}")

    @property
    def n_routed(self) -> int:
        """Experts the router chooses among: learned experts plus the retrieval expert."""
        return self.n_experts + len(self.retrieval_ks)

    @property
    def retrieval_ks(self) -> tuple[int, ...]:
        ks = self.retrieval_k if isinstance(self.retrieval_k, (tuple, list)) else (self.retrieval_k,)
        return tuple(int(k) for k in ks if k and k > 0)

    @property
    def feat_dim(self) -> int:
        return self.pca_dim or self.in_dim

    @property
    def spatial_feat_dim(self) -> int:
        """Router width of the spatial features: standardised, projected on ``pca_dim`` components if smaller."""
        return min(self.pca_dim, self.spatial_dim) if self.pca_dim else self.spatial_dim

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["expert_of_context"] is not None:
            d["expert_of_context"] = list(d["expert_of_context"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MoEConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **kw) -> "MoEConfig":
        return self.from_dict({**self.as_dict(), **kw})


@dataclass
class MoEOutput:
    pred: Tensor  #: (B, G) final prediction
    gates: Tensor  #: (B, E) routing weights, rows sum to 1 (E = routed experts)
    expert_preds: Tensor  #: (B, E, G) prediction of every routed expert
    aux: dict[str, Tensor] = field(default_factory=dict)  #: unweighted auxiliary losses; empty in eval
    logits: Tensor | None = None  #: (B, E) router logits (before noise)
    shared_pred: Tensor | None = None  #: (B, G) shared-expert prediction, already included in ``pred``


# ----------------------------------------------------------------------------------------------------------
# input normalisation


class InputNorm(nn.Module):
    """``(x - mean) / scale``, then optionally ``@ components`` (PCA). Buffers only; identity until fit."""

    def __init__(self, in_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.register_buffer("components", torch.eye(in_dim)[:, : out_dim or in_dim].clone())
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, x: Tensor) -> "InputNorm":
        k = self.components.shape[1]
        mean, scale, comps = standard_pca(np.asarray(x.detach().cpu()), None if k >= x.shape[1] else k)
        for buf, value in ((self.mean, mean), (self.scale, scale), (self.components, comps)):
            buf.copy_(torch.from_numpy(np.array(value)))
        self.fitted.fill_(True)
        return self

    def forward(self, x: Tensor) -> Tensor:
        z = (x - self.mean) / self.scale
        return z @ self.components


# ----------------------------------------------------------------------------------------------------------
# router


class Router(nn.Module):
    """Router logits from the image features, the metadata embedding, the spatial-context features (normalised
    by :class:`HistoMoE`) or a combination (:data:`ROUTER_READS`); gates soft or top-k."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        reads = ROUTER_READS[cfg.router_input]
        self.use_image, self.use_meta, self.use_spatial = ("image" in reads), ("meta" in reads), ("spatial" in reads)
        d = ((cfg.feat_dim if self.use_image else 0) + (cfg.meta_dim if self.use_meta else 0)
             + (cfg.spatial_feat_dim if self.use_spatial else 0))
        # metadata embeddings (unit-norm text vectors, one-hots) are brought to the scale of standardised features
        self.meta_norm = nn.LayerNorm(cfg.meta_dim, elementwise_affine=False) if self.use_meta else None
        e = cfg.n_routed
        if cfg.router_hidden:
            self.net = nn.Sequential(nn.Linear(d, cfg.router_hidden), nn.GELU(), nn.Linear(cfg.router_hidden, e))
        else:
            self.net = nn.Linear(d, e)
        # near-zero output weights: routing starts almost uniform (balanced), then learns
        last = self.net[-1] if isinstance(self.net, nn.Sequential) else self.net
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)
        self.noise = nn.Linear(d, e) if cfg.noisy_gating else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)

    def inputs(self, x: Tensor, meta: Tensor | None, spatial: Tensor | None = None) -> Tensor:
        parts = []
        if self.use_image:
            parts.append(x)
        if self.use_meta:
            if meta is None:
                raise ValueError(f"router_input={self.cfg.router_input!r} needs meta_emb (B, {self.cfg.meta_dim})")
            if meta.dim() == 1:
                meta = meta.expand(x.shape[0], -1)
            parts.append(self.meta_norm(meta.to(x.dtype)))
        if self.use_spatial:
            if spatial is None:
                raise ValueError(f"router_input={self.cfg.router_input!r} needs spatial features "
                                 f"(B, {self.cfg.spatial_feat_dim})")
            parts.append(spatial.to(x.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, x: Tensor, meta: Tensor | None = None, spatial: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(logits, gates, dispatch)``: clean logits, gate weights (rows sum to 1) and the 0/1
        dispatch mask used by the balance loss (top-k experts, or the top-1 expert for soft routing)."""
        h = self.inputs(x, meta, spatial)
        logits = self.net(h)
        noisy = logits
        if self.noise is not None and self.training:
            noisy = logits + torch.randn_like(logits) * F.softplus(self.noise(h))
        k = self.cfg.top_k
        if k is None:
            gates = noisy.softmax(dim=-1)
            top = noisy.argmax(dim=-1, keepdim=True)
        else:
            top = noisy.topk(k, dim=-1).indices
            masked = torch.full_like(noisy, float("-inf")).scatter(-1, top, noisy.gather(-1, top))
            gates = masked.softmax(dim=-1)
        dispatch = torch.zeros_like(logits).scatter(-1, top, 1.0)
        return logits, gates, dispatch


# ----------------------------------------------------------------------------------------------------------
# experts


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.init.uniform_(t, -bound, bound)


@EXPERTS.register("linear")
class LinearExperts(nn.Module):
    """E linear heads ``x @ W_e + b_e``, weights ``(E, D, G)``."""

    def __init__(self, n: int, in_dim: int, out_dim: int, **_: object) -> None:
        super().__init__()
        self.weight = nn.Parameter(_uniform_(torch.empty(n, in_dim, out_dim), in_dim))
        self.bias = nn.Parameter(torch.zeros(n, out_dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, D) -> (B, E, G)
        return torch.einsum("bd,edg->beg", x, self.weight) + self.bias

    def one(self, e: int, x: Tensor) -> Tensor:  # expert e on (B, D) -> (B, G)
        return x @ self.weight[e] + self.bias[e]

    @torch.no_grad()
    def init_from(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Start every expert from one linear solution ``weight (D, G)``, ``bias (G,)`` (e.g. a ridge fit)."""
        self.weight.copy_(torch.as_tensor(weight, dtype=self.weight.dtype).expand_as(self.weight))
        self.bias.copy_(torch.as_tensor(0.0 if bias is None else bias, dtype=self.bias.dtype).expand_as(self.bias))


@EXPERTS.register("mlp")
class MLPExperts(nn.Module):
    """E two-layer heads ``GELU(x W1_e + b1_e) W2_e + b2_e`` with dropout on the hidden layer."""

    def __init__(self, n: int, in_dim: int, out_dim: int, *, hidden: int = 128, dropout: float = 0.1, **_: object) -> None:
        super().__init__()
        self.w1 = nn.Parameter(_uniform_(torch.empty(n, in_dim, hidden), in_dim))
        self.b1 = nn.Parameter(torch.zeros(n, hidden))
        self.w2 = nn.Parameter(_uniform_(torch.empty(n, hidden, out_dim), hidden))
        self.b2 = nn.Parameter(torch.zeros(n, out_dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(F.gelu(torch.einsum("bd,edh->beh", x, self.w1) + self.b1))
        return torch.einsum("beh,ehg->beg", h, self.w2) + self.b2

    def one(self, e: int, x: Tensor) -> Tensor:  # expert e on (B, D) -> (B, G)
        return self.drop(F.gelu(x @ self.w1[e] + self.b1[e])) @ self.w2[e] + self.b2[e]


def routed_expert_preds(experts: nn.Module, x: Tensor, active: Tensor, out_dim: int) -> Tensor:
    """``experts(x)`` (B, E, G) computed only where ``active`` (B, E) is True, zeros elsewhere. Under top-k routing
    a spot's gates are zero outside its k experts, so the mixture and its gradients are those of the dense
    computation at about k / E of its cost."""
    spot, expert = active.nonzero(as_tuple=True)
    if len(spot) == 0:
        return x.new_zeros(x.shape[0], active.shape[1], out_dim)
    rows, cols, vals = [], [], []
    for e in torch.unique(expert).tolist():
        mine = spot[expert == e]
        rows.append(mine)
        cols.append(torch.full_like(mine, e))
        vals.append(experts.one(e, x[mine]))
    out = x.new_zeros(x.shape[0], active.shape[1], out_dim)
    return out.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(vals).to(out.dtype))


class RetrievalExpert(nn.Module):
    """BLEEP-style retrieval: the mean target of the k most cosine-similar training spots (no parameters);
    one output per k in ``ks`` (``(B, len(ks), G)``).

    The bank (features, targets, group ids) is set with :meth:`set_bank` and saved in the state dict.
    In training, pass ``query_group`` (e.g. the patient of each spot) so a spot never retrieves spots of its
    own group: the router then sees retrieval as good as it is on unseen patients, not better.
    """

    def __init__(self, in_dim: int, out_dim: int, ks: int | Sequence[int]) -> None:
        super().__init__()
        self.ks = (int(ks),) if isinstance(ks, int) else tuple(int(k) for k in ks)
        self.register_buffer("bank_x", torch.zeros(0, in_dim))
        self.register_buffer("bank_y", torch.zeros(0, out_dim))
        self.register_buffer("bank_group", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bank_mask", torch.zeros(0, out_dim))  #: 1 where a bank target is measured

    @torch.no_grad()
    def set_bank(self, x: Tensor, y: Tensor, group: Tensor | None = None, mask: Tensor | None = None) -> None:
        self.bank_x = F.normalize(x.float(), dim=1)
        self.bank_y = y.float()
        self.bank_group = torch.zeros(len(x), dtype=torch.long) if group is None else torch.as_tensor(group).long()
        self.bank_mask = torch.ones_like(self.bank_y) if mask is None else torch.as_tensor(mask).float()
        self.bank_y = self.bank_y * self.bank_mask
        self.bank_fallback = self.bank_y.sum(0) / self.bank_mask.sum(0).clamp_min(1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # bank size varies between fits
        if prefix + "bank_mask" not in state_dict and prefix + "bank_y" in state_dict:  # saved before masks
            state_dict[prefix + "bank_mask"] = torch.ones_like(state_dict[prefix + "bank_y"])
        for name in ("bank_x", "bank_y", "bank_group", "bank_mask"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.bank_fallback = self.bank_y.sum(0) / self.bank_mask.sum(0).clamp_min(1.0)

    def forward(self, x: Tensor, query_group: Tensor | None = None) -> Tensor:  # (B, D) -> (B, K, G)
        if len(self.bank_x) == 0:
            raise RuntimeError("retrieval expert has an empty bank; call HistoMoE.set_bank(x_train, y_train) first")
        sim = F.normalize(x.float(), dim=1) @ self.bank_x.T
        if query_group is not None:
            sim = sim.masked_fill(query_group.view(-1, 1) == self.bank_group.view(1, -1), float("-inf"))
        kmax = min(max(self.ks), sim.shape[1])
        top = sim.topk(kmax, dim=1)
        valid = torch.isfinite(top.values).to(x.dtype).unsqueeze(-1)  # (B, kmax, 1)
        csum = (self.bank_y[top.indices] * valid).cumsum(1)  # (B, kmax, G); unmeasured bank entries are 0
        cnt = (self.bank_mask[top.indices] * valid).cumsum(1)  # neighbours that measure each gene
        idx = torch.tensor([min(k, kmax) - 1 for k in self.ks], device=x.device)
        c = cnt[:, idx]
        return torch.where(c > 0, csum[:, idx] / c.clamp_min(1.0), self.bank_fallback.to(csum))


# ----------------------------------------------------------------------------------------------------------
# the model


def switch_balance_loss(probs: Tensor, dispatch: Tensor) -> Tensor:
    """``E * sum_e f_e P_e``; ``dispatch`` rows hold k ones (normalised here so ``f`` sums to 1)."""
    e = probs.shape[-1]
    f = (dispatch / dispatch.sum(-1, keepdim=True)).mean(0)
    return e * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class HistoMoE(nn.Module):
    """Mixture of expert heads: ``pred = sum_e gate_e * expert_e(x) [+ shared(x)]``."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_norm = InputNorm(cfg.in_dim, cfg.pca_dim)
        self.spatial_norm = InputNorm(cfg.spatial_dim, cfg.spatial_feat_dim) if cfg.spatial_dim else None
        self.router = Router(cfg)
        self.experts = EXPERTS.create(cfg.expert, n=cfg.n_experts, in_dim=cfg.feat_dim, out_dim=cfg.n_genes,
                                      hidden=cfg.hidden, dropout=cfg.dropout)
        self.input_drop = nn.Dropout(cfg.input_dropout)
        self.retrieval = RetrievalExpert(cfg.feat_dim, cfg.n_genes, cfg.retrieval_ks) if cfg.retrieval_ks else None
        self.shared = None
        if cfg.shared_expert:
            self.shared = EXPERTS.create("mlp" if cfg.shared_hidden else "linear", n=1, in_dim=cfg.feat_dim,
                                         out_dim=cfg.n_genes, hidden=cfg.shared_hidden, dropout=cfg.dropout)
        ctx = cfg.expert_of_context or tuple(c % cfg.n_routed for c in range(max(cfg.n_contexts, 1)))
        self.register_buffer("expert_of_context", torch.tensor(ctx, dtype=torch.long), persistent=False)

    # -- fitting helpers (train data only) --
    @torch.no_grad()
    def fit_input(self, img_emb: Tensor, spatial: Tensor | None = None) -> "HistoMoE":
        """Fit the standardisation (and PCA) buffers on training embeddings (and spatial-context features)."""
        self.input_norm.fit(torch.as_tensor(img_emb))
        if self.spatial_norm is not None:
            if spatial is None:
                raise ValueError(f"this HistoMoE reads {self.cfg.spatial_dim} spatial features; pass them to fit_input")
            self.spatial_norm.fit(torch.as_tensor(spatial))
        return self

    @torch.no_grad()
    def set_bank(self, img_emb: Tensor, targets: Tensor, group: Tensor | None = None,
                 mask: Tensor | None = None) -> "HistoMoE":
        """Give the retrieval expert its training spots (call after :meth:`fit_input`); ``mask`` marks the
        measured entries of ``targets``."""
        if self.retrieval is None:
            raise ValueError("this HistoMoE has no retrieval expert (retrieval_k=0)")
        self.retrieval.set_bank(self.input_norm(torch.as_tensor(img_emb, dtype=torch.float32)),
                                torch.as_tensor(targets), None if group is None else torch.as_tensor(group),
                                None if mask is None else torch.as_tensor(mask))
        return self

    @torch.no_grad()
    def retrieval_outputs(self, img_emb: Tensor, query_group: Tensor | None = None, *, batch_size: int = 1024,
                          features: Tensor | None = None) -> Tensor | None:
        """The retrieval experts' predictions ``(B, K, G)`` (None without them). They depend on no trained
        parameter (fixed input transform, fixed bank), so a trainer computes them once per fit, not every epoch."""
        if self.retrieval is None:
            return None
        x = self.input_norm(img_emb.float()) if features is None else features
        return torch.cat([self.retrieval(x[s : s + batch_size],
                                         None if query_group is None else query_group[s : s + batch_size])
                          for s in range(0, len(x), batch_size)])

    def features(self, img_emb: Tensor) -> Tensor:
        """The fixed input transform (standardise, PCA) the router and experts read."""
        return self.input_norm(img_emb.float())

    # -- forward --
    def forward(self, img_emb: Tensor, meta_emb: Tensor | None = None, context: Tensor | None = None, *,
                query_group: Tensor | None = None, spatial_emb: Tensor | None = None,
                retrieval_preds: Tensor | None = None, features: Tensor | None = None) -> MoEOutput:
        """``img_emb (B, D)``, ``meta_emb (B, M)`` or ``(M,)``, ``context (B,)`` long labels (for the guided
        loss), ``query_group (B,)`` group ids the retrieval expert must not retrieve from (training),
        ``spatial_emb (B, C)`` spatial-context features for a router that reads them, ``retrieval_preds`` the
        retrieval experts' output for these spots and ``features`` their input transform (:meth:`features`) when
        already known: neither depends on a trained parameter, so a trainer computes them once per fit."""
        if img_emb.dim() != 2 or img_emb.shape[1] != self.cfg.in_dim:
            raise ValueError(f"img_emb must be (B, {self.cfg.in_dim}), got {tuple(img_emb.shape)}")
        x = self.input_norm(img_emb.float()) if features is None else features
        spatial = None
        if self.spatial_norm is not None and spatial_emb is not None:
            spatial = self.spatial_norm(spatial_emb.float())
        logits, gates, dispatch = self.router(x, meta_emb, spatial)
        if self.training and self.cfg.top_k is not None and hasattr(self.experts, "one"):  # only the routed experts
            expert_preds = routed_expert_preds(self.experts, self.input_drop(x), dispatch[:, : self.cfg.n_experts] > 0,
                                               self.cfg.n_genes)
        else:
            expert_preds = self.experts(self.input_drop(x))
        if self.retrieval is not None:
            if retrieval_preds is None:
                retrieval_preds = self.retrieval(x, query_group)
            expert_preds = torch.cat([expert_preds, retrieval_preds.to(expert_preds)], dim=1)
        pred = torch.einsum("be,beg->bg", gates, expert_preds)
        shared_pred = None
        if self.shared is not None:
            shared_pred = self.shared(self.input_drop(x))[:, 0]
            pred = pred + shared_pred
        aux: dict[str, Tensor] = {}
        if self.training:
            aux["balance"] = switch_balance_loss(logits.softmax(-1), dispatch)
            aux["z"] = router_z_loss(logits)
            if context is not None:
                target = self.expert_of_context[context.long() % len(self.expert_of_context)]
                aux["guide"] = F.cross_entropy(logits, target)
        return MoEOutput(pred=pred, gates=gates, expert_preds=expert_preds, aux=aux, logits=logits,
                         shared_pred=shared_pred)

    def aux_weights(self) -> dict[str, float]:
        return {"balance": self.cfg.balance_weight, "z": self.cfg.z_weight, "guide": self.cfg.guide_weight}

    def loss(self, out: MoEOutput, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """MSE of the prediction (over the entries ``mask`` marks as measured, when given) plus the auxiliary
        losses weighted by the config; also the parts as floats."""
        if mask is None:
            mse = F.mse_loss(out.pred.float(), target.float())
        else:
            w = mask.float()
            mse = (((out.pred.float() - target.float()) ** 2) * w).sum() / w.sum().clamp_min(1.0)
        total = mse
        parts = {"mse": float(mse.detach())}
        w = self.aux_weights()
        for name, value in out.aux.items():
            parts[name] = float(value.detach())
            if w.get(name, 0.0):
                total = total + w[name] * value
        return total, parts


class HistoMoEEndToEnd(nn.Module):
    """A vision encoder followed by a HistoMoE, trainable end to end (GPU) or used for attributions (Captum).

    ``forward(images NCHW float (already preprocessed), meta_emb, context=None) -> MoEOutput``.
    ``freeze_encoder=True`` keeps the encoder weights fixed (eval mode for its norm layers).
    """

    def __init__(self, encoder: nn.Module, moe: HistoMoE, *, freeze_encoder: bool = False) -> None:
        super().__init__()
        dim = getattr(encoder, "embed_dim", None)
        if dim is not None and dim != moe.cfg.in_dim:
            raise ValueError(f"encoder embed_dim {dim} != MoE in_dim {moe.cfg.in_dim}")
        self.encoder = encoder
        self.moe = moe
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "HistoMoEEndToEnd":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, images: Tensor, meta_emb: Tensor | None = None, context: Tensor | None = None, *,
                query_group: Tensor | None = None) -> MoEOutput:
        return self.moe(self.encoder(images), meta_emb, context, query_group=query_group)


def count_parameters(model: nn.Module, *, trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def build_moe(cfg: MoEConfig | dict, **overrides) -> HistoMoE:
    """``HistoMoE`` from a config or a dict of its fields (with overrides)."""
    if isinstance(cfg, dict):
        cfg = MoEConfig.from_dict({**cfg, **overrides})
    elif overrides:
        cfg = cfg.replace(**overrides)
    return HistoMoE(cfg)


def gate_entropy(gates: Tensor | np.ndarray) -> float:
    """Mean entropy (nats) of gate rows: 0 = one expert per spot, log(E) = uniform."""
    g = torch.as_tensor(gates, dtype=torch.float64).clamp_min(1e-12)
    return float(-(g * g.log()).sum(-1).mean())


__all__: Sequence[str] = [
    "EXPERTS", "ROUTER_READS", "MoEConfig", "MoEOutput", "InputNorm", "Router", "LinearExperts", "MLPExperts", "RetrievalExpert",
    "HistoMoE", "HistoMoEEndToEnd", "switch_balance_loss", "router_z_loss", "count_parameters", "build_moe",
    "gate_entropy",
]
