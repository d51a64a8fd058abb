"""Restoration as one more task of a multi-task model: degradation tasks share DeMoE's MoE decoder head on the
backbone's tokens for task "restoration". specialize(d) equals the model forced to d; "auto" at k = 1 equals forced
to the classifier's argmax; a mixed batch's losses equal each degradation's own; the network made of the degradation
tasks equals the model and exports through the restoration path; configs that mix the kinds wrongly fail in one
line; a short run through the shared trainer trains every task and its checkpoint reproduces the metrics."""

import json

import numpy as np
import pytest
import torch
from tool_loader import tool_main

from vision_moe.config import ConfigError, config_from_dict
from vision_moe.engine import latest_checkpoint
from vision_moe.engine.trainer import Trainer, evaluate_checkpoint_tasks
from vision_moe.models.multitask import RESTORATION, build_multitask_model

DEGS = ("deblur", "lowlight")
BACKBONE = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2, expert_hidden=32)
HEAD = dict(head_channels=8, det_channels=8, det_num_convs=1, det_scale_factors=[1.0])


def _model(top_k: int = 1, **restore) -> torch.nn.Module:
    torch.manual_seed(0)
    head_kwargs = dict(HEAD, restoration_head=dict(width=8, classifier_hidden=16, top_k=top_k, **restore))
    tasks = {"classification": 5, "semseg": 4, **{d: None for d in DEGS}}
    return build_multitask_model("m3vit_tiny_patch16_224", tasks, img_size=32, head_kwargs=head_kwargs, **BACKBONE)


