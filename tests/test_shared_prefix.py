"""Several tasks on the same images: the backbone's task-independent stages run once (forward_shared), with the
same outputs and gradients as separate per-task forwards."""

import contextlib

import pytest
import torch

import vision_moe
from vision_moe.models.multitask import build_multitask_model

SMALL = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=4, num_experts=4, top_k=2, expert_hidden=32)
STEM = dict(stem_channels=[8, 16, 16], stem_strides=[1, 2, 2, 2])


def _multitask(**kw):
    torch.manual_seed(0)
    return build_multitask_model("m3vit_tiny_patch16_224", {"semseg": 4, "classification": 3}, **{**SMALL, **kw})


@contextlib.contextmanager
def _counting(*modules):
    """Counts the forward calls of each module while the block runs."""
    calls = [0] * len(modules)

    def hook(i):
        def f(*_):
            calls[i] += 1

        return f

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [{}, STEM], ids=["patchify", "conv_stem"])
def test_shared_forward_equals_separate_forwards_outputs_and_gradients(kw):
    model = _multitask(**kw).train()
    x = torch.randn(3, 3, 32, 32)
    # the stem's BatchNorm uses batch statistics in training: the same batch either way; the routers' training
    # noise draws from the same RNG stream in the same order
    torch.manual_seed(1)
    separate = [model(x, t)["out"] for t in model.tasks]
    sum(o.square().mean() for o in separate).backward()
    g_sep = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    shared = model.forward_shared(x)
    assert shared[1] == 3  # patch embedding, position embedding, block 0 (dense); block 1 is the first MoE block
    assert shared[2]  # ... whose attention is dense: it ran once too
    b = model.backbone.blocks
    with _counting(model.backbone.patch_embed, b[0], b[1].attn, b[1].mlp, b[2]) as calls:
        joint = [model(x, t, shared=shared)["out"] for t in model.tasks]
    assert calls == [0, 0, 0, 2, 2]  # the shared stages are not run again per task; block 1's MoE MLP is
    sum(o.square().mean() for o in joint).backward()
    g_joint = _grads(model)
    for a, b in zip(separate, joint):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert g_sep.keys() == g_joint.keys()
    for n in g_sep:
        torch.testing.assert_close(g_sep[n], g_joint[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert any(n.startswith("backbone.patch_embed") for n in g_joint)


def test_shared_stages_stop_at_the_first_task_dependent_or_random_layer():
    def stages(name="m3vit_tiny_patch16_224", train=True, **kw):
        m = vision_moe.create_model(name, tasks=("a", "b"), num_classes=0, **{**SMALL, **kw})
        return m.train(train).num_shared_stages()

    assert stages() == 3  # blocks 1, 3 are MoE
    assert stages(moe_blocks=[0, 2]) == 2
    assert stages("vit_mtl_tiny_patch16_224") == 2 + 4  # dense twin: everything up to the final norm
    assert stages("modsquad_small_patch16_224") == 2  # a task embedding before every block
    assert stages("vit_mtl_tiny_patch16_224", drop_path_rate=0.1) == 2 + 1  # block 0's drop-path rate is 0
    assert stages("vit_mtl_tiny_patch16_224", drop_path_rate=0.1, train=False) == 2 + 4
    assert stages(pos_drop_rate=0.1) == 1
    assert stages(proj_drop_rate=0.1) == 2


def test_shared_forward_in_eval_and_with_random_layers_still_matches():
    model = _multitask(drop_path_rate=0.2, moe_blocks=[3]).eval()
    x = torch.randn(2, 3, 32, 32)
    shared = model.forward_shared(x)
    assert shared[1] == 2 + 3
    for t in model.tasks:
        b = model.backbone.blocks
        with _counting(model.backbone.patch_embed, *b[:3], b[3].attn, b[3].mlp) as calls:
            out = model(x, t, shared=shared)["out"]
        assert calls == [0, 0, 0, 0, 0, 1]  # only block 3's MoE MLP runs per task
        torch.testing.assert_close(out, model(x, t)["out"], rtol=0, atol=1e-6)
    model.train()  # drop path in blocks 1 and 2 draws masks: only block 0 is shared
    assert model.forward_shared(x)[1] == 3


@pytest.mark.parametrize(
    "kw, attention_shared",
    [
        ({}, True),  # M³ViT: block 1's attention is dense, its MLP the first task-routed layer
        ({"attn_drop_rate": 0.1}, False),  # in training the attention draws a mask: per task
        ({"moe_attn_blocks": [1], "attn_num_experts": 4, "attn_top_k": 2, "expert_heads": 2}, False),  # Mod-Squad
    ],
)
def test_attention_half_of_the_first_moe_block_is_shared_only_when_task_independent(kw, attention_shared):
    """(Equality with separate forwards when it is shared: the first test of this file.)"""
    model = _multitask(**kw).train()
    x = torch.randn(2, 3, 32, 32)
    shared = model.forward_shared(x)
    assert shared[2] is attention_shared
    first = model.backbone.blocks[shared[1] - 2]  # the first block not shared whole
    with _counting(first.attn) as calls:
        for t in model.tasks:
            model(x, t, shared=shared)
    assert calls == [0 if attention_shared else len(model.tasks)]
    model.eval()  # no masks drawn in eval: dropout no longer keeps the attention per task
    assert model.forward_shared(x)[2] is (not kw.get("moe_attn_blocks"))
