"""Routers: top-k semantics, noise only in training, masks, capacity bookkeeping."""

import pytest
import torch

from vision_moe.moe import MoEMlp, MultiGateRouter, TaskEmbeddingRouter, TopKGate, create_router


def test_gate_is_vmoe_topk_without_renormalisation():
    torch.manual_seed(0)
    gate = TopKGate(8, 6, 2).eval()
    x = torch.randn(5, 8)
    r = gate(x)
    probs = (x @ gate.proj.weight.t()).softmax(-1)
    torch.testing.assert_close(r.probs, probs)
    top, idx = probs.topk(2, -1)
    assert torch.equal(r.expert_index, idx)
    torch.testing.assert_close(r.combine_weights, top)
    assert (r.combine_weights.sum(-1) < 1).all()
    assert r.load_prob is None


def test_renormalised_weights_sum_to_one_and_fp32_under_autocast():
    gate = TopKGate(8, 6, 3, renormalize=True).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = gate(torch.randn(4, 8, dtype=torch.bfloat16))
    assert r.logits.dtype == torch.float32
    torch.testing.assert_close(r.combine_weights.sum(-1), torch.ones(4))


def test_noise_only_in_training_with_vmoe_std():
    torch.manual_seed(0)
    gate = TopKGate(4, 8, 2, noise_std=8.0)  # sigma = 8 / 8 = 1
    with torch.no_grad():
        gate.proj.weight.zero_()
    x = torch.randn(2000, 4)
    r_train = gate.train()(x)
    assert r_train.load_prob is not None and r_train.load_prob.shape == (2000, 8)
    counts = torch.bincount(r_train.expert_index.flatten(), minlength=8)
    assert (counts > 0).all()  # zero logits: noise spreads tokens over every expert
    # V-MoE's std sigma = noise_std / E = 1: an expert whose logit is 1 above the 7 others' is then in the top-2
    # ~59 % of the time (always with sigma 1/8, 29 % with sigma 8); the smooth load estimate matches the counts
    logits = torch.zeros(4000, 8)
    logits[:, 7] = 1.0
    r = gate.route(logits)
    chosen = (r.expert_index[..., None] == torch.arange(8)).any(1).float().mean(0)
    assert 0.54 < chosen[7] < 0.64, chosen
    torch.testing.assert_close(r.load_prob.mean(0), chosen, atol=0.03, rtol=0)
    r_eval = gate.eval()(x)
    assert r_eval.load_prob is None
    assert torch.equal(r_eval.expert_index, gate(x).expert_index)  # deterministic


def test_expert_mask_makes_experts_unreachable():
    gate = TopKGate(4, 6, 2).eval()
    gate.expert_mask[:3] = False
    r = gate(torch.randn(50, 4))
    assert (r.expert_index >= 3).all()
    assert (r.probs[:, :3] == 0).all()


@pytest.mark.parametrize("kind", ["multi_gate", "task_embed"])
def test_task_routers(kind):
    torch.manual_seed(0)
    router = create_router(kind, 8, 6, 2, ("a", "b")).eval()
    x = torch.randn(7, 8)
    ra, rb = router(x, "a"), router(x, "b")
    assert not torch.equal(ra.probs, rb.probs)  # the task changes the routing
    with pytest.raises(ValueError, match=r"unknown task 'c'; this router knows \['a', 'b'\]"):
        router(x, "c")
    router.set_expert_mask("b", torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))
    assert router.reachable_experts("b").tolist() == [0, 1, 2]
    assert router.reachable_experts("a").tolist() == list(range(6))
    with pytest.raises(ValueError, match="fewer than top_k=2"):
        router.set_expert_mask("a", torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool))


def test_router_kinds_and_errors():
    assert isinstance(create_router("multi_gate", 4, 4, 1, ["t"]), MultiGateRouter)
    assert isinstance(create_router("task_embed", 4, 4, 1, ["t"]), TaskEmbeddingRouter)
    with pytest.raises(ValueError, match="unknown router 'hash'"):
        create_router("hash", 4, 4, 1, ["t"])
    with pytest.raises(ValueError, match="top_k must be in"):
        TopKGate(4, 3, 4)


def test_layer_counts_dropped_tokens():
    torch.manual_seed(0)
    layer = MoEMlp(8, 8, 4, 2, ["t"], capacity_factor=0.5).eval()
    y, aux = layer(torch.randn(2, 10, 8), "t")
    assert y.shape == (2, 10, 8)
    cap = 3  # per image: ceil(0.5 * 10 * 2 / 4)
    assert (aux.expert_load <= 2 * cap).all()
    assert aux.dropped_fraction.item() == pytest.approx(1 - aux.expert_load.sum().item() / 40)
    assert aux.dropped_fraction > 0
    with pytest.raises(ValueError, match="not both"):
        MoEMlp(8, 8, 4, 2, ["t"], capacity=3, capacity_factor=1.0)
