"""Clip statistics kept in every transform's state, and :func:`get_stats`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clip import _validation, _xla_cpu


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


def leaf_paths(tree: Any) -> tuple[str, ...]:
    """Each leaf's path in ``tree``, its parts joined by ``/`` (``"layer1/w"``)."""
    found = jax.tree_util.tree_flatten_with_path(tree)[0]
    return tuple("/".join(_key_str(k) for k in path) for path, _ in found)


@jax.tree_util.register_pytree_with_keys_class
class LeafNorms:
    """One norm per leaf of the updates, kept in a state (``leaf_norms=True``).

    A single float32 vector rather than a tree of scalars: one buffer in the
    state, not one per leaf (each is an argument and a result of a jitted
    step). :func:`get_stats` reads it out as one key per leaf.

    Attributes:
      values: float32 array of shape ``(number of leaves,)``, in leaf order
        (the order of ``jax.tree.leaves(updates)``).
      paths: each leaf's path in the updates, its parts (dict keys, attribute
        names, sequence indices) joined by ``/``; static (part of the tree
        structure, not an array), ``""`` for a single array.
    """

    __slots__ = ("values", "paths")

    def __init__(self, values: Any, paths: tuple[str, ...]):
        self.values = values
        self.paths = tuple(paths)

    @classmethod
    def zeros(cls, tree: Any) -> LeafNorms:
        """Zeros, one per leaf of ``tree``."""
        paths = leaf_paths(tree)
        return cls(jnp.zeros((len(paths),), jnp.float32), paths)

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("values"), self.values),), self.paths

    def tree_flatten(self):
        return (self.values,), self.paths

    @classmethod
    def tree_unflatten(cls, paths, children):
        return cls(children[0], paths)

    def __repr__(self) -> str:
        return f"LeafNorms(values={self.values!r}, paths={self.paths!r})"


def renewed_leaf_norms(
    name: str, updates: Any, held: LeafNorms, norms: jax.Array
) -> LeafNorms:
    """This step's per-leaf ``norms`` (a vector, leaf order) in place of ``held``.

    Raises unless ``updates`` have the leaves ``held`` was made for (the
    parameters given to ``init``). ``name``: the transform's, for the message.
    """
    paths = leaf_paths(updates)
    if paths != held.paths:
        raise ValueError(
            f"optax_clip.{name}(leaf_norms=True): the state holds one norm per "
            "leaf of the parameters given to init, and the updates have other "
            f"leaves (state: {list(held.paths)}, updates: {list(paths)}). Call "
            "init with parameters shaped like the updates."
        )
    return LeafNorms(norms.astype(jnp.float32), paths)


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
# Windows of recent values (ring buffers of fixed shape)
# --------------------------------------------------------------------------


def window_push(values: jax.Array, pos: jax.Array, length: jax.Array, x, keep):
    """A ring buffer with ``x`` written at ``pos`` where ``keep``, else unchanged.

    ``values`` has a fixed length (the window); ``pos`` is the slot the next
    value goes to and ``length`` the number of values held (at most the
    window), so the first ``length`` slots are the meaningful ones. Returns
    ``(values, pos, length)`` with the dtypes they came in.
    """
    size = values.shape[0]
    keep = jnp.asarray(keep, bool)
    pushed = values.at[pos].set(jnp.asarray(x).astype(values.dtype))
    return (
        jnp.where(keep, pushed, values),
        jnp.where(keep, (pos + 1) % size, pos).astype(pos.dtype),
        jnp.where(keep, jnp.minimum(length + 1, size), length).astype(length.dtype),
    )


