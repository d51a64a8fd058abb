"""DeMoE (classifier-routed MoE decoder on a NAFNet U-Net): specialize(d) equals the model forced to d; "auto" at
k = 1 equals the model forced to the classifier's argmax; the sparse path (only chosen experts run) equals the
dense one (every expert, masked: the export path) at every k; bad input gets one line."""

import pytest
import torch

import vision_moe
from vision_moe.models.demoe import DeMoE, route_weights

TASKS = ("deblur", "defocus", "lowlight")
SMALL = dict(width=8, enc_blocks=(1, 1), dec_blocks=(1, 1), middle_blocks=1, classifier_hidden=16)


def _model(top_k=1, **kw) -> DeMoE:
    torch.manual_seed(0)
    model = vision_moe.create_model("demoe_tiny", **dict(SMALL, tasks=TASKS, top_k=top_k, **kw)).eval()
    with torch.no_grad():  # away from the identity init (beta = gamma = 0), so that experts differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _images(b=4, h=20, w=28):
    torch.manual_seed(1)
    return torch.rand(b, 3, h, w) * 2 - 1


@pytest.mark.parametrize("dispatcher", ["sparse", "dense"])
def test_specialize_equals_forced(dispatcher):
    model = _model().set_dispatcher(dispatcher)
    x = _images()
    with torch.no_grad():
        outs = {}
        for t in TASKS:
            spec = model.specialize(t)
            forced = model(x, t)
            assert spec.classifier is None and not spec.moe_layers() and spec.tasks == (t,)
            torch.testing.assert_close(spec(x), forced, rtol=0, atol=0)
            outs[t] = forced
    assert not torch.allclose(outs["deblur"], outs["defocus"])  # the experts matter
    n_full = sum(p.numel() for p in model.parameters())
    n_spec = sum(p.numel() for p in model.specialize("deblur").parameters())
    assert n_spec < n_full


def test_auto_at_k1_equals_forced_to_the_argmax():
    model = _model(top_k=1)
    x = _images(b=6)
    with torch.no_grad():
        out, aux = model(x, "auto", return_aux=True)
        pred = aux[0].probs.argmax(-1)
        forced = model(x, [TASKS[i] for i in pred.tolist()])
        torch.testing.assert_close(out, forced, rtol=0, atol=0)
        torch.testing.assert_close(aux[0].logits, model.classify(x).float())
    assert aux[0].expert_index.shape == (6, 1) and torch.equal(aux[0].expert_index[:, 0], pred)
    assert len(aux) == len(model.moe_layers()) == 3  # after the middle blocks and after each decoder level


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sparse_equals_dense_and_weights_are_renormalised_top_k(top_k):
    model = _model(top_k=top_k)
    x = _images()
    with torch.no_grad():
        sparse = model(x, "auto")
        dense = model.set_dispatcher("dense")(x, "auto")
    torch.testing.assert_close(dense, sparse, rtol=1e-5, atol=1e-6)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    w = route_weights(probs, top_k)
    ref = torch.zeros_like(probs)
    vals, idx = probs.topk(top_k, -1)
    ref.scatter_(1, idx, vals / vals.sum(-1, keepdim=True))
    torch.testing.assert_close(w, ref)


def test_only_chosen_experts_run_in_eager_mode():
    model = _model(top_k=1)
    ran = []
    for i, e in enumerate(model.middle_moe.experts):
        e.register_forward_hook(lambda m, a, o, i=i: ran.append((i, a[0].shape[0])))
    with torch.no_grad():
        model(_images(b=3), ["defocus", "defocus", "lowlight"])
    assert sorted(ran) == [(1, 2), (2, 1)]


@pytest.mark.parametrize("size", [(16, 16), (17, 33), (45, 20)])
def test_any_size_round_trips(size):
    model = _model(top_k=2)
    x = _images(b=2, h=size[0], w=size[1])
    with torch.no_grad():
        for task in ("auto", "defocus"):
            out = model(x, task)
            assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


def test_dense_twin_is_the_specialised_layout():
    """nafnet_*: the U-Net a specialised DeMoE is (same parameters' names and shapes; no classifier)."""
    demoe = vision_moe.create_model("demoe_tiny", tasks=TASKS)
    dense = vision_moe.create_model("nafnet_tiny", tasks=TASKS)
    spec = {k: v.shape for k, v in demoe.specialize("deblur").state_dict().items()}
    assert spec == {k: v.shape for k, v in dense.state_dict().items()}
    assert not dense.classifier_routed and demoe.classifier_routed
    x = _images(b=1, h=16, w=16)
    torch.testing.assert_close(dense.eval()(x), (x * 0.5 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)  # identity init


def test_bad_input_one_line():
    model = _model()
    with pytest.raises(ValueError, match="unknown task 'derain'; this model knows"):
        model(_images(), "derain")
    with pytest.raises(ValueError, match="smaller than the model's multiple 4"):
        model(torch.zeros(1, 3, 3, 40))
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 16\): expected \(B, 3, H, W\) RGB \(convert grey or RGBA"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(1, 4, 16, 16\)"):
        model(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="2 per-image tasks for a batch of 4"):
        model(_images(), ["deblur", "defocus"])
    with pytest.raises(ValueError, match="unknown task 'denoise'"):
        model.specialize("denoise")
    with pytest.raises(ValueError, match="top_k=4: expected 1 .. 3"):
        vision_moe.create_model("demoe_tiny", tasks=TASKS, top_k=4)
    with pytest.raises(ValueError, match="unknown degradation 'blur'"):
        vision_moe.create_model("demoe_tiny", tasks=["blur"])
    with pytest.raises(ValueError, match="no expert capacity"):
        model.set_capacity(capacity_factor=1.0)
    with pytest.raises(ValueError, match="no degradation classifier"):
        vision_moe.create_model("nafnet_tiny").classify(_images())


def test_reference_size():
    """Width 32, [2, 2, 2, 2] blocks, 2 middle blocks; one expert per degradation in each of the 5 MoE blocks.
    Built on the meta device."""
    with torch.device("meta"):
        model = vision_moe.create_model("demoe_base")
    assert model.multiple == 16 and len(model.moe_layers()) == 5 and model.top_k == 1
    assert [len(e) for e in model.encoders] == [2, 2, 2, 2] and len(model.middle) == 2
    assert model.ending.in_channels == 32 and model.middle_moe.num_experts == len(model.tasks)
    deweather = vision_moe.create_model("demoe_deweather_tiny")
    assert deweather.tasks == ("derain", "dehaze", "desnow", "deraindrop")
