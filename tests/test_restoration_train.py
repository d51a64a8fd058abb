"""Restoration through the shared engine: a short training run lowers the loss, the checkpoint reproduces the
trainer's metrics in evaluate_checkpoint / tools/eval.py, tools/restore.py restores files (tiled = untiled away from
seams for a local network), and bad configs or arguments give one line."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_moe.config import ConfigError, config_from_dict
from vision_moe.engine import evaluate_checkpoint, latest_checkpoint
from vision_moe.engine.inference import restore, tile_starts
from vision_moe.engine.trainer import Trainer, evaluate_checkpoint_tasks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def tiny(data_root, **sections) -> dict:
    d = {
        "model": {
            "backbone": "mofme_tiny_patch8",
            "img_size": 32,
            # routed by the degradation, tasks not in alphabetical order: a reloaded checkpoint must keep the order
            # its task embedding was trained with (test_checkpoint_reproduces_the_metrics)
            "backbone_kwargs": {
                "embed_dim": 32,
                "num_heads": 2,
                "attn_head_dim": 16,
                "num_experts": 4,
                "router": "task_embed",
            },
        },
        "tasks": {"lowlight": {"loss": "charbonnier"}, "dehaze": {}},
        "data": {
            "datasets": [{"format": "builtin_restore", "root": str(data_root), "num_train": 8, "num_val": 3}],
            "batch_size": 4,
            "eval_batch_size": 8,
            "num_workers": 0,
        },
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "sched": {"warmup_steps": 2},
        "train": {"steps": 40, "progress": False, "tensorboard": False, "log_every": 1, "threads": 1},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("restore_train")
    cfg = config_from_dict(tiny(base / "data"))
    tr = Trainer(cfg, base / "run")
    metrics = tr.fit()
    return tr, metrics, base


def test_short_training_lowers_the_loss_and_beats_the_input(trained):
    tr, metrics, _ = trained
    h = tr.loss_history
    assert len(h) == 40 and np.mean(h[-8:]) < 0.7 * np.mean(h[:8])
    assert set(metrics) == {"dehaze", "lowlight"}
    for m in metrics.values():  # haze and low light are global corrections: learnt within 40 steps
        assert m["images"] == 3 and m["psnr"] > m["input_psnr"]
    assert tr.model.losses["lowlight"].kind == "charbonnier" and tr.model.losses["dehaze"].kind == "l1"


def test_checkpoint_reproduces_the_metrics(trained, capsys):
    tr, metrics, base = trained
    ckpt = latest_checkpoint(base / "run")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model"]["kind"] == "restoration" and cfg["model"]["backbone"] == "mofme_tiny_patch8"
    again = evaluate_checkpoint_tasks(ckpt)
    for t in metrics:
        for k, v in metrics[t].items():
            assert again[t][k] == pytest.approx(v, abs=1e-6), (t, k)
    assert evaluate_checkpoint(ckpt, "lowlight") == again["lowlight"]

    import eval as eval_tool

    assert eval_tool.main(["--checkpoint", str(ckpt)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dehaze"]["psnr"] == pytest.approx(metrics["dehaze"]["psnr"], abs=1e-6)
    assert printed["mean"]["images"] == 6 and "psnr_gain" in printed["mean"]


def test_restore_tool_writes_pngs_and_scores(trained, tmp_path, capsys):
    _, metrics, base = trained
    ckpt = latest_checkpoint(base / "run")
    val = next((base / "data").glob("builtin_restore_*")) / "val" / "dehaze"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted((val / "lq").iterdir()):
        (inputs / p.name).write_bytes(p.read_bytes())
    grey = np.asarray(Image.open(val / "lq" / "000000.png").convert("L"))
    Image.fromarray(grey).save(inputs / "grey.jpg")  # grey JPEG: converted, written as grey.png
    (inputs / "broken.png").write_bytes(b"\x89PNG broken")

    import restore as restore_tool

    rc = restore_tool.main(
        ["--checkpoint", str(ckpt), "--input", str(inputs), "--out", str(tmp_path / "out"), "--gt", str(val / "gt")]
        + ["--task", "dehaze"]  # the model routes by degradation: it is told which
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "grey.png",
    ]
    assert "skipped:" in out and "broken.png" in out and "grey.jpg: no score" in out
    assert "restored 4 of 5 image(s)" in out
    mean_line = next(line for line in out.splitlines() if line.startswith("mean over 3 image(s)"))
    assert f"(input {metrics['dehaze']['input_psnr']:.2f})" in mean_line  # the same input baseline as eval
    assert Image.open(tmp_path / "out" / "grey.png").mode == "RGB"


def test_restore_tool_bad_arguments_one_line(tmp_path, capsys):
    import restore as restore_tool

    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    cases = [
        (["--model", "m3vit_tiny_patch16_224"], "not a restoration model"),
        (["--model", "mofme_tiny_patch8", "--task", "deblurr"], "--task deblurr: unknown degradation"),
        (["--model", "mofme_tiny_patch8", "--tile", "16", "--tile-overlap", "16"], "must be larger than"),
        (["--model", "mofme_tiny_patch8", "--gt", str(tmp_path / "nope")], "no such file or folder"),
    ]
    for extra, msg in cases:
        rc = restore_tool.main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (extra, err)
    rc = restore_tool.main(["--model", "mofme_tiny_patch8", "--input", str(tmp_path / "x"), "--out", str(tmp_path)])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err


class _LocalNet(torch.nn.Module):
    """A convolutional stand-in: each output pixel sees inputs within 3 px (three 3x3 convs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 3, 3, padding=1),
        )

    def forward(self, x, task=None):
        return self.body(x)


