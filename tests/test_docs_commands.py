"""Every command in README.md, docs/*.md and export/README.md works as written.

A command is a line of a ```bash block (a trailing backslash continues it, ``&&`` and ``;`` separate commands,
``#`` starts a comment) or an inline code span that starts with a program (``python``, ``vision-moe``, ...) or a
``.py`` script with arguments. New commands in these files are picked up automatically and classified by the
rules below; a command no rule covers fails the test, so each new kind of command is classified on purpose.

- RUN: cheap; run exactly as written (``bash -c``) from a scratch folder that mirrors a fresh clone.
- RUN_SLOW: the same, with ``--runslow`` (one to two minutes each on the shared 2-core machine).
- every other command of this repository's scripts and of the ``vision-moe`` console script: the script exists,
  every repository file it names exists, and its own argument parser accepts the arguments exactly as written
  (parse only: ``parse_args`` is stopped before the script does anything). ``tools/train.py`` also loads its
  config with the ``--set`` overrides (configs/quickstart.yaml where the docs write a placeholder), which is
  where a wrong key or value would fail.
- EXTERNAL: programs of other projects or of the edge device, and commands that need what a run makes.
"""

import argparse
import contextlib
import importlib
import io
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "export" / "README.md"]

# run exactly as written (command text as in the docs, whitespace collapsed); keep this list cheap
RUN = {
    "vision-moe models",
    "python tools/export.py --help",
}
# run exactly as written with --runslow
RUN_SLOW = {
    "vision-moe demo",  # 224 px, batch 2, three tasks: 119 s on the shared 2-core machine (contended)
    # 70 s on the shared 2-core machine (contended); writes out/ in the scratch folder
    'python tools/export.py --model m3vit_tiny_patch16_224 --set depth=2 --tasks-def \'{"semseg": 5, "depth": null}\' '
    "--head linear --img-size 32 48 --all-tasks --multitask --out out/",
}
# programs that are not this repository's: why each is not run here
EXTERNAL = {
    "cd": "a shell builtin: the command after it is classified on its own",
    "make": "builds the generated HLS project (tests/test_hls.py runs its C-simulation)",
    "vitis_hls": "AMD Vitis HLS, not installed here",
    "v++": "AMD Vitis linker, not installed here",
    "trtexec": "TensorRT's tool, on the Jetson",
    "bash": "runs a script that an export writes (artefacts/build_engine.sh)",
    "tensorboard": "a viewer for the logs a training run writes",
    "pip": "installation; tests/test_readme.py checks the set-up commands",
    "git": "a record of how a figure was reproduced at an old commit",
    "pytest": "the test runner itself (a record of the GPU machine's run)",
}
# whole commands that are not run, and why
EXTERNAL_COMMANDS = {
    'python3 -c "import tensorrt"': "checks the Jetson's TensorRT install",
    "python -m pytest tests/test_cuda.py": "the test runner itself; tests/test_cuda.py skips without a GPU",
    "python -m pytest -q": "the test runner itself: CI runs README's test command (tests/test_readme.py)",
    "python -c 'import torchvision; torchvision.models.vgg16(weights=\"DEFAULT\")'": "downloads VGG16's ImageNet "
    "weights into the torch hub cache (needs the network; a test stands in a VGG16 for the perceptual loss)",
}
# tracked top-level folders: a command argument under one of these must exist in the checkout
REPO_DIRS = ("benchmarks", "configs", "docs", "export", "hls", "tests", "tools", "vision_moe")
PROGRAMS = ("python", "python3", "vision-moe", "torchrun", *EXTERNAL)


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    text: str  # as written: comments dropped, continuation lines joined, runs of blanks outside quotes made one
    inline: bool = False  # a code span in prose, which may leave out required arguments (`tools/eval.py --task T`)

    def __str__(self) -> str:
        doc = self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc
        return f"{doc}:{self.line}: {self.text}"


def _split(line: str) -> list[str]:
    """The commands of one logical shell line, each as written: a ``#`` that starts a word starts a comment;
    ``&&``, ``||`` and ``;`` outside quotes separate commands."""
    out, cur, quote, i = [], "", None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            cur += ch
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote, cur = ch, cur + ch
        elif ch == "\\" and i + 1 < len(line):
            cur, i = cur + line[i : i + 2], i + 1
        elif ch == "#" and (not cur or cur[-1] == " "):
            break
        elif line.startswith(("&&", "||"), i) or ch == ";":
            out, cur, i = out + [cur], "", i + (ch != ";")
        elif ch.isspace():
            cur += "" if cur.endswith(" ") else " "
        else:
            cur += ch
        i += 1
    return [c.strip() for c in out + [cur] if c.strip()]


