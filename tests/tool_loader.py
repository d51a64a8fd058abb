"""Load the repository's scripts (``tools/``, ``benchmarks/``: scripts, not a package) without running them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str, name: str | None = None):
    """The module of the script at ``ROOT / relpath``, executed as a module (its ``__main__`` block does not run)."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tool_main(name: str):
    return load_script(f"tools/{name}.py", f"{name}_tool").main
