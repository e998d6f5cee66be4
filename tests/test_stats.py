"""get_stats finds clip statistics inside any optax nesting, with distinct keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc

PARAMS = {"enc": {"w": jnp.ones((2, 3))}, "head": {"w": jnp.ones((3,))}}
GRADS = {"enc": {"w": jnp.full((2, 3), 2.0)}, "head": {"w": jnp.array([3.0, 4.0, 0.0])}}
ENC_NORM = np.sqrt(6 * 4.0)
TOTAL_NORM = np.sqrt(6 * 4.0 + 25.0)


def step(tx, n=1, **extra):
    state = tx.init(PARAMS)
    for _ in range(n):
        _, state = jax.jit(tx.update)(GRADS, state, PARAMS, **extra)
    return oc.get_stats(state)


def test_chain_two_clippers_get_distinct_keys():
    tx = optax.chain(
        oc.clip_by_global_norm(1.0), oc.clip_by_global_norm(0.5), optax.adam(1e-3)
    )
    stats = step(tx)
    assert float(stats["clip_by_global_norm/0/pre_clip_norm"]) == pytest.approx(
        TOTAL_NORM, rel=1e-6
    )
    assert float(stats["clip_by_global_norm/1/pre_clip_norm"]) == pytest.approx(1.0)
    assert float(stats["clip_by_global_norm/1/post_clip_norm"]) == pytest.approx(0.5)


def test_single_clipper_has_short_keys_and_all_fields():
    stats = step(optax.chain(oc.clip_by_block_norm(1.0), optax.sgd(0.1)), n=3)
    fields = set(oc.ClipStats._fields) | {"clip_fraction"}
    assert set(stats) == {f"clip_by_block_norm/{f}" for f in fields}
    assert int(stats["clip_by_block_norm/num_updates"]) == 3
    assert float(stats["clip_by_block_norm/clip_fraction"]) == 1.0
    for value in stats.values():
        assert value.shape == ()


def test_prefix():
    stats = oc.get_stats(oc.clip_by_value(1.0).init(None), prefix="train/")
    assert all(k.startswith("train/clip_by_value/") for k in stats)


def test_inject_hyperparams():
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=2.0)
    stats = step(tx)
    assert float(stats["clip_by_global_norm/clip_threshold"]) == 2.0
    assert float(stats["clip_by_global_norm/post_clip_norm"]) == pytest.approx(2.0)


def test_masked_clips_only_the_masked_subset():
    mask = {"enc": {"w": True}, "head": {"w": False}}
    tx = optax.chain(optax.masked(oc.clip_by_global_norm(1.0), mask), optax.sgd(0.1))
    stats = step(tx)
    assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
        ENC_NORM, rel=1e-6
    )


def test_partition_two_groups():
    labels = {"enc": {"w": "enc"}, "head": {"w": "head"}}
    tx = optax.partition(
        {"enc": oc.clip_by_global_norm(1.0), "head": oc.clip_by_value(1.0)}, labels
    )
    stats = step(tx)
    assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
        ENC_NORM, rel=1e-6
    )
    assert float(stats["clip_by_value/pre_clip_norm"]) == 4.0


def test_partition_same_method_twice_is_keyed_by_path():
    labels = {"enc": {"w": "a"}, "head": {"w": "b"}}
    tx = optax.partition(
        {"a": oc.clip_by_global_norm(1.0), "b": oc.clip_by_global_norm(1.0)}, labels
    )
    stats = step(tx)
    keys = [k for k in stats if k.endswith("/pre_clip_norm")]
    assert len(keys) == 2 and all("inner_states" in k for k in keys)
    values = sorted(float(stats[k]) for k in keys)
    np.testing.assert_allclose(values, sorted([5.0, ENC_NORM]), rtol=1e-6)


def test_multisteps():
    tx = optax.MultiSteps(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)), 2)
    stats = step(tx, n=4)
    assert int(stats["clip_by_global_norm/num_updates"]) == 2  # every 2nd step
    assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
        TOTAL_NORM, rel=1e-6
    )


def test_works_under_jit_and_inside_lax_scan():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))

    def body(state, _):
        _, state = tx.update(GRADS, state, PARAMS)
        return state, oc.get_stats(state)["clip_by_global_norm/pre_clip_norm"]

    _, norms = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3))(tx.init(PARAMS))
    np.testing.assert_allclose(norms, [TOTAL_NORM] * 3, rtol=1e-6)


def test_state_without_clippers():
    assert oc.get_stats(optax.adam(1e-3).init(PARAMS)) == {}
    assert oc.get_stats({}) == {}


def test_optax_tree_get_finds_our_distinct_field_names():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = tx.init(PARAMS)
    _, state = tx.update(GRADS, state, PARAMS)
    assert float(optax.tree.get(state, "pre_clip_norm")) == pytest.approx(TOTAL_NORM)


def test_flax_nnx_optimizer():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-2))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((4, 3))

    @nnx.jit
    def train_step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2) * 1e3)(model)
        opt.update(model, grads)
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
        return loss, norm

    _, norm = train_step(model, opt)
    stats = oc.get_stats(opt.opt_state)
    np.testing.assert_allclose(
        stats["clip_by_global_norm/pre_clip_norm"], norm, rtol=1e-5
    )
    assert int(stats["clip_by_global_norm/is_clipped"]) == 1


def test_flax_linen_train_state():
    import flax.linen as nn
    from flax.training import train_state

    model = nn.Dense(2)
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-2))
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx
    )
    x = jnp.ones((4, 3))

    @jax.jit
    def train_step(state):
        def loss_fn(p):
            return jnp.mean(state.apply_fn({"params": p}, x) ** 2) * 1e3

        grads = jax.grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), optax.tree.norm(grads)

    state, norm = train_step(state)
    stats = oc.get_stats(state.opt_state)
    np.testing.assert_allclose(
        stats["clip_by_global_norm/pre_clip_norm"], norm, rtol=1e-5
    )