def extract(doc: Path) -> list[Command]:
    text = doc.read_text(encoding="utf-8")
    cmds = []
    fence = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", flags=re.M | re.S)
    for m in fence.finditer(text):
        if m.group(2) not in ("bash", "sh", "shell", "console"):
            continue
        first = text.count("\n", 0, m.start(3)) + 1
        logical, start = "", None
        for k, raw in enumerate(m.group(3).splitlines()):
            line = raw.strip()
            start = first + k if start is None else start
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            cmds += [Command(doc, start, c) for c in _split(logical + line)]
            logical, start = "", None
    outside = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in re.finditer(r"`([^`]+)`", outside):
        words = m.group(1).split()
        if len(words) > 1 and (words[0] in PROGRAMS or words[0].endswith(".py")):
            line = outside.count("\n", 0, m.start()) + 1
            cmds += [Command(doc, line, c, inline=True) for c in _split(" ".join(words))]
    return cmds


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in extract(doc)]


# ------------------------------------------------------------------------------------------------ classification
def classify(cmd: Command) -> tuple[str, str]:
    """('run' | 'run_slow' | 'parse' | 'external', detail)."""
    text = cmd.text
    if text in RUN:
        return "run", ""
    if text in RUN_SLOW:
        return "run_slow", ""
    if text in EXTERNAL_COMMANDS:
        return "external", EXTERNAL_COMMANDS[text]
    words = shlex.split(text)
    prog = words[0]
    if prog in EXTERNAL:
        return "external", EXTERNAL[prog]
    if prog in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        return "parse", ""
    if prog == "torchrun" or prog.endswith(".py") or prog in _console_scripts():
        return "parse", ""
    raise AssertionError(
        f"{cmd}\n  no rule says how to check this command: add it to RUN (cheap), RUN_SLOW, EXTERNAL or "
        "EXTERNAL_COMMANDS in tests/test_docs_commands.py"
    )


def _console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


# ------------------------------------------------------------------------------------------------- parse only
class _Parsed(Exception):
    pass


def _script_and_argv(cmd: Command) -> tuple[Path | None, str | None, list[str]]:
    """(script file, or None for a console script, console-script target, arguments) of a command to parse."""
    words = shlex.split(cmd.text)
    if words[0] == "torchrun":  # its own options come first, then the script and the script's arguments
        words = words[next(i for i, w in enumerate(words) if w.endswith(".py")) :]
    elif words[0] in ("python", "python3"):
        words = words[1:]
    if words[0] in _console_scripts():
        return None, _console_scripts()[words[0]], words
    for base in (ROOT, cmd.doc.parent):  # a kit's own docs run its scripts from its folder (export/)
        if (base / words[0]).is_file():
            return base / words[0], None, words
    same_name = [p for d in REPO_DIRS if d != "tests" for p in (ROOT / d).rglob(words[0])] if cmd.inline else []
    if len(same_name) == 1:  # prose may name a kit's script by its file name (`infer.py --multitask`)
        return same_name[0], None, words
    raise AssertionError(f"{cmd}\n  {words[0]}: no such script in the repository")


def parse_only(cmd: Command) -> argparse.Namespace:
    """The namespace the command's own argument parser builds from the command's arguments, nothing else run."""
    script, target, argv = _script_and_argv(cmd)
    real_parse = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        if cmd.inline:  # prose names the flags it talks about; the flags must exist, the rest may be left out
            for action in self._actions:
                action.required = False
            for group in self._mutually_exclusive_groups:
                group.required = False
        raise _Parsed(real_parse(self, args, namespace))

    if script is not None:
        run, path = (lambda: runpy.run_path(str(script), run_name="__main__")), [str(script.parent)]
        argv = [str(script), *argv[1:]]
    else:
        module, func = target.split(":")
        run, path = (lambda: getattr(importlib.import_module(module), func)()), []
    err = io.StringIO()
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args),
        mock.patch.object(sys, "argv", argv),
        mock.patch.object(sys, "path", path + sys.path),
        contextlib.redirect_stderr(err),
    ):
        try:
            run()
        except _Parsed as parsed:
            return parsed.args[0]
        except SystemExit as e:
            msg = err.getvalue().strip()
            raise AssertionError(f"{cmd}\n  its arguments are refused (exit {e.code}): {msg}") from None
    raise AssertionError(f"{cmd}\n  the script never parsed its arguments")


