"""The console script's demo runs and reports specialised == full for every task; tools/eval.py and the
checkpoint reader turn bad input into one-line errors; evaluation reports the images it skipped."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from fixtures_data import write_coco

from vision_moe.cli import main
from vision_moe.engine.checkpoint import CheckpointError, load_model, read_config, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_usage_and_equivalence(capsys):
    assert main(["demo", "--img-size", "32", "48", "--tasks", "semseg,depth", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "task 'semseg'" in out and "task 'depth'" in out
    assert out.count("specialised model equal: True") == 2
    assert "blocks.11.mlp" in out


def test_demo_of_a_dense_model_says_it_has_no_experts(capsys):
    args = ["demo", "--model", "vit_mtl_tiny_patch16_224", "--img-size", "32", "32", "--tasks", "depth", "--batch", "1"]
    assert main(args) == 0
    assert "(none: vit_mtl_tiny_patch16_224 has no MoE layers; every token goes through the same MLP)" in (
        capsys.readouterr().out
    )


# ---------------------------------------------------------------------------------------------- tools/eval.py
def _eval_tool():
    spec = importlib.util.spec_from_file_location("eval_tool", ROOT / "tools" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    """A tiny untrained detection checkpoint whose experiment config evaluates on a 4-image COCO folder in which
    image 4 (one box) is not an image."""
    from vision_moe.config import config_from_dict
    from vision_moe.engine.checkpoint import build_model
    from vision_moe.engine.trainer import model_config

    tmp = tmp_path_factory.mktemp("coco_ck")
    img_dir, _ = write_coco(tmp / "coco")
    (img_dir / "000000000004.jpg").write_bytes(b"not a jpeg")
    cfg = config_from_dict(
        {
            "model": {
                "backbone": "m3vit_tiny_patch16_224",
                "img_size": 32,
                "head": "linear",
                "head_channels": 8,
                "det_channels": 32,
                "det_num_convs": 1,
                "det_scale_factors": [1.0],
                "backbone_kwargs": dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_experts=4, top_k=2),
            },
            "tasks": {"detection": {}},
            "data": {
                "datasets": [
                    {"format": "coco", "root": str(tmp / "coco"), "train_split": "train2017", "val_split": "train2017"}
                ],
                "eval_batch_size": 3,
                "num_workers": 0,
            },
            "train": {"steps": 1, "threads": 1},
        }
    )
    mc = model_config(cfg, {"detection": 3})
    torch.manual_seed(0)
    return save_checkpoint(tmp / "ck", build_model(mc["model"]), mc)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_eval_reports_skipped_images(coco_checkpoint, capsys, caplog):
    """4 val images in batches of 3, one unreadable: the metrics say 1 was skipped, and a warning (stderr)."""
    assert _eval_tool()(["--checkpoint", str(coco_checkpoint), "--task", "detection", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)["detection"]
    assert out["skipped_images"] == 1 and set(out) >= {"AP", "AP50", "AP75"}
    assert "detection: 1 of 4 held-out images were unreadable and skipped" in caplog.text
    # --max-batches 1 reads only the first batch (images 1-3, all readable): nothing skipped
    args = ["--checkpoint", str(coco_checkpoint), "--task", "detection", "--max-batches", "1"]
    assert _eval_tool()(args) == 0
    assert "skipped_images" not in json.loads(capsys.readouterr().out)["detection"]


def test_evaluation_leaves_skipped_images_and_their_ground_truth_out(tmp_path):
    """Perfect detections on the readable images score AP 1.0: the unreadable image's box is not a miss."""
    from vision_moe.data import CocoDetection, SkipBadSamples, collate_multitask
    from vision_moe.engine.evaluator import evaluate_task

    img_dir, _ = write_coco(tmp_path)
    ds = CocoDetection(img_dir.parent, "train2017")
    truth = {round(float(ds[i][0].double().sum()), 2): ds[i][1] for i in range(len(ds))}
    (img_dir / "000000000004.jpg").write_bytes(b"not a jpeg")  # image 4 holds one box

    class Oracle(torch.nn.Module):
        def forward(self, images, task):
            dets = []
            for im in images:  # zero padding leaves the sum as it was
                t = truth[round(float(im.double().sum()), 2)]
                dets.append(dict(boxes=t["boxes"], scores=torch.ones(len(t["labels"])), labels=t["labels"]))
            return {"out": None, "detections": dets}

    loader = torch.utils.data.DataLoader(SkipBadSamples(ds), batch_size=3, collate_fn=collate_multitask)
    m = evaluate_task(Oracle(), "detection", loader, ds, 3, torch.device("cpu"))
    assert m["AP"] == pytest.approx(1.0) and m["skipped_images"] == 1
    with pytest.raises(ValueError, match="max_batches must be >= 0"):
        evaluate_task(Oracle(), "detection", loader, ds, 3, torch.device("cpu"), max_batches=-1)


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--max-batches", "-1"], ["--max-batches must be >= 0", "got -1"]),
        (["--capacity-factor", "nan"], ["--capacity-factor must be a finite number > 0, got nan"]),
        (["--capacity-factor", "inf"], ["--capacity-factor must be a finite number > 0, got inf"]),
        (["--device", "tpu"], ["--device 'tpu'", "expected 'auto', 'cpu'"]),
        (["--device", "cuda:99"], ["--device 'cuda:99'"]),
        (["--task", "nope"], ["unknown task 'nope'"]),
    ],
)
def test_eval_bad_flags_give_one_line_errors(coco_checkpoint, capsys, flags, needles):
    args = ["--checkpoint", str(coco_checkpoint), "--task", "detection", *flags]
    assert _eval_tool()(args) == 2
    _one_line_error(capsys, *needles)


