"""The reduction plan: which leaves are reduced together, decided once (private).

Reducing every leaf on its own is correct but slow for trees of many leaves:
each reduction is a kernel to launch and to compile. The plan groups leaves
in two ways, and every norm goes through it:

* **Stacks.** Tiny leaves (at most :data:`STACK_MAX_LEAF` values) of one
  size, dtype, layout and set of mapped axes are stacked as the rows of one
  ``(k, n)`` array, at most :data:`STACK_ROWS` per stack, and reduced row by
  row by one kernel. A copy, so at most :data:`STACK_MAX_TOTAL` values in all.
* **Branch groups.** In the rescaled pass (a ``lax.cond`` that rarely runs),
  up to :data:`BRANCH_GROUP_SIZE` other same-shape leaves share one fused
  reduction (of their sum for the global norm, with two outputs per leaf for
  the per-leaf norms), when there are many of them.

Only arrays whose layout is known to be local or replicated are stacked or
grouped: combining leaves that are sharded differently would move data
(``Auto`` mesh axes) or fail (``Explicit`` axes). The measurements behind the
constants are in ``docs/performance.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

from optax_clip import _collectives

#: Leaves of at most this many values are stacked (0 switches stacking off).
STACK_MAX_LEAF = 4096
#: At most this many leaves per stack (one concatenate of thousands of
#: operands compiles slowly).
STACK_ROWS = 64
#: At most this many values are copied into stacks per step.
STACK_MAX_TOTAL = 1 << 20
#: Same-shape leaves sharing one reduction in the rescaled pass (1: none).
BRANCH_GROUP_SIZE = 64
#: Branch groups are only formed beyond this many segments.
BRANCH_GROUP_MIN = BRANCH_GROUP_SIZE // 4


@dataclasses.dataclass(frozen=True)
class Segment:
    """Leaves reduced by one kernel: one leaf, or the rows of a stack.

    Attributes:
      array: the leaf, or a ``(k, n)`` stack of ``k`` tiny leaves.
      leaves: the index of each row's leaf (one index for a single leaf).
      axes: the mapped axes its partial results are combined over.
      stacked: whether ``array`` is a stack (reduced row by row).
      local: whether ``array`` is known to be local or replicated, so that a
        fused custom reduction may read it (the SPMD partitioner cannot split
        one across devices, and would gather a sharded array).
      key: what segments must share to be grouped (None: never grouped).
    """

    array: jax.Array
    leaves: tuple[int, ...]
    axes: tuple
    stacked: bool
    local: bool
    key: Any = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the leaves of a tree are reduced.

    Attributes:
      segments: every non-empty leaf in exactly one segment; the segments of a
        branch group are adjacent.
      branch_groups: ``(start, stop)`` ranges of segments that share one fused
        reduction in the rescaled pass.
      to_leaf_order: indices that put a vector with one entry per row of the
        segments (segment order), then one per empty leaf, into leaf order;
        None for the identity.
      empty: indices of the empty leaves (their norm is 0).
    """

    segments: list[Segment]
    branch_groups: list[tuple[int, int]]
    to_leaf_order: np.ndarray | None
    empty: tuple[int, ...]


def _auto_context() -> bool:
    """Whether the enclosing mesh context (``jax.set_mesh``) has Auto axes."""
    try:
        context = jax.sharding.get_abstract_mesh()
        return not context.empty and jax.sharding.AxisType.Auto in tuple(
            context.axis_types
        )
    except Exception:  # pragma: no cover - a JAX without mesh contexts
        return True


def _layout(x: Any, auto_context: bool) -> tuple | None:
    """How ``x`` is laid out, if it is known to be local or replicated; else None.

    Under ``Auto`` mesh axes the partitioner picks each array's sharding.
    Under ``Explicit`` axes the sharding is part of the type. Values without a
    mesh, and the per-device values inside ``shard_map`` and ``pmap``
    (``Manual`` axes), are local.
    """
    try:
        sharding = jax.typeof(x).sharding
        mesh = sharding.mesh
        if mesh.empty:
            return None if auto_context else ()
        if jax.sharding.AxisType.Auto in tuple(mesh.axis_types):
            return None
        spec = tuple(sharding.spec)
        if any(part is not None for part in spec):
            return None  # split along some axis
        return (mesh, spec)
    except Exception:  # pragma: no cover - a JAX without sharding in types
        return None


def is_local(x: Any) -> bool:
    """Whether ``x`` is known to be local or replicated (see :class:`Segment`)."""
    return _layout(x, _auto_context()) is not None


def make(leaves: Sequence[jax.Array], leaf_axes: Sequence[tuple]) -> Plan:
    """The plan for ``leaves`` (arrays) whose partials combine over ``leaf_axes``."""
    auto = _auto_context()
    segments: list[Segment] = []
    tiny: dict[Any, list[int]] = {}
    empty = []
    budget = STACK_MAX_TOTAL
    for i, (x, ax) in enumerate(zip(leaves, leaf_axes, strict=True)):
        if x.size == 0:
            empty.append(i)
            continue
        layout = None if auto else _layout(x, False)
        if layout is None:  # may be sharded: never stacked nor grouped
            segments.append(Segment(x, (i,), ax, False, False))
            continue
        vary = _collectives.varying_axes(x) if ax else frozenset()
        if x.size <= min(STACK_MAX_LEAF, budget):
            budget -= x.size
            tiny.setdefault((x.size, x.dtype, ax, vary, layout), []).append(i)
        else:
            key = (x.shape, x.dtype, ax, vary, layout, False)
            segments.append(Segment(x, (i,), ax, False, True, key))
    for (size, dtype, ax, vary, layout), idx in tiny.items():
        for start in range(0, len(idx), STACK_ROWS):
            part = idx[start : start + STACK_ROWS]
            rows = [lax.reshape(leaves[i], (1, size)) for i in part]
            array = rows[0] if len(rows) == 1 else lax.concatenate(rows, 0)
            key = (array.shape, dtype, ax, vary, layout, True)
            segments.append(Segment(array, tuple(part), ax, True, True, key))
    segments, groups = _branch_groups(segments)
    # Vectors list the segments' rows first, then the empty leaves.
    order = [i for seg in segments for i in seg.leaves] + empty
    return Plan(segments, groups, _inverse(order), tuple(empty))


def _branch_groups(segments: list[Segment]):
    """Segments of one key made adjacent, and the ranges of their groups."""
    if len(segments) <= BRANCH_GROUP_MIN or BRANCH_GROUP_SIZE <= 1:
        return segments, []
    by_key: dict[Any, list[Segment]] = {}
    alone = []
    for seg in segments:
        if seg.key is None:
            alone.append(seg)
        else:
            by_key.setdefault(seg.key, []).append(seg)
    ordered, groups = [], []
    for segs in by_key.values():
        for start in range(0, len(segs), BRANCH_GROUP_SIZE):
            part = segs[start : start + BRANCH_GROUP_SIZE]
            if len(part) > 1:
                groups.append((len(ordered), len(ordered) + len(part)))
            ordered.extend(part)
    return ordered + alone, groups


def _inverse(order: list[int]) -> np.ndarray | None:
    """Indices that put a vector listed in ``order`` back in index order."""
    if order == list(range(len(order))):
        return None
    inverse = np.empty(len(order), np.int32)
    inverse[np.asarray(order)] = np.arange(len(order), dtype=np.int32)
    return inverse
