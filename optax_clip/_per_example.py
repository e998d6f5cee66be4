"""Per-example clipping (differential privacy): clip each example, then sum.

:func:`per_example_global_norm_clip` and :func:`per_example_layer_norm_clip`
take the same arguments as optax's functions of those names and return the
same things, with this library's numerics: each example's norm is accumulated
in float32 (float64 for float64 leaves) and never overflows (``_norms``), the
scale is exactly 1 below the threshold and finite at zero (``_apply``), and a
non-finite example follows a documented policy.

They are functions, not :class:`optax.GradientTransformation` s, like optax's:
their input has a batch axis that the parameters lack, and their output (the
sum over the batch) has a different shape from their input, so they cannot
sit in an ``optax.chain``. They go where the per-example gradients are
computed, before the noise of DP-SGD is added and the sum reaches the
optimizer (see :func:`optax.contrib.differentially_private_aggregate`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_clip import _apply, _fail_fast, _norms, _validation

_I32 = jnp.int32


def _batched_leaves(name: str, grads: Any) -> list[jax.Array]:
    """The leaves of ``grads``; raises unless all share a leading batch axis."""
    leaves = [jnp.asarray(x) for x in _validation.float_leaves(grads)]
    if not leaves:
        raise ValueError(f"{name}: grads has no leaves (no batch axis to clip over).")
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = jax.tree.map(jnp.shape, grads)
        raise ValueError(
            f"{name} expects every leaf of grads to have the same leading batch "
            f"axis (one per-example gradient per row); got shapes {shapes}."
        )
    return leaves


def _example_norms(leaves: list[jax.Array]) -> jax.Array:
    """``(leaves, batch)``: the 2-norm of each example's part of each leaf."""
    axes = [tuple(range(1, x.ndim)) for x in leaves]
    norms = _norms.unit_norms(leaves, axes)
    dtype = jnp.result_type(*norms)
    return jnp.stack([n.reshape(n.shape[0]).astype(dtype) for n in norms])


class _Clipped:
    """Each example's clip of one leaf (or all): scale factors and flags."""

    def __init__(self, norm: jax.Array, threshold: jax.Array, policy: str):
        self.bad = ~jnp.isfinite(norm)
        num, den, clipped = _apply.clip_factor(norm, threshold)
        self.scale = _apply._with_policy(policy, _apply.make_scale(num, den), self.bad)
        self.clipped = clipped & ~self.bad
        self.policy = policy

    def sum(self, x: jax.Array) -> jax.Array:
        """The sum over the batch of ``x``'s examples, each scaled (x's dtype)."""
        acc = jnp.promote_types(x.dtype, self.scale.hi.dtype)
        shape = (-1,) + (1,) * (x.ndim - 1)
        hi, lo = (f.astype(acc).reshape(shape) for f in self.scale[1:])
        y = (x.astype(acc) * hi) * lo
        if self.policy == "zero_update":  # Inf * 0 is NaN: select zeros.
            y = jnp.where(self.bad.reshape(shape), jnp.zeros_like(y), y)
        return jnp.sum(y, axis=0).astype(x.dtype)


def _layer_threshold(c: Any, share: float, norms: jax.Array, valid) -> jax.Array:
    """``c * sqrt(share)`` as a scalar of ``norms``' dtype (on the host if concrete)."""
    if _validation.is_traced(c):
        root = jnp.asarray(share**0.5, norms.dtype)
        return _apply.threshold_array(c, norms.dtype, valid) * root
    return _apply.threshold_array(np.float64(c) * share**0.5, norms.dtype, valid)


def per_example_global_norm_clip(
    grads: Any,
    l2_norm_clip: jax.typing.ArrayLike,
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
) -> tuple[Any, jax.Array]:
    r"""Clips each example's gradient to a global 2-norm, then sums the batch.

    For per-example gradients :math:`g_b` (row ``b`` of every leaf):

    .. math::

      \sum_b g_b \cdot \min\left(1, \frac{C}{\lVert g_b \rVert_2}\right),
      \qquad \lVert g_b \rVert_2^2 = \sum_{\text{leaves}} \sum_i g_{b,i}^2

    The same arguments and results as :func:`optax.per_example_global_norm_clip`
    (a function, not a transformation: the batch axis is not the parameters'),
    with these differences:

    * each example's norm is accumulated in float32 (float64 for float64
      leaves) and never overflows: an example with an element of 1e20 in
      float32 is scaled to norm ``C``, where optax's norm is ``inf`` and the
      example is dropped (multiplied by 0);
    * ``C = 0`` and all-zero examples give zeros, and the gradient through the
      function is finite at zero;
    * the scaled examples are summed in float32 (or wider) and the sum is
      returned in the leaf's dtype;
    * a negative or NaN concrete ``l2_norm_clip`` raises (a traced one makes
      the sum NaN), and integer or bool leaves raise.

    Non-finite policy, per example: with ``"propagate"`` an example holding a
    NaN or Inf makes the sum NaN (optax's sum is NaN too); with
    ``"zero_update"`` it is left out of the sum (and not counted as clipped);
    ``"raise"`` computes as ``"propagate"`` and raises (see the numerics
    guide).

    Args:
      grads: a pytree of per-example gradients, every leaf with the same
        leading batch axis.
      l2_norm_clip: :math:`C`, the largest 2-norm of an example's gradient (a
        scalar >= 0; ``inf`` sums without clipping).
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or ``"raise"``.

    Returns:
      ``(clipped_sum, num_clipped)``: the sum over the batch of the clipped
      examples (the structure of ``grads``, without the batch axis) and the
      number of examples that were scaled down (int32).

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> grads = [jnp.array([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
      >>> optax_clip.per_example_global_norm_clip(grads, 1.25)
      ([Array([1.75, 1.75, 1.75], dtype=float32)], Array(3, dtype=int32))
      >>> big = [jnp.array([[1e20, 0.0], [0.0, 1.0]])]  # optax: [0., 1.]
      >>> optax_clip.per_example_global_norm_clip(big, 1.0)[0]
      [Array([1., 1.], dtype=float32)]

    References:
      Abadi et al., `Deep Learning with Differential Privacy
      <https://arxiv.org/abs/1607.00133>`_, 2016
    """
    name = "per_example_global_norm_clip"
    policy = _validation.policy(nonfinite)
    valid = _validation.nonnegative("l2_norm_clip", l2_norm_clip)
    leaves = _batched_leaves(name, grads)
    norm = _norms.norm_of_rows(_example_norms(leaves))
    threshold = _apply.threshold_array(l2_norm_clip, norm.dtype, valid)
    clip = _Clipped(norm, threshold, policy)
    if policy == "raise":
        _fail_fast.check(name, grads, jnp.any(clip.bad))
    out = jax.tree.unflatten(jax.tree.structure(grads), [clip.sum(x) for x in leaves])
    return out, jnp.sum(clip.clipped, dtype=_I32)


