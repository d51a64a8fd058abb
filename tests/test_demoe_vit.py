"""DeMoE's ViT variant (the classifier-routed MoE decoder as a dense head on a vision-moe MoE ViT): specialize(d)
equals the model forced to d; "auto" at k = 1 equals the model forced to the classifier's argmax; the sparse paths
equal the dense ones (export); the backbone routes tokens blind to the degradation (its own task); the traceable
position embedding is timm's at the model's grid; a short run through the shared trainer lowers the loss and its
checkpoint reproduces the metrics; bad input gets one line."""

import numpy as np
import pytest
import torch

import vision_moe
from vision_moe.config import config_from_dict
from vision_moe.engine import latest_checkpoint
from vision_moe.engine.trainer import Trainer, evaluate_checkpoint_tasks
from vision_moe.models.demoe import DeMoEViT
from vision_moe.models.moe_vit import MoEVisionTransformer

TASKS = ("deblur", "defocus", "lowlight")
BACKBONE = dict(
    patch_size=4, embed_dim=16, depth=2, num_heads=2, num_experts=4, top_k=2, expert_hidden=16, stem_channels=(8,)
)
SMALL = dict(width=4, classifier_hidden=8, backbone_kwargs=dict(BACKBONE, stem_strides=(2, 2)))


def _model(top_k=1, **kw) -> DeMoEViT:
    torch.manual_seed(0)
    model = vision_moe.create_model("demoe_vit_tiny", **dict(SMALL, tasks=TASKS, top_k=top_k, **kw)).eval()
    with torch.no_grad():  # away from the identity init (zero ending conv, beta = gamma = 0): the experts differ
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
    outs = {}
    with torch.no_grad():
        for t in TASKS:
            spec = model.specialize(t)
            assert spec.head.classifier is None and spec.tasks == (t,) and not spec.classifier_routed
            # to float rounding: the specialised backbone keeps only the experts its router reaches (other GEMMs)
            torch.testing.assert_close(spec(x), model(x, t), rtol=1e-4, atol=1e-5)
            outs[t] = spec(x)
        with pytest.raises(ValueError, match="no degradation classifier"):
            spec.classify(x)
    assert not torch.allclose(outs["deblur"], outs["defocus"])  # the experts matter
    assert sum(p.numel() for p in model.specialize("deblur").parameters()) < sum(p.numel() for p in model.parameters())


def test_auto_at_k1_equals_forced_to_the_argmax():
    model = _model(top_k=1)
    x = _images(b=6)
    with torch.no_grad():
        out, aux = model(x, "auto", return_aux=True)
        pred = aux[0].probs.argmax(-1)
        torch.testing.assert_close(out, model(x, [TASKS[i] for i in pred.tolist()]), rtol=0, atol=0)
        torch.testing.assert_close(aux[0].logits, model.classify(x))
    # the head's records first (one per MoE block: after the bottleneck and after each of the log2(4) = 2 decoder
    # levels), then the backbone's token routers, which run on their own task whatever the degradation
    head, backbone = aux[:3], aux[3:]
    assert all(a.expert_index.shape == (6, 1) for a in head)
    assert backbone and all(a.task == DeMoEViT.BACKBONE_TASK for a in backbone)
    assert [n for n, _ in model.moe_layers()][:3] == ["head.middle_moe", "head.decoder_moe.0", "head.decoder_moe.1"]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sparse_equals_dense_dispatch(top_k):
    model = _model(top_k=top_k)
    x = _images()
    with torch.no_grad():
        sparse = model(x, "auto")
        dense = model.set_dispatcher("dense")(x, "auto")
    torch.testing.assert_close(dense, sparse, rtol=1e-5, atol=1e-5)
    assert {type(m.dispatcher).__name__ for _, m in model.backbone.moe_layers()} == {"DenseDispatcher"}


def test_backbone_is_a_vision_moe_vit_with_its_own_task():
    model = vision_moe.create_model("demoe_vit_tiny", **dict(SMALL, backbone_kwargs=dict(depth=4)))
    bb = model.backbone
    assert isinstance(bb, MoEVisionTransformer) and bb.tasks == (DeMoEViT.BACKBONE_TASK,)
    # backbone_kwargs merge key by key with the entry point's: depth changed, the conv stem and patch 8 kept
    assert len(bb.blocks) == 4 and model.multiple == 8 and bb.embed_dim == 64
    assert model.tasks == ("deblur", "defocus", "lowlight")


def test_traceable_position_embedding_is_timms_at_the_models_grid():
    model = _model()
    x = _images(b=2, h=64, w=64)  # the model's own grid (img_size 64, 4 px tokens)
    with torch.no_grad():
        traced = model.backbone.forward_features(x)
        model.backbone.traceable_pos_embed = False
        plain = model.backbone.forward_features(x)
    torch.testing.assert_close(traced, plain, rtol=0, atol=1e-6)


def test_bad_input_one_line():
    model = _model()
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


def test_trains_through_the_shared_trainer(tmp_path):
    cfg = {
        "model": {"backbone": "demoe_vit_tiny", "img_size": 32, "backbone_kwargs": SMALL},
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
