"""README's two set-up commands stay true: CI runs the test command verbatim; the main job's files exist."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- setup:(\w+) -->\s*```bash\n(.*?)\n```", text, flags=re.S)
    return dict(blocks)


def test_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert sorted(cmds) == ["main", "test"]
    assert all("\n" not in c for c in cmds.values())


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _setup_commands()["test"] in ci


def test_main_job_files_exist():
    words = shlex.split(_setup_commands()["main"])
    for i, w in enumerate(words):
        if w.endswith(".py") or w.endswith(".yaml"):
            assert (ROOT / w).is_file(), f"README's main command names {w}, which does not exist"
        if w == "-e":
            extras = re.findall(r"\[(.*)\]", words[i + 1])
            pyproject = (ROOT / "pyproject.toml").read_text()
            for extra in extras[0].split(",") if extras else []:
                assert re.search(rf"^{extra}\s*=", pyproject, flags=re.M), f"extra [{extra}] not in pyproject"
