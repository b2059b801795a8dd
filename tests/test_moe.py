"""HistoMoE modules: shapes, gates, top-k sparsity, auxiliary losses, gradients, reload, end-to-end."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from histomoe_core.moe import (
    EXPERTS,
    HistoMoE,
    HistoMoEEndToEnd,
    MoEConfig,
    count_parameters,
    gate_entropy,
    switch_balance_loss,
)

D, M, G, B = 12, 6, 5, 9


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest and avoids oversubscribing a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make(**kw) -> HistoMoE:
    torch.manual_seed(0)
    cfg = MoEConfig(in_dim=D, n_genes=G, meta_dim=M, **{"n_experts": 3, "hidden": 8, **kw})
    return HistoMoE(cfg)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(B, M, generator=g), torch.arange(B) % 3


CONFIGS = [
    dict(),
    dict(top_k=1),
    dict(top_k=2, noisy_gating=True, router_input="both"),
    dict(expert="linear", router_input="meta", shared_expert=True),
    dict(router_hidden=7, shared_expert=True, shared_hidden=4, pca_dim=4, retrieval_k=3, top_k=2),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_shapes_and_gate_rows_sum_to_one(kw):
    m = make(**kw)
    if m.retrieval is not None:
        m.set_bank(torch.randn(20, D), torch.randn(20, G))
    x, meta, ctx = batch()
    for mode in (True, False):
        m.train(mode)
        out = m(x, meta, ctx)
        e = m.cfg.n_routed
        assert out.pred.shape == (B, G)
        assert out.gates.shape == (B, e) and out.expert_preds.shape == (B, e, G)
        assert torch.allclose(out.gates.sum(1), torch.ones(B), atol=1e-6)
        assert (out.gates >= 0).all()
        mix = torch.einsum("be,beg->bg", out.gates, out.expert_preds)
        if out.shared_pred is not None:
            mix = mix + out.shared_pred
        assert torch.allclose(out.pred, mix, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_gates_have_exactly_k_nonzeros(k):
    m = make(n_experts=4, top_k=k, noisy_gating=True).train()
    out = m(*batch())
    assert ((out.gates > 0).sum(1) == k).all()
    # the chosen experts are the k largest (clean, in eval) logits
    m.eval()
    out = m(*batch())
    chosen = out.gates.topk(k, dim=1).indices.sort(1).values
    assert torch.equal(chosen, out.logits.topk(k, dim=1).indices.sort(1).values)


def test_soft_routing_is_dense():
    out = make(n_experts=4).train()(*batch())
    assert ((out.gates > 0).sum(1) == 4).all()


@pytest.mark.parametrize("k", [None, 1, 2])
def test_balance_loss_is_one_under_uniform_routing(k):
    m = make(n_experts=4, top_k=k).train()
    with torch.no_grad():  # zero router -> equal logits -> uniform probabilities
        m.router.net.weight.zero_()
        m.router.net.bias.zero_()
    out = m(*batch())
    assert out.aux["balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert out.aux["z"].item() == pytest.approx(math.log(4) ** 2, rel=1e-5)


def test_balance_loss_is_e_when_collapsed():
    probs = torch.zeros(8, 4)
    probs[:, 2] = 1.0
    assert switch_balance_loss(probs, probs).item() == pytest.approx(4.0)


def test_no_aux_losses_in_eval():
    m = make(guide_weight=1.0, n_contexts=3).eval()
    assert m(*batch()).aux == {}
    m.train()
    assert set(m(*batch()).aux) == {"balance", "z", "guide"}
    x, meta, _ = batch()
    assert "guide" not in m(x, meta).aux  # no context, no guided loss


@pytest.mark.parametrize("kw", CONFIGS)
def test_every_parameter_receives_a_gradient(kw):
    m = make(**{**kw, "guide_weight": 0.1, "n_contexts": 3}).train()
    if m.retrieval is not None:
        m.set_bank(torch.randn(20, D), torch.randn(20, G))
    x, meta, ctx = batch()
    out = m(x, meta, ctx)
    loss, parts = m.loss(out, torch.randn(B, G))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    zero = [n for n, p in m.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero
    assert set(parts) >= {"mse", "balance", "z"}


def test_guided_loss_targets_the_context_expert():
    m = make(n_experts=3, n_contexts=3, expert_of_context=(2, 0, 1), router_input="meta", guide_weight=1.0).train()
    opt = torch.optim.Adam(m.router.parameters(), lr=0.05)
    meta = torch.eye(3).repeat(4, 1)
    meta = torch.cat([meta, torch.zeros(12, M - 3)], 1)
    ctx = torch.arange(12) % 3
    x = torch.randn(12, D)
    for _ in range(100):
        out = m(x, meta, ctx)
        opt.zero_grad()
        out.aux["guide"].backward()
        opt.step()
    m.eval()
    top = m(x, meta).gates.argmax(1)
    assert torch.equal(top, torch.tensor([2, 0, 1])[ctx])


def test_router_input_validation():
    with pytest.raises(ValueError, match="meta_dim"):
        MoEConfig(in_dim=D, n_genes=G, router_input="meta")
    m = make(router_input="meta")
    with pytest.raises(ValueError, match="meta_emb"):
        m(torch.randn(B, D))
    with pytest.raises(ValueError, match="img_emb"):
        m(torch.randn(B, D + 1), torch.randn(B, M))
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(in_dim=D, n_genes=G, n_experts=2, top_k=3)
    # one metadata vector for the whole batch is broadcast
    out = m.eval()(torch.randn(B, D), torch.randn(M))
    assert out.gates.shape == (B, 3) and torch.allclose(out.gates, out.gates[:1].expand(B, -1))


def test_input_norm_pca_and_reload_roundtrip():
    m = make(pca_dim=4, retrieval_k=2, top_k=2)
    xtr = torch.randn(40, D) * 3 + 1
    m.fit_input(xtr).set_bank(xtr, torch.randn(40, G), torch.arange(40) % 2)
    z = m.features(xtr)
    assert z.shape == (40, 4)
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-4)
    # principal components are orthonormal and ordered by variance
    comps = m.input_norm.components
    assert torch.allclose(comps.T @ comps, torch.eye(4), atol=1e-5)
    v = z.var(0)
    assert (v[:-1] >= v[1:] - 1e-5).all()
    m2 = HistoMoE(MoEConfig.from_dict(m.cfg.as_dict()))
    m2.load_state_dict(m.state_dict())
    m.eval(), m2.eval()
    x, meta, _ = batch()
    assert torch.allclose(m(x, meta).pred, m2(x, meta).pred)


def test_retrieval_expert_averages_neighbours_and_excludes_own_group():
    m = make(retrieval_k=1, n_experts=1)
    bank = torch.eye(D)[:4] * 5
    ys = torch.arange(4 * G, dtype=torch.float32).view(4, G)
    m.set_bank(bank, ys, torch.tensor([0, 0, 1, 1]))
    q = bank[:1] + 0.01  # nearest is spot 0 (group 0)
    assert torch.allclose(m.retrieval(m.features(q))[:, 0], ys[0])
    got = m.retrieval(m.features(q), torch.tensor([0]))[:, 0]  # spot 0 and 1 are of the query's group
    assert got.shape == (1, G) and not torch.allclose(got, ys[0]) and not torch.allclose(got, ys[1])


def test_experts_registry_and_parameter_count():
    assert {"linear", "mlp"} <= set(EXPERTS.list())
    m = make(expert="linear", n_experts=2, shared_expert=False)
    # router (D+1)*2 + experts 2*(D*G + G)
    assert count_parameters(m) == (D + 1) * 2 + 2 * (D * G + G)
    with pytest.raises(KeyError, match="unknown expert"):
        make(expert="transformer")


def test_gate_entropy_bounds():
    assert gate_entropy(torch.full((3, 4), 0.25)) == pytest.approx(math.log(4))
    assert gate_entropy(torch.eye(4)) == pytest.approx(0.0, abs=1e-9)


class TinyEncoder(nn.Module):
    embed_dim = D

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, D, 3, stride=2)
        self.norm = nn.BatchNorm2d(D)

    def forward(self, x):
        return self.norm(self.conv(x)).mean((2, 3))


def test_end_to_end_trains_encoder_and_moe_together():
    torch.manual_seed(0)
    e2e = HistoMoEEndToEnd(TinyEncoder(), make(router_input="both")).train()
    out = e2e(torch.randn(B, 3, 16, 16), torch.randn(B, M))
    loss, _ = e2e.moe.loss(out, torch.randn(B, G))
    loss.backward()
    assert e2e.encoder.conv.weight.grad is not None and e2e.encoder.conv.weight.grad.abs().sum() > 0
    frozen = HistoMoEEndToEnd(TinyEncoder(), make(), freeze_encoder=True).train()
    assert not frozen.encoder.training and frozen.moe.training
    assert count_parameters(frozen) == count_parameters(frozen.moe)
    with pytest.raises(ValueError, match="embed_dim"):
        HistoMoEEndToEnd(TinyEncoder(), HistoMoE(MoEConfig(in_dim=D + 1, n_genes=G)))


def test_several_retrieval_experts_one_per_k():
    m = make(n_experts=2, retrieval_k=(1, 3), top_k=None)
    assert m.cfg.n_routed == 4
    bank = torch.eye(D)[:4] * 5
    ys = torch.arange(4 * G, dtype=torch.float32).view(4, G)
    m.set_bank(bank, ys)
    q = bank[:1] + 0.2 * torch.eye(D)[1] + 0.1 * torch.eye(D)[2]  # nearest: spots 0, 1, 2, then 3
    out = m.eval()(q, torch.randn(1, M))
    assert out.expert_preds.shape == (1, 4, G)
    assert torch.allclose(out.expert_preds[0, 2], ys[0])  # k = 1
    assert torch.allclose(out.expert_preds[0, 3], ys[:3].mean(0))  # k = 3
    cfg = MoEConfig.from_dict(m.cfg.as_dict())
    assert cfg.retrieval_ks == (1, 3)


def test_precomputed_retrieval_outputs_and_features_give_the_same_forward():
    """A trainer passes the input transform and the retrieval experts' fixed output once per fit; the forward
    must not change."""
    m = make(pca_dim=4, retrieval_k=(2, 5), top_k=None)
    xtr, group = torch.randn(30, D), torch.arange(30) % 3
    m.fit_input(xtr).set_bank(xtr, torch.randn(30, G), group)
    x, meta, ctx = batch()
    q_group = torch.arange(B) % 3
    for train in (True, False):
        m.train(train)
        torch.manual_seed(3)
        ref = m(x, meta, ctx, query_group=q_group if train else None)
        known = m.retrieval_outputs(x, q_group if train else None, batch_size=4)  # batching must not matter
        torch.manual_seed(3)
        out = m(x, meta, ctx, query_group=q_group if train else None, retrieval_preds=known)
        assert torch.allclose(out.pred, ref.pred) and torch.allclose(out.expert_preds, ref.expert_preds)
        torch.manual_seed(3)
        given = m(x, meta, ctx, query_group=q_group if train else None, retrieval_preds=known, features=m.features(x))
        assert torch.allclose(given.pred, ref.pred)
        moved = m(x, meta, ctx, query_group=q_group if train else None, retrieval_preds=known + 1.0)
        assert torch.allclose(moved.expert_preds[:, -2:], known + 1.0)  # what is passed is what is used
    assert make(retrieval_k=0).retrieval_outputs(x) is None


@pytest.mark.parametrize("expert", ["mlp", "linear"])
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_training_computes_only_routed_experts_with_the_dense_result(expert, k, monkeypatch):
    """Under top-k routing a training step evaluates only the k routed experts of each spot; the prediction, the
    loss and every gradient equal those of the dense computation of all experts."""
    from histomoe_core import moe as moe_mod

    x, meta, ctx = batch()
    y = torch.randn(B, G, generator=torch.Generator().manual_seed(5))
    routed = moe_mod.routed_expert_preds
    pairs = []

    def counted(experts, x_, active, out_dim):
        pairs.append(int(active.sum()))
        return routed(experts, x_, active, out_dim)

    def dense(experts, x_, active, out_dim):  # the computation before: every expert on every spot
        return experts(x_)

    results = []
    for impl in (counted, dense):
        monkeypatch.setattr(moe_mod, "routed_expert_preds", impl)
        m = make(n_experts=4, top_k=k, expert=expert, dropout=0.0, router_input="both").train()
        out = m(x, meta, ctx)
        loss, _ = m.loss(out, y)
        loss.backward()
        results.append((out.pred.detach(), loss.item(), {n: p.grad for n, p in m.named_parameters()}))
    assert pairs == [B * k]  # B * k (spot, expert) pairs evaluated, against B * 4 densely
    (p1, l1, g1), (p0, l0, g0) = results
    assert torch.allclose(p1, p0, atol=1e-5) and math.isclose(l1, l0, rel_tol=1e-5)
    assert g1.keys() == g0.keys()
    for name in g1:
        assert (g1[name] is None) == (g0[name] is None), name
        if g1[name] is not None:
            assert torch.allclose(g1[name], g0[name], atol=1e-5), name
    assert g1["experts.bias" if expert == "linear" else "experts.b2"].abs().sum() > 0  # experts did learn
