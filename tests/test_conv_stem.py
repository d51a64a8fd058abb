"""The convolutional-stem option (timm ConvStem inside timm HybridEmbed) in place of the patchify layer."""

import pytest
import torch
from timm.layers import HybridEmbed

import vision_moe
from vision_moe.deploy.pipeline import ExportConfig, export_model
from vision_moe.models.moe_vit import token_stride
from vision_moe.models.multitask import build_multitask_model

STEM = dict(stem_channels=[8, 16, 16], stem_strides=[1, 2, 2, 2])
SMALL = dict(img_size=(32, 48), depth=2, embed_dim=32, num_heads=4, num_experts=4, top_k=2, expert_hidden=32)


def _model(**kw):
    torch.manual_seed(0)
    return vision_moe.create_model("m3vit_tiny_patch16_224", tasks=("a", "b"), num_classes=5, **SMALL, **STEM, **kw)


def test_stem_replaces_patchify_and_keeps_the_token_grid():
    m = _model(patch_size=8).eval()
    assert isinstance(m.patch_embed, HybridEmbed)
    # no patchify projection after the stem: its last convolution already gives embed_dim channels
    assert isinstance(m.patch_embed.proj, torch.nn.Identity)
    convs = [c.conv for c in m.patch_embed.backbone]
    assert [c.stride[0] for c in convs] == STEM["stem_strides"]
    assert [c.out_channels for c in convs] == [*STEM["stem_channels"], 32]
    assert token_stride(m.patch_embed) == (8, 8) and tuple(m.patch_embed.grid_size) == (4, 6)
    x = torch.randn(2, 3, 32, 48)
    maps = m.forward_intermediates(x, "a", indices=1, intermediates_only=True)
    assert maps[0].shape == (2, 32, 4, 6)
    assert m(torch.randn(1, 3, 64, 48), "b").shape == (1, 5)  # other sizes: the position embedding is resampled
    spec = m.specialize("a").eval()
    torch.testing.assert_close(spec(x), m(x, "a"), rtol=0, atol=0)
    m.train()
    m(x, "a").sum().backward()
    assert all(p.grad is not None for p in m.patch_embed.parameters())


def test_multitask_heads_use_the_stem_stride():
    torch.manual_seed(0)
    mt = build_multitask_model(
        "m3vit_tiny_patch16_224",
        {"semseg": 4, "classification": 3},
        img_size=32,
        patch_size=8,
        **{k: v for k, v in SMALL.items() if k != "img_size"},
        **STEM,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    assert mt(x, "semseg")["out"].shape == (2, 4, 32, 32)
    assert mt(x, "classification")["out"].shape == (2, 3)


def test_stem_exports_with_parity(tmp_path):
    rep = export_model(_model(patch_size=8), ExportConfig(out_dir=str(tmp_path), batch=2, parity_images=2))
    for task, e in rep["tasks"].items():
        for out, st in e["fp32"]["parity"]["outputs"].items():
            assert st["rel"] <= 1e-4, (task, out, st)
        assert e["fp32"]["tensorrt"]["10.16"]["ok"], e["fp32"]["tensorrt"]["10.16"]["errors"]


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(stem_channels=[8], stem_strides=[2, 2]), "product must equal patch_size=8"),
        (dict(stem_channels=[8, 8], stem_strides=[2, 4]), "expected 3 values"),
        (dict(stem_channels=None, stem_strides=[8]), "stem_strides given without stem_channels"),
        (dict(stem_channels=[8], stem_strides=None), "cannot default for patch_size=8 with 2 convs"),
    ],
)
def test_bad_stem_arguments_fail_clearly(kw, msg):
    with pytest.raises(ValueError, match=msg):
        vision_moe.create_model("m3vit_tiny_patch16_224", tasks=("a",), patch_size=8, **dict(SMALL, **kw))


def test_default_strides_put_the_downsampling_last():
    m = vision_moe.create_model("m3vit_tiny_patch16_224", tasks=("a",), patch_size=4, stem_channels=[8, 8], **SMALL)
    assert [c.conv.stride[0] for c in m.patch_embed.backbone] == [1, 2, 2]
