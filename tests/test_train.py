"""End-to-end training on tiny built-in data: loss goes down, exact resume, 2-process DDP, bad input, eval tool."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vision_moe.config import config_from_dict
from vision_moe.engine import evaluate_checkpoint, latest_checkpoint
from vision_moe.engine.checkpoint import CheckpointError, load_train_state
from vision_moe.engine.data import TooManyBadSamples
from vision_moe.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny(data_root, **sections) -> dict:
    d = {
        "model": {
            "backbone": "m3vit_tiny_patch16_224",
            "img_size": 32,
            "head_channels": 8,
            "det_channels": 32,
            "det_num_convs": 1,
            "det_scale_factors": [2.0, 1.0, 0.5],
            "backbone_kwargs": {
                "patch_size": 8,
                "embed_dim": 32,
                "depth": 2,
                "num_heads": 2,
                "num_experts": 4,
                "top_k": 2,
                "expert_hidden": 32,
            },
        },
        "tasks": {"classification": {}, "detection": {}, "semseg": {}},
        "data": {
            "datasets": [{"format": "builtin", "root": str(data_root), "num_train": 16, "num_val": 8}],
            "batch_size": 4,
            "eval_batch_size": 8,
            "num_workers": 0,
        },
        "optim": {"lr": 2e-3},
        "sched": {"warmup_steps": 2},
        "train": {"steps": 6, "progress": False, "tensorboard": False, "log_every": 1, "threads": 1},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return d


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin")


def test_short_training_lowers_the_loss(tmp_path, data_root):
    cfg = config_from_dict(
        tiny(
            data_root,
            train={"steps": 40, "progress": False, "tensorboard": True, "threads": 1, "log_every": 5},
            data={"batch_size": 8},
            optim={"lr": 4e-3},
            moe={"mi_weight": 0.005},
            tasks={"semseg": {}},
        )
    )
    cfg.tasks = {"semseg": cfg.tasks["semseg"], "classification": cfg.tasks["classification"]}
    cfg.data.datasets[0].tasks = ["semseg", "classification"]
    tr = Trainer(cfg, tmp_path / "run")
    metrics = tr.fit()
    h = tr.loss_history
    assert len(h) == 40  # data v3: the last 5 steps' mean loss is ~0.79 of the first 5 (0.89 after 30 at lr 2e-3)
    assert sum(h[-5:]) / 5 < 0.85 * sum(h[:5]) / 5, h
    assert set(metrics) == {"semseg", "classification"} and 0 <= metrics["semseg"]["mIoU"] <= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["latest"]["metrics"] == metrics
    assert list((tmp_path / "run" / "tb").iterdir())  # TensorBoard events written


def _hetero_mi(data_root) -> dict:
    """Two datasets labelling one task each (one task per step) and the Mod-Squad MI loss with its memory."""
    one = {"format": "builtin", "root": str(data_root), "num_train": 16, "num_val": 8}
    return {
        "tasks": {"classification": {}, "semseg": {}},
        "data": {"datasets": [{**one, "tasks": ["semseg"]}, {**one, "tasks": ["classification"]}]},
        "moe": {"mi_weight": 0.5},
    }


@pytest.mark.parametrize("variant", ["same_images", "hetero_mi", "channels_last", "size_schedule"])
def test_resume_continues_the_same_trajectory(tmp_path, data_root, variant, capsys):
    base = tiny(
        data_root,
        train={"steps": 6, "ckpt_every": 3, "progress": False, "tensorboard": False, "threads": 1, "log_every": 1},
    )
    if variant == "hetero_mi":
        base.update(_hetero_mi(data_root))
    if variant == "size_schedule":  # progressive resizing across the resume point: 16 px crops, 24 from step 4
        base["data"]["size_schedule"] = [[0, 16], [4, 24]]
    if variant == "channels_last":  # NHWC weights and moments, a conv stem with BatchNorm
        base["train"]["channels_last"] = True
        base["model"]["backbone_kwargs"].update(stem_channels=[8, 16], stem_strides=[2, 2, 2])
    straight = Trainer(config_from_dict(base), tmp_path / "a")
    sizes = []
    straight_forward = straight.step_module.forward

    def recording_forward(images, *args, **kwargs):
        sizes.append(tuple(images.shape[-2:]))
        return straight_forward(images, *args, **kwargs)

    straight.step_module.forward = recording_forward
    straight_metrics = straight.fit()
    want = {"size_schedule": [16] * 4 + [24] * 2}.get(variant, [32] * 6)
    assert sizes == [(s, s) for s in want]
    if variant == "size_schedule":
        assert (
            "training crop size by step (data.size_schedule): 16 px for steps 0-3, 24 px for steps 4-5; "
            "evaluation at 32 px"
        ) in capsys.readouterr().out

    crashed = Trainer(config_from_dict(base), tmp_path / "b")
    calls = {"n": 0}
    forward = crashed.step_module.forward

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th step: after the step-3 checkpoint
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    crashed.step_module.forward = dying_forward
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert latest_checkpoint(tmp_path / "b").name == "step_0000003"
    resumed = Trainer(config_from_dict(base), tmp_path / "b", resume=True)
    assert resumed.step == 3
    resumed.fit()
    assert crashed.loss_history[:3] == straight.loss_history[:3]
    assert resumed.loss_history == straight.loss_history[3:]  # bit-identical continuation
    for (k, v), (_, w) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k
    if variant == "channels_last":
        w = resumed.model.backbone.patch_embed.backbone[0].conv.weight  # the stem's first convolution
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        for task in ("semseg", "classification"):  # eval.py evaluates in the layout the trainer did
            assert evaluate_checkpoint(latest_checkpoint(tmp_path / "a"), task) == straight_metrics[task]
        # an inference capacity is honoured and its drops are reported (a tiny capacity must drop something)
        capped = evaluate_checkpoint(latest_checkpoint(tmp_path / "a"), "semseg", capacity_factor=0.25)
        assert 0 < capped["moe_dropped_fraction"] < 1 and "moe_dropped_fraction" not in straight_metrics["semseg"]
    if variant == "hetero_mi":  # the routing memory came back with the checkpoint and was in use
        assert bool(straight.mi_memory.seen.all())
        for k, v in straight.mi_memory.state_dict().items():
            assert torch.equal(v, resumed.mi_memory.state_dict()[k]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config: Path, out: Path, timeout: float) -> subprocess.CompletedProcess:
    """tools/train.py under torchrun with 2 CPU processes (gloo), one thread each."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(ROOT / "tools" / "train.py"),
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("variant", ["same_images", "hetero_mi"])
def test_ddp_two_processes(tmp_path, data_root, variant):
    cfg = tiny(data_root, train={"steps": 4, "progress": False, "tensorboard": False, "threads": 1, "log_every": 1})
    if variant == "hetero_mi":  # the MI memory's buffers are broadcast by DDP (gloo) and saved by rank 0
        cfg.update(_hetero_mi(data_root))
    p = tmp_path / "ddp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = _torchrun(p, tmp_path / "out", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = latest_checkpoint(tmp_path / "out")
    assert ck is not None and ck.name == "step_0000004"
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert "final metrics" in r.stdout + r.stderr
    # the checkpoint reproduces the metrics printed by rank 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["latest"]["metrics"]
    assert evaluate_checkpoint(ck, "semseg") == pytest.approx(m["semseg"], nan_ok=True)
    if variant == "hetero_mi":
        assert load_train_state(ck)["mi_memory"]["seen"].tolist() == [1, 1]


