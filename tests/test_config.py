"""Every config in configs/ validates; bad configs fail with one line naming file, key and value."""

from pathlib import Path

import pytest
import yaml

from vision_moe.config import ConfigError, config_from_dict, load_config, yaml_load

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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


QS = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size: must be >= 1 (got 0)"),
        ("data.num_workers=-1", "data.num_workers: must be >= 0 (got -1)"),
        ("optim.lr=-1", "optim.lr: must be a finite number > 0 (got -1.0)"),
        ("optim.lr=.nan", "optim.lr: must be a finite number > 0 (got nan)"),
        ("tasks.semseg.weight=-2", "tasks.semseg.weight: must be a finite number >= 0 (got -2.0)"),
        ("data.crop_scale=[0.5]", "data.crop_scale: expected [min, max] with 0 < min <= max <= 1 (got [0.5])"),
        ("data.crop_scale=[1.5, 0.2]", "data.crop_scale: expected [min, max]"),
        ("data.mean=[0.5, 0.5]", "data.mean: expected 3 values (R, G, B)"),
        ("model.det_channels=16", "model.det_channels: must be a multiple of 32"),
        ("train.device=tpu", "train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (got 'tpu')"),
        ("model.backbone_kwargs.nonsense=1", "unexpected keyword argument 'nonsense'"),
        ("model.backbone_kwargs.top_k=9", "top_k must be in [1, num_experts=8], got 9"),
        ("model.backbone_kwargs.depth=abc", "model.backbone_kwargs: m3vit_tiny_patch16_224 cannot be built"),
        ("data.size_schedule=[[0, 48], [0, 64]]", "data.size_schedule[1]: expected [from_step, size] with from_step"),
        ("data.size_schedule=[[0]]", "data.size_schedule[0]: expected [from_step, size]"),
        ("data.size_schedule=[[-1, 48]]", "data.size_schedule[0]: expected [from_step, size]"),
        ("data.size_schedule=[[0, 0]]", "data.size_schedule[0]: expected [from_step, size]"),
        ("data.size_schedule=[[0, 48.5]]", "data.size_schedule[0][1]: expected an integer (got 48.5)"),
        ("data.size_schedule=[[0, 44]]", "data.size_schedule[0][1]: must be a multiple of m3vit_tiny_patch16_224's "),
    ],
)
def test_values_that_would_fail_inside_training_fail_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(QS, [override])
    assert str(e.value).startswith(f"{QS}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r": is a folder; expected a YAML file$"):
        load_config(tmp_path)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x99")
    with pytest.raises(ConfigError, match=r"b.yaml: not a UTF-8 text file; expected YAML$"):
        load_config(binary)
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: {semseg: {}}\nmodel: {img_size: [1, 2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:\d+: invalid YAML: expected ',' or ']', but got '}'$"):
        load_config(bad)


@pytest.mark.parametrize("text", ["2e-4", "5E-4", "+.5e-3", "1.0e3", "1.5e+2", "3.0e-2"])
def test_exponent_numbers_are_numbers_in_files_and_in_set(tmp_path, text):
    """YAML 1.1 (PyYAML) reads 2e-4 as a string; configs read it as YAML 1.2 and Python do: a float."""
    p = _write(tmp_path, BASE + f"optim: {{lr: {text}}}\n")
    assert load_config(p).optim.lr == float(text)
    assert load_config(QS, [f"optim.lr={text}"]).optim.lr == float(text)
    assert yaml_load(f"-{text.lstrip('+')}") == -float(text)


def test_documented_exponent_overrides_load():
    """docs/training.md's `--set optim.lr=2e-4`; a config file's `lr: 5e-4`; other scalars keep their types."""
    cfg = load_config(QS, ["optim.lr=2e-4", "train.steps=500"])
    assert cfg.optim.lr == 2e-4 and cfg.train.steps == 500
    for raw, want in [("5e-4", 5e-4), ("5", 5), ("1.0", 1.0), ("1e", "1e"), ("e5", "e5"), ("2e-4x", "2e-4x")]:
        value = yaml_load(raw)
        assert value == want and type(value) is type(want), (raw, value)
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer \(got 1000.0\)"):
        load_config(QS, ["train.steps=1e3"])


@pytest.mark.parametrize(
    "overrides, stride",
    [
        (["model.img_size=60"], 8),  # the quickstart's convolutional stem (strides 1-2-1-2-1-2)
        (["model.img_size=60", "model.backbone_kwargs={patch_size: 16, depth: 2}"], 16),  # plain patch embedding
    ],
)
def test_img_size_must_be_a_multiple_of_the_patch_size(overrides, stride):
    """Refused at load, with the real token stride (the stem's HybridEmbed alone would infer 60 // 8 = 7)."""
    with pytest.raises(ConfigError) as e:
        load_config(QS, overrides)
    assert str(e.value) == (
        f"{QS}: model.img_size: must be a multiple of m3vit_tiny_patch16_224's patch size {stride} (got 60)"
    )
    assert load_config(QS, ["model.img_size=56"]).model.img_size == 56
    assert load_config(QS, ["data.size_schedule=[[0, 48], [1440, 64]]"]).data.size_schedule == [[0, 48], [1440, 64]]


def test_motion_kernel_is_checked_and_only_for_the_builtin_restoration_data(tmp_path):
    qr = QS.with_name("quickstart_restore.yaml")
    cfg = yaml.safe_load(qr.read_text())
    cfg["data"]["datasets"][0]["motion_kernel"] = "curly"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ConfigError, match="data.datasets\\[0\\].motion_kernel: expected one of \\['trajectory', 'linear'\\]"
    ):
        load_config(bad)
    cfg["data"]["datasets"][0].update(format="paired", motion_kernel="linear")
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="motion_kernel: is an option of the builtin_restore data"):
        load_config(bad)


def test_bench_train_step_variants_keep_list_values_whole():
    """benchmarks/bench_train_step.py --variant NAME:k=v,k=v: a list value's commas do not split it."""
    from tool_loader import load_script

    bench = load_script("benchmarks/bench_train_step.py")
    sets = "model.det_channels=64,model.backbone_kwargs.stem_channels=[24,48,48,96,96],train.steps=3"
    assert bench.parse_variant(f"former:{sets}") == (
        "former",
        ["model.det_channels=64", "model.backbone_kwargs.stem_channels=[24,48,48,96,96]", "train.steps=3"],
    )
    assert bench.parse_variant("fp32:") == ("fp32", [])
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", bench.parse_variant(f"former:{sets}")[1])
    assert cfg.model.backbone_kwargs["stem_channels"] == [24, 48, 48, 96, 96] and cfg.model.det_channels == 64


@pytest.mark.parametrize("twin", ["blind", "uncertainty", "ffnmoe", "dense"])
def test_restoration_twins_are_the_quickstart_with_one_change(twin):
    """The twins table (docs/restoration.md) compares at the quickstart's budget: each twin's config differs from
    quickstart_restore.yaml only in its name and its model (router or kind of MLP), never in data, steps,
    crop sizes, task weights or optimiser."""
    from vision_moe.config import config_to_dict

    base = config_to_dict(load_config(ROOT / "configs" / "quickstart_restore.yaml"))
    other = config_to_dict(load_config(ROOT / "configs" / f"quickstart_restore_{twin}.yaml"))
    assert other["name"] == f"quickstart_restore_{twin}"
    assert {k for k in base if base[k] != other[k]} == {"name", "model"}
    differs = {k for k in base["model"] if base["model"][k] != other["model"][k]}
    assert differs and differs <= {"backbone", "backbone_kwargs"}
