"""Norms of gradient pytrees: the maths and its promises (private).

Everything that squares, sums or maxes gradients goes through this module:

* **Accumulation dtype.** Sums are taken in float32 for bf16, fp16 and float32
  leaves, and in float64 for float64 leaves; partial results of different
  leaves are combined in the widest of these (optax adds per-leaf norms in
  the gradient dtype, which under-clips bf16 trees).
* **One plain pass.** Each leaf is read once, for ``s = sum |x|**p`` and
  ``m = max |x|`` together. When ``s`` is in the normal range, the norm is
  ``s**(1/p)``; when ``m == 0`` (an all-zero leaf or tree) it is exactly 0.
  Subnormal values count as zero, as in XLA's arithmetic.
* **Overflow and underflow.** Otherwise (the squares of a finite gradient
  overflow, or underflow towards zero) the sum is redone on rescaled values.
  This second pass runs inside ``lax.cond``, only when needed. The global
  norm multiplies every value by ``2**-e``, ``m < 2**e``: the norm is ``2**e
  (sum |x 2**-e|**p)**(1/p)``. Per-leaf and per-unit norms sum the values
  times two fixed powers of two instead, ``2**-K`` and ``2**K`` (``K`` from
  :func:`_reduce.fixed_exponent`), and take the first where the plain sum
  overflowed, the second where it underflowed: no factor per leaf to compute
  and read out, which made this rarely-run pass most of the compile time of
  a per-leaf clip. The results may differ from the global norm's rescaled
  pass in the last bits; the plain pass is the same for all.
* **Zero is safe.** The root uses the double-``where`` pattern: the norm of an
  all-zero tree is exactly 0 and its gradient is finite.
* **Non-finite input** gives a NaN or Inf norm, exactly when some value is NaN
  or Inf; every finite input gives a finite norm (short of a norm beyond the
  float range itself).

Which leaves are reduced together is decided once by :mod:`_plan`; partial
results are combined across mapped axes by :mod:`_collectives`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_clip import _collectives, _plan, _reduce, _validation

INF = math.inf
accumulation_dtype = _reduce.accumulation_dtype


def tree_accumulation_dtype(leaves: Sequence[Any]) -> jnp.dtype:
    """The widest accumulation dtype over ``leaves`` (float32 for none)."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in leaves:
        dtype = jnp.promote_types(dtype, accumulation_dtype(jnp.result_type(leaf)))
    return dtype


# --------------------------------------------------------------------------
# Roots and powers of two.
# --------------------------------------------------------------------------


def safe_root(s: jax.Array, p: float) -> jax.Array:
    """``s**(1/p)`` for ``s >= 0`` with a finite gradient at ``s == 0``."""
    if p == 1.0:
        return s
    positive = s > 0
    root = jnp.sqrt(jnp.where(positive, s, jnp.ones_like(s)))
    return jnp.where(positive, root, jnp.zeros_like(s))


def in_normal_range(s: jax.Array) -> jax.Array:
    """True where ``tiny <= s < inf`` (False for NaN, Inf, 0 and subnormals)."""
    return (s >= jnp.finfo(s.dtype).tiny) & (s < jnp.inf)


def float_bits(dtype: Any) -> tuple[Any, int, int]:
    """``(int type, mantissa bits, exponent bias)`` of a float dtype."""
    info = jnp.finfo(dtype)
    return (jnp.int64 if info.bits == 64 else jnp.int32), info.nmant, info.maxexp - 1


def pow2(k: jax.Array, dtype: Any) -> jax.Array:
    """``2**k`` built from its bits, for ``k`` in the normal exponent range.

    Far fewer operations than ``jnp.ldexp`` (a ``pow``): faster to compile.
    """
    itype, nmant, bias = float_bits(dtype)
    return lax.bitcast_convert_type((k.astype(itype) + bias) << nmant, dtype)


