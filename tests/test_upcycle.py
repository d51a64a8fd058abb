"""Sparse upcycling: a dense timm ViT checkpoint loaded into an MoE model gives the same features."""

import re

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
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: blocks.1.mlp: .*expert_hidden=768"):
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


_SMALL = dict(img_size=32, depth=2, embed_dim=32, num_heads=2, num_experts=4, top_k=2, expert_hidden=32, num_classes=0)


def _pretrained_error(path, **kw):
    with pytest.raises((OSError, ValueError)) as e:
        vision_moe.create_model(
            "m3vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **{**_SMALL, **kw}
        )
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return e.value


def test_unreadable_pretrained_file_is_one_line_naming_it(vit_tiny_file, tmp_path):
    _, good = vit_tiny_file
    missing = tmp_path / "missing.safetensors"
    e = _pretrained_error(missing)
    assert isinstance(e, FileNotFoundError) and "pretrained weights file does not exist; expected a" in str(e)
    assert isinstance(_pretrained_error(tmp_path), IsADirectoryError)
    cases = {
        "garbage.safetensors": (b"\xff" * 300, r"\(Error while deserializing header: header too large\)"),
        "cut.safetensors": (good.read_bytes()[:50_000], r"\(Error while deserializing header: incomplete metadata"),
        "garbage.pth": (b"\x80\x02not a pickle" * 10, r"\(WeightsUnpickler error: "),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        e = _pretrained_error(tmp_path / name)
        assert isinstance(e, ValueError) and "cannot read pretrained weights" in str(e)
        assert re.search(reason, str(e)), str(e)
        assert str(e).endswith(
            "; expected a complete " + ("torch file" if name.endswith(".pth") else "safetensors file")
        )
    cut = tmp_path / "cut.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 32)}, cut)
    cut.write_bytes(cut.read_bytes()[:200])
    assert "failed finding central directory); expected a complete torch file" in str(_pretrained_error(cut))


def test_pretrained_file_of_another_model_size_names_the_first_key(vit_tiny_file, tmp_path):
    _, path = vit_tiny_file  # a dense ViT-Ti: width 192, MLP 768
    e = _pretrained_error(path)
    assert str(e) == (
        f"{path}: cls_token has shape (1, 1, 192) in the checkpoint, (1, 1, 32) in the model: the checkpoint is for a "
        "different model size; expected one with this model's embed_dim, patch_size, MLP width"
    )
    # same width, another MLP width in a dense block: named before upcycling's advice about expert_hidden
    e = _pretrained_error(path, embed_dim=192, num_heads=3, expert_hidden=768, mlp_ratio=2.0)
    assert "blocks.0.mlp.fc1.weight has shape (768, 192) in the checkpoint, (384, 192) in the model" in str(e)
    # a checkpoint of the same size still loads; a smaller pos_embed grid is resampled, not refused
    same = vision_moe.create_model("m3vit_tiny_patch16_224", **_SMALL)
    save_file(same.state_dict(), str(tmp_path / "same.safetensors"))
    loaded = vision_moe.create_model(
        "m3vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "same.safetensors")),
        **{**_SMALL, "img_size": 48},
    )
    assert torch.equal(loaded.cls_token, same.cls_token) and loaded.pos_embed.shape[1] == 1 + 9  # 3 x 3 patches of 16


def test_a_file_without_this_models_weights_is_refused_not_silently_skipped(tmp_path):
    """timm loads pretrained files with strict=False: a file of another kind would leave the random init."""
    from vision_moe.models.multitask import build_multitask_model

    kw = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_experts=4, top_k=2, expert_hidden=32)
    trained = build_multitask_model("m3vit_tiny_patch16_224", {"semseg": 3}, head="linear", **kw)
    f = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(f))

    def load():
        return vision_moe.create_model(
            "m3vit_tiny_patch16_224",
            tasks=["semseg"],
            num_classes=0,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(f)),
            **kw,
        )

    with pytest.raises(ValueError, match=r"model.safetensors: a vision-moe training checkpoint .*engine.load_model"):
        load()
    save_file({"encoder.weight": torch.zeros(2)}, str(f))
    with pytest.raises(ValueError, match=r"holds none of this model's weights \(first key: 'encoder.weight'\)"):
        load()
