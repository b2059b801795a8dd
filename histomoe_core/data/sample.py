"""The one sample model every data source produces.

A :class:`Sample` is one tissue section: an AnnData of raw counts (spots x genes) with the spot pixel
coordinates in ``obsm["spatial"]`` (x, y in pixels of ``image_path``), the pixel size, the patient and
metadata. A :class:`SampleSet` is an ordered collection with a HEST-style metadata table.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomoe_core.errors import DataError, UnknownNameError

#: metadata keys every source fills (others may be added freely)
META_KEYS = ("organ", "cancer_type", "oncotree_code", "technology", "dataset")
#: the context every real section carries (issue 10): what the text encoder reads and what experts specialise in
CONTEXT_KEYS = ("species", "organ", "tissue", "disease_state", "technology", "preservation", "group_kind")
#: species a sample's genes may be tagged with (human and mouse symbols are never the same gene)
SPECIES = ("human", "mouse")


@dataclass
class Sample:
    sample_id: str
    patient: str
    adata: ad.AnnData
    pixel_size_um: float
    image_path: Path | None = None
    patches_path: Path | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_counts(self.adata, where=self.sample_id)
        check_one_species(self.adata, where=self.sample_id)
        self.adata.obs["sample_id"] = self.sample_id
        self.adata.obs["patient"] = self.patient
        if not np.isfinite(self.pixel_size_um) or self.pixel_size_um <= 0:
            raise DataError(f"{self.sample_id}: pixel size must be a positive number of µm/px, got {self.pixel_size_um}")

    @property
    def n_spots(self) -> int:
        return self.adata.n_obs

    @property
    def coords(self) -> np.ndarray:
        """Spot centres (x, y) in pixels of the sample's image."""
        return np.asarray(self.adata.obsm["spatial"], dtype=np.float64)

    @property
    def species(self) -> str | None:
        """``human`` / ``mouse`` (``meta["species"]``), None where the source does not say."""
        sp_ = self.meta.get("species")
        return sp_ if sp_ in SPECIES else None

    def metadata_text(self) -> str:
        """A phrase describing the sample's biological context, for text encoders, built from its fields.

        E.g. ``"Breast, HER2+ invasive ductal carcinoma, ER-, PgR+, grade 3, node-, fresh frozen"`` or
        ``"Brain, coronal section, healthy, mouse, FFPE"``: organ, tissue, cancer type (else disease state),
        receptor status, grade and node status, the species when it is not human, and the preservation.
        """
        m = self.meta
        tissue = m.get("tissue") if str(m.get("tissue", "")).lower() != str(m.get("organ", "")).lower() else None
        parts = [m.get("organ"), tissue, m.get("cancer_type") or m.get("disease_state")]
        parts += [f"ER{m['er']}" if m.get("er") else None, f"PgR{m['pgr']}" if m.get("pgr") else None]
        parts += [f"grade {m['grade']}" if m.get("grade") else None, f"node{m['node_status']}" if m.get("node_status") else None]
        parts += [self.species if self.species not in (None, "human") else None, m.get("preservation")]
        return ", ".join(str(p) for p in parts if p)

    def row(self) -> dict:
        """One row of the metadata table."""
        return {
            "sample_id": self.sample_id,
            "patient": self.patient,
            "n_spots": self.n_spots,
            "n_genes": self.adata.n_vars,
            "pixel_size_um": round(float(self.pixel_size_um), 4),
            "median_counts": float(np.median(total_counts(self.adata))),
            **{k: v for k, v in self.meta.items() if not isinstance(v, (dict, list))},
        }


@dataclass
class SampleSet:
    """An ordered collection of samples of one dataset."""

    name: str
    samples: list[Sample]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | str) -> Sample:
        if isinstance(key, str):
            for s in self.samples:
                if s.sample_id == key:
                    return s
            raise UnknownNameError(f"{self.name} has no sample {key!r}; samples: {', '.join(self.ids)}")
        return self.samples[key]

    @property
    def ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    @property
    def patients(self) -> list[str]:
        return sorted({s.patient for s in self.samples})

    def table(self) -> pd.DataFrame:
        """HEST-style metadata table: one row per sample."""
        return pd.DataFrame([s.row() for s in self.samples]).set_index("sample_id")

    def subset(self, ids: Sequence[str]) -> "SampleSet":
        return SampleSet(self.name, [self[i] for i in ids])

    def cap_spots(self, max_spots: int) -> "SampleSet":
        """The same sections with at most ``max_spots`` spots each: a uniform random subset of a larger section's
        spots (seeded by its id, so the same on every run and machine), kept in their original order. A section's
        ``meta["n_spots_total"]`` keeps how many spots it had."""
        max_spots = check_max_spots(max_spots)
        return SampleSet(self.name, [_capped(s, max_spots) for s in self.samples])


