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

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_clip import _validation

INF = math.inf


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


def _power_sum(x: jax.Array, p: float, factors: tuple | None = None):
    """``sum(|x * f1 * f2|**p)`` in the accumulation dtype (p is 1 or 2).

    ``factors`` (see :func:`_pow2_factors`) are two powers of two, each a
    normal float, used to rescale by ``2**-e``. We never divide by the largest
    magnitude ``m``: XLA may turn ``x / m`` into ``x * (1/m)``, and ``1/m`` is
    subnormal (flushed to 0) for ``m`` near the float maximum.
    """
    x = jnp.asarray(x)
    acc = accumulation_dtype(x.dtype)
    if p == 2.0 and not jnp.issubdtype(x.dtype, jnp.complexfloating):
        a = x.astype(acc)  # no abs needed before squaring a real value
    else:
        a = _magnitude(x)
    if factors is not None:
        a = a * factors[0].astype(acc) * factors[1].astype(acc)
    return jnp.sum(a * a) if p == 2.0 else jnp.sum(a)


def _float_bits(dtype: Any) -> tuple[Any, int, int]:
    """``(int type, mantissa bits, exponent bias)`` of a float dtype."""
    info = jnp.finfo(dtype)
    return (jnp.int64 if info.bits == 64 else jnp.int32), info.nmant, info.maxexp - 1


def _pow2(k: jax.Array, dtype: Any) -> jax.Array:
    """``2**k`` built from its bits, for ``k`` in the normal exponent range.

    Far fewer operations than ``jnp.ldexp`` (a ``pow``), which matters for
    compile time: these run on every step's rescaled branch.
    """
    itype, nmant, bias = _float_bits(dtype)
    return lax.bitcast_convert_type((k.astype(itype) + bias) << nmant, dtype)


def _pow2_factors(exponent: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Two normal floats whose product is ``2**-exponent`` (works elementwise)."""
    half = exponent // 2
    return _pow2(-half, dtype), _pow2(half - exponent, dtype)


def _exponent(m: jax.Array) -> jax.Array:
    """``e`` with ``m < 2**e`` (0 for NaN or Inf), so ``|x| * 2**-e < 1``.

    Read from the exponent bits of ``m >= 0``: ``e`` is at least the smallest
    normal exponent + 1 (a bound, not the exponent, for 0 and subnormals).
    """
    itype, nmant, bias = _float_bits(m.dtype)
    field = (lax.bitcast_convert_type(m, itype) >> nmant) & (2 * bias + 1)
    return jnp.where(jnp.isfinite(m), field - bias + 1, 0).astype(itype)


def _scaled_root(m: jax.Array, exponent: jax.Array, s: jax.Array, p: float):
    """``2**exponent * s**(1/p)``, or ``m`` itself when ``m`` is NaN or Inf.

    A NaN sum ``s`` gives NaN even when ``m`` is finite: a max reduced across
    devices may have lost the NaN (see :func:`_nan_max`), the sum never does.
    """
    half = exponent // 2
    up = safe_root(s, p) * _pow2(half, s.dtype) * _pow2(exponent - half, s.dtype)
    root = jnp.where(jnp.isnan(s), s, up)
    return jnp.where(jnp.isfinite(m), root, m)


def _nan_max(v: jax.Array, axis: Any = None, keepdims: bool = False) -> jax.Array:
    """``jnp.max`` that is NaN when ``v`` holds a NaN, also under sharded ``jit``.

    XLA's cross-device max (the all-reduce GSPMD inserts when ``v`` is sharded;
    measured on the CPU backend of jax 0.10.2) drops NaN like ``fmax``.
    """
    m = jnp.max(v, axis=axis, keepdims=keepdims)
    bad = jnp.any(jnp.isnan(v), axis=axis, keepdims=keepdims)
    return jnp.where(bad, jnp.asarray(jnp.nan, m.dtype), m)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_nonneg(a: jax.Array, axis: int | None = None) -> jax.Array:
    """``max(a)`` of a non-empty ``a >= 0``, NaN if any element is NaN; one pass.

    XLA:CPU's max reduction of a large float array drops NaN (measured on jax
    0.10.2: ``jnp.max`` of 20000 values, one NaN, is finite), and so does the
    cross-device max of sharded ``jit``. The integer max of the bit patterns
    keeps it: for non-negative floats the patterns are ordered like the values
    and every NaN pattern (sign cleared by ``abs``) is above that of ``+inf``.
    Differentiated like ``jnp.max``. ``axis``: reduce that axis only.
    """
    itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[jnp.dtype(a.dtype).itemsize]
    top = jnp.max(lax.bitcast_convert_type(a, itype), axis=axis)
    return lax.bitcast_convert_type(top, a.dtype)


@_max_nonneg.defjvp
def _max_nonneg_jvp(axis, primals, tangents):
    (a,), (t,) = primals, tangents
    tangent = jax.jvp(lambda v: jnp.max(v, axis=axis), (a,), (t,))[1]
    return _max_nonneg(a, axis), tangent


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


@jax.custom_jvp
def materialize(x: Any) -> Any:
    """Computes the small values ``x`` (a pytree) once, not inside each consumer.

    XLA fuses cheap scalar arithmetic into every kernel that reads its result.
    A value derived from the partial sums of all N leaves (a norm, a scale, a
    rescaling factor) and read by N per-leaf kernels is then recomputed inside
    each of them: O(N**2) instructions, which took XLA:CPU about a minute to
    compile for 300 leaves. ``lax.optimization_barrier`` does not prevent this
    (XLA:CPU removes it before fusion); a sort, which XLA never fuses, does.
    The values are stacked twice and sorted by a constant key (a no-op costing
    well under a microsecond). Differentiation treats it as the identity.
    """
    leaves, treedef = jax.tree.flatten(x)
    if not leaves:
        return x
    arrays = [jnp.asarray(v) for v in leaves]
    flat = [jnp.broadcast_to(v.reshape(1, -1), (2, v.size)) for v in arrays]
    keys = lax.broadcasted_iota(jnp.int32, (2, max(v.size for v in arrays)), 0)
    # Every operand of a sort has the keys' shape: pad the values to one width.
    width = keys.shape[1]
    flat = [jnp.pad(v, ((0, 0), (0, width - v.shape[1]))) for v in flat]
    out = lax.sort((keys, *flat), dimension=0, num_keys=1)[1:]
    res = [o[0, : v.size].reshape(v.shape) for o, v in zip(out, arrays, strict=True)]
    return jax.tree.unflatten(treedef, res)


@materialize.defjvp
def _materialize_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return materialize(x), t


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
    """For each leaf, the named axes its partial result must be reduced over.

    Inside a ``shard_map`` that tracks replication, a leaf is reduced over the
    named axes it varies on, and a name that is not one of its manual mesh
    axes is an error (JAX cannot ``psum`` over it there, and ignoring it would
    silently give a per-shard norm). Elsewhere every leaf is reduced over all
    the named axes.
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
    return [tuple(a for a in axes if a in _varying_axes(x)) for x in leaves]


