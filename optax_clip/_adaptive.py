"""Clipping with thresholds derived from the training run itself.

AutoClip (a percentile of recent norms), ZClip (an EMA z-score), AdaGC (a
per-tensor EMA), and :func:`suggest_max_norm` to pick a fixed threshold from
recorded norms. (AGC, relative to the parameters' norms, is in ``_agc``.)

Every transform is built on the shared pipeline: norms from ``_norms``
(float32 accumulation, overflow-safe), a pure decide function per method
(state and norms in, thresholds and next state out), the scale applied by
``_apply`` under the non-finite policy, and the statistics
recorded in a :class:`optax_clip.ClipStats`. States are fixed-shape arrays, so
they are checkpointable and can be the carry of :func:`jax.lax.scan`. A step
whose updates hold a NaN or Inf never changes the adaptive statistics, nor
does a step whose traced hyper-parameters (``optax.inject_hyperparams`` under
``jit``) are out of range: its update is NaN instead.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_clip import _apply, _fail_fast, _norms, _validation
from optax_clip._stats import ClipStats, count_if, init_clip_stats

_F32 = jnp.float32
_I32 = jnp.int32


def _recorded(applied, next_state, state, level, valid, finite):
    """The record step of an adaptive transform: ``(updates, next state)``.

    The threshold recorded is ``level``; the previous one on a step that does
    not count, and NaN on a step whose traced hyper-parameters are out of
    range.
    """
    previous = state.clip_stats.clip_threshold
    reported = _validation.nan_unless(valid, jnp.where(finite, level, previous))
    stats = _apply.record(state.clip_stats, applied, reported)
    return applied.updates, next_state._replace(clip_stats=stats)


# --------------------------------------------------------------------------
# AutoClip
# --------------------------------------------------------------------------


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step;
        ``clip_threshold`` is the percentile in force (capped by ``max_norm``).
      norm_history: ring buffer (float32, length ``history``) of the pre-clip
        norms of the last finite steps; only the first ``history_len`` slots
        are meaningful until it has filled.
      history_pos: slot the next norm is written to (int32).
      history_len: number of norms in the buffer (int32, at most ``history``).
      norm_rank: percentile rank (0 to 100) of the last step's norm among the
        norms in the buffer, itself included (float32).
    """

    clip_stats: ClipStats
    norm_history: jax.Array
    history_pos: jax.Array
    history_len: jax.Array
    norm_rank: jax.Array
    _stats_name = "autoclip"
    _stats_fields = ("history_len", "norm_rank")


def _linear_percentile(values: jax.Array, count: jax.Array, q: jax.Array):
    """``numpy.percentile(values[:count], q)`` (linear method) of a padded buffer.

    ``values`` holds ``count`` meaningful entries in its first slots; the others
    are ignored. ``count`` >= 1.
    """
    size = values.shape[0]
    valid = jnp.arange(size) < count
    ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
    last = count - 1
    # position = last * q / 100, with its fractional part computed from the
    # product last * q (exact in float32 for integer-valued percentiles): a
    # rounded position would be amplified by a large gap between neighbours.
    scaled = last.astype(values.dtype) * jnp.asarray(q, values.dtype)
    lower = jnp.clip(jnp.floor(scaled / 100), 0, last.astype(values.dtype))
    frac = jnp.clip((scaled - 100 * lower) / 100, 0, 1)
    lo = jnp.clip(lower.astype(_I32), 0, last)
    hi = jnp.minimum(lo + 1, last)
    a, b = ordered[lo], ordered[hi]
    return a + (b - a) * frac


def _autoclip_decide(state: AutoClipState, norm, finite, percentile, cap):
    """The AutoClip threshold of a step, and the next history (pure).

    Args:
      state: the transform's state before the step.
      norm: the step's pre-clip norm (any float dtype).
      finite: whether the step counts (a finite norm, valid hyper-parameters);
        a step that does not count leaves the history as it was.
      percentile: the percentile (0 to 100) of the history to clip to.
      cap: the upper bound of the threshold (float32).

    Returns:
      ``(threshold, level, next_state)``: the threshold to clip to (in the
      norm's dtype: a norm equal to the level is never clipped), the capped
      percentile (float32) and the state with the next history (its
      ``clip_stats`` unchanged).
    """
    size = state.norm_history.shape[0]
    finite = jnp.asarray(finite, bool)
    n32 = jnp.where(finite, norm, 0).astype(_F32)
    buf = state.norm_history.at[state.history_pos].set(n32)
    count = jnp.minimum(state.history_len + 1, size)
    level = jnp.minimum(_linear_percentile(buf, count, percentile), cap)
    # Compared in float32 (the history's dtype), also for float64 gradients.
    threshold = jnp.where(n32 <= level, jnp.maximum(norm, level), level)
    below = jnp.sum(((jnp.arange(size) < count) & (buf <= n32)).astype(_F32))
    next_state = state._replace(
        norm_history=jnp.where(finite, buf, state.norm_history),
        history_pos=jnp.where(
            finite, (state.history_pos + 1) % size, state.history_pos
        ).astype(_I32),
        history_len=jnp.where(finite, count, state.history_len).astype(_I32),
        norm_rank=jnp.where(finite, 100.0 * below / count, 100.0).astype(_F32),
    )
    return threshold.astype(norm.dtype), level, next_state


