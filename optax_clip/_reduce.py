"""The reductions every norm is made of, each one pass over its input (private).

* :func:`sum_and_max`: ``sum |x|**p`` and ``max |x|`` together (the plain pass).
  The max is taken over the bit patterns of ``|x|`` as integers: for
  non-negative floats they are ordered like the values, every NaN is above
  ``inf`` (so a NaN is never dropped, which XLA's float max reductions do
  on CPU and across devices), and integer maxima are fast to reduce.
* :func:`scaled_sum_of_all`: ``sum |x * f|**p`` for the global norm's rescaled
  pass; :func:`fixed_scaled_sums`: ``sum |x 2**-K|**p`` and ``sum |x 2**K|**p``
  for the per-leaf and per-unit norms' one.
* :func:`extremes`: ``max x``, ``min x`` and ``max |x|`` together.

Each reads an array known to be local or replicated once, with one fused
reduction of several outputs; an array that may be sharded takes standard
``jnp`` reductions instead, which the SPMD partitioner can split across
devices. Differentiated through equivalent ``jnp`` expressions.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_clip import _plan, _xla_cpu


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype norms of ``dtype`` values are accumulated in (f32 or wider)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.finfo(dtype).dtype  # the real part's dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def _int_of(dtype: Any):
    return {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[jnp.dtype(dtype).itemsize]


def _axes(ndim: int, axis: Any) -> tuple[int, ...]:
    """``axis`` (None, an int or ints, possibly negative) as sorted axes."""
    if axis is None:
        return tuple(range(ndim))
    return tuple(sorted({d % ndim for d in np.atleast_1d(axis).tolist()}))


def magnitude(x: jax.Array, dtype: Any) -> jax.Array:
    """``|x|`` in ``dtype`` (complex-safe)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return _xla_cpu.convert(lax.abs(x), dtype)
    return lax.abs(_xla_cpu.convert(x, dtype))


def _summand(a: jax.Array, p: float) -> jax.Array:
    """``a**p`` of ``a = |x| >= 0`` (p is 1 or 2)."""
    return lax.mul(a, a) if p == 2.0 else a


# --------------------------------------------------------------------------
# The plain pass: sum |x|**p and max |x|.
# --------------------------------------------------------------------------


def sum_and_max(x: jax.Array, p: float, axis: Any = None, local: bool | None = None):
    """``(sum |x|**p, max |x|)`` over ``axis`` (all by default), one pass.

    Both in the accumulation dtype of ``x``; the max is NaN if ``x`` holds a
    NaN. ``p`` is 1 or 2. ``local``: whether ``x`` is known to be local or
    replicated (see :func:`_plan.is_local`, asked when None).
    """
    acc = accumulation_dtype(x.dtype)
    axes = _axes(x.ndim, axis)
    if not axes:  # elementwise (a scalar, or units of one value)
        a = magnitude(x, acc)
        return _summand(a, p), a
    if not (_plan.is_local(x) if local is None else local):
        a = magnitude(x, acc)  # may be sharded: reductions the partitioner splits
        return jnp.sum(_summand(a, p), axis=axes), _nan_safe_max(a, axes)
    if len(axes) == x.ndim:
        return sum_and_max_of_all([x], p)
    if x.ndim - 1 not in axes and x.dtype == accumulation_dtype(x.dtype):
        # Over columns (the last axis kept), of values summed in their own
        # dtype (a conversion would be written out first on XLA:CPU).
        return _fused_sum_and_max_many((x,), p, axes, apart=True)
    return _fused_sum_and_max_many((x,), p, axes)


def _nan_safe_max(a: jax.Array, axes: tuple) -> jax.Array:
    m = jnp.max(a, axis=axes)
    return jnp.where(jnp.any(jnp.isnan(a), axis=axes), jnp.nan, m)


