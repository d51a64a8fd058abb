"""MultiTaskModel: forward contract and specialise equivalence for every task kind."""

import pytest
import torch

from vision_moe.models.multitask import build_multitask_model
from vision_moe.tasks import TASKS as ALL_TASKS

TASKS = {t: s for t, s in ALL_TASKS.items() if s.kind != "restoration"}  # the tasks a head serves

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2, expert_hidden=32)
HEADS = dict(head_channels=8, det_channels=32, det_num_convs=1, det_scale_factors=(2.0, 1.0, 0.5))


@pytest.fixture(scope="module", params=["m3vit_tiny_patch16_224", "modsquad_small_patch16_224"])
def model(request):
    torch.manual_seed(0)
    tasks = {t: (TASKS[t].out_channels or 4) for t in TASKS}
    kw = dict(TINY, expert_heads=1) if request.param.startswith("modsquad") else TINY
    return build_multitask_model(request.param, tasks, img_size=32, head_kwargs=HEADS, **kw).eval()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_specialize_equals_full_model(model, task):
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        full = model(x, task)
        spec = model.specialize(task).eval()
        out = spec(x)
    assert len(full["aux"]) > 0  # MoE records come back from the forward, not from module state
    if TASKS[task].kind == "detection":
        assert isinstance(out, tuple) and len(out) == 3
        for a, b in zip(full["out"], out):
            torch.testing.assert_close(a, b)
        assert spec.anchors((32, 48)).shape == (out[0].shape[1], 4)
        d_full, d_spec = full["detections"][0], spec.postprocess(out, (32, 48))[0]
        torch.testing.assert_close(d_full["boxes"], d_spec["boxes"])
    else:
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(full["out"], out)
    # only this task's routers survive
    names = [n for n, _ in spec.named_parameters()]
    others = [t for t in TASKS if t != task]
    assert not any(f".{t}." in n or n.endswith(f".{t}") for n in names for t in others)


def test_forward_losses_and_errors(model):
    x = torch.randn(2, 3, 32, 32)
    r = model(x, "semseg", [{"semseg": torch.zeros(32, 32, dtype=torch.long)}] * 2)
    assert set(r) >= {"out", "aux", "losses"} and torch.isfinite(r["losses"]["semseg"])
    with pytest.raises(ValueError, match="unknown task 'bogus'"):
        model(x, "bogus")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32), "semseg")
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        build_multitask_model("m3vit_tiny_patch16_224", {"segmentation": 3}, img_size=32, **TINY)
