"""A finished run: assembling the run folder from the unit folders, its summary, and :class:`BenchmarkRun`."""
from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from histomoe_core import cache, paths
from histomoe_core.benchmark.config import BenchmarkConfig
from histomoe_core.benchmark.inputs import RUN_VERSION
from histomoe_core.benchmark.models import is_deterministic
from histomoe_core.errors import HistoMoEError


@dataclass
class BenchmarkRun:
    """A finished run folder with its tables (read once per object; each access returns a fresh copy)."""

    path: Path
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _read(self, name: str) -> pd.DataFrame:
        if name not in self._tables:
            self._tables[name] = pd.read_csv(self.path / name)
        return self._tables[name].copy()

    @property
    def config(self) -> dict:
        if "config.json" not in self._tables:
            self._tables["config.json"] = (self.path / "config.json").read_text()
        return json.loads(self._tables["config.json"])

    @property
    def results(self) -> pd.DataFrame:
        return self._read("results.csv")

    @property
    def summary(self) -> pd.DataFrame:
        return self._read("summary.csv")

    @property
    def per_gene(self) -> pd.DataFrame:
        return self._read("per_gene.csv")

    @property
    def per_section(self) -> pd.DataFrame:
        return self._read("per_section.csv")

    @property
    def per_context(self) -> pd.DataFrame:
        """Per (target, model, fold, seed, context): the context's HEST metric on its own panel (runs with
        per-context panels; empty otherwise)."""
        return self._read("per_context.csv") if (self.path / "per_context.csv").exists() else pd.DataFrame()

    @property
    def selections(self) -> pd.DataFrame:
        """Inner-CV choices of the ``select`` models: target, fold, model, candidate, inner_pearson, chosen, ..."""
        path = self.path / "selections.csv"
        return self._read("selections.csv") if path.exists() else selection_table({})

    def chosen(self, model: str, *, target: str | None = None) -> pd.Series:
        """The candidate ``model`` chose in each fold (empty for a fixed model)."""
        target = target or self.config["config"]["targets"][0]
        sel = self.selections
        sel = sel[(sel["model"] == model) & (sel["target"] == target) & sel["chosen"]]
        return sel.set_index("fold")["candidate"]

    def model_spec(self, model: str, fold: str, *, target: str | None = None) -> dict:
        """The spec ``model`` was fit with on ``fold`` (a ``select`` model's chosen candidate)."""
        spec = self.config["config"]["models"][model]
        chosen = self.chosen(model, target=target)
        return dict(spec["candidates"][chosen[fold]]) if fold in chosen.index else dict(spec)

    def choices(self, *, target: str | None = None, params: Mapping[str, str] | None = None) -> pd.DataFrame:
        """Models x folds: the candidate each ``select`` model chose, plus rows ``"<model>: <key>"`` for the
        fitted values in ``params`` (default: ridge_cv's alpha and knn's k, where those models ran)."""
        target = target or self.config["config"]["targets"][0]
        sel = self.selections
        sel = sel[(sel["target"] == target) & sel["chosen"]]
        folds = [f["name"] for f in self.config["folds"]]
        rows = {m: g.set_index("fold")["candidate"] for m, g in sel.groupby("model", sort=False)}
        ran = set(self.results["model"])
        for model, key in (params or {"ridge_cv": "alpha", "knn": "k"}).items():
            if model in ran:
                rows[f"{model}: {key}"] = self.fit_info(model, key, target=target).map(
                    lambda v: f"{v:g}" if isinstance(v, (int, float)) else str(v))
        return pd.DataFrame(rows, index=folds).T

    def candidate_scores(self, model: str, *, target: str | None = None) -> pd.DataFrame:
        """Candidates x folds: each candidate's mean inner-CV HEST metric for a ``select`` model."""
        target = target or self.config["config"]["targets"][0]
        sel = self.selections
        sel = sel[(sel["target"] == target) & (sel["model"] == model)]
        return sel.pivot(index="candidate", columns="fold", values="inner_pearson") if len(sel) else pd.DataFrame()

    def fit_info(self, model: str, key: str, *, target: str | None = None) -> pd.Series:
        """Per fold, one field of the fit's ``info`` (e.g. ``alpha`` of ridge_cv, ``k`` of knn); seed 0."""
        target = target or self.config["config"]["targets"][0]
        r = self.results
        r = r[(r["model"] == model) & (r["target"] == target) & (r["seed"] == r["seed"].min())]
        return pd.Series({f: json.loads(i).get(key) for f, i in zip(r["fold"], r["info"])}, name=key)

    def summary_markdown(self) -> str:
        return (self.path / "summary.md").read_text()

    def panel(self, target: str, fold: str) -> pd.DataFrame:
        return pd.read_csv(self.path / "panels" / target / f"{fold}.csv", index_col=0)

    def _check_seed(self, seed: int) -> None:
        seeds = [int(s) for s in self.config["config"]["seeds"]]
        if int(seed) not in seeds:
            raise HistoMoEError(f"seed {seed} is not one of this run's training seeds ({', '.join(map(str, seeds))}); "
                                f"open one of those, or run with n_seeds={int(seed) + 1}")

    def predictions(self, model: str, fold: str, seed: int = 0, target: str | None = None) -> dict[str, np.ndarray]:
        self._check_seed(seed)
        target = target or self.config["config"]["targets"][0]
        with np.load(self.path / "predictions" / target / model / f"{fold}_seed{seed}.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def load_model(self, model: str, fold: str, seed: int = 0, target: str | None = None):
        """The trained :class:`~histomoe_core.moe.HistoMoE` of one fold and seed (eval mode)."""
        import torch

        from histomoe_core.moe import HistoMoE, MoEConfig

        self._check_seed(seed)
        target = target or self.config["config"]["targets"][0]
        path = self.path / "models" / target / model / f"{fold}_seed{seed}.pt"
        if not path.exists():
            raise HistoMoEError(f"{path} does not exist; only MoE-type models save weights (saved: {self.saved_models()})")
        st = torch.load(path, map_location="cpu", weights_only=False)
        m = HistoMoE(MoEConfig.from_dict(st["config"]))
        m.load_state_dict(st["state_dict"])
        return m.eval()

    def saved_models(self) -> list[str]:
        root = self.path / "models"
        return sorted({p.parent.name for p in root.glob("*/*/*.pt")}) if root.exists() else []



def selection_table(selections: Mapping[tuple[str, str, str], Path]) -> pd.DataFrame:
    """One row per (target, fold, model, candidate): the candidate's inner-CV scores and whether it was chosen."""
    from histomoe_core.benchmark.selection import read_selection

    rows = []
    for (target, fold, model), path in selections.items():
        sel = read_selection(path)
        for cand, mean in sel["mean"].items():
            rows.append({"target": target, "fold": fold, "model": model, "candidate": cand, "inner_pearson": mean,
                         "inner_sd": float(np.std(sel["scores"][cand])), "chosen": cand == sel["chosen"],
                         "inner_cv_groups": sel["inner_cv_groups"], "n_inner_folds": sel["n_inner_folds"]})
    return pd.DataFrame(rows, columns=["target", "fold", "model", "candidate", "inner_pearson", "inner_sd", "chosen",
                                       "inner_cv_groups", "n_inner_folds"])


def assemble(cfg: BenchmarkConfig, folds, panels: Mapping[tuple[str, str], pd.DataFrame],
             units: Mapping[tuple[str, str, str, int], Path], final: Path, key: str, seconds: float, *,
             selections: Mapping[tuple[str, str, str], Path] | None = None, notes: Mapping | None = None) -> None:
    from histomoe_core.evaluate import summarize

    rows, genes, sections, contexts = [], [], [], []
    chosen = selection_table(selections or {})
    picked = {(r.target, r.fold, r.model): r.candidate for r in chosen[chosen["chosen"]].itertuples()}
    with cache.atomic_dir(final) as tmp:
        chosen.to_csv(tmp / "selections.csv", index=False)
        for (target, fold_name), panel in panels.items():
            (tmp / "panels" / target).mkdir(parents=True, exist_ok=True)
            panel.to_csv(tmp / "panels" / target / f"{fold_name}.csv")
        for target in cfg.targets:
            for fold in folds:
                for name, spec in cfg.models.items():
                    det = is_deterministic(spec)
                    for seed in cfg.seeds:
                        src = units[(target, fold.name, name, seed)]
                        _check_unit(src)
                        m = json.loads((src / "metrics.json").read_text())
                        ident = {"target": target, "model": name, "fold": fold.name, "seed": seed}
                        info = m.pop("info", {})
                        rows.append({**ident, **m, "deterministic": det, "info": json.dumps(info, default=float),
                                     "selected": picked.get((target, fold.name, name), "")})
                        genes.append(pd.read_csv(src / "per_gene.csv").assign(**ident))
                        sections.append(pd.read_csv(src / "per_section.csv").assign(**ident))
                        if (src / "per_context.csv").exists():
                            contexts.append(pd.read_csv(src / "per_context.csv").assign(**ident))
                        pdir = tmp / "predictions" / target / name
                        pdir.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(src / "pred.npz", pdir / f"{fold.name}_seed{seed}.npz")
                        if (src / "model.pt").exists():
                            mdir = tmp / "models" / target / name
                            mdir.mkdir(parents=True, exist_ok=True)
                            shutil.copyfile(src / "model.pt", mdir / f"{fold.name}_seed{seed}.pt")
        results = pd.DataFrame(rows)
        ident_cols = ["target", "model", "fold", "seed"]
        results.to_csv(tmp / "results.csv", index=False)
        pg = pd.concat(genes, ignore_index=True)
        pg[ident_cols + [c for c in pg.columns if c not in ident_cols]].to_csv(tmp / "per_gene.csv", index=False)
        ps = pd.concat(sections, ignore_index=True)
        ps[ident_cols + [c for c in ps.columns if c not in ident_cols]].to_csv(tmp / "per_section.csv", index=False)
        if contexts:
            pc = pd.concat(contexts, ignore_index=True)
            pc[ident_cols + [c for c in pc.columns if c not in ident_cols]].to_csv(tmp / "per_context.csv", index=False)
        summary = summarize(results)
        summary.to_csv(tmp / "summary.csv", index=False)
        (tmp / "summary.md").write_text(_summary_md(cfg, results, summary, seconds, chosen))
        (tmp / "config.json").write_text(json.dumps({
            "config": cfg.as_dict(), "key": key, "folds": [f.as_dict() for f in folds], "seconds": seconds,
            "versions": _versions(), "layout_version": RUN_VERSION, **dict(notes or {}),
        }, indent=2, default=str))


def _check_unit(src: Path) -> None:
    """Refuse a unit folder that changed since :meth:`~histomoe_core.benchmark.units.Plan.fit_jobs` verified it."""
    problems = cache.checksum_problems(src)
    if problems:
        raise HistoMoEError(f"benchmark unit {src} is corrupt ({'; '.join(problems[:3])}); run the benchmark "
                            "again to recompute it")


def _summary_md(cfg: BenchmarkConfig, results: pd.DataFrame, summary: pd.DataFrame, seconds: float,
                chosen: pd.DataFrame) -> str:
    from histomoe_core.evaluate import fold_table, markdown_table

    lines = [f"# Benchmark: {cfg.dataset} / {cfg.encoder}", "",
             f"Folds: {results['fold'].nunique()} ({cfg.scheme}), seeds: {list(cfg.seeds)}, "
             f"genes per panel: {cfg.n_genes} ({cfg.panel_rule} rule, chosen on each training fold)" if not cfg.gene_list else
             f"Folds: {results['fold'].nunique()} ({cfg.scheme}), seeds: {list(cfg.seeds)}, fixed gene list {cfg.gene_list}",
             "", "pearson = HEST metric (Pearson per gene over the pooled test spots of a fold, mean over genes); "
             "pearson_section = per test section, mean over sections; values are mean ± sd over folds "
             "(seed-averaged; sd with ddof = 0, as HEST-Bench); the last column is the sd over seeds.", ""]
    for target in cfg.targets:
        s = summary[summary["target"] == target].sort_values("pearson", ascending=False)
        lines += [f"## Targets: {target}", "", markdown_table(s), "", "Per fold (HEST metric, mean over seeds):", ""]
        ft = fold_table(results, target=target)
        lines.append("| model | " + " | ".join(ft.columns) + " |")
        lines.append("|---|" + "---|" * len(ft.columns))
        for model, row in ft.iterrows():
            lines.append(f"| {model} | " + " | ".join(f"{v:.3f}" for v in row.to_numpy()) + " |")
        lines.append("")
    if len(chosen):
        picks = chosen[chosen["chosen"]].pivot_table(index=["target", "model"], columns="fold", values="candidate",
                                                     aggfunc="first")
        lines += ["## Choices made inside the training folds (inner CV)", "",
                  "| target | model | " + " | ".join(picks.columns) + " |", "|---|---|" + "---|" * len(picks.columns)]
        lines += [f"| {t} | {m} | " + " | ".join(map(str, row.to_numpy())) + " |" for (t, m), row in picks.iterrows()]
        lines.append("")
    lines.append(f"Wall time: {seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    import sklearn
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "sklearn": sklearn.__version__, "pandas": pd.__version__}


def find_runs(dataset: str | None = None) -> list[BenchmarkRun]:
    """Finished runs under ``runs_dir()``, newest first."""
    root = paths.runs_dir()
    if not root.exists():
        return []
    runs = [p for p in root.iterdir() if (p / "summary.md").exists() and (dataset is None or p.name.startswith(dataset + "-"))]
    return [BenchmarkRun(p) for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def write_index(index: Path, run: Path) -> None:
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(run.name)
    tmp.replace(index)