def test_eval_capacity_on_a_model_without_moe_is_refused(coco_checkpoint, tmp_path, capsys):
    """A capacity would change nothing on a dense model: refused (by the model, so export refuses it alike)."""
    cfg = json.loads((coco_checkpoint / "config.json").read_text())
    cfg["model"].update(
        backbone="vit_mtl_tiny_patch16_224", backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    )
    cfg["experiment"]["model"].update(
        backbone=cfg["model"]["backbone"], backbone_kwargs=cfg["model"]["backbone_kwargs"]
    )
    from vision_moe.engine.trainer import build_model_from_config

    dense = save_checkpoint(tmp_path / "dense", build_model_from_config(cfg), cfg)
    args = ["--checkpoint", str(dense), "--task", "detection", "--capacity-factor", "1.0"]
    assert _eval_tool()(args) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --capacity-factor 1.0: this model has no MoE layers, so there is no expert capacity to set"
    )


def _broken_checkpoint(coco_checkpoint, tmp_path, content: bytes) -> Path:
    ck = tmp_path / "ck"
    ck.mkdir(parents=True)
    for f in coco_checkpoint.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    (ck / "config.json").write_bytes(content)
    return ck


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x99\xd8 binary \xff", "config.json: not a UTF-8 JSON file"),
        (b"[1, 2, 3]", "config.json: expected a JSON object with a 'model' section, got an array"),
        (b'{"model": ', "config.json: invalid JSON"),
    ],
)
def test_unreadable_checkpoint_config_names_the_file(coco_checkpoint, tmp_path, capsys, content, needle):
    ck = _broken_checkpoint(coco_checkpoint, tmp_path, content)
    for call in (read_config, load_model):
        with pytest.raises(CheckpointError, match=needle.replace("(", r"\(")) as e:
            call(ck)
        assert str(ck / "config.json") in str(e.value)
    assert _eval_tool()(["--checkpoint", str(ck), "--task", "detection"]) == 2
    _one_line_error(capsys, str(ck / "config.json"), needle)


def test_eval_needs_the_experiment_section(coco_checkpoint, tmp_path, capsys):
    cfg = json.loads((coco_checkpoint / "config.json").read_text())
    del cfg["experiment"]
    ck = _broken_checkpoint(coco_checkpoint, tmp_path, json.dumps(cfg).encode())
    load_model(ck)  # export needs only the model section
    assert _eval_tool()(["--checkpoint", str(ck), "--task", "detection"]) == 2
    _one_line_error(capsys, str(ck / "config.json"), "no 'experiment' section", "rebuilds the held-out data")
    with pytest.raises(CheckpointError, match="the 'experiment' section is an array; expected a JSON object"):
        read_config(
            _broken_checkpoint(coco_checkpoint, tmp_path / "b", b'{"experiment": [1]}'), require=("experiment",)
        )


# ------------------------------------------------------------------------------------- help, defaults, --version
def _parsers():
    """Every parser of tools/train.py, eval.py, download.py and the vision-moe command (its subcommands too)."""
    import argparse

    from vision_moe.cli import build_parser

    out = {"vision-moe": build_parser()}
    for name in ("train", "eval", "download", "export"):
        spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out[f"tools/{name}.py"] = mod.build_parser()
    for action in out["vision-moe"]._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update({f"vision-moe {k}": v for k, v in action.choices.items()})
    return out


def test_every_flag_has_help_with_its_default():
    import argparse

    parsers = _parsers()
    assert len(parsers) == 8
    for where, parser in parsers.items():
        formatter = parser._get_formatter()
        # one of a required group (--checkpoint | --model) is as required as a required flag
        in_required_group = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{where} {name}: no help text"
            takes_value = action.nargs != 0 and not action.required and action not in in_required_group
            text = formatter._expand_help(action)
            assert not takes_value or "(default" in text or "default:" in text, f"{where} {name}: no default: {text}"


@pytest.mark.parametrize(
    "where", ["vision-moe", "tools/train.py", "tools/eval.py", "tools/download.py", "tools/export.py"]
)
def test_version(where, capsys):
    from vision_moe import __version__

    with pytest.raises(SystemExit) as e:
        _parsers()[where].parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vision-moe {__version__}"


def test_no_help_or_message_refers_to_the_projects_issues():
    """String literals (help, messages, docstrings) of the library, tools, benchmarks and the Jetson kit."""
    import re
    import tokenize

    files = [p for d in ("vision_moe", "tools", "benchmarks", "export") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 40
    found = []
    for f in files:
        with open(f, "rb") as fh:
            for tok in tokenize.tokenize(fh.readline):
                if tok.type == tokenize.STRING and re.search(r"\bissues?\b", tok.string, flags=re.I):
                    found.append(f"{f.relative_to(ROOT)}:{tok.start[0]}")
    assert not found


def test_download_tool_usage(capsys):
    spec = importlib.util.spec_from_file_location("download_tool", ROOT / "tools" / "download.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for args, message in [
        (
            [],
            "download.py: error: expected a weights NAME (e.g. vit_small_patch16_224.augreg_in21k_ft_in1k), --url "
            "URL or --list",
        ),
        (["x.y", "--url", "http://h/f"], "download.py: error: give a weights name or --url, not both"),
        (["--list", "x.y"], "download.py: error: --list lists the weight tags; give it alone"),
    ]:
        with pytest.raises(SystemExit) as e:
            mod.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[0].startswith("usage: download.py") and err[-1].startswith(message), err
