"""Synthetic multi-organ spatial transcriptomics with known answers, written in HEST's on-disk layout.

:func:`make_synthetic` writes ``st/<id>.h5ad``, ``patches/<id>.h5``, ``metadata/<id>.json``, ``wsis/<id>.tif`` and
``HEST_v1_1_0.csv``, so :func:`~histomoe_core.data.hest.load_hest` reads it like real HEST data.
``load_dataset("synthetic", **params)`` generates it once into ``<cache_dir>/synthetic/<key>`` (key = the
parameters and this module's source) and reads it from there afterwards.

Generative model
----------------
Organs ``o`` (kidney/CCRCC, colon/COAD, lung/LUAD, breast/IDC, prostate/PRAD, skin/SKCM; the first
``n_organs``), ``patients_per_organ`` patients each, ``sections_per_patient`` sections per patient. A section is
a roundish patch of tissue cut from a square grid of spots; the grid pitch equals the patch width (112 um), so
the patches tile the slide image and each patch is exactly the tile drawn for its spot.

1. Cell-type proportions (spatially smooth). Each spot ``s`` holds ``K = 3`` latent cell types in proportions
   ``z_s = softmax(tau * f_s)``, where ``f`` are ``K`` white-noise fields over the section grid, smoothed with a
   Gaussian kernel (``SMOOTH_SPOTS``) and standardised. Neighbouring spots have similar ``z``: tissue regions.
2. Image (``z`` and the organ are visible). The patch of spot ``s`` has
   - the organ's background: tissue colour ``bg_o`` modulated by a sinusoidal fibre texture of organ-specific
     frequency and orientation (continuous across the slide);
   - for each cell type ``k``, ``Poisson(z_sk * n_k)`` discs of radius ``r_k`` and colour ``c_k`` (slightly tinted
     per organ): ``k = 0`` "epithelial" many small dark nuclei, ``k = 1`` "stromal" mid-size pink blobs,
     ``k = 2`` "luminal" few large pale blobs with a pink rim. A cell type looks the same in every organ;
   - a per-section stain jitter and pixel noise.
3. Expression (organ-specific programs). For gene ``g`` with counts ``Poisson(mu_sg)``::

       log mu_sg = a_og + sum_k z_sk W_okg + log l_section + b_pg + eps_sg

   ``a_og`` is the organ baseline; ``W_o = SCALE * (RHO * S + sqrt(1 - RHO^2) * U_o)`` with a program ``S``
   shared by all organs and an organ-own program ``U_o`` (standard normal, ``K x G``): the same visual cell
   type drives different genes in each organ, often with opposite sign. One pooled image -> expression map
   averages these programs; per-organ experts (e.g. routed by the organ in the metadata) can learn each one.
   ``l_section`` is the library size of the section (log-normal, sd ``LIB_SD``; not visible in the image),
   ``b_pg`` a patient offset (sd ``PATIENT_SD``) and ``eps`` spot noise (sd ``NOISE_SD``).

The truth is saved with the data: ``obsm["z_true"]`` (spots x K), ``varm["program"]`` (``W_o`` transposed, genes x K),
``var["baseline"]`` (``a_o``), ``var["patient_offset"]`` (``b_p``) and ``uns["synthetic"]`` (organ, log library size).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.ndimage import gaussian_filter

from histomoe_core import cache, paths
from histomoe_core.data.sample import SampleSet
from histomoe_core.data.sources import SOURCES

PATCH_UM = 112.0
K = 3
CELL_TYPES = ("epithelial", "stromal", "luminal")
#: per cell type: blobs per patch at z = 1, radius (fraction of the patch width), RGB colour
N_BLOBS = np.array([28.0, 8.0, 2.5])
RADIUS = np.array([0.045, 0.09, 0.17])
COLOUR = np.array([[70, 35, 120], [215, 85, 140], [252, 252, 255]], dtype=np.float64)
#: luminal blobs (k = 2) have a rim of this colour, RIM_PX wide
RIM, RIM_PX = np.array([170, 110, 160], dtype=np.float64), 1.2
GLASS = np.array([244, 244, 247], dtype=np.float64)
TAU, SMOOTH_SPOTS = 3.0, 2.0
SCALE, RHO = 1.4, 0.3
BASE_MEAN, BASE_SD, ORGAN_BASE_SD = 1.2, 0.6, 0.5
LIB_SD, PATIENT_SD, NOISE_SD = 0.4, 0.15, 0.15
STAIN_SD, PIXEL_SD = 0.02, 6.0


@dataclass(frozen=True)
class Organ:
    name: str
    oncotree_code: str
    cancer_type: str
    background: tuple[int, int, int]
    freq: float  # fibre texture: cycles per patch width
    angle_deg: float
    amp: float
    tint: tuple[float, float, float]  # multiplies the cell-type colours

    @property
    def metadata_text(self) -> str:
        return f"{self.name}, {self.cancer_type}"


ORGANS = (
    Organ("kidney", "CCRCC", "clear cell renal cell carcinoma", (238, 200, 210), 1.5, 20, 0.06, (1.00, 0.95, 0.95)),
    Organ("colon", "COAD", "colon adenocarcinoma", (190, 145, 205), 5.0, 80, 0.10, (0.92, 0.95, 1.05)),
    Organ("lung", "LUAD", "lung adenocarcinoma", (215, 205, 242), 3.0, 135, 0.08, (1.05, 1.00, 0.97)),
    Organ("breast", "IDC", "invasive ductal carcinoma", (225, 165, 192), 2.5, 45, 0.08, (1.00, 0.92, 1.00)),
    Organ("prostate", "PRAD", "prostate adenocarcinoma", (212, 175, 218), 7.0, 0, 0.09, (0.95, 1.00, 1.02)),
    Organ("skin", "SKCM", "cutaneous melanoma", (205, 150, 165), 4.0, 110, 0.10, (1.05, 0.95, 0.92)),
)


def _grid(n: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A square grid of side m and the (row, col) of ``n`` spots forming a roundish section."""
    m = int(np.ceil(np.sqrt(n * 4 / np.pi * 1.15))) + 2
    rr, cc = np.mgrid[0:m, 0:m]
    c = (m - 1) / 2
    ax = rng.uniform(0.8, 1.25)
    d = ((rr - c) * ax) ** 2 + ((cc - c) / ax) ** 2 + rng.normal(0, 0.5, (m, m))
    order = np.argsort(d.ravel(), kind="stable")[:n]
    pos = np.stack(np.unravel_index(order, (m, m)), axis=1)
    return m, pos[np.lexsort((pos[:, 1], pos[:, 0]))]


