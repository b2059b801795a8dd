"""Looking at embeddings: encoder cards, throughput, a UMAP of spots, and encoders compared on one downstream head.

- :func:`encoder_table`: name, dimension, pretrained or not, weights id, parameter count, source of each encoder.
- :func:`throughput`: the encoder's forward ceiling on in-memory patches (before and after) vs the full pipeline
  (image file to cache) on one section, in one run on the same machine.
- :func:`embedding_adata` + :func:`umap` (scanpy-style: AnnData first, results in ``obsm["X_umap"]``, params in
  ``uns["embedding_umap"]``) and :func:`section_mixing` (how much spots of different sections mix).
- :func:`compare_encoders`: every encoder's embeddings through the same head (``ridge_cv`` from
  :mod:`histomoe_core.baselines`: standardise, PCA, ridge with alpha by patient-grouped inner CV), on
  leave-one-patient-out folds with the gene panel chosen on each training fold only.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import Iterator, Mapping, NamedTuple, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from histomoe_core.data.patches import PatchSpec, iter_patches
from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.encoders import RandomInitWarning, VisionEncoder, create_encoder
from histomoe_core.paths import environ


# ------------------------------------------------------------------------------------------------ encoders
def _quiet_create(name: str) -> VisionEncoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)  # the table says "random init" instead
        return create_encoder(name)


def encoder_table(names: Sequence[str]) -> pd.DataFrame:
    """One row per encoder: embedding dim, pretrained, weights id, parameters (millions), where weights come from."""
    rows = []
    for n in names:
        e = _quiet_create(n)
        rows.append({"encoder": n, "embed_dim": e.embed_dim, "weights": "pretrained" if e.pretrained else "random init",
                     "weights_id": e.weights_id, "params_M": round(sum(p.numel() for p in e.parameters()) / 1e6, 2),
                     "source": e.source})
    return pd.DataFrame(rows).set_index("encoder")


# ------------------------------------------------------------------------------------------------ speed
@contextmanager
def temporary_cache() -> Iterator[str]:
    """Point ``HISTOMOE_CACHE_DIR`` at a fresh temporary folder for the duration (cold-cache timings)."""
    with tempfile.TemporaryDirectory(prefix="histomoe-cold-") as tmp, environ(HISTOMOE_CACHE_DIR=tmp):
        yield tmp


class Ceiling(NamedTuple):
    rate: float  #: patches/s
    n: int  #: patches timed
    wall_s: float
    cpu_s: float  #: CPU time of the process (all threads) during the timed part


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system), in seconds."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def forward_ceiling(encoder: VisionEncoder, samples: Sequence[Sample], *, spec: PatchSpec = PatchSpec(),
                    batch_size: int = 64, n_patches: int = 256, device: torch.device | str | None = None) -> Ceiling:
    """Throughput of the forward pass alone on real patches already decoded and normalised in memory
    (after a warm-up batch), with the same precision, memory format, CPU threads and allocator setting as the
    pipeline."""
    from histomoe_core.embed import embed_threads, fixed_threads, malloc_for_inference, precision_for, resolve_device

    dev = resolve_device(device)
    enc = encoder.to(dev).eval().to(memory_format=torch.channels_last)
    batches, n = [], 0
    for s in samples:
        for _, p in iter_patches(s, spec, batch_size=batch_size):
            batches.append(enc.preprocess(p).to(dev))
            n += len(p)
            if n >= n_patches:
                break
        if n >= n_patches:
            break
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision_for(dev) == "bf16")
    with torch.inference_mode(), autocast, malloc_for_inference(), fixed_threads(embed_threads(dev)):
        enc(batches[0])  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0, c0 = time.perf_counter(), cpu_seconds()
        for x in batches:
            enc(x).float().cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
    return Ceiling(n / dt, n, dt, dc)


def throughput(samples: SampleSet | Sequence[Sample], encoder: str | VisionEncoder, *, section: str | None = None,
               n_patches: int = 256, batch_size: int = 64, device: str | None = None) -> pd.Series:
    """Ceiling (forward on in-memory patches) and pipeline (image file -> cold cache) patches/s on one section.

    ``section=None`` takes the section with the largest image file. The ceiling is measured just before and
    just after the pipeline and averaged (as ``benchmarks/bench_embed.py`` does over a whole dataset); the
    first measurement also warms the encoder up, so the pipeline does not pay its first-call cost alone.
    """
    from histomoe_core.embed import embed_threads, resolve_device, run_embedding

    samples = list(samples)
    if section is None:
        def size(s: Sample) -> int:
            path = s.image_path if s.image_path is not None else s.patches_path
            return path.stat().st_size if path is not None else 0

        one = max(samples, key=size)
    else:
        one = next(s for s in samples if s.sample_id == section)
    enc = _quiet_create(encoder) if isinstance(encoder, str) else encoder
    dev = resolve_device(device)
    before = forward_ceiling(enc, [one], batch_size=batch_size, n_patches=n_patches, device=dev).rate
    with temporary_cache():
        t0 = time.perf_counter()
        _, stats = run_embedding([one], enc, batch_size=batch_size, device=dev, progress=False)
        wall = time.perf_counter() - t0
    after = forward_ceiling(enc, [one], batch_size=batch_size, n_patches=n_patches, device=dev).rate
    ceil, pipe = (before + after) / 2, stats.n_patches / wall
    return pd.Series({"section": one.sample_id, "device": str(dev), "threads": embed_threads(dev) or torch.get_num_threads(),
                      "ceiling_patches_per_s": ceil, "pipeline_patches_per_s": pipe, "ratio": pipe / ceil,
                      "pipeline_patches": stats.n_patches, "pipeline_seconds": wall}, name=enc.name)


# ------------------------------------------------------------------------------------------------ UMAP
def embedding_adata(samples: SampleSet | Sequence[Sample], emb: Mapping[str, np.ndarray], *,
                    genes: Sequence[str] = (), kind: str = "log1p_norm") -> ad.AnnData:
    """Spots x embedding dims AnnData; ``obs`` holds section, patient and the targets of ``genes``."""
    from histomoe_core.data.targets import make_targets

    xs, obs = [], []
    for s in samples:
        x = np.asarray(emb[s.sample_id], np.float32)
        ok = np.isfinite(x).all(axis=1)
        frame = pd.DataFrame({"section": s.sample_id, "patient": s.patient}, index=s.adata.obs_names + f"@{s.sample_id}")
        present = [g for g in genes if g in s.adata.var_names]
        if present:
            frame[present] = make_targets(s.adata, present, kind=kind)
        xs.append(x[ok])
        obs.append(frame[ok])
    frame = pd.concat(obs)
    for c in ("section", "patient"):
        frame[c] = pd.Categorical(frame[c])
    out = ad.AnnData(X=np.concatenate(xs), obs=frame)
    out.obsm["X_emb"] = out.X.copy()
    out.uns["embedding_targets"] = {"genes": list(genes), "kind": kind}
    return out


def umap(adata: ad.AnnData, *, n_pcs: int = 50, n_neighbors: int = 15, seed: int = 0) -> ad.AnnData:
    """Standardise, PCA, kNN graph and UMAP with scanpy; fills ``obsm["X_pca"]``, ``obsm["X_umap"]``."""
    import scanpy as sc

    x = adata.obsm["X_emb"]
    z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    adata.X = z.astype(np.float32)
    n_pcs = int(min(n_pcs, min(z.shape) - 1))  # PCA needs fewer components than min(n_spots, dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy sparse-efficiency and numba notices from the kNN graph
        sc.pp.pca(adata, n_comps=n_pcs, random_state=seed)
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, n_pcs=n_pcs, random_state=seed)
        sc.tl.umap(adata, random_state=seed)
    adata.uns["embedding_umap"] = {"n_pcs": n_pcs, "n_neighbors": n_neighbors, "seed": seed, "standardised": True}
    return adata


def section_mixing(adata: ad.AnnData, *, key: str = "section", n_neighbors: int = 15) -> pd.Series:
    """Per group: the share of each spot's nearest neighbours (PCA space) from the same group, and what that
    share would be by chance (the group's share of all spots). Near 1 = the embedding separates the groups."""
    from sklearn.neighbors import NearestNeighbors

    z = adata.obsm["X_pca"] if "X_pca" in adata.obsm else adata.obsm["X_emb"]
    labels = adata.obs[key].astype(str).to_numpy()
    idx = NearestNeighbors(n_neighbors=n_neighbors + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    same = (labels[idx] == labels[:, None]).mean(1)
    table = pd.DataFrame({"same": same, key: labels}).groupby(key)["same"].mean().to_frame("same_neighbours")
    table["chance"] = pd.Series(labels).value_counts(normalize=True).reindex(table.index)
    return table


# ------------------------------------------------------------------------------------------------ downstream
def compare_encoders(samples: SampleSet, encoders: Sequence[str], *, n_genes: int = 50, min_frac: float = 0.1,
                     panel_rule: str = "hest", kinds: Sequence[str] = ("log1p_norm", "log1p"), scheme: str = "lopo", head: str = "ridge_cv",
                     spec: PatchSpec = PatchSpec(), batch_size: int = 64, device: str | None = None,
                     seed: int = 0, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every encoder's (cached) embeddings through the same head on patient-grouped folds.

    Per fold, the gene panel is chosen on the training sections only (:func:`select_panel` with ``panel_rule``),
    the head is fit on the training spots (raw targets: no section centring) and scored on the test patient.
    Returns ``(results, per_gene)``: one row per encoder x target kind x fold (HEST ``pearson``,
    ``pearson_section``, ``mse``), and per gene the pooled Pearson r.
    """
    from histomoe_core.baselines import GridEdgeWarning, create_baseline
    from histomoe_core.data.genes import select_panel
    from histomoe_core.data.splits import make_folds
    from histomoe_core.embed import run_embedding
    from histomoe_core.evaluate import score
    from histomoe_core.features import fold_arrays, spot_table

    folds = make_folds(samples, scheme)
    rows, genes_rows = [], []
    for name in encoders:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomInitWarning)
            emb, stats = run_embedding(samples, name, spec=spec, batch_size=batch_size, device=device,
                                       progress=progress)
        table = spot_table(samples, emb)
        pretrained = stats.pretrained
        for kind in kinds:
            for fold in folds:
                panel = select_panel([samples[i] for i in fold.train], n_genes=n_genes, min_frac=min_frac,
                                     rule=panel_rule, kind=kind)
                genes = list(panel.index)
                train, test = fold_arrays(table, samples, fold, genes=genes, kind=kind)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", GridEdgeWarning)
                    pred = create_baseline(head).fit(train, seed=seed).predict(test)
                metrics, per_gene, _ = score(test.y, pred, test.sample, genes)
                rows.append({"encoder": name, "pretrained": pretrained, "target": kind, "fold": fold.name, **metrics,
                             "grid_edge": any(issubclass(w.category, GridEdgeWarning) for w in caught)})
                genes_rows.append(per_gene.assign(encoder=name, target=kind, fold=fold.name).reset_index())
    return pd.DataFrame(rows), pd.concat(genes_rows, ignore_index=True)


def comparison_summary(results: pd.DataFrame, *, metric: str = "pearson") -> pd.DataFrame:
    """Mean and sd over folds (ddof = 0, as HEST-Bench) of ``metric`` per target kind and encoder."""
    g = results.groupby(["target", "encoder"], sort=False)[metric]
    out = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=0), "folds": g.size()})
    return out


def metadata_table(texts: Mapping[str, str], emb: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Distinct metadata sentences, the sections that have each, and their pairwise cosine similarity."""
    uniq = list(dict.fromkeys(texts.values()))
    vecs = np.stack([np.asarray(emb[next(k for k, t in texts.items() if t == u)], np.float64) for u in uniq])
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    table = pd.DataFrame(vecs @ vecs.T, index=uniq, columns=[f"cos #{i + 1}" for i in range(len(uniq))]).round(3)
    table.insert(0, "sections", [", ".join(k for k, t in texts.items() if t == u) for u in uniq])
    table.index.name = "metadata sentence"
    return table


def reference_vs_others(results: pd.DataFrame, reference: str, *, metric: str = "pearson") -> pd.DataFrame:
    """Per target kind: the ``reference`` encoder's mean ``metric`` against the best of the other encoders, the gap,
    the reference's sd over test patients ("smaller"/"larger" than the gap), and in how many test patients the
    reference beats every other encoder."""
    rows = {}
    for kind, part in results.groupby("target", sort=False):
        wide = part.pivot_table(index="fold", columns="encoder", values=metric)
        others = [e for e in wide.columns if e != reference]
        if reference not in wide.columns or not others:
            raise ValueError(f"results need the reference encoder {reference!r} and at least one other")
        best = wide[others].mean().idxmax()
        gap = float(wide[reference].mean() - wide[best].mean())
        sd = float(wide[reference].std(ddof=0))
        rows[kind] = {"reference": reference, "reference_mean": float(wide[reference].mean()), "best_other": best,
                      "other_mean": float(wide[best].mean()), "gap": gap, "sd_over_patients": sd,
                      "gap_vs_spread": "smaller" if abs(gap) < sd else "larger",
                      "reference_wins": int((wide[reference] > wide[others].max(axis=1)).sum()), "patients": len(wide)}
    return pd.DataFrame(rows).T


def pick_marker(samples: SampleSet | Sequence[Sample], marker: str | None = None, *, kind: str = "log1p_norm") -> str:
    """``marker`` if every sample measures it, else the common gene whose target varies most over all spots."""
    from histomoe_core.data.genes import common_genes
    from histomoe_core.data.targets import make_targets

    samples = list(samples)
    genes = common_genes(samples)
    if marker is not None and marker in genes:
        return marker
    y = np.concatenate([make_targets(s.adata, genes, kind=kind) for s in samples])
    return str(genes[int(np.argmax(y.var(axis=0)))])
