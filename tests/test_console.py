"""The ``vision-moe`` console script: bad arguments end in one ``error:`` line, not a traceback."""

import pytest

from vision_moe.cli import main


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["demo", "--tasks", "semseg,semseg"], "vision-moe demo: error: --tasks 'semseg,semseg': expected distinct"),
        (["demo", "--tasks", ","], "vision-moe demo: error: --tasks ',': expected distinct"),
        (["demo", "--img-size", "30"], "vision-moe demo: error: --img-size 30: expected a multiple of"),
        (["demo", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (["baseline", "--img-size", "16"], "argument --img-size: must be >= 32, got 16"),
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
    assert main(["demo", "--img-size", "32", "--tasks", "a,b", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "task 'a'" in out and "task 'b'" in out and "specialised model equal: True" in out
