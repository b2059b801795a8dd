"""interpret.Attributor: attribution shapes, IG convergence delta, and exact answers on a linear model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histomoe_core.encoders import create_encoder
from histomoe_core.interpret import Attributor
from histomoe_core.moe import HistoMoE, HistoMoEEndToEnd, MoEConfig

PX = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    enc = create_encoder("tiny")
    moe = HistoMoE(MoEConfig(in_dim=enc.embed_dim, n_genes=5, n_experts=3, expert="mlp", hidden=16, dropout=0.1))
    return HistoMoEEndToEnd(enc, moe)


@pytest.fixture(scope="module")
def patches():
    rng = np.random.default_rng(0)
    p = rng.integers(0, 256, (3, PX, PX, 3), dtype=np.uint8)
    p[:, 8:24, 8:24] = [120, 40, 140]  # a purple "nucleus" block on noise
    return p


@pytest.mark.parametrize("method", ["ig", "gradient_shap", "occlusion"])
@pytest.mark.parametrize("of,target", [("gene", "G3"), ("gate", "e1")])
def test_attribution_shapes(model, patches, method, of, target):
    attr = Attributor(model, genes=[f"G{i}" for i in range(5)])
    res = attr.attribute(patches, target=target, of=of, method=method, n_steps=16, n_samples=4, window=8, stride=4)
    assert res.values.shape == (3, 3, PX, PX)
    assert np.isfinite(res.values).all()
    assert res.heatmap().shape == (3, PX, PX)
    assert res.output.shape == res.baseline_output.shape == (3,)
    assert res.target == (3 if of == "gene" else 1) and res.target_name == target
    if method == "ig":
        assert res.delta.shape == (3,)
    else:  # GradientSHAP's per-sample deltas are not a convergence measure; occlusion has none
        assert res.delta is None
    assert not model.training  # attributions run in eval mode (dropout off)


def test_ig_convergence_delta_small_and_complete(model, patches):
    attr = Attributor(model)
    for of, target in (("gene", 2), ("gate", 0)):
        coarse = attr.attribute(patches, target=target, of=of, method="ig", n_steps=2)
        fine = attr.attribute(patches, target=target, of=of, method="ig", n_steps=256, internal_batch_size=64)
        # completeness: attributions add up to f(x) - f(baseline) up to the reported delta
        total = fine.values.reshape(3, -1).sum(1)
        np.testing.assert_allclose(total - (fine.output - fine.baseline_output), fine.delta, atol=1e-5)
        assert np.abs(fine.delta).mean() < np.abs(coarse.delta).mean() / 20  # measured: 200x (gene), 150x (gate)
        if of == "gene":  # (a gate barely moves between patch and blurred patch: its relative delta is ill-posed)
            assert fine.relative_delta.max() < 0.02  # measured: 0.0005
        assert fine.summary()["max_relative_delta"] == pytest.approx(float(fine.relative_delta.max()))


class _LinearEncoder(nn.Module):
    """Flatten + linear: with one linear expert the whole model is linear in the pixels."""

    embed_dim = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(3 * 8 * 8, self.embed_dim)

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def test_linear_model_exact_answers():
    moe = HistoMoE(MoEConfig(in_dim=4, n_genes=2, n_experts=1, expert="linear", dropout=0.0))
    m = HistoMoEEndToEnd(_LinearEncoder(), moe).eval()
    x = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    attr = Attributor(m)
    xt = attr.preprocess(x).requires_grad_(True)
    m(xt).pred[:, 1].sum().backward()
    grad = xt.grad.numpy()
    base = attr.preprocess(np.full((1, 8, 8, 3), 255, np.uint8)).numpy()
    expected = (xt.detach().numpy() - base) * grad  # IG of a linear function, whatever the step count
    ig = attr.attribute(x, target=1, method="ig", n_steps=4, baselines="white")
    np.testing.assert_allclose(ig.values, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ig.delta, 0.0, atol=1e-4)
    # occluding one pixel (all channels) at a time removes exactly that pixel's contribution
    occ = attr.attribute(x, target=1, method="occlusion", window=1, stride=1, baselines="white")
    np.testing.assert_allclose(occ.values[:, 0], expected.sum(axis=1), rtol=1e-3, atol=1e-5)
    # a single routed expert has gate weight 1 everywhere: nothing in the image moves it
    gate = attr.attribute(x, target=0, of="gate", method="ig", n_steps=4, baselines="white")
    np.testing.assert_allclose(gate.values, 0.0, atol=1e-7)


def test_metadata_router_gate_has_zero_attribution(patches):
    enc = create_encoder("tiny")
    moe = HistoMoE(MoEConfig(in_dim=enc.embed_dim, n_genes=2, n_experts=2, meta_dim=3, router_input="meta", dropout=0.0))
    attr = Attributor(HistoMoEEndToEnd(enc, moe), meta_emb=np.array([1.0, 0.0, 0.0], np.float32))
    for method in ("ig", "occlusion"):
        res = attr.attribute(patches, target=1, of="gate", method=method, n_steps=4, window=8, stride=8)
        assert res.values.shape == (3, 3, PX, PX) and not res.values.any()
        np.testing.assert_allclose(res.output, res.baseline_output)
    gene = attr.attribute(patches, target=0, of="gene", method="ig", n_steps=4)
    assert np.abs(gene.values).sum() > 0  # the experts still read the image


def test_retrieval_change_bounds_ig_delta():
    """A retrieval expert is piecewise constant in the pixels: IG cannot credit its jumps."""
    enc = create_encoder("tiny")
    torch.manual_seed(0)
    moe = HistoMoE(MoEConfig(in_dim=enc.embed_dim, n_genes=2, n_experts=1, expert="linear", retrieval_k=1, dropout=0.0))
    rng = np.random.default_rng(3)
    bank = torch.as_tensor(rng.normal(size=(40, enc.embed_dim)), dtype=torch.float32)
    moe.fit_input(bank).set_bank(bank, torch.as_tensor(rng.normal(size=(40, 2)) * 5, dtype=torch.float32))
    attr = Attributor(HistoMoEEndToEnd(enc, moe))
    p = rng.integers(0, 256, (2, PX, PX, 3), dtype=np.uint8)
    jump = attr.retrieval_change(p, target=0)
    res = attr.attribute(p, target=0, method="ig", n_steps=64)
    assert np.abs(jump).max() > 0.05  # the nearest training spot differs between patch and white baseline
    # what IG misses is (close to) the retrieval part's change, weighted by its gate
    np.testing.assert_allclose(res.delta, -jump, atol=0.1 * np.abs(jump).max())  # measured: within 0.1%
    no_retrieval = Attributor(HistoMoEEndToEnd(enc, HistoMoE(MoEConfig(in_dim=enc.embed_dim, n_genes=2))))
    assert not no_retrieval.retrieval_change(p, target=0).any()


def test_bad_inputs(model, patches):
    attr = Attributor(model, genes=[f"G{i}" for i in range(5)])
    with pytest.raises(KeyError, match="unknown gene"):
        attr.attribute(patches, target="NOPE")
    with pytest.raises(IndexError):
        attr.attribute(patches, target=3, of="gate")
    with pytest.raises(ValueError, match="unknown method"):
        attr.attribute(patches, target=0, method="saliency")
    with pytest.raises(ValueError, match="uint8"):
        attr.attribute(patches.astype(np.float32), target=0)
    with pytest.raises(TypeError, match="end-to-end"):
        Attributor(model.moe)