@pytest.mark.parametrize("size,tile,overlap", [((70, 53), 32, 12), ((64, 64), 24, 16), ((90, 77), 40, 13)])
def test_tiled_equals_untiled_for_a_local_network(size, tile, overlap):
    """Blending weights are 0 within overlap/4 of a tile's inner edge: a network whose receptive radius (3 px) is
    at most overlap/4 gives its untiled output everywhere, seams included."""
    net = _LocalNet().eval()
    x = torch.rand(1, 3, *size)
    whole = net(x)
    tiled = restore(net, x, None, tile, overlap)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    small = restore(net, x, None, tile, 4)  # overlap 4 < 4 x 3 px: the seams see padding, the rest is exact
    diff = (small - whole).abs().amax(dim=(0, 1))  # (H, W)
    assert diff.max() > 1e-3
    far = []
    for n in size:
        keep = torch.ones(n, dtype=torch.bool)
        starts = tile_starts(n, min(tile, n), 4)
        for prev, s in zip(starts, starts[1:]):  # the overlap [s, prev + tile) and 3 px either side
            keep[max(0, s - 3) : prev + tile + 3] = False
        far.append(keep)
    assert diff[far[0]][:, far[1]].max() < 1e-5


def test_tiling_covers_the_image():
    assert tile_starts(100, 40, 10) == [0, 30, 60] and tile_starts(30, 40, 10) == [0]
    with pytest.raises(ValueError, match="larger than the overlap"):
        tile_starts(100, 10, 10)


@pytest.mark.parametrize(
    "change,key",
    [
        ({"model": {"backbone": "m3vit_tiny_patch16_224"}}, "model.backbone"),
        ({"tasks": {"dehaze": {}, "semseg": {}}}, "tasks"),
        ({"tasks": {"dehaze": {"loss": "l2"}}}, "tasks.dehaze.loss"),
        ({"tasks": {"dehaze": {"perceptual_weight": -1.0}}}, "tasks.dehaze.perceptual_weight"),
        ({"data": {"mean": [0.4, 0.4, 0.4]}}, "data.mean"),
        ({"data": {"crop_border": -2}}, "data.crop_border"),
        ({"data": {"datasets": [{"format": "coco"}]}}, "data.datasets[0].format"),
    ],
)
def test_bad_restoration_configs_one_line(tmp_path, change, key):
    d = tiny(tmp_path)
    for section, values in change.items():
        d[section] = values if section == "tasks" else {**d[section], **values}
    with pytest.raises(ConfigError) as e:
        config_from_dict(d, "c.yaml")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_vit_tasks_keep_their_options(tmp_path):
    with pytest.raises(ConfigError, match="tasks.semseg.loss: loss and perceptual_weight are options of restoration"):
        config_from_dict({"tasks": {"semseg": {"loss": "l1"}}}, "c.yaml")
    with pytest.raises(ConfigError, match="model.backbone: a restoration model needs degradation tasks"):
        config_from_dict({"tasks": {"semseg": {}}, "model": {"backbone": "mofme_tiny_patch8"}}, "c.yaml")


