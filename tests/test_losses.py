"""MoE auxiliary losses: known values under uniform and collapsed routing."""

import math

import pytest
import torch

from vision_moe.moe import (
    cv_squared,
    importance_load_loss,
    mutual_information_loss,
    router_z_loss,
    switch_load_balance_loss,
    task_expert_probs,
)


def _uniform(s, e, k):
    probs = torch.full((s, e), 1.0 / e)
    idx = torch.stack([(torch.arange(k) + i * k) % e for i in range(s)])  # round-robin: equal load
    return probs, idx, probs.gather(1, idx)


def _collapsed(s, e, k):
    probs = torch.zeros(s, e)
    probs[:, :k] = 1.0 / k
    idx = torch.arange(k).expand(s, k)
    return probs, idx, probs.gather(1, idx)


def test_cv_squared():
    assert cv_squared(torch.ones(8)) == 0
    assert cv_squared(torch.tensor([3.0])) == 0
    x = torch.tensor([0.0, 4.0])
    assert cv_squared(x).item() == pytest.approx(8.0 / 4.0)  # var (unbiased) 8, mean^2 4


def test_importance_load_uniform_is_zero_and_collapsed_is_large():
    assert importance_load_loss(*_uniform(16, 8, 2)).item() == pytest.approx(0.0, abs=1e-6)
    # collapsed to experts {0,1} of 8: importance and load are (c, c, 0 x 6): mean c/4, unbiased variance
    # (2 (3c/4)^2 + 6 (c/4)^2) / 7 = 3c^2/14, so cv^2 = 24/7 for each term
    assert importance_load_loss(*_collapsed(16, 8, 2)).item() == pytest.approx(48 / 7, rel=1e-5)


def test_switch_balance():
    assert switch_load_balance_loss(*_uniform(16, 8, 2)[:2]).item() == pytest.approx(1.0)
    # all tokens on experts {0,1}: f = P = 1/2 on two experts -> 8 * 2 * 1/4 = 4
    assert switch_load_balance_loss(*_collapsed(16, 8, 2)[:2]).item() == pytest.approx(4.0)


def test_router_z_loss():
    assert router_z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2)
    masked = torch.tensor([[0.0, float("-inf")]])
    assert router_z_loss(masked).item() == pytest.approx(0.0)


def test_mutual_information_known_values():
    e = 6
    uniform = task_expert_probs([torch.full((10, e), 1 / e) for _ in range(3)])
    assert mutual_information_loss(uniform).item() == pytest.approx(0.0, abs=1e-7)
    # each of 3 tasks on its own expert: MI = H(T) = log 3
    collapsed = torch.zeros(3, e)
    collapsed[0, 0] = collapsed[1, 1] = collapsed[2, 2] = 1.0
    assert mutual_information_loss(collapsed).item() == pytest.approx(-math.log(3), rel=1e-6)
    # all tasks on the same expert: no information
    same = torch.zeros(3, e)
    same[:, 4] = 1.0
    assert mutual_information_loss(same).item() == pytest.approx(0.0, abs=1e-7)
    # a non-uniform prior: 2 tasks on distinct experts with P(t) = (.75, .25) -> MI = H(T)
    prior = torch.tensor([0.75, 0.25])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mutual_information_loss(collapsed[:2], prior).item() == pytest.approx(-h, rel=1e-6)


def test_mutual_information_has_gradient_toward_specialisation():
    logits = torch.zeros(2, 4, requires_grad=True)
    loss = mutual_information_loss(logits.softmax(-1) + torch.tensor([[0.01, 0, 0, 0], [0, 0.01, 0, 0]]))
    (g,) = torch.autograd.grad(loss, logits)
    assert g[0, 0] < 0 and g[1, 1] < 0  # descending raises each task's preferred expert
