"""Clipping relative to the parameters: adaptive gradient clipping (AGC).

Each unit of a gradient (one output neuron's fan-in, a bias vector) is clipped
to a multiple of its parameters' norm, unit by unit, through the shared
pipeline: unit norms from ``_norms`` (float32 accumulation, overflow-safe),
the limits decided from the parameters, the scale applied by ``_apply``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_clip import _apply, _fail_fast, _norms, _validation
from optax_clip._stats import ClipStats, init_clip_stats

_F32 = jnp.float32
_I32 = jnp.int32


class AdaptiveGradClipState(NamedTuple):
    """State of :func:`adaptive_grad_clip`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step; the norms are
        global, ``clip_scale`` is the smallest unit scale, and
        ``clip_threshold`` is the 2-norm of the unit thresholds (the largest
        global norm the output can have).
      clipped_units: number of units clipped on the last step (int32).
    """

    clip_stats: ClipStats
    clipped_units: jax.Array
    _stats_name = "adaptive_grad_clip"
    _stats_fields = ("clipped_units",)


def _unit_axes(
    shape: tuple[int, ...],
    axis: tuple[int, ...] | None,
    name: str = "adaptive_grad_clip",
):
    """Reduction axes of one unit (the NFNets / optax conventions)."""
    ndim = len(shape)
    if axis is not None:
        if any(not -ndim <= a < ndim for a in axis):
            raise ValueError(
                f"{name}: axis {axis} is out of bounds for a "
                f"parameter of shape {shape}."
            )
        axes = tuple(sorted({a % ndim for a in axis}))
        if len(axes) != len(axis):
            raise ValueError(f"{name}: repeated axis in {axis}.")
        return axes
    if ndim == 0:
        return ()
    if sum(d != 1 for d in shape) <= 1:  # scalars and (squeezed) vectors
        return tuple(range(ndim))
    if ndim in (2, 3):  # linear (in, out) and multi-head linear kernels
        return (0,)
    if ndim == 4:  # conv kernels HWIO
        return (0, 1, 2)
    if ndim == 5:  # conv3d kernels DHWIO
        return (0, 1, 2, 3)
    raise ValueError(
        f"{name}: no default unit for a parameter of shape {shape}; "
        "pass axis= (the axes one unit's norm is taken over)."
    )


def _agc_decide(g_norms, p_norms, clipping, eps, valid):
    """Each unit's limit ``clipping * max(|W_i|, eps)`` and its non-finite flag.

    A unit whose parameters hold a NaN or Inf is flagged like one whose
    gradient does: the model is already corrupt, and the step says so.
    """
    limits, bad = [], []
    for gn, pn in zip(g_norms, p_norms, strict=True):
        floor = jnp.maximum(pn.astype(gn.dtype), jnp.asarray(eps, gn.dtype))
        # lambda * 0 is 0, also for lambda = inf.
        limit = jnp.where(floor > 0, jnp.asarray(clipping, gn.dtype) * floor, 0)
        limits.append(_validation.nan_unless(valid, limit))
        bad.append(~jnp.isfinite(gn) | ~jnp.isfinite(pn))
    return limits, bad


def adaptive_grad_clip(
    clipping: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
) -> optax.GradientTransformation:
    r"""Clips each unit's gradient relative to the unit's parameter norm (AGC).

    For every unit :math:`i` (one output neuron: a column of an ``(in, out)``
    kernel, one output channel of a conv kernel, a whole bias vector):

    .. math::

      G_i \leftarrow G_i \cdot \min\left(1,
      \frac{\lambda \max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert}\right)

    Units follow the NFNets and :func:`optax.adaptive_grad_clip` conventions:
    scalars and vectors (also ``(1, n)``-shaped) form one unit; 2-D and 3-D
    arrays reduce over axis 0; 4-D (HWIO) over ``(0, 1, 2)``; 5-D (DHWIO) over
    ``(0, 1, 2, 3)``. Other ranks need ``axis``. The paper does not clip the
    final classifier layer: exclude it with :func:`optax.masked`.

    Differences from :func:`optax.adaptive_grad_clip`:

    * unit norms are accumulated in float32 and never overflow: a gradient of
      1e20 (or 300 in fp16) is scaled down in its direction, where optax's
      norm is ``inf`` and the unit becomes zero; the unit norms of bf16
      gradients are not rounded to bf16;
    * below the threshold the update is returned exactly, and the gradient of
      the output with respect to the input is finite at zero;
    * the non-finite policy (``"propagate"``: a unit holding a NaN/Inf becomes
      NaN, the others are clipped normally; ``"zero_update"``: the whole step
      becomes zeros) and the statistics in the state;
    * a clear ``ValueError`` when ``params`` is missing or is not shaped like
      the updates, or when ``axis`` is out of bounds for a leaf (it is never
      wrapped around);
    * a unit whose *parameters* hold a NaN or Inf is handled like a unit whose
      gradient does (the model is already corrupt, and the step is flagged in
      ``is_nonfinite``); ``clipping=inf`` never clips.

    Under ``pmap``/``shard_map`` the unit norms are those of the local shard;
    use ``jit`` with sharded arrays for global ones.

    Args:
      clipping: :math:`\lambda`, the largest ratio of unit gradient norm to
        unit parameter norm (>= 0; the NFNets default is 0.01 at batch size
        4096; larger batches need smaller values).
      eps: :math:`\epsilon`, the smallest parameter norm used, so that
        zero-initialised parameters can move (>= 0; default 1e-3).
      axis: axis or axes one unit's norm is taken over, for every leaf (a
        static argument; default: the conventions above).
      nonfinite: ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``.

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`AdaptiveGradClipState`. Its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.adaptive_grad_clip(0.5)
      >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]])}  # unit norms 5, 1
      >>> grads = {"w": jnp.array([[1.0, 1.0], [0.0, 0.0]])}
      >>> out, state = tx.update(grads, tx.init(params), params)
      >>> out["w"]  # column 0 may reach 2.5 (untouched), column 1 only 0.5
      Array([[1. , 0.5],
             [0. , 0. ]], dtype=float32)
      >>> int(state.clipped_units)
      1

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
    """
    valid = _validation.all_valid(
        _validation.nonnegative("clipping", clipping),
        _validation.nonnegative("eps", eps),
    )
    if axis is not None:
        if _validation.is_traced(axis):
            raise TypeError(
                "axis must be static; with optax.inject_hyperparams pass "
                "static_args=('axis',)."
            )
        axis = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}.")
    policy = _validation.policy(nonfinite)

    def init_fn(params):
        del params
        return AdaptiveGradClipState(init_clip_stats(math.inf), jnp.zeros((), _I32))

    def update_fn(updates, state, params=None):
        g_leaves = jax.tree.leaves(updates)
        p_leaves = _validation.matching_params("adaptive_grad_clip", updates, params)
        _validation.float_leaves(updates)
        if not g_leaves:
            zero = jnp.zeros((), _F32)
            applied = _apply.Applied(updates, zero, zero, zero + 1, zero > 0, zero > 0)
            return updates, AdaptiveGradClipState(
                _apply.record(state.clip_stats, applied, zero), jnp.zeros((), _I32)
            )
        unit_axes = [_unit_axes(jnp.shape(g), axis) for g in g_leaves]
        norms = _norms.unit_norms(g_leaves + p_leaves, unit_axes * 2)
        g_norms, p_norms = norms[: len(g_leaves)], norms[len(g_leaves) :]
        limits, bad = _agc_decide(g_norms, p_norms, clipping, eps, valid)
        applied, clipped = _apply.apply_per_unit(updates, g_norms, limits, bad, policy)
        shown = _norms.norm_of_arrays(limits, 2.0)
        stats = _apply.record(state.clip_stats, applied, shown)
        return applied.updates, AdaptiveGradClipState(stats, clipped)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, "adaptive_grad_clip")


def _static_axis(name: str, axis) -> tuple[int, ...] | None:
    """``axis`` as a tuple of ints (or None); raises for anything else."""
    if axis is None:
        return None
    if _validation.is_traced(axis):
        raise TypeError(f"{name}: axis must be static (Python ints).")
    axis = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
        raise TypeError(
            f"{name}: axis must be an int or a tuple of ints, got {axis!r}."
        )
    return axis


def unitwise_norm(
    x: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    *,
    keepdims: bool = False,
) -> jax.Array:
    r"""The 2-norm of each unit of ``x``, as AGC measures it, without overflow.

    A unit is a slice of ``x`` over ``axis``; by default (as in
    :func:`optax.transforms.unitwise_norm` and :func:`adaptive_grad_clip`) scalars and
    vectors (also ``(1, n)``-shaped) are one unit, 2-D and 3-D arrays reduce
    over axis 0, 4-D (HWIO) over ``(0, 1, 2)`` and 5-D (DHWIO) over
    ``(0, 1, 2, 3)``:

    .. math::

      \lVert x_u \rVert_2 = \Big(\sum_{i \in u} |x_i|^2\Big)^{1/2}

    Differences from :func:`optax.transforms.unitwise_norm`: the sums are accumulated in
    float32 (float64 for float64 input) and returned in that dtype, never in
    bf16 or fp16; they never overflow (a unit holding 1e20 in float32 has norm
    1e20, where optax's is ``inf``); the norm of a zero unit is 0 with a finite
    gradient; an ``axis`` out of bounds raises instead of wrapping around.

    Args:
      x: an array (floating-point or complex).
      axis: axis or axes one unit spans (static); default: the conventions
        above (other ranks need it).
      keepdims: ``False`` (default, as optax): the norms broadcast to
        ``x.shape``; ``True``: the compact form, size 1 along ``axis``.

    Returns:
      The unit norms (float32, or float64 for float64 input).

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> w = jnp.array([[3.0, 1e20], [4.0, 0.0]])  # an (in, out) kernel
      >>> optax_clip.unitwise_norm(w)  # one norm per column; optax: 5, inf
      Array([[5.e+00, 1.e+20],
             [5.e+00, 1.e+20]], dtype=float32)
      >>> optax_clip.unitwise_norm(w, keepdims=True).shape
      (1, 2)

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
    """
    x = jnp.asarray(x)
    _validation.float_leaves(x)
    keepdims = _validation.flag("keepdims", keepdims)
    axes = _unit_axes(x.shape, _static_axis("unitwise_norm", axis), "unitwise_norm")
    (norm,) = _norms.unit_norms([x], [axes])
    return norm if keepdims else jnp.broadcast_to(norm, x.shape)


def unitwise_clip(
    g_norm: jax.typing.ArrayLike,
    max_norm: jax.typing.ArrayLike,
    grad: jax.typing.ArrayLike,
) -> jax.Array:
    r"""Scales each unit of ``grad`` to norm at most ``max_norm``.

    .. math::

      g_u \leftarrow g_u \cdot \min\left(1,
      \frac{m_u}{\lVert g_u \rVert}\right)

    with ``g_norm`` the units' norms (from :func:`unitwise_norm`, either
    form) and ``max_norm`` their limits (e.g. ``clipping * max(param norm,
    eps)`` for AGC), both broadcast to ``grad``'s shape. The same result as
    :func:`optax.transforms.unitwise_clip` on ordinary inputs, with these differences:
    where ``g_norm <= max_norm`` the unit is returned exactly (optax keeps it
    only where ``<``); the scale is divided only where it clips, so no
    ``div_eps`` is needed and the value and its gradient are finite at zero;
    a scale below float32's normal range (a norm of 1e30 clipped to 1e-10) is
    not flushed to zero; bf16 and fp16 units are scaled in float32 and rounded
    toward zero, so a clipped unit stays within its limit. A NaN norm or limit
    makes its unit NaN.

    Args:
      g_norm: the unit norms of ``grad`` (broadcastable to its shape).
      max_norm: the limits (>= 0; broadcastable to ``grad``'s shape). A
        concrete negative or NaN limit raises.
      grad: the gradient (floating-point).

    Returns:
      ``grad`` with each unit clipped, in ``grad``'s dtype.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> g = jnp.array([[3.0, 0.3], [4.0, 0.4]])
      >>> n = optax_clip.unitwise_norm(g, keepdims=True)  # [[5, 0.5]]
      >>> optax_clip.unitwise_clip(n, 1.0, g)  # column 0 to norm 1
      Array([[0.6, 0.3],
             [0.8, 0.4]], dtype=float32)

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
    """
    grad = jnp.asarray(grad)
    _validation.float_leaves(grad)
    if not _validation.is_traced(max_norm):
        m = np.asarray(max_norm, np.float64)
        if np.any(np.isnan(m)) or np.any(m < 0):
            raise ValueError("unitwise_clip: max_norm must be >= 0 and not NaN.")
    shapes = (jnp.shape(g_norm), jnp.shape(max_norm))
    for what, shape in zip(("g_norm", "max_norm"), shapes, strict=True):
        try:
            target = jnp.broadcast_shapes(shape, grad.shape)
        except ValueError:
            target = None
        if target != grad.shape:
            raise ValueError(
                f"unitwise_clip: {what} of shape {shape} does not broadcast to "
                f"grad's shape {grad.shape}."
            )
    norm = jnp.asarray(g_norm)
    norm = norm.astype(jnp.promote_types(norm.dtype, jnp.float32))
    shape = jnp.broadcast_shapes(norm.shape, jnp.shape(max_norm))
    norm = jnp.broadcast_to(norm, shape)
    limit = jnp.broadcast_to(jnp.asarray(max_norm, norm.dtype), shape)
    num, den, _ = _apply.clip_factor(norm, limit)
    return _apply.scale_leaf(grad, _apply.make_scale(num, den))
