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


def _unit_axes(shape: tuple[int, ...], axis: tuple[int, ...] | None):
    """Reduction axes of one unit (the NFNets / optax conventions)."""
    ndim = len(shape)
    if axis is not None:
        if any(not -ndim <= a < ndim for a in axis):
            raise ValueError(
                f"adaptive_grad_clip: axis {axis} is out of bounds for a "
                f"parameter of shape {shape}."
            )
        axes = tuple(sorted({a % ndim for a in axis}))
        if len(axes) != len(axis):
            raise ValueError(f"adaptive_grad_clip: repeated axis in {axis}.")
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
        f"adaptive_grad_clip: no default unit for a parameter of shape {shape}; "
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
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs the parameters: call "
                "tx.update(updates, state, params)."
            )
        g_leaves, g_def = jax.tree.flatten(updates)
        p_leaves, p_def = jax.tree.flatten(params)
        if g_def != p_def:
            raise ValueError(
                "adaptive_grad_clip: params must have the same tree structure as "
                f"the updates; got updates {g_def} and params {p_def}."
            )
        for g, p in zip(g_leaves, p_leaves, strict=True):
            if jnp.shape(g) != jnp.shape(p):
                raise ValueError(
                    "adaptive_grad_clip: each parameter must have the shape of its "
                    f"update; got {jnp.shape(p)} for an update of {jnp.shape(g)}."
                )
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
