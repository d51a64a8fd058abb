"""MoFME's parts: feature-modulation experts = a naive reference under every dispatcher (forward and backward), the
MoEFiLM layer = its definition, MoFME's router = renormalised top-k, the uncertainty-aware router's two modes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vision_moe.moe import (
    DISPATCHERS,
    FiLMExperts,
    MoEFiLM,
    NaiveDispatcher,
    SharedRouter,
    UncertaintyRouter,
    capacity_keep_mask,
    create_dispatcher,
)


def _film_reference(experts: FiLMExperts, x, idx, w, keep=None):
    """Token by token, slot by slot: sum_j w[s, j] * (gamma_e(x) * x + beta_e(x)), e = idx[s, j]."""
    rows = []
    for s in range(x.shape[0]):
        y = torch.zeros_like(x[s])
        for j in range(idx.shape[1]):
            if keep is not None and not keep[s, j]:
                continue
            e = int(idx[s, j])
            gamma = x[s] @ experts.gamma.weight[e] + experts.gamma.bias[e]
            beta = x[s] @ experts.beta.weight[e] + experts.beta.bias[e]
            y = y + w[s, j] * (gamma * x[s] + beta)
        rows.append(y)
    return torch.stack(rows)


def _random_experts(e, d, seed):
    torch.manual_seed(seed)
    ex = FiLMExperts(e, d)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.5)  # away from the near-identity init, so every term matters
    return ex


@settings(max_examples=30, deadline=None)
@given(
    e=st.integers(1, 7),
    k_frac=st.floats(0.0, 1.0),
    n=st.integers(1, 12),
    groups=st.integers(1, 3),
    cap=st.one_of(st.none(), st.integers(1, 8)),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(DISPATCHERS)),
)
def test_film_experts_equal_the_reference_under_every_dispatcher(e, k_frac, n, groups, cap, seed, name):
    k = 1 + int(k_frac * (e - 1))
    s = n * groups
    experts = _random_experts(e, 6, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, 6, generator=g, requires_grad=True)
    w, idx = torch.randn(s, e, generator=g).softmax(-1).topk(k, dim=-1)
    w = w.detach().requires_grad_(True)
    keep = capacity_keep_mask(idx, e, cap, group_size=n)

    ref = _film_reference(experts, x, idx, w, keep)
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, w, experts.gamma.weight, experts.beta.bias))
    out = create_dispatcher(name)(x, idx, w, experts, keep, capacity=cap, group_size=n)
    grads = torch.autograd.grad(out.square().sum(), (x, w, experts.gamma.weight, experts.beta.bias))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_film_experts_select_and_parameter_count():
    ex = _random_experts(5, 4, 0)
    keep = torch.tensor([3, 0])
    sub = ex.select(keep)
    x = torch.randn(7, 4)
    for i, e in enumerate(keep.tolist()):
        torch.testing.assert_close(sub.forward_expert(i, x), ex.forward_expert(e, x))
    # gamma and beta are d -> d: 2 d^2 (+ 2 d bias) per expert, a quarter of an FFN expert d -> 4d -> d
    assert sum(p.numel() for p in ex.parameters()) == 5 * (2 * 4 * 4 + 2 * 4)


def test_film_experts_start_as_the_identity_modulation():
    ex = FiLMExperts(3, 8)  # gamma bias 1, beta bias 0, weights ~ N(0, .02): e(h) ~= h
    assert torch.equal(ex.gamma.bias, torch.ones(3, 8)) and torch.equal(ex.beta.bias, torch.zeros(3, 8))
    h = 0.1 * torch.randn(10, 8)
    for e in range(3):
        torch.testing.assert_close(ex.forward_expert(e, h), h, atol=0.02, rtol=0.0)


def test_moe_film_layer_is_its_definition():
    """y = adaptor(sum_j w_j e_j(act(W1 x) * W2 x)) with MoFME's router on x; every dispatcher the same."""
    torch.manual_seed(0)
    layer = MoEFiLM(8, 32, num_experts=4, top_k=2, tasks=("derain",)).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 5, 8)
    flat = x.reshape(-1, 8)
    r = layer.router(flat)
    h = F.gelu(layer.w1(flat)) * layer.w2(flat)
    mixed = _film_reference(layer.experts, h, r.expert_index, r.combine_weights)
    ref = layer.adaptor.fc2(F.gelu(layer.adaptor.fc1(mixed))).reshape(2, 5, 8)
    for name in sorted(DISPATCHERS):
        layer.set_dispatcher(name)
        y, aux = layer(x, "derain")
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
        assert aux.task == "derain" and aux.expert_index.shape == (10, 2)
    y_none, aux_none = layer(x)  # a task-independent router runs without a task
    torch.testing.assert_close(y_none, ref, atol=1e-5, rtol=1e-4)
    assert aux_none.task is None


def test_dense_path_exports_with_static_shapes():
    """The dense dispatcher (every expert on every token, the reference's computation) has no data-dependent ops:
    torch.export traces it, and the exported program equals the eager layer."""
    torch.manual_seed(0)
    layer = MoEFiLM(8, 16, num_experts=4, top_k=2, tasks=("derain",), dispatcher="dense").eval()
    x = torch.randn(1, 6, 8)

    class Out(torch.nn.Module):  # routing and the experts (the routing record's statistics are not exported)
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, a):
            r = self.layer.router(a.reshape(-1, a.shape[-1]))
            return self.layer.apply_experts(a, r.expert_index, r.combine_weights)[0]

    prog = torch.export.export(Out(), (x,), strict=False)
    ops = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
    data_dependent = ("nonzero", "index_put", "masked_select", "bincount", "item", "_local_scalar_dense")
    assert not [o for o in ops if o.startswith("aten.") and o.split(".")[1] in data_dependent], ops
    torch.testing.assert_close(prog.module()(x), layer(x)[0])
    layer.set_dispatcher("sort")  # the sparse path is data-dependent (shows the check can fail)
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(Out(), (x,), strict=False)


