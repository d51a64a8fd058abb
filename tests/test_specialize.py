"""model.specialize(task) equals the full model for that task and holds only that task's parameters."""

import pytest
import torch

import vision_moe

TASKS = ("seg", "depth", "normals")


def _params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["m3vit_tiny_patch16_224", "modsquad_small_patch16_224", "vit_mtl_tiny_patch16_224"])
@pytest.mark.parametrize("router", ["multi_gate", "task_embed"])
def test_specialized_equals_full(name, router):
    torch.manual_seed(0)
    model = vision_moe.create_model(name, img_size=32, depth=4, tasks=TASKS, router=router, num_classes=5).eval()
    x = torch.randn(3, 3, 32, 48)
    for task in TASKS:
        spec = model.specialize(task)
        assert spec.tasks == (task,)
        with torch.no_grad():
            torch.testing.assert_close(spec(x), model(x, task=task), atol=1e-5, rtol=1e-5)
        names = [n for n, _ in spec.named_parameters()]
        for other in set(TASKS) - {task}:
            assert not any(f".{other}." in n for n in names), f"{other} parameters left in {task} model"
        if any(b.is_moe for b in model.blocks):
            assert _params(spec) < _params(model)


def test_specialized_after_pruning_drops_unused_experts():
    torch.manual_seed(0)
    model = vision_moe.create_model("m3vit_tiny_patch16_224", img_size=32, depth=4, tasks=TASKS, num_classes=5).eval()
    calib = torch.randn(8, 3, 32, 32)
    usage = model.expert_usage(calib, "depth")
    masks = [u.argsort(descending=True).argsort() < 6 for u in usage]  # keep each layer's 6 busiest experts
    model.restrict_experts("depth", masks)
    spec = model.specialize("depth")
    for layer in (m for _, m in spec.moe_layers()):
        assert layer.num_experts == 6 and layer.experts.fc1.weight.shape[0] == 6
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(spec(x), model(x, task="depth"), atol=1e-5, rtol=1e-5)
    full_experts = sum(m.experts.fc1.weight.numel() for _, m in model.moe_layers())
    spec_experts = sum(m.experts.fc1.weight.numel() for _, m in spec.moe_layers())
    assert spec_experts == full_experts * 6 // 16
    # the other tasks still see every expert
    assert model.blocks[1].mlp.router.reachable_experts("seg").numel() == 16


def test_specialized_is_independent_and_exportable_dispatcher():
    model = vision_moe.create_model("m3vit_tiny_patch16_224", img_size=32, depth=2, tasks=TASKS).eval()
    spec = model.specialize("seg")
    with torch.no_grad():
        spec.blocks[1].mlp.experts.fc1.weight.zero_()
    assert model.blocks[1].mlp.experts.fc1.weight.abs().sum() > 0  # copies, not views
    x = torch.randn(1, 3, 32, 32)
    spec2 = model.specialize("seg").set_dispatcher("dense")
    with torch.no_grad():
        torch.testing.assert_close(spec2(x), model(x, task="seg"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown task 'x'"):
        model.specialize("x")


def test_prune_experts_keeps_used_or_most_used():
    torch.manual_seed(0)
    model = vision_moe.create_model("m3vit_tiny_patch16_224", img_size=32, depth=2, tasks=TASKS, num_classes=5).eval()
    images = torch.randn(1, 3, 32, 32)  # 5 tokens x top-4 choices: at most 20 assignments over 16 experts
    load = model.expert_usage(images, "seg")[0]
    used = load > 0
    (mask,) = model.prune_experts("seg", images)
    assert (mask & used).sum() == used.sum() and int(mask.sum()) == max(4, int(used.sum()))
    # the images it was measured on still choose the same experts (the softmax now runs over the kept ones only)
    assert torch.equal(model.expert_usage(images, "seg")[0], load)
    assert [int(m.sum()) for m in model.prune_experts("depth", images, keep=5)] == [5]
    assert model.specialize("depth").blocks[1].mlp.num_experts == 5


@pytest.mark.parametrize("name", ["m3vit_tiny_patch16_224", "modsquad_small_patch16_224"])
def test_capacity_bounded_specialized_equals_full_and_is_per_image(name):
    """With an inference capacity, the specialised model (fewer experts after restrict) drops exactly what the full
    model drops, every dispatcher agrees, and an image's output does not depend on its batch."""
    torch.manual_seed(0)
    model = vision_moe.create_model(name, img_size=32, depth=4, tasks=TASKS, num_classes=5).eval()
    usage = model.expert_usage(torch.randn(4, 3, 32, 32), "depth")
    model.restrict_experts("depth", [u.argsort(descending=True).argsort() < 6 for u in usage])
    model.set_capacity(capacity_factor=1.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, task="depth")
        for disp in ("sort", "dense", "gather"):
            spec = model.specialize("depth").set_dispatcher(disp)
            torch.testing.assert_close(spec(x), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(spec(x[1:2]), ref[1:2], atol=1e-5, rtol=1e-5)
        dropless = model.specialize("depth").set_capacity()(x)
    assert not torch.allclose(dropless, ref, atol=1e-4)  # the capacity did drop assignments
