"""Shared pieces of the measure -> decide -> apply -> record pipeline (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_clip import _numerics, _validation
from optax_clip._stats import ClipStats, update_clip_stats

# --------------------------------------------------------------------------
# Decide and apply.
# --------------------------------------------------------------------------


def threshold_array(value: Any, dtype: Any, valid: _validation.Valid = True):
    """A (traced or concrete) threshold as a scalar; NaN unless ``valid``."""
    return _validation.nan_unless(valid, _validation.scalar_array(value, dtype))


def clip_factor(
    norm: jax.Array, threshold: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(num, den, clipped)`` with ``num / den = min(1, threshold / norm)``.

    Exactly 1 (the identity) when ``norm <= threshold``. The division only
    happens on the clipping branch ("double where"), so the value and its
    gradient are finite at ``norm == 0`` and at ``threshold == 0``. A NaN norm
    or threshold counts as clipped with a NaN scale (it never passes silently).
    """
    clipped = ~(norm <= threshold)
    one = jnp.ones_like(norm)
    num = jnp.where(clipped, threshold.astype(norm.dtype), one)
    den = jnp.where(clipped, norm, one)
    return num, den, clipped


class Scale(NamedTuple):
    """A scale ``num / den`` applied to every element as ``(x * hi) * lo``.

    Both factors are normal floats even when the scale itself is not
    (subnormals are flushed to 0): clipping a float32 gradient of norm 3e38 to
    1 needs a scale of 3e-39, to 1e-20 one of 3e-59. ``lo`` is 1 whenever the
    scale is a normal float. ``value`` is the scale as reported in the
    statistics: a positive scale below the smallest normal float reads as that
    float (``tiny``), never as 0.
    """

    value: jax.Array
    hi: jax.Array
    lo: jax.Array


def make_scale(num: jax.Array, den: jax.Array) -> Scale:
    """The :class:`Scale` ``num / den`` (``0 <= num <= den``), safe from underflow.

    When ``num / den`` is below the smallest normal float, ``hi = 2**(2 - e)``
    with ``den < 2**e`` brings ``den`` (and every element, which is at most
    ``den`` in magnitude) into ``[2, 4)`` exactly, and ``lo = num / (den * hi)``
    is then within a factor 4 of ``num``.
    """
    value = num / den
    tiny = jnp.finfo(value.dtype).tiny
    normal = ~(jnp.abs(value) < tiny) | (num == 0)
    _, _, bias = _numerics._float_bits(den.dtype)
    shift = _numerics._pow2(jnp.minimum(2 - _numerics._exponent(den), bias), den.dtype)
    hi = jnp.where(normal, value, shift)
    lo = jnp.where(normal, jnp.ones_like(value), num / (den * shift))
    return Scale(jnp.where(normal, value, tiny), hi, lo)


def divide_by_scalar(v: jax.Array, d: jax.Array) -> jax.Array:
    """``v / d`` for an array ``v`` and a positive scalar ``d`` (NaN and Inf pass).

    XLA computes ``v / d`` as ``v * (1 / d)``, and ``1 / d`` is subnormal
    (flushed to 0) for ``d`` above about 8.5e37 in float32. Both are first
    scaled by the same power of two (exact), which brings ``d`` into
    ``[0.5, 1)``.
    """
    f1, f2 = _numerics._pow2_factors(_numerics._exponent(d), d.dtype)
    return ((v * f1) * f2) / ((d * f1) * f2)


_UINT_OF_SIZE = {2: jnp.uint16, 4: jnp.uint32}


def _cast_toward_zero(y: jax.Array, dtype: Any) -> jax.Array:
    """Casts ``y`` to the narrower float ``dtype``, rounding toward zero.

    Round-to-nearest can make a scaled bf16/fp16 element up to half an ulp
    larger than exact, so a clipped bf16 tree could end up 0.4% above
    ``max_norm``. Rounding the magnitude down keeps every element at or below
    its exact value. A scale of exactly 1 is unaffected (the cast is exact).
    """
    r = y.astype(dtype)
    uint = _UINT_OF_SIZE.get(jnp.dtype(dtype).itemsize)
    if uint is None:  # pragma: no cover - no float of this size in use
        return r
    too_big = jnp.abs(r.astype(y.dtype)) > jnp.abs(y)
    # Decrementing the bit pattern of a non-zero float lowers its magnitude by
    # one ulp, whatever its sign (and turns +-inf into the largest finite).
    down = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(r, uint) - jnp.asarray(1, uint), dtype
    )
    return r + jax.lax.stop_gradient(jnp.where(too_big, down - r, jnp.zeros_like(r)))


