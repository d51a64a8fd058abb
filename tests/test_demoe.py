"""DeMoE (classifier-routed MoE decoder on a NAFNet U-Net) and its ViT variant (the same decoder as a head on a
vision-moe MoE ViT): specialize(d) equals the model forced to d; "auto" at k = 1 equals the model forced to the
classifier's argmax; the sparse path (only chosen experts run) equals the dense one (every expert, masked: the export
path) at every k; any size round-trips; the ViT variant's backbone routes tokens blind to the degradation, its
position embedding resamples traceably, and it trains through the shared trainer; bad input gets one line."""

import math

import numpy as np
import pytest
import torch

import vision_moe
from vision_moe.config import config_from_dict
from vision_moe.engine import latest_checkpoint
from vision_moe.engine.trainer import Trainer, evaluate_checkpoint_tasks
from vision_moe.models.demoe import DeMoE, DeMoEViT, ExpertBlocks, route_weights
from vision_moe.models.moe_vit import MoEVisionTransformer

TASKS = ("deblur", "defocus", "lowlight")
SMALL = {
    "demoe_tiny": dict(width=8, enc_blocks=(1, 1), dec_blocks=(1, 1), middle_blocks=1, classifier_hidden=16),
    # the same with the image's blur statistics (two scales, four frequency rings) beside the bottleneck in the
    # classifier ("+": an option, same model)
    "demoe_tiny+stats": dict(
        width=8,
        enc_blocks=(1, 1),
        dec_blocks=(1, 1),
        middle_blocks=1,
        classifier_hidden=16,
        classifier_stats=2,
        classifier_spectrum=4,
    ),
    # the ViT variant: a two-block MoE ViT of 4 px tokens (conv stem; one MoE MLP) under the MoE decoder head
    "demoe_vit_tiny": dict(
        width=4,
        classifier_hidden=8,
        backbone_kwargs=dict(
            patch_size=4,
            embed_dim=16,
            depth=2,
            num_heads=2,
            num_experts=4,
            top_k=2,
            expert_hidden=16,
            stem_channels=(8,),
            stem_strides=(2, 2),
        ),
    ),
}
SMALL["demoe_vit_tiny+stats"] = dict(SMALL["demoe_vit_tiny"], classifier_stats=2)
MODELS = list(SMALL)


def _model(top_k=1, name="demoe_tiny", **kw) -> DeMoE | DeMoEViT:
    torch.manual_seed(0)
    model = vision_moe.create_model(name.split("+")[0], **dict(SMALL[name], tasks=TASKS, top_k=top_k, **kw)).eval()
    with torch.no_grad():  # away from the identity init (zero last conv, beta = gamma = 0), so that experts differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _images(b=4, h=20, w=28):
    torch.manual_seed(1)
    return torch.rand(b, 3, h, w) * 2 - 1


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dispatcher", ["sparse", "dense"])
def test_specialize_equals_forced(dispatcher, name):
    model = _model(name=name).set_dispatcher(dispatcher)
    # DeMoE: bit-exact; the ViT variant to float rounding (its specialised backbone keeps only the experts its
    # router reaches: other GEMM shapes)
    tol = dict(rtol=0, atol=0) if isinstance(model, DeMoE) else dict(rtol=1e-4, atol=1e-5)
    x = _images()
    with torch.no_grad():
        outs = {}
        for t in TASKS:
            spec = model.specialize(t)
            forced = model(x, t)
            assert spec.tasks == (t,) and not spec.classifier_routed
            assert not any(isinstance(m, ExpertBlocks) for m in spec.modules())  # the decoder's experts: one each
            torch.testing.assert_close(spec(x), forced, **tol)
            outs[t] = forced
        with pytest.raises(ValueError, match="no degradation classifier"):
            spec.classify(x)
    assert not torch.allclose(outs["deblur"], outs["defocus"])  # the experts matter
    n_full = sum(p.numel() for p in model.parameters())
    n_spec = sum(p.numel() for p in model.specialize("deblur").parameters())
    assert n_spec < n_full


