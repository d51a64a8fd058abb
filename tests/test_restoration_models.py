"""Generic tests over every registered restoration model (no model is named in the parametrised ones), and the
MoFME family's own properties: any size restores to that size, backward reaches every parameter, dispatchers and
specialisation agree, the parameter ratio to the conventional MoE."""

import pytest
import timm
import torch
from test_demoe import SMALL as DEMOE_SMALL  # tests/ is on sys.path (pytest's prepend import mode)

import vision_moe
from vision_moe.moe import MoELayer

TASKS = ("derain", "dehaze")
RESTORERS = vision_moe.list_models(family="restoration")
# small enough for CI: the layout of each entry point, narrower where its width would cost seconds
SMALL_MOFME = dict(tasks=TASKS, embed_dim=32, num_heads=2, attn_head_dim=16, head_channels=8, tail_channels=8)
SMALL_UNET = dict(
    tasks=TASKS, width=4, enc_blocks=(1, 1, 1), dec_blocks=(1, 1, 1), middle_blocks=1, classifier_hidden=8
)
# DeMoE's ViT variant: the small layout its own tests use (a two-block MoE ViT of 4 px tokens under the head)
SMALL_VIT = dict(DEMOE_SMALL["demoe_vit_tiny"], tasks=TASKS)
MOFME = vision_moe.list_models("mofme*")
VIT_HEADED = vision_moe.list_models("demoe_vit*")


def _small(name):
    return SMALL_MOFME if name in MOFME else SMALL_VIT if name in VIT_HEADED else SMALL_UNET


def _make(name, **kw):
    torch.manual_seed(0)
    return vision_moe.create_model(name, **dict(_small(name), **kw))


def test_the_families_are_listed_apart():
    assert RESTORERS and not set(RESTORERS) & set(vision_moe.list_models(family="vit"))
    assert sorted(RESTORERS + vision_moe.list_models(family="vit")) == vision_moe.list_models()
    with pytest.raises(ValueError, match="unknown model family"):
        vision_moe.list_models(family="gan")


@pytest.mark.parametrize("name", RESTORERS)
@pytest.mark.parametrize("size", [(8, 8), (21, 34), (37, 16)])
def test_any_size_restores_to_that_size(name, size):
    model = _make(name).eval()
    x = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        out, aux = model(x, "derain", return_aux=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert len(aux) == len(model.moe_layers())
    # every record routed by the degradation, except a ViT backbone's token routers (blind to it: their own task)
    assert all(a.task in ("derain", getattr(model, "BACKBONE_TASK", None)) for a in aux)
    assert not aux or aux[0].task == "derain"


@pytest.mark.parametrize("name", RESTORERS)
def test_backward_reaches_every_parameter(name):
    model = _make(name).train()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    out, aux = model(x, list(TASKS), return_aux=True)  # one image per degradation: every expert is chosen
    loss = out.square().mean()
    if getattr(model, "classifier_routed", False):  # its classifier learns from its own loss (cross-entropy)
        loss = loss + aux[0].logits.sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", RESTORERS)
def test_timm_registry(name):
    model = timm.create_model(name, **_small(name))
    assert model.pretrained_cfg["architecture"] == name
    assert tuple(model.tasks) == TASKS
    assert vision_moe.create_model(name, **_small(name)).state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", [n for n in MOFME if "dense" not in n])
@pytest.mark.parametrize("router", ["shared", "uncertainty", "task_embed"])
def test_sparse_equals_dense_path_and_specialisation(name, router):
    """The sort dispatcher (only the chosen experts run) equals the dense path (every expert on every token, the
    reference's computation), and specialize(task) equals the full model given that task."""
    model = _make(name, router=router, num_experts=4, top_k=2).eval()
    with torch.no_grad():  # away from the near-identity init, so the experts differ
        for _, layer in model.moe_layers():
            for p in layer.experts.parameters():
                p.normal_(0, 0.2)
    x = torch.rand(2, 3, 24, 16) * 2 - 1
    with torch.no_grad():
        sparse = model(x, "dehaze")
        dense = model.set_dispatcher("dense")(x, "dehaze")
        torch.testing.assert_close(dense, sparse, atol=1e-5, rtol=1e-4)
        spec = model.specialize("dehaze")
        torch.testing.assert_close(spec(x), sparse, atol=1e-5, rtol=1e-4)
    assert spec.tasks == ("dehaze",)


def test_task_conditioned_routing_needs_a_known_task():
    model = _make("mofme_tiny_patch8", router="task_embed", residual=False).eval()  # not the identity at init
    with torch.no_grad():  # distinct experts and task embeddings far apart
        for _, layer in model.moe_layers():
            for p in [*layer.experts.parameters(), layer.router.task_embed.weight]:
                p.normal_(0, 1.0)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="routes by degradation"):
        model(x)
    with pytest.raises(ValueError, match="unknown task 'desnow'"):
        model(x, "desnow")
    assert not torch.allclose(model(x, "derain"), model(x, "dehaze"))  # the task embedding changes the routing
    plain = _make("mofme_tiny_patch8", residual=False).eval()
    torch.testing.assert_close(plain(x), plain(x, "derain"))  # task-independent routing: the task changes nothing


def test_bad_arguments_one_line():
    with pytest.raises(ValueError, match="smaller than the model's multiple 8"):
        _make("mofme_tiny_patch8")(torch.zeros(1, 3, 5, 40))
    with pytest.raises(ValueError, match="experts='moe'"):
        _make("mofme_tiny_patch8", experts="moe")
    with pytest.raises(ValueError, match="router='multi_gate'"):
        _make("mofme_tiny_patch8", router="multi_gate")
    with pytest.raises(ValueError, match="no classifier"):
        vision_moe.create_model("mofme_tiny_patch8", num_classes=10)
    with pytest.raises(ValueError, match="head_channels"):
        _make("mofme_tiny_patch8", head_channels=4)  # the tiny size's skip needs head = tail channels


def test_residual_tiny_model_starts_as_the_identity():
    model = vision_moe.create_model("mofme_tiny_patch8", tasks=TASKS).eval()
    x = torch.rand(1, 3, 32, 40)
    torch.testing.assert_close(model(x * 2 - 1), x)
    assert model.residual and model.skip


def test_reference_layout_and_parameter_ratio():
    """At the reference dims (384-d, 8 heads x 64, head 32 / tail 128 channels) MoFME's parameters against the
    conventional MoE of the same E and k (the paper: 85.3 M vs 309.1 M at E=128, k=4, with the reference's unused
    0.35 M position embedding). Built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        film = vision_moe.create_model("mofme_base_patch8", num_experts=128, top_k=4)
        ffn = vision_moe.create_model("mofme_ffnmoe_base_patch8", num_experts=128, top_k=4)
    n_film = sum(p.numel() for p in film.parameters())
    n_ffn = sum(p.numel() for p in ffn.parameters())
    assert n_film / n_ffn <= 0.28
    assert abs(n_film / 1e6 - (85.3 - 0.35)) < 0.5 and abs(n_ffn / 1e6 - (309.1 - 0.35)) < 0.8
    assert film.blocks[0].attn.qkv.out_features == 3 * 8 * 64 and not film.residual and not film.skip
    assert isinstance(film.blocks[0].mlp, MoELayer) and film.blocks[0].mlp.top_k == 4