def window_moments(values: jax.Array, length: jax.Array, ddof: int = 0):
    """Mean and standard deviation of the first ``length`` values of a window.

    ``ddof=0``: the population deviation; ``ddof=1``: Bessel-corrected. 0 and
    0 for an empty window. Computed relative to the largest magnitude, so that
    values near the float range do not overflow when squared.
    """
    valid = jnp.arange(values.shape[0]) < length
    v = jnp.where(valid, values, 0)
    top = jnp.max(jnp.abs(v))
    unit = jnp.where(top > 0, top, 1)
    k = jnp.maximum(length, 1).astype(values.dtype)
    mean = jnp.sum(v / unit) / k
    dev = jnp.where(valid, v / unit - mean, 0)
    var = jnp.sum(dev * dev) / jnp.maximum(k - ddof, 1)
    return mean * unit, jnp.sqrt(var) * unit


# --------------------------------------------------------------------------
# get_stats
# --------------------------------------------------------------------------

# A state class takes part in get_stats through two class attributes:
#   _stats_name: the method's name, the first part of every key;
#   _stats_fields: the extra keys it reports, names of its fields or of
#     properties (a property gives a short key to a field whose name stays
#     distinctive for optax.tree.get: a guard's num_updates is guard_num_updates).
#   _stats_leaf_norms: the name of a field that is None or a tree of per-leaf
#     scalars, reported as "leaf_norm/<path in the tree>" (LEAF_NORM).
# A field named clip_stats (a ClipStats) adds the ClipStats fields.

#: The ``fields=`` name of the per-leaf norms, and the first part of their keys.
LEAF_NORM = "leaf_norm"


def _unwrap(x: Any) -> Any:
    """Array value of ``x``, also when Flax NNX wraps state arrays in Variables."""
    if isinstance(x, jax.Array) or not hasattr(x, "get_value"):
        return x
    return x.get_value()


def _is_stats_owner(x: Any) -> bool:
    """Our state classes say how they appear in :func:`get_stats`."""
    return isinstance(x, tuple) and hasattr(type(x), "_stats_name")


def _derived(keys: Sequence[str]) -> tuple[str, ...]:
    """The keys get_stats computes from others: the fractions of steps."""
    out = ()
    if "num_updates" in keys:
        if "num_clipped" in keys:
            out += ("clip_fraction",)
        if "skipped_steps" in keys:
            out += ("skip_fraction",)
    return out


def stats_keys(cls: type) -> tuple[str, ...]:
    """Every key (without the ``"<method>/"`` part) a state class reports."""
    keys: tuple[str, ...] = ()
    if "clip_stats" in getattr(cls, "_fields", ()):
        keys += ClipStats._fields
    keys += tuple(k for k in getattr(cls, "_stats_fields", ()) if k not in keys)
    return keys + _derived(keys)


def _known_owners() -> list[type]:
    """The state classes of every public transform (all are exported)."""
    import optax_clip  # the package imports every module that defines one

    return [
        obj
        for obj in vars(optax_clip).values()
        if isinstance(obj, type) and issubclass(obj, tuple)
        if hasattr(obj, "_stats_name")
    ]


def _key_str(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)  # pragma: no cover - unknown key type


def _owners(state: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple, Any]]:
    """Yields ``(path, owner)`` for each stats owner in ``state``, outer first."""
    found, _ = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: x is not state and _is_stats_owner(x)
    )
    if _is_stats_owner(state):
        found = [((), state)]
    for key_path, node in found:
        if not _is_stats_owner(node):
            continue
        node_path = path + tuple(_key_str(k) for k in key_path)
        yield node_path, node
        # Wrappers (guards) hold inner optimizer states that may hold clippers.
        for child_name, child in zip(node._fields, node, strict=True):
            if child_name != "clip_stats" and _holds_owner(child):
                yield from _owners(child, node_path + (child_name,))


