"""Careful norms of gradient pytrees (private: every transform uses this module).

Everything that squares, sums or maxes gradients lives here, once:

* **Accumulation dtype.** Partial sums are taken in float32 for bf16, fp16 and
  float32 leaves, and in float64 for float64 leaves; partials of different
  leaves are added in the widest accumulation dtype of the tree. (optax adds
  per-leaf norms in the gradient dtype, which under-clips bf16 trees.)
* **Overflow and underflow.** The plain sum of ``|x|**p`` is used when it lies
  in the normal range of the accumulation dtype. Otherwise (the squares of a
  finite gradient overflow, or underflow towards zero) the sum is redone with
  every value divided by the largest magnitude ``m``, and the norm is
  ``m * (sum (|x|/m)**p)**(1/p)``. The fallback runs inside ``lax.cond``, so
  the common case pays one reduction pass and nothing else.
* **Zero is safe.** The ``p``-th root uses the double-``where`` pattern, so
  the norm of an all-zero tree is exactly 0 and its gradient is finite.
* **Distributed sums.** With ``axis_name``, per-leaf partials are combined
  across the named mapped axes (``psum``; ``pmax`` for the inf-norm). Inside a
  ``shard_map`` that tracks replication (``check_vma=True``, the default), a
  leaf is only summed over the named axes it varies on, so a replicated leaf
  is counted once. Where JAX carries no such information (``pmap``, ``vmap``,
  ``shard_map(check_vma=False)``), every leaf is treated as one shard per
  device and summed over all the named axes.

The result of :func:`global_norm` is finite for every finite input, and
non-finite (NaN or Inf) exactly when some input is NaN or Inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

INF = math.inf
_VALID_NORM_TYPES = "1, 2 or inf"


def canonical_norm_type(norm_type: Any) -> float:
    """Returns ``norm_type`` as ``1.0``, ``2.0`` or ``inf``; raises otherwise."""
    if isinstance(norm_type, str):
        key = norm_type.strip().lower()
        table = {"1": 1.0, "l1": 1.0, "2": 2.0, "l2": 2.0, "inf": INF, "linf": INF}
        if key in table:
            return table[key]
        raise ValueError(f"norm_type must be {_VALID_NORM_TYPES}, got {norm_type!r}.")
    if isinstance(norm_type, bool):
        raise ValueError(f"norm_type must be {_VALID_NORM_TYPES}, got {norm_type!r}.")
    if isinstance(norm_type, jax.core.Tracer):
        raise ValueError(
            "norm_type must be a static Python number, got a traced value. With "
            "optax.inject_hyperparams, pass static_args=('norm_type',)."
        )
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(
            f"norm_type must be {_VALID_NORM_TYPES}, got {norm_type!r}."
        ) from None
    if value in (1.0, 2.0, INF):
        return value
    raise ValueError(f"norm_type must be {_VALID_NORM_TYPES}, got {norm_type!r}.")


def canonical_axis_name(axis_name: Any) -> tuple:
    """Returns ``axis_name`` as a tuple of names (empty for ``None``)."""
    if axis_name is None:
        return ()
    if isinstance(axis_name, (tuple, list)):
        names = tuple(axis_name)
    else:
        names = (axis_name,)
    for name in names:
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise TypeError(
                "axis_name must be a mapped axis name (str) or a tuple of names, "
                f"got {axis_name!r}."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"axis_name has repeated names: {axis_name!r}.")
    return names


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype norms of ``dtype`` values are accumulated in (f32 or wider)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.finfo(dtype).dtype  # the real part's dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def tree_accumulation_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
    """The widest accumulation dtype over ``leaves`` (float32 for none)."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in leaves:
        dtype = jnp.promote_types(dtype, accumulation_dtype(jnp.result_type(leaf)))
    return dtype


def _magnitude(x: jax.Array) -> jax.Array:
    """``|x|`` in the accumulation dtype of ``x`` (complex-safe)."""
    x = jnp.asarray(x)
    acc = accumulation_dtype(x.dtype)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.abs(x).astype(acc)
    return jnp.abs(x.astype(acc))


def _power_sum(x: jax.Array, p: float, exponent: jax.Array | None = None):
    """``sum(|x * 2**-exponent|**p)`` in the accumulation dtype (p is 1 or 2).

    The rescaling multiplies by two powers of two, each a normal float, and
    never divides: XLA may turn ``x / m`` into ``x * (1/m)``, and ``1/m`` is
    subnormal (flushed to 0) for ``m`` near the float maximum.
    """
    x = jnp.asarray(x)
    acc = accumulation_dtype(x.dtype)
    if p == 2.0 and not jnp.issubdtype(x.dtype, jnp.complexfloating):
        a = x.astype(acc)  # no abs needed before squaring a real value
    else:
        a = _magnitude(x)
    if exponent is not None:
        half = exponent // 2
        one = jnp.ones((), acc)
        a = a * jnp.ldexp(one, -half) * jnp.ldexp(one, half - exponent)
    return jnp.sum(a * a) if p == 2.0 else jnp.sum(a)