def test_mofme_router_is_renormalised_top_k():
    """MoFME's router: linear, the non-top-k logits set to -inf, softmax == the full softmax renormalised over
    the top k (and the reference's KeepTopK + Softmax)."""
    torch.manual_seed(0)
    router = SharedRouter(8, 6, 3, renormalize=True, noise_std=0.0, bias=True).train()  # no noise even in training
    x = torch.randn(20, 8)
    r = router(x)
    logits = router.gate.proj(x)
    kth = logits.topk(3, dim=-1).values[:, -1:]
    keep_topk = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)  # the reference's KeepTopK + Softmax
    torch.testing.assert_close(keep_topk.gather(-1, r.expert_index), r.combine_weights)
    torch.testing.assert_close(r.combine_weights.sum(-1), torch.ones(20))
    full = logits.softmax(-1).gather(-1, r.expert_index)
    torch.testing.assert_close(full / full.sum(-1, keepdim=True), r.combine_weights)
    with pytest.raises(ValueError, match="unknown task 'dehaze'"):
        SharedRouter(8, 6, 3, ("derain",))(x, "dehaze")


def test_uncertainty_router_deterministic_in_eval_sampled_in_training():
    torch.manual_seed(0)
    unc = UncertaintyRouter(8, 6, 2, samples=4, dropout=0.3, renormalize=True, noise_std=0.0, bias=True)
    plain = SharedRouter(8, 6, 2, renormalize=True, noise_std=0.0, bias=True)
    plain.load_state_dict(unc.state_dict())
    x = torch.randn(32, 8)
    e1, e2 = unc.eval()(x), unc(x)
    assert torch.equal(e1.combine_weights, e2.combine_weights) and torch.equal(e1.expert_index, e2.expert_index)
    p = plain.eval()(x)  # eval mode: exactly MoFME's plain router (exports are unaffected)
    assert torch.equal(e1.expert_index, p.expert_index)
    torch.testing.assert_close(e1.combine_weights, p.combine_weights)

    unc.train()
    torch.manual_seed(1)
    t1 = unc(x)
    torch.manual_seed(2)
    t2 = unc(x)
    assert not torch.allclose(t1.combine_weights, t2.combine_weights)  # MC-dropout samples differ
    assert not torch.allclose(t1.combine_weights, e1.combine_weights)
    torch.testing.assert_close(t1.combine_weights.sum(-1), torch.ones(32))

    # the documented formula, recomputed from the same dropout draws
    torch.manual_seed(1)
    drawn = torch.stack([unc.gate.proj(F.dropout(x, 0.3, training=True)) for _ in range(4)]).softmax(-1)
    mean, spread = drawn.mean(0), drawn.std(0, unbiased=False)
    score = mean * torch.exp(-spread / mean)
    top, idx = score.topk(2, dim=-1)
    assert torch.equal(idx, t1.expert_index)
    torch.testing.assert_close(top / top.sum(-1, keepdim=True), t1.combine_weights)
    torch.testing.assert_close(mean, t1.probs)


def test_uncertainty_router_bad_options():
    with pytest.raises(ValueError, match="samples must be >= 2"):
        UncertaintyRouter(4, 3, 1, samples=1)
    with pytest.raises(ValueError, match=r"dropout must be in \(0, 1\)"):
        UncertaintyRouter(4, 3, 1, dropout=0.0)


def test_naive_reference_is_what_the_dispatch_test_compares_to():
    """Guard: the reference above and the toolkit's naive dispatcher agree (so the hypothesis test can fail)."""
    ex = _random_experts(3, 4, 1)
    x = torch.randn(5, 4)
    w, idx = torch.randn(5, 3).softmax(-1).topk(2, -1)
    torch.testing.assert_close(NaiveDispatcher()(x, idx, w, ex), _film_reference(ex, x, idx, w))
    wrong = _film_reference(ex, x, idx.flip(-1), w)
    assert not torch.allclose(wrong, _film_reference(ex, x, idx, w))


def test_task_embedding_router_takes_one_task_per_image():
    """A batch mixing degradations in one forward: each image's tokens routed with its own task embedding and mask."""
    from vision_moe.moe import MultiGateRouter, TaskEmbeddingRouter

    torch.manual_seed(0)
    router = TaskEmbeddingRouter(8, 6, 2, ("derain", "dehaze"), task_dim=4, renormalize=True, noise_std=0.0)
    with torch.no_grad():
        router.task_embed.weight.normal_(0, 2.0)
    router.set_expert_mask("dehaze", torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))
    x = torch.randn(3 * 5, 8)  # 3 images of 5 tokens
    mixed = router(x, ["dehaze", "derain", "dehaze"])
    for i, t in enumerate(["dehaze", "derain", "dehaze"]):
        alone = router(x[5 * i : 5 * (i + 1)], t)
        assert torch.equal(mixed.expert_index[5 * i : 5 * (i + 1)], alone.expert_index)
        torch.testing.assert_close(mixed.combine_weights[5 * i : 5 * (i + 1)], alone.combine_weights)
    assert (mixed.expert_index[:5] < 3).all()  # dehaze's mask holds for its tokens
    with pytest.raises(ValueError, match="2 per-image tasks for 15 tokens"):
        router(x, ["dehaze", "derain"])
    with pytest.raises(ValueError, match="one task per call"):
        MultiGateRouter(8, 6, 2, ("derain", "dehaze"))(x, ["derain"] * 3)
