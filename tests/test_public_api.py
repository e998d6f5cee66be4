"""The public API: sorted, importable, documented, and every transform covered."""

import inspect
import re
from pathlib import Path

import optax
import pytest
from registry import CASES_BY_NAME

import optax_clip as oc

ROOT = Path(__file__).resolve().parents[1]
# Public callables that are not gradient transformations.
HELPERS = {
    "get_stats",
    "per_example_global_norm_clip",  # functions, like optax's
    "per_example_layer_norm_clip",
    "suggest_max_norm",
    "unitwise_clip",  # AGC's helpers, like optax's (tests/test_unitwise.py)
    "unitwise_norm",
}
# optax's optimizers, skip-aware (tests/test_skippable.py compares them with
# optax's): they clip nothing, so the clips' contract does not apply.
# stable_adamw is AdamW with update clipping (tests/test_update.py checks it
# against a NumPy StableAdamW): its output is Adam's step, not its input clipped.
OPTIMIZERS = {"adam", "adamw", "scale_by_adam", "sgd", "stable_adamw"}


def public_functions(exclude=OPTIMIZERS):
    return [
        name
        for name in oc.__all__
        if inspect.isfunction(getattr(oc, name))
        and name not in HELPERS
        and name not in exclude
    ]


def test_all_is_sorted_unique_and_importable():
    assert list(oc.__all__) == sorted(set(oc.__all__))
    for name in oc.__all__:
        assert hasattr(oc, name), name


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", oc.__version__)


@pytest.mark.parametrize("name", public_functions())
def test_every_transform_is_in_the_contract_registry(name):
    assert name in CASES_BY_NAME, f"add a Case for {name} to tests/registry.py"
    tx = CASES_BY_NAME[name].build()
    assert isinstance(
        tx, (optax.GradientTransformation, optax.GradientTransformationExtraArgs)
    )


@pytest.mark.parametrize("name", public_functions(exclude=()))
def test_transform_docstrings_follow_the_template(name):
    doc = inspect.getdoc(getattr(oc, name))
    for section in ("Args:", "Returns:", "Example", "References:"):
        assert section in doc, f"{name} docstring lacks {section}"
    assert ">>>" in doc, f"{name} docstring has no runnable example"


@pytest.mark.parametrize("name", [n for n in oc.__all__ if n.endswith("State")])
def test_state_classes_declare_their_stats_name(name):
    cls = getattr(oc, name)
    assert isinstance(cls._stats_name, str)
    # Extra logged fields are state fields or properties derived from them.
    assert all(hasattr(cls, f) for f in getattr(cls, "_stats_fields", ()))
    assert "count" not in cls._fields  # optax.tree.get needs distinct names


def test_helpers_are_documented():
    for name in HELPERS & set(oc.__all__):
        doc = inspect.getdoc(getattr(oc, name))
        assert "Args:" in doc and ">>>" in doc


def test_package_ships_py_typed():
    assert (ROOT / "optax_clip" / "py.typed").exists()
