"""Every dispatcher equals the naive reference, forward and backward, with and without capacity."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vision_moe.moe import (
    DISPATCHERS,
    EinsumDispatcher,
    LinearExperts,
    MlpExperts,
    MoEMlp,
    NaiveDispatcher,
    capacity_keep_mask,
    create_dispatcher,
    resolve_capacity,
)


def _routing(s, e, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, e, generator=g)
    probs = logits.softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    return idx, w


@settings(max_examples=40, deadline=None)
@given(
    e=st.integers(1, 9),
    k_frac=st.floats(0.0, 1.0),
    n=st.integers(1, 20),
    groups=st.integers(1, 3),
    cap=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(set(DISPATCHERS) - {"naive"})),
)
def test_dispatcher_equals_reference(e, k_frac, n, groups, cap, seed, name):
    k = 1 + int(k_frac * (e - 1))
    s = n * groups
    torch.manual_seed(seed)
    experts = MlpExperts(e, 8, 6)
    x = torch.randn(s, 8, requires_grad=True)
    idx, w = _routing(s, e, k, seed)
    w.requires_grad_(True)
    keep = capacity_keep_mask(idx, e, cap, group_size=n)

    ref = NaiveDispatcher()(x, idx, w, experts, keep)
    gx_ref, gw_ref, g1_ref = torch.autograd.grad(ref.square().sum(), (x, w, experts.fc1.weight))
    out = create_dispatcher(name)(x, idx, w, experts, keep, capacity=cap, group_size=n)
    gx, gw, g1 = torch.autograd.grad(out.square().sum(), (x, w, experts.fc1.weight))
    for a, b in ((out, ref), (gx, gx_ref), (gw, gw_ref), (g1, g1_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(DISPATCHERS))
def test_compute_per_assignment_linear_experts(name):
    torch.manual_seed(0)
    experts = LinearExperts(5, 4, 3)
    x = torch.randn(11, 4)
    idx, _ = _routing(11, 5, 2, 1)
    out = create_dispatcher(name).compute(x, idx, experts)
    assert out.shape == (11, 2, 3)
    for s in range(11):
        for j in range(2):
            e = int(idx[s, j])
            torch.testing.assert_close(out[s, j], x[s] @ experts.weight[e] + experts.bias[e])


def test_capacity_drops_slot_major_then_token_order():
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    keep = capacity_keep_mask(idx, 3, capacity=2)
    # all first choices come before any second choice: expert 0 takes tokens 0, 1 (token 2's first choice and
    # token 3's second are dropped); expert 1 takes token 3's first choice, then token 0's second (token 1's dropped)
    assert keep.tolist() == [[True, True], [True, False], [False, True], [True, False]]
    assert capacity_keep_mask(idx, 3, None) is None


def test_capacity_is_counted_per_group():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 4, (3 * 7, 2), generator=g)
    idx[:, 1] = (idx[:, 0] + 1) % 4  # two distinct experts per token
    keep = capacity_keep_mask(idx, 4, capacity=3, group_size=7)
    for i in range(3):
        alone = capacity_keep_mask(idx[7 * i : 7 * (i + 1)], 4, capacity=3)
        assert torch.equal(keep[7 * i : 7 * (i + 1)], alone)
    assert not torch.equal(keep, capacity_keep_mask(idx, 4, capacity=3))  # one group of 21 drops differently


def test_gather_buffer_costs_the_capacity():
    """The gather dispatcher's experts see E * C rows per group, not every token (what makes it cheap)."""
    torch.manual_seed(0)
    experts = MlpExperts(8, 6, 5)
    seen = []
    orig = experts.forward_channels_first
    experts.forward_channels_first = lambda b: (seen.append(tuple(b.shape)), orig(b))[1]
    x = torch.randn(2 * 16, 6)
    idx, w = _routing(32, 8, 2, 0)
    keep = capacity_keep_mask(idx, 8, 5, group_size=16)
    out = create_dispatcher("gather")(x, idx, w, experts, keep, capacity=5, group_size=16)
    assert seen == [(1, 8 * 6, 2 * 5, 1)]  # each of the 8 experts: C rows per image, 2 images
    torch.testing.assert_close(out, NaiveDispatcher()(x, idx, w, experts, keep))