@jax.custom_jvp
def _bf16_toward_zero(y: jax.Array) -> jax.Array:
    """float32 -> bfloat16 rounding toward zero: the top 16 bits of ``y``.

    The same values as :func:`_cast_toward_zero` with a quarter of the
    element-wise work. NaN stays NaN: every NaN that arithmetic on bf16 values
    produces has its quiet bit (kept) set. Differentiated like a plain cast.
    """
    bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
    top = jax.lax.shift_right_logical(bits, jnp.uint32(16))
    return jax.lax.bitcast_convert_type(
        jax.lax.convert_element_type(top, jnp.uint16), jnp.bfloat16
    )


@_bf16_toward_zero.defjvp
def _bf16_toward_zero_jvp(primals, tangents):
    (y,), (t,) = primals, tangents
    return _bf16_toward_zero(y), t.astype(jnp.bfloat16)


def _convert(x: jax.Array, dtype: Any) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.convert_element_type(x, dtype)


@jax.custom_jvp
def _bf16_to_f32(x: jax.Array) -> jax.Array:
    """bfloat16 -> float32 (exact) through the bits: see :func:`_widen`."""
    bits = jax.lax.convert_element_type(
        jax.lax.bitcast_convert_type(x, jnp.uint16), jnp.uint32
    )
    return jax.lax.bitcast_convert_type(
        jax.lax.shift_left(bits, jnp.uint32(16)), jnp.float32
    )


@_bf16_to_f32.defjvp
def _bf16_to_f32_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _bf16_to_f32(x), t.astype(jnp.float32)


