"""DeMoE through the shared engine and the export pipeline: a short run lowers L1 + cross-entropy, the evaluator
reports the classifier's accuracy and the four routings (input, auto, forced to the true and to a wrong type), the
checkpoint reproduces them; tools/export.py writes every graph with an INT8 variant whose PSNR drop is measured
on the held-out images through the evaluator; the Jetson kit's restore_images.py restores a folder (grey and RGBA images
included) as tools/restore.py does."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_moe.config import config_from_dict
from vision_moe.engine import latest_checkpoint, load_model
from vision_moe.engine.inference import restore
from vision_moe.engine.trainer import Trainer, evaluate_checkpoint_tasks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
TASKS = ("deblur", "lowlight")


def _config(data_root) -> dict:
    return {
        "model": {
            "backbone": "demoe_tiny",
            "img_size": 32,
            "backbone_kwargs": {"width": 8, "classifier_hidden": 16},
        },
        "tasks": {t: {} for t in TASKS},
        "data": {
            "datasets": [{"format": "builtin_restore", "root": str(data_root), "num_train": 8, "num_val": 3}],
            "batch_size": 4,
            "eval_batch_size": 8,
            "num_workers": 0,
        },
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "sched": {"warmup_steps": 2},
        "moe": {"aux_loss": "none", "classifier_weight": 0.5},
        "train": {"steps": 40, "progress": False, "tensorboard": False, "log_every": 1, "threads": 1},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("demoe_train")
    tr = Trainer(config_from_dict(_config(base / "data")), base / "run")
    metrics = tr.fit()
    return tr, metrics, base


def test_short_training_learns_restoration_and_the_classifier(trained):
    tr, metrics, base = trained
    h = tr.loss_history
    assert len(h) == 40 and np.mean(h[-8:]) < 0.8 * np.mean(h[:8])
    for m in metrics.values():
        assert m["images"] == 3 and 0 <= m["classifier_accuracy"] <= 1
    assert metrics["lowlight"]["psnr"] > metrics["lowlight"]["input_psnr"]  # a global correction: learnt at once
    routes = json.loads((base / "run" / "routes.json").read_text())
    for t in TASKS:
        r = routes[t]
        assert r["psnr_auto"] == pytest.approx(metrics[t]["psnr"], abs=1e-6)  # the evaluator's default: auto
        wrong = [k for k in r if k.startswith("psnr_wrong_")]
        assert wrong == [f"psnr_wrong_{o}" for o in TASKS if o != t]
        assert r["classifier_accuracy"] == metrics[t]["classifier_accuracy"]
    # forced to its own experts, low light is restored better than by the other type's experts
    assert routes["lowlight"]["psnr_forced"] > routes["lowlight"]["psnr_wrong"]
    ckpt = latest_checkpoint(base / "run")
    again = evaluate_checkpoint_tasks(ckpt)
    for t in TASKS:
        for k in ("psnr", "ssim", "classifier_accuracy"):
            assert again[t][k] == pytest.approx(metrics[t][k], abs=1e-6), (t, k)


def test_export_int8_and_the_kit(trained, tmp_path, capsys):
    import export as export_tool

    _, metrics, base = trained
    ckpt = latest_checkpoint(base / "run")
    out = tmp_path / "art"
    args = ["--checkpoint", str(ckpt), "--all-tasks", "--img-size", "32", "32", "--out", str(out)]
    args += ["--precision", "int8", "--int8-runtime", "onnxruntime", "--calib-images", "4", "--eval-images", "3"]
    assert export_tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "auto.onnx" in printed and "drop" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert sorted(report["tasks"]) == ["auto", *TASKS]
    for task, e in report["tasks"].items():
        ev = e["int8"]["evaluation"]
        assert sorted(ev) == (list(TASKS) if task == "auto" else [task])
        for t, one in ev.items():
            assert one["labelled"] and one["images"] == 3 and one["metric"].startswith("psnr")
            assert one["fp32"] == pytest.approx(metrics[t]["psnr"] if task == "auto" else one["fp32"], abs=1e-3)
            assert abs(one["drop"]) < 3.0  # dB; the quickstart's figure is in the docs
        assert e["int8"]["saturation"]["saturation_free"]
        assert (out / f"{task}.int8.ort.onnx").is_file()
    assert "--minShapes=images:1x3x8x8" in (out / "build_engine.sh").read_text()
    spec = importlib.util.spec_from_file_location("kit_build_engine", ROOT / "export" / "build_engine.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    profiles = {p.name: prof for p, _, prof in builder.graphs(out, "fp16")}  # the engines' (H, W) profiles
    assert profiles == {f"{t}.onnx": [[8, 8], [32, 32], [1024, 1024]] for t in ("auto", *TASKS)}

    # the kit, without vision_moe: a folder with an RGB, a grey and an RGBA image of odd sizes, tiled
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), np.uint8)).save(photos / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 41), np.uint8)).save(photos / "grey.png")
    Image.fromarray(rng.integers(0, 255, (33, 29, 4), np.uint8)).save(photos / "rgba.png")
    spec = importlib.util.spec_from_file_location("kit_restore", ROOT / "export" / "restore_images.py")
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    restored = tmp_path / "restored"
    rc = kit.main(
        [str(out), "--input", str(photos), "--out", str(restored), "--task", "auto", "--precision", "fp32"]
        + ["--runtime", "onnxruntime", "--tile", "24", "--tile-overlap", "8"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and sorted(p.name for p in restored.iterdir()) == ["a.png", "grey.png", "rgba.png"]
    assert sum(" ms" in ln for ln in lines) == 4  # one latency line per image and the mean
    net = load_model(ckpt)[0].net.eval()
    for name in ("a.png", "grey.png"):
        rgb = np.asarray(Image.open(photos / name).convert("RGB"), np.float32) / 255.0
        x = torch.from_numpy(rgb.transpose(2, 0, 1))[None] * 2 - 1
        ref = restore(net, x, "auto", tile=24, overlap=8)[0].clamp(0, 1).numpy().transpose(1, 2, 0)
        got = np.asarray(Image.open(restored / name), np.float32) / 255.0
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1.0 / 255 + 1e-6
    rc = kit.main([str(out), "--input", str(photos), "--out", str(restored), "--task", "derain"])
    err = capsys.readouterr().err
    assert rc == 2 and "--task derain: not in" in err and len(err.strip().splitlines()) == 1
