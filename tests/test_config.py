"""Every config in configs/ validates; bad configs fail with one line naming file, key and value."""

from pathlib import Path

import pytest

from vision_moe.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert "quickstart.yaml" in names and len(names) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = load_config(path)
    assert cfg.tasks and cfg.data.datasets


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "tasks: {semseg: {}}\n"


@pytest.mark.parametrize(
    "text,key,value",
    [
        (BASE + "optim: {lr: fast}\n", "optim.lr", "'fast'"),
        (BASE + "train: {stepz: 3}\n", "train.stepz", "3"),
        ("tasks: {segmentation: {}}\n", "tasks.segmentation", "'segmentation'"),
        (BASE + "train: {steps: 1.5}\n", "train.steps", "1.5"),
        (BASE + "data: {datasets: [{format: coco, tasks: [detection]}]}\n", "data.datasets[0].tasks", "'detection'"),
        (BASE + "model: {head: fpn}\n", "model.head", "'fpn'"),
        (BASE + "model: {backbone: resnet50}\n", "model.backbone", "'resnet50'"),
        (BASE + "train: {amp: 'yes'}\n", "train.amp", "'yes'"),
    ],
)
def test_errors_name_file_key_value(tmp_path, text, key, value):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(p) in msg and key in msg and value in msg


def test_base_and_set_overrides(tmp_path):
    _write(tmp_path, BASE + "optim: {lr: 0.1, name: sgd}\ntrain: {steps: 10}\n", "base.yaml")
    p = _write(tmp_path, "_base_: base.yaml\noptim: {lr: 0.2}\n")
    cfg = load_config(p, ["train.steps=7", "model.backbone_kwargs={depth: 2}", "tasks.depth.weight=2"])
    assert cfg.optim.lr == 0.2 and cfg.optim.name == "sgd" and cfg.train.steps == 7
    assert cfg.model.backbone_kwargs == {"depth": 2} and cfg.tasks["depth"].weight == 2.0
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(p, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["train.steps"])


def test_two_levels_of_base_rejected(tmp_path):
    _write(tmp_path, BASE, "a.yaml")
    _write(tmp_path, "_base_: a.yaml\n", "b.yaml")
    p = _write(tmp_path, "_base_: b.yaml\n")
    with pytest.raises(ConfigError, match="only one level"):
        load_config(p)


def test_dict_without_tasks_rejected():
    with pytest.raises(ConfigError, match="tasks: at least one task"):
        config_from_dict({})