@pytest.mark.parametrize("name", MODELS)
def test_auto_at_k1_equals_forced_to_the_argmax(name):
    model = _model(top_k=1, name=name)
    x = _images(b=6)
    with torch.no_grad():
        out, aux = model(x, "auto", return_aux=True)
        pred = aux[0].probs.argmax(-1)
        forced = model(x, [TASKS[i] for i in pred.tolist()])
        torch.testing.assert_close(out, forced, rtol=0, atol=0)
        torch.testing.assert_close(aux[0].logits, model.classify(x).float())
    assert aux[0].expert_index.shape == (6, 1) and torch.equal(aux[0].expert_index[:, 0], pred)
    # one record per MoE block; the decoder's first (after the middle blocks / the bottleneck and after each of the
    # two decoder levels: one per image, the same record), then a ViT backbone's token routers
    assert len(aux) == len(model.moe_layers()) and all(a is aux[0] for a in aux[:3])
    assert [a.task for a in aux[3:]] == [DeMoEViT.BACKBONE_TASK] * (len(aux) - 3)
    assert len(aux) == (3 if isinstance(model, DeMoE) else 4)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sparse_equals_dense_and_weights_are_renormalised_top_k(top_k, name):
    model = _model(top_k=top_k, name=name)
    x = _images()
    with torch.no_grad():
        sparse = model(x, "auto")
        dense = model.set_dispatcher("dense")(x, "auto")
    torch.testing.assert_close(dense, sparse, rtol=1e-5, atol=1e-5)
    assert all(
        m.dispatcher == "dense" or type(m.dispatcher).__name__ == "DenseDispatcher" for _, m in model.moe_layers()
    )
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


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [(16, 16), (17, 33), (45, 20)])
def test_any_size_round_trips(size, name):
    model = _model(top_k=2, name=name)
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


def test_blur_statistics_tell_blur_from_sharp_and_are_fixed():
    """The classifier's image statistics: fixed filters (not parameters, not in the state dict), log energies that
    drop when the image is blurred, more at the finest scale than at the coarsest; the mean colour passes through."""
    from vision_moe.models.demoe import BlurStatistics

    stats = BlurStatistics(scales=3)
    assert stats.num_features == 13 and not list(stats.parameters()) and not stats.state_dict()
    torch.manual_seed(0)
    sharp = torch.rand(2, 3, 32, 32) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(sharp, 5, stride=1, padding=2, count_include_pad=False)
    fs, fb = stats(sharp), stats(blurred)
    torch.testing.assert_close(fs[:, :3], sharp.mean((2, 3)))
    drop = (fs - fb)[:, 4:].reshape(2, 3, 3)  # (image, scale, filter)
    assert (drop > 0).all() and (drop[:, 0] > drop[:, 2]).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 under AMP (logs of small energies)
        amp = stats(sharp)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, fs)
    model = _model(name="demoe_tiny+stats")
    assert model.classifier.stats_norm.num_features == 4 + 3 * 2 + 4 - 1
    # one image in training (a last batch of one): the running statistics normalise it, and stay as they were
    norm = model.classifier.stats_norm
    before = norm.running_mean.clone()
    model.train()(_images(b=1), "deblur").mean().backward()
    assert torch.equal(norm.running_mean, before)
    model(_images(b=2), "deblur")
    assert not torch.equal(norm.running_mean, before)
    with pytest.raises(ValueError, match="classifier_stats=2: expected 0 \\(off\\) or the number of scales"):
        vision_moe.create_model("nafnet_tiny", classifier_stats=2)
    with pytest.raises(
        ValueError, match="classifier_spectrum=8: expected 0 \\(off\\) for a model without a classifier"
    ):
        vision_moe.create_model("nafnet_tiny", classifier_spectrum=8)
    for bad in (1, -1):
        with pytest.raises(ValueError, match=f"classifier_spectrum={bad}: expected 0 \\(off\\) or the number of"):
            vision_moe.create_model("demoe_tiny", classifier_stats=2, classifier_spectrum=bad)
    with pytest.raises(ValueError, match="classifier_spectrum=4: .* with classifier_stats >= 1"):
        vision_moe.create_model("demoe_tiny", classifier_spectrum=4)


