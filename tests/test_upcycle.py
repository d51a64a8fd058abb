"""Sparse upcycling: a dense timm ViT checkpoint loaded into an MoE model gives the same features."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import vision_moe


@pytest.fixture(scope="module")
def vit_tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():  # timm's init leaves biases at 0 and norms at 1/0: perturb them so each is checked
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.safetensors"
    save_file(dense.state_dict(), str(path))
    return dense, path


def _upcycle(name, path, **kw):
    return vision_moe.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), tasks=("a", "b"), **kw
    ).eval()


def test_m3vit_upcycled_from_timm_vit_equals_it(vit_tiny_file):
    dense, path = vit_tiny_file
    moe = _upcycle("m3vit_tiny_patch16_224", path, expert_hidden=768, router_kwargs=dict(renormalize=True))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = dense.forward_features(x)
        for task in ("a", "b"):
            torch.testing.assert_close(moe.forward_features(x, task=task), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(moe(x, task="a"), dense(x), atol=1e-5, rtol=0)
    # every expert is a copy of the dense MLP
    w = moe.blocks[1].mlp.experts.fc1.weight
    torch.testing.assert_close(w[3], dense.blocks[1].mlp.fc1.weight.t())


def test_modsquad_attention_upcycles_when_experts_own_all_heads(vit_tiny_file):
    dense, path = vit_tiny_file
    moe = _upcycle(
        "modsquad_small_patch16_224",
        path,
        embed_dim=192,
        num_heads=3,
        expert_heads=3,
        expert_hidden=768,
        task_embed_blocks=False,
        router_kwargs=dict(renormalize=True),
    )
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(moe.forward_features(x, task="b"), dense.forward_features(x), atol=1e-5, rtol=0)


def test_upcycling_into_narrower_experts_is_refused(vit_tiny_file):
    _, path = vit_tiny_file
    with pytest.raises(ValueError, match="expert_hidden=768"):
        _upcycle("m3vit_tiny_patch16_224", path)  # M³ViT default expert hidden = 192


def test_upcycled_gates_are_untouched_and_still_route(vit_tiny_file):
    _, path = vit_tiny_file
    torch.manual_seed(1)
    moe = _upcycle("m3vit_tiny_patch16_224", path, expert_hidden=768)
    torch.manual_seed(1)
    fresh = vision_moe.create_model("m3vit_tiny_patch16_224", tasks=("a", "b"), expert_hidden=768)
    gate = moe.blocks[1].mlp.router.gates["a"].proj.weight
    assert gate.abs().sum() > 0
    # the dense checkpoint has no routers: each keeps the model's own initialisation
    routers = [(n, v) for n, v in fresh.state_dict().items() if ".router." in n]
    assert routers
    for n, v in routers:
        assert torch.equal(moe.state_dict()[n], v), n
    _, aux = moe(torch.randn(1, 3, 224, 224), task="a", return_aux=True)
    assert all(int(a.expert_load.sum()) == 197 * 4 for a in aux)
