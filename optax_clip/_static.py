"""Clipping with a fixed threshold: by value, by global norm, per block, soft."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_clip import (
    _apply,
    _collectives,
    _fail_fast,
    _norms,
    _validation,
)
from optax_clip._stats import (
    ClipStats,
    LeafNorms,
    init_clip_stats,
    renewed_leaf_norms,
)


def _fixed_threshold(
    state_cls, initial_threshold, step, policy="propagate", axes=(), per_leaf=False
):
    """A transform whose ``step(updates)`` returns ``(applied, threshold)``.

    The measure, decide and apply steps are in ``step``; the state holds only
    the statistics, which the record step renews. With ``per_leaf``, ``step``
    returns ``(applied, threshold, leaf_norms)`` (a vector, leaf order) and the
    state's ``leaf_pre_clip_norms`` holds them as a :class:`LeafNorms`.
    """

    def init_fn(params):
        stats = init_clip_stats(initial_threshold)
        if not per_leaf:
            return state_cls(stats)
        return state_cls(stats, LeafNorms.zeros(params))

    def update_fn(updates, state, params=None):
        del params
        if not per_leaf:
            applied, threshold = step(updates)
            stats = _apply.record(state.clip_stats, applied, threshold)
            return applied.updates, state_cls(stats)
        applied, threshold, norms = step(updates)
        stats = _apply.record(state.clip_stats, applied, threshold)
        held = renewed_leaf_norms(
            state_cls._stats_name, updates, state.leaf_pre_clip_norms, norms
        )
        return applied.updates, state_cls(stats, held)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, state_cls._stats_name, axes)


class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step.
      leaf_pre_clip_norms: ``None``, or with ``leaf_norms=True`` the norm of
        each leaf of the last step's incoming updates: a ``LeafNorms`` whose
        ``values`` is a float32 vector (leaf order) and ``paths`` the leaves'
        paths (read them with :func:`optax_clip.get_stats`).
    """

    clip_stats: ClipStats
    leaf_pre_clip_norms: Any = None
    _stats_name = "clip_by_global_norm"
    _stats_leaf_norms = "leaf_pre_clip_norms"


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike,
    norm_type: _validation.NormType = "l2",
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
    leaf_norms: bool = False,
) -> optax.GradientTransformation:
    r"""Scales the whole update so that its global norm is at most ``max_norm``.

    .. math::

      g \leftarrow g \cdot \min\left(1, \frac{c}{\lVert g \rVert_p}\right),
      \qquad \lVert g \rVert_p = \Big(\sum_{\text{leaves}} \sum_i |g_i|^p\Big)^{1/p}

    Below the threshold (``norm <= max_norm``) the update is returned exactly.
    Differences from :func:`optax.clip_by_global_norm`:

    * the norm is accumulated in float32 (float64 for float64 leaves), also
      across leaves, so bf16/fp16 trees are not under-clipped;
    * it never overflows: a finite gradient whose squares exceed the float
      range (e.g. elements of 1e30 in float32, or 300 in fp16) is still scaled
      to norm ``max_norm`` in the right direction, where optax returns zeros;
    * ``max_norm=0`` and zero gradients give zeros, never NaN, and the gradient
      of the output with respect to the input (meta-gradient) is finite at 0;
    * 1-, 2- and inf-norms; an ``axis_name`` for ``pmap``/``shard_map``;
    * the pre-clip norm, scale and counts are kept in the state
      (read them with :func:`optax_clip.get_stats`);
    * bad input is an error, not a silent result: a negative or NaN
      ``max_norm`` raises here, and integer or bool updates raise in
      ``update``. A *traced* ``max_norm`` (a schedule through
      :func:`optax.inject_hyperparams` under ``jit``) cannot raise: a negative
      or NaN value makes that step's update NaN (``clip_threshold`` reads NaN).

    Non-finite policy: with ``"propagate"`` a step whose updates hold a NaN or
    Inf comes out entirely NaN (optax would sometimes return zeros, hiding the
    bad step), so that a guard downstream sees it; with ``"zero_update"`` it
    comes out as zeros; with ``"raise"`` it comes out NaN as with
    ``"propagate"`` and the call raises (under ``jit`` as a
    :class:`jax.errors.JaxRuntimeError` whose message names the transform and
    the leaves holding NaN or Inf; see the numerics guide). Either way the step
    is counted. To also keep the state of a following optimizer untouched,
    wrap the whole chain in :func:`optax_clip.skip_nonfinite`.

    Args:
      max_norm: the largest global norm allowed (a scalar >= 0; ``inf``
        disables clipping but keeps the statistics).
      norm_type: ``"l2"`` (default), ``"l1"`` or ``"inf"``; the numbers ``2``,
        ``1`` and ``float("inf")`` are accepted too (a string is never traced
        by :func:`optax.inject_hyperparams`; a number must be listed in its
        ``static_args``).
      nonfinite: what a step whose updates hold a NaN or Inf becomes:
        ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``.
      axis_name: name (or tuple of names) of the mapped axes (``pmap``,
        ``shard_map``) over which the update is sharded; the norm is then
        global across devices. Leave ``None`` under plain or sharded ``jit``.
      leaf_norms: also keep the norm of each leaf (before clipping) in the
        state, as ``leaf_pre_clip_norms``: :func:`optax_clip.get_stats` reports
        them as ``"clip_by_global_norm/leaf_norm/<path>"`` (``<path>`` the
        leaf's path in the updates, e.g. ``layer1/w``), to see which layer
        spiked. The gradients are still read once (the global norm is taken
        from the per-leaf norms, and may differ from the default's by
        rounding); ``init`` must then get parameters shaped like the updates.
        Default ``False``: the state holds ``None`` there.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ClipByGlobalNormState`.

    Example:
      >>> import jax.numpy as jnp, optax, optax_clip
      >>> tx = optax_clip.clip_by_global_norm(max_norm=5.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([5.0])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> clipped["a"]  # the global norm was sqrt(50); scaled by 5/sqrt(50)
      Array([2.1213202, 2.828427 ], dtype=float32)
      >>> float(state.clip_stats.pre_clip_norm), int(state.clip_stats.is_clipped)
      (7.0710678..., 1)
      >>> tx = optax_clip.clip_by_global_norm(max_norm=5.0, leaf_norms=True)
      >>> _, state = tx.update(grads, tx.init(grads))
      >>> stats = optax_clip.get_stats(state, fields=("leaf_norm",))
      >>> {k: float(v) for k, v in stats.items()}  # each leaf's norm
      {'clip_by_global_norm/leaf_norm/a': 5.0, 'clip_by_global_norm/leaf_norm/b': 5.0}

    References:
      Pascanu et al., `On the difficulty of training Recurrent Neural Networks
      <https://arxiv.org/abs/1211.5063>`_, 2013
    """
    p, policy, axes = _validation.norm_clip(norm_type, nonfinite, axis_name)
    valid = _validation.nonnegative("max_norm", max_norm)
    per_leaf = _validation.flag("leaf_norms", leaf_norms)
    measure = functools.partial(
        _norms.global_and_leaf_norms, norm_type=p, axis_name=axes, per_leaf=per_leaf
    )

    def step(updates):
        norm, norms = measure(updates)
        threshold = _apply.threshold_array(max_norm, norm.dtype, valid)
        applied = _apply.apply_global(updates, norm, threshold, policy)
        return (applied, threshold) + ((norms,) if per_leaf else ())

    return _fixed_threshold(
        ClipByGlobalNormState, max_norm, step, policy, axes, per_leaf
    )


