"""Clip statistics kept in every transform's state, and :func:`get_stats`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clip import _validation


class ClipStats(NamedTuple):
    """What a clipping transform did on its last step, and running counts.

    Every norm-based transform of ``optax_clip`` keeps one of these in its state
    (field ``clip_stats``); :func:`get_stats` collects them for a logger. All
    fields are scalars of fixed dtype, so states stay checkpointable and can be
    the carry of ``jax.lax.scan``.

    Attributes:
      pre_clip_norm: norm of the incoming updates (float32). NaN or Inf when the
        updates held a NaN or Inf.
      post_clip_norm: norm of the outgoing updates, computed from the norms and
        scales (no second pass over the gradients; float32).
      clip_scale: factor applied to the updates (1.0 when untouched, 0.0 when a
        non-finite step was zeroed). Per-leaf and per-element methods report the
        smallest factor applied to any leaf or element. A positive factor below
        float32's normal range (clipping a norm of 3e38 to 1) reads as the
        smallest normal float32, 1.18e-38, never as 0.
      clip_threshold: threshold in force on the last step (float32); NaN when
        a traced hyper-parameter was out of range on that step.
      is_clipped: 1 if the last step was rescaled, else 0 (int32).
      is_nonfinite: 1 if the last step's updates held a NaN or Inf (int32).
      num_updates: number of steps seen (int32, saturating).
      num_clipped: number of steps that were rescaled (int32, saturating).
      num_nonfinite: number of steps with a NaN or Inf (int32, saturating).
    """

    pre_clip_norm: jax.Array
    post_clip_norm: jax.Array
    clip_scale: jax.Array
    clip_threshold: jax.Array
    is_clipped: jax.Array
    is_nonfinite: jax.Array
    num_updates: jax.Array
    num_clipped: jax.Array
    num_nonfinite: jax.Array


def init_clip_stats(threshold: Any = 0.0) -> ClipStats:
    """Fresh statistics: zero counts, unit scale, the given threshold."""
    f32, i32 = jnp.float32, jnp.int32
    return ClipStats(
        pre_clip_norm=jnp.zeros((), f32),
        post_clip_norm=jnp.zeros((), f32),
        clip_scale=jnp.ones((), f32),
        clip_threshold=_validation.scalar_array(threshold, f32),
        is_clipped=jnp.zeros((), i32),
        is_nonfinite=jnp.zeros((), i32),
        num_updates=jnp.zeros((), i32),
        num_clipped=jnp.zeros((), i32),
        num_nonfinite=jnp.zeros((), i32),
    )


def count_if(count: jax.Array, flag: Any) -> jax.Array:
    """``count + 1`` where ``flag``, saturating at the largest value of its dtype."""
    return jnp.where(flag, optax.safe_increment(count), count).astype(count.dtype)


def _narrow_positive(x: jax.Array) -> jax.Array:
    """``x`` as float32; a positive ``x`` below its normal range reads as ``tiny``.

    The smallest normal float32, never 0: a scale that small is a real clip.
    """
    f32 = jnp.float32
    y = x.astype(f32)
    tiny = jnp.finfo(f32).tiny
    return jnp.where((x > 0) & (y < tiny), jnp.asarray(tiny, f32), y)


def update_clip_stats(
    stats: ClipStats,
    *,
    pre_norm: jax.Array,
    post_norm: jax.Array,
    scale: jax.Array,
    threshold: jax.Array,
    clipped: jax.Array,
    nonfinite: jax.Array,
) -> ClipStats:
    """The statistics after one step (dtypes and shapes as in ``stats``)."""
    f32 = jnp.float32
    clipped = jnp.asarray(clipped, bool)
    nonfinite = jnp.asarray(nonfinite, bool)
    return ClipStats(
        pre_clip_norm=jnp.asarray(pre_norm).astype(f32),
        post_clip_norm=jnp.asarray(post_norm).astype(f32),
        clip_scale=_narrow_positive(jnp.asarray(scale)),
        clip_threshold=jnp.asarray(threshold).astype(f32),
        is_clipped=clipped.astype(jnp.int32),
        is_nonfinite=nonfinite.astype(jnp.int32),
        num_updates=count_if(stats.num_updates, True),
        num_clipped=count_if(stats.num_clipped, clipped),
        num_nonfinite=count_if(stats.num_nonfinite, nonfinite),
    )


# --------------------------------------------------------------------------
# get_stats
# --------------------------------------------------------------------------


def _unwrap(x: Any) -> Any:
    """Array value of ``x``, also when Flax NNX wraps state arrays in Variables."""
    if isinstance(x, jax.Array) or not hasattr(x, "get_value"):
        return x
    return x.get_value()


def _is_stats_owner(x: Any) -> bool:
    """Our state classes say how they appear in :func:`get_stats`."""
    return isinstance(x, tuple) and hasattr(type(x), "_stats_name")


def _key_str(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)  # pragma: no cover - unknown key type


def _records(state: Any, path: tuple[str, ...]):
    """Yields ``(name, path, {field: value})`` for each stats owner in ``state``."""
    found, _ = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: x is not state and _is_stats_owner(x)
    )
    if _is_stats_owner(state):
        found = [((), state)]
    for key_path, node in found:
        if not _is_stats_owner(node):
            continue
        node_path = path + tuple(_key_str(k) for k in key_path)
        values: dict[str, Any] = {}
        stats = getattr(node, "clip_stats", None)
        if stats is not None:
            values.update(
                {f: _unwrap(v) for f, v in zip(stats._fields, stats, strict=True)}
            )
        for field in getattr(type(node), "_stats_fields", ()):
            values[field] = _unwrap(getattr(node, field))
        yield type(node)._stats_name, node_path, values
        # Wrappers (guards) hold inner optimizer states that may hold clippers.
        for child_name, child in zip(node._fields, node, strict=True):
            if child_name == "clip_stats":
                continue
            if any(True for _ in _iter_owners(child)):
                yield from _records(child, node_path + (child_name,))


def _iter_owners(tree: Any):
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_is_stats_owner)
    return (x for x in leaves if _is_stats_owner(x))


def get_stats(opt_state: Any, *, prefix: str = "") -> dict[str, jax.Array]:
    """Collects the clip statistics of every optax_clip transform in a state.

    Walks any optax state (``chain``, ``inject_hyperparams``, ``masked``,
    ``partition``/``multi_transform``, ``MultiSteps``, our guards, Flax NNX
    optimizer states, ...) and returns one flat dict of scalars, ready for a
    logger. Keys are ``"<method>/<field>"``; when the same method appears more
    than once, the path to each one inside the state is added
    (``"<method>/<path>/<field>"``) so that keys never collide. Besides the
    :class:`ClipStats` fields, adaptive methods add their own (e.g. the EMA of
    the norm), and ``clip_fraction`` is the fraction of steps that were clipped.

    Args:
      opt_state: an optimizer state, or any pytree containing some.
      prefix: prepended to every key (e.g. ``"train/"``).

    Returns:
      A dict from string keys to scalar arrays (no host transfer is done; call
      ``jax.device_get`` on it to get Python-side numbers). Works under ``jit``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_clip
      >>> tx = optax.chain(optax_clip.clip_by_global_norm(1.0), optax.adam(1e-3))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> stats = optax_clip.get_stats(state)
      >>> float(stats["clip_by_global_norm/pre_clip_norm"])
      5.0
      >>> int(stats["clip_by_global_norm/num_clipped"])
      1
    """
    records = list(_records(opt_state, ()))
    counts: dict[str, int] = {}
    for name, _, _ in records:
        counts[name] = counts.get(name, 0) + 1
    out: dict[str, jax.Array] = {}
    for name, path, values in records:
        base = name if counts[name] == 1 else "/".join((name, *path))
        if "num_clipped" in values and "num_updates" in values:
            steps = jnp.maximum(jnp.asarray(values["num_updates"]), 1)
            values["clip_fraction"] = jnp.asarray(values["num_clipped"]) / steps
        for field, value in values.items():
            out[f"{prefix}{base}/{field}"] = value
    return out