def check_max_spots(max_spots) -> int:
    """``max_spots`` as an int; a clear error unless it is a positive whole number."""
    if isinstance(max_spots, bool) or not isinstance(max_spots, (int, np.integer)) or max_spots < 1:
        raise DataError(f"max_spots must be a positive whole number of spots per section, got {max_spots!r}")
    return int(max_spots)


def _capped(sample: Sample, max_spots: int) -> Sample:
    """``sample`` with a seeded uniform subset of ``max_spots`` of its spots (itself when it has no more)."""
    if sample.n_spots <= max_spots:
        return sample
    rng = np.random.default_rng(zlib.crc32(sample.sample_id.encode()))
    keep = np.sort(rng.choice(sample.n_spots, size=max_spots, replace=False))
    return replace(sample, adata=sample.adata[keep].copy(), meta={**sample.meta, "n_spots_total": sample.n_spots})


def total_counts(adata: ad.AnnData) -> np.ndarray:
    return np.asarray(adata.X.sum(axis=1)).ravel()


def tag_species(adata: ad.AnnData, species: str) -> None:
    """Tag every gene of ``adata`` with its species (``var["species"]``, ``uns["species"]``)."""
    if species not in SPECIES:
        raise DataError(f"unknown species {species!r}; give one of {', '.join(SPECIES)}")
    adata.var["species"] = species
    adata.uns["species"] = species


def check_one_species(adata: ad.AnnData, *, where: str) -> None:
    """Refuse a sample whose genes are tagged with more than one species."""
    if "species" in adata.var:
        found = sorted(pd.unique(adata.var["species"].astype(str)))
        if len(found) > 1:
            raise DataError(
                f"{where}: genes of several species in one sample ({', '.join(found)}); split it into one sample "
                "per species (human and mouse genes are not the same genes)"
            )


def species_gene_ids(adata: ad.AnnData) -> pd.Index:
    """Gene ids tagged with their species, e.g. ``human:ACTB`` / ``mouse:Actb`` (untagged: the bare symbol)."""
    tag = adata.uns.get("species")
    return pd.Index([f"{tag}:{g}" for g in adata.var_names] if tag else list(adata.var_names))


def require_one_species(samples: Sequence["Sample"]) -> str | None:
    """The one species of ``samples``; a clear error where human and mouse would be pooled gene by gene."""
    found = sorted({s.species for s in samples if s.species})
    if len(found) > 1:
        ids = {sp_: next(s.sample_id for s in samples if s.species == sp_) for sp_ in found}
        raise DataError(
            f"samples of several species ({', '.join(f'{k}: e.g. {v}' for k, v in ids.items())}) cannot share one "
            "gene panel; select one species (e.g. load_dataset(..., species='human'))"
        )
    return found[0] if found else None


def validate_counts(adata: ad.AnnData, *, where: str) -> None:
    """Raise :class:`DataError` on counts or coordinates that cannot be used."""
    if "spatial" not in adata.obsm:
        raise DataError(f"{where}: no spot coordinates (obsm['spatial'] is missing)")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.shape != (adata.n_obs, 2):
        raise DataError(f"{where}: coordinates have shape {xy.shape}, expected ({adata.n_obs}, 2)")
    if not np.isfinite(xy).all():
        raise DataError(f"{where}: {int((~np.isfinite(xy)).any(axis=1).sum())} spots have non-finite coordinates")
    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if np.isnan(data).any():
        raise DataError(f"{where}: counts contain NaN; raw counts must be finite non-negative numbers")
    if (data < 0).any():
        raise DataError(f"{where}: counts contain negative values; expected raw counts (>= 0), not normalised data")
    if adata.obs_names.has_duplicates:
        raise DataError(f"{where}: duplicate spot ids, e.g. {adata.obs_names[adata.obs_names.duplicated()][0]!r}")


#: a spot further than this many spot pitches from where its array position puts it is off the grid
GRID_TOLERANCE = 0.25


def grid_offsets(grid: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Distance of each spot's pixel position from the affine map of array positions to pixels (fitted, then
    refitted on the spots within :data:`GRID_TOLERANCE`), in pitches: the square root of the pixel area of one
    array cell, the spot spacing on a square grid such as legacy ST. Zeros for fewer than 4 spots."""
    grid = np.c_[np.asarray(grid, float), np.ones(len(grid))]
    pixels = np.asarray(pixels, float)
    off = np.zeros(len(grid))
    keep = np.ones(len(grid), bool)
    for _ in range(2):
        if keep.sum() < 4:
            break
        coef = np.linalg.lstsq(grid[keep], pixels[keep], rcond=None)[0]
        pitch = np.sqrt(abs(np.linalg.det(coef[:2]))) or 1.0  # sqrt of the pixel area of one array cell
        off = np.linalg.norm(grid @ coef - pixels, axis=1) / pitch
        keep = off <= GRID_TOLERANCE
    return off
