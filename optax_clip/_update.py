"""Update clipping: clips what the optimizer outputs, not the gradient.

A gradient clip sits *before* the optimizer (``chain(clip, adamw)``); the
transforms here bound the step the optimizer takes, so they sit *after* it
(``chain(adamw, clip_update_by_history())``) or, for StableAdamW, inside it:

* :func:`clip_update_by_history`: the update's global norm against the mean
  plus ``sigma`` standard deviations of its last ``window`` norms (levanter's
  ``clip_update_norm``);
* :func:`clip_update_by_param_norm`: each leaf's update against a fraction of
  its parameter's norm (a trust ratio, as a bound);
* :func:`stable_adamw`: AdamW whose step is scaled, tensor by tensor, by
  ``1 / max(1, RMS(g / sqrt(v)))`` (Wortsman et al. 2023).

All are built on the shared pipeline: norms from ``_norms`` (float32
accumulation, overflow-safe, one pass), the scale applied by ``_apply`` under
a non-finite policy, the statistics recorded in a
:class:`optax_clip.ClipStats`, fixed-shape states.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_clip import (
    _apply,
    _collectives,
    _fail_fast,
    _norms,
    _skippable,
    _validation,
    _xla_cpu,
)
from optax_clip._static import _global_sizes
from optax_clip._stats import (
    ClipStats,
    init_clip_stats,
    window_moments,
    window_push,
)

_F32 = jnp.float32
_I32 = jnp.int32

# levanter's floor on the window's standard deviation.
_MIN_STD = 1e-6


# --------------------------------------------------------------------------
# clip_update_by_history
# --------------------------------------------------------------------------


class ClipUpdateByHistoryState(NamedTuple):
    """State of :func:`clip_update_by_history`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step;
        ``clip_threshold`` is the window's mean plus ``sigma`` standard
        deviations, capped by ``max_norm`` (``max_norm`` until the window
        holds ``min_history`` norms).
      update_norm_window: ring buffer (float32, length ``window``) of the
        *unclipped* global norms of the last finite updates.
      update_window_pos: slot the next norm is written to (int32).
      update_window_len: number of norms in the window (int32).
      update_norm_mean: mean of the window the last step was measured against
        (float32; 0 for an empty window).
      update_norm_std: its population standard deviation (float32).
    """

    clip_stats: ClipStats
    update_norm_window: jax.Array
    update_window_pos: jax.Array
    update_window_len: jax.Array
    update_norm_mean: jax.Array
    update_norm_std: jax.Array
    _stats_name = "clip_update_by_history"
    _stats_fields = ("update_window_len", "update_norm_mean", "update_norm_std")


def _history_decide(state: ClipUpdateByHistoryState, norm, finite, sigma, need):
    """The threshold of a step, and the state with the next window (pure).

    Args:
      state: the transform's state before the step.
      norm: the step's pre-clip global norm.
      finite: whether the norm enters the window (finite, valid
        hyper-parameters).
      sigma: standard deviations above the mean.
      need: norms the window must hold before it clips.

    Returns:
      ``(level, next_state)``: the threshold (float32; ``inf`` while the
      window holds fewer than ``need`` norms) and the state with the window
      moved on (its ``clip_stats`` unchanged).
    """
    window, length = state.update_norm_window, state.update_window_len
    mean, std = window_moments(window, length, ddof=0)
    active = length >= jnp.maximum(need, 2)
    level = jnp.where(active, mean + sigma * jnp.maximum(std, _MIN_STD), jnp.inf)
    n32 = jnp.where(finite, norm, 0).astype(_F32)
    values, pos, length = window_push(
        window, state.update_window_pos, length, n32, finite
    )
    next_state = state._replace(
        update_norm_window=values,
        update_window_pos=pos,
        update_window_len=length,
        update_norm_mean=mean.astype(_F32),
        update_norm_std=std.astype(_F32),
    )
    return level.astype(_F32), next_state


def clip_update_by_history(
    window: int = 128,
    sigma: jax.typing.ArrayLike = 3.0,
    max_norm: jax.typing.ArrayLike = math.inf,
    *,
    min_history: jax.typing.ArrayLike | None = None,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Clips the update's norm to its recent mean plus ``sigma`` deviations.

    With :math:`\mu, s` the mean and population standard deviation of the
    last ``window`` finite, *unclipped* global norms of the update (the
    current one not included):

    .. math::

      c_t = \min\big(\mu + \sigma \max(s, 10^{-6}),\; \text{max\_norm}\big),
      \qquad
      u \leftarrow u \cdot \min\left(1, \frac{c_t}{\lVert u \rVert_2}\right)

    This is levanter's (marin's) ``clip_update_by_historical_norm(128,
    sigma_factor=3.0)``, its ``clip_update_norm`` option, with the same rule:

    * **First steps.** Nothing is clipped (``clip_threshold`` reads
      ``max_norm``, by default ``inf``) until the window holds
      ``min_history`` norms, by default ``max(2, window // 2)`` (64 for the
      default window).
    * **The window holds unclipped norms**, also on clipped steps (levanter:
      "to prevent collapse"): a lasting change of scale is clipped for about
      ``window / 2`` steps, then accepted.
    * Unlike levanter, a step whose update holds a NaN or Inf never enters
      the window (levanter's would hold the NaN, and its threshold would stay
      NaN for ``window`` steps); the non-finite policy decides what the step
      becomes.

    Place it **after** the optimizer: ``optax.chain(optax.adamw(lr),
    clip_update_by_history())``. The window then measures the steps the
    parameters actually take, learning rate and weight decay included.

    **Compared with** :func:`optax_clip.zclip` **after the optimizer**: zclip
    keeps exponential averages (``alpha=0.97``: about 33 steps of memory) fed
    with the *clipped* norm, clips a spike to below its detection level
    (:math:`\mu + z^2 \sigma / z_t`), and starts after 25 steps; this keeps an
    exact window of the last ``window`` unclipped norms, clips a spike to the
    detection level itself, and starts after ``window // 2`` steps. A lasting
    change of scale is accepted by both, here after a known number of steps.

    Args:
      window: number of recent update norms kept (an integer >= 2; fixes the
        state's shape: with :func:`optax.inject_hyperparams`, list it in
        ``static_args``).
      sigma: how many standard deviations above the mean the norm may reach
        (>= 0; default 3, levanter's ``sigma_factor``; ``inf`` never clips).
      max_norm: optional fixed upper bound on the threshold, in force from
        the first step (default ``inf``: none, as in levanter).
      min_history: norms needed before clipping starts (an integer in
        ``[2, window]``; default ``max(2, window // 2)``). A traced ``sigma``
        or ``min_history`` out of range makes that step's update NaN
        (``clip_threshold`` reads NaN) and leaves the window alone.
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or
        ``"raise"``; see :func:`optax_clip.clip_by_global_norm`.
      axis_name: mapped axes over which the update is sharded (see
        :func:`optax_clip.clip_by_global_norm`); the norm is then global.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ClipUpdateByHistoryState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.clip_update_by_history(window=4, sigma=3.0)
      >>> update, state = jax.jit(tx.update), tx.init(None)
      >>> for norm in [1.0, 1.2, 0.8, 1.0]:
      ...     out, state = update(jnp.array([norm]), state)
      >>> out, state = update(jnp.array([10.0]), state)
      >>> round(float(out[0]), 4)  # mean 1, std 0.1414 of the last 4 norms
      1.4243
      >>> float(state.update_norm_window[0])  # the unclipped norm is kept
      10.0

    References:
      levanter (marin-community/marin ``lib/levanter``),
      ``optim/clip_update_norm.py``; marin issue 1390 (a 32B run lost after
      update clipping was turned off).
    """
    size = _validation.static_int("window", window, minimum=2)
    if min_history is None:
        min_history = max(2, size // 2)
    valid = _validation.all_valid(
        _validation.nonnegative("sigma", sigma),
        _validation.nonnegative("max_norm", max_norm),
        _validation.count("min_history", min_history, minimum=2, maximum=size),
    )
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)

    def init_fn(params):
        del params
        zero_f, zero_i = jnp.zeros((), _F32), jnp.zeros((), _I32)
        return ClipUpdateByHistoryState(
            clip_stats=init_clip_stats(max_norm),
            update_norm_window=jnp.zeros((size,), _F32),
            update_window_pos=zero_i,
            update_window_len=zero_i,
            update_norm_mean=zero_f,
            update_norm_std=zero_f,
        )

    def update_fn(updates, state, params=None):
        del params
        norm = _norms.global_norm(updates, 2.0, axes)
        finite = jnp.isfinite(norm) & valid
        s = jnp.asarray(sigma, _F32)
        need = jnp.asarray(min_history, _I32)
        level, next_state = _history_decide(state, norm, finite, s, need)
        cap = _apply.threshold_array(max_norm, _F32)
        threshold = _validation.nan_unless(valid, jnp.minimum(level, cap))
        applied = _apply.apply_global(updates, norm, threshold, policy)
        stats = _apply.record(state.clip_stats, applied, threshold)
        return applied.updates, next_state._replace(clip_stats=stats)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, "clip_update_by_history", axes)


