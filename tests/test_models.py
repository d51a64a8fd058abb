"""Generic model tests over every registered model (timm's test_models pattern): no model is named here."""

import pytest
import timm
import torch

import vision_moe
from vision_moe.moe import MoEAttention, MoEAux, MoEMlp

TASKS = ("seg", "depth")
# Small enough for CI; the width and heads of each entry point stay as registered.
SMALL = dict(img_size=32, depth=2, tasks=TASKS, num_classes=7)


def _make(name, **kw):
    torch.manual_seed(0)
    return vision_moe.create_model(name, **dict(SMALL, **kw))


@pytest.mark.parametrize("name", vision_moe.list_models(family="vit"))
def test_forward_every_task(name):
    model = _make(name).eval()
    x = torch.randn(2, 3, 32, 32)
    for task in TASKS:
        out, aux = model(x, task=task, return_aux=True)
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
        n_moe = sum(isinstance(m, (MoEMlp, MoEAttention)) for m in model.modules())
        assert len(aux) == n_moe and all(isinstance(a, MoEAux) and a.task == task for a in aux)


@pytest.mark.parametrize("name", vision_moe.list_models(family="vit"))
def test_backward_reaches_every_parameter(name):
    model = _make(name).train()
    x = torch.randn(2, 3, 32, 32)
    loss = sum(model(x, task=t).square().mean() for t in TASKS)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    for n, m in model.named_modules():
        if isinstance(m, (MoEMlp, MoEAttention)):
            for gate in m.router.parameters():
                assert gate.grad.abs().sum() > 0, f"{n}: router got a zero gradient"
            ex = m.experts.fc1.weight if isinstance(m, MoEMlp) else m.q_experts.weight
            used = (ex.grad.flatten(1).abs().sum(1) > 0).sum()
            assert used >= m.top_k, f"{n}: fewer experts than top_k received a gradient"


@pytest.mark.parametrize("name", vision_moe.list_models(family="vit"))
def test_timm_registry_and_config(name):
    model = timm.create_model(name, **SMALL)
    assert type(model).__name__ == "MoEVisionTransformer"
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and cfg["classifier"] == "head"
    assert tuple(model.tasks) == TASKS
    assert len(model.feature_info) == len(model.blocks)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0)
    feats = model.forward_head(model.forward_features(torch.randn(1, 3, 32, 32), task="seg"), pre_logits=True)
    assert feats.shape == (1, model.embed_dim)


@pytest.mark.parametrize("name", vision_moe.list_models(family="vit"))
def test_forward_intermediates_nchw(name):
    model = _make(name).eval()
    x = torch.randn(1, 3, 32, 48)  # non-square, pos-embed resampled
    final, feats = model.forward_intermediates(x, task="depth", indices=[0, 1])
    assert [f.shape for f in feats] == [(1, model.embed_dim, 2, 3)] * 2
    only = model.forward_intermediates(x, task="depth", indices=1, intermediates_only=True)
    torch.testing.assert_close(only[0], feats[1])
    torch.testing.assert_close(final, model.forward_features(x, task="depth"))


def test_unknown_task_names_the_known_ones():
    model = _make("m3vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"unknown task 'cls'.*\['seg', 'depth'\]"):
        model(torch.randn(1, 3, 32, 32), task="cls")
    with pytest.raises(ValueError, match="pass task="):
        model(torch.randn(1, 3, 32, 32))


def test_unknown_model_and_kwarg_raise():
    with pytest.raises(ValueError, match="unknown model 'm3vit_huge'"):
        vision_moe.create_model("m3vit_huge")
    with pytest.raises(TypeError, match="not_an_arg"):
        vision_moe.create_model("m3vit_tiny_patch16_224", not_an_arg=1)
    with pytest.raises(ValueError, match=r"tasks='depth': expected a list of task names, e.g. tasks=\['depth'\]"):
        vision_moe.create_model("m3vit_tiny_patch16_224", tasks="depth")


def test_moe_block_layout_and_dense_twin():
    m3 = vision_moe.create_model("m3vit_small_patch16_224", img_size=32)
    assert m3.moe_block_idx == (1, 3, 5, 7, 9, 11)
    layer = m3.blocks[1].mlp
    assert (layer.num_experts, layer.top_k, layer.experts.hidden) == (16, 4, 384)
    assert m3.blocks[0].attn.num_heads == 12
    dense = vision_moe.create_model("vit_mtl_small_patch16_224", img_size=32)
    assert not any(b.is_moe for b in dense.blocks)
    ms = vision_moe.create_model("modsquad_small_patch16_224", img_size=32)
    assert isinstance(ms.blocks[1].attn, MoEAttention) and isinstance(ms.blocks[1].mlp, MoEMlp)
    assert ms.task_embed is not None


def test_aux_is_returned_not_stored():
    model = _make("m3vit_tiny_patch16_224").eval()
    before = set(vars(model.blocks[1].mlp))
    _, aux = model(torch.randn(1, 3, 32, 32), task="seg", return_aux=True)
    assert set(vars(model.blocks[1].mlp)) == before
    assert aux[0].expert_load.sum() == 4 * 5  # (1 + 4 patches) tokens x top-4


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = _make("modsquad_small_patch16_224").train()
    for gate in model.modules():
        if hasattr(gate, "noise_std"):
            gate.noise_std = 0.0  # deterministic routing for the comparison
    x = torch.randn(2, 3, 32, 32)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    grads = []
    for enable in (False, True):
        calls.clear()
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        model(x, task="seg").sum().backward()
        # checkpointing really is on (every block recomputed in backward) or really off
        assert calls == (list(model.blocks) if enable else [])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "blocks.1.mlp.experts.fc1.weight" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=lambda m, n=n: f"{n}: {m}")
    assert {"pos_embed", "cls_token", "task_embed"} <= model.no_weight_decay()


def test_non_square_model_runs_at_other_sizes():
    model = vision_moe.create_model("m3vit_tiny_patch16_224", img_size=(32, 64), depth=2, tasks=TASKS).eval()
    for size in ((32, 64), (48, 32), (64, 64)):
        assert torch.isfinite(model(torch.randn(1, 3, *size), task="seg")).all()