def pow2_factors(exponent: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Two normal floats whose product is ``2**-exponent`` (works elementwise).

    Two, because ``2**-exponent`` itself may be subnormal. The values are
    never divided by the largest magnitude ``m``: XLA turns ``x / m`` into
    ``x * (1 / m)``, and ``1 / m`` is subnormal for ``m`` near the float max.
    """
    half = exponent // 2
    return pow2(-half, dtype), pow2(half - exponent, dtype)


def exponent(m: jax.Array) -> jax.Array:
    """``e`` with ``m < 2**e`` for ``m >= 0`` (0 for NaN or Inf).

    Read from the exponent bits: at least the smallest normal exponent + 1
    (a bound, not the exponent, for 0 and subnormals).
    """
    itype, nmant, bias = float_bits(m.dtype)
    field = (lax.bitcast_convert_type(m, itype) >> nmant) & (2 * bias + 1)
    return jnp.where(jnp.isfinite(m), field - bias + 1, 0).astype(itype)


def _root(m: jax.Array, s: jax.Array, p: float, e: jax.Array | None = None):
    """The norm from ``m = max |x|`` and ``s = sum |x 2**-e|**p``.

    ``m`` itself when it is NaN or Inf; NaN when ``s`` is (a max reduced
    across devices may have lost the NaN, the sum never does).
    """
    root = safe_root(s, p)
    if e is not None:
        half = e // 2
        root = root * pow2(half, s.dtype) * pow2(e - half, s.dtype)
    root = jnp.where(jnp.isnan(s), s, root)
    return jnp.where(jnp.isfinite(m), root, m)


def _needs_rescale(s: jax.Array, m: jax.Array) -> jax.Array:
    """Where a finite, non-zero input's plain sum left the normal range.

    Values below the smallest normal float (subnormals) count as zero, as
    they do in XLA's arithmetic (flushed to zero on CPU and GPU): a leaf of
    nothing but subnormals has norm 0, without the rescaled pass.
    """
    return in_normal_range(m) & ~jnp.isnan(s) & ~in_normal_range(s)


def _fixed_root(s, hi, lo, need, k: Any, p: float):
    """The norms where ``need`` from the sums of :func:`_reduce.fixed_scaled_sums`.

    ``hi`` (values times ``2**-k``) where the plain sum ``s`` overflowed,
    ``lo`` (times ``2**k``) where it underflowed; both are positive where
    ``need``. Elsewhere a placeholder (the caller keeps the plain norm).
    """
    over = s > 1
    t = jnp.where(need, jnp.where(over, hi, lo), jnp.ones_like(s))
    root = t if p == 1.0 else jnp.sqrt(t)
    if isinstance(k, int):
        up, down = jnp.asarray(2.0**k, s.dtype), jnp.asarray(2.0**-k, s.dtype)
    else:  # a vector of exponents (leaves of different dtypes)
        up, down = pow2(k, s.dtype), pow2(-k, s.dtype)
    return root * jnp.where(over, up, down)


# --------------------------------------------------------------------------
# Global and per-leaf norms of trees.
# --------------------------------------------------------------------------


def _prepare(tree: Any, axis_name: tuple):
    leaves = [jnp.asarray(x) for x in _validation.float_leaves(tree)]
    dtype = tree_accumulation_dtype(leaves)
    plan = _plan.make(leaves, _collectives.leaf_axes(leaves, axis_name))
    return plan, dtype


def _plain_pass(plan: _plan.Plan, p: float, dtype: Any):
    """Per-row sums and maxima of every segment, in segment order (vectors)."""
    sums, maxes = [], []
    for seg in plan.segments:
        axis = 1 if seg.stacked else None
        s, m = _reduce.sum_and_max(seg.array, 1.0 if p == INF else p, axis, seg.local)
        sums.append(jnp.reshape(s, (-1,)).astype(dtype))
        maxes.append(jnp.reshape(m, (-1,)).astype(dtype))
    return sums, maxes


def _units(plan: _plan.Plan):
    """The segments in reduction units for a total: each branch group, or one."""
    groups = dict(plan.branch_groups)
    i = 0
    while i < len(plan.segments):
        stop = groups.get(i, i + 1)
        yield plan.segments[i:stop]
        i = stop


def _fixed_rescaled_sums(plan: _plan.Plan, p: float, dtype: Any):
    """Per-row ``sum |x 2**-K|**p`` and ``sum |x 2**K|**p`` (segment order).

    Two vectors in ``dtype`` and the exponent ``K`` of each row (a NumPy
    vector: ``K`` depends on the leaf's dtype only, see
    :func:`_reduce.fixed_exponent`). The single leaves of a branch group
    share one fused reduction with two outputs per leaf; a stack is reduced
    row by row.
    """
    his, los, ks = [], [], []
    for segs in _units(plan):
        if len(segs) > 1 and not segs[0].stacked:
            pairs = [_reduce.fixed_scaled_sums([seg.array for seg in segs], p)]
        else:
            pairs = [
                _reduce.fixed_scaled_sums(
                    [seg.array], p, 1 if seg.stacked else None, seg.local
                )
                for seg in segs
            ]
        for hi, lo in pairs:
            his.append(jnp.reshape(hi, (-1,)).astype(dtype))
            los.append(jnp.reshape(lo, (-1,)).astype(dtype))
        for seg in segs:
            k = _reduce.fixed_exponent(seg.array.dtype)
            ks.extend([k] * len(seg.leaves))
    return his, los, np.asarray(ks)


def global_norm(tree: Any, norm_type: float = 2.0, axis_name: tuple = ()):
    """The ``norm_type``-norm of all the values of ``tree`` (1, 2 or ``inf``).

    Returns a scalar in the widest accumulation dtype of the leaves (float32
    at least); 0 for a tree without values.
    """
    plan, dtype = _prepare(tree, axis_name)
    if not plan.segments:
        return jnp.zeros((), dtype)
    # A total: each branch group (same-shape local leaves) is one reduction.
    units = list(_units(plan))
    axes = [segs[0].axes for segs in units]
    pp = 1.0 if norm_type == INF else norm_type
    sums, maxes = [], []
    for segs in units:
        if len(segs) == 1:
            seg = segs[0]
            s, m = _reduce.sum_and_max(seg.array, pp, None, seg.local)
        else:
            s, m = _reduce.sum_and_max_of_all([seg.array for seg in segs], pp)
        sums.append(s.reshape(1).astype(dtype))
        maxes.append(m.reshape(1).astype(dtype))
    m = _reduce.max_nonneg(_collectives.combine(maxes, axes, "max"))
    if norm_type == INF:
        return m
    p = norm_type
    s = jnp.sum(_collectives.combine(sums, axes, "sum"))

    def rescaled():
        e = exponent(m)
        f1, f2 = _reduce.fusion_barrier(pow2_factors(e, dtype))  # read by every leaf
        parts = [
            _reduce.scaled_sum_of_all([g.array for g in segs], p, f1, f2, segs[0].local)
            for segs in units
        ]
        t = _collectives.combine(
            [v.reshape(1).astype(dtype) for v in parts], axes, "sum"
        )
        return _root(m, jnp.sum(t), p, e)

    return lax.cond(_needs_rescale(s, m), rescaled, lambda: _root(m, s, p))


def leaf_norms(tree: Any, norm_type: float = 2.0, axis_name: tuple = ()):
    """The ``norm_type``-norm of each leaf of ``tree``, as one vector (leaf order).

    In the widest accumulation dtype of the tree; empty for a tree without
    leaves. Work on this vector rather than on per-leaf scalars: every scalar
    operation on N separate leaves is N tiny kernels in the compiled step.
    """
    plan, dtype = _prepare(tree, axis_name)
    empty = jnp.zeros((len(plan.empty),), dtype)

    def finish(vec):
        vec = jnp.concatenate([vec, empty]) if plan.empty else vec
        return vec if plan.to_leaf_order is None else vec[plan.to_leaf_order]

    if not plan.segments:
        return finish(jnp.zeros((0,), dtype))
    sums, maxes = _plain_pass(plan, norm_type, dtype)
    axes = [seg.axes for seg in plan.segments]
    m = _collectives.combine(maxes, axes, "max")
    if norm_type == INF:
        return finish(m)
    p = norm_type
    s = _collectives.combine(sums, axes, "sum")
    need = _needs_rescale(s, m)

    def rescaled():
        # The sums of the values times 2**-K (where the plain sum overflowed)
        # or times 2**K (where it underflowed): see _reduce.fixed_exponent.
        his, los, ks = _fixed_rescaled_sums(plan, p, dtype)
        hi = _collectives.combine(his, axes, "sum")
        lo = _collectives.combine(los, axes, "sum")
        if np.all(ks == ks[0]):
            k = int(ks[0])
        else:
            k = jnp.asarray(ks, float_bits(dtype)[0])
        return jnp.where(need, _fixed_root(s, hi, lo, need, k, p), _root(m, s, p))

    return finish(lax.cond(jnp.any(need), rescaled, lambda: _root(m, s, p)))


def unit_norms(arrays: Sequence[jax.Array], axes: Sequence[tuple[int, ...]]):
    """2-norms of each array over its ``axes``, kept as size-1 dimensions.

    One norm per unit, a slice of an array along its ``axes`` (e.g. the
    fan-in of one output neuron, for adaptive gradient clipping); ``axes=()``
    gives ``|x|`` elementwise. The same promises as the tree norms, unit by
    unit; one rescaled pass, for all arrays, only when some unit needs it.
    """
    out: list[jax.Array | None] = []
    todo = []
    for x, ax in zip(arrays, axes, strict=True):
        x = jnp.asarray(x)
        kept = tuple(1 if d in ax else n for d, n in enumerate(x.shape))
        if x.size == 0:
            out.append(jnp.zeros(kept, accumulation_dtype(x.dtype)))
            continue
        s, m = _reduce.sum_and_max(x, 2.0, ax)
        out.append(None)
        todo.append((len(out) - 1, x, ax, s.reshape(kept), m.reshape(kept)))
    if not todo:
        return out
    need = [_needs_rescale(s, m) for *_, s, m in todo]
    any_need = jnp.any(jnp.stack([jnp.any(n) for n in need]))
    plain = [_root(m, s, 2.0) for *_, s, m in todo]

    def rescaled():
        # Same-shape local arrays reduced over the same axes share one
        # reduction (two outputs each: the values times 2**-K and times 2**K);
        # an array that may be sharded is reduced on its own.
        groups: dict[Any, list[int]] = {}
        for j, (_, x, ax, *_) in enumerate(todo):
            local = _plan.is_local(x)
            key = (x.shape, x.dtype, ax, local, None if local else j)
            groups.setdefault(key, []).append(j)
        sums: list[Any] = [None] * len(todo)
        for (_, _, ax, local, _), idx in groups.items():
            for start in range(0, len(idx), _plan.BRANCH_GROUP_SIZE):
                part = idx[start : start + _plan.BRANCH_GROUP_SIZE]
                xs = [todo[j][1] for j in part]
                hi, lo = _reduce.fixed_scaled_sums(xs, 2.0, ax, local)
                for q, j in enumerate(part):
                    sums[j] = (hi[q], lo[q])
        norms = []
        for (_, x, _, s, m), n, (hi, lo), r in zip(
            todo, need, sums, plain, strict=True
        ):
            k = _reduce.fixed_exponent(x.dtype)
            big = _fixed_root(s, hi.reshape(m.shape), lo.reshape(m.shape), n, k, 2.0)
            norms.append(jnp.where(n, big, r))
        return norms

    norms = lax.cond(any_need, rescaled, lambda: plain)
    for (i, *_), norm in zip(todo, norms, strict=True):
        out[i] = norm
    return out


def norm_of_values(values: jax.Array, norm_type: float) -> jax.Array:
    """The ``norm_type``-norm of a small vector (e.g. per-leaf norms), always rescaled.

    Used to turn per-leaf or per-unit norms into a global one without reading
    the gradients again. NaN or Inf values give a NaN or Inf result.
    """
    v = jnp.abs(values.astype(jnp.result_type(values, jnp.float32)))
    if v.size == 0:
        return jnp.zeros((), v.dtype)
    m = _reduce.max_nonneg(v.ravel())
    if norm_type == INF:
        return m
    e = exponent(m)
    f1, f2 = pow2_factors(e, v.dtype)
    a = v * f1 * f2
    return _root(m, jnp.sum(a * a if norm_type == 2.0 else a), norm_type, e)


def norm_of_rows(values: jax.Array) -> jax.Array:
    """The 2-norm of each column of ``values`` (rows combined), always rescaled.

    ``values[i, j]``: the norm of part ``i`` of item ``j`` (e.g. leaf ``i`` of
    example ``j``); the result holds one norm per item, combined as
    :func:`norm_of_values` combines a vector, column by column.
    """
    v = jnp.abs(values.astype(jnp.result_type(values, jnp.float32)))
    if v.shape[0] == 0:
        return jnp.zeros(v.shape[1:], v.dtype)
    m = jnp.max(v, axis=0)  # NaN propagates
    e = exponent(m)
    f1, f2 = pow2_factors(e, v.dtype)
    a = v * f1 * f2
    return _root(m, jnp.sum(a * a, axis=0), 2.0, e)


def norm_of_arrays(arrays: Sequence[jax.Array], norm_type: float) -> jax.Array:
    """:func:`norm_of_values` of all the values of a few small arrays.

    Arrays that may be sharded are reduced one by one (raveling or
    concatenating them fails under ``Explicit`` mesh axes).
    """
    dtype = jnp.result_type(*arrays, jnp.float32)
    if all(_plan.is_local(a) for a in arrays):
        flat = [jnp.ravel(a).astype(dtype) for a in arrays]
        return norm_of_values(jnp.concatenate(flat), norm_type)
    mags = [jnp.abs(a.astype(dtype)) for a in arrays if a.size]
    if not mags:
        return jnp.zeros((), dtype)
    m = _collectives.nan_max(jnp.stack([_collectives.nan_max(a) for a in mags]))
    if norm_type == INF:
        return m
    e = exponent(m)
    f1, f2 = pow2_factors(e, dtype)
    scaled = [a * f1 * f2 for a in mags]
    s = sum(jnp.sum(a * a if norm_type == 2.0 else a) for a in scaled)
    return _root(m, s, norm_type, e)


def tree_extremes(tree: Any, axis_name: tuple = ()):
    """``(max x, min x, max |x|)`` over all values of ``tree`` and mapped axes.

    ``-inf``, ``inf`` and 0 for a tree without values; ``max |x|`` is NaN if
    some value is NaN.
    """
    leaves = [jnp.asarray(x) for x in _validation.float_leaves(tree)]
    dtype = tree_accumulation_dtype(leaves)
    leaves_axes = _collectives.leaf_axes(leaves, axis_name)
    parts = [
        (_reduce.extremes(x), ax)
        for x, ax in zip(leaves, leaves_axes, strict=True)
        if x.size
    ]
    if not parts:
        return (
            jnp.asarray(-jnp.inf, dtype),
            jnp.asarray(jnp.inf, dtype),
            jnp.zeros((), dtype),
        )
    axes = [ax for _, ax in parts]

    def combined(k, op, sign=1.0):
        vecs = [(sign * e[k].astype(dtype)).reshape(1) for e, _ in parts]
        return _collectives.combine(vecs, axes, op)

    top = jnp.max(combined(0, "max"))
    bottom = -jnp.max(combined(1, "max", -1.0))
    mag = _reduce.max_nonneg(combined(2, "max"))
    return top, bottom, mag


def global_and_leaf_norms(
    tree: Any, norm_type: float = 2.0, axis_name: tuple = (), per_leaf: bool = False
):
    """``(global norm, None)``, or with ``per_leaf`` ``(global norm, leaf norms)``.

    With ``per_leaf`` the values are still read once: the global norm is the
    norm of the per-leaf norms (:func:`norm_of_values`), which may differ from
    :func:`global_norm` in the last bit.
    """
    if not per_leaf:
        return global_norm(tree, norm_type, axis_name), None
    norms = leaf_norms(tree, norm_type, axis_name)
    return norm_of_values(norms, norm_type), norms
