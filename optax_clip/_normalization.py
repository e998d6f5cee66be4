"""Gradient normalization against the history of each tensor's norm (AdaGN).

Stable-SPAM (Huang et al. 2025) follows its per-coordinate clip (AdaClip,
:func:`optax_clip.adaclip`) with AdaGN: each tensor's gradient is rescaled to
the ratio of two EMAs of its norm, so that a spike in one tensor is brought
back to the tensor's usual scale. With :func:`optax_clip.adaclip` before it,
Adam after it and :func:`optax_clip.skip_nonfinite`'s ``reset_every`` around
them, it composes Stable-SPAM from parts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clip import _apply, _fail_fast, _norms, _validation
from optax_clip._stats import ClipStats, count_if, init_clip_stats

_F32, _I32 = jnp.float32, jnp.int32


class AdaGNState(NamedTuple):
    r"""State of :func:`adagn`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step (2-norms):
        ``pre_clip_norm`` and ``post_clip_norm`` are the global norms before
        and after, ``clip_scale`` the smallest factor applied to a leaf (it
        may exceed 1: AdaGN also scales up), ``clip_threshold`` the largest
        target norm :math:`c_t` of a leaf, ``is_clipped`` whether some leaf's
        norm was lowered.
      adagn_norm_ema: :math:`m_t`, the EMA of each leaf's norm (float32, one
        entry per leaf in ``jax.tree.leaves`` order).
      adagn_norm_rms: :math:`\sqrt{v_t}`, the square root of the EMA of each
        leaf's squared norm (float32; kept as a root so that norms above
        :math:`\sqrt{\text{float max}}` do not overflow it).
      adagn_steps: number of finite steps seen, the :math:`t` of the bias
        corrections (int32, saturating).
    """

    clip_stats: ClipStats
    adagn_norm_ema: jax.Array
    adagn_norm_rms: jax.Array
    adagn_steps: jax.Array
    _stats_name = "adagn"
    _stats_fields = ("adagn_steps",)


def _root_ema(r: jax.Array, x: jax.Array, decay: jax.Array) -> jax.Array:
    """``sqrt(decay * r**2 + (1 - decay) * x**2)`` for ``r, x >= 0``, no overflow."""
    top = jnp.maximum(r, x)
    safe = jnp.where(top > 0, top, 1.0)
    a, b = r / safe, x / safe
    return jnp.where(top > 0, top * jnp.sqrt(decay * a * a + (1 - decay) * b * b), 0.0)


def _leaf_scale(norms: jax.Array, target: jax.Array) -> _apply.Scale:
    """The :class:`_apply.Scale` ``target / norm`` per leaf; 1 where a norm is 0.

    :func:`_apply.make_scale` keeps both ends: a huge norm (``target / norm``
    subnormal) and a tiny one (``target / norm`` beyond the float range).
    """
    live = norms > 0  # double where: finite gradients at 0
    return _apply.make_scale(jnp.where(live, target, 1.0), jnp.where(live, norms, 1.0))


def adagn(
    gamma1: jax.typing.ArrayLike = 0.7,
    gamma2: jax.typing.ArrayLike = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Rescales each leaf to the ratio of two EMAs of its norm (Stable-SPAM's AdaGN).

    For each leaf (tensor) with gradient norm :math:`n_t = \lVert g_t \rVert_2`:

    .. math::

      m_t = \gamma_1 m_{t-1} + (1 - \gamma_1) n_t, \quad
      v_t = \gamma_2 v_{t-1} + (1 - \gamma_2) n_t^2, \\
      c_t = \frac{m_t / (1 - \gamma_1^t)}{\sqrt{v_t / (1 - \gamma_2^t)} + \epsilon},
      \quad g_t \leftarrow g_t \, \frac{c_t}{n_t}

    so each leaf leaves with norm :math:`c_t`, about 1 while its norm is
    steady (the first step gives :math:`n_1 / (n_1 + \epsilon)`) and below
    1 right after a spike (:math:`m` moves faster than :math:`\sqrt v`). A
    leaf of norm 0 is left as it is (its EMAs still decay), and so is, with
    :math:`\epsilon = 0`, a leaf whose EMAs are below the float range. Not a
    clip in the usual sense: it also scales small gradients up, so every step is
    normalized; an Adam-type optimizer after it is insensitive to that scale
    but an SGD one is not. Stable-SPAM is ``skip_nonfinite(chain(adaclip(0.999),
    adagn(0.7, 0.9), adam(lr)), reset_every=1000)`` (up to its code's
    bias-correction counters after a reset, which restart with the moments;
    here only Adam's does).

    **Cost.** One read of the gradients for the per-leaf norms and one scale
    pass: 1.17 times AdamW's optimizer step alone at 5.3M float32 values, and
    1.02 to 1.07 times a whole train step, on a 2-core CPU (``python -m
    benchmarks.coordinate_clip timing``; section g of the harness).

    The norms are measured per leaf in float32 without overflow, and
    :math:`\sqrt{v_t}` is kept as a root, so a gradient whose squares exceed
    the float range is still normalized in the right direction.

    Non-finite policy: a step with any NaN or Inf leaves the EMAs and the
    step count as they were. With ``"propagate"`` only a leaf whose own
    values hold a NaN or Inf comes out as all NaN (the others are normalized
    with this step's EMAs); with ``"zero_update"`` the whole update becomes
    zeros; ``"raise"`` is ``"propagate"`` that also raises.

    Args:
      gamma1: :math:`\gamma_1`, the decay of the norm's EMA, in ``[0, 1)``
        (default 0.7, Stable-SPAM's). May be traced by
        :func:`optax.inject_hyperparams`.
      gamma2: :math:`\gamma_2`, the decay of the squared norm's EMA, in
        ``[0, 1)`` (default 0.9). May be traced.
      eps: :math:`\epsilon >= 0` (default 1e-8). May be traced.
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or ``"raise"``.
      axis_name: mapped axes over which leaves are sharded; each leaf's norm
        is then that of the whole leaf.

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`AdaGNState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.adagn(gamma1=0.5, gamma2=0.5, eps=0.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> out, state = tx.update(jnp.array([3.0, 4.0]), state)  # n = 5: c = 1
      >>> out
      Array([0.6, 0.8], dtype=float32)
      >>> out, state = tx.update(jnp.array([0.0, 20.0]), state)  # a spike, n = 20
      >>> # m_hat = (0.25 * 5 + 0.5 * 20) / 0.75 = 15,
      >>> # sqrt(v_hat) = sqrt((0.25 * 25 + 0.5 * 400) / 0.75) = 16.58..., c = 0.9045...
      >>> out
      Array([0.       , 0.9045340], dtype=float32)

    References:
      Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than
      16-Bit Adam <https://arxiv.org/abs/2502.17055>`_, 2025 (AdaGN,
      :math:`\gamma_1 = 0.7`, :math:`\gamma_2 = 0.9`, :math:`\epsilon = 10^{-8}`).
    """
    valid = _validation.all_valid(
        _validation.in_range("gamma1", gamma1, 0.0, 1.0),
        _validation.in_range("gamma2", gamma2, 0.0, 1.0),
        _validation.nonnegative("eps", eps, allow_inf=False),
    )
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)

    def init_fn(params):
        zeros = jnp.zeros((len(_validation.float_leaves(params)),), _F32)
        return AdaGNState(
            clip_stats=init_clip_stats(0.0),
            adagn_norm_ema=zeros,
            adagn_norm_rms=zeros,
            adagn_steps=jnp.zeros((), _I32),
        )

    def update_fn(updates, state, params=None):
        del params
        norms = _norms.leaf_norms(updates, 2.0, axes).astype(_F32)
        if norms.shape != state.adagn_norm_ema.shape:
            raise ValueError(
                "adagn: the updates have a different tree structure from the "
                f"parameters given to init ({norms.shape[0]} leaves vs "
                f"{state.adagn_norm_ema.shape[0]})."
            )
        bad = ~jnp.isfinite(norms)
        counts = jnp.asarray(valid) & ~jnp.any(bad)
        g1, g2, e = (
            _validation.nan_unless(valid, _validation.scalar_array(v, _F32))
            for v in (gamma1, gamma2, eps)
        )
        n = jnp.where(bad, 0.0, norms)
        m = g1 * state.adagn_norm_ema + (1 - g1) * n
        r = _root_ema(state.adagn_norm_rms, n, g2)
        t = optax.safe_increment(state.adagn_steps).astype(_F32)
        # c = (m / b) / (r / a + eps) with a = sqrt(1 - g2**t), b = 1 - g1**t,
        # written so that nothing is divided by a or b (no overflow for huge m).
        a, b = jnp.sqrt(1 - g2**t), 1 - g1**t
        den = b * (r + e * a)
        # With eps = 0, the EMAs of a norm near the smallest float may flush to
        # 0: such a leaf is left as it is (0 / 0 would be NaN).
        defined = den != 0  # a NaN (traced hyper-parameter out of range) passes on
        target = (m * a) / jnp.where(defined, den, 1.0)
        target = _validation.nan_unless(valid, target)
        scale = _leaf_scale(jnp.where(defined, norms, 0.0), target)
        applied = _apply.apply_leaf_scales(
            updates, norms, scale, norms > target, policy, 2.0
        )
        level = jnp.max(target) if target.size else jnp.zeros((), _F32)
        reported = jnp.where(counts, level, state.clip_stats.clip_threshold)
        stats = _apply.record(
            state.clip_stats, applied, _validation.nan_unless(valid, reported)
        )
        new_state = AdaGNState(
            clip_stats=stats,
            adagn_norm_ema=jnp.where(counts, m, state.adagn_norm_ema).astype(_F32),
            adagn_norm_rms=jnp.where(counts, r, state.adagn_norm_rms).astype(_F32),
            adagn_steps=count_if(state.adagn_steps, counts),
        )
        return applied.updates, new_state

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, "adagn", axes)