def sum_and_max_of_all(xs, p: float):
    """``(sum_i sum |x_i|**p, max_i max |x_i|)`` of same-shape local ``xs``.

    One reduction of the elementwise sum and maximum (fewer kernels to
    compile than one reduction per array).
    """
    rows = [_xla_cpu.split_rows(x) for x in xs]
    if rows[0] is not None:  # partial results per row, then combined
        s, m = _fused_sum_and_max_many(tuple(rows), p, (1,))
        return jnp.sum(s), max_nonneg(m)
    return _fused_sum_and_max_many(tuple(xs), p, _axes(xs[0].ndim, None))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _fused_sum_and_max_many(xs: tuple, p: float, axes: tuple, apart: bool = False):
    """Sum and max over ``axes`` of the elementwise sum and max of ``xs``.

    One reduction of two outputs, whatever the number of same-shape arrays.
    With ``apart`` (one array), two reductions of one output each: XLA:CPU
    runs a two-output reduction over columns 3-4x slower
    (``adaptive_grad_clip``'s per-unit norms). The sum is then rounded
    differently; the max is taken over floats (an integer max over columns
    is written out first on XLA:CPU) and is NaN where the sum is, which is
    where a value is NaN (the summands are >= 0). A max of subnormals may
    come out 0: both count as zero in the norms.
    """
    acc = accumulation_dtype(xs[0].dtype)
    itype = _int_of(acc)
    summand, bits = None, None
    for x in xs:
        s, b = _summand_and_bits(x, p, acc, itype)
        summand = s if summand is None else lax.add(summand, s)
        bits = b if bits is None else lax.max(bits, b)

    def add_and_max(u, v):
        return lax.add(u[0], v[0]), lax.max(u[1], v[1])

    zero = (jnp.zeros((), acc), jnp.zeros((), itype))
    if apart:  # one array: the max of |x| as floats, NaN restored from the sum
        total = lax.reduce(summand, zero[0], lax.add, axes)
        top = lax.reduce(magnitude(xs[0], acc), zero[0], lax.max, axes)
        return total, jnp.where(jnp.isnan(total), total, top)
    total, top = lax.reduce((summand, bits), zero, add_and_max, axes)
    return total, lax.bitcast_convert_type(top, acc)


@_fused_sum_and_max_many.defjvp
def _fused_sum_and_max_many_jvp(p, axes, apart, primals, tangents):
    (xs,), (ts,) = primals, tangents

    def reference(xs):
        mags = [magnitude(x, accumulation_dtype(x.dtype)) for x in xs]
        total = sum(jnp.sum(_summand(a, p), axis=axes) for a in mags)
        return total, functools.reduce(
            jnp.maximum, [jnp.max(a, axis=axes) for a in mags]
        )

    out = _fused_sum_and_max_many(xs, p, axes, apart)
    return out, jax.jvp(reference, (xs,), (ts,))[1]