def autoclip(
    percentile: jax.typing.ArrayLike = 10.0,
    history: int = 1000,
    max_norm: jax.typing.ArrayLike = math.inf,
    norm_type: _validation.NormType = "l2",
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Clips to a percentile of the recent global norms (AutoClip).

    Every step the pre-clip global norm :math:`n_t` is appended to a history
    of the last ``history`` norms (a fixed-size ring buffer kept in the state),
    and the update is clipped to the ``percentile``-th percentile of that
    history, current step included:

    .. math::

      c_t = \min\big(\operatorname{percentile}_p(n_{t-H+1}, \dots, n_t),\;
      \text{max\_norm}\big), \qquad
      g \leftarrow g \cdot \min\left(1, \frac{c_t}{n_t}\right)

    The percentile uses linear interpolation (``numpy.percentile``'s default).
    **Before the buffer fills** (the first ``history`` steps) the percentile is
    taken over the norms seen so far, exactly as the original unbounded-history
    AutoClip does; in particular the first step is never clipped (its threshold
    is its own norm) unless ``max_norm`` is lower. Steps whose norm is NaN or
    Inf are handled by the non-finite policy and never enter the history.

    Differences from the reference PyTorch code: the history is bounded
    (``history`` norms; the paper keeps all of them, the authors' packaged
    ``QuantileClip`` keeps 1000), it runs under ``jit`` without host syncs, the
    norm is our overflow-safe float32 norm, and ``max_norm`` optionally caps
    the threshold (default: no cap, as in the paper).

    Args:
      percentile: percentile of the history to clip to, in ``[0, 100]``
        (default 10, the value the paper recommends; lower clips harder).
      history: number of recent norms kept (fixes the state's shape: with
        :func:`optax.inject_hyperparams`, list it in ``static_args``).
      max_norm: optional upper bound on the threshold (default ``inf``).
      norm_type: ``"l2"`` (default), ``"l1"`` or ``"inf"``.
      nonfinite: ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``; see
        :func:`optax_clip.clip_by_global_norm`.
      axis_name: mapped axes over which the update is sharded (see
        :func:`optax_clip.clip_by_global_norm`).

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`AutoClipState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.autoclip(percentile=50.0, history=4)
      >>> update, state = jax.jit(tx.update), tx.init(None)
      >>> for norm in [1.0, 3.0, 2.0, 10.0]:
      ...     out, state = update(jnp.array([norm]), state)
      >>> out  # clipped to the median of [1, 3, 2, 10]
      Array([2.5], dtype=float32)
      >>> int(state.history_len), float(state.norm_rank)
      (4, 100.0)

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
    """
    p = _validation.norm_type(norm_type)
    valid = _validation.all_valid(
        _validation.in_range("percentile", percentile, 0.0, 100.0, closed_high=True),
        _validation.nonnegative("max_norm", max_norm),
    )
    size = _validation.static_int("history", history, minimum=1)
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)

    def init_fn(params):
        del params
        return AutoClipState(
            clip_stats=init_clip_stats(max_norm),
            norm_history=jnp.zeros((size,), _F32),
            history_pos=jnp.zeros((), _I32),
            history_len=jnp.zeros((), _I32),
            norm_rank=jnp.zeros((), _F32),
        )

    def update_fn(updates, state, params=None):
        del params
        norm = _norms.global_norm(updates, p, axes)
        # A step with an out-of-range traced hyper-parameter is NaN and, like
        # a non-finite one, leaves the history alone.
        finite = jnp.isfinite(norm) & valid
        cap = _apply.threshold_array(max_norm, _F32)
        threshold, level, next_state = _autoclip_decide(
            state, norm, finite, percentile, cap
        )
        threshold = _validation.nan_unless(valid, threshold)
        applied = _apply.apply_global(updates, norm, threshold, policy)
        return _recorded(applied, next_state, state, level, valid, finite)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, "autoclip", axes)


# --------------------------------------------------------------------------
# ZClip
# --------------------------------------------------------------------------


class ZClipState(NamedTuple):
    """State of :func:`zclip`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step;
        ``clip_threshold`` is the norm above which a step counts as a spike
        and is clipped (``max_norm`` during warm-up). A spike is clipped *to*
        a lower value in the ``"zscore"`` mode: see ``post_clip_norm``.
      norm_mean: EMA of the (clipped) norm; during warm-up, the running mean
        of the warm-up norms (float32).
      norm_var: EMA of the squared deviation of the (clipped) norm; during
        warm-up, the running population variance (float32).
      norm_zscore: z-score of the last step's norm (0 during warm-up).
      norms_seen: number of finite steps seen (int32, saturating).
    """

    clip_stats: ClipStats
    norm_mean: jax.Array
    norm_var: jax.Array
    norm_zscore: jax.Array
    norms_seen: jax.Array
    _stats_name = "zclip"
    _stats_fields = ("norm_mean", "norm_std", "norm_zscore", "norms_seen")

    @property
    def norm_std(self) -> jax.Array:
        """Standard deviation of the norm (square root of ``norm_var``)."""
        return jnp.sqrt(jnp.maximum(self.norm_var, 0))


class _ZClipParams(NamedTuple):
    """ZClip's hyper-parameters that may be traced, as arrays."""

    alpha: jax.Array
    z_thresh: jax.Array
    clip_factor: jax.Array
    eps: jax.Array
    warmup_steps: jax.Array
    cap: jax.Array  # max_norm


class _ZClipConfig(NamedTuple):
    """ZClip's static choices."""

    mode: str
    clip_option: str
    freeze_ema_on_spike: bool


def _zclip_decide(state: ZClipState, norm, finite, hp: _ZClipParams, config):
    """The ZClip threshold of a step, and the next EMAs (pure).

    Args:
      state: the transform's state before the step.
      norm: the step's pre-clip norm.
      finite: whether the step counts (a finite norm, valid hyper-parameters);
        a step that does not count leaves the statistics as they were.
      hp: the hyper-parameters.
      config: the static choices.

    Returns:
      ``(threshold, level, next_state)`` (float32): the threshold to clip to,
      the spike level (``cap`` during warm-up) and the state with the next
      statistics (its ``clip_stats`` unchanged).
    """
    finite = jnp.asarray(finite, bool)
    n = jnp.where(finite, norm, 0).astype(_F32)
    mean, var = state.norm_mean, state.norm_var
    warm = state.norms_seen < jnp.maximum(hp.warmup_steps, 1)
    std = jnp.sqrt(jnp.maximum(var, 0))
    z = (n - mean) / (std + hp.eps)
    zt = hp.z_thresh
    if config.mode == "zscore":
        spike = ~warm & (z > zt)
        level = mean + zt * (std + hp.eps)
        if config.clip_option == "adaptive_scaling":
            z_safe = jnp.where(spike, z, 1.0)
            target = (mean + zt * std / (z_safe / zt)) * hp.clip_factor
        else:
            target = mean
    else:
        level = mean + zt * std
        spike = ~warm & (n > level)
        target = level
    threshold = jnp.maximum(jnp.where(spike, jnp.minimum(target, hp.cap), hp.cap), 0)
    reported = jnp.where(warm, hp.cap, jnp.minimum(level, hp.cap))

    # Welford during warm-up; afterwards EMAs of the clipped norm.
    k = (state.norms_seen + 1).astype(_F32)
    delta = n - mean
    w_mean = mean + delta / k
    w_var = var + (delta * (n - w_mean) - var) / k
    fed = jnp.where(spike, target, n)
    e_mean = hp.alpha * mean + (1 - hp.alpha) * fed
    e_var = hp.alpha * var + (1 - hp.alpha) * (fed - e_mean) ** 2
    keep = ~finite | (spike & config.freeze_ema_on_spike)
    next_state = state._replace(
        norm_mean=jnp.where(keep, mean, jnp.where(warm, w_mean, e_mean)).astype(_F32),
        norm_var=jnp.where(keep, var, jnp.where(warm, w_var, e_var)).astype(_F32),
        norm_zscore=jnp.where(warm | ~finite, 0.0, z).astype(_F32),
        norms_seen=count_if(state.norms_seen, finite),
    )
    return threshold, reported, next_state


def zclip(
    alpha: jax.typing.ArrayLike = 0.97,
    z_thresh: jax.typing.ArrayLike = 2.5,
    warmup_steps: jax.typing.ArrayLike = 25,
    max_norm: jax.typing.ArrayLike = math.inf,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: jax.typing.ArrayLike = 1.0,
    eps: jax.typing.ArrayLike = 1e-6,
    *,
    freeze_ema_on_spike: bool = False,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Clips norm spikes detected by a z-score against an EMA (ZClip).

    **Warm-up.** For the first ``warmup_steps`` (finite) steps the update is
    only clipped to ``max_norm``; then the mean :math:`\mu` and population
    variance :math:`\sigma^2` of those norms start the EMAs.

    **Each later step**, with pre-clip norm :math:`n`:

    .. math::

      z = \frac{n - \mu}{\sigma + \epsilon}, \qquad
      c = \begin{cases}
        \left(\mu + \dfrac{z_{\text{thresh}}^2\,\sigma}{z}\right)
          \cdot \text{clip\_factor}
          & \text{mode="zscore", clip\_option="adaptive\_scaling"} \\
        \mu & \text{mode="zscore", clip\_option="mean"} \\
        \mu + z_{\text{thresh}}\,\sigma & \text{mode="percentile"}
      \end{cases}

    A spike is :math:`z > z_{\text{thresh}}` (``"zscore"``) or
    :math:`n > \mu + z_{\text{thresh}}\sigma` (``"percentile"``). A spike is
    clipped to :math:`\min(c, \text{max\_norm})`, any other step to
    ``max_norm``. Adaptive scaling clips harder the larger the spike
    (:math:`\mu + z_{\text{thresh}}\sigma / (z / z_{\text{thresh}})`). The EMAs
    are then updated with the *clipped* value :math:`n' = c` on a spike and
    :math:`n' = n` otherwise (not capped by ``max_norm``, as in the reference):

    .. math::

      \mu \leftarrow \alpha\mu + (1 - \alpha)\,n', \qquad
      \sigma^2 \leftarrow \alpha\sigma^2 + (1 - \alpha)\,(n' - \mu)^2

    where the variance uses the freshly updated :math:`\mu`, as the reference
    code does. With ``freeze_ema_on_spike=True`` the EMAs skip spikes (the
    reference's ``skip_update_on_spike``). Steps with a NaN or Inf norm are
    handled by the non-finite policy and never touch the EMAs.

    Defaults follow the paper's reference implementation (``alpha=0.97``,
    ``z_thresh=2.5``, ``warmup_steps=25``, ``eps=1e-6``, zscore mode with
    adaptive scaling). Its constructor caps the threshold at
    ``max_grad_norm=1.0`` while its README documents no cap; we default to no
    cap (``max_norm=inf``), since a fixed cap of 1.0 makes ZClip a fixed clip
    whenever the natural norm is above 1. The reference clips with
    ``c / (n + 1e-6)``; we use the exact ``c / n``.

    Args:
      alpha: EMA smoothing factor, in ``[0, 1)`` (default 0.97).
      z_thresh: z-score above which a norm is a spike (> 0; default 2.5).
      warmup_steps: number of steps used to start the EMAs (an integer >= 1;
        default 25). May be traced by :func:`optax.inject_hyperparams`.
      max_norm: fixed upper bound on the threshold, also used during warm-up
        (default ``inf``: no bound).
      mode: ``"zscore"`` (default) or ``"percentile"``.
      clip_option: with ``mode="zscore"``: ``"adaptive_scaling"`` (default) or
        ``"mean"`` (clip spikes to the EMA mean).
      clip_factor: multiplier of the adaptive-scaling threshold (> 0; the
        reference suggests 0.3 to 0.7 for more aggressive clipping).
      eps: added to :math:`\sigma` in the z-score (>= 0).
      freeze_ema_on_spike: do not update the EMAs on spikes.
      nonfinite: ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``; see
        :func:`optax_clip.clip_by_global_norm`.
      axis_name: mapped axes over which the update is sharded (see
        :func:`optax_clip.clip_by_global_norm`).

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ZClipState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.zclip(warmup_steps=4)
      >>> update, state = jax.jit(tx.update), tx.init(None)
      >>> for norm in [1.0, 1.2, 0.8, 1.0, 1.1]:  # warm-up, then a normal step
      ...     out, state = update(jnp.array([norm]), state)
      >>> out, int(state.clip_stats.is_clipped)
      (Array([1.1], dtype=float32), 0)
      >>> out, state = update(jnp.array([50.0]), state)  # a spike
      >>> float(state.norm_zscore) > 2.5, float(out[0]) < 2.0
      (True, True)

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025
    """
    valid = _validation.all_valid(
        _validation.in_range("alpha", alpha, 0.0, 1.0),
        _validation.positive("z_thresh", z_thresh),
        _validation.count("warmup_steps", warmup_steps, minimum=1),
        _validation.nonnegative("max_norm", max_norm),
        _validation.positive("clip_factor", clip_factor),
        _validation.nonnegative("eps", eps),
    )
    mode = _validation.choice("mode", mode, ("zscore", "percentile"))
    clip_option = _validation.choice(
        "clip_option", clip_option, ("adaptive_scaling", "mean")
    )
    freeze_ema_on_spike = _validation.flag("freeze_ema_on_spike", freeze_ema_on_spike)
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)

    def init_fn(params):
        del params
        zero = jnp.zeros((), _F32)
        return ZClipState(
            clip_stats=init_clip_stats(max_norm),
            norm_mean=zero,
            norm_var=zero,
            norm_zscore=zero,
            norms_seen=jnp.zeros((), _I32),
        )

    config = _ZClipConfig(mode, clip_option, freeze_ema_on_spike)

    def update_fn(updates, state, params=None):
        del params
        norm = _norms.global_norm(updates, 2.0, axes)
        # An out-of-range traced hyper-parameter: a NaN step, EMAs untouched.
        finite = jnp.isfinite(norm) & valid
        hp = _ZClipParams(
            *(jnp.asarray(v, _F32) for v in (alpha, z_thresh, clip_factor, eps)),
            warmup_steps=jnp.asarray(warmup_steps, _I32),
            cap=_apply.threshold_array(max_norm, _F32, valid),
        )
        threshold, level, next_state = _zclip_decide(state, norm, finite, hp, config)
        applied = _apply.apply_global(
            updates, norm, threshold.astype(norm.dtype), policy
        )
        return _recorded(applied, next_state, state, level, valid, finite)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, "zclip", axes)


# --------------------------------------------------------------------------
# AdaGC
# --------------------------------------------------------------------------


class AdaGCState(NamedTuple):
    """State of :func:`adagc`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step; the norms are
        global, ``clip_scale`` is the smallest tensor scale, and
        ``clip_threshold`` is ``max_norm`` during warm-up and afterwards the
        2-norm of the per-tensor thresholds (the largest global norm the
        output can have).
      tensor_norm_ema: per-tensor reference norms (the EMA gamma of the
        clipped norms), one float32 vector with an entry per leaf of the
        parameters, in ``jax.tree.leaves`` order (one array rather than a
        pytree of scalars: per-leaf state costs one tiny kernel and one
        buffer per leaf every step). :meth:`reference_norms` gives it back
        as a pytree shaped like the parameters.
      adagc_steps: number of finite steps seen (int32, saturating).
      clipped_tensors: number of tensors clipped on the last step (int32).
    """

    clip_stats: ClipStats
    tensor_norm_ema: Any
    adagc_steps: jax.Array
    clipped_tensors: jax.Array
    _stats_name = "adagc"
    _stats_fields = ("adagc_steps", "clipped_tensors")

    def reference_norms(self, params: Any) -> Any:
        """``tensor_norm_ema`` as a pytree with the structure of ``params``."""
        leaves, treedef = jax.tree.flatten(params)
        if len(leaves) != self.tensor_norm_ema.shape[-1]:
            raise ValueError(
                f"reference_norms: params have {len(leaves)} leaves, the state "
                f"has {self.tensor_norm_ema.shape[-1]} reference norms."
            )
        return jax.tree.unflatten(
            treedef, [self.tensor_norm_ema[..., i] for i in range(len(leaves))]
        )


class _AdaGCParams(NamedTuple):
    """AdaGC's hyper-parameters that may be traced, as arrays."""

    cap: jax.Array  # max_norm, the warm-up's global threshold
    clip_ratio: jax.Array
    beta: jax.Array
    warmup_steps: jax.Array
    # The largest factor a reference may fall by in one warm-up step (None:
    # unbounded, the authors' rule).
    warmup_max_drop: jax.Array | None = None


def _adagc_decide(state: AdaGCState, n, gnorm, finite, hp: _AdaGCParams):
    """The AdaGC threshold of every tensor, and the next EMAs (pure).

    Works on vectors (one entry per tensor): per-leaf scalar arithmetic would
    be several tiny kernels per leaf.

    Args:
      state: the transform's state before the step.
      n: the tensors' norms (float32 vector, leaf order).
      gnorm: their global norm.
      finite: whether the step counts (finite norms, valid hyper-parameters);
        a step that does not count leaves the EMAs as they were.
      hp: the hyper-parameters.

    Returns:
      ``(thresholds, level, next_state)``: each tensor's threshold, the
      threshold to report (``cap`` during warm-up, else the 2-norm of the
      thresholds) and the state with the next EMAs (``clip_stats`` unchanged).
    """
    gammas, steps = state.tensor_norm_ema, state.adagc_steps
    finite = jnp.asarray(finite, bool)
    warm = steps < hp.warmup_steps
    first = steps == 0
    num, den, _ = _apply.clip_factor(gnorm, hp.cap)
    # n * min(1, cap / gnorm), the warm-up's global clip of each tensor's
    # norm, computed so that a tiny global scale does not underflow.
    warm_norms = _apply.divide_by_scalar(n, den) * num
    ref = jnp.where(first, n, gammas)  # warmup_steps=0: start from the norm
    local = hp.clip_ratio * ref
    thresholds = jnp.where(warm, warm_norms, local)
    lower = warm_norms
    if hp.warmup_max_drop is not None:  # a spike shrinks gamma by this at most
        lower = jnp.maximum(warm_norms, gammas / hp.warmup_max_drop)
    warm_gamma = jnp.where(first, warm_norms, jnp.minimum(gammas, lower))
    ema = hp.beta * ref + (1 - hp.beta) * jnp.minimum(n, local)
    n_clipped = jnp.sum(~warm & (n > local), dtype=_I32)
    level = jnp.where(warm, hp.cap, _norms.norm_of_values(thresholds, 2.0))
    next_state = state._replace(
        tensor_norm_ema=jnp.where(
            finite, jnp.where(warm, warm_gamma, ema), gammas
        ).astype(_F32),
        adagc_steps=count_if(steps, finite),
        clipped_tensors=jnp.where(finite, n_clipped, 0).astype(_I32),
    )
    return thresholds, level, next_state


def adagc(
    max_norm: jax.typing.ArrayLike = 1.0,
    clip_ratio: jax.typing.ArrayLike = 1.04,
    beta: jax.typing.ArrayLike = 0.99,
    warmup_steps: jax.typing.ArrayLike = 100,
    *,
    warmup_max_drop: jax.typing.ArrayLike | None = None,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Per-tensor clipping against an EMA of each tensor's clipped norm (AdaGC).

    **Warm-up** (the first ``warmup_steps`` finite steps): global-norm clipping
    to ``max_norm`` (:math:`\lambda_{abs}`), while each tensor's reference
    :math:`\gamma_i` tracks the smallest clipped norm it has had:

    .. math::

      h = \min\left(1, \frac{\lambda_{abs}}{\lVert g \rVert}\right), \quad
      \hat g_i = h\,g_i, \quad
      \gamma_i \leftarrow \min(\gamma_i, \lVert \hat g_i \rVert)

    **Afterwards**, every tensor (leaf) :math:`i` is clipped on its own:

    .. math::

      h_i = \min\left(1, \frac{\lambda_{rel}\,\gamma_i}{\lVert g_i \rVert}
      \right), \quad \hat g_i = h_i\,g_i, \quad
      \gamma_i \leftarrow \beta\,\gamma_i + (1 - \beta)\,\lVert \hat g_i \rVert

    so a tensor is clipped only when its norm exceeds ``clip_ratio`` times its
    own recent (clipped) history. With ``warmup_steps=0`` the first step sets
    :math:`\gamma_i = \lVert g_i \rVert` (no clipping). A step with any NaN or
    Inf is handled by the non-finite policy (during warm-up ``"propagate"``
    makes the whole step NaN, afterwards only the bad tensors) and never
    changes the EMAs. A tensor whose :math:`\gamma_i` reached 0 (its gradient
    was exactly zero for long enough) is zeroed from then on, as in the
    reference.

    **The warm-up trap.** During warm-up :math:`\gamma_i` is a minimum of
    *globally* clipped norms, so a single step on which one tensor spikes
    divides every other tensor's :math:`\gamma_i` by the factor the global
    clip applied; afterwards :math:`\gamma_i` grows by at most
    :math:`\beta + (1 - \beta)\lambda_{rel}` (0.04 % with the defaults) a
    step, so those tensors are clipped on every step for thousands of steps.
    The authors' code does the same: it is the algorithm. ``warmup_max_drop``
    bounds the fall of a reference in one warm-up step,
    :math:`\gamma_i \leftarrow \min(\gamma_i, \max(\lVert \hat g_i
    \rVert, \gamma_i / r))`, so a spike costs a factor :math:`r` at most
    (measured in the guide to choosing a method, with
    ``python -m benchmarks.adagc_trap``).

    Defaults are those of the authors' reference implementation
    (github.com/lishuai-97/AdaGC, Megatron patch: ``clip_ratio=1.04``,
    ``beta=0.99``, ``start_clip_steps=100``, global clip 1.0). Third-party ports
    use ``clip_ratio=1.05, beta=0.98``. We could not check these against the
    experiment tables of the paper itself. The reference adds ``1e-6`` to the
    norm in the clip factor; we use the exact ratio.

    Args:
      max_norm: :math:`\lambda_{abs}`, the global-norm threshold of the warm-up
        (default 1.0).
      clip_ratio: :math:`\lambda_{rel}` (> 0; default 1.04).
      beta: EMA factor :math:`\beta`, in ``[0, 1)`` (default 0.99).
      warmup_steps: number of warm-up steps (an integer >= 0; default 100).
        May be traced by :func:`optax.inject_hyperparams`.
      warmup_max_drop: ``None`` (default: the authors' rule) or :math:`r \ge
        1`, the largest factor by which a reference may fall in one warm-up
        step (see the warm-up trap above; ``1.04`` in our measurement).
      nonfinite: ``"propagate"`` (default), ``"zero_update"``
        or ``"raise"``.
      axis_name: mapped axes over which leaves are sharded; each tensor's norm
        is then its global norm (see :func:`optax_clip.clip_by_block_norm`).

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`AdaGCState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.adagc(warmup_steps=1)
      >>> params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> state = tx.init(params)
      >>> g = {"w": jnp.array([0.3, 0.4]), "b": jnp.array([0.1])}
      >>> _, state = tx.update(g, state)  # warm-up: global clip to 1.0
      >>> g = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.1])}  # w spikes
      >>> out, state = tx.update(g, state)
      >>> out["w"], out["b"]  # w clipped to 1.04 * 0.5, b untouched
      (Array([0.312, 0.416], dtype=float32), Array([0.1], dtype=float32))

    References:
      Wang et al., `AdaGC: Enhancing LLM Pretraining Stability via Adaptive
      Gradient Clipping <https://arxiv.org/abs/2502.11034>`_, 2025
    """
    valid = _validation.all_valid(
        _validation.nonnegative("max_norm", max_norm),
        _validation.positive("clip_ratio", clip_ratio),
        _validation.in_range("beta", beta, 0.0, 1.0),
        _validation.count("warmup_steps", warmup_steps, minimum=0),
        True
        if warmup_max_drop is None
        else _validation.in_range(
            "warmup_max_drop", warmup_max_drop, 1.0, math.inf, closed_high=True
        ),
    )
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)

    def init_fn(params):
        return AdaGCState(
            clip_stats=init_clip_stats(max_norm),
            tensor_norm_ema=jnp.zeros((len(jax.tree.leaves(params)),), _F32),
            adagc_steps=jnp.zeros((), _I32),
            clipped_tensors=jnp.zeros((), _I32),
        )

    def update_fn(updates, state, params=None):
        del params
        gammas = state.tensor_norm_ema
        norms = _norms.leaf_norms(updates, 2.0, axes)
        if gammas.shape != norms.shape:
            raise ValueError(
                "adagc: the updates have a different tree structure from the "
                f"parameters given to init ({norms.shape[0]} leaves vs "
                f"{gammas.shape[0]})."
            )
        if not norms.size:
            applied = _apply.apply_per_leaf(updates, norms, norms, policy, 2.0)
            stats = _apply.record(
                state.clip_stats, applied, state.clip_stats.clip_threshold
            )
            return updates, state._replace(clip_stats=stats)
        # An out-of-range traced hyper-parameter: a NaN step, EMAs untouched.
        n = norms.astype(_F32)
        gnorm = _norms.norm_of_values(n, 2.0)
        finite = jnp.isfinite(gnorm) & valid
        hp = _AdaGCParams(
            cap=_apply.threshold_array(max_norm, _F32, valid),
            clip_ratio=jnp.asarray(clip_ratio, _F32),
            beta=jnp.asarray(beta, _F32),
            warmup_steps=jnp.asarray(warmup_steps, _I32),
            warmup_max_drop=None
            if warmup_max_drop is None
            else jnp.asarray(warmup_max_drop, _F32),
        )
        thresholds, level, next_state = _adagc_decide(state, n, gnorm, finite, hp)
        thresholds = _validation.nan_unless(valid, thresholds.astype(norms.dtype))
        applied = _apply.apply_per_leaf(updates, norms, thresholds, policy, 2.0)
        return _recorded(applied, next_state, state, level, valid, finite)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, "adagc", axes)


# --------------------------------------------------------------------------
# Choosing a fixed threshold
# --------------------------------------------------------------------------


class MaxNormSuggestion(NamedTuple):
    """What :func:`suggest_max_norm` recommends, and how it got there.

    Attributes:
      max_norm: the recommended threshold for
        :func:`optax_clip.clip_by_global_norm`.
      percentile: the percentile of the used norms it is.
      num_used: number of norms the percentile was taken over.
      num_discarded: number of leading norms left out (early transient).
      num_nonfinite: number of NaN/Inf norms left out.
      median: median of the used norms.
      clip_fraction: fraction of the used norms above ``max_norm`` (the share
        of those steps it would have clipped).
      explanation: a one-line, human-readable account of the above.
    """

    max_norm: float
    percentile: float
    num_used: int
    num_discarded: int
    num_nonfinite: int
    median: float
    clip_fraction: float
    explanation: str


def suggest_max_norm(
    norms: Any, percentile: float = 90.0, *, discard_first: float = 0.1
) -> MaxNormSuggestion:
    """Recommends a fixed ``max_norm`` from recorded pre-clip gradient norms.

    The recipe: train a few hundred steps without clipping (or with
    :func:`optax_clip.clip_by_global_norm` at ``inf``, which records the
    norms), collect ``get_stats(state)["clip_by_global_norm/pre_clip_norm"]``
    every step, then call this. It drops the first ``discard_first`` fraction
    of the steps (the large norms right after initialisation are not
    representative) and every NaN/Inf, and returns the ``percentile``-th
    percentile (linear interpolation) of the rest: with the default 90, the
    threshold leaves the typical step untouched and clips about one step in
    ten of the recorded regime, and all the large spikes. Use a lower
    percentile (AutoClip's paper found 10 good for its audio models) to clip
    harder. This runs on the host (NumPy, float64); it is not a transform.

    Args:
      norms: a sequence or array of recorded norms (one per step, in order).
      percentile: in ``[0, 100]`` (default 90).
      discard_first: fraction of the leading steps to leave out, in ``[0, 1)``
        (default 0.1).

    Returns:
      A :class:`MaxNormSuggestion`; its ``max_norm`` is the threshold and its
      ``explanation`` says how it was chosen.

    Raises:
      ValueError: for an out-of-range argument, a negative norm, or when no
        finite norm is left.

    Example:
      >>> import numpy as np, optax_clip
      >>> norms = [50.0] + [1.0 + 0.01 * i for i in range(100)]
      >>> s = optax_clip.suggest_max_norm(norms, percentile=90.0)
      >>> round(s.max_norm, 3), s.num_used, s.num_discarded
      (1.9, 91, 10)

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020 (the
      percentile rule)
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    if not 0.0 <= float(discard_first) < 1.0:
        raise ValueError(f"discard_first must be in [0, 1), got {discard_first}.")
    values = np.asarray(jax.device_get(norms), np.float64).ravel()
    if values.size == 0:
        raise ValueError("suggest_max_norm needs at least one recorded norm.")
    if np.any(values < 0):
        raise ValueError(
            "suggest_max_norm: norms are >= 0; got a negative value (are these "
            "losses or log-norms rather than pre-clip norms?)."
        )
    skip = int(math.floor(discard_first * values.size))
    kept = values[skip:]
    finite = kept[np.isfinite(kept)]
    if finite.size == 0:
        raise ValueError(
            "suggest_max_norm: every recorded norm (after the discarded ones) is "
            "NaN or Inf."
        )
    max_norm = float(np.percentile(finite, percentile))
    median = float(np.median(finite))
    frac = float(np.mean(finite > max_norm))
    nonfinite = int(kept.size - finite.size)
    explanation = (
        f"max_norm={max_norm:.4g}: the {percentile:g}th percentile of "
        f"{finite.size} finite pre-clip norms (steps {skip}..{values.size - 1} "
        f"of {values.size}; first {skip} discarded, {nonfinite} non-finite "
        f"dropped); median {median:.4g}, max {float(np.max(finite)):.4g}; it "
        f"would have clipped {100 * frac:.1f}% of those steps."
    )
    return MaxNormSuggestion(
        max_norm=max_norm,
        percentile=float(percentile),
        num_used=int(finite.size),
        num_discarded=skip,
        num_nonfinite=nonfinite,
        median=median,
        clip_fraction=frac,
        explanation=explanation,
    )
