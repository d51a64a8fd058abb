"""tools/train.py and tools/eval.py as a user meets them: Ctrl-C, an --out that is a file, checkpoints that evaluate
from any folder (--data-root), data generation that says so, and what the reporter writes (console, TensorBoard)."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vision_moe.config import config_from_dict
from vision_moe.data.builtin import prepare_builtin
from vision_moe.engine import evaluate_checkpoint, latest_checkpoint
from vision_moe.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(num_train=16, num_val=8)


def tiny(root, **train) -> dict:
    """A 2-block, 32 px M³ViT on 16 + 8 built-in images; classification and semseg."""
    return {
        "model": {
            "backbone": "m3vit_tiny_patch16_224",
            "img_size": 32,
            "head_channels": 8,
            "backbone_kwargs": dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2),
        },
        "tasks": {"classification": {}, "semseg": {}},
        "data": {
            "datasets": [{"format": "builtin", "root": str(root), **DATA}],
            "batch_size": 4,
            "eval_batch_size": 8,
            "num_workers": 0,
        },
        "train": {"steps": 2, "progress": False, "tensorboard": False, "log_every": 1, "threads": 1, **train},
    }


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data_parent(tmp_path_factory):
    parent = tmp_path_factory.mktemp("data")
    prepare_builtin(parent, img_size=32, **DATA)
    return parent


# ------------------------------------------------------------------------------------------------ tools/train.py
def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(tmp_path / "never_made")))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    train = _tool("train")
    for out, want in [
        (blocker, f"error: {blocker}: is a file; expected a folder for the run (new, or holding a run)"),
        (blocker / "run", f"error: {blocker / 'run'}: cannot create the run folder (Not a directory)"),
    ]:
        for extra in ([], ["--overwrite"]):
            assert train.main(["--config", str(cfg), "--out", str(out), *extra]) == 1
            assert capsys.readouterr().err.strip() == want
    assert not (tmp_path / "never_made").exists()  # refused before any data was generated


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path, capsys, monkeypatch):
    train = _tool("train")
    out = tmp_path / "run"

    def interrupted_run(cfg, out_dir, resume=False):
        (Path(out_dir) / "checkpoints" / "step_0000004").mkdir(parents=True)
        for f in ("config.json", "train_state.pt"):
            (Path(out_dir) / "checkpoints" / "step_0000004" / f).write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted_run)
    args = ["--config", "configs/quickstart.yaml", "--set", "optim.lr=2e-4", "--out", str(out), "--overwrite"]
    assert train.main(args) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"interrupted; the last checkpoint is {out / 'checkpoints' / 'step_0000004'}",
        f"continue with: python {os.path.relpath(ROOT / 'tools' / 'train.py')} --config configs/quickstart.yaml "
        f"--set optim.lr=2e-4 --out {out} --resume",
    ]

    def interrupted_early(cfg, out_dir, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted_early)
    assert train.main(["--config", "configs/quickstart.yaml", "--out", str(tmp_path / "new")]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted before the first checkpoint: nothing to resume in {tmp_path / 'new'}; run the same command "
        "to start over"
    )


def test_ctrl_c_in_a_real_run_prints_two_lines_and_no_traceback(tmp_path, data_parent):
    """SIGINT to the whole process group, as a terminal sends it (the loader process gets it too)."""
    cfg = tiny(data_parent, steps=100000, ckpt_every=2)
    cfg["data"]["num_workers"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--config", "c.yaml", "--out", "run"]
    # the child starts with SIGINT's default disposition, as a terminal's foreground job does: a shell starts
    # background jobs (e.g. `.ci/run &`) with SIGINT ignored, children inherit that, and Python then installs no
    # KeyboardInterrupt handler, so the run would rightly go on (the cause of this test's earlier rare failures)
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(tmp_path / "run") is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say where the run was
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"still running 60 s after SIGINT; stdout ends {out[-300:]!r}; stderr {err[-600:]!r}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("INFO ")]
    assert len(lines) == 2, err
    ckpt = lines[0].removeprefix("interrupted; the last checkpoint is ")
    assert Path(tmp_path / ckpt).is_dir() and ckpt.startswith("run/checkpoints/step_")
    assert lines[1] == f"continue with: python {ROOT / 'tools' / 'train.py'} --config c.yaml --out run --resume"


# ------------------------------------------------------------------------------ data roots and tools/eval.py
def test_a_checkpoint_evaluates_from_any_folder_and_with_data_root(tmp_path, data_parent, monkeypatch, caplog, capsys):
    """Trained with a relative data root; evaluated from another folder, then with the data moved (--data-root),
    then with the data gone (generated again, said in a warning): the trainer's metrics every time."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    copy = work / "data" / data_parent.name
    os.symlink(data_parent, copy)
    monkeypatch.chdir(work)
    metrics = Trainer(config_from_dict(tiny(Path("data") / data_parent.name)), "run").fit()
    ckpt = latest_checkpoint(work / "run")
    stored = json.loads((ckpt / "config.json").read_text())["experiment"]["data"]["datasets"][0]["root"]
    assert stored == str(copy)  # absolute

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with caplog.at_level(logging.INFO):
        assert evaluate_checkpoint(ckpt, "semseg") == metrics["semseg"]
    assert not list(elsewhere.iterdir()) and "generating" not in caplog.text  # nothing generated, nothing said

    moved = tmp_path / "moved"
    os.rename(copy, moved)  # the symlink moves; --data-root takes the parent or the data folder itself
    folder = next(moved.iterdir())
    evaluate = _tool("eval").main
    capsys.readouterr()  # the trainer's own output
    for root in (moved, folder):
        assert evaluate(["--checkpoint", str(ckpt), "--task", "semseg", "--data-root", str(root)]) == 0
        assert json.loads(capsys.readouterr().out)["semseg"] == metrics["semseg"]
    assert "generating" not in caplog.text

    with caplog.at_level(logging.INFO):  # gone: generated again, deterministic, never silently
        assert evaluate_checkpoint(ckpt, "semseg", data_root=tmp_path / "fresh") == metrics["semseg"]
    assert f"{ckpt}: its built-in data is not in {tmp_path / 'fresh' / folder.name} (--data-root); generating" in (
        caplog.text
    )


