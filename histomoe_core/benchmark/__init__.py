"""The benchmark: every model on the same folds, gene panels and embeddings, over several seeds.

``run_benchmark(profile_or_config, **overrides) -> BenchmarkRun``. For each target kind (``log1p``,
``log1p_norm``; her2st: log1p only unless asked), each fold (patient-grouped) and each model, the gene panel is chosen on the fold's
training sections only (:func:`~histomoe_core.data.genes.select_panel`; or a fixed list), the model is fit on the
training spots (neural models once per seed, deterministic ones once) and scored on the test spots.

Protocol: gene panels by HEST-Bench's rule on each fold's training sections (``panel_rule``), every choice a
model makes (hyperparameters, target centring, HistoMoE's variant) made by inner CV inside the training folds
(:mod:`~histomoe_core.benchmark.selection`), paired comparisons with bootstrap intervals
(:mod:`~histomoe_core.benchmark.compare`).

Profiles (:data:`PROFILES`): ``her2st`` (leave-one-patient-out), ``synthetic`` (patient k-fold on the synthetic
multi-organ data), ``hest`` (a HEST-Bench task with its published patient splits; needs the downloaded data),
``hest-pan`` (several HEST-Bench tasks in one model, the task as context, their splits combined).

Content addressing: the run folder is ``runs_dir()/<dataset>-<encoder>-<key>``, where the key hashes the
config, the embeddings (their values), the dataset's counts, and the source of the modules the benchmark uses.
A re-run with nothing changed returns the finished run at once. Each fit (a "unit": target, fold, model, seed)
is cached on its own under ``cache_dir()/benchmark_units/<key>`` (key: inputs, fold, panel, model spec,
training settings, seed and the source of the modules a fit runs), so an interrupted run resumes and runs that
share models (the main table and the ablations) fit them once.

Run folder layout::

    config.json                      resolved config, keys, folds, package versions, wall time
    results.csv                      one row per target x model x fold x seed: pearson (HEST metric: per gene
                                     over pooled test spots, mean over genes), pearson_section (per section,
                                     mean over sections), mse, n_nan_genes, n_test_spots, fit_seconds, info
    summary.csv / summary.md         mean over folds and seeds, sd over folds, sd over seeds
    per_gene.csv                     target, model, fold, seed, gene, pearson, mse
    per_section.csv                  target, model, fold, seed, section, pearson, mse, n_spots
    panels/<target>/<fold>.csv       the fold's gene panel (chosen on its training sections)
    predictions/<target>/<model>/<fold>_seed<k>.npz
                                     pred (N, G), y (N, G), spot, sample, genes; for MoE models also
                                     gates (N, E) and expert_preds (N, E, G)
    models/<target>/<model>/<fold>_seed<k>.pt
                                     MoE models: {"config": MoEConfig dict, "state_dict": ..., "genes": [...]};
                                     rebuild with :meth:`BenchmarkRun.load_model`

Deterministic models (ridge, kNN, per-context) are fit once per fold; their rows are repeated for every seed so
all models aggregate the same way (their sd over seeds is 0).
"""
from histomoe_core.benchmark.config import PROFILES, BenchmarkConfig, make_config
from histomoe_core.benchmark.inputs import dataset_digest, load_inputs, normalise_embeddings, request_key, run_key
from histomoe_core.benchmark.models import (ABLATION_NOTES, ABLATION_REFERENCES, ABLATIONS, ANCHORED, MODELS,
                                            NEURAL_KINDS, PLAIN, SPATIAL_ABLATIONS, SYNTHETIC_ABLATIONS, SYNTHETIC_HISTOMOE, TRAIN,
                                            ablation_models, ablation_references, create_model, describe_model,
                                            is_deterministic, is_selection, select)
from histomoe_core.benchmark.results import BenchmarkRun, find_runs
from histomoe_core.benchmark.runner import resolve_jobs, run_benchmark
from histomoe_core.data.splits import stratified_folds
from histomoe_core.features import centre_sections

__all__ = [
    "ABLATIONS", "ABLATION_NOTES", "ABLATION_REFERENCES", "ANCHORED", "BenchmarkConfig", "BenchmarkRun", "MODELS",
    "NEURAL_KINDS", "PLAIN", "PROFILES", "SPATIAL_ABLATIONS", "SYNTHETIC_ABLATIONS", "SYNTHETIC_HISTOMOE", "TRAIN", "ablation_models",
    "ablation_references", "centre_sections", "create_model", "dataset_digest", "describe_model", "find_runs",
    "is_deterministic", "is_selection", "load_inputs", "make_config", "normalise_embeddings", "request_key", "resolve_jobs", "run_benchmark", "run_key",
    "select", "stratified_folds",
]
