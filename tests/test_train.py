"""The training loop: seeding, early stopping, checkpoints and resume, ridge start, retrieval exclusion, DDP."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from histomoe_core.features import FoldData
from histomoe_core.train import MoERegressor, TrainConfig, fit, predict_arrays

REPO = Path(__file__).resolve().parents[1]


def toy(n=240, d=16, g=5, seed=0, patients=("A", "B", "C"), noise=0.3) -> tuple[FoldData, FoldData]:
    """Two contexts with different linear maps; train on three patients, test on a fourth."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(2, d, g)) / np.sqrt(d)

    def part(m, pats):
        x = rng.normal(size=(m, d)).astype(np.float32)
        ctx = rng.integers(0, 2, size=m)
        y = np.einsum("nd,ndg->ng", x, w[ctx]) + noise * rng.normal(size=(m, g))
        pat = np.array(pats)[np.arange(m) % len(pats)]
        meta = np.eye(2, dtype=np.float32)[ctx]
        return FoldData(x, meta, ctx.astype(np.int64), y.astype(np.float32), pat, pat, np.arange(m).astype(str),
                        tuple(f"g{i}" for i in range(g)), ("c0", "c1"))

    return part(n, patients), part(n // 2, ("D",))


FAST = dict(epochs=12, batch_size=64, patience=4, lr=3e-3)


def test_same_seed_same_model_and_different_seed_differs():
    tr, te = toy()
    a = MoERegressor(n_experts=2, hidden=8, train=FAST).fit(tr, seed=1).predict(te)
    b = MoERegressor(n_experts=2, hidden=8, train=FAST).fit(tr, seed=1).predict(te)
    c = MoERegressor(n_experts=2, hidden=8, train=FAST).fit(tr, seed=2).predict(te)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_training_learns_and_early_stopping_selects_an_epoch():
    tr, te = toy()
    est = MoERegressor(n_experts=2, hidden=16, router_input="meta", train={**FAST, "epochs": 40, "patience": 5}).fit(tr)
    r = np.mean([np.corrcoef(te.y[:, j], est.predict(te)[:, j])[0, 1] for j in range(te.y.shape[1])])
    assert r > 0.5
    vals = [h["val"] for h in est.history if "val" in h]
    assert 1 <= est.best_epoch <= len(vals) and vals[est.best_epoch - 1] == pytest.approx(max(vals))
    # the selection phase validated on every held-out patient (lockstep), then refit on all for best_epoch epochs
    assert len(next(h for h in est.history if "val" in h)["val_folds"]) == 3
    assert any(h.get("refit_epochs") == est.best_epoch for h in est.history)
    # pure noise: validation never improves for long, training stops early
    noise = FoldData(tr.x, tr.meta, tr.context, np.random.default_rng(5).normal(size=tr.y.shape).astype(np.float32),
                     tr.sample, tr.patient, tr.spot, tr.genes, tr.contexts)
    est = MoERegressor(n_experts=2, hidden=8, train={**FAST, "epochs": 60, "patience": 3, "refit": False}).fit(noise)
    assert len([h for h in est.history if "val" in h]) < 60


def test_checkpoint_resume_gives_the_uninterrupted_result(tmp_path):
    tr, te = toy()
    est = MoERegressor(n_experts=2, hidden=8, dropout=0.2, train={**FAST, "ckpt_every": 1, "patience": 100})
    ref = fit(est.build, tr, est.train_cfg, seed=3)

    class Stop(Exception):
        pass

    def interrupt(epoch, logs):
        if epoch == 5 and "val" in logs:
            raise Stop

    with pytest.raises(Stop):
        fit(est.build, tr, est.train_cfg, seed=3, checkpoint_dir=tmp_path, callback=interrupt)
    assert (tmp_path / "select.pt").exists()
    seen = []
    res = fit(est.build, tr, est.train_cfg, seed=3, checkpoint_dir=tmp_path, callback=lambda e, l: seen.append(e))
    assert seen[0] == 5  # resumed after the last checkpoint (epoch 4), not from scratch
    a = predict_arrays(ref.model, te)["pred"]
    b = predict_arrays(res.model, te)["pred"]
    assert res.best_epoch == ref.best_epoch
    assert np.allclose(a, b, atol=1e-6)


def test_ridge_start_predicts_the_ridge_solution_before_training():
    from histomoe_core.baselines import RidgeCV

    tr, te = toy()
    est = MoERegressor(n_experts=3, expert="linear", init="ridge", ridge_alpha=10.0)
    model = est.build(tr).eval()
    ridge = RidgeCV(n_components=None, alpha=10.0).fit(tr)
    got = predict_arrays(model, te)["pred"]
    assert np.allclose(got, ridge.predict(te), atol=1e-3)
    # shared ridge expert + zeroed MLP experts: same starting point
    est = MoERegressor(n_experts=2, hidden=8, shared_expert=True, init="ridge", ridge_alpha=10.0, freeze_init=True)
    model = est.build(tr).eval()
    assert np.allclose(predict_arrays(model, te)["pred"], ridge.predict(te), atol=1e-3)
    assert not any(p.requires_grad for p in model.shared.parameters())


def test_retrieval_expert_never_retrieves_the_own_patient_in_training():
    tr, _ = toy()
    est = MoERegressor(n_experts=1, hidden=4, retrieval_k=1)
    model = est.build(tr)
    # in training each spot's nearest neighbour would be itself; with exclusion it is another patient's spot
    x = torch.as_tensor(tr.x)
    feats = model.features(x)
    group = torch.as_tensor(tr.groups("patient"))
    own = model.retrieval(feats)[:, 0]
    excl = model.retrieval(feats, group)[:, 0]
    assert torch.allclose(own, torch.as_tensor(tr.y))
    assert not torch.allclose(excl, torch.as_tensor(tr.y))
    sim = torch.nn.functional.normalize(feats, dim=1) @ model.retrieval.bank_x.T
    sim[group[:, None] == model.retrieval.bank_group[None]] = -2
    assert torch.allclose(excl, model.retrieval.bank_y[sim.argmax(1)])


def test_train_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown TrainConfig"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="init"):
        MoERegressor(init="pca")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_match_one_process(tmp_path):
    tr, te = toy(n=200)
    arrays = {}
    for prefix, d in (("train", tr), ("test", te)):
        for k in ("x", "y", "meta", "context", "sample", "patient"):
            arrays[f"{prefix}_{k}"] = np.asarray(getattr(d, k)).astype(str) if k in ("sample", "patient") else getattr(d, k)
    np.savez(tmp_path / "arrays.npz", **arrays)
    (tmp_path / "cfg.json").write_text(json.dumps({"n_experts": 2, "hidden": 8, "dropout": 0.0, "router_input": "both",
                                                   "train": {"epochs": 6, "batch_size": 64, "patience": 100}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = ["--data", str(tmp_path / "arrays.npz"), "--config", str(tmp_path / "cfg.json"), "--seed", "0"]
    subprocess.run([sys.executable, "-m", "histomoe_core.train", *common, "--out", str(tmp_path / "one.json")],
                   check=True, env=env, cwd=REPO, timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_free_port()), "-m", "histomoe_core.train", *common, "--out", str(tmp_path / "two.json")],
                   check=True, env=env, cwd=REPO, timeout=180, capture_output=True)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["best_epoch"] == two["best_epoch"]
    assert two["pearson"] == pytest.approx(one["pearson"], abs=0.01)
    assert two["mse"] == pytest.approx(one["mse"], rel=0.02)