def _leaf_values(node: Any) -> dict[str, Any]:
    """``{"leaf_norm/<path>": value}`` of an owner's per-leaf norms ({} if off)."""
    field = getattr(type(node), "_stats_leaf_norms", None)
    held = None if field is None else getattr(node, field)
    if held is None or not held.paths:
        return {}
    values = jnp.asarray(_unwrap(held.values))
    # One slice per entry compiles slowly on XLA:CPU (see _xla_cpu.entries).
    scalars = [e for (e,) in _xla_cpu.entries((values,))]
    keys = ["/".join((LEAF_NORM, p)) if p else LEAF_NORM for p in held.paths]
    return dict(zip(keys, scalars, strict=True))


def _holds_owner(tree: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_is_stats_owner)
    return any(_is_stats_owner(x) for x in leaves)


def _values(node: Any, wanted: frozenset[str] | None) -> dict[str, Any]:
    """``{key: value}`` of one stats owner (only the ``wanted`` keys, if given)."""
    cls = type(node)
    sources: dict[str, Any] = {}
    stats = getattr(node, "clip_stats", None) if "clip_stats" in cls._fields else None
    if stats is not None:
        sources.update(zip(stats._fields, stats, strict=True))
    for key in getattr(cls, "_stats_fields", ()):
        sources[key] = getattr(node, key)
    values = {
        k: _unwrap(v) for k, v in sources.items() if wanted is None or k in wanted
    }
    if wanted is None or LEAF_NORM in wanted:
        values.update(_leaf_values(node))
    for key in _derived(tuple(sources)):
        if wanted is not None and key not in wanted:
            continue
        count = "num_clipped" if key == "clip_fraction" else "skipped_steps"
        steps = jnp.maximum(jnp.asarray(_unwrap(sources["num_updates"])), 1)
        values[key] = jnp.asarray(_unwrap(sources[count])) / steps
    return values


# ----- what was passed when no statistics are found ------------------------

_WHAT_TO_PASS = (
    "Pass the optimizer's state: for an optax transformation tx, the state "
    "returned by tx.init(params) or tx.update(...); for Flax NNX, "
    "optimizer.opt_state; for a Flax Linen TrainState, state.opt_state."
)


def _is_nnx_state(x: Any) -> bool:
    return isinstance(x, Mapping) and type(x).__module__.startswith("flax.nnx")


def _is_state_node(x: Any) -> bool:
    """True for an optax state node: a NamedTuple (``EmptyState()`` too)."""
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _holds_optax_state(tree: Any) -> bool:
    if _is_state_node(tree):
        return True
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_is_state_node)
    return any(_is_state_node(x) for x in leaves)


def _state_field_names() -> set[str]:
    """Field names that only our states have (seen in a converted state)."""
    names = {"clip_stats"}
    for cls in _known_owners():
        names.update(f for f in cls._fields if f.startswith(("guard_", "skip")))
    return names


def _lost_types(tree: Any) -> bool:
    """Whether ``tree`` holds our states converted to plain containers."""
    ours = _state_field_names()
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(_key_str(k) in ours for k in path):
            return True
    return False


def _describe(x: Any) -> str:
    """``x``'s type for a message: ``None``, ``a dict``, ``flax.nnx...State``."""
    if x is None:
        return "None"
    cls = type(x)
    if cls.__module__ == "builtins":
        name = cls.__qualname__
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return f"a {cls.__module__}.{cls.__qualname__}"


def _check_not_empty(opt_state: Any) -> None:
    """Raises unless ``opt_state`` is an optimizer state (one without clips)."""
    if _is_nnx_state(opt_state):
        raise ValueError(
            "get_stats got a Flax NNX State (what nnx.state and nnx.split "
            "return), in which the optax state types that name the statistics "
            "are gone. " + _WHAT_TO_PASS
        )
    if _lost_types(opt_state):
        raise ValueError(
            f"get_stats got {_describe(opt_state)} that holds optax_clip state "
            "fields (clip_stats, ...) in plain containers: the state was "
            "converted (flax.serialization.to_state_dict, a checkpoint "
            "restored without a target, ...), and the types that name the "
            "statistics are gone. Restore checkpoints into tx.init(params). "
            + _WHAT_TO_PASS
        )
    if not _holds_optax_state(opt_state):
        raise ValueError(
            "get_stats found no optimizer state (and so no optax_clip "
            f"statistics) in {_describe(opt_state)}. " + _WHAT_TO_PASS
        )


