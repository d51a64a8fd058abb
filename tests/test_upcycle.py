"""Sparse upcycling: a dense timm ViT checkpoint loaded into an MoE model gives the same features."""

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import vision_moe
from vision_moe.moe import importance_load_loss


def _dense_file(tmp_path_factory, name: str, seed: int = 0, **kw):
    """A timm dense ViT with random weights (every tensor perturbed, so biases and norms are checked too), saved."""
    torch.manual_seed(seed)
    dense = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():  # timm's init leaves biases at 0 and norms at 1/0: perturb them so each is checked
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("ckpt") / f"{name}.safetensors"
    save_file(dense.state_dict(), str(path))
    return dense, path


@pytest.fixture(scope="module")
def vit_tiny_file(tmp_path_factory):
    return _dense_file(tmp_path_factory, "vit_tiny_patch16_224")


def _upcycle(name, path, **kw):
    return vision_moe.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), tasks=("a", "b"), **kw
    ).eval()


@pytest.fixture(scope="module")
def vit_small_file(tmp_path_factory):
    return _dense_file(tmp_path_factory, "vit_small_patch16_224")


@pytest.mark.parametrize(
    "router, router_kwargs, depth",
    [
        ("multi_gate", dict(bias=True), 12),  # the zoo tags' router
        ("task_embed", dict(), 12),  # no gate bias: the task vector is the constant input
        ("multi_gate", dict(bias=True, renormalize=True), 2),
        ("task_embed", dict(bias=True, renormalize=True), 2),
    ],
)
def test_m3vit_small_upcycled_from_vit_small_equals_it(tmp_path_factory, router, router_kwargs, depth):
    """M³ViT-S: 16 experts of hidden 384 from timm ViT-S's 1536-wide MLP, top-4: each expert holds a quarter of the
    dense hidden units; equal to the dense model to 1e-5 (eval, and train mode with the gate noise on). The whole
    12-block ViT-S for each router kind; the renormalised variants on 2 blocks."""
    dense, path = _dense_file(tmp_path_factory, "vit_small_patch16_224", depth=depth)
    moe = _upcycle(
        "m3vit_small_patch16_224.augreg_in21k_ft_in1k", path, router=router, router_kwargs=router_kwargs, depth=depth
    )  # the tag: 6 heads as timm's ViT-S; experts keep M³ViT-S's hidden 384
    assert moe.blocks[1].mlp.experts.hidden == 384 and moe.blocks[1].mlp.num_experts == 16
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = dense(x)
        for task in ("a", "b"):
            torch.testing.assert_close(moe(x, task=task), ref, atol=1e-5, rtol=0)
        moe.train()  # V-MoE noise on the gate: the lead experts' margin keeps every choice
        torch.testing.assert_close(moe(x, task="a"), ref, atol=1e-5, rtol=0)


