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
# # Scaling and reproducibility: GPU, Colab, torchrun and HEST-1k
#
# Everything in the previous chapters runs on a laptop CPU. This chapter says how the same code runs on a GPU,
# on Google Colab, on several GPUs with `torchrun`, and on the HEST-1k collection, and how the book keeps its
# results reproducible.

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
encoder = "efficientnet_lite0"
seed = 0
device = None  # None: the GPU when there is one, else the CPU
task = "IDC"  # HEST-Bench task shown in detail

# %%
import pandas as pd
from myst_nb import glue

from histomoe_core.book_reports import dependency_table, environment
from histomoe_core.data.hest import hest_task, task_names
from histomoe_core.data.hest_bench import BENCH_TASKS
from histomoe_core.embed import resolve_device

env = environment()
chosen = resolve_device(device)
glue("device", str(chosen), display=False)
env

# %% [markdown]
# ## On a GPU
#
# This run of the book used device **{glue:text}`device`**. Embedding (chapter {doc}`02_embeddings`, parameter
# `device`) and training (chapters 03 to 07) use the GPU whenever PyTorch sees one. On a GPU, embedding runs the
# encoder in bfloat16 autocast with `channels_last` tensors, and training uses bfloat16 mixed precision; on a
# CPU both run in float32. The precision is part of the embedding cache key, so CPU and GPU embeddings never
# mix. With a GPU, threads decode the next slides and crop patches while the encoder runs
# (`HISTOMOE_PATCH_THREADS`), since one thread cannot keep a GPU busy. On a CPU the benchmark fits several models at once in worker processes, one per core
# (`HISTOMOE_JOBS`); with a GPU it fits them one after the other on the GPU.
#
# Re-running the embeddings on a GPU machine, and checking the GPU path against the CPU path on the same
# sections (embedding agreement, throughput, and the same models trained on both devices):
#
# ```bash
# histomoe book --chapter 02 -p device=cuda
# python benchmarks/bench_gpu.py --json gpu.json
# ```
#
# ## On Google Colab
#
# The "Run this chapter" box under every chapter title opens the chapter in Colab: an unexecuted copy kept in
# the repository's `book/notebooks/` that asks for a GPU runtime. Its first code cell (hidden in this site,
# tagged `colab`) clones the repository and installs HistoMoE with `pip install -e`, and does nothing
# outside Colab. If Colab gives no GPU, choose *Runtime -> Change runtime type -> GPU*; the `device` parameter picks the GPU
# by itself. On Colab the her2st files are downloaded from their public repository and checked against the
# sha256 sums in `data_manifests/her2st.yaml`; pathology foundation models (`encoder="hf-hub:..."`) need a
# Hugging Face token with access to the model (`huggingface_hub.login()`).
#
# ## Several GPUs: torchrun
#
# The two heavy steps, embedding and training, recognise `torchrun`. Embedding shares the sections out over the
# ranks (balanced by spot count), each rank writes its part of the same content-addressed cache, and every rank
# then reads the whole result; an interrupted run resumes where it stopped:
#
# ```bash
# torchrun --nproc_per_node 4 -m histomoe_core.cli embed her2st --encoder efficientnet_lite2
# ```
#
# Training runs DistributedDataParallel when `WORLD_SIZE > 1`: each rank trains on its share of every batch,
# with the same batch order and validation data on every rank, so all ranks stop at the same epoch:
#
# ```bash
# torchrun --nproc_per_node 4 -m histomoe_core.train --data arrays.npz --config moe.json --out metrics.json
# ```
#
# Once the embeddings are cached, the book itself needs no GPU: it reads them back.
#
# ## HEST-1k and HEST-Bench
#
# HEST-1k {cite}`jaume2024hest` is a gated dataset on the Hugging Face hub (`MahmoodLab/hest`): accept its terms
# on the dataset page, log in (`huggingface-cli login`, or set `HF_TOKEN`), and HistoMoE downloads only the
# samples a task needs (expression, patches and metadata; the whole-slide images only on request), with
# `huggingface_hub.snapshot_download` at the revision pinned in `data_manifests/hest1k.yaml`. The first
# download records a sha256 of every file; later runs check the files against it. A local copy is used first
# when a folder `hest1k/` inside one of the `HISTOMOE_MIRRORS` holds it.
#
# ```bash
# histomoe book --profile hest                      # the IDC task
# histomoe book --profile hest -p "dataset_options={task: PRAD}" -p encoder=hf-hub:MahmoodLab/UNI
# ```
#
# HEST-Bench has {glue:text}`n_tasks` tasks, read below from the manifest with no network.
# {glue:text}`other_tasks` Each task has its folds split by patient and a shipped gene list:

# %%
tasks = [hest_task(name) for name in BENCH_TASKS]
others = [name for name in task_names() if name not in BENCH_TASKS]
glue("n_tasks", len(tasks), display=False)
glue("other_tasks", f"The manifest also lists {', '.join(others)}, which HEST-Bench later dropped; "
     f"{'it stays' if len(others) == 1 else 'they stay'} loadable on {'its' if len(others) == 1 else 'their'} own "
     f"but {'is' if len(others) == 1 else 'are'} left out of this table." if others else "", display=False)
table = {t["name"]: {"samples": len(t["samples"]), "patient folds": len(t["folds"]), "genes": len(t["genes"])} for t in tasks}
pd.DataFrame(table).T

# %% [markdown]
# The folds of task {glue:text}`task_name`, as sample ids:

# %%
detail = hest_task(task)
glue("task_name", detail["name"], display=False)
pd.DataFrame([{"fold": f.name, "train": ", ".join(f.train), "test": ", ".join(f.test)} for f in detail["folds"]]).set_index("fold")

# %% [markdown]
# HEST chose each task's gene list on all of the task's samples, test folds included. HistoMoE picks its gene
# panel on the training fold only, by default; the shipped lists remain an option for comparing with published
# numbers.
#
# ## Reproducibility
#
# * **One command.** `make book` creates the environment, fetches and verifies the data, and executes every
#   chapter; `make test` builds this book on synthetic data as part of the tests.
# * **Content-addressed caching.** Embeddings, trained models and executed chapters are stored under keys that
#   hash what they depend on. A chapter's key covers its source, its parameters, the dataset manifest and the
#   source of the `histomoe_core` modules it imports; the table below lists those modules, so editing one
#   re-executes exactly the chapters that list it.
# * **Seeds.** Every chapter takes a `seed`; benchmark tables report the spread over seeds and folds.
# * **Versions.** The environment table at the top of this chapter records the library versions and hardware
#   of this build.

# %%
dependency_table()
