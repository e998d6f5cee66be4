"""Every check of a hyper-parameter or an input, in one place (private).

A concrete value (a Python or NumPy number, a concrete JAX scalar) is checked
when the transform is built, and a bad one raises a clear error there.

A traced value (a schedule passed through :func:`optax.inject_hyperparams`
under ``jit``) cannot raise. Each check then returns a traced flag instead of
``True``. The transform turns a step with an out-of-range value into a NaN
threshold (:func:`nan_unless`), so the update is NaN, never a silently wrong
number. Adaptive transforms also leave their statistics untouched, and
guards skip the step.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

#: What a step whose updates hold a NaN or Inf becomes.
NonFinitePolicy = Literal["propagate", "zero_update", "raise"]
#: A norm: ``"l2"``, ``"l1"`` or ``"inf"`` (or the numbers 2, 1, ``inf``).
NormType = Literal["l1", "l2", "inf"] | float
#: The name (or names) of the mapped axes a transform reduces over.
AxisName = str | tuple[str, ...] | None
NONFINITE_POLICIES = ("propagate", "zero_update", "raise")

#: ``True`` for a concrete value that passed its check, else a traced bool.
Valid = bool | jax.Array

_VALID_NORM_TYPES = (
    "'l2', 'l1' or 'inf' (any case; also 'linf', '2' and '1'), or the number "
    "2, 1 or math.inf"
)


def spell(options: tuple[str, ...]) -> str:
    """``('a', 'b', 'c')`` as ``"'a', 'b' or 'c'"``, for error messages."""
    quoted = [repr(o) for o in options]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def is_traced(value: Any) -> bool:
    """True for values whose number is not known in Python (JAX tracers)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(value))


def _as_scalar(name: str, value: Any) -> float | None:
    """``value`` as a Python float, None if traced; raises if not a real scalar."""
    if callable(value) and not hasattr(value, "__array__"):
        raise TypeError(
            f"{name} must be a number, got a callable. To follow a schedule, "
            "wrap the transform with optax.inject_hyperparams."
        )
    if value is None or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    if is_traced(value):
        if jnp.shape(value) != ():
            raise ValueError(
                f"{name} must be a scalar, got an array of shape {jnp.shape(value)}."
            )
        return None
    try:
        arr = np.asarray(value)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be a real number, got {value!r}.") from err
    if arr.shape != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}.")
    if not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    x = float(arr)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN.")
    return x


def _traced(value: Any) -> jax.Array:
    return jnp.asarray(value).astype(jnp.float32)


def nonnegative(name: str, value: Any, *, allow_inf: bool = True) -> Valid:
    """``value >= 0`` (and finite unless ``allow_inf``)."""
    x = _as_scalar(name, value)
    if x is None:
        v = _traced(value)
        return (v >= 0) & (allow_inf | (v < jnp.inf))
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}.")
    if not allow_inf and math.isinf(x):
        raise ValueError(f"{name} must be finite, got {x}.")
    return True


def positive(name: str, value: Any) -> Valid:
    """``value > 0``."""
    x = _as_scalar(name, value)
    if x is None:
        return _traced(value) > 0
    if not x > 0:
        raise ValueError(f"{name} must be > 0, got {x}.")
    return True


def real(name: str, value: Any) -> Valid:
    """A real scalar, not NaN (infinities allowed)."""
    x = _as_scalar(name, value)
    return True if x is not None else ~jnp.isnan(_traced(value))


def in_range(
    name: str, value: Any, low: float, high: float, *, closed_high: bool = False
) -> Valid:
    """``low <= value < high`` (``<= high`` if ``closed_high``)."""
    x = _as_scalar(name, value)
    if x is None:
        v = _traced(value)
        return (v >= low) & ((v <= high) if closed_high else (v < high))
    ok = low <= x <= high if closed_high else low <= x < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {x}.")
    return True


def count(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> Valid:
    """An integer in ``[minimum, maximum]`` that may be traced (not shape-fixing).

    An integral float (``25.0``) is accepted; ``3.5`` and ``True`` are not.
    """
    where = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer {where}, got {value!r}.")
    x = _as_scalar(name, value)
    top = math.inf if maximum is None else maximum
    if x is None:
        v = _traced(value)
        return (v >= minimum) & (v <= top) & (v == jnp.floor(v))
    if math.isinf(x) or x != math.floor(x) or not minimum <= x <= top:
        raise ValueError(f"{name} must be an integer {where}, got {value!r}.")
    return True


def static_int(name: str, value: Any, *, minimum: int) -> int:
    """A Python int for an argument that fixes the shape of the state."""
    if is_traced(value):
        raise TypeError(
            f"{name} fixes the shape of the state and cannot be traced. With "
            f"optax.inject_hyperparams, pass static_args=({name!r},)."
        )
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    arr = np.asarray(value)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    out = int(arr)
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}.")
    return out


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    """One of ``options`` (case-insensitive), lower-cased."""
    if not isinstance(value, str) or value.lower() not in options:
        raise ValueError(f"{name} must be {spell(options)} (any case), got {value!r}.")
    return value.lower()