# --------------------------------------------------------------------------
# clip_update_by_param_norm
# --------------------------------------------------------------------------


class ClipUpdateByParamNormState(NamedTuple):
    """State of :func:`clip_update_by_param_norm`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step; the norms
        are global, ``clip_scale`` is the smallest leaf scale, and
        ``clip_threshold`` is the 2-norm of the leaves' limits (the largest
        global norm the output can have).
      param_clipped_tensors: number of leaves clipped on the last step
        (int32).
    """

    clip_stats: ClipStats
    param_clipped_tensors: jax.Array
    _stats_name = "clip_update_by_param_norm"
    _stats_fields = ("param_clipped_tensors",)


def clip_update_by_param_norm(
    max_ratio: jax.typing.ArrayLike,
    min_param_norm: jax.typing.ArrayLike = 1e-3,
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Bounds each leaf's update by a fraction of its parameter's norm.

    For every leaf (a layer's weight, a bias) with update :math:`u` and
    parameter :math:`p`:

    .. math::

      u \leftarrow u \cdot \min\left(1,
      \frac{r \max(\lVert p \rVert_2, \epsilon)}{\lVert u \rVert_2}\right)

    so that no step moves a tensor by more than the fraction :math:`r` of its
    own size (the trust ratio of LARS and LAMB, used as a bound rather than a
    rescaling: below it the update passes exactly). Place it **after** the
    optimizer, on the step itself (``optax.chain(optax.adamw(lr),
    clip_update_by_param_norm(0.01))``); :func:`optax_clip.adaptive_grad_clip`
    is the gradient-side relative, unit by unit, before the optimizer.

    A leaf whose parameter is zero (a zero-initialised bias) may move by
    :math:`r \epsilon`; with ``min_param_norm=0`` it cannot move at all (its
    update becomes zeros, never NaN). A leaf whose *parameter* holds a NaN or
    Inf is treated like one whose update does (the model is already corrupt):
    with ``"propagate"`` that leaf becomes NaN, with ``"zero_update"`` the
    whole update becomes zeros; either way ``is_nonfinite`` is set.

    Args:
      max_ratio: :math:`r`, the largest ratio of a leaf's update norm to its
        parameter norm (>= 0; ``inf`` never clips).
      min_param_norm: :math:`\epsilon`, the smallest parameter norm used
        (>= 0; default 1e-3, AGC's), so that zero parameters can move.
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or
        ``"raise"`` (see :func:`optax_clip.clip_by_global_norm`).
      axis_name: mapped axes over which leaves are sharded (see
        :func:`optax_clip.clip_by_global_norm`); each norm is then that of
        the whole leaf.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ClipUpdateByParamNormState`. Its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.clip_update_by_param_norm(max_ratio=0.1)
      >>> params = {"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(1)}
      >>> updates = {"w": jnp.array([0.0, 1.0]), "b": jnp.array([1.0])}
      >>> out, state = tx.update(updates, tx.init(params), params)
      >>> out["w"]  # |p| = 5: the update may reach 0.5
      Array([0. , 0.5], dtype=float32)
      >>> out["b"]  # a zero parameter: 0.1 * 1e-3
      Array([1.e-04], dtype=float32)

    References:
      You et al., `Large Batch Training of Convolutional Networks
      <https://arxiv.org/abs/1708.03888>`_, 2017 (LARS, the layer-wise trust
      ratio); You et al., `Large Batch Optimization for Deep Learning:
      Training BERT in 76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020
      (LAMB).
    """
    valid = _validation.all_valid(
        _validation.nonnegative("max_ratio", max_ratio),
        _validation.nonnegative("min_param_norm", min_param_norm, allow_inf=False),
    )
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)
    name = "clip_update_by_param_norm"

    def init_fn(params):
        del params
        return ClipUpdateByParamNormState(init_clip_stats(jnp.inf), jnp.zeros((), _I32))

    def update_fn(updates, state, params=None):
        p_leaves = _validation.matching_params(name, updates, params)
        u_leaves = _validation.float_leaves(updates)
        n = len(u_leaves)
        norms = _norms.leaf_norms((u_leaves, p_leaves), 2.0, axes)
        u_norms, p_norms = norms[:n], norms[n:]
        floor = jnp.maximum(p_norms, jnp.asarray(min_param_norm, norms.dtype))
        ratio = jnp.asarray(max_ratio, norms.dtype)
        # r * 0 is 0, also for r = inf.
        limits = _validation.nan_unless(valid, jnp.where(floor > 0, ratio * floor, 0))
        # A leaf whose parameter is NaN or Inf counts as non-finite.
        measured = jnp.where(jnp.isfinite(p_norms), u_norms, jnp.nan)
        applied = _apply.apply_per_leaf(updates, measured, limits, policy, 2.0)
        clipped = ~(measured <= limits) & jnp.isfinite(measured)
        shown = _norms.norm_of_values(limits, 2.0) if n else jnp.zeros((), _F32)
        stats = _apply.record(state.clip_stats, applied, shown)
        count = jnp.sum(clipped, dtype=_I32)
        return applied.updates, ClipUpdateByParamNormState(stats, count)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, name, axes)


# --------------------------------------------------------------------------
# stable_adamw
# --------------------------------------------------------------------------


class StableAdamWState(NamedTuple):
    r"""State of :func:`stable_adamw`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step; the norms
        are the global 2-norms of Adam's direction
        :math:`\hat m / (\sqrt{\hat v} + \epsilon)` before and after the clip,
        ``clip_scale`` is the smallest tensor's factor
        :math:`1 / \max(1, \mathrm{RMS}_t / d)` and ``clip_threshold`` is
        :math:`d` (``max_rms``).
      adam_state: the state of :func:`optax.adamw` (``(ScaleByAdamState,
        ..., ...)``), so that a checkpoint of one loads into the other.
      moment_clipped_tensors: number of tensors whose step was scaled down on
        the last step (int32).
      max_moment_rms: the largest :math:`\mathrm{RMS}(g / \sqrt{\hat v})`
        over the tensors on the last step (float32; at most 1 on the first step).
    """

    clip_stats: ClipStats
    adam_state: Any
    moment_clipped_tensors: jax.Array
    max_moment_rms: jax.Array
    _stats_name = "stable_adamw"
    _stats_fields = ("moment_clipped_tensors", "max_moment_rms")


def _moment_ratio(g: jax.Array, v_hat: jax.Array, eps) -> jax.Array:
    """``g / max(sqrt(v_hat), eps)`` in float32 or wider (no NaN gradient at 0).

    Its square is the paper's ``g^2 / max(v, eps^2)``; as a ratio it cannot
    overflow while ``v_hat`` is finite, since ``v_hat`` holds a share of
    ``g^2``.
    """
    acc = jnp.promote_types(g.dtype, _F32)
    v = v_hat.astype(acc)
    e2 = jnp.asarray(eps, acc) ** 2
    big = v > e2
    den = jnp.sqrt(jnp.where(big, v, e2))  # double where: d/dv is finite at 0
    return g.astype(acc) / jnp.where(big, den, jnp.asarray(eps, acc))


def _ratio_norms(ratios: list[jax.Array], axes: tuple, dtype: Any) -> jax.Array:
    """The 2-norm of each ratio leaf, as one vector, by plain float32 sums.

    No rescaling pass is needed: ``v_hat`` holds ``g^2 (1 - b2) / (1 - b2^t)``
    at least, so every squared ratio is at most ``1 / (1 - b2)`` (1000 for
    ``b2 = 0.999``) and a leaf's sum cannot overflow; the sums then fuse into
    Adam's own pass over the moments.
    """
    if not ratios:
        return jnp.zeros((0,), dtype)
    sums = [jnp.sum(jnp.square(r), dtype=dtype).reshape(1) for r in ratios]
    sums = _collectives.combine(sums, _collectives.leaf_axes(ratios, axes), "sum")
    # A NaN sum (a NaN gradient) stays NaN: safe_root would make it 0.
    return jnp.where(jnp.isnan(sums), sums, _norms.safe_root(sums, 2.0))


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    max_rms: jax.typing.ArrayLike = 1.0,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW with StableAdamW's update clipping, tensor by tensor.

    With :math:`\hat v_t` Adam's bias-corrected second moment (after this
    step's gradient :math:`g_t` entered it), for every tensor (leaf) of
    :math:`n` values:

    .. math::

      \mathrm{RMS}_t = \sqrt{\frac{1}{n} \sum_i
        \frac{g_{t,i}^2}{\max(\hat v_{t,i}, \epsilon^2)}}, \qquad
      \eta_t = \frac{\alpha_t}{\max(1, \mathrm{RMS}_t / d)}

    and the tensor moves by :math:`-\eta_t \hat m_t / (\sqrt{\hat v_t} +
    \epsilon) - \alpha_t \lambda \theta_{t-1}`: :func:`optax.adamw`'s step
    with the learning rate of Adam's direction divided by :math:`\max(1,
    \mathrm{RMS}_t / d)`, and the weight decay at the full learning rate, as
    in the authors' reference implementation (Wortsman's
    ``StableAdamWUnfused`` gist). A tensor
    whose gradient is large against its history (:math:`\hat v` still small
    for it, e.g. after a spike or for a rarely-used embedding row) takes a
    smaller step; in steady state :math:`\mathrm{RMS}_t \approx 1` and
    nothing is clipped. On the first step :math:`\hat v_1 = g_1^2`, so
    :math:`\mathrm{RMS}_1 \le 1` and the step is AdamW's. The paper folds the
    bias correction into :math:`\hat\beta_t = \beta (1 - \beta^{t-1}) / (1 -
    \beta^t)`, which gives the same :math:`\hat v_t` as optax's
    :math:`v_t / (1 - \beta_2^t)`.

    **Why an optimizer and not a transform to chain.** The clip needs the
    gradient and Adam's second moment, which a transform after
    ``optax.adamw`` cannot see (it receives only the update, weight decay
    already added). So this is :func:`optax_clip.adamw`'s chain
    (``scale_by_adam``, ``add_decayed_weights``, ``scale_by_learning_rate``)
    with the clip between the first two, reading the moment
    ``scale_by_adam`` already keeps: no second copy of :math:`v`, the state
    of :func:`optax.adamw` (``adam_state``: checkpoints move between the
    two), and under :func:`optax_clip.skip_nonfinite` or
    :func:`optax_clip.skip_on_spike` a skipped step costs no copy of the
    moments. It is a drop-in for ``optax.adamw``: same arguments and
    defaults (the paper uses ``b2=0.99``, and ``eps=1e-6`` in later code),
    plus ``max_rms``. Chain it like any optimizer; a gradient clip before it
    still works.

    Non-finite policy: a gradient with a NaN or Inf makes Adam's moments NaN
    (as in optax); with ``"propagate"`` the tensors holding one come out NaN,
    with ``"zero_update"`` the whole step is zeros. Wrap it in
    :func:`optax_clip.skip_nonfinite` to also keep the moments.

    Args:
      learning_rate: :math:`\alpha_t`, a float or an optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: :math:`\epsilon`, added to Adam's denominator; :math:`\epsilon^2`
        is the floor of :math:`\hat v` in the RMS.
      mu_dtype: dtype of the first moment (default: that of the updates).
      weight_decay: :math:`\lambda`, a float or a schedule.
      mask: which parameters get weight decay (as in :func:`optax.adamw`).
      max_rms: :math:`d`, the RMS above which a tensor's step is scaled down
        (>= 0; default 1, the paper's; ``inf`` is plain AdamW).
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or
        ``"raise"`` (see :func:`optax_clip.clip_by_global_norm`).
      axis_name: mapped axes over which the tensors are sharded; each RMS is
        then that of the whole tensor.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`StableAdamWState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.stable_adamw(0.1, weight_decay=0.0)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> for _ in range(9):  # steady gradients: AdamW's steps of -0.1 * sign(g)
      ...     u, state = tx.update({"w": jnp.array([1.0, -1.0])}, state, params)
      >>> u, state = tx.update({"w": jnp.array([30.0, -1.0])}, state, params)
      >>> round(float(state.max_moment_rms), 2)  # a spike: RMS(g / sqrt(v)) > 1
      2.33
      >>> u["w"]  # AdamW's step, [-0.0571, 0.1], divided by 2.33
      Array([-0.02449096,  0.04291994], dtype=float32)

    References:
      Wortsman et al., `Stable and low-precision training for large-scale
      vision-language models <https://arxiv.org/abs/2304.13013>`_, 2023
      (StableAdamW), and its reference implementation, ``StableAdamWUnfused``
      (gist.github.com/mitchellnw/d42e22a0b9ec02ceaf4f7b4457f51423); Shazeer
      and Stern, `Adafactor
      <https://arxiv.org/abs/1804.04235>`_, 2018 (update clipping).
    """
    valid = _validation.nonnegative("max_rms", max_rms)
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)
    # optax.adamw's chain, taken apart so that the clip sits after Adam.
    adam = _skippable.scale_by_adam(b1, b2, eps, 0.0, mu_dtype)
    decay = optax.add_decayed_weights(weight_decay, mask)
    rate = optax.scale_by_learning_rate(learning_rate)

    def init_fn(params):
        return StableAdamWState(
            clip_stats=init_clip_stats(max_rms),
            adam_state=(adam.init(params), decay.init(params), rate.init(params)),
            moment_clipped_tensors=jnp.zeros((), _I32),
            max_moment_rms=jnp.zeros((), _F32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        g_leaves = _validation.float_leaves(updates)
        del extra_args  # optax.adamw takes none
        s_adam, s_decay, s_rate = state.adam_state
        out, moments = adam.update(updates, s_adam, params)
        nu_hat = optax.tree.bias_correction(moments.nu, b2, moments.count)
        ratios = [
            _moment_ratio(g, v, eps)
            for g, v in zip(g_leaves, jax.tree.leaves(nu_hat), strict=True)
        ]
        n = len(g_leaves)
        u_norms = _norms.leaf_norms(out, 2.0, axes)
        r_norms = _ratio_norms(ratios, axes, u_norms.dtype)
        root_n = np.sqrt(np.asarray(_global_sizes(g_leaves, axes), np.float64))
        root_n = jnp.asarray(root_n.astype(np.dtype(u_norms.dtype)))
        d = _apply.threshold_array(max_rms, u_norms.dtype, valid)
        # max(1, RMS / d) through the shared clip: RMS = |r| / sqrt(n).
        applied = _apply.apply_per_leaf(
            out, r_norms, d * root_n, policy, 2.0, reported=u_norms
        )
        clipped = ~(r_norms <= d * root_n) & jnp.isfinite(r_norms)
        rms = r_norms / jnp.where(root_n > 0, root_n, 1)
        top = jnp.max(rms) if n else jnp.zeros((), u_norms.dtype)
        stats = _apply.record(state.clip_stats, applied, d)
        steps, s_decay = decay.update(applied.updates, s_decay, params)
        steps, s_rate = rate.update(steps, s_rate, params)
        if policy == "zero_update":  # the weight decay too
            bad = applied.nonfinite
            steps = jax.tree.map(
                lambda x: _xla_cpu.select(bad, jnp.zeros_like(x), x), steps
            )
        return steps, StableAdamWState(
            clip_stats=stats,
            adam_state=(moments, s_decay, s_rate),
            moment_clipped_tensors=jnp.sum(clipped, dtype=_I32),
            max_moment_rms=top.astype(_F32),
        )

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    if policy == "raise":
        return _fail_fast.wrap(tx, policy, "stable_adamw", axes)
    return tx
