"""The ``nonfinite="raise"`` policy (``_fail_fast``), beyond the contract suite.

``tests/test_contract.py`` checks every transform: a finite step is exactly the
``"propagate"`` step, a non-finite one raises under ``jit`` naming the
transform and the leaf. Here: ``vmap``, gradients, eager calls, guards,
donated buffers and the message.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc
from optax_clip import _fail_fast

RAISED = r"optax_clip\.clip_by_global_norm\(nonfinite='raise'\)"


def grads(bad=False):
    g = {"w": jnp.ones((2, 3)), "b": jnp.array([3.0, 4.0])}
    if bad:
        g["b"] = g["b"].at[0].set(jnp.inf)
    return g


def test_under_vmap_raises_only_for_a_bad_example():
    tx = oc.clip_by_global_norm(1.0, nonfinite="raise")
    state = tx.init(grads())
    update = jax.jit(jax.vmap(lambda g: tx.update(g, state)[0]))
    stack = lambda *ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts)  # noqa: E731
    out = update(stack(grads(), grads()))  # the cond is a select: no false alarm
    np.testing.assert_allclose(out["b"][0], [3 / 31**0.5, 4 / 31**0.5], rtol=1e-6)
    with pytest.raises(Exception, match=RAISED + r".* 1 of 2 leaves: \['b'\]"):
        jax.block_until_ready(update(stack(grads(), grads(bad=True))))


def test_eager_and_gradient_through_update():
    tx = oc.clip_by_global_norm(1.0, nonfinite="raise")
    state = tx.init(grads())
    with pytest.raises(Exception, match=RAISED):
        jax.block_until_ready(tx.update(grads(bad=True), state))  # no jit
    # Differentiating through the update (meta-gradients) is unaffected.
    d = jax.jit(jax.grad(lambda g: jnp.sum(tx.update(g, state)[0]["b"])))(grads())
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(d))


def test_a_guard_around_it_skips_instead():
    # skip_nonfinite checks first and never calls the inner update on a bad
    # step, so the guard's policy wins.
    inner = optax.chain(oc.clip_by_global_norm(1.0, nonfinite="raise"), optax.sgd(1))
    tx = oc.skip_nonfinite(inner)
    state = tx.init(grads())
    out, state = jax.jit(tx.update)(grads(bad=True), state)
    np.testing.assert_array_equal(out["b"], 0.0)
    assert int(oc.get_stats(state)["skip_nonfinite/skipped_steps"]) == 1


def test_donated_inputs_are_gone_after_the_error():
    # What the numerics guide warns about: with donate_argnums the buffers
    # passed in are consumed even though the step raised.
    tx = oc.clip_by_global_norm(1.0, nonfinite="raise")
    update = jax.jit(tx.update, donate_argnums=(0, 1))
    g = grads(bad=True)
    state = tx.init(g)
    with pytest.raises(Exception, match=RAISED):
        jax.block_until_ready(update(g, state))
    assert g["w"].is_deleted()


def test_message_counts_and_lists_at_most_ten_leaves():
    paths = [f"[{i}]" for i in range(12)]
    text = _fail_fast.message("zclip", paths, np.ones(12, bool))
    assert "in 12 of 12 leaves: [0], [1]," in text
    assert text.count("[") == 10 and "and 2 more" in text
    other = _fail_fast.message("zclip", paths, np.zeros(12, bool))
    assert "0 of 12 leaves (on another device)" in other