def flag(name: str, value: Any) -> bool:
    """A Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return bool(value)


def policy(nonfinite: Any) -> str:
    """A non-finite policy name."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite must be {spell(NONFINITE_POLICIES)}, got {nonfinite!r}."
        )
    return nonfinite


def scalar_array(value: Any, dtype: Any) -> jax.Array:
    """``value`` as a scalar array of ``dtype``; beyond its range, +-inf.

    A concrete value is converted on the host without NumPy's overflow
    warning (a float64 threshold of 1e300 is ``inf`` in float32, as intended).
    """
    if is_traced(value):
        return jnp.asarray(value).astype(dtype).reshape(())
    with np.errstate(over="ignore"):
        return jnp.asarray(np.asarray(value, jnp.dtype(dtype))).reshape(())


def all_valid(*flags: Valid) -> Valid:
    """``True`` if every flag is ``True``, else the traced conjunction."""
    traced = [f for f in flags if f is not True]
    if not traced:
        return True
    out = traced[0]
    for f in traced[1:]:
        out = out & f
    return out


def nan_unless(valid: Valid, x: jax.Array) -> jax.Array:
    """``x``, or NaN where a traced hyper-parameter is out of range."""
    if valid is True:
        return x
    return jnp.where(valid, x, jnp.asarray(jnp.nan, jnp.result_type(x)))


def _bad_norm_type(value: Any) -> ValueError:
    return ValueError(f"norm_type must be {_VALID_NORM_TYPES}; got {value!r}.")


def norm_type(value: Any) -> float:
    """``value`` as ``1.0``, ``2.0`` or ``inf``; raises otherwise.

    Accepted: the strings ``"l2"``, ``"l1"``, ``"inf"``, ``"linf"``, ``"2"``,
    ``"1"`` (any case, surrounding spaces ignored) and the numbers 2, 1 and
    ``inf`` (Python, NumPy or concrete JAX scalars; not ``True``).
    """
    if isinstance(value, str):
        key = value.strip().lower()
        table = {"1": 1.0, "l1": 1.0, "2": 2.0, "l2": 2.0, "inf": math.inf}
        table["linf"] = math.inf
        if key in table:
            return table[key]
        raise _bad_norm_type(value)
    if isinstance(value, (bool, np.bool_)):
        raise _bad_norm_type(value)
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            "norm_type must be static ('l2', 'l1' or 'inf', or a Python number), "
            "got a traced value. With optax.inject_hyperparams, pass "
            "static_args=('norm_type',)."
        )
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _bad_norm_type(value) from None
    if x in (1.0, 2.0, math.inf):
        return x
    raise _bad_norm_type(value)


def axis_name(value: Any) -> tuple:
    """``value`` as a tuple of mapped axis names (empty for ``None``)."""
    if value is None:
        return ()
    names = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for name in names:
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise TypeError(
                "axis_name must be a mapped axis name (str) or a tuple of names, "
                f"got {value!r}."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"axis_name has repeated names: {value!r}.")
    return names


def norm_clip(norm_type_: Any, nonfinite: Any, axis_name_: Any):
    """``(norm type, policy, axis names)``: the arguments every norm clip takes."""
    return norm_type(norm_type_), policy(nonfinite), axis_name(axis_name_)


def float_leaves(tree: Any) -> list[jax.Array]:
    """The leaves of a gradient tree; raises for integer, bool or other dtypes.

    A clip of integer values would round every scaled element to an integer
    (mostly to 0), so they are rejected rather than silently truncated.
    """
    leaves = jax.tree.leaves(tree)
    if all(_is_float(x) for x in leaves):
        return leaves
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not _is_float(x):
            raise TypeError(
                "optax_clip: updates must be floating-point (or complex) arrays; "
                f"the leaf at {jax.tree_util.keystr(path) or 'the root'} has "
                f"dtype {jnp.result_type(x)}. Leave integer and bool parameters "
                "out of the optimizer, e.g. with optax.masked or "
                "nnx.Optimizer(..., wrt=nnx.Param)."
            )
    return leaves  # pragma: no cover - unreachable


def _is_float(x: Any) -> bool:
    try:
        return jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    except TypeError:
        return False


def matching_params(name: str, updates: Any, params: Any) -> list:
    """The leaves of ``params``; raises unless shaped like ``updates``."""
    if params is None:
        raise ValueError(
            f"{name} needs the parameters: call tx.update(updates, state, params)."
        )
    u_leaves, u_def = jax.tree.flatten(updates)
    p_leaves, p_def = jax.tree.flatten(params)
    if u_def != p_def:
        raise ValueError(
            f"{name}: params must have the same tree structure as the updates; "
            f"got updates {u_def} and params {p_def}."
        )
    for u, p in zip(u_leaves, p_leaves, strict=True):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"{name}: each parameter must have the shape of its update; got "
                f"{jnp.shape(p)} for an update of {jnp.shape(u)}."
            )
    return p_leaves
