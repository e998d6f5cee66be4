"""Per-coordinate spike clipping: SPAM's and Stable-SPAM's (AdaClip).

:func:`spam_clip` clips against Adam's own second moment, :func:`adaclip`
against an EMA of each leaf's largest magnitude.

Both clip single coordinates rather than a whole tree or leaf: a spike in a
few entries of a large tensor is cut down without shrinking the rest of it.
:func:`spam_clip` wraps an Adam-like optimizer and reads the optimizer's
second moment from its state (no second copy of the moments);
:func:`adaclip` needs no optimizer state and is an ordinary transform to put
before any optimizer in a chain.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_clip import (
    _apply,
    _collectives,
    _fail_fast,
    _guards,
    _norms,
    _plan,
    _reduce,
    _skippable,
    _validation,
    _xla_cpu,
)
from optax_clip._stats import ClipStats, count_if, init_clip_stats

_F32 = jnp.float32
_I32 = jnp.int32

#: The optax states whose ``nu`` is Adam's (raw) second moment of each
#: coordinate, with a ``count`` of the gradients it holds.
SECOND_MOMENT_STATES = (optax.ScaleByAdamState, optax.ScaleByAmsgradState)


def _is_moment_state(x: Any) -> bool:
    return isinstance(x, SECOND_MOMENT_STATES)


def _moment_states(tree: Any) -> list[Any]:
    return [
        x
        for x in jax.tree.leaves(tree, is_leaf=_is_moment_state)
        if _is_moment_state(x)
    ]


def _second_moment(name: str, inner_state: Any) -> Any:
    """The one :data:`SECOND_MOMENT_STATES` node of ``inner_state``."""
    found = _moment_states(inner_state)
    if len(found) != 1:
        what = "none" if not found else f"{len(found)}"
        raise ValueError(
            f"{name} reads Adam's second moment (the 'nu' of an "
            "optax.ScaleByAdamState or optax.ScaleByAmsgradState: optax.adam, "
            "adamw, nadam, radam, lamb, amsgrad, or optax_clip.adam / adamw / "
            f"scale_by_adam) from the wrapped optimizer's state, and needs "
            f"exactly one; found {what}. Wrap each optimizer of an "
            "optax.multi_transform on its own."
        )
    return found[0]


def _moments_per_leaf(name: str, updates: Any, nu: Any) -> list[Any]:
    """``nu``'s subtree for each leaf of ``updates`` (a MaskedNode where masked)."""
    treedef = jax.tree.structure(updates)
    try:
        parts = treedef.flatten_up_to(nu)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name}: the updates do not have the structure of the wrapped "
            f"optimizer's second moment ({e})."
        ) from None
    for g, v in zip(jax.tree.leaves(updates), parts, strict=True):
        if isinstance(v, jax.Array | jax.ShapeDtypeStruct) and v.shape != jnp.shape(g):
            raise ValueError(
                f"{name}: a leaf of shape {jnp.shape(g)} has a second moment of "
                f"shape {v.shape}."
            )
    return parts