def _exponent(m: jax.Array) -> jax.Array:
    """``e`` with ``m < 2**e`` (0 for 0, NaN or Inf), so ``|x| * 2**-e < 1``."""
    _, e = jnp.frexp(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))
    return e


def _scaled_root(m: jax.Array, exponent: jax.Array, s: jax.Array, p: float):
    """``2**exponent * s**(1/p)``, or ``m`` itself when ``m`` is NaN or Inf."""
    return jnp.where(jnp.isfinite(m), jnp.ldexp(safe_root(s, p), exponent), m)


def _max_magnitude(x: jax.Array) -> jax.Array:
    """``max |x|`` in the accumulation dtype; 0 for an empty leaf, NaN if any NaN."""
    mag = _magnitude(x)
    if mag.size == 0:
        return jnp.zeros((), mag.dtype)
    return jnp.max(mag)


def safe_root(s: jax.Array, p: float) -> jax.Array:
    """``s**(1/p)`` for ``s >= 0`` with a finite gradient at ``s == 0``."""
    if p == 1.0:
        return s
    positive = s > 0
    root = jnp.sqrt(jnp.where(positive, s, jnp.ones_like(s)))
    return jnp.where(positive, root, jnp.zeros_like(s))


def _in_normal_range(s: jax.Array) -> jax.Array:
    """True where ``tiny <= s < inf`` (False for NaN, Inf, 0 and subnormals)."""
    return (s >= jnp.finfo(s.dtype).tiny) & (s < jnp.inf)


# --------------------------------------------------------------------------
# Combining partial results across mapped axes.
# --------------------------------------------------------------------------


def _vma_is_tracked() -> bool:
    """Whether JAX tracks which mapped axes each value varies over.

    True inside ``shard_map(check_vma=True)``; False under ``pmap``, ``vmap``
    and ``shard_map(check_vma=False)``, where a value's type says nothing about
    replication.
    """
    try:
        from jax._src import config as jax_config  # private: no public query exists

        return bool(jax_config._check_vma.value)
    except Exception:  # pragma: no cover - a future JAX without the flag
        return False


def _varying_axes(x: Any) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # pragma: no cover - older JAX


def _leaf_axes(leaves: Sequence[Any], axes: tuple) -> list[tuple]:
    """For each leaf, the named axes its partial result must be reduced over."""
    if not axes:
        return [()] * len(leaves)
    if not _vma_is_tracked():
        return [axes] * len(leaves)
    return [tuple(a for a in axes if a in _varying_axes(x)) for x in leaves]


def _reduce_partials(
    partials: Sequence[jax.Array], leaf_axes: Sequence[tuple], op: str, dtype
) -> jax.Array:
    """Sums (or maxes) per-leaf partial scalars across leaves and mapped axes.

    Leaves are grouped by the axes they vary on, so there is one collective
    per group, not one per leaf.
    """
    groups: dict[tuple, list[jax.Array]] = {}
    for value, ax in zip(partials, leaf_axes, strict=True):
        groups.setdefault(ax, []).append(value.astype(dtype))
    total = None
    for ax, values in groups.items():
        stacked = jnp.stack(values)
        if op == "sum":
            part = jnp.sum(stacked)
            if ax:
                part = lax.psum(part, ax)
        else:
            part = jnp.max(stacked)
            if ax:
                part = lax.pmax(part, ax)
        if total is None:
            total = part
        elif op == "sum":
            total = total + part
        else:
            total = jnp.maximum(total, part)
    assert total is not None
    return total


def _reduce_each(
    partials: Sequence[jax.Array], leaf_axes: Sequence[tuple], op: str
) -> list[jax.Array]:
    """Reduces each leaf's partial over its own mapped axes (one op per group)."""
    out: list[jax.Array | None] = list(partials)
    groups: dict[tuple, list[int]] = {}
    for i, ax in enumerate(leaf_axes):
        if ax:
            groups.setdefault(ax, []).append(i)
    for ax, idx in groups.items():
        dtype = jnp.result_type(*[partials[i] for i in idx])
        stacked = jnp.stack([partials[i].astype(dtype) for i in idx])
        reduced = lax.psum(stacked, ax) if op == "sum" else lax.pmax(stacked, ax)
        for k, i in enumerate(idx):
            out[i] = reduced[k].astype(partials[i].dtype)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Public-to-the-package entry points.
# --------------------------------------------------------------------------