def test_train_tool_runs_the_restoration_config(trained, tmp_path, capsys):
    """tools/train.py drives the same engine; --set reaches the restoration options (2 steps, to its table)."""
    import train as train_tool
    import yaml

    _, _, base = trained
    cfg = tiny(base / "data", train={"steps": 2, "progress": False, "tensorboard": False, "threads": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    args = ["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--set", "data.crop_border=1"]
    assert train_tool.main(args) == 0
    out = capsys.readouterr().out
    assert "mean (all images)" in out and "crop border 1" in out and "input PSNR" in out


@pytest.mark.parametrize("router", ["shared", "task_embed"])
def test_a_mixed_batch_is_each_image_with_its_own_degradation(router):
    """All-in-one batches: each image restored as if alone with its degradation; each task's loss over its images."""
    from vision_moe.models.restoration import build_restoration_model

    torch.manual_seed(0)
    model = build_restoration_model(
        "mofme_tiny_patch8",
        ["derain", "dehaze"],
        embed_dim=32,
        num_heads=2,
        attn_head_dim=16,
        router=router,
        residual=False,
    ).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    degs = ["dehaze", "derain", "dehaze", "dehaze"]
    targets = [{"gt": torch.rand(3, 16, 16), "degradation": d} for d in degs]
    with torch.no_grad():
        r = model(x, None, targets)
        alone = torch.cat([model.net(x[i : i + 1], degs[i]) for i in range(4)])
    torch.testing.assert_close(r["out"], alone, atol=1e-5, rtol=1e-4)
    assert r["task_counts"] == {"dehaze": 3, "derain": 1}
    # one forward, one routing record per MoE layer for the whole batch
    assert len(r["aux"]) == len(model.net.moe_layers()) and all(a.probs.shape[0] == 4 * 4 for a in r["aux"])
    assert all(int(a.expert_load.sum()) == 4 * 4 * 2 for a in r["aux"])
    with torch.no_grad():
        torch.testing.assert_close(model.net(x, degs), alone, atol=1e-5, rtol=1e-4)  # per-image tasks directly
    with pytest.raises(ValueError, match="3 per-image tasks for a batch of 4"):
        model.net(x, degs[:3])
    gt = torch.stack([t["gt"] for t in targets])
    torch.testing.assert_close(r["task_losses"]["dehaze"], (alone - gt)[[0, 2, 3]].abs().mean())
    with pytest.raises(ValueError, match="unknown task 'desnow' in the batch"):
        model(x, None, [{**t, "degradation": "desnow"} for t in targets])


def test_batches_mix_degradations_unless_asked_not_to(trained):
    _, _, base = trained
    mixed = Trainer(config_from_dict(tiny(base / "data")), base / "mixed")
    assert [tasks for _, tasks in mixed.train_sets] == [["lowlight", "dehaze"]]
    per_task = Trainer(config_from_dict(tiny(base / "data", data={"mixed_batches": False})), base / "per_task")
    assert [(len(ds), tasks) for ds, tasks in per_task.train_sets] == [(8, ["lowlight"]), (8, ["dehaze"])]
    with pytest.raises(ConfigError, match="moe.mi_weight: the task-expert MI needs one degradation per step"):
        config_from_dict(tiny(base / "data", moe={"mi_weight": 0.005}))


def test_size_schedule_crops_restoration_pairs(trained):
    """data.size_schedule sets the restoration crop size too: degraded input and ground truth are cropped alike,
    at the scheduled size from its step on; evaluation stays at model.img_size."""
    _, _, base = trained
    cfg = tiny(base / "data", data={"size_schedule": [[0, 16], [2, 24]]}, train={"steps": 4})
    tr = Trainer(config_from_dict(cfg), base / "sized")
    seen = []
    forward = tr.step_module.forward

    def recording_forward(images, *args, **kwargs):
        targets = args[0] if args else kwargs["targets"]
        seen.append((tuple(images.shape[-2:]), {tuple(t["gt"].shape[-2:]) for t in targets}))
        return forward(images, *args, **kwargs)

    tr.step_module.forward = recording_forward
    metrics = tr.fit()
    assert seen == [((16, 16), {(16, 16)})] * 2 + [((24, 24), {(24, 24)})] * 2
    assert set(metrics) == {"lowlight", "dehaze"}


def test_export_tool_exports_a_restoration_checkpoint(trained, tmp_path, capsys):
    """tools/export.py takes a restoration checkpoint: one graph per degradation, each of dynamic height and width
    and equal to PyTorch (the pipeline's parity check); a task it does not serve is one line, nothing written."""
    import export as export_tool

    _, _, base = trained
    ckpt = str(latest_checkpoint(base / "run"))
    assert (
        export_tool.main(["--checkpoint", ckpt, "--all-tasks", "--img-size", "32", "32", "--out", str(tmp_path / "x")])
        == 0
    )
    out = capsys.readouterr().out
    assert "dehaze.onnx" in out and "lowlight.onnx" in out
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    assert report["input"]["shape"] == [1, 3, "height", "width"] and report["input"]["multiple"] == 8
    rc = export_tool.main(["--checkpoint", ckpt, "--task", "derain", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown task 'derain'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_one_builder_for_held_out_data(trained):
    """The trainer's evaluation loaders and the exported graphs' evaluation read the same held-out images: one
    builder (evaluator.task_datasets), each degradation its own subset, and a clear error for an unknown task."""
    from vision_moe.engine.evaluator import task_dataset
    from vision_moe.engine.trainer import val_loaders

    tr, _, _ = trained
    loaders = val_loaders(tr.cfg)
    assert set(loaders) == {"lowlight", "dehaze"}
    for task, (loader, ds) in loaders.items():
        alone = task_dataset(tr.cfg, task, "val")
        assert len(alone) == len(ds) == 3 and len(loader.dataset) == 3
        for i in range(len(ds)):
            a, b = ds[i], alone[i]
            assert torch.equal(a[0], b[0]) and a[1]["degradation"] == b[1]["degradation"] == task
    with pytest.raises(ValueError, match="no dataset in the config labels task 'derain'"):
        task_dataset(tr.cfg, "derain", "val")
