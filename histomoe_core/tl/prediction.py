"""``tl.predict``: run a trained HistoMoE on the spots of an AnnData and store the results in named slots."""
from __future__ import annotations

from typing import Sequence

import anndata as ad
import numpy as np
import torch

from histomoe_core.tl.slots import write_results


def model_expert_names(model) -> list[str]:
    """``e0 .. e{n-1}`` for the learned experts, then ``knn<k>`` for each retrieval expert (mean of the k nearest
    training spots), in the model's gate order."""
    moe = getattr(model, "moe", model)
    names = [f"e{i}" for i in range(moe.cfg.n_experts)]
    return names + [f"knn{k}" for k in getattr(moe.cfg, "retrieval_ks", ())]


def _rows(x: np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    if x is None:
        return None
    x = np.asarray(x)
    if x.ndim == 1 and what == "meta":
        return np.broadcast_to(x, (n, len(x)))
    if x.shape[0] != n:
        raise ValueError(f"{what} has {x.shape[0]} rows for {n} spots")
    return x


@torch.no_grad()
def predict(
    adata: ad.AnnData,
    model: torch.nn.Module,
    *,
    genes: Sequence[str],
    use_rep: str = "X_embedding",
    meta: np.ndarray | str | None = None,
    context: np.ndarray | None = None,
    key_added: str = "histomoe",
    store_experts: bool = True,
    batch_size: int = 1024,
    copy: bool = False,
) -> ad.AnnData | None:
    """Predict expression of ``genes`` for every spot from its image embedding ``adata.obsm[use_rep]``.

    ``model`` is a :class:`~histomoe_core.moe.HistoMoE`; ``meta`` the metadata embedding (one vector for all spots,
    one row per spot, or the ``obsm`` key holding the rows) when its router reads metadata; ``genes`` the
    model's panel, in output order.
    Writes ``layers[key_added]`` (NaN outside the panel), ``obsm[key_added + "_gates"]``,
    ``obsm[key_added + "_experts"]`` (when ``store_experts``), ``obs[key_added + "_expert"]``,
    ``obs[key_added + "_gate_entropy"]`` and ``uns[key_added]`` (experts, genes, params), see
    :mod:`histomoe_core.tl.slots`. Returns a copy when ``copy``, else None.
    """
    if use_rep not in adata.obsm:
        raise KeyError(f"adata.obsm has no {use_rep!r}; store the image embeddings there "
                       "(e.g. adata.obsm['X_embedding'] = embed_samples(...)[sample_id]) or pass use_rep=")
    cfg = model.cfg
    if len(genes) != cfg.n_genes:
        raise ValueError(f"{len(genes)} genes given but the model predicts {cfg.n_genes}")
    adata = adata.copy() if copy else adata
    if isinstance(meta, str):
        if meta not in adata.obsm:
            raise KeyError(f"adata.obsm has no {meta!r} (metadata embeddings)")
        meta = np.asarray(adata.obsm[meta])
    x = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    meta_rows, ctx = _rows(meta, adata.n_obs, "meta"), _rows(context, adata.n_obs, "context")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = {"pred": [], "gates": [], "expert_preds": []}
    for s in range(0, adata.n_obs, batch_size):
        sl = slice(s, s + batch_size)
        m = None if meta_rows is None else torch.as_tensor(np.asarray(meta_rows[sl], np.float32), device=device)
        c = None if ctx is None else torch.as_tensor(ctx[sl], device=device).long()
        out = model(torch.as_tensor(x[sl], device=device), m, c)
        for k in outs:
            outs[k].append(getattr(out, k).float().cpu().numpy())
    model.train(was_training)
    res = {k: np.concatenate(v) for k, v in outs.items()}
    params = {"use_rep": use_rep, "meta": meta is not None, "context": context is not None,
              "model_config": cfg.as_dict() if hasattr(cfg, "as_dict") else {}}
    write_results(adata, res["pred"], res["gates"], genes=genes,
                  expert_preds=res["expert_preds"] if store_experts else None, key_added=key_added,
                  experts=model_expert_names(model), params=params)
    return adata if copy else None