def global_norm(tree: Any, norm_type: float = 2.0, axis_name: tuple = ()) -> jax.Array:
    """The ``norm_type``-norm of all the values of ``tree``, overflow-safe.

    Args:
      tree: a pytree of arrays (``None`` leaves are ignored).
      norm_type: 1.0, 2.0 or ``inf`` (use :func:`canonical_norm_type`).
      axis_name: tuple of mapped axis names to combine partial sums over.

    Returns:
      A scalar in the widest accumulation dtype of the leaves (float32 at least).
    """
    leaves = jax.tree.leaves(tree)
    dtype = tree_accumulation_dtype(leaves)
    if not leaves:
        return jnp.zeros((), dtype)
    leaf_axes = _leaf_axes(leaves, axis_name)
    if norm_type == INF:
        return _reduce_partials(
            [_max_magnitude(x) for x in leaves], leaf_axes, "max", dtype
        )

    p = norm_type
    total = _reduce_partials(
        [_power_sum(x, p) for x in leaves], leaf_axes, "sum", dtype
    )

    def plain(total):
        return safe_root(total, p)

    def rescaled(total):
        del total
        m = _reduce_partials(
            [_max_magnitude(x) for x in leaves], leaf_axes, "max", dtype
        )
        e = _exponent(m)
        s = _reduce_partials(
            [_power_sum(x, p, e) for x in leaves], leaf_axes, "sum", dtype
        )
        # m is 0 (all zeros), positive (finite input) or NaN/Inf (bad input).
        return _scaled_root(m, e, s, p)

    return lax.cond(_in_normal_range(total), plain, rescaled, total)


def leaf_norms(
    tree: Any, norm_type: float = 2.0, axis_name: tuple = ()
) -> list[jax.Array]:
    """Per-leaf ``norm_type``-norms of ``tree`` (in leaf order), overflow-safe.

    Each norm is a scalar in the accumulation dtype of its own leaf. The
    rescaled pass runs (once, for all leaves) only when some leaf's plain sum
    is outside the normal range, e.g. it overflowed or the leaf is all zeros.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return []
    leaf_axes = _leaf_axes(leaves, axis_name)
    if norm_type == INF:
        return _reduce_each([_max_magnitude(x) for x in leaves], leaf_axes, "max")

    p = norm_type
    sums = _reduce_each([_power_sum(x, p) for x in leaves], leaf_axes, "sum")
    ok = [_in_normal_range(s) for s in sums]
    all_ok = jnp.all(jnp.stack(ok))

    def plain(sums):
        return [safe_root(s, p) for s in sums]

    def rescaled(sums):
        ms = _reduce_each([_max_magnitude(x) for x in leaves], leaf_axes, "max")
        exps = [_exponent(m) for m in ms]
        scaled = _reduce_each(
            [_power_sum(x, p, e) for x, e in zip(leaves, exps, strict=True)],
            leaf_axes,
            "sum",
        )
        out = []
        for s, good, m, e, t in zip(sums, ok, ms, exps, scaled, strict=True):
            out.append(jnp.where(good, safe_root(s, p), _scaled_root(m, e, t, p)))
        return out

    return lax.cond(all_ok, plain, rescaled, sums)


def norm_of_values(values: Sequence[jax.Array], norm_type: float) -> jax.Array:
    """The ``norm_type``-norm of a few scalars (e.g. per-leaf norms), overflow-safe.

    Used to turn per-leaf norms into a global one without touching the
    gradients again. Non-finite values give a non-finite result.
    """
    if not values:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(*values, jnp.float32)
    v = jnp.abs(jnp.stack([jnp.asarray(x, dtype) for x in values]))
    m = jnp.max(v)
    if norm_type == INF:
        return m
    e = _exponent(m)
    s = _power_sum(v, norm_type, e)
    return _scaled_root(m, e, s, norm_type)


def reduce_max(tree: Any, axis_name: tuple = ()) -> jax.Array:
    """Largest value over all leaves of ``tree`` (and across mapped axes)."""
    leaves = jax.tree.leaves(tree)
    dtype = tree_accumulation_dtype(leaves)
    if not leaves:
        return jnp.full((), -jnp.inf, dtype)
    parts = [
        jnp.max(x.astype(dtype)) if x.size else jnp.full((), -jnp.inf, dtype)
        for x in map(jnp.asarray, leaves)
    ]
    return _reduce_partials(parts, _leaf_axes(leaves, axis_name), "max", dtype)


def reduce_any(flags: Sequence[jax.Array], leaves: Sequence[Any], axis_name: tuple):
    """Logical OR of per-leaf boolean scalars across leaves and mapped axes."""
    if not flags:
        return jnp.zeros((), bool)
    as_int = [f.astype(jnp.int32) for f in flags]
    return _reduce_partials(as_int, _leaf_axes(leaves, axis_name), "max", jnp.int32) > 0
