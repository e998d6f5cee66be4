"""The apply and record steps every transform shares (private).

``apply_*`` scales the update by ``min(1, threshold / norm)`` (or another
factor) under a non-finite policy and says what it did (:class:`Applied`);
:func:`record` turns that into the next :class:`ClipStats`.

* The factor is 1 exactly when ``norm <= threshold``, and then the update is
  returned bit for bit. The division happens only where it clips (double
  ``where``), so the value and its gradient are finite at a zero norm or
  threshold.
* A scale below the smallest normal float is applied as two normal factors.
* Narrow floats (bf16, fp16) are scaled in float32 and rounded toward zero,
  so a clipped update never exceeds its bound after rounding.
* Policies: ``"propagate"`` makes a non-finite step (or unit) all NaN, never
  a silent clip; ``"zero_update"`` makes the step zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_clip import _collectives, _norms, _reduce, _validation, _xla_cpu
from optax_clip._stats import ClipStats, update_clip_stats


def threshold_array(value: Any, dtype: Any, valid: _validation.Valid = True):
    """A (traced or concrete) threshold as a scalar; NaN unless ``valid``."""
    return _validation.nan_unless(valid, _validation.scalar_array(value, dtype))


def clip_factor(norm: jax.Array, threshold: jax.Array):
    """``(num, den, clipped)`` with ``num / den = min(1, threshold / norm)``.

    Exactly 1 (the identity) when ``norm <= threshold``. A NaN norm or
    threshold counts as clipped with a NaN factor (it never passes silently).
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
    scale is a normal float. ``value`` is the scale as reported: a positive
    scale below the smallest normal float reads as that float, never as 0.
    """

    value: jax.Array
    hi: jax.Array
    lo: jax.Array


def make_scale(num: jax.Array, den: jax.Array) -> Scale:
    """The :class:`Scale` ``num / den`` (``num >= 0``, ``den > 0``), safe at both ends.

    When ``num / den`` is below the smallest normal float, or beyond the
    largest (a scale above 1, e.g. AdaGN's, by a norm near the smallest
    normal), ``hi = 2**(2 - e)`` with ``den < 2**e`` brings ``den`` (and every
    element, which is at most ``den`` in magnitude) into ``[2, 4)`` exactly,
    and ``lo = num / (den * hi)`` is then within a factor 4 of ``num``.
    """
    value = num / den
    tiny = jnp.finfo(value.dtype).tiny
    small = (jnp.abs(value) < tiny) & (num != 0)
    normal = ~small & (value != jnp.inf)
    _, _, bias = _norms.float_bits(den.dtype)
    shift = _norms.pow2(jnp.minimum(2 - _norms.exponent(den), bias), den.dtype)
    hi = jnp.where(normal, value, shift)
    lo = jnp.where(normal, jnp.ones_like(value), num / (den * shift))
    return Scale(jnp.where(small, tiny, value), hi, lo)


def divide_by_scalar(v: jax.Array, d: jax.Array) -> jax.Array:
    """``v / d`` for an array ``v`` and a positive scalar ``d`` (NaN and Inf pass).

    XLA computes ``v / d`` as ``v * (1 / d)``, and ``1 / d`` is subnormal
    (flushed to 0) for ``d`` above about 8.5e37 in float32. Both are first
    scaled by the same power of two (exact), which brings ``d`` into
    ``[0.5, 1)``.
    """
    f1, f2 = _norms.pow2_factors(_norms.exponent(d), d.dtype)
    return ((v * f1) * f2) / ((d * f1) * f2)


def cast_toward_zero(y: jax.Array, dtype: Any) -> jax.Array:
    """Casts ``y`` to the narrower float ``dtype``, rounding toward zero.

    Round-to-nearest can make a scaled bf16/fp16 element up to half an ulp
    larger than exact, so a clipped bf16 tree could end up 0.4% above
    ``max_norm``. A scale of exactly 1 is unaffected (the cast is exact).
    """
    if _xla_cpu.enabled() and dtype == jnp.bfloat16 and y.dtype == jnp.float32:
        return _xla_cpu.bf16_toward_zero(y)
    r = y.astype(dtype)
    uint = {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(dtype).itemsize]
    too_big = jnp.abs(r.astype(y.dtype)) > jnp.abs(y)
    # Decrementing the bit pattern of a non-zero float lowers its magnitude by
    # one ulp, whatever its sign (and turns +-inf into the largest finite).
    down = lax.bitcast_convert_type(
        lax.bitcast_convert_type(r, uint) - jnp.asarray(1, uint), dtype
    )
    return r + lax.stop_gradient(jnp.where(too_big, down - r, jnp.zeros_like(r)))


def scale_leaf(x: jax.Array, scale: Scale, keep: jax.Array | None = None):
    """``x * scale`` in float32 or wider, returned in ``x``'s dtype.

    Where the scale is exactly 1, ``x`` itself is returned (XLA:CPU flushes
    subnormal products to zero, so ``x * 1`` is not always ``x``). ``keep``,
    if given, is ``scale.value == 1`` computed once for many leaves.
    """
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    keep = scale.value == 1 if keep is None else keep
    return _xla_cpu.select(keep, x, _scaled(x, scale))


def _scaled(x: jax.Array, scale: Scale) -> jax.Array:
    acc = jnp.promote_types(x.dtype, scale.hi.dtype)
    a = _xla_cpu.widen(x, acc)
    if jnp.ndim(scale.hi) == 0 and jnp.ndim(scale.lo) == 0:
        hi, lo = _xla_cpu.convert(scale.hi, acc), _xla_cpu.convert(scale.lo, acc)
        y = lax.mul(lax.mul(a, hi), lo)  # lax: many leaves trace faster
    else:
        y = a * scale.hi.astype(acc) * scale.lo.astype(acc)
    narrower = jnp.dtype(x.dtype).itemsize < jnp.dtype(acc).itemsize
    if jnp.issubdtype(x.dtype, jnp.floating) and narrower:
        return cast_toward_zero(y, x.dtype)
    return _xla_cpu.convert(y, x.dtype)


def _with_policy(policy: str, scale: Scale, bad: jax.Array) -> Scale:
    """The scale where the measured norm is non-finite (``bad``)."""
    fill = 0.0 if policy == "zero_update" else jnp.nan
    value = jnp.where(bad, fill, scale.value)
    return Scale(value, jnp.where(bad, fill, scale.hi), scale.lo)


def _apply_leaf(policy: str, x, scale: Scale, zero, keep=None):
    out = scale_leaf(x, scale, keep)
    if policy == "zero_update":  # Inf * 0 is NaN: select zeros explicitly.
        out = _xla_cpu.select(zero, lax.full_like(out, 0), out)
    return out


def _post(norm, scale: Scale, zero) -> jax.Array:
    """The norm after scaling (from the norm: no second pass over the values)."""
    return jnp.where(zero, scale.value, (norm * scale.hi) * scale.lo)


class Applied(NamedTuple):
    """What the apply step did (the inputs of the record step)."""

    updates: Any
    pre_norm: jax.Array
    post_norm: jax.Array
    scale: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array


FactorFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def apply_global(
    updates, norm, threshold, policy: str, factor_fn: FactorFn = clip_factor
):
    """Scales the whole tree by ``factor_fn(norm, threshold)`` under ``policy``."""
    nonfinite = ~jnp.isfinite(norm)
    num, den, clipped = factor_fn(norm, threshold)
    scale = _with_policy(policy, make_scale(num, den), nonfinite)
    # One scale for all leaves (not recomputed inside every leaf's kernel).
    scale, zero, keep = _reduce.fusion_barrier((scale, nonfinite, scale.value == 1))
    out = jax.tree.map(lambda x: _apply_leaf(policy, x, scale, zero, keep), updates)
    post = _post(norm, scale, nonfinite)
    return Applied(out, norm, post, scale.value, clipped & ~nonfinite, nonfinite)


def apply_per_leaf(
    updates, norms, thresholds, policy: str, norm_type: float, reported=None
):
    """Scales each leaf by ``min(1, threshold_i / norm_i)`` under ``policy``.

    ``norms`` and ``thresholds`` are vectors with one entry per leaf (leaf
    order); the scales are computed on them once, and each leaf's kernel
    reads its own entry (read out by :func:`_xla_cpu.entries`, which XLA:CPU
    compiles fast). ``propagate``: only a leaf whose own norm is NaN/Inf
    becomes all NaN. ``zero_update``: any non-finite leaf zeroes the update.
    ``reported``: the leaves' own norms, when ``norms`` measure something
    else (StableAdamW's ``g / sqrt(v)``); the pre- and post-clip norms are
    then computed from them.
    """
    num, den, clipped = clip_factor(norms, thresholds)
    return apply_leaf_scales(
        updates, norms, make_scale(num, den), clipped, policy, norm_type, reported
    )


def apply_leaf_scales(
    updates, norms, scale: Scale, clipped, policy: str, norm_type: float, reported=None
):
    """Scales each leaf by its entry of ``scale`` (leaf order) under ``policy``.

    The apply step of :func:`apply_per_leaf`, for a scale that is not
    ``min(1, threshold / norm)`` (AdaGN's, which may exceed 1). ``norms``: the
    leaves' norms (a NaN or Inf marks a bad leaf); ``clipped``: which leaves
    count as clipped in the statistics.
    """
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:
        zero = jnp.zeros((), jnp.float32)
        return Applied(updates, zero, zero, zero + 1, zero > 0, zero > 0)
    bad = ~jnp.isfinite(norms)
    any_bad = jnp.any(bad)
    zero = jnp.broadcast_to(any_bad, bad.shape) if policy == "zero_update" else bad
    scale = _with_policy(policy, scale, zero)
    scale, any_bad = _reduce.fusion_barrier((scale, any_bad))
    new_leaves = []
    # Two entries per leaf, not three (each read-out output costs compile
    # time): the scale is exactly 1 iff hi == 1 and lo == 1 (make_scale:
    # hi == value and lo == 1 for a normal scale, lo == value otherwise).
    for x, (hi, lo) in zip(leaves, _xla_cpu.entries((scale.hi, scale.lo)), strict=True):
        keep = (hi == 1) & (lo == 1)
        # zero_update zeroes every leaf when any is bad; propagate never zeroes.
        new_leaves.append(_apply_leaf(policy, x, Scale(hi, hi, lo), any_bad, keep))
    reported = norms if reported is None else reported
    return Applied(
        jax.tree.unflatten(treedef, new_leaves),
        _norms.norm_of_values(reported, norm_type),
        _norms.norm_of_values(_post(reported, scale, zero), norm_type),
        jnp.min(scale.value).astype(jnp.float32),
        jnp.any(clipped & ~bad),
        any_bad,
    )


def apply_per_unit(updates, norms, thresholds, bad, policy: str):
    """Scales each unit of each leaf by ``min(1, threshold / norm)`` under ``policy``.

    ``norms``, ``thresholds`` and ``bad`` hold one array per leaf (leaf order)
    with size-1 dimensions over the axes a unit spans. ``propagate``: a unit
    flagged ``bad`` becomes all NaN. ``zero_update``: any bad unit zeroes the
    update. Returns what was applied and the number of units clipped (int32).
    """
    leaves, treedef = jax.tree.flatten(updates)
    any_bad = jnp.any(jnp.stack([jnp.any(b) for b in bad]))
    out, posts, scales, n_clipped = [], [], [], []
    for x, norm, threshold, b in zip(leaves, norms, thresholds, bad, strict=True):
        num, den, clipped = clip_factor(norm, threshold)
        zero = jnp.broadcast_to(any_bad, b.shape) if policy == "zero_update" else b
        scale = _with_policy(policy, make_scale(num, den), zero)
        out.append(_apply_leaf(policy, x, scale, zero, scale.value == 1))
        posts.append(_post(norm, scale, zero))
        # -max(-x): a NaN scale survives the cross-device reduction.
        scales.append(-_collectives.nan_max(-scale.value))
        n_clipped.append(jnp.sum(clipped & ~b, dtype=jnp.int32))
    applied = Applied(
        jax.tree.unflatten(treedef, out),
        _norms.norm_of_arrays(norms, 2.0),
        _norms.norm_of_arrays(posts, 2.0),
        jnp.min(jnp.stack(scales)).astype(jnp.float32),
        sum(n_clipped) > 0,
        any_bad,
    )
    return applied, sum(n_clipped).astype(jnp.int32)


def apply_elementwise(updates, bounds, extremes, policy: str) -> Applied:
    """Clips every element into ``bounds = (lo, hi)`` under ``policy``.

    ``extremes`` is ``(max x, min x, max |x|)`` of the whole update. The
    statistics use the inf-norm: ``scale`` is the factor applied to the
    largest element. ``propagate``: NaN and Inf elements pass unchanged (a
    plain clip would turn Inf into the bound). ``zero_update``: a step with
    any NaN or Inf becomes zeros.
    """
    lo, hi = bounds
    top, bottom, pre = extremes
    nonfinite = ~jnp.isfinite(pre)
    clipped = ((top > hi) | (bottom < lo)) & ~nonfinite
    has_values = top >= bottom
    post = jnp.maximum(
        jnp.abs(jnp.clip(top, lo, hi)), jnp.abs(jnp.clip(bottom, lo, hi))
    )
    post = jnp.where(has_values, post, 0.0)
    scale = jnp.where(pre > 0, post / jnp.where(pre > 0, pre, 1.0), 1.0)
    fill = 0.0 if policy == "zero_update" else jnp.nan
    bounds_in: dict = {}  # per dtype, not per leaf

    def clip_leaf(x):
        if x.dtype not in bounds_in:
            up, down = _bound_in(lo, x.dtype, up=True), _bound_in(hi, x.dtype, up=False)
            bounds_in[x.dtype] = (up, down)
        c = jnp.clip(x, *bounds_in[x.dtype])
        if policy == "zero_update":
            return _xla_cpu.select(nonfinite, jnp.zeros_like(x), c)
        return _xla_cpu.select(jnp.isfinite(x), c, x)

    out = jax.tree.map(clip_leaf, updates)
    return Applied(
        out,
        pre,
        jnp.where(nonfinite, fill, post),
        jnp.where(nonfinite, fill, scale),
        clipped,
        nonfinite,
    )


def _bound_in(bound: jax.Array, dtype: Any, *, up: bool) -> jax.Array:
    """``bound`` in ``dtype``, rounded inwards and saturated to finite values.

    A lower bound is rounded up and an upper bound down, so that no clipped
    element lies outside ``[min_value, max_value]`` (round-to-nearest turns a
    bf16 bound of 0.3 into 0.30078125). A bound beyond the range of ``dtype``
    becomes its largest finite value (an fp16 bound of 1e5 is not ``inf``).
    """
    r = bound.astype(dtype)
    if jnp.dtype(dtype) != bound.dtype:
        wide = r.astype(bound.dtype)
        outside = (wide < bound) if up else (wide > bound)
        toward = jnp.asarray(jnp.inf if up else -jnp.inf, dtype)
        r = jnp.where(outside, jnp.nextafter(r, toward), r)
    top = jnp.finfo(dtype).max
    return jnp.clip(r, -top, top)


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