def _pmax(x: jax.Array, axes: tuple) -> jax.Array:
    """``lax.pmax`` that propagates NaN.

    XLA's cross-device max (the CPU all-reduce, measured on jax 0.10.2) drops
    NaN like ``fmax``, which would turn a NaN gradient into a finite norm. The
    NaN flags travel in the same collective as the values.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return lax.pmax(x, axes)
    nan = jnp.isnan(x)
    both = jnp.stack([jnp.where(nan, -jnp.inf, x), nan.astype(x.dtype)])
    top, any_nan = lax.pmax(both, axes)
    return jnp.where(any_nan > 0, jnp.nan, top)


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
                part = _pmax(part, ax)
        if total is None:
            total = part
        elif op == "sum":
            total = total + part
        else:
            total = jnp.maximum(total, part)
    assert total is not None
    return total


# --------------------------------------------------------------------------
# Reduction units: several same-shape leaves reduced by one kernel.
# --------------------------------------------------------------------------

#: Up to this many leaves of one shape (float32 or float64, at most
#: :data:`GROUP_MAX_LEAF` values each) are summed elementwise and reduced by
#: one kernel. Fewer kernels: less dispatch overhead per step with many small
#: leaves, and much less compile time (XLA:CPU's compile time grows faster
#: than linearly with the number of reductions). Larger leaves, and narrower
#: dtypes (whose conversion to float32 XLA:CPU fuses into a reduction of one
#: input only), are reduced one by one. 1 disables grouping.
GROUP_SIZE = 16
GROUP_MAX_LEAF = 16384
#: Leaves of at most this many values (local or replicated) are copied into
#: one buffer per dtype before the reduction, at most :data:`PACK_MAX_TOTAL`
#: values per step. The overflow-safe rescaling branch (a ``lax.cond``) then
#: takes a few buffers instead of thousands of tiny arrays: XLA:CPU compiles a
#: conditional with thousands of operands very slowly.
PACK_MAX_LEAF = 4096
PACK_MAX_TOTAL = 1 << 20
#: At most this many leaves per packed buffer: XLA:CPU's compile time of one
#: concatenate grows faster than its operand count (3000 tiny leaves: 4.9 s
#: in one, 1.8 s in chunks of 64, including the reductions).
PACK_CHUNK = 64
#: Inside the rescaled branch (a ``lax.cond`` that rarely runs), when there
#: are more than a quarter this many reduction units, up to this many
#: same-shape local leaves of any size and float dtype share one fused
#: reduction (one output per leaf for per-leaf norms). An untaken branch
#: still costs host time on every call: XLA:CPU's per-call work grows with the
#: program's buffer allocations, most of them values inside the branch's
#: reductions (measured, the global norm of 2048 bf16 leaves of 4864 values:
#: 19.5 ms per step with one reduction per leaf in the branch, 9.6 ms grouped,
#: 9.2 ms without the branch). Per-leaf norms still need about 21 allocations
#: per leaf, grouped or not (``clip_by_block_norm`` there: 53K allocations,
#: about 1.3x the clip without the branch). The branch's reductions fuse their
#: elementwise inputs, so grouping adds no temporary buffer.
BRANCH_GROUP_SIZE = 64


def _regroup_branch(n_units: int) -> bool:
    """Whether a rescaled branch of ``n_units`` reductions regroups them."""
    return n_units > BRANCH_GROUP_SIZE // 4


def _auto_context() -> bool:
    """Whether the enclosing mesh context (``jax.set_mesh``) has Auto axes."""
    try:
        context = jax.sharding.get_abstract_mesh()
        return not context.empty and jax.sharding.AxisType.Auto in tuple(
            context.axis_types
        )
    except Exception:  # pragma: no cover - a JAX without mesh contexts
        return True


def _known_layout(x: Any, auto_context: bool) -> tuple | None:
    """How ``x`` is laid out across devices, or None if that is not known.

    Under ``Auto`` mesh axes the partitioner picks each array's sharding, so
    two leaves of the same shape may be sharded differently (e.g. the rows of
    one and the columns of the other), and adding them would make it move
    data. Such leaves are never grouped. Under ``Explicit`` axes the sharding
    is part of the type; leaves are grouped only with leaves of the same
    sharding (adding differently sharded arrays would even be an error).
    Values without a mesh, and the per-device values inside ``shard_map`` and
    ``pmap`` (``Manual`` axes), are local: always groupable.
    """
    try:
        sharding = jax.typeof(x).sharding
        mesh = sharding.mesh
        if mesh.empty:
            return None if auto_context else ()
        if jax.sharding.AxisType.Auto in tuple(mesh.axis_types):
            return None
        return (mesh, tuple(sharding.spec))
    except Exception:  # pragma: no cover - a JAX without sharding in types
        return None


def _local_layout(x: Any, auto_context: bool) -> tuple | None:
    """:func:`_known_layout` of ``x`` if it is local or replicated, else None."""
    layout = _known_layout(x, auto_context)
    if layout and any(part is not None for part in layout[1]):
        return None  # sharded along some axis
    return layout


def _pack(
    leaves: Sequence[Any], leaf_axes: Sequence[tuple]
) -> tuple[list[jax.Array], list[tuple]]:
    """Leaves, with the tiny ones concatenated (see :data:`PACK_MAX_LEAF`).

    Only leaves whose layout is known to be local or replicated are packed:
    concatenating sharded arrays would move data (``Auto`` axes) or fail
    (``Explicit`` axes).
    """
    out: list[jax.Array] = []
    out_axes: list[tuple] = []
    if _auto_context():
        return list(leaves), list(leaf_axes)
    groups: dict[Any, tuple[tuple, list[jax.Array]]] = {}
    budget = PACK_MAX_TOTAL
    for leaf, ax in zip(leaves, leaf_axes, strict=True):
        x = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        layout = None
        if 0 < x.size <= min(PACK_MAX_LEAF, budget):
            layout = _local_layout(x, False)
        if layout is None:
            out.append(x)
            out_axes.append(ax)
            continue
        budget -= x.size
        vary = _varying_axes(x) if ax else frozenset()
        groups.setdefault((x.dtype, ax, vary, layout), (ax, []))[1].append(x)
    for ax, xs in groups.values():
        for start in range(0, len(xs), PACK_CHUNK):
            part = xs[start : start + PACK_CHUNK]
            # lax directly (one dtype per group): thousands of leaves trace faster
            flat = [x if x.ndim == 1 else lax.reshape(x, (x.size,)) for x in part]
            out.append(part[0] if len(part) == 1 else lax.concatenate(flat, 0))
            out_axes.append(ax)
    return out, out_axes


def _units(
    leaves: Sequence[Any],
    leaf_axes: Sequence[tuple],
    group_size: int,
    max_leaf: float | None = None,
    *,
    narrow: bool = False,
) -> list[tuple[list[jax.Array], tuple]]:
    """Non-empty leaves as reduction units ``(leaves, axes)``.

    A unit holds up to ``group_size`` float32 (or float64) leaves of one
    shape, layout and set of mapped axes (see :func:`_known_layout`), each of
    at most ``max_leaf`` values (default :data:`GROUP_MAX_LEAF`); they are
    summed elementwise before one reduction. Other leaves are units of one.
    Empty leaves contribute nothing and are left out. ``narrow=True`` also
    groups narrower dtypes (for the fused reductions of the rescaled branch).
    """
    max_leaf = GROUP_MAX_LEAF if max_leaf is None else max_leaf
    auto_context = _auto_context() if group_size > 1 else True
    groups: dict[Any, tuple[tuple, list[jax.Array]]] = {}
    for i, (leaf, ax) in enumerate(zip(leaves, leaf_axes, strict=True)):
        x = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        if x.size == 0:
            continue
        layout = None
        if (
            not auto_context
            and x.size <= max_leaf
            and (narrow or x.dtype == accumulation_dtype(x.dtype))
        ):
            layout = _known_layout(x, auto_context)
        if layout is None:
            key: Any = ("alone", i)
        else:
            vary = _varying_axes(x) if ax else frozenset()
            key = (x.shape, x.dtype, ax, vary, layout)
        groups.setdefault(key, (ax, []))[1].append(x)
    units = []
    size = max(group_size, 1)
    for ax, xs in groups.values():
        for start in range(0, len(xs), size):
            units.append((xs[start : start + size], ax))
    return units


def _summand(
    x: jax.Array, p: float, factors: tuple | None = None, *, branch: bool = False
) -> jax.Array:
    """``|x * f1 * f2|**p`` elementwise, in the accumulation dtype (p is 1 or 2).

    ``factors``: the two rescaling factors, in the tree's accumulation dtype.
    A narrower leaf is then rescaled in that wider dtype: in a tree with
    float64 leaves, the factors of a tiny largest magnitude are beyond the
    float32 range (cast to float32, ``0 * inf`` would be NaN).
    ``branch=True`` (inside the rescaling branch of a ``lax.cond``) takes
    ``|x|`` as ``max(x, -x)`` (or from the real and imaginary parts): the same
    values through other operations than the plain pass. Otherwise XLA hoists
    the identical conversion (e.g. bf16 -> f32) out of the branch and shares
    it with the plain pass, which then writes a float32 copy of every gradient
    on every step instead of fusing the conversion into its reduction.
    """
    acc = accumulation_dtype(x.dtype)
    f1, f2 = factors if factors is not None else (None, None)
    if f1 is not None:
        acc = jnp.promote_types(acc, f1.dtype)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        if not branch:
            a = lax.abs(x)
            a = a if a.dtype == acc else lax.convert_element_type(a, acc)
        else:
            parts = []
            for c in (lax.real(x), lax.imag(x)):
                c = c if c.dtype == acc else lax.convert_element_type(c, acc)
                if f1 is not None:
                    c = lax.mul(lax.mul(c, f1), f2)
                parts.append(c)
            re, im = parts
            if f1 is None:  # a bound within sqrt(2) of |x|: enough for the max
                top = lax.max(lax.max(re, lax.neg(re)), lax.max(im, lax.neg(im)))
                return lax.abs(top)
            sq = lax.add(lax.mul(re, re), lax.mul(im, im))
            return sq if p == 2.0 else lax.sqrt(sq)
    elif branch:
        a = lax.abs(lax.max(x, lax.neg(x)))  # abs: a NaN's sign bit cleared
        a = a if a.dtype == acc else lax.convert_element_type(a, acc)
    else:
        a = x if x.dtype == acc else lax.convert_element_type(x, acc)
        if p != 2.0:
            a = lax.abs(a)  # no abs needed before squaring a real value
    if f1 is not None:
        a = lax.mul(lax.mul(a, f1), f2)
    return lax.mul(a, a) if p == 2.0 else a


def _unit_power_sum(
    xs: Sequence[jax.Array],
    p: float,
    factors: tuple | None = None,
    *,
    branch: bool = False,
):
    """``sum_i sum(|x_i * f1 * f2|**p)`` over a unit, one reduction."""
    total = _summand(xs[0], p, factors, branch=branch)
    for x in xs[1:]:
        total = lax.add(total, _summand(x, p, factors, branch=branch))
    return branch_sum(total) if branch else jnp.sum(total)


def _reduce_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    """``axis`` (None, an int or ints, possibly negative) as sorted axes."""
    if axis is None:
        return tuple(range(ndim))
    return tuple(sorted({d % ndim for d in np.atleast_1d(axis).tolist()}))


def _neumaier_add(x, y):
    (s1, c1), (s2, c2) = x, y
    t = s1 + s2
    err = jnp.where(jnp.abs(s1) >= jnp.abs(s2), (s1 - t) + s2, (s2 - t) + s1)
    return t, (c1 + c2) + err


def _local(x: jax.Array) -> bool:
    """Whether ``x`` is known to be local or replicated (not split on a mesh).

    Reductions with a custom computation (:func:`branch_sum`,
    :func:`_branch_max`) are only used on such arrays: the SPMD partitioner
    cannot combine them across devices and would all-gather a sharded one.
    """
    return _local_layout(x, _auto_context()) is not None


def branch_sum(a: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """``jnp.sum(a, axis)`` for the rescaled branch: compensated, fused.

    A reduction with two outputs (sum and compensation; Neumaier's
    summation), which XLA:CPU does not hand to YNNPACK: the elementwise work
    that produces ``a`` (rescaling factors, ``|x|``, sums of grouped leaves)
    is fused into the reduction instead of being written out as a full-size
    temporary. A plain ``jnp.sum`` there reserved twice the gradients' bytes
    of temporary memory on every step, though the branch rarely runs.
    Differentiated like ``jnp.sum``. Arrays that may be sharded (see
    :func:`_local`) take ``jnp.sum``.
    """
    if not _local(a):
        return jnp.sum(a, axis=axis)
    return _compensated_sum(a, axis)


def _compensated_sum(a: jax.Array, axis: Any) -> jax.Array:
    return _compensated_sums((a,), axis)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _compensated_sums(arrays: tuple, axis: Any) -> jax.Array:
    """Compensated sums of same-shape ``arrays``, each on its own: one kernel.

    Returns them stacked (one dtype).
    """
    n = len(arrays)
    axes = _reduce_axes(arrays[0].ndim, axis)
    zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)

    def add(u, v):
        pairs = [_neumaier_add((u[i], u[n + i]), (v[i], v[n + i])) for i in range(n)]
        return tuple(t for t, _ in pairs) + tuple(c for _, c in pairs)

    comps = tuple(lax.full_like(a, 0) for a in arrays)
    out = lax.reduce(tuple(arrays) + comps, zeros + zeros, add, axes)
    # Combined as vectors: one kernel, not one per array.
    return jnp.stack(out[:n]) + jnp.stack(out[n:])


@_compensated_sums.defjvp
def _compensated_sums_jvp(axis, primals, tangents):
    (arrays,), (ts,) = primals, tangents
    return _compensated_sums(arrays, axis), jnp.stack(
        [jnp.sum(t, axis=axis) for t in ts]
    )


def _branch_max(xs: Sequence[jax.Array], axis: Any = None) -> jax.Array:
    """``max_i max |x_i|`` (over ``axis``) for the rescaled branch; may drop NaN.

    One reduction with two outputs, ``max(x)`` and ``min(x)`` over the
    same-shape arrays ``xs``, then ``max(top, -bottom)``. XLA:CPU hands a
    plain max reduction to YNNPACK, which cannot fuse ``abs``, a bit cast or
    the elementwise max of grouped leaves: those were written out as
    full-size temporaries (twice the gradients' bytes reserved on every
    step, though the branch rarely runs). This reduction is fused with its
    producers. A NaN that it drops is still caught: the scaled sum is NaN,
    and :func:`_scaled_root` returns it. Complex values take ``|x|``. Arrays
    that may be sharded (see :func:`_local`) take ``jnp.max``/``jnp.min``.
    """
    acc = accumulation_dtype(xs[0].dtype)
    if any(jnp.issubdtype(x.dtype, jnp.complexfloating) for x in xs):
        xs = [_magnitude(x) for x in xs]
    if not jnp.issubdtype(xs[0].dtype, jnp.floating):
        xs = [x.astype(acc) for x in xs]
    if all(_local(x) for x in xs):
        top, bottom = xs[0], xs[0]
        for x in xs[1:]:
            top, bottom = lax.max(top, x), lax.min(bottom, x)
        return _extremes(((top, bottom),), axis)[0].astype(acc)
    # Possibly sharded: reductions the partitioner can combine across devices.
    top = functools.reduce(jnp.maximum, [jnp.max(x, axis) for x in xs])
    bottom = functools.reduce(jnp.minimum, [jnp.min(x, axis) for x in xs])
    return jnp.maximum(top.astype(acc), -bottom.astype(acc))


def _branch_max_each(xs: Sequence[jax.Array]) -> jax.Array:
    """``max |x_i|`` of each of the local same-shape ``xs`` (one kernel), a vector.

    As :func:`_branch_max` (may drop NaN), for a group of leaves in the
    rescaled branch.
    """
    acc = accumulation_dtype(xs[0].dtype)
    if jnp.issubdtype(xs[0].dtype, jnp.complexfloating):
        xs = [_magnitude(x) for x in xs]
    # Reduced in the accumulation dtype (the conversion is fused): narrower
    # outputs were each converted by a kernel of their own.
    xs = [x if x.dtype == acc else lax.convert_element_type(x, acc) for x in xs]
    return _extremes(tuple((x, x) for x in xs), None)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _extremes(pairs: tuple, axis: Any) -> jax.Array:
    """``max(max(top), -min(bottom))`` for each ``(top, bottom)``: one reduction.

    All arrays have one shape and dtype; the results are stacked.
    """
    n = len(pairs)
    axes = _reduce_axes(pairs[0][0].ndim, axis)
    tops = tuple(t for t, _ in pairs)
    bottoms = tuple(b for _, b in pairs)
    inits = tuple(jnp.asarray(-jnp.inf, t.dtype) for t in tops) + tuple(
        jnp.asarray(jnp.inf, b.dtype) for b in bottoms
    )

    def pick(u, v):
        hi = tuple(lax.max(a, b) for a, b in zip(u[:n], v[:n], strict=True))
        return hi + tuple(lax.min(a, b) for a, b in zip(u[n:], v[n:], strict=True))

    out = lax.reduce(tops + bottoms, inits, pick, axes)
    # Combined as vectors: one kernel, not one per pair.
    return lax.max(jnp.stack(out[:n]), lax.neg(jnp.stack(out[n:])))


@_extremes.defjvp
def _extremes_jvp(axis, primals, tangents):
    (pairs,), (ts,) = primals, tangents

    def reference(pairs):  # the same values through differentiable jnp ops
        return jnp.stack(
            [
                jnp.maximum(jnp.max(t, axis=axis), -jnp.min(b, axis=axis))
                for t, b in pairs
            ]
        )

    return _extremes(pairs, axis), jax.jvp(reference, (pairs,), (ts,))[1]


def _unit_max(xs: Sequence[jax.Array], *, branch: bool = False) -> jax.Array:
    """``max_i max |x_i|`` over a unit (NaN if any NaN; 0 if empty), one reduction.

    ``branch=True``: see :func:`_branch_max`.
    """
    if branch:
        return _branch_max(xs)
    top = _summand(xs[0], 1.0)
    for x in xs[1:]:
        top = lax.max(top, _summand(x, 1.0))
    return _max_nonneg(top)


# --------------------------------------------------------------------------
# Public-to-the-package entry points.
# --------------------------------------------------------------------------


def global_norm(
    tree: Any,
    norm_type: float = 2.0,
    axis_name: tuple = (),
    *,
    group_size: int | None = None,
) -> jax.Array:
    """The ``norm_type``-norm of all the values of ``tree``, overflow-safe.

    Same-shape leaves are reduced together, up to ``group_size`` per kernel
    (see :data:`GROUP_SIZE`), when their layout allows it; the result does not
    depend on the grouping beyond float32 rounding.

    Args:
      tree: a pytree of arrays (``None`` leaves are ignored).
      norm_type: 1.0, 2.0 or ``inf`` (see :func:`_validation.norm_type`).
      axis_name: tuple of mapped axis names to combine partial sums over.
      group_size: overrides :data:`GROUP_SIZE` (1: one reduction per leaf).

    Returns:
      A scalar in the widest accumulation dtype of the leaves (float32 at least).
    """
    leaves = _validation.float_leaves(tree)
    dtype = tree_accumulation_dtype(leaves)
    if not leaves:
        return jnp.zeros((), dtype)
    leaf_axes = _leaf_axes(leaves, axis_name)
    if group_size is None or group_size > 1:
        leaves, leaf_axes = _pack(leaves, leaf_axes)
    units = _units(leaves, leaf_axes, GROUP_SIZE if group_size is None else group_size)
    if not units:  # only empty leaves
        return jnp.zeros((), dtype)
    unit_axes = [ax for _, ax in units]
    if norm_type == INF:
        return _reduce_partials(
            [_unit_max(xs) for xs, _ in units], unit_axes, "max", dtype
        )

    p = norm_type
    total = _reduce_partials(
        [_unit_power_sum(xs, p) for xs, _ in units], unit_axes, "sum", dtype
    )

    def rescaled(total):
        del total
        big = units
        if _regroup_branch(len(units)):
            flat = [(x, ax) for xs, ax in units for x in xs]
            big = _units(
                [x for x, _ in flat],
                [ax for _, ax in flat],
                BRANCH_GROUP_SIZE,
                math.inf,
                narrow=True,
            )
        big_axes = [ax for _, ax in big]
        m = _reduce_partials(
            [_unit_max(xs, branch=True) for xs, _ in big], big_axes, "max", dtype
        )
        e = _exponent(m)
        # Computed once: every unit's kernel reads them.
        factors = materialize(_pow2_factors(e, dtype))  # read by every unit
        s = _reduce_partials(
            [_unit_power_sum(xs, p, factors, branch=True) for xs, _ in big],
            big_axes,
            "sum",
            dtype,
        )
        # m is 0 (all zeros), positive (finite input) or NaN/Inf (bad input).
        return _scaled_root(m, e, s, p)

    def plain(total):
        return safe_root(total, p)

    return lax.cond(_in_normal_range(total), plain, rescaled, total)


def leaf_norms(
    tree: Any, norm_type: float = 2.0, axis_name: tuple = ()
) -> list[jax.Array]:
    """Per-leaf ``norm_type``-norms of ``tree`` (in leaf order), overflow-safe.

    Each norm is a scalar in the accumulation dtype of its own leaf. The
    rescaled pass runs (once, for all leaves) only when some leaf's plain sum
    is outside the normal range, e.g. it overflowed or the leaf is all zeros.
    """
    leaves = [jnp.asarray(x) for x in _validation.float_leaves(tree)]
    if not leaves:
        return []
    vec = leaf_norm_vector(leaves, norm_type, axis_name)
    return [
        split(vec, i).astype(accumulation_dtype(x.dtype)) for i, x in enumerate(leaves)
    ]


def split(vec: jax.Array, i: int) -> jax.Array:
    """Entry ``i`` of the vector ``vec`` as a scalar (lax: traces fast)."""
    return lax.reshape(lax.slice_in_dim(vec, i, i + 1), ())


def _row_units(
    leaves: Sequence[jax.Array], leaf_axes: Sequence[tuple]
) -> list[tuple[jax.Array, list[int], tuple, bool]]:
    """Leaves as units ``(x, indices, axes, stacked)`` that each give k norms.

    Tiny leaves (see :data:`PACK_MAX_LEAF`) of one size, dtype, layout and
    set of mapped axes are stacked as the k rows of one matrix, up to
    :data:`PACK_CHUNK` per unit, and reduced row by row by one kernel
    (``stacked``). Other leaves are units of one, reduced whole. Thousands of
    separate reductions (and their rescaled branch) compiled in about 25 s
    for 1000 leaves; stacked, in about 1 s. Layouts as in :func:`_pack`.
    """
    units: list[tuple[jax.Array, list[int], tuple, bool]] = []
    auto = _auto_context()
    groups: dict[Any, tuple[tuple, list[tuple[int, jax.Array]]]] = {}
    for i, (x, ax) in enumerate(zip(leaves, leaf_axes, strict=True)):
        layout = None
        if not auto and 0 < x.size <= PACK_MAX_LEAF:
            layout = _local_layout(x, False)
        if layout is None:
            units.append((x, [i], ax, False))
            continue
        vary = _varying_axes(x) if ax else frozenset()
        key = (x.size, x.dtype, ax, vary, layout)
        groups.setdefault(key, (ax, []))[1].append((i, x))
    for ax, items in groups.values():
        for start in range(0, len(items), PACK_CHUNK):
            part = items[start : start + PACK_CHUNK]
            rows = [lax.reshape(x, (1, x.size)) for _, x in part]
            matrix = rows[0] if len(rows) == 1 else lax.concatenate(rows, 0)
            units.append((matrix, [i for i, _ in part], ax, True))
    return units


def _reduce_rows(
    parts: Sequence[jax.Array], unit_axes: Sequence[tuple], op: str
) -> jax.Array:
    """Per-unit vectors reduced over their mapped axes, then concatenated.

    Units with the same mapped axes share one collective.
    """
    out: list[jax.Array] = list(parts)
    groups: dict[tuple, list[int]] = {}
    for u, ax in enumerate(unit_axes):
        if ax:
            groups.setdefault(ax, []).append(u)
    for ax, idx in groups.items():
        joined = jnp.concatenate([parts[u] for u in idx])
        reduced = lax.psum(joined, ax) if op == "sum" else _pmax(joined, ax)
        offset = 0
        for u in idx:
            k = parts[u].shape[0]
            out[u] = lax.slice_in_dim(reduced, offset, offset + k)
            offset += k
    return out[0] if len(out) == 1 else lax.concatenate(out, 0)


def _row_summand(x, p, stacked, factors=None, *, branch=False):
    """:func:`_summand` of a unit, with per-row (or scalar) factors."""
    if factors is not None:
        f1, f2 = factors
        if stacked:
            f1, f2 = (lax.broadcast_in_dim(f, x.shape, (0,)) for f in (f1, f2))
        else:
            f1, f2 = (lax.reshape(f, ()) for f in (f1, f2))
        factors = (f1, f2)
    return _summand(x, p, factors, branch=branch)


def _row_sum(x, p, stacked, dtype, factors=None, *, branch=False):
    """One power sum per row of a stacked unit (or one for a whole leaf)."""
    a = _row_summand(x, p, stacked, factors, branch=branch)
    add = branch_sum if branch else jnp.sum
    total = add(a, 1) if stacked else add(a).reshape(1)
    return total.astype(dtype)


def _row_max(x, stacked, dtype, *, branch=False):
    """The largest magnitude of each row of a stacked unit (or of a leaf)."""
    if x.size == 0:
        return jnp.zeros((1,), dtype)
    if branch:
        top = _branch_max([x], 1) if stacked else _branch_max([x]).reshape(1)
        return top.astype(dtype)
    a = _summand(x, 1.0)
    top = _max_nonneg(a, 1) if stacked else _max_nonneg(a).reshape(1)
    return top.astype(dtype)


def _inverse_order(order: list[int]) -> np.ndarray | None:
    """Indices that put a vector listed in ``order`` back in index order.

    ``order`` is a permutation of ``range(len(order))``; None if it is the
    identity (no gather needed).
    """
    if order == list(range(len(order))):
        return None
    inverse = np.empty(len(order), np.int32)
    inverse[np.asarray(order)] = np.arange(len(order), dtype=np.int32)
    return inverse


def _branch_groups(units):
    """Groups of :func:`_row_units` units for the rescaled branch.

    Returns ``(groups, positions, to_unit_order)``: lists of unit indices,
    the entries of the unit-order vector that each group gives (in order),
    and the permutation from group order to unit order (None if identity).
    With many units, up to :data:`BRANCH_GROUP_SIZE` local leaves of one
    shape, dtype and set of mapped axes form one group, reduced by one
    kernel with an output per leaf (see :data:`BRANCH_GROUP_SIZE`).
    """
    offsets = np.cumsum([0] + [len(idx) for _, idx, _, _ in units]).tolist()
    groups: list[list[int]] = []
    if not _regroup_branch(len(units)):
        groups = [[u] for u in range(len(units))]
    else:
        auto = _auto_context()
        open_groups: dict[Any, list[int]] = {}
        for u, (x, _, ax, stacked) in enumerate(units):
            layout = None if auto or stacked else _local_layout(x, False)
            if layout is None:
                groups.append([u])  # stacked, or may be sharded
                continue
            vary = _varying_axes(x) if ax else frozenset()
            key = (x.shape, x.dtype, ax, vary, layout)
            if key not in open_groups or len(open_groups[key]) == BRANCH_GROUP_SIZE:
                open_groups[key] = []
                groups.append(open_groups[key])
            open_groups[key].append(u)
    positions = [
        [j for u in g for j in range(offsets[u], offsets[u + 1])] for g in groups
    ]
    return groups, positions, _inverse_order([j for pos in positions for j in pos])


def _row_sums_each(xs, p, factors, dtype):
    """Rescaled power sums of the local same-shape ``xs`` (one kernel), a vector.

    ``factors``: two vectors with one rescaling factor per leaf.
    """
    f1, f2 = factors
    summands = tuple(
        _summand(x, p, (split(f1, i), split(f2, i)), branch=True)
        for i, x in enumerate(xs)
    )
    return _compensated_sums(summands, None).astype(dtype)


def leaf_norm_vector(
    tree: Any, norm_type: float = 2.0, axis_name: tuple = ()
) -> jax.Array:
    """Per-leaf norms of ``tree`` as one vector (leaf order), overflow-safe.

    The vector has the accumulation dtype of the whole tree (float32, or
    float64 if some leaf is float64) and one entry per leaf; it is empty for
    a tree without leaves. Work on this vector rather than on per-leaf
    scalars where possible: every scalar op on N separate leaves is N tiny
    kernels in the compiled step (measured: about 1 us each on XLA:CPU).
    Tiny leaves are reduced in stacks (see :func:`_row_units`). The rescaled
    pass runs (once, for all leaves) only when some leaf's plain sum is
    outside the normal range, e.g. it overflowed or the leaf is all zeros.
    """
    leaves = [jnp.asarray(x) for x in _validation.float_leaves(tree)]
    dtype = tree_accumulation_dtype(leaves)
    if not leaves:
        return jnp.zeros((0,), dtype)
    units = _row_units(leaves, _leaf_axes(leaves, axis_name))
    unit_axes = [ax for _, _, ax, _ in units]
    # Entry j of the unit-order vectors below is leaf order[j].
    to_leaf_order = _inverse_order([i for _, idx, _, _ in units for i in idx])

    def finish(vec):
        return vec if to_leaf_order is None else vec[to_leaf_order]

    if norm_type == INF:
        maxes = [_row_max(x, st, dtype) for x, _, _, st in units]
        return finish(_reduce_rows(maxes, unit_axes, "max"))

    p = norm_type
    sums = [_row_sum(x, p, st, dtype) for x, _, _, st in units]
    s_vec = _reduce_rows(sums, unit_axes, "sum")
    ok = _in_normal_range(s_vec)

    def plain(s_vec):
        return safe_root(s_vec, p)

    def rescaled(s_vec):
        groups, positions, to_unit_order = _branch_groups(units)
        group_axes = [units[g[0]][2] for g in groups]

        def gathered(parts, op):  # per-group vectors -> one in unit order
            vec = _reduce_rows(parts, group_axes, op)
            return vec if to_unit_order is None else vec[to_unit_order]

        def select(v, pos):  # the entries of a unit-order vector for a group
            if pos == list(range(pos[0], pos[0] + len(pos))):
                return lax.slice_in_dim(v, pos[0], pos[0] + len(pos))
            return v[np.asarray(pos)]

        maxes = []
        for g in groups:
            x, _, _, st = units[g[0]]
            if len(g) == 1:
                maxes.append(_row_max(x, st, dtype, branch=True))
            else:
                maxes.append(_branch_max_each([units[u][0] for u in g]).astype(dtype))
        m_vec = gathered(maxes, "max")
        e_vec = _exponent(m_vec)
        f1, f2 = materialize(_pow2_factors(e_vec, dtype))
        parts = []
        for g, pos in zip(groups, positions, strict=True):
            f = (select(f1, pos), select(f2, pos))
            x, _, _, st = units[g[0]]
            if len(g) == 1:
                parts.append(_row_sum(x, p, st, dtype, f, branch=True))
            else:
                xs = [units[u][0] for u in g]
                parts.append(_row_sums_each(xs, p, f, dtype))
        t_vec = gathered(parts, "sum")
        slow = _scaled_root(m_vec, e_vec, t_vec, p)
        return jnp.where(ok, safe_root(s_vec, p), slow)

    return finish(lax.cond(jnp.all(ok), plain, rescaled, s_vec))


def norm_of_values(
    values: Sequence[jax.Array] | jax.Array, norm_type: float
) -> jax.Array:
    """The ``norm_type``-norm of a few scalars (e.g. per-leaf norms), overflow-safe.

    ``values`` is a sequence of scalars or one vector. Used to turn per-leaf
    norms into a global one without touching the gradients again. Non-finite
    values give a non-finite result.
    """
    if isinstance(values, jax.Array):
        v = jnp.abs(values.astype(jnp.result_type(values, jnp.float32)))
    elif values:
        dtype = jnp.result_type(*values, jnp.float32)
        v = jnp.abs(jnp.stack([jnp.asarray(x, dtype) for x in values]))
    else:
        return jnp.zeros((), jnp.float32)
    if v.size == 0:
        return jnp.zeros((), v.dtype)
    m = jnp.max(v)
    if norm_type == INF:
        return m
    e = _exponent(m)
    s = _power_sum(v, norm_type, _pow2_factors(e, v.dtype))
    return _scaled_root(m, e, s, norm_type)


def norm_of_arrays(arrays: Sequence[jax.Array], norm_type: float) -> jax.Array:
    """The ``norm_type``-norm of all the values of a few small arrays, overflow-safe.

    For per-unit norms (any shapes and shardings): each array is reduced on
    its own, so none is raveled or concatenated (which fails for arrays
    sharded under ``Explicit`` mesh axes). NaN or Inf values give a
    non-finite result.
    """
    dtype = jnp.result_type(*arrays, jnp.float32)
    if all(_local(a) for a in arrays):  # one vector: fewer kernels to compile
        flat = [jnp.ravel(a).astype(dtype) for a in arrays]
        return norm_of_values(jnp.concatenate(flat), norm_type)
    mags = [jnp.abs(jnp.asarray(a).astype(dtype)) for a in arrays if jnp.size(a)]
    if not mags:
        return jnp.zeros((), dtype)
    m = _nan_max(jnp.stack([_nan_max(a) for a in mags]))
    if norm_type == INF:
        return m
    e = _exponent(m)
    factors = _pow2_factors(e, dtype)
    s = sum(_power_sum(a, norm_type, factors) for a in mags)
    return _scaled_root(m, e, s, norm_type)


def reduce_max(tree: Any, axis_name: tuple = ()) -> jax.Array:
    """Largest value over all leaves of ``tree`` (and across mapped axes)."""
    leaves = _validation.float_leaves(tree)
    dtype = tree_accumulation_dtype(leaves)
    if not leaves:
        return jnp.full((), -jnp.inf, dtype)
    parts = [
        _nan_max(x.astype(dtype)) if x.size else jnp.full((), -jnp.inf, dtype)
        for x in map(jnp.asarray, leaves)
    ]
    return _reduce_partials(parts, _leaf_axes(leaves, axis_name), "max", dtype)


def reduce_any(flags: Sequence[jax.Array], leaves: Sequence[Any], axis_name: tuple):
    """Logical OR of per-leaf boolean scalars across leaves and mapped axes."""
    if not flags:
        return jnp.zeros((), bool)
    as_int = [f.astype(jnp.int32) for f in flags]
    return _reduce_partials(as_int, _leaf_axes(leaves, axis_name), "max", jnp.int32) > 0


def unitwise_norms(
    arrays: Sequence[jax.Array], axes: Sequence[tuple[int, ...]]
) -> list[jax.Array]:
    """Overflow-safe 2-norms of each array over its ``axes`` (kept as size-1 dims).

    One norm per "unit", a slice of an array along its ``axes`` (e.g. the
    fan-in of one output neuron of a weight matrix, for adaptive gradient
    clipping); ``axes=()`` gives ``|x|`` element-wise. Same guarantees as
    :func:`leaf_norms`, unit by unit: float32 (float64 for float64 arrays)
    accumulation, no overflow or underflow for finite input, exactly 0 with a
    finite gradient for an all-zero unit, NaN/Inf exactly where the unit holds
    a NaN/Inf. The plain pass computes each unit's sum of squares and largest
    magnitude together; one rescaled pass, for all arrays, runs only when some
    non-zero unit's sum is outside the normal range.
    """
    out: list[jax.Array | None] = []
    todo = []
    for i, (x, ax) in enumerate(zip(arrays, axes, strict=True)):
        x = jnp.asarray(x)
        acc = accumulation_dtype(x.dtype)
        ax = tuple(int(a) % max(x.ndim, 1) for a in ax)
        if x.size == 0:
            shape = tuple(1 if d in ax else n for d, n in enumerate(x.shape))
            out.append(jnp.zeros(shape, acc))
            continue
        # |x| is not written out: the sum squares x itself (real values) and
        # the max is max(max(x), -min(x)), reductions that read x directly.
        a = _magnitude(x) if jnp.issubdtype(x.dtype, jnp.complexfloating) else x
        out.append(None)
        todo.append((i, a, ax))
    if not todo:
        return out  # type: ignore[return-value]
    sums = []
    for _, a, ax in todo:
        acc = accumulation_dtype(a.dtype)
        b = a if a.dtype == acc else a.astype(acc)
        sums.append(jnp.sum(b * b, axis=ax, keepdims=True))
    # Two plain reductions (YNNPACK on XLA:CPU, which fuses a bf16
    # conversion into them; a fused two-output reduction did not, and the
    # conversion of bf16 gradients was then written out).
    maxes = []
    for _, a, ax in todo:
        top = jnp.max(a, axis=ax, keepdims=True)
        bottom = jnp.min(a, axis=ax, keepdims=True)
        acc = accumulation_dtype(a.dtype)
        maxes.append(jnp.maximum(top.astype(acc), -bottom.astype(acc)))
    good = [_in_normal_range(s) | (m == 0) for s, m in zip(sums, maxes, strict=True)]
    all_good = jnp.all(jnp.stack([jnp.all(g) for g in good]))

    def plain(operands):
        sums, _ = operands
        return [safe_root(s, 2.0) for s in sums]

    def rescaled(operands):
        sums, maxes = operands
        norms = []
        for (_, a, ax), s, m, ok in zip(todo, sums, maxes, good, strict=True):
            e = _exponent(m)
            f1, f2 = _pow2_factors(e, m.dtype)
            b = a.astype(m.dtype) * f1 * f2
            # t is NaN iff the unit holds a NaN, also when m lost it (the max
            # drops NaN: see _branch_max).
            t = branch_sum(b * b, ax).reshape(m.shape)
            root = _scaled_root(m, e, t, 2.0)
            norms.append(jnp.where(ok, safe_root(s, 2.0), root))
        return norms

    norms = lax.cond(all_good, plain, rescaled, (sums, maxes))
    for (i, _, _), n in zip(todo, norms, strict=True):
        out[i] = n
    return out  # type: ignore[return-value]
