"""``histomoe inspect RUN``: routing and gene figures for a finished benchmark run.

For each fold, the fold's trained MoE is applied to every section (``tl.fold_adata``) and the figures of book
chapter 06 are written: expert usage, gate entropy, agreement tables, per held-out section the expert map, gate
maps and measured-vs-predicted maps (PNG), interactive explorers (offline HTML), per-gene Pearson bars against
the run's other models, and ``index.md`` naming every file and what it shows.

examples:
  histomoe inspect her2st-efficientnet_lite0-0123456789abcdef
  histomoe inspect runs/her2st-tiny-0123456789abcdef --fold test_B --no-html --out /tmp/inspect
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

#: models shown beside the MoE in the per-gene bars (those present in the run)
COMPARE = ("ridge_cv", "knn", "mlp", "ridge_hest")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from histomoe_core.commands.options import nonneg_int, positive_int

    p = sub.add_parser("inspect", help="routing and gene figures for a finished benchmark run",
                       description=__doc__.split("\n\n")[1], epilog=__doc__.split("\n\n")[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder name under the runs directory, or a path to it")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: ./inspect-<run name>)")
    p.add_argument("--model", default="histomoe", help="the MoE model of the run to open (default: histomoe)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="training seed of the model (default: 0)")
    p.add_argument("--target", default=None, help="target kind (default: the run's first)")
    p.add_argument("--fold", action="append", help="only this fold; repeatable (default: every fold)")
    p.add_argument("--genes", type=positive_int, default=3, help="genes mapped as measured vs predicted per section")
    p.add_argument("--no-html", action="store_true", help="skip the interactive HTML explorers")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from histomoe_core import tl

    run = tl.open_run(args.run)
    out = args.out or Path.cwd() / f"inspect-{run.path.name}"
    files = inspect_run(run, out, model=args.model, seed=args.seed, target=args.target, folds=args.fold,
                        n_genes=args.genes, html=not args.no_html)
    print(f"{len(files)} files in {out} (see {out / 'index.md'})")
    return 0


def inspect_run(run, out: Path, *, model: str = "histomoe", seed: int = 0, target: str | None = None,
                folds: Sequence[str] | None = None, n_genes: int = 3, html: bool = True,
                log: Callable[[str], None] = print) -> list[Path]:
    """Write the figures of ``run`` into ``out``; return the written files (``index.md`` last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from histomoe_core import pl, tl
    from histomoe_core.errors import HistoMoEError

    if model not in run.saved_models():
        raise HistoMoEError(f"run {run.path.name} saved no weights for model {model!r}; saved: {run.saved_models()}")
    target = target or run.config["config"]["targets"][0]
    all_folds = [f["name"] for f in run.config["folds"]]
    folds = list(folds) if folds else all_folds
    unknown = sorted(set(folds) - set(all_folds))
    if unknown:
        raise HistoMoEError(f"run {run.path.name} has no fold(s) {unknown}; folds: {', '.join(all_folds)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = tl.run_samples(run)
    entries: list[tuple[Path, str]] = []

    def save(fig, name: str, what: str) -> None:
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        entries.append((path, what))

    def save_html(chart, name: str, what: str) -> None:
        path = out / name
        path.write_text(pl.interactive.offline_html(chart))
        entries.append((path, what))

    per_gene = run.per_gene
    summaries = {}
    for fold in folds:
        log(f"[inspect] fold {fold}")
        adata = tl.fold_adata(run, fold, model=model, seed=seed, target=target, samples=samples)
        adata.obs["region"] = tl.region_labels(adata, samples)
        adata.obs["section"] = adata.obs["sample_id"].astype(str) + " (" + adata.obs["split"].astype(str) + ")"
        labels = [c for c in ("patient", "sample_id", "organ", "region") if c in adata.obs and adata.obs[c].nunique() > 1]
        summaries[fold] = tl.routing_summary(adata, labels)
        save(pl.routing.expert_usage(adata, groupby="section", title=f"fold {fold}: mean gate weight per section"),
             f"{fold}_usage.png", "mean gate weight of each expert per section (training and held-out)")
        save(pl.routing.gate_entropy(adata, groupby="sample_id"), f"{fold}_entropy.png",
             "gate entropy per section (0 = one expert per spot, 1 = uniform)")
        for lab in labels:
            save(pl.routing.contingency(adata, lab, title=f"fold {fold}"), f"{fold}_contingency_{lab}.png",
                 f"{lab} vs dominant expert (share of spots), with NMI and ARI")
        if adata.obsm[tl.slot_names("histomoe")["gates"]].shape[1] > 1:
            save(pl.routing.expert_genes(adata, n_top=15, title=f"fold {fold}"), f"{fold}_expert_genes.png",
                 "genes each expert predicts differently from the others (s.d. of the prediction)")
        pg = per_gene[(per_gene["target"] == target) & (per_gene["fold"] == fold)]
        ranked = pg[pg["model"] == model].groupby("gene")["pearson"].mean().sort_values(ascending=False)
        genes = ranked.index[:n_genes].tolist()
        shown_models = [model, *[m for m in COMPARE if m in set(pg["model"]) and m != model]]
        save(pl.genes.gene_pearson(pg, models=shown_models, n_genes=20, sort_by=model,
                                   title=f"fold {fold}: per-gene Pearson over held-out spots"),
             f"{fold}_gene_pearson.png", f"per-gene Pearson of {model} and the baselines (top 20 genes of {model})")
        save(pl.genes.prediction_scatter(tl.held_out(adata), genes), f"{fold}_scatter.png",
             "predicted vs measured expression of the best-predicted genes, held-out spots")
        for sid in run.config["folds"][all_folds.index(fold)]["test"]:
            sample = samples[sid]
            img = pl.thumbnail(sample)
            lab = "region" if adata.obs.loc[adata.obs["sample_id"] == sid, "region"].notna().any() else None
            save(pl.routing.expert_map(adata, sample, labels=lab, image=img), f"{sid}_expert_map.png",
                 f"{sid}: H&E, dominant expert per spot" + (", pathologist regions" if lab else ""))
            save(pl.routing.gate_maps(adata, sample, image=img), f"{sid}_gate_maps.png",
                 f"{sid}: each expert's gate weight per spot over the H&E")
            save(pl.genes.measured_vs_predicted(adata, sample, genes, image=img), f"{sid}_genes.png",
                 f"{sid}: measured vs predicted maps of {', '.join(genes)}")
            if html:
                save_html(pl.interactive.routing_explorer(adata, sample, labels=lab, image=img),
                          f"{sid}_routing_explorer.html", f"{sid}: interactive dominant-expert map (offline HTML)")
                save_html(pl.interactive.spot_explorer(adata, sample, ranked.index[:8].tolist(), image=img),
                          f"{sid}_spot_explorer.html", f"{sid}: interactive gene explorer (offline HTML)")
    table = pd.DataFrame(summaries).T.rename_axis("fold")
    table.to_csv(out / "routing_summary.csv")
    entries.append((out / "routing_summary.csv", "routing summary per fold (entropy, usage, NMI with labels)"))
    lines = [f"# HistoMoE inspection of run `{run.path.name}`", "",
             f"model `{model}`, seed {seed}, target `{target}`; each fold's model applied to every section.", "",
             "| file | shows |", "|---|---|"]
    lines += [f"| [{p.name}]({p.name}) | {what} |" for p, what in entries]
    index = out / "index.md"
    index.write_text("\n".join(lines) + "\n")
    return [p for p, _ in entries] + [index]