def per_example_layer_norm_clip(
    grads: Any,
    global_l2_norm_clip: jax.typing.ArrayLike,
    uniform: bool = True,
    *,
    nonfinite: _validation.NonFinitePolicy = "propagate",
) -> tuple[Any, Any]:
    r"""Clips each example's gradient leaf by leaf, then sums the batch.

    Each leaf (layer) :math:`k` of :math:`K` has its own threshold, such that
    the clipped examples have global norm at most :math:`C`:

    .. math::

      C_k = \frac{C}{\sqrt{K}} \;\text{(uniform)} \quad\text{or}\quad
      C_k = C\sqrt{\frac{D_k}{D}}, \qquad
      \sum_b g_{b,k} \cdot \min\left(1,
      \frac{C_k}{\lVert g_{b,k} \rVert_2}\right)

    with :math:`D_k` the size of one example of leaf :math:`k` and :math:`D`
    their total. The same arguments and results as
    :func:`optax.per_example_layer_norm_clip`, with the numerics of
    :func:`per_example_global_norm_clip` (float32 accumulation, no overflow,
    no NaN at zero, the non-finite policy applied per example and leaf:
    ``"zero_update"`` leaves that part out of the sum).

    Args:
      grads: a pytree of per-example gradients, every leaf with the same
        leading batch axis.
      global_l2_norm_clip: :math:`C` (a scalar >= 0).
      uniform: ``True`` (default) for :math:`C_k = C / \sqrt{K}`, ``False``
        for :math:`C_k = C \sqrt{D_k / D}`.
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or ``"raise"``.

    Returns:
      ``(clipped_sum, num_clipped)``: the sum over the batch of the clipped
      examples, and for each leaf the number of examples scaled down in it
      (int32), both with the structure of ``grads``.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> grads = {"a": jnp.array([[3.0, 4.0], [0.0, 0.1]]),
      ...          "b": jnp.array([[0.0], [2.0]])}
      >>> sums, counts = optax_clip.per_example_layer_norm_clip(grads, 2**0.5)
      >>> sums["a"]  # C_k = 1: [3, 4] scaled to [0.6, 0.8], plus [0, 0.1]
      Array([0.6       , 0.90000004], dtype=float32)
      >>> sums["b"], counts["a"], counts["b"]
      (Array([1.], dtype=float32), Array(1, dtype=int32), Array(1, dtype=int32))

    References:
      McMahan et al., `Learning Differentially Private Recurrent Language
      Models <https://arxiv.org/abs/1710.06963>`_, 2018
    """
    name = "per_example_layer_norm_clip"
    policy = _validation.policy(nonfinite)
    valid = _validation.nonnegative("global_l2_norm_clip", global_l2_norm_clip)
    uniform = _validation.flag("uniform", uniform)
    leaves = _batched_leaves(name, grads)
    norms = _example_norms(leaves)
    sizes = [x[0].size for x in leaves]
    total = sum(sizes)
    sums, counts, bad = [], [], []
    for x, n, size in zip(leaves, norms, sizes, strict=True):
        share = 1.0 / len(leaves) if uniform else (size / total if total else 0.0)
        clip = _Clipped(
            n, _layer_threshold(global_l2_norm_clip, share, n, valid), policy
        )
        sums.append(clip.sum(x))
        counts.append(jnp.sum(clip.clipped, dtype=_I32))
        bad.append(jnp.any(clip.bad))
    if policy == "raise":
        _fail_fast.check(name, grads, jnp.any(jnp.stack(bad)))
    treedef = jax.tree.structure(grads)
    return jax.tree.unflatten(treedef, sums), jax.tree.unflatten(treedef, counts)