@jax.custom_jvp
def _sqrt0(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x > 0``, else 0 (also for NaN); derivative 0 there.

    One select inside the square root (``sqrt(0)`` is 0): XLA keeps the
    result of a square root read by several kernels in memory, and a select
    after it would be redone in each reader, which then reads ``x`` too.
    """
    return jnp.sqrt(jnp.where(x > 0, x, jnp.zeros_like(x)))


@_sqrt0.defjvp
def _sqrt0_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    pos = x > 0
    root = jnp.sqrt(jnp.where(pos, x, jnp.ones_like(x)))
    y = jnp.where(pos, root, jnp.zeros_like(x))
    return y, jnp.where(pos, t * (0.5 / root), jnp.zeros_like(t))


def _bounded(g: jax.Array, a: jax.Array, bound: jax.Array) -> jax.Array:
    """``g`` with magnitude ``bound`` (``a = |g| > bound``), in ``g``'s dtype.

    Rounded toward zero into a narrow float, so it never exceeds ``bound``.
    """
    acc = a.dtype
    if jnp.iscomplexobj(g):
        y = g.astype(jnp.promote_types(g.dtype, acc)) * (bound / a)
    else:
        y = jnp.copysign(bound, g.astype(acc))
    if jnp.dtype(g.dtype).itemsize < jnp.dtype(y.dtype).itemsize:
        return _apply.cast_toward_zero(y, g.dtype)
    return y.astype(g.dtype)


def _spam_stats(decide, gs, vs, pre, axes):
    """``(post-clip 2-norm, clipped coordinates)`` of spam_clip, in one pass.

    Each leaf is read once more, in one reduction of two outputs: the sum of
    the squared clipped magnitudes divided by the pre-clip norm (at most 1
    each, so the sum cannot overflow), and the number of clipped
    coordinates. Computed apart (a norm of the clipped leaves and a count),
    the statistics took 3x AdamW's whole step on XLA:CPU at 5M values.
    """
    if not gs:
        return jnp.zeros((), _F32), jnp.zeros((), _I32)
    pre = lax.stop_gradient(pre)  # statistics: no gradient (nor JVP rule)
    safe = jnp.where(jnp.isfinite(pre) & (pre > 0), pre, 1.0).astype(_F32)
    # 1 / pre as a power of two times a number in (1, 2]: no subnormal (a
    # plain 1 / 3e38 is flushed to 0), and multiplications in the loop.
    f1, f2 = _norms.pow2_factors(_norms.exponent(safe), safe.dtype)
    inv = 1.0 / ((safe * f1) * f2)
    sums, counts = [], []
    for g, v in zip(gs, vs, strict=True):
        a, bound, clip = lax.stop_gradient(decide(g, v))
        c1, c2, c3 = (x.astype(a.dtype) for x in (f1, f2, inv))
        m = lax.mul(lax.mul(lax.mul(jnp.where(clip, bound, a), c1), c2), c3)
        pair = (lax.mul(m, m), clip.astype(_I32))
        if not _plan.is_local(g):  # sharded: reductions the partitioner splits
            sums.append(jnp.sum(pair[0]).astype(_F32).reshape(1))
            counts.append(jnp.sum(pair[1]).reshape(1))
            continue
        rows = [_xla_cpu.split_rows(x) for x in pair]
        if rows[0] is not None:
            pair, axes_ = tuple(rows), (1,)
        else:
            pair, axes_ = tuple(x.reshape(1, -1) for x in pair), (1,)

        def add(u, w):
            return lax.add(u[0], w[0]), lax.add(u[1], w[1])

        zero = (jnp.zeros((), pair[0].dtype), jnp.zeros((), _I32))
        s_rows, c_rows = lax.reduce(pair, zero, add, axes_)
        sums.append(jnp.sum(s_rows).astype(_F32).reshape(1))
        counts.append(jnp.sum(c_rows).reshape(1))
    leaves_axes = _collectives.leaf_axes(gs, axes)
    total = jnp.sum(_collectives.combine(sums, leaves_axes, "sum"))
    n = jnp.sum(_collectives.combine(counts, leaves_axes, "sum"))
    post = jnp.where(jnp.isfinite(pre) & (pre > 0), safe * jnp.sqrt(total), pre)
    return post.astype(_F32), n.astype(_I32)


def _count(flags: jax.Array) -> jax.Array:
    """Number of true ``flags`` (int32), a reduction XLA:CPU fuses and splits."""
    x = flags.astype(_I32)
    rows = _xla_cpu.split_rows(x) if _plan.is_local(x) else None
    return jnp.sum(x) if rows is None else jnp.sum(jnp.sum(rows, axis=1))


def _short_names(cls, **fields: str):
    for name, field in fields.items():
        setattr(cls, name, property(operator.attrgetter(field), doc=f"``{field}``."))
    return cls


# --------------------------------------------------------------------------
# SPAM
# --------------------------------------------------------------------------


class SpamClipState(NamedTuple):
    """State of :func:`spam_clip`.

    Attributes:
      spam_inner_state: the wrapped optimizer's state (its ``nu`` is the
        second moment the clip reads).
      clip_stats: :class:`optax_clip.ClipStats` of the last step:
        ``pre_clip_norm`` and ``post_clip_norm`` are the global 2-norms of the
        gradient before and after the clip (what ``inner`` received),
        ``clip_scale`` their ratio (not the smallest factor applied to a
        coordinate, which would cost one more pass), ``clip_threshold`` is
        ``theta``.
      spam_clipped_coords: number of coordinates clipped on the last step
        (int32). Key (and property) ``clipped_coordinates`` in
        :func:`optax_clip.get_stats`.
    """

    spam_inner_state: Any
    clip_stats: ClipStats
    spam_clipped_coords: jax.Array
    _stats_name = "spam_clip"
    _stats_fields = ("clipped_coordinates",)


_short_names(SpamClipState, clipped_coordinates="spam_clipped_coords")


def spam_clip(
    inner: optax.GradientTransformation,
    theta: jax.typing.ArrayLike = 5000.0,
    *,
    warmup_steps: jax.typing.ArrayLike = 20,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips each coordinate against the wrapped Adam's own second moment (SPAM).

    With :math:`v_{t-1}` the second moment held in ``inner``'s state (before
    this step's gradient enters it), every coordinate is clipped as

    .. math::

      g_i \leftarrow \operatorname{sign}(g_i) \sqrt{\theta\, v_{t-1,i}}
      \quad \text{where } g_i^2 > \theta\, v_{t-1,i} \text{ and } v_{t-1,i} > 0

    and the clipped gradient is passed to ``inner``, whose update is
    returned. :math:`v` is read from ``inner``'s state, so there is no second
    copy of the moments: ``inner`` must hold exactly one
    :class:`optax.ScaleByAdamState` or :class:`optax.ScaleByAmsgradState`
    (:func:`optax.adam`, :func:`optax.adamw`, ``nadam``, ``radam``,
    ``lamb``, ``amsgrad``, :func:`optax_clip.adamw`, ...; a chain with a clip
    before Adam is fine). Anything else raises at ``init``. (``adamax`` and
    ``yogi`` store other quantities in the same state type: not meaningful.)

    As in the authors' code, :math:`v` is Adam's raw moment (not
    bias-corrected) and the clip is off while it holds fewer than
    ``warmup_steps`` gradients: at the first step :math:`v = 0` and the rule
    would zero every coordinate; early on :math:`v` underestimates
    :math:`E[g^2]` by the factor :math:`1 - \beta_2^t`. The count is that of
    the optimizer's state, so the warm-up restarts whenever the moments are
    reset (``reset_every`` / ``reset_on_skip`` of
    :func:`optax_clip.skip_on_spike`, SPAM's momentum reset).

    One deliberate difference: a coordinate whose :math:`v` is 0 (or NaN) is
    left as it is. The reference sets it to 0, and since :math:`v` then stays
    0 it is zeroed for ever: an embedding row first used after the warm-up
    would never train.

    Non-finite policy: with ``"propagate"`` NaN and Inf coordinates pass to
    ``inner`` unchanged (never silently clipped to a finite value); with
    ``"zero_update"`` a step with any NaN or Inf passes zeros to ``inner``
    (as ``chain(clip(nonfinite="zero_update"), inner)`` would); ``"raise"``
    is ``"propagate"`` that also raises on such a step (see
    :func:`optax_clip.clip_by_global_norm`). To skip such
    a step and keep the moments, put the whole wrapper inside
    :func:`optax_clip.skip_nonfinite`.

    **Cost.** An elementwise pass over the gradient and :math:`v`, the
    pre-clip norm, and one more pass for the statistics (post-clip norm and
    clipped coordinates). On a 2-core CPU, one optimizer step of
    ``spam_clip(adamw)`` took 1.6 to 2.1 times AdamW's alone at 5.3M float32
    values (``python -m benchmarks.coordinate_clip timing``, three runs), and
    a whole train step 1.05 to 1.18 times (section g of the harness); not
    measured on an accelerator.

    Args:
      inner: the optimizer to wrap (see above for which).
      theta: :math:`\theta` (>= 0; default 5000, SPAM's; ``inf`` turns the clip
        off). May be traced by :func:`optax.inject_hyperparams`.
      warmup_steps: the clip is on once :math:`v` holds this many gradients
        (an integer >= 0; default 20, the reference's ``grad_accu_steps``,
        which starts the clip at the 20th step after each reset and one step
        earlier on the very first cycle).
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or ``"raise"``.
      axis_name: mapped axes over which the update is sharded; only the
        statistics reduce across them (the clip is per coordinate).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`SpamClipState`.

    Example:
      >>> import jax.numpy as jnp, optax, optax_clip
      >>> tx = optax_clip.spam_clip(optax.scale_by_adam(b2=0.9), 100.0, warmup_steps=2)
      >>> state = tx.init(jnp.zeros(2))
      >>> for _ in range(3):
      ...     _, state = tx.update(jnp.array([1.0, 1.0]), state)
      >>> _, state = tx.update(jnp.array([1e4, 1.0]), state)  # a spike in one entry
      >>> int(state.clipped_coordinates)
      1
      >>> state.clip_stats.post_clip_norm  # 1e4 entered as sqrt(100 * 0.271) = 5.21
      Array(5.3009434, dtype=float32)

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable
      LLM Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025
      (``threshold=5000``, ``grad_accu_steps=20``).
    """
    name = "spam_clip"
    inner = _guards._checked_inner(name, inner)
    valid = _validation.all_valid(
        _validation.nonnegative("theta", theta),
        _validation.count("warmup_steps", warmup_steps, minimum=0),
    )
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)

    def init_fn(params):
        inner_state = inner.init(params)
        node = _second_moment(name, inner_state)
        _moments_per_leaf(name, params, node.nu)
        return SpamClipState(
            spam_inner_state=inner_state,
            clip_stats=init_clip_stats(theta),
            spam_clipped_coords=jnp.zeros((), _I32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        leaves = _validation.float_leaves(updates)
        node = _second_moment(name, state.spam_inner_state)
        parts = _moments_per_leaf(name, updates, node.nu)
        pre = _norms.global_norm(leaves, 2.0, axes)
        nonfinite_step = ~jnp.isfinite(pre)
        threshold = _apply.threshold_array(theta, _F32, valid)
        root_theta = _sqrt0(threshold)  # NaN stays NaN
        root_theta = jnp.where(jnp.isnan(threshold), threshold, root_theta)
        active = node.count >= jnp.asarray(warmup_steps).astype(node.count.dtype)

        def decide(g, v):
            """``(|g|, sqrt(theta * v), where to clip)`` in float32 or wider."""
            acc = _reduce.accumulation_dtype(g.dtype)
            a = jnp.abs(g).astype(acc)
            r = _sqrt0(v.astype(acc))
            bound = root_theta.astype(acc) * r
            # ~(a <= bound): a NaN bound (an invalid traced theta) clips.
            return a, bound, active & (r > 0) & jnp.isfinite(a) & ~(a <= bound)

        # Leaves the optimizer holds a moment for (not masked out, not empty).
        held = [
            i
            for i, (g, v) in enumerate(zip(leaves, parts, strict=True))
            if isinstance(v, jax.Array) and g.size
        ]
        out = list(leaves)
        for i in held:
            g = leaves[i]
            a, bound, clip = decide(g, parts[i])
            y = jnp.where(clip, _bounded(g, jnp.where(clip, a, 1), bound), g)
            if policy == "zero_update":
                y = jnp.where(nonfinite_step, jnp.zeros_like(y), y)
            out[i] = y
        post, n_clipped = _spam_stats(
            decide, [leaves[i] for i in held], [parts[i] for i in held], pre, axes
        )
        if len(held) < len(leaves):  # leaves passed through count as they are
            rest = [g for i, g in enumerate(leaves) if i not in set(held)]
            post = _norms.norm_of_values(
                jnp.stack([post, _norms.global_norm(rest, 2.0, axes)]), 2.0
            )
        if policy == "zero_update":
            zeroed = nonfinite_step
            post = jnp.where(zeroed, 0.0, post)
            n_clipped = jnp.where(zeroed, 0, n_clipped)
        new_updates, inner_state = inner.update(
            jax.tree.unflatten(jax.tree.structure(updates), out),
            state.spam_inner_state,
            params,
            **extra_args,
        )
        # The factor the norm was reduced by (not the smallest per coordinate:
        # one more full-size reduction).
        reduced = jnp.where(pre > 0, post / jnp.where(pre > 0, pre, 1), 1.0)
        reduced = jnp.where(nonfinite_step, post, reduced)
        applied = _apply.Applied(
            None, pre, post, reduced, n_clipped > 0, nonfinite_step
        )
        stats = _apply.record(state.clip_stats, applied, threshold)
        if policy == "raise":  # inside a guard, the guard's skip wins
            skip = _skippable.active_skip()
            bad = nonfinite_step if skip is None else nonfinite_step & ~skip
            _fail_fast.check(name, updates, bad, axes)
        return new_updates, SpamClipState(inner_state, stats, n_clipped.astype(_I32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# Stable-SPAM's AdaClip
# --------------------------------------------------------------------------


class AdaClipState(NamedTuple):
    r"""State of :func:`adaclip`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step, in the
        inf-norm: ``pre_clip_norm`` and ``post_clip_norm`` are the largest
        magnitude before and after the clip, ``clip_scale`` the smallest
        factor applied to a coordinate, ``clip_threshold`` the largest of the
        leaves' thresholds :math:`\hat m_t`.
      adaclip_max_ema: the EMA :math:`m_t` of each leaf's largest magnitude,
        one float32 vector with an entry per leaf (``jax.tree.leaves`` order).
      adaclip_steps: number of finite steps seen, the :math:`t` of the bias
        correction (int32, saturating).
      adaclip_clipped_coords: number of coordinates clipped on the last step
        (int32). Key (and property) ``clipped_coordinates``.
    """

    clip_stats: ClipStats
    adaclip_max_ema: jax.Array
    adaclip_steps: jax.Array
    adaclip_clipped_coords: jax.Array
    _stats_name = "adaclip"
    _stats_fields = ("adaclip_steps", "clipped_coordinates")


_short_names(AdaClipState, clipped_coordinates="adaclip_clipped_coords")


def adaclip(
    theta: jax.typing.ArrayLike = 0.999,
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
    r"""Clips each leaf's outlying coordinates to an EMA of its largest one (AdaClip).

    Stable-SPAM's AdaClip. For each leaf (tensor), with
    :math:`M_t = \max_i |g_i|` its largest magnitude on this step:

    .. math::

      m_t = \theta\, m_{t-1} + (1 - \theta) M_t, \quad
      \hat m_t = \frac{m_t}{1 - \theta^t}, \quad
      g_i \leftarrow g_i \frac{\hat m_t}{M_t}
      \quad \text{where } |g_i| > \hat m_t

    so the largest coordinate comes down to :math:`\hat m_t` exactly and every
    coordinate above :math:`\hat m_t` is scaled by the same factor (as in the
    paper and its code; a coordinate just above :math:`\hat m_t` ends below
    it). The EMA is fed the *unclipped* maximum. Nothing is clipped on the
    first step (:math:`\hat m_1 = M_1`). No optimizer state is needed: put it
    before the optimizer, ``chain(adaclip(), adamw(...))``. Stable-SPAM also
    normalises each tensor's gradient (AdaGN, :func:`optax_clip.adagn`, chained
    after this) and resets the moments (MoRet, the ``reset_every`` option of
    :func:`optax_clip.skip_on_spike`).

    **Cost.** One pass for each leaf's largest magnitude and one elementwise
    pass (with the count of clipped coordinates): 2.3 to 3.0 times AdamW's
    optimizer step alone at 5.3M float32 values on a 2-core CPU
    (``python -m benchmarks.coordinate_clip timing``), 1.06 to 1.08 times a
    whole train step (section g of the harness).

    Non-finite policy: a step with any NaN or Inf leaves the EMA and the step
    count as they were. With ``"propagate"`` only a leaf whose own values
    hold a NaN or Inf comes out as all NaN; with ``"zero_update"`` the whole
    update becomes zeros; ``"raise"`` is ``"propagate"`` that also raises.

    Args:
      theta: :math:`\theta`, the EMA decay, in ``[0, 1)`` (default 0.999,
        Stable-SPAM's). May be traced by :func:`optax.inject_hyperparams`.
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or ``"raise"``.
      axis_name: mapped axes over which leaves are sharded; each leaf's
        maximum is then that of the whole leaf.

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`AdaClipState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.adaclip(theta=0.5)
      >>> state = tx.init(jnp.zeros(3))
      >>> _, state = tx.update(jnp.array([1.0, -2.0, 0.5]), state)  # M = 2
      >>> out, state = tx.update(jnp.array([1.0, -8.0, 7.0]), state)  # M = 8
      >>> out  # m = 0.5 * 1 + 0.5 * 8, m_hat = m / (1 - 0.5**2) = 6; -8, 7 times 6/8
      Array([ 1.  , -6.  ,  5.25], dtype=float32)

    References:
      Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than
      16-Bit Adam <https://arxiv.org/abs/2502.17055>`_, 2025 (AdaClip,
      :math:`\theta = 0.999`).
    """
    valid = _validation.in_range("theta", theta, 0.0, 1.0)
    policy = _validation.policy(nonfinite)
    axes = _validation.axis_name(axis_name)

    def init_fn(params):
        return AdaClipState(
            clip_stats=init_clip_stats(0.0),
            adaclip_max_ema=jnp.zeros((len(jax.tree.leaves(params)),), _F32),
            adaclip_steps=jnp.zeros((), _I32),
            adaclip_clipped_coords=jnp.zeros((), _I32),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves = _validation.float_leaves(updates)
        treedef = jax.tree.structure(updates)
        maxes = _norms.leaf_norms(updates, jnp.inf, axes)
        ema = state.adaclip_max_ema
        if ema.shape != maxes.shape:
            raise ValueError(
                "adaclip: the updates have a different tree structure from the "
                f"parameters given to init ({maxes.shape[0]} leaves vs "
                f"{ema.shape[0]})."
            )
        big = maxes.astype(_F32)
        bad = ~jnp.isfinite(big)
        any_bad = jnp.any(bad)
        counts = jnp.asarray(valid) & ~any_bad
        th = _validation.nan_unless(valid, _validation.scalar_array(theta, _F32))
        t = optax.safe_increment(state.adaclip_steps)
        new_ema = th * ema + (1 - th) * jnp.where(bad, 0.0, big)
        m_hat = new_ema / (1 - th ** t.astype(_F32))
        # m_hat is at most M (up to rounding) on the first step: no clip.
        m_hat = jnp.where(state.adaclip_steps == 0, jnp.where(bad, 0.0, big), m_hat)
        m_hat = _validation.nan_unless(valid, m_hat)
        clip_leaf = ~(big <= m_hat)  # NaN m_hat: clipped (NaN), never silent
        num = jnp.where(clip_leaf, m_hat, 1.0)
        den = jnp.where(clip_leaf, big, 1.0)
        scale = _apply.make_scale(jnp.where(bad, 1.0, num), jnp.where(bad, 1.0, den))
        fill = 0.0 if policy == "zero_update" else jnp.nan
        zero = jnp.broadcast_to(any_bad, bad.shape) if policy == "zero_update" else bad
        scale, m_hat_b = _reduce.fusion_barrier((scale, m_hat))
        out, count_parts, live = [], [], []
        for i, g in enumerate(leaves):
            s_i = _apply.Scale(*(v[i] for v in scale))
            if g.size == 0:
                out.append(g)
                continue
            acc = _reduce.accumulation_dtype(g.dtype)
            a = jnp.abs(g).astype(acc)
            over = ~(a <= m_hat_b[i].astype(acc)) & jnp.isfinite(a)
            y = jnp.where(over, _apply._scaled(g, s_i), g)
            y = jnp.where(zero[i], jnp.full_like(y, fill), y)
            out.append(y)
            count_parts.append(_count(over).reshape(1))
            live.append(g)
        if count_parts:
            leaves_axes = _collectives.leaf_axes(live, axes)
            n_clipped = jnp.sum(_collectives.combine(count_parts, leaves_axes, "sum"))
        else:
            n_clipped = jnp.zeros((), _I32)
        n_clipped = jnp.where(any_bad & (policy == "zero_update"), 0, n_clipped)
        pre = _norms.norm_of_values(big, jnp.inf)
        post_each = jnp.where(zero, fill, jnp.where(clip_leaf, m_hat, big))
        post = _norms.norm_of_values(post_each, jnp.inf) if big.size else pre
        factor = jnp.where(clip_leaf & ~bad, scale.value, 1.0)
        smallest = jnp.min(factor) if big.size else jnp.ones((), _F32)
        smallest = jnp.where(any_bad, fill, smallest)
        level = jnp.max(m_hat) if big.size else jnp.zeros((), _F32)
        applied = _apply.Applied(None, pre, post, smallest, n_clipped > 0, any_bad)
        reported = jnp.where(counts, level, state.clip_stats.clip_threshold)
        stats = _apply.record(
            state.clip_stats, applied, _validation.nan_unless(valid, reported)
        )
        new_state = AdaClipState(
            clip_stats=stats,
            adaclip_max_ema=jnp.where(counts, new_ema, ema).astype(_F32),
            adaclip_steps=count_if(state.adaclip_steps, counts),
            adaclip_clipped_coords=n_clipped.astype(_I32),
        )
        return jax.tree.unflatten(treedef, out), new_state

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, "adaclip", axes)