def _summand_and_bits(x, p, acc, itype):
    """``|x|**p`` and the bits of ``|x|`` (as ``itype``), elementwise."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        a = magnitude(x, acc)
        return _summand(a, p), lax.bitcast_convert_type(a, itype)
    a = _xla_cpu.convert(x, acc)
    # |a| as bits: the sign bit cleared (an integer op, fused for free).
    sign_off = jnp.asarray(np.iinfo(itype).max, itype)
    bits = lax.bitwise_and(lax.bitcast_convert_type(a, itype), sign_off)
    return _summand(a if p == 2.0 else lax.abs(a), p), bits


def max_nonneg(v: jax.Array) -> jax.Array:
    """``max(v)`` of a vector ``v >= 0``; NaN if ``v`` holds a NaN."""
    return _fused_sum_and_max_many((v,), 1.0, _axes(v.ndim, None))[1].astype(v.dtype)


# --------------------------------------------------------------------------
# The rescaled pass: sum |x * f1 * f2|**p.
# --------------------------------------------------------------------------


def _rescaled(x: jax.Array, f1: jax.Array, f2: jax.Array, p: float) -> jax.Array:
    """``|x * f1 * f2|**p`` elementwise, in the factors' dtype.

    The factors are two powers of two (normal floats). In a tree with float64
    leaves they are float64, and narrower leaves are rescaled in float64 too
    (the factors of a tiny magnitude are beyond the float32 range).
    """
    dtype = jnp.promote_types(accumulation_dtype(x.dtype), f1.dtype)
    f1, f2 = (_xla_cpu.convert(f, dtype) for f in (f1, f2))

    def scale(a):  # lax for scalars (fast to trace); jnp broadcasts the others
        return lax.mul(lax.mul(a, f1), f2) if f1.ndim == 0 else a * f1 * f2

    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        re, im = (scale(_xla_cpu.convert(c, dtype)) for c in (lax.real(x), lax.imag(x)))
        sq = lax.add(lax.mul(re, re), lax.mul(im, im))
        return sq if p == 2.0 else lax.sqrt(sq)
    a = _xla_cpu.convert(_xla_cpu.magnitude_in_branch(x), dtype)
    return _summand(scale(a), p)


def fixed_exponent(dtype: Any) -> int:
    """``K``: the rescaled pass of per-leaf norms multiplies by ``2**-K`` or ``2**K``.

    Half the exponent range plus 20 (84 for float32, 532 for float64; ``E``
    below is the largest exponent, 128 and 1024). When the plain sum of
    squares of a leaf overflowed (``max |x| >= 2**(E/2 - 16)`` for fewer than
    ``2**32`` values), the values times ``2**-K`` have squares below ``2**(E -
    40)`` (no overflow for fewer than ``2**40`` values), and only squares below
    ``2**(2K + 34 - 2E)`` times the largest one (``2**-54`` in float32) are
    flushed to zero. When it underflowed (``max |x| < 2**(1 - E/2)``), every
    normal value times ``2**K`` has a normal square, and none overflows. A sum
    of magnitudes (``p = 1``) overflows only for ``max |x| >= 2**(E - 32)``
    and underflows never. So two fixed factors do the work of one per leaf:
    no per-leaf scalar to compute or read out, plain reductions.
    """
    return jnp.finfo(accumulation_dtype(dtype)).maxexp // 2 + 20


def fixed_scaled_sums(xs, p: float, axis=None, local: bool | None = None):
    """``(sum |x_i 2**-K|**p, sum |x_i 2**K|**p)`` of same-shape ``xs``, stacked.

    Two arrays of shape ``(len(xs), *reduced shape)`` in the accumulation
    dtype of ``xs`` (``K``: :func:`fixed_exponent`); one fused reduction with
    two outputs per array for local arrays, else ``jnp`` sums.
    """
    xs = tuple(xs)
    axes = _axes(xs[0].ndim, axis)
    if local is None:
        local = all(_plan.is_local(x) for x in xs)
    out = _fixed_sums(xs, p, axes, local)
    return jnp.stack(out[0::2]), jnp.stack(out[1::2])


def _fixed_factors(acc: Any) -> tuple[jax.Array, jax.Array]:
    """``(2**-K, 2**K)`` in ``acc``, behind a barrier.

    XLA would otherwise fold ``(a * c) * (a * c)`` into ``(a * a) * c**2``
    (``c**2`` is beyond the float range, and ``a * a`` is what must not
    underflow), and ``(a * c) * c`` into ``a * c**2``.
    """
    k = fixed_exponent(acc)
    return lax.optimization_barrier(
        (jnp.asarray(2.0**-k, acc), jnp.asarray(2.0**k, acc))
    )


def _fixed_summands(x: jax.Array, p: float, factors) -> tuple:
    """``|x c|**p`` for each factor ``c`` elementwise (accumulation dtype)."""
    acc = accumulation_dtype(x.dtype)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        parts = [_xla_cpu.convert(c, acc) for c in (lax.real(x), lax.imag(x))]
        out = []
        for f in factors:
            re, im = (lax.mul(c, f) for c in parts)
            sq = lax.add(lax.mul(re, re), lax.mul(im, im))
            out.append(sq if p == 2.0 else lax.sqrt(sq))
        return tuple(out)
    a = _xla_cpu.convert(_xla_cpu.magnitude_in_branch(x), acc)
    return tuple(_summand(lax.mul(a, f), p) for f in factors)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _fixed_sums(xs: tuple, p: float, axes: tuple, fused: bool) -> tuple:
    """``(hi_0, lo_0, hi_1, lo_1, ...)``: one reduction, two outputs per array.

    ``fused=False``: a ``jnp`` sum each (arrays that may be sharded).
    """
    operands = tuple(
        s
        for x in xs
        for s in _fixed_summands(x, p, _fixed_factors(accumulation_dtype(x.dtype)))
    )
    if not fused:
        return tuple(jnp.sum(a, axis=axes) for a in operands)
    n = len(operands)

    def add(u, v):
        return tuple(lax.add(u[i], v[i]) for i in range(n))

    inits = tuple(jnp.zeros((), a.dtype) for a in operands)
    return tuple(lax.reduce(operands, inits, add, axes))


@_fixed_sums.defjvp
def _fixed_sums_jvp(p, axes, fused, primals, tangents):
    """The tangent of each sum, with the values whose derivative overflows left out.

    ``|x 2**K|**2`` of a large ``x`` overflows, and so does its derivative;
    the caller then uses the other sum, but a zero cotangent times an
    infinite derivative would still be NaN. Those values are left out of
    the tangent (the sum is never used where any of them is present).
    """
    (xs,), (ts,) = primals, tangents
    out = []
    for x, t in zip(xs, ts, strict=True):
        acc = accumulation_dtype(x.dtype)
        for c in _fixed_factors(acc):
            bound = lax.mul(lax.mul(magnitude(x, acc), c), lax.mul(c, c.dtype.type(2)))
            keep = jnp.isfinite(bound)
            x_in = jnp.where(keep, x, jnp.zeros_like(x))
            t_in = jnp.where(keep, t, jnp.zeros_like(t))

            def total(v, c=c):
                return jnp.sum(_fixed_summands(v, p, (c,))[0], axis=axes)

            out.append(jax.jvp(total, (x_in,), (t_in,))[1])
    return _fixed_sums(xs, p, axes, fused), tuple(out)


def scaled_sum_of_all(xs, p: float, f1, f2, local: bool) -> jax.Array:
    """``sum_i sum |x_i * f1 * f2|**p`` of same-shape ``xs``, scalar factors.

    One reduction: of the elementwise sum of several local leaves, or of one
    array (which may be sharded).
    """
    total = _rescaled(xs[0], f1, f2, p)
    for x in xs[1:]:
        total = lax.add(total, _rescaled(x, f1, f2, p))
    if _xla_cpu.enabled() and local:
        return _compensated_sums((total,), _axes(total.ndim, None))[0]
    return jnp.sum(total)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _compensated_sums(arrays: tuple, axes: tuple) -> jax.Array:
    """Compensated (Neumaier) sums of same-shape ``arrays``: one kernel, stacked.

    Used by the rescaled pass of the global norm (one reduction per unit).

    XLA:CPU hands a plain ``jnp.sum`` of computed values to YNNPACK, which
    writes the values out first; a reduction of two outputs is fused with
    its producers.
    """
    n = len(arrays)

    def add(u, v):
        out_s, out_c = [], []
        for i in range(n):
            s1, c1, s2, c2 = u[i], u[n + i], v[i], v[n + i]
            t = s1 + s2
            err = jnp.where(jnp.abs(s1) >= jnp.abs(s2), (s1 - t) + s2, (s2 - t) + s1)
            out_s.append(t)
            out_c.append((c1 + c2) + err)
        return tuple(out_s) + tuple(out_c)

    zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
    comps = tuple(lax.full_like(a, 0) for a in arrays)
    out = lax.reduce(tuple(arrays) + comps, zeros + zeros, add, axes)
    return jnp.stack(out[:n]) + jnp.stack(out[n:])


@_compensated_sums.defjvp
def _compensated_sums_jvp(axes, primals, tangents):
    (arrays,), (ts,) = primals, tangents
    tangent = jnp.stack([jnp.sum(t, axis=axes) for t in ts])
    return _compensated_sums(arrays, axes), tangent


# --------------------------------------------------------------------------
# max x, min x and max |x| (clip_by_value).
# --------------------------------------------------------------------------


def extremes(x: jax.Array):
    """``(max x, min x, max |x|)`` of a real ``x`` in its accumulation dtype.

    ``max |x|`` is NaN if ``x`` holds a NaN (the others may not be).
    """
    acc = accumulation_dtype(x.dtype)
    a = _xla_cpu.convert(x, acc)
    axes = _axes(x.ndim, None)
    if not _plan.is_local(x):
        return jnp.max(a), jnp.min(a), _nan_safe_max(lax.abs(a), axes)
    rows = _xla_cpu.split_rows(a)
    if rows is None:
        return _fused_extremes(a)
    tops, bottoms, mags = jax.vmap(_fused_extremes)(rows)  # per row, then combined
    return jnp.max(tops), jnp.min(bottoms), max_nonneg(mags)


@jax.custom_jvp
def _fused_extremes(a: jax.Array):
    """One pass over integer keys: the float order, as signed integers."""
    itype = _int_of(a.dtype)
    low = jnp.asarray(np.iinfo(itype).max, itype)
    bits = lax.bitcast_convert_type(a, itype)
    # Negative floats: flip the magnitude bits, so larger keys are larger values.
    keys = lax.bitwise_xor(
        bits,
        lax.bitwise_and(
            lax.shift_right_arithmetic(
                bits, jnp.asarray(np.iinfo(itype).bits - 1, itype)
            ),
            low,
        ),
    )
    mags = lax.bitwise_and(bits, low)

    def pick(u, v):
        return lax.max(u[0], v[0]), lax.min(u[1], v[1]), lax.max(u[2], v[2])

    inits = (
        jnp.asarray(np.iinfo(itype).min, itype),
        jnp.asarray(np.iinfo(itype).max, itype),
        jnp.zeros((), itype),
    )
    top, bottom, mag = lax.reduce((keys, keys, mags), inits, pick, tuple(range(a.ndim)))

    def value(k):  # the key's float (the flip is its own inverse)
        flip = lax.bitwise_and(
            lax.shift_right_arithmetic(k, jnp.asarray(np.iinfo(itype).bits - 1, itype)),
            low,
        )
        return lax.bitcast_convert_type(lax.bitwise_xor(k, flip), a.dtype)

    return value(top), value(bottom), lax.bitcast_convert_type(mag, a.dtype)


@_fused_extremes.defjvp
def _fused_extremes_jvp(primals, tangents):
    (a,), (t,) = primals, tangents

    def reference(a):
        return jnp.max(a), jnp.min(a), jnp.max(jnp.abs(a))

    return _fused_extremes(a), jax.jvp(reference, (a,), (t,))[1]


# --------------------------------------------------------------------------
# Computed once, not inside every consumer.
# --------------------------------------------------------------------------


@jax.custom_jvp
def fusion_barrier(x: Any) -> Any:
    """Computes the small values ``x`` (a pytree) once, not inside each consumer.

    XLA fuses cheap scalar arithmetic into every kernel that reads its result:
    a scale derived from the partial sums of all N leaves and read by N
    per-leaf kernels is then recomputed inside each of them (O(N**2)
    instructions to compile). A sort, which XLA never fuses, prevents it
    (``lax.optimization_barrier`` does not on XLA:CPU). The values are sorted
    by a constant key (a no-op). Differentiated as the identity.
    """
    leaves, treedef = jax.tree.flatten(x)
    if not leaves:
        return x
    arrays = [jnp.asarray(v) for v in leaves]
    width = max(v.size for v in arrays)
    flat = [
        jnp.pad(
            jnp.broadcast_to(v.reshape(1, -1), (2, v.size)),
            ((0, 0), (0, width - v.size)),
        )
        for v in arrays
    ]
    keys = lax.broadcasted_iota(jnp.int32, (2, width), 0)
    out = lax.sort((keys, *flat), dimension=0, num_keys=1)[1:]
    res = [o[0, : v.size].reshape(v.shape) for o, v in zip(out, arrays, strict=True)]
    return jax.tree.unflatten(treedef, res)


@fusion_barrier.defjvp
def _fusion_barrier_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return fusion_barrier(x), t
