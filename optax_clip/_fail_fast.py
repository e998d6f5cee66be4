"""The ``nonfinite="raise"`` policy: stop the run at the first NaN or Inf (private).

A transform built with ``nonfinite="raise"`` computes its update exactly as
with ``"propagate"`` (a non-finite step comes out NaN), and in addition, on a
step whose updates hold a NaN or Inf, calls back into Python, which raises a
:class:`FloatingPointError` naming the transform and the leaves that hold
them. Like PyTorch's ``error_if_nonfinite``, but under ``jit``, ``scan`` and
``vmap``, without the user having to :func:`jax.experimental.checkify` the
step.

The check reads the flag the record step already computed
(``clip_stats.is_nonfinite``): a healthy step costs one ``lax.cond`` on a
scalar, and the per-leaf scan that names the bad leaves runs only on a bad
step. Under ``jit`` the error reaches the caller as a
:class:`jax.errors.JaxRuntimeError` whose message holds the text below; under
``vmap`` the condition becomes a select, so the scan runs on every step and
the callback raises only if some example is non-finite. Inside a guard
(:func:`optax_clip.skip_nonfinite`, :func:`optax_clip.skip_on_spike`) a step
the guard skips does not raise: the guard's policy wins.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_clip import _skippable

#: At most this many leaf paths are listed in the error message.
_MAX_LISTED = 10


def message(name: str, paths: list[str], flags: np.ndarray) -> str:
    """The error text for a non-finite step of transform ``name``."""
    bad = [p for p, f in zip(paths, flags, strict=True) if f]
    head = f"optax_clip.{name}(nonfinite='raise'): "
    tail = (
        " To skip such steps instead, wrap the optimizer in optax_clip.skip_nonfinite."
    )
    if not bad:
        return (
            head + "a non-finite step, but no leaf of the updates holds NaN or "
            "Inf: their norm overflowed the float range, or (adaptive_grad_clip) "
            "the parameters hold NaN or Inf." + tail
        )
    listed = ", ".join(bad[:_MAX_LISTED])
    more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return (
        head + f"the updates hold NaN or Inf in {len(bad)} of {len(paths)} "
        f"leaves: {listed}{more}." + tail
    )


def check(name: str, updates: Any, bad: jax.Array, axes: tuple = ()) -> None:
    """Raises (through a host callback) when ``bad``, naming the bad leaves.

    ``axes``: the mapped axes ``bad`` was reduced over (then it must be the
    same on every device): the leaves' flags are combined across them, and
    only the first device raises.
    """
    with_path = jax.tree_util.tree_flatten_with_path(updates)[0]
    if not with_path:
        return
    paths = [jax.tree_util.keystr(p) or "the root" for p, _ in with_path]
    leaves = [x for _, x in with_path]

    def report(bad_flag, flags, first):
        if np.any(bad_flag) and np.all(first):
            flags = np.asarray(flags).reshape(-1, len(paths)).any(axis=0)
            raise FloatingPointError(message(name, paths, flags))

    def on_bad():
        # max |x| propagates NaN and fuses into one reduction per leaf
        # (jnp.all(jnp.isfinite(x)) reserved one byte per element).
        flags = jnp.stack(
            [~jnp.isfinite(jnp.max(jnp.abs(x), initial=0)) for x in leaves]
        ).astype(jnp.int32)
        first = jnp.asarray(True)
        if axes:  # every device takes this branch: bad is global
            flags = lax.pmax(flags, axes)
            for a in axes:
                first = first & (lax.axis_index(a) == 0)
        jax.debug.callback(report, bad, flags > 0, first)

    lax.cond(bad, on_bad, lambda: None)


def wrap(
    tx: optax.GradientTransformation, policy: str, name: str, axes: tuple = ()
) -> optax.GradientTransformation:
    """``tx``, raising on a non-finite step if ``policy == "raise"``.

    ``tx``'s state must hold a :class:`optax_clip.ClipStats` as ``clip_stats``
    (its ``is_nonfinite`` is the flag checked); ``axes``: its ``axis_name``.
    """
    if policy != "raise":
        return tx

    def update_fn(updates, state, params=None):
        out, new_state = tx.update(updates, state, params)
        bad = new_state.clip_stats.is_nonfinite > 0
        skip = _skippable.active_skip()  # inside a guard, the guard's skip wins
        check(name, updates, bad if skip is None else bad & ~skip, axes)
        return out, new_state

    return optax.GradientTransformation(tx.init, update_fn)
