"""Imports an example script of ``examples/`` as a module, for the tests."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str, module_name: str | None = None):
    """``examples/<name>.py`` imported as a module (``module_name`` or ``name``)."""
    spec = importlib.util.spec_from_file_location(
        module_name or name, EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
