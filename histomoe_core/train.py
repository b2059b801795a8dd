"""One training loop for every neural model (HistoMoE and the single-MLP baseline).

:func:`fit` trains a model built by ``build(train_part)`` on a :class:`~histomoe_core.features.FoldData`:

1. seed everything (``seed``); hold out each patient of the training fold in turn (sections if it has one
   patient; ``val_folds=1``: one patient drawn by seed) and train one model per held-out patient in lockstep
   with AdamW, early stopping on the mean validation HEST metric (pooled Pearson, or the loss); for models
   started from a ridge fit the untrained start (epoch 0) is a candidate too. Averaging over
   held-out patients matters on small cohorts, where one patient can be unpredictable (her2st patient A);
2. with ``refit=True`` (default) rebuild the model on every training spot and train it for the best epoch count,
   so no training patient is wasted on validation.

AMP (bfloat16 autocast) is used on CUDA. Checkpoints (``checkpoint_dir``) hold the model, optimizer, RNG state
and history every ``ckpt_every`` epochs; a later call with the same directory resumes where it stopped.
Under ``torchrun`` (``WORLD_SIZE > 1``) each rank trains on its share of every batch in DistributedDataParallel;
all ranks see the same batches order and validation data, so they stop at the same epoch.

:class:`MoERegressor` wraps this into the ``fit / predict`` estimator the benchmark uses, with the MoE ideas
that matter on small data: start from the ridge solution (``init="ridge"``), retrieval as an expert
(``retrieval_k``), a shared expert, and the patient of each spot as the retrieval exclusion group.

``python -m histomoe_core.train --data arrays.npz --config moe.json --out metrics.json`` trains on arrays
(works under torchrun; used by the DDP test).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from histomoe_core.evaluate import hest_metric
from histomoe_core.features import FoldData, group_folds, inner_split
from histomoe_core.moe import ROUTER_READS, HistoMoE, MoEConfig, MoEOutput


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 150  #: maximum epochs
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 15  #: epochs without validation improvement before stopping
    min_epochs: int = 5
    monitor: str = "pearson"  #: "pearson" (HEST metric on validation) or "loss"
    val_folds: int = 0  #: 0: every training patient is the validation split once (lockstep); 1: one patient
    refit: bool = True  #: retrain on all training spots for the best epoch count
    grad_clip: float = 1.0
    amp: bool = True  #: bfloat16 autocast on CUDA (ignored on CPU)
    device: str | None = None  #: None: cuda if available, else cpu
    ckpt_every: int = 10  #: epochs between checkpoints (when a checkpoint_dir is given)
    cpu_threads: int | None = 1  #: torch threads while training on CPU (small heads: 1 avoids oversubscription)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown TrainConfig fields {sorted(set(d) - known)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# distributed helpers


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when ``WORLD_SIZE > 1``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return dist_info()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device(f"cuda:{rank}")
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# the loop


def _tensors(data: FoldData, device: torch.device, group_by: str = "patient") -> dict[str, torch.Tensor]:
    t = {
        "x": torch.as_tensor(data.x, dtype=torch.float32, device=device),
        "y": torch.as_tensor(data.y, dtype=torch.float32, device=device),
        "context": torch.as_tensor(data.context, dtype=torch.long, device=device),
        "group": torch.as_tensor(data.groups(group_by), dtype=torch.long, device=device),
    }
    t["meta"] = torch.as_tensor(data.meta, dtype=torch.float32, device=device) if data.meta.shape[1] else None
    t["mask"] = None if data.mask is None else torch.as_tensor(data.mask, dtype=torch.bool, device=device)
    t["spatial"] = None if data.spatial is None else torch.as_tensor(data.spatial, dtype=torch.float32, device=device)
    return t


def forward(model: nn.Module, t: dict[str, torch.Tensor], idx: torch.Tensor | slice, *, exclude_group: bool) -> MoEOutput:
    meta = None if t["meta"] is None else t["meta"][idx]
    group = t["group"][idx] if exclude_group else None
    spatial = None if t.get("spatial") is None else t["spatial"][idx]
    known = t.get("retrieval_train" if exclude_group else "retrieval")
    feats = t.get("features")
    return model(t["x"][idx], meta, t["context"][idx], query_group=group, spatial_emb=spatial,
                 retrieval_preds=None if known is None else known[idx], features=None if feats is None else feats[idx])


@torch.no_grad()
def with_fixed_inputs(model: nn.Module, t: dict[str, torch.Tensor], *, train: bool) -> dict[str, torch.Tensor]:
    """``t`` plus what the model computes from its spots without trained parameters: the input transform and the
    retrieval experts' output (training: own group excluded), so an epoch reuses them instead of recomputing."""
    if not hasattr(model, "features"):
        return t
    out = {**t, "features": model.features(t["x"])}
    if getattr(model, "retrieval", None) is not None:
        out["retrieval_train" if train else "retrieval"] = model.retrieval_outputs(
            t["x"], t["group"] if train else None, features=out["features"])
    return out