def _class_folders(root: Path, n_good: int, n_bad: int) -> None:
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n_good):
                Image.new("RGB", (32, 32), (200 * c, 50, 50 + 10 * i)).save(d / f"{i}.png")
            for i in range(n_bad if split == "train" else 0):
                (d / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def _folder_cfg(root: Path, max_bad: float) -> dict:
    d = tiny(
        root,
        data={
            "datasets": [{"format": "imagenet_folder", "root": str(root)}],
            "batch_size": 4,
            "max_bad_fraction": max_bad,
        },
        train={"steps": 4, "progress": False, "tensorboard": False, "threads": 1, "log_every": 1},
    )
    d["tasks"] = {"classification": {}}
    return d


def test_bad_samples_are_skipped_and_counted(tmp_path):
    _class_folders(tmp_path / "imgs", n_good=6, n_bad=1)
    cfg = config_from_dict(_folder_cfg(tmp_path / "imgs", 0.5))
    tr = Trainer(cfg, tmp_path / "run")
    tr.fit()
    assert tr.bad.seen == 16 and 0 < len(tr.bad.bad) < 16
    assert "cannot decode" in tr.bad.bad[0]
    latest = json.loads((tmp_path / "run" / "metrics.json").read_text())["latest"]
    assert latest["bad_samples"] == len(tr.bad.bad)


def test_too_many_bad_samples_stop_training(tmp_path):
    _class_folders(tmp_path / "imgs", n_good=1, n_bad=5)
    cfg = config_from_dict(_folder_cfg(tmp_path / "imgs", 0.1))
    with pytest.raises(TooManyBadSamples, match="samples were unreadable"):
        Trainer(cfg, tmp_path / "run").fit()


def test_a_run_over_the_bad_sample_limit_at_its_end_keeps_its_checkpoint_and_metrics(tmp_path):
    """Fewer samples than the tracker's min_seen: only the final check judges them, after the run is written."""
    _class_folders(tmp_path / "imgs", n_good=6, n_bad=1)
    cfg = config_from_dict(_folder_cfg(tmp_path / "imgs", 0.01))
    tr = Trainer(cfg, tmp_path / "run")
    with pytest.raises(TooManyBadSamples, match=r"unreadable .* \(the final checkpoint .*step_0000004 and metrics"):
        tr.fit()
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    latest = json.loads((tmp_path / "run" / "metrics.json").read_text())["latest"]
    assert latest["step"] == 4 and latest["bad_samples"] == tr.bad.count > 0 and "classification" in latest["metrics"]


def _train_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tool", ROOT / "tools" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_new_run_does_not_mix_into_an_old_runs_folder(tmp_path, data_root, capsys):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny(data_root, train={"steps": 2, "ckpt_every": 1})))
    out = tmp_path / "run"
    tool = _train_tool()
    assert tool.main(["--config", str(p), "--out", str(out)]) == 0
    first = (out / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert tool.main(["--config", str(p), "--out", str(out), "--set", "train.steps=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {out}: already holds checkpoints of a run (newest: step_0000002); expected --resume to continue "
        "it, or a new --out folder (or --overwrite to discard it)"
    )
    assert (out / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes() == first  # untouched
    assert tool.main(["--config", str(p), "--out", str(out), "--set", "train.steps=1", "--overwrite"]) == 0
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step_0000001"]  # the old run is gone, not mixed
    assert json.loads((out / "metrics.json").read_text())["latest"]["step"] == 1
    assert tool.main(["--config", str(p), "--out", str(out), "--resume", "--overwrite"]) == 2


def test_resume_with_another_model_or_an_unreadable_metrics_file(tmp_path, data_root, caplog):
    base = tiny(data_root, train={"steps": 2})
    Trainer(config_from_dict(base), tmp_path / "run").fit()
    wider = tiny(data_root, train={"steps": 3})
    wider["model"]["backbone_kwargs"]["embed_dim"] = 64
    with pytest.raises(CheckpointError, match=r"step_0000002: made with a different model .*model.backbone_kwargs: "):
        Trainer(config_from_dict(wider), tmp_path / "run", resume=True)
    reordered = tiny(data_root, train={"steps": 3})
    reordered["tasks"] = dict(reversed(list(reordered["tasks"].items())))
    with pytest.raises(CheckpointError, match=r"step_0000002: model.tasks in another order than this run's config"):
        Trainer(config_from_dict(reordered), tmp_path / "run", resume=True)
    (tmp_path / "run" / "metrics.json").write_text('{"history": [')  # cut short
    tr = Trainer(config_from_dict(tiny(data_root, train={"steps": 3})), tmp_path / "run", resume=True)
    tr.fit()
    assert (tmp_path / "run" / "metrics.json.unreadable").read_text() == '{"history": ['  # kept aside, not lost
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["latest"]["step"] == 3
    assert "metrics.json: not a metrics file" in caplog.text


def test_train_tool_reports_run_errors_in_one_line(tmp_path, data_root):
    cfg = tiny(data_root)
    cfg["data"]["datasets"] = [{"format": "coco", "root": str(tmp_path / "nowhere")}]
    cfg["tasks"] = {"detection": {}}
    p = tmp_path / "coco.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(p), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nowhere" in last, last


def test_train_tool_reports_config_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("tasks: {semseg: {}}\noptim: {lr: fast}\n")
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"config error: {p}: optim.lr: expected a number (got 'fast')"


def test_ddp_ranks_skip_an_unreadable_batch_together(tmp_path):
    """One rank's share of a step all unreadable while the other's is fine: both ranks skip that step (a rank that
    went on alone would wait forever in DDP's gradient all-reduce)."""
    _class_folders(tmp_path / "imgs", n_good=1, n_bad=5)
    cfg = _folder_cfg(tmp_path / "imgs", 0.99)
    cfg["train"]["steps"] = 6
    p = tmp_path / "ddp_bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = _torchrun(p, tmp_path / "out", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "out").name == "step_0000006"


@pytest.mark.parametrize("uncertainty", [False, True])
def test_step_loss_combines_task_weights_moe_aux_and_mi(tmp_path, data_root, uncertainty):
    """The step's total = sum_t w_t L_t (or Kendall's exp(-s_t) w_t L_t + s_t) + each task's MoE aux loss
    (aux_weight x cv² importance/load + z_weight x z-loss over its MoE layers) + mi_weight x (-MI), every term
    recomputed here from the model's outputs and the loss primitives."""
    from vision_moe.engine.data import PlanDataset, collate_plan
    from vision_moe.moe.losses import importance_load_loss, mutual_information_loss, router_z_loss, task_expert_probs

    weights = {"classification": 0.5, "detection": 1.0, "semseg": 2.0}
    cfg = config_from_dict(
        tiny(
            data_root,
            tasks={t: {"weight": w} for t, w in weights.items()},
            moe={"aux_weight": 0.3, "z_weight": 0.2, "mi_weight": 0.7},
            train={"uncertainty_weighting": uncertainty},
        )
    )
    tr = Trainer(cfg, tmp_path / "run")
    log_vars = {"classification": 0.3, "detection": -0.2, "semseg": 0.5}
    if uncertainty:
        with torch.no_grad():
            for t, s in log_vars.items():
                tr.uncertainty.log_vars[tr.uncertainty.tasks.index(t)] = s
    d, idx, seeds = tr.plan.plan(0, 1)[0]
    ds = PlanDataset([s for s, _ in tr.train_sets])
    images, packed, _ = collate_plan([ds[(d, i, s)] for i, s in zip(idx, seeds)])
    targets, tasks = packed.unpack(), tr.train_sets[d][1]
    assert set(tasks) == set(weights)
    tr.model.train()
    torch.manual_seed(3)  # router noise: the same draws in both passes
    total, logs, _ = tr.step_module(images, targets, tasks)

    torch.manual_seed(3)
    shared = tr.model.forward_shared(images)
    want, probs = 0.0, {}
    for t in tasks:
        r = tr.model(images, t, targets, shared=shared)
        loss_t = sum(r["losses"].values())
        torch.testing.assert_close(logs[t], loss_t.detach())
        wl = weights[t] * loss_t
        want = want + (torch.exp(torch.tensor(-log_vars[t])) * wl + log_vars[t] if uncertainty else wl)
        aux = sum(
            0.3 * importance_load_loss(a.probs, a.expert_index, a.combine_weights, a.load_prob, a.keep)
            + 0.2 * router_z_loss(a.logits)
            for a in r["aux"]
        )
        assert len(r["aux"]) == 1 and aux > 0  # one MoE block in the tiny backbone
        torch.testing.assert_close(logs[f"moe_aux/{t}"], aux.detach())
        want = want + aux
        probs[t] = [a.probs for a in r["aux"]]
    mi = 0.7 * mutual_information_loss(task_expert_probs([probs[t][0] for t in tasks]))
    torch.testing.assert_close(logs["moe_mi"], mi.detach())
    torch.testing.assert_close(total, want + mi)


@pytest.mark.parametrize(
    ("amp", "dtype", "device", "bf16_gpu", "expected"),
    [
        (False, "auto", "cuda", True, None),
        (True, "auto", "cpu", False, torch.bfloat16),
        (True, "auto", "cuda", True, torch.bfloat16),
        (True, "auto", "cuda", False, torch.float16),  # a GPU before Ampere: fp16, so it needs the GradScaler
        (True, "fp16", "cuda", True, torch.float16),
        (True, "bf16", "cpu", False, torch.bfloat16),
    ],
)
def test_amp_dtype_resolves_auto_per_device(monkeypatch, amp, dtype, device, bf16_gpu, expected):
    from vision_moe.engine.trainer import amp_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    cfg = config_from_dict(tiny("unused", train={"amp": amp, "amp_dtype": dtype}))
    assert amp_dtype(cfg, torch.device(device)) == expected
