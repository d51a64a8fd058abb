"""tools/train.py and tools/eval.py as a user meets them: Ctrl-C, an --out that is a file, checkpoints that evaluate
from any folder (--data-root), data generation that says so, and what the reporter writes (console, TensorBoard)."""

import logging
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
