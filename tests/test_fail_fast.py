"""The ``nonfinite="raise"`` policy (``_fail_fast``), beyond the contract suite.

``tests/test_contract.py`` checks every transform: a finite step is exactly the
``"propagate"`` step, a non-finite one raises under ``jit`` naming the
transform and the leaf. Here: ``vmap``, ``scan``, ``shard_map``, gradients,
guards, donated buffers and the message.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

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


def test_gradient_through_update():
    tx = oc.clip_by_global_norm(1.0, nonfinite="raise")
    state = tx.init(grads())
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
    assert "no leaf of the updates holds NaN or Inf" in other


def test_under_shard_map_the_device_holding_the_bad_shard_names_it(n_devices):
    # The norm is global (axis_name), so every device takes the bad branch;
    # the leaves' flags are combined across devices and one device raises.
    mesh = jax.make_mesh((n_devices,), ("d",), axis_types=(AxisType.Auto,))
    tx = oc.clip_by_global_norm(1.0, nonfinite="raise", axis_name="d")
    specs = {"w": P("d"), "b": P()}

    def local(g):
        return tx.update(g, tx.init(g))[0]

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=specs))
    g = {"w": jnp.ones((n_devices, 2)), "b": jnp.ones(3)}
    jax.block_until_ready(fn(g))
    g["w"] = g["w"].at[3, 1].set(jnp.inf)
    with pytest.raises(Exception, match=RAISED + r".* 1 of 2 leaves: \['w'\]"):
        jax.block_until_ready(fn(g))
    # JAX keeps the failed callback's token of a multi-device program: every
    # later effects barrier (and the interpreter's exit) reports the error
    # again. Dropped here, so that it does not leak into other tests.
    with pytest.raises(Exception, match=RAISED):
        jax.effects_barrier()
    from jax._src import dispatch  # private: test only

    dispatch.runtime_tokens.clear()
    jax.effects_barrier()


def test_under_scan_the_bad_step_raises():
    tx = oc.clip_by_global_norm(1.0, nonfinite="raise")

    def body(state, g):
        out, state = tx.update(g, state)
        return state, out

    steps = jax.tree.map(lambda a, b: jnp.stack([a, b]), grads(), grads(bad=True))
    run = jax.jit(lambda s, gs: jax.lax.scan(body, s, gs))
    with pytest.raises(Exception, match=RAISED + r".* 1 of 2 leaves: \['b'\]"):
        jax.block_until_ready(run(tx.init(grads()), steps))
