"""Imports an example script of ``examples/`` (or any script) as a module."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_module(path: Path, module_name: str):
    """The script at ``path`` imported as a module named ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example(name: str, module_name: str | None = None):
    """``examples/<name>.py`` imported as a module (``module_name`` or ``name``)."""
    return load_module(EXAMPLES / f"{name}.py", module_name or name)
