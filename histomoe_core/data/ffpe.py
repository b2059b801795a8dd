"""Adapter for ludvigla/FFPE_analysis (Gracia Villacampa et al. 2021): 12 Visium FFPE sections in four tissue
groups, each section a Space Ranger ``outs/`` subset read by :func:`~histomoe_core.data.spaceranger.read_spaceranger`.

Organoid sections get each spot's organoid from the group's ``organoid_selection.txt`` (barcodes suffixed
``_<section index>``); spots it does not list are ``unassigned``. The split group is the section (no patient is
recorded; the organoids of one section share a culture batch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from histomoe_core.data.fetch import fetch
from histomoe_core.data.manifests import load_manifest
from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.data.sources import SOURCES
from histomoe_core.data.spaceranger import read_spaceranger
from histomoe_core.errors import DataError

NAME = "ffpe_analysis"


def read_organoids(path: Path, index: int) -> pd.Series:
    """Barcode -> organoid label for the section with suffix ``_<index>``."""
    try:
        df = pd.read_csv(path, sep=r"\s+", header=0, names=["barcode", "organoid"], dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the organoid selection ({exc}); fetch it again") from exc
    suffix = f"_{index}"
    df = df[df["barcode"].str.endswith(suffix)]
    return pd.Series(df["organoid"].to_numpy(), index=df["barcode"].str[: -len(suffix)].to_numpy(), name="organoid")


def load_section(root: Path, sid: str, info: dict, context: dict, base: dict) -> Sample:
    group = info["group"]
    meta = base | {k: v for k, v in context.items() if k != "organoid_selection"} | {"section": sid, "group": group}
    meta["group_kind"] = "section"
    s = read_spaceranger(root / "data" / group / sid, sample_id=sid, species=context["species"], patient=sid, meta=meta)
    if "organoid_selection" in context:
        org = read_organoids(root / context["organoid_selection"], int(info["organoid_index"]))
        s.adata.obs["organoid"] = org.reindex(s.adata.obs_names).fillna("unassigned").to_numpy()
    return s


@SOURCES.register(NAME)
def load_ffpe_analysis(*, sections: Sequence[str] | None = None, species: str | None = None, root: Path | None = None) -> SampleSet:
    """The FFPE_analysis sections (all, ``sections``, or those of one ``species``) as a :class:`SampleSet`."""
    manifest = load_manifest(NAME)
    x = manifest.extra
    names = list(sections) if sections is not None else list(x["sections"])
    if species is not None:
        names = [n for n in names if x["contexts"][x["sections"][n]["group"]]["species"] == species]
    root = Path(root) if root is not None else fetch(NAME, progress=False, sections=names)
    base = {"technology": x["technology"], "preservation": x["preservation"], "dataset": NAME}
    return SampleSet(NAME, [
        load_section(root, n, x["sections"][n], x["contexts"][x["sections"][n]["group"]], base) for n in names
    ])