def test_gather_small_capacity_without_keep_drops_like_capacity():
    torch.manual_seed(0)
    experts = MlpExperts(4, 6, 5)
    x = torch.randn(20, 6)
    idx, w = _routing(20, 4, 2, 3)
    ref = NaiveDispatcher()(x, idx, w, experts, capacity_keep_mask(idx, 4, 4, group_size=10))
    got = create_dispatcher("gather")(x, idx, w, experts, capacity=4, group_size=10)
    torch.testing.assert_close(got, ref)


def test_einsum_small_buffer_drops_like_capacity():
    torch.manual_seed(0)
    experts = MlpExperts(4, 6, 5)
    x = torch.randn(20, 6)
    idx, w = _routing(20, 4, 2, 3)
    keep = capacity_keep_mask(idx, 4, 7)
    ref = NaiveDispatcher()(x, idx, w, experts, keep)
    torch.testing.assert_close(EinsumDispatcher(buffer_size=7)(x, idx, w, experts), ref)


def test_capacity_arguments():
    assert resolve_capacity(100, 2, 4, capacity_factor=1.0) == 50
    assert resolve_capacity(100, 2, 4) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_capacity(100, 2, 4, capacity=3, capacity_factor=1.0)
    with pytest.raises(ValueError, match="unknown dispatcher 'fast'"):
        create_dispatcher("fast")


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(capacity_factor=float("nan")), "capacity_factor must be a finite number > 0, got nan"),
        (dict(capacity_factor=float("inf")), "capacity_factor must be a finite number > 0, got inf"),
        (dict(capacity_factor=1e308), "capacity_factor must be a finite number > 0, got 1e+308 (too large)"),
        (dict(capacity_factor=0.0), "capacity_factor must be a finite number > 0, got 0.0"),
        (dict(capacity_factor=-1), "capacity_factor must be a finite number > 0, got -1"),
        (dict(capacity_factor="0.5"), "capacity_factor must be a finite number > 0, got '0.5'"),
        (dict(capacity=0), "capacity must be an integer >= 1, got 0"),
        (dict(capacity=2.5), "capacity must be an integer >= 1, got 2.5"),
    ],
)
def test_capacity_must_be_finite_and_positive(kw, msg):
    """NaN slipped through ``<= 0`` and inf overflowed ``ceil``: both are now the same one-line ValueError, from
    resolve_capacity, a layer's set_capacity and a model's set_capacity alike."""
    with pytest.raises(ValueError, match=re.escape(msg)):
        resolve_capacity(100, 2, 4, **kw)
    layer = MoEMlp(8, 8, 4, 2, ["t"])
    if "too large" not in msg:  # a finite factor is only too large for some token count
        with pytest.raises(ValueError, match=re.escape(msg)):
            layer.set_capacity(**kw)
        assert layer.capacity is None and layer.capacity_factor is None  # unchanged
    assert resolve_capacity(100, 2, 4, capacity=np.int64(3)) == 3


def test_static_dispatchers_have_no_data_dependent_ops():
    """The export path must export (torch.export) to a graph without NonZero / data-dependent shapes; the
    dynamic dispatchers cannot (their shapes depend on the routing), which shows the check can fail."""
    torch.manual_seed(0)
    experts = MlpExperts(4, 8, 8).requires_grad_(False)
    x = torch.randn(10, 8)
    idx, w = _routing(10, 4, 2, 0)
    keep = capacity_keep_mask(idx, 4, 3, group_size=5)

    class Layer(torch.nn.Module):
        def __init__(self, disp):
            super().__init__()
            self.disp, self.experts = disp, experts

        def forward(self, a, i, g, k):
            return self.disp(a, i, g, self.experts, k, capacity=3, group_size=5)

    data_dependent = ("nonzero", "index_put", "masked_select", "bincount", "item", "_local_scalar_dense")
    for name in ("dense", "einsum", "gather"):
        disp = create_dispatcher(name)
        assert disp.static_shapes
        ep = torch.export.export(Layer(disp), (x, idx, w, keep), strict=False)
        ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not [o for o in ops if any(d in o for d in data_dependent)], (name, ops)
        torch.testing.assert_close(ep.module()(x, idx, w, keep), Layer(disp)(x, idx, w, keep))
    for name in ("sort", "naive"):
        assert not create_dispatcher(name).static_shapes
        with pytest.raises(Exception, match="data-dependent"):
            torch.export.export(Layer(create_dispatcher(name)), (x, idx, w, keep), strict=False)