def _images(n: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_the_degradations_share_one_head_on_their_own_backbone_task():
    m = _model().eval()
    assert m.tasks == ("classification", "semseg", *DEGS) and m.degradations == DEGS
    assert set(m.heads) == {"classification", "semseg", RESTORATION}
    assert RESTORATION in m.backbone.tasks and "deblur" not in m.backbone.tasks
    x = _images()
    with torch.no_grad():
        r = m(x, "deblur")
        assert r["out"].shape == x.shape and 0 <= r["out"].min() and r["out"].max() <= 1
        assert len(r["predicted_task"]) == 3 and set(r["predicted_task"]) <= set(DEGS)
        assert len(r["aux"]) == len(m.backbone.moe_layers())  # the backbone's records only: one list per layer
        assert r["image_routing"].probs.shape == (3, len(DEGS))
        assert m(x, "semseg")["out"].shape == (3, 4, 32, 32)
    with pytest.raises(ValueError, match="'derain'"):
        m(x, "derain")
    with pytest.raises(ValueError, match="route 'derain'"):
        m(x, "deblur", route="derain")


@pytest.mark.parametrize(
    "restore", [{}, {"classifier_stats": 2, "classifier_spectrum": 4}], ids=["tokens", "tokens+stats"]
)
def test_specialize_equals_forced_and_auto_equals_the_argmax(restore):
    from vision_moe.models.demoe import BlurStatistics

    m = _model(**restore).eval()
    stats = m.heads[RESTORATION].classifier.stats
    assert (stats is not None) == bool(restore) and (not restore or stats.rings == 4)
    x = _images()
    with torch.no_grad():
        for d in DEGS:
            spec = m.specialize(d).eval()
            assert not any(isinstance(p, type(m.heads[RESTORATION].classifier)) for p in spec.modules())
            assert not any(isinstance(p, BlurStatistics) for p in spec.modules())
            torch.testing.assert_close(spec(x), m(x, d, route=d)["out"], rtol=1e-5, atol=1e-6)
        auto = m(x, "deblur")
        for i, d in enumerate(auto["predicted_task"]):
            forced = m(x[i : i + 1], d, route=d)["out"]
            torch.testing.assert_close(auto["out"][i : i + 1], forced, rtol=1e-5, atol=1e-6)


def test_a_mixed_batch_scores_each_degradation_on_its_own_images():
    m = _model().train()
    x = _images(4)
    gen = torch.Generator().manual_seed(2)
    targets = [{"gt": torch.rand(3, 32, 32, generator=gen), "degradation": d} for d in DEGS * 2]
    r = m(x, None, targets)
    assert r["task_counts"] == {"deblur": 2, "lowlight": 2} and r["classifier_loss"] > 0
    for d in DEGS:
        idx = [i for i, t in enumerate(targets) if t["degradation"] == d]
        own = m(x[idx], d, [targets[i] for i in idx])
        torch.testing.assert_close(r["task_losses"][d], sum(own["losses"].values()), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'denoise'"):
        m(x[:1], None, [{"gt": targets[0]["gt"], "degradation": "denoise"}])


def test_the_degradation_tasks_make_one_restoration_network_that_exports(tmp_path):
    from vision_moe.deploy.pipeline import ExportConfig, export_model, restoration_network

    m = _model().eval()
    net = restoration_network(m, ["deblur", "auto"])
    assert net.tasks == DEGS and net.classifier_routed and net.multiple == 8
    x = _images()
    with torch.no_grad():
        for route in ("auto", *DEGS):
            torch.testing.assert_close(net(x, route), m(x, "deblur", route=route)["out"], rtol=1e-5, atol=1e-6)
        y = net(_images(1, 21, 35), "deblur")  # any size: padded to the patch size and cropped back
    assert y.shape == (1, 3, 21, 35)
    assert restoration_network(m, ["semseg"]) is None
    with pytest.raises(ValueError, match=r"tasks \['semseg'\] and the degradation tasks \['deblur'\] export apart"):
        restoration_network(m, ["semseg", "deblur"])
    report = export_model(m, ExportConfig(out_dir=tmp_path / "exp", tasks=["deblur", "auto"], parity_images=2))
    for t in ("deblur", "auto"):
        assert (tmp_path / "exp" / f"{t}.onnx").is_file()
        assert report["tasks"][t]["kind"] == "restoration"


def _config(data_root, **model) -> dict:
    return {
        "model": {
            "backbone": "m3vit_tiny_patch16_224",
            "img_size": 32,
            **HEAD,
            "backbone_kwargs": BACKBONE,
            "restoration_head": {"width": 8, "classifier_hidden": 16},
            **model,
        },
        "tasks": {"classification": {}, "semseg": {}, **{d: {} for d in DEGS}},
        "data": {
            "datasets": [
                {"format": "builtin", "root": str(data_root), "num_train": 16, "num_val": 4},
                {"format": "builtin_restore", "root": str(data_root), "num_train": 8, "num_val": 3},
            ],
            "batch_size": 4,
            "eval_batch_size": 8,
            "num_workers": 0,
        },
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "moe": {"classifier_weight": 0.5},
        "train": {"steps": 30, "progress": False, "tensorboard": False, "log_every": 1, "threads": 1},
    }


def test_configs_that_mix_the_kinds_wrongly_fail_in_one_line(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.restoration_head\.depth: unknown key"):
        config_from_dict(dict(cfg, model=dict(cfg["model"], restoration_head={"depth": 2})))
    no_degs = dict(cfg, tasks={"classification": {}, "semseg": {}})
    no_degs["data"] = dict(cfg["data"], datasets=cfg["data"]["datasets"][:1])
    with pytest.raises(ConfigError, match=r"model\.restoration_head: is the MoE decoder head"):
        config_from_dict(no_degs)
    with pytest.raises(ValueError, match=r"head_kwargs\['restoration_head'\] \{'width': 8\}: none of the tasks"):
        build_multitask_model("m3vit_tiny_patch16_224", {"semseg": 4}, head_kwargs={"restoration_head": {"width": 8}})
    restorer = dict(cfg, model={"backbone": "demoe_tiny", "img_size": 32})
    with pytest.raises(ConfigError, match=r"tasks: restoration tasks \['deblur', 'lowlight'\] with"):
        config_from_dict(restorer)
    wrong = dict(cfg)
    wrong["data"] = dict(cfg["data"], datasets=[dict(cfg["data"]["datasets"][1], tasks=["semseg"])])
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.tasks: restoration pairs \(builtin_restore\)"):
        config_from_dict(wrong)
    unlabelled = dict(cfg, tasks={"classification": {}, "semseg": {}}, model=dict(cfg["model"], restoration_head={}))
    with pytest.raises(ConfigError, match=r"data\.datasets\[1\]\.format: restoration pairs label none of the tasks"):
        config_from_dict(unlabelled)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("joint")
    tr = Trainer(config_from_dict(_config(base / "data")), base / "run")
    return tr, tr.fit(), base


def test_a_short_joint_run_trains_every_task_and_its_checkpoint_reproduces_them(trained):
    tr, metrics, base = trained
    h = tr.loss_history
    assert len(h) == 30 and np.isfinite(h).all()
    assert set(metrics) == {"classification", "semseg", *DEGS}
    assert metrics["lowlight"]["psnr"] > metrics["lowlight"]["input_psnr"]  # a global correction: learnt at once
    assert 0 <= metrics["deblur"]["classifier_accuracy"] <= 1 and metrics["deblur"]["images"] == 3
    routes = json.loads((base / "run" / "routes.json").read_text())
    assert set(routes) == set(DEGS) and routes["lowlight"]["psnr_auto"] == pytest.approx(metrics["lowlight"]["psnr"])
    again = evaluate_checkpoint_tasks(latest_checkpoint(base / "run"))
    for t, m in metrics.items():
        for k, v in m.items():
            assert again[t][k] == pytest.approx(v, abs=1e-6), (t, k)


def test_tools_restore_runs_the_degradation_tasks_of_a_joint_checkpoint(trained, tmp_path):
    from PIL import Image

    from vision_moe.engine import load_model

    _, _, base = trained
    ckpt = latest_checkpoint(base / "run")
    rgb = (np.random.default_rng(0).random((21, 35, 3)) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb).save(tmp_path / "in" / "a.png")
    restore = tool_main("restore")
    assert restore(["--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    got = np.asarray(Image.open(tmp_path / "out" / "a.png"), dtype=np.float32) / 255
    model, _ = load_model(ckpt)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        want = model.restoration_network().eval()(x, "auto")[0].permute(1, 2, 0).numpy()
    assert got.shape == (21, 35, 3) and np.abs(got - want).max() <= 1 / 255 + 1e-6
    assert (
        restore(
            [
                "--checkpoint",
                str(ckpt),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "o2"),
                "--task",
                "semseg",
            ]
        )
        == 2
    )