def get_stats(
    opt_state: Any,
    *,
    fields: Sequence[str] | None = None,
    prefix: str = "",
) -> dict[str, jax.Array]:
    """Collects the statistics of every optax_clip transform in a state.

    Walks any optax state (``chain``, ``inject_hyperparams``, ``masked``,
    ``partition``/``multi_transform``, ``MultiSteps``, our guards, Flax NNX
    optimizers, Linen ``TrainState``, ...) and returns one flat dict of
    scalars, ready for a logger. Keys are ``"<method>/<field>"``; when the
    same method appears more than once, the path to each one inside the state
    is added (``"<method>/<path>/<field>"``) so that keys never collide. An
    optimizer state without any optax_clip transform gives ``{}`` (so that
    one logging loop serves a run with and without clipping); anything that
    is not an optimizer state raises.

    Every clip (all transforms but the guards) reports the fields of
    :class:`ClipStats`, and ``clip_fraction``:

    * ``pre_clip_norm``: norm of the incoming updates (float32; NaN or Inf
      when they held a NaN or Inf). The global norm of the chosen
      ``norm_type``; the largest magnitude for ``clip_by_value``.
    * ``post_clip_norm``: norm of the outgoing updates (float32).
    * ``clip_scale``: factor applied to the updates (float32; 1 when
      untouched, 0 when a non-finite step was zeroed). Per-leaf and
      per-element methods (``clip_by_block_norm``, ``clip_by_value``,
      ``adagc``, ``adaptive_grad_clip``) report the smallest factor applied.
    * ``clip_threshold``: threshold in force on the last step (float32; NaN
      when a traced hyper-parameter was out of range). The largest magnitude
      the bounds allow for ``clip_by_value``, the percentile for
      ``autoclip``, the norm above which a step is a spike for ``zclip``, the
      2-norm of the per-tensor or per-unit thresholds for ``adagc`` (after
      its warm-up) and ``adaptive_grad_clip``.
    * ``is_clipped``, ``is_nonfinite``: 1 if the last step was rescaled, or
      held a NaN or Inf, else 0 (int32).
    * ``num_updates``, ``num_clipped``, ``num_nonfinite``: steps seen,
      rescaled, and with a NaN or Inf (int32, saturating).
    * ``clip_fraction``: ``num_clipped / max(num_updates, 1)`` (float32,
      computed by ``get_stats``).

    ``clip_by_global_norm`` and ``soft_clip_by_global_norm`` built with
    ``leaf_norms=True`` add one key per leaf of the updates:
    ``"<method>/leaf_norm/<path>"``, the leaf's norm before clipping
    (float32), where ``<path>`` is the leaf's path in the updates with its
    parts (dict keys, attribute names, list and tuple indices) joined by
    ``/``: ``clip_by_global_norm/leaf_norm/layer1/w`` for
    ``grads["layer1"]["w"]``, ``.../leaf_norm`` alone for a single array.
    ``fields=("leaf_norm",)`` selects them all.

    Adaptive clips add:

    * ``autoclip``: ``history_len`` (norms in the history buffer, int32) and
      ``norm_rank`` (percentile rank, 0 to 100, of the last norm among them,
      float32).
    * ``zclip``: ``norm_mean`` and ``norm_std`` (the EMA mean and standard
      deviation of the norm, float32), ``norm_zscore`` (the last norm's
      z-score, 0 during warm-up, float32) and ``norms_seen`` (finite steps
      seen, which the warm-up counts, int32).
    * ``adagc``: ``adagc_steps`` (finite steps seen, int32) and
      ``clipped_tensors`` (tensors clipped on the last step, int32).
    * ``adaptive_grad_clip``: ``clipped_units`` (units clipped on the last
      step, int32).
    * ``spam_clip``, ``adaclip``: ``clipped_coordinates`` (coordinates
      clipped on the last step, int32); ``adaclip`` also ``adaclip_steps``
      (finite steps seen, int32). ``adaclip`` reports its norms as the
      largest magnitude (like ``clip_by_value``) and the largest leaf
      threshold as ``clip_threshold``; ``spam_clip`` its 2-norms and
      ``theta``.
    * ``adagn``: ``adagn_steps`` (finite steps seen, the bias corrections'
      ``t``, int32); its ``clip_scale`` is the smallest factor applied to a
      leaf (it may exceed 1: AdaGN scales up too), ``clip_threshold`` the
      largest target norm of a leaf, and ``is_clipped`` whether some leaf's
      norm was lowered.

    ``clip_by_spectral_norm`` reports spectral norms (``pre_clip_norm`` and
    ``post_clip_norm`` are the largest top singular value over its matrices
    and vectors, before and after) and adds ``clipped_matrices`` (matrices,
    each of a stack counted, whose estimated top singular value exceeded
    ``max_norm`` on the last step, int32) and ``matrix_clip_fraction`` (that
    count over the number of matrices, float32).

    Update clips (after the optimizer) add:

    * ``clip_update_by_history``: ``update_window_len`` (update norms in the
      window, int32), ``update_norm_mean`` and ``update_norm_std`` (the
      window's mean and population standard deviation the last step was
      measured against, float32); its ``clip_threshold`` is their mean plus
      ``sigma`` deviations (``max_norm`` until the window holds
      ``min_history`` norms).
    * ``clip_update_by_param_norm``: ``param_clipped_tensors`` (leaves
      clipped on the last step, int32).
    * ``stable_adamw``: ``moment_clipped_tensors`` (tensors whose step was
      scaled down on the last step, int32) and ``max_moment_rms`` (the
      largest RMS of ``g / sqrt(v)`` over the tensors, float32); its norms
      are those of Adam's direction (before weight decay and learning rate),
      its ``clip_threshold`` is ``max_rms``.

    The guards (``skip_nonfinite``, ``skip_on_spike``) skip steps rather
    than clip them, and report:

    * ``grad_norm``: global 2-norm of the step's gradients (float32; NaN or
      Inf when they held a NaN or Inf).
    * ``is_skipped``, ``is_nonfinite``: 1 if the last step was skipped, or
      its gradients (or ``loss``) held a NaN or Inf, else 0 (int32).
    * ``num_updates``, ``num_nonfinite``: steps seen, and steps with a NaN or
      Inf (int32, saturating).
    * ``skipped_steps``: steps skipped (int32, saturating). For
      ``skip_nonfinite`` every skipped step is a non-finite one (the same
      count as ``num_nonfinite``, and ``is_skipped`` is ``is_nonfinite``).
    * ``skip_streak``: consecutive skipped steps up to the last one (int32; 0
      after an applied step). Stop a run in which it keeps growing.
    * ``skip_fraction``: ``skipped_steps / max(num_updates, 1)`` (float32,
      computed by ``get_stats``).

    ``skip_on_spike`` adds ``grad_norm_threshold`` (the gradient norm above
    which a step is skipped as a spike: the window's mean plus ``sigma``
    standard deviations; ``inf`` until ``min_history`` norms, NaN when a
    traced hyper-parameter was out of range; float32), ``grad_zscore`` and
    ``loss_zscore`` (z-scores of the last gradient norm and loss against
    their windows, 0 until active or without a ``loss``; float32) and
    ``spike_steps`` (finite steps skipped as a spike of the gradient norm or
    the loss, int32, saturating).

    Args:
      opt_state: an optimizer state (what ``tx.init`` and ``tx.update``
        return; ``optimizer.opt_state`` of a Flax NNX ``Optimizer``;
        ``state.opt_state`` of a Linen ``TrainState``), or a pytree holding
        one (the NNX ``Optimizer`` or the ``TrainState`` itself).
      fields: the fields to return, by their names above (without the
        ``"<method>/"`` part), e.g. ``("pre_clip_norm", "is_clipped")``;
        keys keep their full form. Default: all.
      prefix: prepended to every key (e.g. ``"train/"``).

    Returns:
      A dict from string keys to scalar arrays (no host transfer is done; call
      ``jax.device_get`` on it to get Python-side numbers). Works under ``jit``
      and inside ``jax.lax.scan``.

    Raises:
      TypeError: for a transformation instead of its state, or a ``fields``
        that is a single string.
      ValueError: when ``opt_state`` is not an optimizer state (parameters,
        ``None``, a Flax NNX ``State`` from ``nnx.state(optimizer)`` or a
        state converted to plain dicts, which lost the types that name the
        statistics); for an unknown name in ``fields``, or one that no
        transform in the state reports.

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
      >>> sorted(optax_clip.get_stats(state, fields=("pre_clip_norm", "is_clipped")))
      ['clip_by_global_norm/is_clipped', 'clip_by_global_norm/pre_clip_norm']
    """
    if isinstance(opt_state, optax.GradientTransformation):
        raise TypeError(
            "get_stats reads an optimizer state, not an optimizer: pass the "
            f"state, not the transformation (got a {type(opt_state).__name__}). "
            + _WHAT_TO_PASS
        )
    owners = list(_owners(opt_state, ()))
    wanted = _wanted(fields, [type(node) for _, node in owners])
    if not owners:
        _check_not_empty(opt_state)
        return {}
    if wanted is not None:
        _check_reported(wanted, owners)
    counts: dict[str, int] = {}
    for _, node in owners:
        name = type(node)._stats_name
        counts[name] = counts.get(name, 0) + 1
    out: dict[str, jax.Array] = {}
    for path, node in owners:
        name = type(node)._stats_name
        base = name if counts[name] == 1 else "/".join((name, *path))
        for field, value in _values(node, wanted).items():
            out[f"{prefix}{base}/{field}"] = value
    return out