def _widen(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` converted to ``dtype``; bf16 -> f32 through its bits (exact).

    The global norm converts each bf16 leaf to float32 inside its reduction.
    An identical conversion here would be merged with it (CSE), and XLA:CPU
    would then write a float32 copy of the gradients instead of fusing the
    conversion into the reduction. Shifting the bits gives the same values
    through other operations. (fp16 needs no such care on XLA:CPU: its
    reductions go to YNNPACK, which cannot fuse an fp16 conversion, so the
    norm writes a float32 copy of fp16 gradients whatever the scale pass
    does; even ``jnp.sum(x.astype(jnp.float32) ** 2)`` does.)
    """
    if x.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32:
        return _bf16_to_f32(x)
    return _convert(x, dtype)


def scale_leaf(x: jax.Array, scale: Scale, keep: jax.Array | None = None) -> jax.Array:
    """``x * scale`` computed in float32 or wider, returned in ``x``'s dtype.

    When ``x`` is narrower than the computation (bf16, fp16), the result is
    rounded toward zero so that clipping never overshoots its bound. Where the
    scale is exactly 1, ``x`` itself is returned (XLA:CPU flushes subnormal
    products to zero, so ``x * 1`` is not always ``x``). ``keep``, if given,
    is the scalar ``scale.value == 1`` computed once for many leaves.
    """
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    keep = scale.value == 1 if keep is None else keep
    return select_bits(keep, x, _scaled(x, scale))  # keep: scalar or per unit


def select_bits(pred: jax.Array, on_true: jax.Array, on_false: jax.Array):
    """A select that selects 16-bit floats as integers.

    ``pred`` is a scalar or broadcasts to the operands' shape.

    XLA:CPU has no bf16/fp16 select: it converts both operands to float32 and
    back. The conversion of the gradient then equals (and is merged with) the
    one inside the norm's reduction, which XLA:CPU then writes out as a
    float32 copy of every gradient on every step (measured: the clip alone
    1.5x slower on bf16). Selecting the bit patterns avoids the conversion.
    """
    dtype = on_true.dtype
    if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2:
        return _select16(pred, on_true, on_false)
    return _pick(pred, on_true, on_false)


def _pick(pred: jax.Array, on_true: jax.Array, on_false: jax.Array):
    """``lax.select`` for a scalar ``pred`` (fast to trace), else ``jnp.where``.

    ``jnp.where`` broadcasts ``pred`` with the operands' sharding (a
    per-unit ``pred`` broadcast by hand is replicated, and ``lax.select``
    rejects it under ``Explicit`` mesh axes).
    """
    if jnp.ndim(pred) == 0:
        return jax.lax.select(pred, on_true, on_false)
    return jnp.where(pred, on_true, on_false)


@jax.custom_jvp
def _select16(pred: jax.Array, on_true: jax.Array, on_false: jax.Array):
    uint = _UINT_OF_SIZE[2]
    bits = _pick(
        pred,
        jax.lax.bitcast_convert_type(on_true, uint),
        jax.lax.bitcast_convert_type(on_false, uint),
    )
    return jax.lax.bitcast_convert_type(bits, on_true.dtype)


@_select16.defjvp
def _select16_jvp(primals, tangents):
    pred, a, b = primals
    _, ta, tb = tangents
    return _select16(pred, a, b), _pick(pred, ta, tb)


def _scaled(x: jax.Array, scale: Scale) -> jax.Array:
    acc = jnp.promote_types(x.dtype, scale.hi.dtype)
    if jnp.ndim(scale.hi) == 0 and jnp.ndim(scale.lo) == 0:
        # lax directly: a few thousand leaves trace noticeably faster.
        hi, lo = _convert(scale.hi, acc), _convert(scale.lo, acc)
        y = jax.lax.mul(jax.lax.mul(_widen(x, acc), hi), lo)
    else:
        y = _widen(x, acc) * scale.hi.astype(acc) * scale.lo.astype(acc)
    if (
        jnp.issubdtype(x.dtype, jnp.floating)
        and jnp.dtype(x.dtype).itemsize < jnp.dtype(acc).itemsize
    ):
        if x.dtype == jnp.bfloat16 and y.dtype == jnp.float32:
            return _bf16_toward_zero(y)
        return _cast_toward_zero(y, x.dtype)
    return _convert(y, x.dtype)


def _with_policy(policy: str, scale: Scale, bad: jax.Array) -> Scale:
    """The scale to use when the measured norm is non-finite (``bad``)."""
    fill = 0.0 if policy == "zero_update" else jnp.nan
    value = jnp.where(bad, fill, scale.value)
    return Scale(value, jnp.where(bad, fill, scale.hi), scale.lo)


def _apply_leaf(
    policy: str,
    x: jax.Array,
    scale: Scale,
    zero: jax.Array,
    keep: jax.Array | None = None,
):
    out = scale_leaf(x, scale, keep)
    if policy == "zero_update":  # Inf * 0 is NaN: select zeros explicitly.
        out = select_bits(zero, jax.lax.full_like(out, 0), out)
    return out


def zero_if(flag: jax.Array, tree: Any) -> Any:
    """``tree`` with every leaf replaced by zeros where ``flag`` is True."""
    return jax.tree.map(lambda x: jnp.where(flag, jnp.zeros_like(x), x), tree)


class Applied(NamedTuple):
    """What the apply step did (inputs to the record step)."""

    updates: Any
    pre_norm: jax.Array
    post_norm: jax.Array
    scale: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array


FactorFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def apply_global(
    updates: Any,
    norm: jax.Array,
    threshold: jax.Array,
    policy: str,
    factor_fn: FactorFn = clip_factor,
) -> Applied:
    """Scales the whole tree by ``factor_fn(norm, threshold)`` under ``policy``.

    ``propagate``: a non-finite step becomes all NaN (never a silent zero).
    ``zero_update``: a non-finite step becomes all zeros.
    """
    nonfinite = ~jnp.isfinite(norm)
    num, den, clipped = factor_fn(norm, threshold)
    scale = _with_policy(policy, make_scale(num, den), nonfinite)
    # One scale for all leaves (not recomputed inside every leaf's kernel).
    scale, zero, keep = _numerics.materialize((scale, nonfinite, scale.value == 1))
    out = jax.tree.map(lambda x: _apply_leaf(policy, x, scale, zero, keep), updates)
    post = jnp.where(nonfinite, scale.value, (norm * scale.hi) * scale.lo)
    return Applied(out, norm, post, scale.value, clipped & ~nonfinite, nonfinite)


def apply_per_leaf(
    updates: Any,
    norms: jax.Array,
    thresholds: jax.Array,
    policy: str,
    norm_type: float,
) -> Applied:
    """Scales each leaf by ``min(1, threshold_i / norm_i)`` under ``policy``.

    ``norms`` and ``thresholds`` are vectors with one entry per leaf (leaf
    order). The scales are computed on these vectors, once, and each leaf's
    kernel reads its own entry: no per-leaf scalar kernels.

    ``propagate``: only a leaf whose own norm is NaN/Inf becomes all NaN; the
    other leaves are clipped as usual. ``zero_update``: any non-finite leaf
    makes the whole update zero.
    """
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:
        zero = jnp.zeros((), jnp.float32)
        return Applied(
            updates, zero, zero, jnp.ones((), jnp.float32), zero > 0, zero > 0
        )
    bad = ~jnp.isfinite(norms)
    any_bad = jnp.any(bad)
    num, den, clipped = clip_factor(norms, thresholds)
    zero = jnp.broadcast_to(any_bad, bad.shape) if policy == "zero_update" else bad
    scale = _with_policy(policy, make_scale(num, den), zero)
    scale, zero, keep = _numerics.materialize((scale, zero, scale.value == 1))
    new_leaves = []
    for i, x in enumerate(leaves):
        s_i = Scale(*(_numerics.split(v, i) for v in scale))
        z_i, k_i = _numerics.split(zero, i), _numerics.split(keep, i)
        new_leaves.append(_apply_leaf(policy, x, s_i, z_i, k_i))
    posts = jnp.where(zero, scale.value, (norms * scale.hi) * scale.lo)
    return Applied(
        jax.tree.unflatten(treedef, new_leaves),
        _numerics.norm_of_values(norms, norm_type),
        _numerics.norm_of_values(posts, norm_type),
        jnp.min(scale.value).astype(jnp.float32),
        jnp.any(clipped & ~bad),
        any_bad,
    )


def apply_per_unit(
    updates: Any,
    norms: list[jax.Array],
    thresholds: list[jax.Array],
    bad: list[jax.Array],
    policy: str,
) -> tuple[Applied, jax.Array]:
    """Scales each unit of each leaf by ``min(1, threshold / norm)`` under ``policy``.

    ``norms``, ``thresholds`` and ``bad`` hold one array per leaf (leaf order),
    with size-1 dimensions over the axes a unit spans, so they broadcast
    against the leaf. ``propagate``: a unit flagged ``bad`` becomes all NaN,
    the others are clipped as usual. ``zero_update``: any bad unit makes the
    whole update zero. Returns what was applied (global norms over all units)
    and the number of units clipped (int32).
    """
    leaves, treedef = jax.tree.flatten(updates)
    any_bad = jnp.any(jnp.stack([jnp.any(b) for b in bad]))
    out, posts, scales, n_clipped = [], [], [], []
    for x, norm, threshold, b in zip(leaves, norms, thresholds, bad, strict=True):
        num, den, clipped = clip_factor(norm, threshold)
        zero = jnp.broadcast_to(any_bad, b.shape) if policy == "zero_update" else b
        scale = _with_policy(policy, make_scale(num, den), zero)
        out.append(_apply_leaf(policy, x, scale, zero, scale.value == 1))
        posts.append(jnp.where(zero, scale.value, (norm * scale.hi) * scale.lo))
        # -max(-x): a NaN scale survives the cross-device reduction.
        scales.append(-_numerics._nan_max(-scale.value))
        n_clipped.append(jnp.sum(clipped & ~b, dtype=jnp.int32))
    applied = Applied(
        jax.tree.unflatten(treedef, out),
        _numerics.norm_of_arrays(norms, 2.0),
        _numerics.norm_of_arrays(posts, 2.0),
        jnp.min(jnp.stack(scales)).astype(jnp.float32),
        sum(n_clipped) > 0,
        any_bad,
    )
    return applied, sum(n_clipped).astype(jnp.int32)


def record(stats: ClipStats, applied: Applied, threshold: jax.Array) -> ClipStats:
    """The record step: new :class:`ClipStats` from what was applied."""
    return update_clip_stats(
        stats,
        pre_norm=applied.pre_norm,
        post_norm=applied.post_norm,
        scale=applied.scale,
        threshold=threshold,
        clipped=applied.clipped,
        nonfinite=applied.nonfinite,
    )