def test_a_missing_dataset_is_one_line_naming_data_root(tmp_path, capsys):
    """A non-generated dataset that is not where the checkpoint says: refused, naming the root and the flag."""
    from vision_moe.engine.checkpoint import save_checkpoint
    from vision_moe.engine.trainer import build_model_from_config, model_config

    cfg = tiny(tmp_path / "imagenet_like")
    cfg["data"]["datasets"] = [{"format": "imagenet_folder", "root": str(tmp_path / "imagenet_like")}]
    cfg["tasks"] = {"classification": {}}
    mc = model_config(config_from_dict(cfg), {"classification": 2})
    ckpt = save_checkpoint(tmp_path / "ck", build_model_from_config(mc), mc)
    assert _tool("eval").main(["--checkpoint", str(ckpt), "--task", "classification"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {ckpt}: data.datasets[0].root {tmp_path / 'imagenet_like'}: not found; expected the "
        "imagenet_folder dataset the checkpoint was trained on (tools/eval.py --data-root names where it is now)"
    )


# ---------------------------------------------------------------------------------------- built-in data progress
def test_generating_the_builtin_data_shows_progress(tmp_path, capsys, caplog):
    """A tqdm bar when asked (tools/eval.py, training with train.progress), and log lines that say it happens."""
    from vision_moe.data.builtin import _Progress

    with caplog.at_level(logging.INFO):
        out = prepare_builtin(tmp_path, num_train=6, num_val=4, img_size=32, progress=True)
    err = capsys.readouterr().err
    assert "built-in data: 100%" in err and "10/10" in err, err
    assert f"generating the built-in data (6 + 4 images, 32 px) into {out}; once: later runs reuse it" in caplog.text
    with caplog.at_level(logging.INFO):  # no bar (train.progress: false): a count line every `every` seconds
        lines = _Progress(10, "built-in data", bar=False, every=0.0)
        lines.update(3)
        lines.update(7)  # the last count is not logged: the "written in N s" line follows it
    assert "built-in data: 3 of 10 images" in caplog.text and "10 of 10" not in caplog.text


# ------------------------------------------------------------------------------------------------------ reporter
def test_tensorboard_expert_load_is_one_run_with_a_chart_per_layer(tmp_path):
    """add_scalars made one run (folder) per (task, layer, expert); now: tags in the run, one chart per layer."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from vision_moe.engine.reporter import Reporter

    rep = Reporter(tmp_path, 10, 0, True, progress=False, tensorboard=True)
    loads = {"semseg": [[0.5, 0.25, 0.25, 0.0], [0.25] * 4], "depth": [[0.0, 0.0, 0.5, 0.5], [0.25] * 4]}
    rep.expert_load(1, loads)
    rep.expert_load(2, loads)
    rep.close()
    assert [p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []  # a single run
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    want = {f"expert_load/{t}/layer{i}/e{e}" for t in loads for i in range(2) for e in range(4)}
    assert set(ea.Tags()["scalars"]) == want
    assert [(s.step, s.value) for s in ea.Scalars("expert_load/depth/layer0/e3")] == [(1, 0.5), (2, 0.5)]
    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {(cat.title, c.title): list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts == {
        (f"expert_load/{t}", f"layer{i}"): [rf"^expert_load/{t}/layer{i}/e\d+$"] for t in loads for i in range(2)
    }


def test_eta_follows_the_recent_pace(tmp_path, monkeypatch):
    """After a slower phase starts (a larger crop size from data.size_schedule), the ETA is the remaining steps at
    the last ETA_WINDOW steps' pace, not at the average since the start."""
    from vision_moe.engine import reporter as reporter_mod

    clock = [0.0]
    monkeypatch.setattr(reporter_mod.time, "perf_counter", lambda: clock[0])
    rep = reporter_mod.Reporter(tmp_path, 1000, 0, True, progress=False, tensorboard=False)
    w = rep.ETA_WINDOW
    for step in range(1, 501):  # 500 steps of 0.1 s, then 300 of 0.5 s
        clock[0] += 0.1
        rep.step(step, {"total": 1.0}, 1e-3, log=False)
    assert "ETA 0.8 min" in rep.status(500)  # 500 steps left at 0.1 s
    for step in range(501, 801):
        clock[0] += 0.5
        rep.step(step, {"total": 1.0}, 1e-3, log=False)
    assert w <= 300 and "ETA 1.7 min" in rep.status(800)  # 200 steps left at 0.5 s (the average would say 0.8)
    rep.close()


@pytest.mark.parametrize("bar", [False, True])
def test_without_a_progress_bar_each_checkpoint_and_evaluation_is_a_progress_line(tmp_path, capsys, bar):
    from vision_moe.engine.reporter import Reporter

    rep = Reporter(tmp_path, 10, 0, True, progress=bar, tensorboard=False)
    for step in (1, 2, 3, 4):
        rep.step(step, {"total": 2.0}, 1e-3, log=True)
    rep.checkpoint(4, tmp_path / "checkpoints" / "step_0000004")
    rep.evaluation(4, {"semseg": {"mIoU": 0.5}})
    rep.close()
    out = capsys.readouterr().out.splitlines()
    if bar:  # the bar shows step, ETA and loss; the evaluation line is short
        assert out == ["step 4: semseg: mIoU=0.5000"]
        return
    assert len(out) == 2
    assert re.fullmatch(rf"step 4/10 \(0\.\d min, ETA 0\.\d min; loss 2\.000\): checkpoint {tmp_path}/\S+", out[0])
    assert re.fullmatch(r"step 4/10 \(0\.\d min, ETA 0\.\d min; loss 2\.000\): semseg: mIoU=0\.5000", out[1])