def test_frequency_rings_read_the_radial_power_spectrum():
    """The rings of BlurStatistics: a grating's energy lands in the ring of its frequency (whatever its direction),
    a flat image gives none, and a disk blur takes more from the outer rings than from the inner ones."""
    from vision_moe.models.demoe import BlurStatistics

    stats = BlurStatistics(scales=1, rings=8)
    assert stats.num_features == 4 + 3 + 7 and not stats.state_dict()
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    for freq, ring in ((0.1, 1), (0.2, 3), (0.3, 4), (0.45, 7)):  # rings of 0.0625 cycles/px; ring 0 dropped
        for angle in (0.0, 0.7, 1.5708):
            phase = 2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle))
            rings = stats(torch.cos(phase).expand(1, 3, 96, 96))[0, 4:11]
            assert rings.argmax().item() == ring - 1, (freq, angle, rings)
    flat = torch.exp(stats(torch.full((1, 3, 40, 40), 0.3))[0, 4:11])
    assert flat.max() < 1e-6
    torch.manual_seed(0)
    sharp = torch.rand(2, 3, 64, 64) * 2 - 1
    disk = (torch.hypot(*torch.meshgrid(torch.arange(-3.0, 4), torch.arange(-3.0, 4), indexing="ij")) <= 3).float()
    blurred = torch.nn.functional.conv2d(sharp, (disk / disk.sum()).expand(3, 1, 7, 7), padding=3, groups=3)
    drop = (stats(sharp) - stats(blurred))[:, 4:11]
    assert (drop[:, -1] > drop[:, 0] + 1).all()


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


# ---------------------------------------------------------------------------------------------- the ViT variant
def test_vit_backbone_is_a_vision_moe_vit_with_its_own_task():
    model = vision_moe.create_model("demoe_vit_tiny", **dict(SMALL["demoe_vit_tiny"], backbone_kwargs=dict(depth=4)))
    bb = model.backbone
    assert isinstance(bb, MoEVisionTransformer) and bb.tasks == (DeMoEViT.BACKBONE_TASK,)
    # backbone_kwargs merge key by key with the entry point's: depth changed, the conv stem and patch 8 kept
    assert len(bb.blocks) == 4 and model.multiple == 8 and bb.embed_dim == 64
    assert model.tasks == ("deblur", "defocus", "lowlight")


def test_vit_traceable_position_embedding_is_timms_at_the_models_grid():
    model = _model(name="demoe_vit_tiny")
    x = _images(b=2, h=64, w=64)  # the model's own grid (img_size 64, 4 px tokens)
    with torch.no_grad():
        traced = model.backbone.forward_features(x)
        model.backbone.traceable_pos_embed = False
        plain = model.backbone.forward_features(x)
    torch.testing.assert_close(traced, plain, rtol=0, atol=1e-6)


def test_vit_bad_input_one_line():
    model = _model(name="demoe_vit_tiny")
    with pytest.raises(ValueError, match="unknown task 'derain'"):
        model(_images(), "derain")
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\) RGB"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="smaller than the model's multiple 4"):
        model(torch.zeros(1, 3, 3, 16))
    with pytest.raises(ValueError, match=r"backbone_kwargs \['tasks'\]"):
        vision_moe.create_model("demoe_vit_tiny", backbone_kwargs=dict(tasks=["a"]))
    with pytest.raises(ValueError, match="expected a vision-moe ViT"):
        vision_moe.create_model("demoe_vit_tiny", backbone="demoe_tiny", backbone_kwargs={})
    with pytest.raises(ValueError, match="top_k=4"):
        vision_moe.create_model("demoe_vit_tiny", top_k=4)


def test_vit_variant_trains_through_the_shared_trainer(tmp_path):
    cfg = {
        "model": {"backbone": "demoe_vit_tiny", "img_size": 32, "backbone_kwargs": SMALL["demoe_vit_tiny"]},
        "tasks": {"deblur": {}, "lowlight": {}},
        "data": {
            "datasets": [{"format": "builtin_restore", "root": str(tmp_path / "data"), "num_train": 8, "num_val": 3}],
            "batch_size": 4,
            "eval_batch_size": 8,
            "num_workers": 0,
            "mixed_batches": True,
        },
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "sched": {"warmup_steps": 2},
        "moe": {"aux_loss": "importance_load", "aux_weight": 0.01, "classifier_weight": 0.1},
        "train": {"steps": 40, "progress": False, "tensorboard": False, "log_every": 1, "threads": 1},
    }
    tr = Trainer(config_from_dict(cfg), tmp_path / "run")
    metrics = tr.fit()
    h = tr.loss_history
    assert len(h) == 40 and np.mean(h[-8:]) < 0.8 * np.mean(h[:8])
    assert metrics["lowlight"]["psnr"] > metrics["lowlight"]["input_psnr"]
    assert all(0 <= m["classifier_accuracy"] <= 1 for m in metrics.values())
    again = evaluate_checkpoint_tasks(latest_checkpoint(tmp_path / "run"))
    for t in ("deblur", "lowlight"):
        for k in ("psnr", "ssim", "classifier_accuracy"):
            assert again[t][k] == pytest.approx(metrics[t][k], abs=1e-6), (t, k)