SIZES = [
    ("m3vit_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("m3vit_small_patch16_224", "vit_small_patch16_224"),
    ("m3vit_base_patch16_224", "vit_base_patch16_224"),
    ("modsquad_small_patch16_224", "vit_small_patch16_224"),
    ("modsquad_base_patch16_224", "vit_base_patch16_224"),
    ("vit_mtl_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("vit_mtl_small_patch16_224", "vit_small_patch16_224"),
    ("vit_mtl_base_patch16_224", "vit_base_patch16_224"),
]


@pytest.mark.parametrize("arch, dense_name", SIZES)
def test_every_size_upcycles_exactly_and_its_routers_learn(tmp_path_factory, arch, dense_name):
    """Each family and size with its tag's architecture (full width, 16 experts; depth 2 and 64 px to stay quick:
    depth repeats the same blocks) equals its dense timm ViT, and every router gets a non-zero gradient."""
    dense, path = _dense_file(tmp_path_factory, dense_name, depth=2, img_size=64)
    moe = _upcycle(f"{arch}.augreg_in21k_ft_in1k", path, depth=2, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, task="b"), dense(x), atol=1e-5, rtol=0)
    layers = moe.moe_layers()
    assert len(layers) == (0 if arch.startswith("vit_mtl") else 2 if arch.startswith("modsquad") else 1)
    if arch.startswith("modsquad"):
        assert torch.equal(moe.task_embed, torch.zeros_like(moe.task_embed))  # adds nothing until trained
    moe.train()
    out, aux = moe(x, task="a", return_aux=True)
    aux_loss = sum(importance_load_loss(a.probs, a.expert_index, a.combine_weights, a.load_prob) for a in aux)
    (out.square().mean() + aux_loss).backward()
    for name, layer in layers:
        grad = sum(p.grad.abs().sum() for p in layer.router.parameters() if p.grad is not None)
        assert grad > 0, f"{name}: the upcycled router gets no gradient"


def test_modsquad_attention_upcycles_when_experts_own_all_heads(tmp_path_factory):
    """Copies of the dense attention with top-4 renormalised gates: exact with the router left as initialised."""
    dense, path = _dense_file(tmp_path_factory, "vit_small_patch16_224", depth=2)
    moe = _upcycle(
        "modsquad_small_patch16_224",
        path,
        num_heads=6,
        expert_heads=6,
        router_kwargs=dict(renormalize=True),
        expert_hidden=1536,
        depth=2,
    )
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(moe.forward_features(x, task="b"), dense.forward_features(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "arch, kwargs, message",
    [
        ("m3vit_small_patch16_224", dict(num_heads=6), r"blocks.1.mlp: splitting the dense MLP \(hidden 1536\) into 4 "
         r"groups of 384 .*create the model with router_kwargs=dict\(bias=True\)"),
        ("m3vit_small_patch16_224", dict(num_heads=6, expert_hidden=500), r"blocks.1.mlp: dense MLP hidden 1536 is "
         r"not a multiple of expert hidden 500"),
        ("m3vit_small_patch16_224", dict(num_heads=6, top_k=2, router_kwargs=dict(bias=True)),
         r"blocks.1.mlp: .*needs top_k to be a multiple of 4 .*got top_k=2"),
        ("m3vit_small_patch16_224", dict(num_heads=6, expert_hidden=1536), r"blocks.1.mlp: copies of the dense MLP "
         r"combined by top-4 weights that are not renormalised .*router_kwargs=dict\(renormalize=True\)"),
        ("modsquad_small_patch16_224", dict(num_heads=6, router_kwargs=dict(bias=True)), r"blocks.1.attn: dense "
         r"attention upcycles exactly only when each expert owns all 6 heads .*got expert_heads=3: create the model "
         r"with expert_heads=6"),
        ("m3vit_small_patch16_224", dict(num_heads=6, router_kwargs=dict(bias=True), capacity_factor=1.0),
         r"blocks.1.mlp: an expert capacity limit drops assignments"),
    ],
)  # fmt: skip
def test_configurations_that_cannot_be_exact_are_refused_by_name(vit_small_file, arch, kwargs, message):
    _, path = vit_small_file
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}") as e:
        _upcycle(arch, path, depth=2, **kwargs)
    assert "\n" not in str(e.value)


def test_replicated_experts_with_renormalised_gates_keep_their_router(tmp_path_factory):
    """Full copies combined by renormalised weights are exact under any routing: the router keeps its own init."""
    dense, path = _dense_file(tmp_path_factory, "vit_small_patch16_224", depth=2)
    torch.manual_seed(1)
    moe = _upcycle(
        "m3vit_small_patch16_224", path, num_heads=6, expert_hidden=1536, router_kwargs=dict(renormalize=True), depth=2
    )
    torch.manual_seed(1)
    fresh = vision_moe.create_model(
        "m3vit_small_patch16_224", tasks=("a", "b"), num_heads=6, expert_hidden=1536, depth=2,
        router_kwargs=dict(renormalize=True),
    )  # fmt: skip
    routers = [(n, v) for n, v in fresh.state_dict().items() if ".router." in n]
    assert routers
    for n, v in routers:
        assert torch.equal(moe.state_dict()[n], v), n
    w = moe.blocks[1].mlp.experts.fc1.weight
    torch.testing.assert_close(w[3], dense.blocks[1].mlp.fc1.weight.t())  # every expert a copy of the dense MLP


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
