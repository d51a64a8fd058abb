"""tools/train.py and tools/eval.py as a user meets them: Ctrl-C, an --out that is a file, checkpoints that evaluate
from any folder (--data-root), data generation that says so, and what the reporter writes (console, TensorBoard)."""

import logging
import re
from pathlib import Path

import pytest

from vision_moe.data.builtin import prepare_builtin

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