def _named_files(cmd: Command) -> list[str]:
    """Arguments (and ``--flag=value`` values) that name a file or folder of the repository."""
    words = [w.split("=", 1)[-1] for w in shlex.split(cmd.text)[1:]]
    return [w for w in words if w.split("/")[0] in REPO_DIRS and "/" in w]


def _check_train_config(cmd: Command, ns: argparse.Namespace) -> None:
    from vision_moe.config import load_config

    config = ROOT / ns.config if (ROOT / ns.config).is_file() else ROOT / "configs" / "quickstart.yaml"
    load_config(config, ns.overrides)  # ConfigError names the key and the value


DEEPER = {"tools/train.py": _check_train_config}


# ------------------------------------------------------------------------------------------------------ tests
COMMANDS = all_commands()


def _kind(cmd: Command) -> str:
    try:
        return classify(cmd)[0]
    except AssertionError:
        return "unclassified"  # fails in test_documented_command, with the rule to add


def _params():
    for c in COMMANDS:
        yield pytest.param(c, id=str(c), marks=[pytest.mark.slow] if _kind(c) == "run_slow" else [])


def test_the_docs_hold_commands_of_every_kind():
    kinds = {_kind(c) for c in COMMANDS}
    assert kinds == {"run", "run_slow", "parse", "external"}, kinds
    assert len(COMMANDS) >= 30
    texts = {c.text for c in COMMANDS}
    stale = (RUN | RUN_SLOW | set(EXTERNAL_COMMANDS)) - texts
    assert not stale, f"listed here but no longer in the docs: {sorted(stale)}"


@pytest.mark.parametrize("cmd", _params())
def test_documented_command(cmd, tmp_path):
    kind, why = classify(cmd)
    if kind == "external":
        return  # `why` says what checks it instead, if anything
    if kind in ("run", "run_slow"):
        _run_as_written(cmd, tmp_path, timeout=120 if kind == "run" else 900)
        return
    for name in _named_files(cmd):
        assert (ROOT / name).exists() or (cmd.doc.parent / name).exists(), f"{cmd}\n  {name}: does not exist"
    ns = parse_only(cmd)
    script, _, _ = _script_and_argv(cmd)
    check = DEEPER.get(script.relative_to(ROOT).as_posix() if script else "")
    if check is not None:
        check(cmd, ns)


def test_extraction_reads_blocks_continuations_comments_and_spans(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `vision-moe models` or `tools/eval.py\n--task T` (`model.specialize(task)`, `torchrun`: no commands).\n\n"
        "  ```bash\n  python a.py --x 1 \\\n      --y  '#  2'   # a comment\n"
        "  cd /tmp/p && make csim  # or: make asan\n  ```\n\n```python\nimport torch\n```\n"
    )
    got = [(c.line, c.text, c.inline) for c in extract(doc)]
    assert got == [
        (5, "python a.py --x 1 --y '#  2'", False),
        (7, "cd /tmp/p", False),
        (7, "make csim", False),
        (1, "vision-moe models", True),
        (1, "tools/eval.py --task T", True),
    ]


def test_parse_only_fails_on_an_unknown_flag(tmp_path):
    """The check can fail: a flag the script does not have is caught, with the script's own message; so is a
    config override that the config refuses."""
    from vision_moe.config import ConfigError

    doc = tmp_path / "x.md"
    doc.write_text("```bash\npython tools/eval.py --checkpoint CKPT --task semseg --nonsense 3\n```\n")
    (cmd,) = extract(doc)
    with pytest.raises(AssertionError, match="unrecognized arguments: --nonsense 3"):
        parse_only(cmd)
    doc.write_text("```bash\npython tools/train.py --config CONFIG --set optim.lrr=1\n```\n")
    (cmd,) = extract(doc)
    with pytest.raises(ConfigError, match="optim.lrr: unknown key"):
        _check_train_config(cmd, parse_only(cmd))


def _scratch_clone(tmp_path: Path) -> Path:
    """A folder that looks like a fresh clone (the repository's tracked top level, linked) in which a command's
    outputs (out/, runs/, data_cache/) land without touching the checkout."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in (*REPO_DIRS, "README.md", "pyproject.toml"):
        (clone / name).symlink_to(ROOT / name)
    return clone


def _run_as_written(cmd: Command, tmp_path: Path, timeout: float) -> None:
    r = subprocess.run(
        ["bash", "-c", cmd.text], cwd=_scratch_clone(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{cmd}\n  exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip() or r.stderr.strip(), f"{cmd}\n  printed nothing"