class ClipByBlockNormState(NamedTuple):
    """State of :func:`clip_by_block_norm`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step; the norms are
        global (over all leaves), ``clip_scale`` is the smallest leaf scale.
    """

    clip_stats: ClipStats
    _stats_name = "clip_by_block_norm"


def clip_by_block_norm(
    max_norm: jax.typing.ArrayLike,
    norm_type: _validation.NormType = "l2",
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Scales each leaf (block, e.g. one layer's weight) to norm at most ``max_norm``.

    .. math::

      g^{(l)} \leftarrow g^{(l)} \cdot
      \min\left(1, \frac{c}{\lVert g^{(l)} \rVert_p}\right)
      \quad \text{for every leaf } l

    This is Keras' ``clipnorm`` and PyTorch's ``clip_grad_norm_`` called once
    per tensor, with the same careful norms as :func:`clip_by_global_norm`
    (float32 accumulation, overflow-safe, NaN-free at zero). It differs from
    :func:`optax.clip_by_block_rms`, which bounds the root-mean-square of each
    leaf rather than its norm.

    Non-finite policy: with ``"propagate"`` only a leaf whose own values hold
    a NaN or Inf comes out as all NaN; the other leaves are clipped as usual.
    With ``"zero_update"`` the whole update becomes zeros.

    Args:
      max_norm: the largest norm allowed for each leaf (a scalar >= 0).
      norm_type: ``"l2"`` (default), ``"l1"`` or ``"inf"``; the numbers ``2``,
        ``1`` and ``float("inf")`` are accepted too (a string is never traced
        by :func:`optax.inject_hyperparams`; a number must be listed in its
        ``static_args``).
      nonfinite: ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``.
      axis_name: mapped axes over which leaves are sharded (see
        :func:`clip_by_global_norm`); each leaf's norm is then its global norm.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ClipByBlockNormState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.clip_by_block_norm(max_norm=1.0)
      >>> grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> clipped["w"], clipped["b"]
      (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))

    References:
      Pascanu et al., `On the difficulty of training Recurrent Neural Networks
      <https://arxiv.org/abs/1211.5063>`_, 2013
    """
    p, policy, axes = _validation.norm_clip(norm_type, nonfinite, axis_name)
    valid = _validation.nonnegative("max_norm", max_norm)

    def step(updates):
        norms = _norms.leaf_norms(updates, p, axes)
        # In the norms' dtype: a float64 threshold of 1e300 is not inf.
        threshold = _apply.threshold_array(max_norm, norms.dtype, valid)
        thresholds = jnp.broadcast_to(threshold, norms.shape)
        return _apply.apply_per_leaf(updates, norms, thresholds, policy, p), threshold

    return _fixed_threshold(ClipByBlockNormState, max_norm, step, policy, axes)


class ClipByBlockRMSState(NamedTuple):
    """State of :func:`clip_by_block_rms`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step; the norms are
        global 2-norms (over all leaves), ``clip_threshold`` is ``max_rms`` and
        ``clip_scale`` the smallest leaf scale.
    """

    clip_stats: ClipStats
    _stats_name = "clip_by_block_rms"


def _global_sizes(leaves: list[jax.Array], axes: tuple) -> list[int]:
    """Each leaf's number of values across the mapped ``axes`` it is split over."""
    sizes = []
    for x, ax in zip(leaves, _collectives.leaf_axes(leaves, axes), strict=True):
        sizes.append(x.size * math.prod(lax.axis_size(a) for a in ax))
    return sizes


def clip_by_block_rms(
    max_rms: jax.typing.ArrayLike,
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Scales each leaf to a root-mean-square of at most ``max_rms``.

    .. math::

      g^{(l)} \leftarrow g^{(l)} \cdot
      \min\left(1, \frac{c}{\mathrm{RMS}(g^{(l)})}\right), \quad
      \mathrm{RMS}(g) = \frac{\lVert g \rVert_2}{\sqrt{n}}
      \quad \text{for every leaf } l \text{ of } n \text{ values}

    The same clip as :func:`optax.clip_by_block_rms` (Adafactor's update
    clipping, when placed after the optimizer), for moving a chain over: it
    gives the same updates where optax's are right, and differs where optax's
    fail. Its norms are those of :func:`clip_by_block_norm` (float32
    accumulation, no overflow: a float32 leaf holding 1e20 is clipped, where
    optax's RMS overflows and returns zeros; no NaN at zero), it records
    statistics, and it follows a non-finite policy. Each leaf is clipped by
    norm against ``max_rms * sqrt(n)``; a bound beyond the float range means
    the leaf cannot exceed it.

    Non-finite policy: with ``"propagate"`` only a leaf whose own values hold
    a NaN or Inf comes out as all NaN; with ``"zero_update"`` the whole update
    becomes zeros.

    Args:
      max_rms: the largest root-mean-square allowed for each leaf (>= 0).
      nonfinite: ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``.
      axis_name: mapped axes over which leaves are sharded (see
        :func:`clip_by_global_norm`); each leaf's RMS is then that of the
        whole leaf.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ClipByBlockRMSState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.clip_by_block_rms(max_rms=1.0)
      >>> grads = {"w": jnp.array([2.0, -2.0, 2.0, -2.0]), "b": jnp.array([0.5])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> clipped["w"]  # RMS 2 -> 1
      Array([ 1., -1.,  1., -1.], dtype=float32)
      >>> clipped["b"]  # RMS 0.5: untouched
      Array([0.5], dtype=float32)

    References:
      Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost <https://arxiv.org/abs/1804.04235>`_, 2018 (update clipping by
      RMS); :func:`optax.clip_by_block_rms`.
    """
    policy, axes = _validation.policy(nonfinite), _validation.axis_name(axis_name)
    valid = _validation.nonnegative("max_rms", max_rms)

    def step(updates):
        norms = _norms.leaf_norms(updates, 2.0, axes)
        threshold = _apply.threshold_array(max_rms, norms.dtype, valid)
        leaves = _validation.float_leaves(updates)
        root_n = np.sqrt(np.asarray(_global_sizes(leaves, axes), np.float64))
        thresholds = threshold * root_n.astype(norms.dtype)
        applied = _apply.apply_per_leaf(updates, norms, thresholds, policy, 2.0)
        return applied, threshold

    return _fixed_threshold(ClipByBlockRMSState, max_rms, step, policy, axes)


class ClipByValueState(NamedTuple):
    """State of :func:`clip_by_value`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step, measured with
        the inf-norm (the largest magnitude); ``clip_threshold`` is the largest
        magnitude the bounds allow, ``clip_scale`` the factor applied to the
        largest element.
    """

    clip_stats: ClipStats
    _stats_name = "clip_by_value"


def clip_by_value(
    max_delta: jax.typing.ArrayLike | None = None,
    *,
    min_value: jax.typing.ArrayLike | None = None,
    max_value: jax.typing.ArrayLike | None = None,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Clips every element of the update into ``[-max_delta, max_delta]``.

    .. math::

      g_i \leftarrow \min(\max(g_i, a), b), \qquad (a, b) = (-\delta, \delta)
      \text{ or } (\text{min\_value}, \text{max\_value})

    Give either ``max_delta`` (symmetric) or both ``min_value`` and
    ``max_value`` (asymmetric). Element-wise clipping changes the direction of
    the update; prefer :func:`clip_by_global_norm` unless you need a hard
    bound on every coordinate. Differs from :func:`optax.clip` by the
    asymmetric form, the statistics in its state and the non-finite policy.

    Non-finite policy: with ``"propagate"`` NaN and ``±Inf`` elements pass
    through unchanged (``jnp.clip`` would silently turn ``Inf`` into the
    bound), every finite element is clipped. With ``"zero_update"`` a step
    holding any NaN or Inf becomes all zeros.

    In bf16 and fp16 the bounds are rounded inwards (a bf16 bound of 0.3 is
    0.298828125, not the nearest 0.30078125), so no output lies outside them,
    and a bound beyond the dtype's range is its largest finite value. Traced
    bounds with ``min_value > max_value`` (or a negative ``max_delta``) make
    the update NaN.

    Args:
      max_delta: bound on the magnitude of each element (a scalar >= 0).
      min_value: lower bound of the asymmetric form.
      max_value: upper bound of the asymmetric form (``>= min_value``).
      nonfinite: ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``.
      axis_name: mapped axes over which the update is sharded; only used to
        make the statistics global (the clip itself is element-wise).

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ClipByValueState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.clip_by_value(1.0)
      >>> clipped, _ = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))
      >>> clipped
      Array([-1. ,  0.5,  1. ], dtype=float32)
      >>> tx = optax_clip.clip_by_value(min_value=-0.1, max_value=1.0)
      >>> tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))[0]
      Array([-0.1,  0.5,  1. ], dtype=float32)

    References:
      Mikolov, `Statistical Language Models Based on Neural Networks
      <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012
    """
    symmetric = max_delta is not None
    if symmetric == (min_value is not None or max_value is not None):
        raise ValueError(
            "clip_by_value takes either max_delta, or both min_value and max_value."
        )
    if symmetric:
        valid = _validation.nonnegative("max_delta", max_delta)
    else:
        if min_value is None or max_value is None:
            raise ValueError("clip_by_value needs both min_value and max_value.")
        valid = _validation.all_valid(
            _validation.real("min_value", min_value),
            _validation.real("max_value", max_value),
        )
        if _validation.is_traced((min_value, max_value)):
            valid = valid & (jnp.asarray(min_value) <= jnp.asarray(max_value))
        elif min_value > max_value:
            raise ValueError(
                f"min_value ({min_value}) must be <= max_value ({max_value})."
            )
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)

    def bounds(dtype):
        if symmetric:
            delta = _apply.threshold_array(max_delta, dtype, valid)
            return -delta, delta
        lo = _apply.threshold_array(min_value, dtype, valid)
        return lo, _apply.threshold_array(max_value, dtype, valid)

    def step(updates):
        extremes = _norms.tree_extremes(updates, axes)
        lo, hi = bounds(extremes[0].dtype)
        applied = _apply.apply_elementwise(updates, (lo, hi), extremes, policy)
        return applied, jnp.maximum(-lo, hi)

    lo, hi = bounds(jnp.float32)
    return _fixed_threshold(ClipByValueState, jnp.maximum(-lo, hi), step, policy, axes)


class SoftClipByGlobalNormState(NamedTuple):
    """State of :func:`soft_clip_by_global_norm`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step
        (``is_clipped`` is 1 when the norm was above the knee).
      leaf_pre_clip_norms: ``None``, or with ``leaf_norms=True`` the norm of
        each leaf of the last step's incoming updates: a ``LeafNorms`` whose
        ``values`` is a float32 vector (leaf order) and ``paths`` the leaves'
        paths (read them with :func:`optax_clip.get_stats`).
    """

    clip_stats: ClipStats
    leaf_pre_clip_norms: Any = None
    _stats_name = "soft_clip_by_global_norm"
    _stats_leaf_norms = "leaf_pre_clip_norms"


def soft_clip_factor(knee: Any):
    """The scale function of :func:`soft_clip_by_global_norm` (see its maths)."""

    def factor(norm, max_norm):
        tau = jnp.asarray(knee, norm.dtype) * max_norm
        width = max_norm - tau
        above = ~(norm <= tau)  # a NaN threshold never passes silently
        has_width = width > 0
        safe_width = jnp.where(has_width, width, jnp.ones_like(width))
        excess = jnp.where(above, norm - tau, jnp.zeros_like(norm))
        # Not excess / width: XLA turns a division by a constant (a concrete
        # max_norm) into a product with its reciprocal, which is subnormal
        # (flushed to 0) for a width above about 8.5e37 in float32. Both are
        # first scaled (exactly) by a power of two that depends on the norm.
        e = _norms.exponent(jnp.maximum(norm, safe_width))
        f1, f2 = _norms.pow2_factors(e, norm.dtype)
        u = (excess * f1 * f2) / (safe_width * f1 * f2)
        u = jnp.where(has_width, u, jnp.inf)
        soft = tau + width * -jnp.expm1(-u)  # output norm, in [tau, max_norm)
        one = jnp.ones_like(norm)
        return jnp.where(above, soft, one), jnp.where(above, norm, one), above

    return factor


def soft_clip_by_global_norm(
    max_norm: jax.typing.ArrayLike,
    knee: jax.typing.ArrayLike = 0.5,
    norm_type: _validation.NormType = "l2",
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
    leaf_norms: bool = False,
) -> optax.GradientTransformation:
    r"""Smoothly scales the update so its global norm saturates at ``max_norm``.

    Hard clipping cuts the norm at ``c``: every norm above ``c`` comes out as
    exactly ``c``, and the output norm has a kink there. This "exponential"
    variant leaves norms below the knee ``\tau = k c`` untouched and decays the
    excess above it, so the output norm approaches ``c`` without reaching it:

    .. math::

      f(n) = \begin{cases} n & n \le \tau \\
      \tau + (c - \tau)\left(1 - e^{-(n - \tau)/(c - \tau)}\right) & n > \tau
      \end{cases}, \qquad g \leftarrow g \cdot \frac{f(\lVert g \rVert)}
      {\lVert g \rVert}

    ``f`` is continuous with a continuous first derivative (``f'(\tau) = 1``),
    strictly increasing, ``f(n) \le \min(n, c)``, and ``f(n) \to c`` as
    ``n \to \infty``, so the output norm never exceeds ``max_norm`` and is
    continuous in the input norm. With ``knee=0`` this is
    ``c (1 - e^{-n/c})``; as ``knee`` approaches 1 it becomes hard clipping.
    The direction is always preserved.

    Non-finite policy as in :func:`clip_by_global_norm`.

    Args:
      max_norm: the norm the output saturates at (a scalar >= 0).
      knee: fraction of ``max_norm`` below which the update is untouched, in
        ``[0, 1)`` (default 0.5).
      norm_type: ``"l2"`` (default), ``"l1"`` or ``"inf"``; the numbers ``2``,
        ``1`` and ``float("inf")`` are accepted too (a string is never traced
        by :func:`optax.inject_hyperparams`; a number must be listed in its
        ``static_args``).
      nonfinite: ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``.
      axis_name: mapped axes over which the update is sharded (see
        :func:`clip_by_global_norm`).
      leaf_norms: also keep the norm of each leaf (before clipping) in the
        state, reported by :func:`optax_clip.get_stats` as
        ``"soft_clip_by_global_norm/leaf_norm/<path>"`` (see
        :func:`clip_by_global_norm`). Default ``False``.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`SoftClipByGlobalNormState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.soft_clip_by_global_norm(max_norm=1.0, knee=0.5)
      >>> small, _ = tx.update(jnp.array([0.3, 0.4]), tx.init(None))
      >>> small  # norm 0.5 is at the knee: untouched
      Array([0.3, 0.4], dtype=float32)
      >>> big, state = tx.update(jnp.array([30.0, 40.0]), tx.init(None))
      >>> float(state.clip_stats.post_clip_norm)  # close to, but below, 1
      1.0

    References:
      Pascanu et al., `On the difficulty of training Recurrent Neural Networks
      <https://arxiv.org/abs/1211.5063>`_, 2013 (hard norm clipping, which this
      smooths)
    """
    p, policy, axes = _validation.norm_clip(norm_type, nonfinite, axis_name)
    valid = _validation.all_valid(
        _validation.nonnegative("max_norm", max_norm),
        _validation.in_range("knee", knee, 0.0, 1.0),
    )
    factor = soft_clip_factor(knee)
    per_leaf = _validation.flag("leaf_norms", leaf_norms)
    measure = functools.partial(
        _norms.global_and_leaf_norms, norm_type=p, axis_name=axes, per_leaf=per_leaf
    )

    def step(updates):
        norm, norms = measure(updates)
        threshold = _apply.threshold_array(max_norm, norm.dtype, valid)
        applied = _apply.apply_global(updates, norm, threshold, policy, factor)
        return (applied, threshold) + ((norms,) if per_leaf else ())

    return _fixed_threshold(
        SoftClipByGlobalNormState, max_norm, step, policy, axes, per_leaf
    )
