"""The ``vision-moe`` console script: bad arguments end in one ``error:`` line, not a traceback."""

import pytest

from vision_moe.cli import main


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["demo", "--tasks", "semseg,semseg"], "vision-moe demo: error: --tasks 'semseg,semseg': expected distinct"),
        (["demo", "--tasks", ","], "vision-moe demo: error: --tasks ',': expected distinct"),
        (["demo", "--img-size", "30", "32"], "vision-moe demo: error: --img-size 30 32: expected multiples of"),
        (["demo", "--img-size", "32"], "argument --img-size: expected 2 arguments"),  # H W, as in the export tools
        (["demo", "--tasks", "foo"], "vision-moe demo: error: --tasks 'foo': unknown task 'foo'; expected names from"),
        (["demo", "--tasks", "deblur"], "error: --tasks 'deblur': unknown task 'deblur'; expected names from"),  # a ViT
        (["models", "nothing*"], "vision-moe models: error: no model matches 'nothing*'; the models are ["),
        (["baseline", "--img-size", "32", "64"], "error: --img-size 32 64: the built-in data is square; expected two"),
        (["demo", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (["baseline", "--img-size", "16", "16"], "argument --img-size: must be >= 32, got 16"),
        (["baseline", "--num-train", "x"], "argument --num-train: expected an integer, got 'x'"),
    ],
)
def test_bad_arguments_give_one_line(argv, expected, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and expected in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_baseline_root_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["baseline", "--root", str(f), "--num-train", "4", "--num-val", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vision-moe baseline: error: ") and str(f) in err and "\n" not in err


def test_demo_runs(capsys):
    assert main(["demo", "--img-size", "32", "32", "--tasks", "semseg,depth", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "task 'semseg'" in out and "task 'depth'" in out and "specialised model equal: True" in out
