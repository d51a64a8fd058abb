"""Each head: output shapes, loss terms finite and differentiable, detection decoding."""

import pytest
import torch

from vision_moe.tasks import TASKS, build_head, task_loss

EMBED, GRID, PATCH = 32, (4, 6), 8
SIZE = (GRID[0] * PATCH, GRID[1] * PATCH)


def _targets(task: str, b: int) -> list[dict]:
    h, w = SIZE
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(b):
        t = {"image_id": i}
        if task == "classification":
            t["class_label"] = torch.tensor(i % 5)
        elif task == "detection":
            boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0], [10.0, 4.0, 40.0, 30.0]])
            t["boxes"] = boxes if i == 0 else torch.zeros(0, 4)
            t["labels"] = torch.tensor([1, 3]) if i == 0 else torch.zeros(0, dtype=torch.long)
        elif task in ("semseg", "human_parts"):
            m = torch.randint(0, 5, (h, w), generator=g)
            m[0, :] = 255
            t[task] = m
        elif task in ("saliency", "edges"):
            t[task] = (torch.rand(1, h, w, generator=g) > 0.7).float()
        elif task == "normals":
            n = torch.nn.functional.normalize(torch.randn(3, h, w, generator=g), dim=0)
            n[:, :2] = 0  # invalid rows
            t[task] = n
        elif task == "depth":
            d = torch.rand(1, h, w, generator=g) * 5
            d[:, :3] = 0
            t[task] = d
        out.append(t)
    return out


HEADED = sorted(t for t in TASKS if TASKS[t].kind != "restoration")  # restoration tasks have no head
CASES = [(t, "setr_pup") for t in HEADED] + [(t, "linear") for t in HEADED if TASKS[t].kind == "dense"]


@pytest.mark.parametrize("task,head_kind", CASES)
def test_head_shapes_and_loss(task, head_kind):
    spec = TASKS[task]
    n = spec.out_channels or 5
    head = build_head(
        task,
        EMBED,
        n,
        PATCH,
        head=head_kind,
        head_channels=16,
        det_channels=32,
        det_num_convs=1,
        det_scale_factors=(2.0, 1.0, 0.5),
    )
    tokens = torch.randn(2, 1 + GRID[0] * GRID[1], EMBED, requires_grad=True)
    out = head(tokens, GRID, SIZE)
    if spec.kind == "classification":
        assert out.shape == (2, n)
    elif spec.kind == "detection":
        a = head.anchors(SIZE).shape[0]
        assert a == sum(GRID[0] * s * GRID[1] * s for s in (2, 1)) + (GRID[0] // 2) * (GRID[1] // 2)
        assert [o.shape for o in out] == [(2, a, n), (2, a, 4), (2, a, 1)]
        dets = head.postprocess(out, SIZE)
        assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}
        assert (dets[0]["boxes"][:, 2:] <= torch.tensor([SIZE[1], SIZE[0]])).all()
    else:
        assert out.shape == (2, n, *SIZE)
    losses = task_loss(task, head, out, _targets(task, 2), SIZE)
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_detection_loss_is_torchvision_fcos_and_learns_a_box():
    """A few steps on one box drive the FCOS loss down and the decoded top box onto it."""
    torch.manual_seed(0)
    head = build_head("detection", EMBED, 3, PATCH, det_channels=32, det_num_convs=1, det_scale_factors=(2.0, 1.0, 0.5))
    tokens = torch.randn(1, 1 + GRID[0] * GRID[1], EMBED)
    tg = [{"boxes": torch.tensor([[4.0, 4.0, 28.0, 28.0]]), "labels": torch.tensor([2])}]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = sum(head.loss(head(tokens, GRID, SIZE), tg, SIZE).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    head.eval()
    det = head.postprocess(head(tokens, GRID, SIZE), SIZE)[0]
    assert det["labels"][0] == 2
    from torchvision.ops import box_iou

    assert box_iou(det["boxes"][:1], tg[0]["boxes"]).item() > 0.5


def test_unknown_task_and_bad_channels():
    with pytest.raises(ValueError, match="unknown task 'segm'"):
        build_head("segm", EMBED, 3, PATCH)
    with pytest.raises(ValueError, match="normals.*3 output channels"):
        build_head("normals", EMBED, 4, PATCH)
    with pytest.raises(ValueError, match="unknown dense head"):
        build_head("semseg", EMBED, 4, PATCH, head="fpn")


def test_edge_loss_weights_positives():
    from vision_moe.tasks import EDGE_POS_WEIGHT

    y = torch.zeros(1, 1, 2, 2)
    y[..., 0, 0] = 1
    logits = torch.zeros(1, 1, 2, 2)
    loss = task_loss("edges", None, logits, [{"edges": y[0]}], (2, 2))["edges"]
    bce = torch.log(torch.tensor(2.0))
    assert torch.allclose(loss, bce * (EDGE_POS_WEIGHT + 3 * (1 - EDGE_POS_WEIGHT)) / 4)


def test_setr_classifier_before_last_upsample_equals_the_reference_order():
    """SetrPupHead runs its 1x1 classifier before the last bilinear upsampling (cheaper); the output must equal
    the textbook order (upsample, then classify) in value and in gradients."""
    from vision_moe.heads import SetrPupHead
    from vision_moe.heads.dense import tokens_to_map

    torch.manual_seed(0)
    head = SetrPupHead(32, 5, patch_size=8, channels=16, num_prefix_tokens=1).train()
    with torch.no_grad():
        head.cls.bias.uniform_(-1, 1)  # a non-zero bias: it must commute with the upsampling too
    tokens = torch.randn(2, 1 + 6 * 5, 32, requires_grad=True)
    out = head(tokens, (6, 5), (48, 40))
    torch.manual_seed(0)  # the same BatchNorm batch statistics in both orders
    ref = head.cls(head.decoder(tokens_to_map(head.ln(tokens), (6, 5), 1)))
    assert out.shape == ref.shape == (2, 5, 48, 40)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, tokens, g)
    (gb,) = torch.autograd.grad(ref, tokens, g)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fcos_group_norms_equal_torch_group_norm_in_either_layout(channels_last):
    """The FCOS towers' norms run on an NCHW copy (channels-last group norm is slow on the CPU): same values,
    gradients, output layout and state-dict keys as torchvision's plain nn.GroupNorm."""
    import torch.nn as nn
    from torchvision.models.detection.fcos import FCOSHead

    from vision_moe.heads.detection import FCOSDetectionHead, _GroupNormNCHW

    head = FCOSDetectionHead(64, 3, patch_size=8, channels=32, num_convs=1, scale_factors=(1.0,))
    gns = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(type(m) is _GroupNormNCHW for m in gns)
    assert head.head.state_dict().keys() == FCOSHead(32, 1, 3, num_convs=1).state_dict().keys()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    ours = _GroupNormNCHW(8, 32)
    ref = nn.GroupNorm(8, 32)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 32, 5, 7).contiguous(memory_format=fmt).requires_grad_()
    a, b = ours(x), ref(x)
    assert a.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    torch.testing.assert_close(torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, x, g)[0])
