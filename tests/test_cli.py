"""The console script's demo runs and reports specialised == full for every task."""

from vision_moe.cli import main


def test_demo_prints_usage_and_equivalence(capsys):
    assert main(["demo", "--img-size", "32", "--tasks", "a,b", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "task 'a'" in out and "task 'b'" in out
    assert out.count("specialised model equal: True") == 2
    assert "blocks.11.mlp" in out


def test_models_lists_registry(capsys):
    assert main(["models", "m3vit*"]) == 0
    assert capsys.readouterr().out.split() == [
        "m3vit_base_patch16_224",
        "m3vit_small_patch16_224",
        "m3vit_tiny_patch16_224",
    ]


def test_baseline_on_small_builtin_data(tmp_path, capsys):
    args = ["baseline", "--root", str(tmp_path), "--num-train", "40", "--num-val", "12", "--img-size", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "linear probe on raw pixels, held-out top-1" in out and "(chance 0.200)" in out