def _wanted(fields: Sequence[str] | None, found: list[type]) -> frozenset[str] | None:
    """``fields`` as a set of known keys (None: all); raises for unknown names."""
    if fields is None:
        return None
    if isinstance(fields, str):
        raise TypeError(
            "fields must be a sequence of field names, e.g. ('pre_clip_norm',), "
            f"got the string {fields!r}."
        )
    wanted = tuple(fields)
    if not wanted:
        raise ValueError("fields must name at least one field (or be None: all).")
    known = {k for cls in [*_known_owners(), *found] for k in stats_keys(cls)}
    known.add(LEAF_NORM)
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise ValueError(
            f"get_stats: unknown field(s) {', '.join(map(repr, unknown))}; the "
            f"fields are (without the '<method>/' part): {', '.join(sorted(known))}."
        )
    return frozenset(wanted)


def _check_reported(wanted: frozenset[str], owners: list) -> None:
    """Raises if a wanted field is reported by no transform in the state."""
    reported: dict[str, tuple[str, ...]] = {}
    for _, node in owners:
        keys = stats_keys(type(node)) + ((LEAF_NORM,) if _leaf_values(node) else ())
        reported[type(node)._stats_name] = reported.get(type(node)._stats_name, ())
        reported[type(node)._stats_name] += tuple(
            k for k in keys if k not in reported[type(node)._stats_name]
        )
    every = {k for keys in reported.values() for k in keys}
    missing = sorted(wanted - every)
    if missing:
        found = "; ".join(f"{n}: {', '.join(k)}" for n, k in reported.items())
        raise ValueError(
            f"get_stats: no transform in this state reports "
            f"{', '.join(map(repr, missing))}. The state holds {found}."
        )