def _proportions(m: int, pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spatially smooth cell-type proportions (n x K) over the grid."""
    fields = np.stack([gaussian_filter(rng.normal(size=(m, m)), SMOOTH_SPOTS, mode="reflect") for _ in range(K)])
    fields = (fields - fields.mean(axis=(1, 2), keepdims=True)) / fields.std(axis=(1, 2), keepdims=True)
    logits = TAU * fields[:, pos[:, 0], pos[:, 1]].T
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _render(z: np.ndarray, organ: Organ, y0: int, x0: int, px: int, stain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One patch (px x px x 3 uint8) for proportions ``z`` at slide position (y0, x0)."""
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float64)
    theta = np.deg2rad(organ.angle_deg)
    phase = 2 * np.pi * organ.freq * ((xx + x0) * np.cos(theta) + (yy + y0) * np.sin(theta)) / px
    img = np.asarray(organ.background, dtype=np.float64)[None, None] * (1 + organ.amp * np.sin(phase))[..., None]
    colours = COLOUR * np.asarray(organ.tint)[None]
    for k in (2, 1, 0):  # large pale blobs first, nuclei on top
        n = rng.poisson(z[k] * N_BLOBS[k])
        if n == 0:
            continue
        cy, cx = rng.uniform(0, px, (2, n))
        r = RADIUS[k] * px * rng.uniform(0.8, 1.2, n)
        d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
        if k == 2:
            img[(d2 < (r**2)[:, None, None]).any(axis=0)] = RIM * np.asarray(organ.tint)
            r = r - RIM_PX
        img[(d2 < (r**2)[:, None, None]).any(axis=0)] = colours[k]
    img = img * stain[None, None] + rng.normal(0, PIXEL_SD, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _programs(n_organs: int, n_genes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Organ baselines a (O x G) and programs W (O x K x G)."""
    g = np.random.default_rng([seed, 0])
    mean = g.normal(BASE_MEAN, BASE_SD, n_genes)
    shared = g.normal(size=(K, n_genes))
    base, prog = [], []
    for o in range(n_organs):
        r = np.random.default_rng([seed, 1, o])
        base.append(mean + r.normal(0, ORGAN_BASE_SD, n_genes))
        prog.append(SCALE * (RHO * shared + np.sqrt(1 - RHO**2) * r.normal(size=(K, n_genes))))
    return np.stack(base), np.stack(prog)


def _write_section(out: Path, sid: str, patient: str, o: int, organ: Organ, genes: list[str], base: np.ndarray,
                   prog: np.ndarray, patient_offset: np.ndarray, n_spots: int, px: int, rng: np.random.Generator) -> dict:
    m, pos = _grid(n_spots, rng)
    z = _proportions(m, pos, rng)
    stain = 1 + rng.normal(0, STAIN_SD, 3)
    slide = np.broadcast_to(GLASS.astype(np.uint8), (m * px, m * px, 3)).copy()
    patches = np.empty((n_spots, px, px, 3), dtype=np.uint8)
    for i, (r, c) in enumerate(pos):
        patches[i] = _render(z[i], organ, r * px, c * px, px, stain, rng)
        slide[r * px : (r + 1) * px, c * px : (c + 1) * px] = patches[i]
    log_lib = rng.normal(0, LIB_SD)
    log_mu = base[None] + z @ prog + log_lib + patient_offset[None] + rng.normal(0, NOISE_SD, (n_spots, len(genes)))
    counts = rng.poisson(np.exp(log_mu)).astype(np.float32)
    barcodes = [f"r{r:02d}c{c:02d}" for r, c in pos]
    centres = (pos[:, ::-1] + 0.5) * px  # (x, y) in slide pixels
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"array_row": pos[:, 0], "array_col": pos[:, 1], "in_tissue": 1}, index=barcodes),
        var=pd.DataFrame({"baseline": base, "patient_offset": patient_offset}, index=genes),
    )
    adata.obsm["spatial"] = centres
    adata.obsm["z_true"] = z.astype(np.float32)
    adata.varm["program"] = prog.T.astype(np.float32)
    adata.uns["synthetic"] = {"organ": organ.name, "organ_index": o, "log_library_size": float(log_lib),
                              "cell_types": list(CELL_TYPES)}
    adata.write_h5ad(out / "st" / f"{sid}.h5ad")
    with h5py.File(out / "patches" / f"{sid}.h5", "w") as f:
        f.create_dataset("img", data=patches, compression="gzip", compression_opts=1)
        f.create_dataset("barcode", data=np.array(barcodes, dtype="S")[:, None])
        f.create_dataset("coords", data=(pos[:, ::-1] * px).astype(np.int64))  # top-left corner (x, y)
    import tifffile

    tifffile.imwrite(out / "wsis" / f"{sid}.tif", slide, compression="zlib")
    meta = {
        "id": sid, "patient": patient, "organ": organ.name, "oncotree_code": organ.oncotree_code,
        "cancer_type": organ.cancer_type, "metadata_text": organ.metadata_text, "disease_state": "Cancer",
        "st_technology": "synthetic", "species": "synthetic", "dataset": "synthetic",
        "pixel_size_um_estimated": PATCH_UM / px, "patch_size_um": PATCH_UM, "spots_under_tissue": n_spots,
        "inter_spot_dist": PATCH_UM, "fullres_px_width": m * px, "fullres_px_height": m * px,
        "license": "MIT (generated by HistoMoE)",
    }
    (out / "metadata" / f"{sid}.json").write_text(json.dumps(meta, indent=1))
    return meta


def make_synthetic(
    out_dir: Path,
    *,
    n_organs: int = 3,
    patients_per_organ: int = 3,
    sections_per_patient: int = 1,
    spots_per_section: int = 120,
    n_genes: int = 60,
    patch_px: int = 32,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in HEST's layout to ``out_dir`` (see the module docstring) and return it."""
    if not 1 <= n_organs <= len(ORGANS):
        raise ValueError(f"n_organs must be between 1 and {len(ORGANS)}, got {n_organs}")
    for name, v, lo in (("patients_per_organ", patients_per_organ, 1), ("sections_per_patient", sections_per_patient, 1),
                        ("spots_per_section", spots_per_section, 4), ("n_genes", n_genes, 1), ("patch_px", patch_px, 8)):
        if int(v) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    out = Path(out_dir)
    for d in ("st", "patches", "metadata", "wsis"):
        (out / d).mkdir(parents=True, exist_ok=True)
    genes = [f"SYN{g + 1:03d}" for g in range(n_genes)]
    base, prog = _programs(n_organs, n_genes, seed)
    rows = []
    for o, organ in enumerate(ORGANS[:n_organs]):
        for p in range(patients_per_organ):
            patient = f"{organ.oncotree_code}-P{p + 1}"
            offset = np.random.default_rng([seed, 2, o, p]).normal(0, PATIENT_SD, n_genes)
            for s in range(sections_per_patient):
                rng = np.random.default_rng([seed, 3, o, p, s])
                sid = f"{patient}-S{s + 1}"
                rows.append(_write_section(out, sid, patient, o, organ, genes, base[o], prog[o], offset,
                                           spots_per_section, patch_px, rng))
    pd.DataFrame(rows).to_csv(out / "HEST_v1_1_0.csv", index=False)
    return out


@SOURCES.register("synthetic")
def load_synthetic(
    *,
    n_organs: int = 3,
    patients_per_organ: int = 3,
    sections_per_patient: int = 1,
    spots_per_section: int = 120,
    n_genes: int = 60,
    patch_px: int = 32,
    seed: int = 0,
) -> SampleSet:
    """The synthetic dataset for these parameters, generated on first use into the cache, then read with load_hest."""
    from histomoe_core.data.hest import load_hest

    params = dict(n_organs=n_organs, patients_per_organ=patients_per_organ, sections_per_patient=sections_per_patient,
                  spots_per_section=spots_per_section, n_genes=n_genes, patch_px=patch_px, seed=seed)
    root = synthetic_dir(**params)
    if not (root / "HEST_v1_1_0.csv").is_file():
        with cache.atomic_dir(root) as tmp:
            make_synthetic(tmp, **params)
    ids = pd.read_csv(root / "HEST_v1_1_0.csv")["id"].astype(str).tolist()
    samples = load_hest(root=root, sample_ids=ids)
    samples.name = "synthetic"
    return samples


def synthetic_dir(**params) -> Path:
    """Cache folder of the synthetic dataset for ``params`` (content key of the parameters and this module's code)."""
    key = cache.content_key(params, cache.code_fingerprint(__name__))
    return paths.cache_dir() / "synthetic" / key


# --- a pan-cancer HEST-Bench fixture: real task sample ids, panels that differ per task -------------------------

#: task -> (organ, technology) of :func:`make_hest_pan`: Xenium-like targeted panels with control probes and a
#: Visium-like whole transcriptome
PAN_TASKS: dict[str, tuple[Organ, str]] = {
    "LUNG": (ORGANS[2], "Xenium"),
    "PAAD": (Organ("pancreas", "PAAD", "pancreatic adenocarcinoma", (230, 180, 215), 6.0, 60, 0.09, (1.0, 1.0, 0.95)),
             "Xenium"),
    "COAD": (ORGANS[1], "Visium"),
}
#: Xenium control probes and codewords written into every Xenium-like panel (never genes)
CONTROL_PROBES = ("BLANK_0001", "BLANK_0002", "BLANK_0003", "NegControlProbe_00001", "NegControlProbe_00002",
                  "NegControlCodeword_0500", "UnassignedCodeword_0001")


def pan_genes(task: str, technology: str, shipped: list[str]) -> list[str]:
    """The features of a fixture section: HEST's shipped list of the task plus a whole-transcriptome-like pool
    (Visium) or a task-own targeted panel and the control probes (Xenium)."""
    if technology == "Visium":
        return list(dict.fromkeys(shipped + [f"GENE{i:03d}" for i in range(1, 121)]))
    return list(dict.fromkeys(shipped + [f"{task}_PANEL{i:02d}" for i in range(1, 21)])) + list(CONTROL_PROBES)


def make_hest_pan(out_dir: Path, *, tasks: dict[str, tuple[Organ, str]] | None = None, spots_per_section: int = 40,
                  patch_px: int = 32, seed: int = 0) -> Path:
    """Write the samples of several HEST-Bench tasks (their real ids, from ``data_manifests/hest1k.yaml``) in HEST's
    layout, one patient per sample labelled ``"patient <j>"`` within a study per task (labels recur across
    studies, as in HEST). Expression follows the module's generative model with each task's own programs; the
    control probes get strong, varying counts so that a panel rule that kept them would pick them."""
    from histomoe_core.data.hest import hest_task

    out = Path(out_dir)
    for d in ("st", "patches", "metadata", "wsis"):
        (out / d).mkdir(parents=True, exist_ok=True)
    rows = []
    for t, (task, (organ, tech)) in enumerate((tasks or PAN_TASKS).items()):
        info = hest_task(task)
        genes = pan_genes(task, tech, info["genes"])
        base, prog = _programs(1, len(genes), seed + 7 * t + 1)
        ctrl = np.array([g in CONTROL_PROBES for g in genes])
        base[0, ctrl] += 1.0
        prog[0][:, ctrl] *= 2.5
        for j, sid in enumerate(info["samples"]):
            rng = np.random.default_rng([seed, 5, t, j])
            offset = rng.normal(0, PATIENT_SD, len(genes))
            meta = _write_section(out, sid, f"patient {j + 1}", 0, organ, genes, base[0], prog[0], offset,
                                  spots_per_section, patch_px, rng)
            meta |= {"patient": f"patient {j + 1}", "dataset_title": f"fixture {organ.name} study",
                     "st_technology": tech, "species": "Homo sapiens", "dataset": "hest1k", "organ": organ.name.title()}
            (out / "metadata" / f"{sid}.json").write_text(json.dumps(meta, indent=1))
            rows.append(meta)
    pd.DataFrame(rows).to_csv(out / "HEST_v1_1_0.csv", index=False)
    return out