@torch.no_grad()
def predict_arrays(model: nn.Module, data: FoldData, *, batch_size: int = 1024, device: torch.device | None = None,
                   tensors: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Eval-mode prediction: ``pred``, ``gates`` and ``expert_preds`` as numpy arrays."""
    base = model.module if hasattr(model, "module") else model
    device = device or next(iter(base.buffers())).device
    base.eval()
    t = _tensors(data, device) if tensors is None else tensors
    outs = {"pred": [], "gates": [], "expert_preds": []}
    for s in range(0, len(data), batch_size):
        o = forward(base, t, slice(s, s + batch_size), exclude_group=False)
        for k in outs:
            outs[k].append(getattr(o, k).float().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outs.items()}


def _score(model: nn.Module, data: FoldData, monitor: str, device: torch.device,
           tensors: dict[str, torch.Tensor] | None = None) -> float:
    p = predict_arrays(model, data, device=device, tensors=tensors)["pred"]
    if monitor == "loss":
        w = np.ones(p.shape) if data.mask is None else data.mask
        return -float((((p - data.y) ** 2) * w).sum() / max(w.sum(), 1))
    return hest_metric(data.y, p, data.mask, data.scoring_context())


def _ckpt_path(checkpoint_dir: Path | None, phase: str) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"{phase}.pt"


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class _Run:
    """One model with its optimizer and tensors, trained in lockstep with the others of an inner CV."""

    def __init__(self, build: Callable[[FoldData], nn.Module], train: FoldData, val: FoldData | None,
                 cfg: TrainConfig, device: torch.device, world: int) -> None:
        self.model = build(train).to(device)
        self.net = (nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
                    if world > 1 else self.model)
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 else decay).append(p)
        # the fused kernel: one pass over all parameters (on CPU ~8x faster a step than the per-tensor loop)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                     fused=device.type in ("cpu", "cuda"))
        # the retrieval expert skips bank spots of the query's own group (patient by default) in training
        self.t = with_fixed_inputs(self.model, _tensors(train, device, getattr(self.model, "group_by", "patient")),
                                train=True)
        self.n, self.val = len(train), val
        # scored every epoch: built once
        self.tv = None if val is None else with_fixed_inputs(self.model, _tensors(val, device), train=False)

    def epoch(self, cfg: TrainConfig, seed: int, epoch: int, rank: int, world: int, amp: bool, device: torch.device) -> dict:
        self.model.train()
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        sums: dict[str, float] = {}
        for s in range(0, self.n, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            if len(idx) < 2 * world:
                continue
            mine = idx[rank::world].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out = forward(self.net, self.t, mine, exclude_group=True)
                mask = None if self.t["mask"] is None else self.t["mask"][mine]
                loss, parts = self.model.loss(out, self.t["y"][mine], mask)
            if world > 1:  # DDP averages gradients over ranks: weight shards so the result is the global batch mean
                loss = loss * (len(mine) * world / len(idx))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx) / self.n
        return sums


def train_epochs(build: Callable[[FoldData], nn.Module], parts: list[tuple[FoldData, FoldData | None]],
                 cfg: TrainConfig, *, seed: int, epochs: int, checkpoint: Path | None = None,
                 callback: Callable[[int, dict], None] | None = None) -> tuple[list[nn.Module], int, list[dict]]:
    """Train one model per ``(train, val)`` pair in lockstep for up to ``epochs`` epochs.

    With validation data, stop when the mean validation score over the pairs has not improved for
    ``cfg.patience`` epochs and return the models at the best epoch. Returns ``(models, best_epoch, history)``.
    """
    rank, world = dist_info()
    device = pick_device(cfg)
    seed_everything(seed)
    runs = [_Run(build, tr, va, cfg, device, world) for tr, va in parts]
    has_val = all(va is not None for _, va in parts)
    amp = cfg.amp and device.type == "cuda"
    start, best, best_epoch, bad, history, best_states = 0, -np.inf, epochs, 0, [], None
    if checkpoint is not None and checkpoint.exists():
        st = torch.load(checkpoint, map_location=device, weights_only=False)
        for r, ms, os_ in zip(runs, st["models"], st["opts"]):
            r.model.load_state_dict(ms)
            r.opt.load_state_dict(os_)
        torch.set_rng_state(st["rng"])
        start, best, best_epoch, bad, history, best_states = (st["epoch"], st["best"], st["best_epoch"], st["bad"],
                                                              st["history"], st["best_states"])
    if has_val and start == 0 and getattr(runs[0].model, "anchored", False):
        # a model built from a fitted solution (ridge start): the untrained starting point competes too
        best = float(np.mean([_score(r.model, r.val, cfg.monitor, device, r.tv) for r in runs]))
        best_epoch, best_states = 0, [copy.deepcopy(r.model.state_dict()) for r in runs]
        history.append({"epoch": 0, "val": best})
    for epoch in range(start, epochs):
        sums = [r.epoch(cfg, seed, epoch, rank, world, amp, device) for r in runs]
        logs = {"epoch": epoch + 1, **{f"train_{k}": float(np.mean([s.get(k, np.nan) for s in sums])) for k in sums[0]}}
        if has_val:
            scores = [_score(r.model, r.val, cfg.monitor, device, r.tv) for r in runs]
            logs["val"] = score = float(np.mean(scores))
            if len(scores) > 1:
                logs["val_folds"] = scores
            if score > best + 1e-5:
                best, best_epoch, bad = score, epoch + 1, 0
                best_states = [copy.deepcopy(r.model.state_dict()) for r in runs]
            else:
                bad += 1
        history.append(logs)
        if callback is not None:
            callback(epoch + 1, logs)
        stop = has_val and bad >= cfg.patience and epoch + 1 >= cfg.min_epochs
        if checkpoint is not None and rank == 0 and ((epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == epochs or stop):
            _save(checkpoint, {"models": [r.model.state_dict() for r in runs], "opts": [r.opt.state_dict() for r in runs],
                               "rng": torch.get_rng_state(), "epoch": epoch + 1, "best": best,
                               "best_epoch": best_epoch, "bad": bad, "history": history, "best_states": best_states})
        if stop:
            break
    if best_states is not None:
        for r, st in zip(runs, best_states):
            r.model.load_state_dict(st)
    return [r.model for r in runs], (best_epoch if has_val else epochs), history


def validation_parts(train: FoldData, cfg: TrainConfig, seed: int) -> list[tuple[FoldData, FoldData]]:
    """Patient-grouped inner splits: every patient held out in turn (``val_folds=0``, at most 5 folds), or
    one held-out patient drawn with ``seed`` (``val_folds=1``)."""
    if cfg.val_folds == 1:
        tr, va = inner_split(train, seed=seed)
        return [(train.take(tr), train.take(va))]
    return [(train.take(tr), train.take(va)) for tr, va in group_folds(train, max_folds=5)]


def fit(build: Callable[[FoldData], nn.Module], train: FoldData, cfg: TrainConfig | dict | None = None, *, seed: int = 0,
        checkpoint_dir: Path | None = None, callback: Callable[[int, dict], None] | None = None) -> FitResult:
    """Early stopping on patient-grouped inner validation, then (``cfg.refit``) retraining on all of ``train``
    for the selected number of epochs. Without refit the first inner model at its best epoch is returned."""
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    with cpu_threads(cfg.cpu_threads if pick_device(cfg).type == "cpu" else None):
        return _fit(build, train, cfg, seed=seed, checkpoint_dir=checkpoint_dir, callback=callback)


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` torch threads (None: leave as is)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _fit(build, train: FoldData, cfg: TrainConfig, *, seed: int, checkpoint_dir, callback) -> FitResult:
    models, best_epoch, history = train_epochs(build, validation_parts(train, cfg, seed), cfg, seed=seed,
                                               epochs=cfg.epochs, checkpoint=_ckpt_path(checkpoint_dir, "select"),
                                               callback=callback)
    if not cfg.refit:
        return FitResult(models[0], best_epoch, history)
    final, _, refit_hist = train_epochs(build, [(train, None)], cfg, seed=seed, epochs=best_epoch,
                                        checkpoint=_ckpt_path(checkpoint_dir, "refit"), callback=callback)
    return FitResult(final[0], best_epoch, history + [{"refit_epochs": best_epoch}] + refit_hist)


# ----------------------------------------------------------------------------------------------------------
# the estimator


def _ridge_solution(model: HistoMoE, data: FoldData, alpha: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge on the model's input features (alpha by patient-grouped inner CV unless given)."""
    from histomoe_core.baselines import RidgeCV

    with torch.no_grad():
        z = model.features(torch.as_tensor(data.x, dtype=torch.float32)).double().numpy()
    try:
        ridge = RidgeCV(alpha=alpha).fit(data, z=z)
    except ValueError:  # a single section: no grouped CV possible
        ridge = RidgeCV(alpha=1e3).fit(data, z=z)
    return ridge.coef, ridge.intercept, float(ridge.alpha)


class MoERegressor:
    """HistoMoE (or a single MLP when ``n_experts=1``) as a ``fit / predict`` estimator on :class:`FoldData`.

    Keyword arguments are :class:`~histomoe_core.moe.MoEConfig` fields (dimensions are taken from the data),
    plus:

    - ``train``: :class:`TrainConfig` fields;
    - ``init``: ``None`` or ``"ridge"``: linear experts (and the linear shared expert) start from the ridge
      solution on the model's features, MLP experts' output layers start at zero, so training starts at the
      ridge prediction and learns corrections;
    - ``freeze_init``: keep the ridge-initialised shared expert (or linear experts) fixed: only the router
      (and any other experts) train;
    - ``ridge_alpha``: fixed alpha for the ridge initialisation (default: inner CV);
    - ``retrieval_exclude``: in training, the retrieval expert ignores bank spots of the query's own
      ``"patient"`` (default) or ``"sample"`` (section).
    """


    def __init__(self, *, name: str = "histomoe", train: dict | TrainConfig | None = None, init: str | None = None,
                 freeze_init: bool = False, ridge_alpha: float | None = None, retrieval_exclude: str = "patient",
                 **moe: Any) -> None:
        if retrieval_exclude not in ("patient", "sample"):
            raise ValueError(f"retrieval_exclude must be 'patient' or 'sample', got {retrieval_exclude!r}")
        self.retrieval_exclude = retrieval_exclude
        if init not in (None, "ridge"):
            raise ValueError(f"init must be None or 'ridge', got {init!r}")
        self.name = name
        self.train_cfg = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(train)
        self.init, self.freeze_init, self.ridge_alpha = init, freeze_init, ridge_alpha
        self.moe_kw = moe

    def config_for(self, data: FoldData) -> MoEConfig:
        kw = dict(self.moe_kw)
        if kw.get("n_experts") == "contexts":  # one expert per context of the dataset
            kw["n_experts"] = max(len(data.contexts), 1)
        if kw.get("pca_dim"):
            kw["pca_dim"] = int(min(kw["pca_dim"], len(data) - 1, data.x.shape[1]))
        # router-only spatial context joins the config only when the router reads it
        reads_spatial = "spatial" in ROUTER_READS.get(kw.get("router_input", "image"), ())
        spatial_dim = data.spatial.shape[1] if reads_spatial and data.spatial is not None else 0
        return MoEConfig(in_dim=data.x.shape[1], n_genes=data.y.shape[1], meta_dim=data.meta.shape[1],
                         spatial_dim=spatial_dim, n_contexts=max(len(data.contexts), 1), **kw)

    def build(self, data: FoldData) -> HistoMoE:
        """A fresh model prepared on ``data`` (input statistics, retrieval bank, ridge start)."""
        model = HistoMoE(self.config_for(data))
        model.fit_input(torch.as_tensor(data.x),
                        None if model.spatial_norm is None else torch.as_tensor(data.spatial))
        if model.retrieval is not None:
            model.set_bank(torch.as_tensor(data.x), torch.as_tensor(data.y), torch.as_tensor(data.groups(self.retrieval_exclude)),
                           None if data.mask is None else torch.as_tensor(data.mask))
            model.group_by = self.retrieval_exclude
        # every head starts at the mean training target (the offsets need not be learned first)
        start_at_mean(model, target_mean(data))
        if self.init == "ridge":
            model.anchored = True  # early stopping may keep the untrained (ridge) start
            w, b, self.alpha_ = _ridge_solution(model, data, self.ridge_alpha)
            w, b = torch.as_tensor(w, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
            with torch.no_grad():
                if model.shared is not None and hasattr(model.shared, "init_from"):
                    model.shared.init_from(w, b)
                    if self.freeze_init:
                        for p in model.shared.parameters():
                            p.requires_grad_(False)
                    # routed experts learn corrections: start them at zero output
                    zero_out(model.experts)
                elif hasattr(model.experts, "init_from"):
                    model.experts.init_from(w, b)
                    if self.freeze_init:
                        for p in model.experts.parameters():
                            p.requires_grad_(False)
                else:
                    zero_out(model.experts)
        return model

    def fit(self, data: FoldData, *, seed: int = 0, checkpoint_dir: Path | None = None) -> "MoERegressor":
        res = fit(self.build, data, self.train_cfg, seed=seed, checkpoint_dir=checkpoint_dir)
        self.model, self.best_epoch, self.history = res.model.cpu().eval(), res.best_epoch, res.history
        return self

    def predict_full(self, data: FoldData) -> dict[str, np.ndarray]:
        return predict_arrays(self.model, data, device=torch.device("cpu"))

    def predict(self, data: FoldData) -> np.ndarray:
        return self.predict_full(data)["pred"].astype(np.float32)

    def info(self) -> dict:
        out = {"best_epoch": self.best_epoch, "n_params": sum(p.numel() for p in self.model.parameters())}
        if getattr(self, "alpha_", None) is not None:
            out["ridge_alpha"] = self.alpha_
        return out


def target_mean(data: FoldData) -> np.ndarray:
    """Mean training target per gene (over measured entries when the data carry a mask)."""
    if data.mask is None:
        return data.y.mean(0)
    return (data.y * data.mask).sum(0) / np.maximum(data.mask.sum(0), 1)


@torch.no_grad()
def start_at_mean(model: HistoMoE, mean: np.ndarray) -> None:
    """Output biases of the routed experts := ``mean`` (the shared expert, if any, keeps a zero bias)."""
    bias = model.experts.b2 if hasattr(model.experts, "b2") else model.experts.bias
    bias.copy_(torch.as_tensor(mean, dtype=bias.dtype).expand_as(bias))


@torch.no_grad()
def zero_out(experts: nn.Module) -> None:
    """Make experts output zero: last-layer weights and biases to 0 (linear experts: all weights)."""
    for name in ("w2", "b2", "weight", "bias"):
        if hasattr(experts, name):
            getattr(experts, name).zero_()


# ----------------------------------------------------------------------------------------------------------
# command line entry for array data (torchrun-friendly)


def _arrays_from_npz(path: Path, prefix: str) -> FoldData:
    z = np.load(path, allow_pickle=False)
    n = len(z[f"{prefix}_x"])
    meta = z[f"{prefix}_meta"] if f"{prefix}_meta" in z else np.zeros((n, 0), np.float32)
    ctx = z[f"{prefix}_context"] if f"{prefix}_context" in z else np.zeros(n, np.int64)
    return FoldData(z[f"{prefix}_x"].astype(np.float32), meta.astype(np.float32), ctx.astype(np.int64),
                    z[f"{prefix}_y"].astype(np.float32), z[f"{prefix}_sample"].astype(str), z[f"{prefix}_patient"].astype(str),
                    np.arange(n).astype(str), tuple(f"g{i}" for i in range(z[f"{prefix}_y"].shape[1])),
                    tuple(f"c{i}" for i in range(int(ctx.max()) + 1 if n else 1)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train a HistoMoE on arrays (train_* / test_* in an .npz); torchrun-ready")
    ap.add_argument("--data", required=True, type=Path, help="npz with train_x, train_y, train_sample, train_patient, "
                    "[train_meta, train_context] and the same for test_")
    ap.add_argument("--config", type=Path, help="JSON of MoERegressor keyword arguments")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="metrics JSON (written by rank 0)")
    args = ap.parse_args(argv)
    rank, world = init_distributed()
    kw = json.loads(args.config.read_text()) if args.config else {}
    train, test = _arrays_from_npz(args.data, "train"), _arrays_from_npz(args.data, "test")
    est = MoERegressor(**kw).fit(train, seed=args.seed)
    if rank == 0:
        from histomoe_core.evaluate import score

        metrics, _, _ = score(test.y, est.predict(test), test.sample, test.genes)
        args.out.write_text(json.dumps({**metrics, "best_epoch": est.best_epoch, "world_size": world}))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
