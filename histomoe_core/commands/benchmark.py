"""``histomoe benchmark DATASET --encoder NAME``: every model on the same folds, panels and embeddings.

examples:
  histomoe benchmark her2st --encoder efficientnet_lite0
  histomoe benchmark synthetic --encoder tiny --seeds 0
  histomoe benchmark hest --task IDC --encoder hf-hub:MahmoodLab/UNI --gene-list hest
  histomoe benchmark hest-pan --tasks IDC PRAD LUNG --encoder hf-hub:MahmoodLab/UNI
  histomoe benchmark her2st --models ridge_cv knn histomoe --targets log1p
  histomoe benchmark her2st --ablations --targets log1p
  histomoe benchmark her2st --models ridge_cv knn_k50 --spatial-context '{"neighbours": {"radius_um": [250, 450]}}'

DATASET names a profile (her2st, synthetic, tissues, hest, hest-pan; see ``histomoe_core.benchmark.PROFILES``). A re-run with
nothing changed prints the finished run's summary at once; an interrupted run resumes.
"""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from histomoe_core.commands.options import HELP, nonneg_int, positive_int

    p = sub.add_parser("benchmark", help="run every model on the same folds / genes / embeddings; write tables",
                       description="Fit every model on the same patient folds, gene panels and embeddings, over "
                       "several seeds, and write the run folder (results, summary, predictions).",
                       epilog=__doc__.split("\n\n", 1)[1], **HELP)
    p.add_argument("dataset", help="profile (her2st, synthetic, hest) or any dataset name (see `histomoe data list`)")
    p.add_argument("--encoder", default=None, help="vision encoder (default: the profile's)")
    p.add_argument("--text-encoder", default=None, help="metadata encoder: minilm or onehot")
    p.add_argument("--task", default=None, help="HEST-Bench task for the hest profile (e.g. IDC)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="HEST-Bench tasks for the hest-pan profile (default all nine: IDC PRAD PAAD SKCM COAD READ CCRCC LUNG LYMPH_IDC)")
    p.add_argument("--models", nargs="+", default=None, help="subset of models (default: the profile's)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0 1 2)")
    p.add_argument("--targets", nargs="+", default=None, choices=["log1p", "log1p_norm"],
                   help="target kinds (default: the profile's; log1p = log1p of raw counts, log1p_norm = of library-size normalised counts)")
    p.add_argument("--folds", nargs="+", default=None, help="only these folds (e.g. test_B)")
    p.add_argument("--n-genes", type=positive_int, default=None, help="genes per panel, chosen on each training fold (default 50)")
    p.add_argument("--gene-list", default=None, help="fixed gene list file, or 'hest' for the task's shipped list")
    p.add_argument("--panel-rule", choices=["hest", "variance"], default=None,
                   help="gene panel rule on each fold's training sections (default hest: scanpy seurat HVG)")
    p.add_argument("--no-centre", action="store_true", help="train on raw targets instead of section-centred ones")
    p.add_argument("--embedding-norm", choices=["none", "section"], default=None,
                   help="centre embeddings per section (every model alike); transductive: reads the test images")
    p.add_argument("--spatial-context", default=None, metavar="JSON",
                   help="spatial context stage as JSON (or a JSON file): kind (neighbours, wide, section) -> options "
                   "and use (features, router, both); see histomoe_core.spatial_context")
    p.add_argument("--ablations", action="store_true", help="run the profile's ablation models (book chapter 08)")
    p.add_argument("--threads", type=nonneg_int, default=1, help="BLAS / torch threads per fit (default 1: small problems, shared CPUs; 0 = library default)")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="fits run at once in worker processes (default: $HISTOMOE_JOBS, else the usable CPUs up to 8, or 1 with a GPU)")
    p.add_argument("--force", action="store_true", help="recompute even when a finished run exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from histomoe_core.benchmark import PROFILES, ablation_models, resolve_jobs, run_benchmark
    from histomoe_core.commands.options import check_dataset, check_text_encoder, selection_options

    check_dataset(args.dataset, PROFILES)
    check_text_encoder(args.text_encoder)
    tasks = pan_task_option(args.dataset, args.tasks, args.task)
    selection_options(PROFILES.get(args.dataset, {}).get("dataset", args.dataset), args.task, None)
    n_jobs = resolve_jobs(args.jobs)  # HISTOMOE_JOBS too, before anything is loaded
    spatial = spatial_context_option(args.spatial_context)

    overrides = {
        "encoder": args.encoder, "text_encoder": args.text_encoder, "models": args.models, "seeds": args.seeds,
        "targets": args.targets, "folds": args.folds, "n_genes": args.n_genes, "gene_list": args.gene_list,
        "embedding_norm": args.embedding_norm, "panel_rule": args.panel_rule,
    }
    if args.ablations:
        overrides["models"] = args.models or ablation_models(args.dataset)
    if spatial:
        overrides["spatial_context"] = spatial
    if args.no_centre:
        overrides["centre_targets"] = False
    profile = args.dataset if args.dataset in PROFILES else {**PROFILES["her2st"], "dataset": args.dataset}
    if args.task:
        overrides["dataset_options"] = {"task": args.task}
    if tasks:
        overrides["dataset_options"] = {"tasks": tasks}
    run_ = run_benchmark(profile, progress=not args.no_progress, threads=args.threads, n_jobs=n_jobs,
                         force=args.force, **overrides)
    print(run_.summary_markdown())
    print(f"run folder: {run_.path}")
    return 0


def pan_task_option(dataset: str, tasks: list[str] | None, task: str | None = None) -> list[str] | None:
    """``--tasks`` as canonical HEST-Bench task names, checked before anything is loaded (hest-pan only)."""
    from histomoe_core.benchmark import PROFILES
    from histomoe_core.data.hest import pan_tasks
    from histomoe_core.errors import HistoMoEError

    pan = PROFILES.get(dataset, {}).get("dataset", dataset) == "hest_pan"
    if pan and task is not None:
        raise HistoMoEError(f"{dataset} takes --tasks (one or more HEST-Bench tasks), not --task")
    if tasks is None:
        return None
    if not pan:
        raise HistoMoEError(f"--tasks applies to hest-pan only; use --task for {dataset}" if dataset == "hest"
                            else f"--tasks applies to hest-pan only; {dataset} has no HEST-Bench tasks")
    return pan_tasks(tasks)


def spatial_context_option(raw: str | None) -> dict:
    """The ``--spatial-context`` JSON (inline or a file path), checked before anything is loaded."""
    import json
    from pathlib import Path

    from histomoe_core.errors import HistoMoEError
    from histomoe_core.spatial_context import check_spec

    if not raw:
        return {}
    text = Path(raw).read_text() if not raw.lstrip().startswith("{") and Path(raw).is_file() else raw
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HistoMoEError(f"--spatial-context is not JSON ({exc}); e.g. '{{\"neighbours\": {{\"radius_um\": 250}}}}'") from None
    if not isinstance(spec, dict):
        raise HistoMoEError("--spatial-context must be a JSON object: kind -> options")
    check_spec(spec)
    return spec
