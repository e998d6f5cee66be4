"""Combining partial results across mapped axes (``axis_name``), NaN-safe (private).

With ``axis_name``, the per-leaf partial sums (maxima for the inf-norm) are
combined across the named mapped axes with ``psum`` (``pmax``). Inside a
``shard_map`` that tracks replication (``check_vma=True``, the default), a
leaf is only combined over the named axes it varies on, so a replicated leaf
is counted once. Where JAX carries no such information (``pmap``, ``vmap``,
``shard_map(check_vma=False)``), every leaf is one shard per device and is
combined over all the named axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _vma_is_tracked() -> bool:
    """Whether JAX tracks which mapped axes each value varies over.

    True inside ``shard_map(check_vma=True)``; False under ``pmap``, ``vmap``
    and ``shard_map(check_vma=False)``.
    """
    try:
        from jax._src import config as jax_config  # private: no public query exists

        return bool(jax_config._check_vma.value)
    except Exception:  # pragma: no cover - a future JAX without the flag
        return False


def varying_axes(x: Any) -> frozenset:
    """The mapped axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # pragma: no cover - older JAX


def leaf_axes(leaves: Sequence[Any], axes: tuple) -> list[tuple]:
    """For each leaf, the named axes its partial result is combined over.

    Inside a ``shard_map`` that tracks replication, a name that is not one of
    its manual mesh axes is an error (JAX cannot ``psum`` over it there, and
    ignoring it would silently give a per-shard norm).
    """
    if not axes:
        return [()] * len(leaves)
    if not _vma_is_tracked():
        return [axes] * len(leaves)
    try:
        manual = frozenset(jax.sharding.get_abstract_mesh().manual_axes)
    except Exception:  # pragma: no cover - a future JAX without the query
        manual = frozenset()
    if not manual:  # pragma: no cover - tracked but outside any shard_map
        return [axes] * len(leaves)
    unknown = [a for a in axes if a not in manual]
    if unknown:
        raise ValueError(
            f"axis_name {unknown!r} is not a mesh axis of the enclosing "
            f"shard_map (its manual axes are {sorted(manual)!r})."
        )
    return [tuple(a for a in axes if a in varying_axes(x)) for x in leaves]


def nan_max(v: jax.Array, axis: Any = None, keepdims: bool = False) -> jax.Array:
    """``jnp.max`` that is NaN when ``v`` holds a NaN, also under sharded ``jit``.

    XLA's cross-device max (the all-reduce GSPMD inserts for a sharded ``v``)
    drops NaN like ``fmax``.
    """
    m = jnp.max(v, axis=axis, keepdims=keepdims)
    bad = jnp.any(jnp.isnan(v), axis=axis, keepdims=keepdims)
    return jnp.where(bad, jnp.asarray(jnp.nan, m.dtype), m)


def pmax(x: jax.Array, axes: tuple) -> jax.Array:
    """``lax.pmax`` that propagates NaN (the NaN flags travel with the values)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return lax.pmax(x, axes)
    nan = jnp.isnan(x)
    both = jnp.stack([jnp.where(nan, -jnp.inf, x), nan.astype(x.dtype)])
    top, any_nan = lax.pmax(both, axes)
    return jnp.where(any_nan > 0, jnp.nan, top)


def combine(vectors: Sequence[jax.Array], axes: Sequence[tuple], op: str):
    """Per-part vectors combined across their mapped axes, then concatenated.

    ``op`` is ``"sum"`` (``psum``) or ``"max"`` (NaN-safe ``pmax``). Parts with
    the same axes share one collective.
    """
    out = list(vectors)
    groups: dict[tuple, list[int]] = {}
    for i, ax in enumerate(axes):
        if ax:
            groups.setdefault(ax, []).append(i)
    for ax, idx in groups.items():
        joined = jnp.concatenate([vectors[i] for i in idx])
        reduced = lax.psum(joined, ax) if op == "sum" else pmax(joined, ax)
        offset = 0
        for i in idx:
            k = vectors[i].shape[0]
            out[i] = lax.slice_in_dim(reduced, offset, offset + k)
            offset += k
    return out[0] if len(out) == 1 else lax.concatenate(out, 0)
