"""Opt-in per-leaf norms in the statistics (``leaf_norms=True``), issue 18.

Per-leaf and global norms against NumPy float64 (``reference.norm``), the
get_stats keys named by the parameter path, the default left as it was, and
the option under ``inject_hyperparams``, ``jit`` and ``shard_map``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_clip as oc
from benchmarks import leaf_norms as leaf_norms_benchmark

FACTORIES = {
    "clip_by_global_norm": lambda c, **kw: oc.clip_by_global_norm(c, **kw),
    "soft_clip_by_global_norm": lambda c, **kw: oc.soft_clip_by_global_norm(
        c, 0.5, **kw
    ),
}
NORM_ARG = {1.0: "l1", 2.0: "l2", np.inf: "inf"}

_rng = np.random.default_rng(18)
# A float32 leaf whose squares overflow, a zero leaf, bf16 leaves, nesting.
GRADS = {
    "layer1": {
        "w": _rng.normal(size=(4, 3)).astype(np.float32),
        "b": np.zeros(3, np.float32),
    },
    "huge": np.array([3e30, -4e30], np.float32),
    "emb": [
        jnp.asarray(_rng.normal(size=(5,)), jnp.bfloat16),
        jnp.asarray(20.0 * _rng.normal(size=(2, 2)), jnp.bfloat16),
    ],
}


def paths_and_leaves(tree):
    found = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
        for p, _ in found
    ], [
        np.asarray(x.astype(np.float32) if x.dtype == jnp.bfloat16 else x)
        for _, x in found
    ]


@functools.cache
def run(name, p, leaf_norms):
    tx = FACTORIES[name](1.0, norm_type=NORM_ARG[p], leaf_norms=leaf_norms)
    grads = jax.tree.map(jnp.asarray, GRADS)
    return jax.device_get(jax.jit(tx.update)(grads, tx.init(grads)))


@pytest.mark.parametrize("p", [1.0, 2.0, np.inf])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_leaf_and_global_norms_match_numpy_float64(name, p):
    out, state = run(name, p, True)
    paths, leaves = paths_and_leaves(GRADS)
    got = oc.get_stats(state)
    for path, leaf in zip(paths, leaves, strict=True):
        value = got[f"{name}/leaf_norm/{path}"]
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, reference.norm([leaf], p), rtol=1e-6)
    assert float(got[f"{name}/leaf_norm/layer1/b"]) == 0.0  # the zero leaf
    total = reference.norm(leaves, p)
    np.testing.assert_allclose(got[f"{name}/pre_clip_norm"], total, rtol=1e-6)
    # The same clip as without the option, up to the rounding of the norm.
    out_off, state_off = run(name, p, False)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_off), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5
        )
    assert int(state.clip_stats.is_clipped) == int(state_off.clip_stats.is_clipped) == 1


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_off_by_default_the_state_is_unchanged(name):
    tx = FACTORIES[name](1.0)
    state = tx.init(GRADS)
    assert state.leaf_pre_clip_norms is None
    assert state == FACTORIES[name](1.0, leaf_norms=False).init(GRADS)
    assert len(jax.tree.leaves(state)) == len(state.clip_stats)
    _, state = tx.update(jax.tree.map(jnp.asarray, GRADS), state)
    assert not [k for k in oc.get_stats(state) if "leaf_norm" in k]


def test_the_layer_that_spiked_is_named():
    tx = optax.chain(oc.clip_by_global_norm(1.0, leaf_norms=True), optax.sgd(0.1))
    params = {"layer1": {"w": jnp.ones((2, 2))}, "layer2": {"w": jnp.ones((2, 2))}}
    state = tx.init(params)
    grads = {
        "layer1": {"w": jnp.full((2, 2), 0.01)},
        "layer2": {"w": jnp.full((2, 2), 50.0)},
    }
    _, state = tx.update(grads, state, params)
    leaf = oc.get_stats(state, fields=("leaf_norm",))
    assert leaf == {
        "clip_by_global_norm/leaf_norm/layer1/w": pytest.approx(0.02),
        "clip_by_global_norm/leaf_norm/layer2/w": pytest.approx(100.0),
    }
    assert max(leaf, key=lambda k: leaf[k]).endswith("layer2/w")


def test_a_single_array_and_two_instances():
    tx = optax.chain(
        oc.clip_by_global_norm(1.0, leaf_norms=True),
        oc.clip_by_global_norm(10.0),
    )
    g = jnp.array([3.0, 4.0])
    _, state = tx.update(g, tx.init(g))
    got = oc.get_stats(state, fields=("leaf_norm", "pre_clip_norm"))
    assert set(got) == {
        "clip_by_global_norm/0/leaf_norm",
        "clip_by_global_norm/0/pre_clip_norm",
        "clip_by_global_norm/1/pre_clip_norm",
    }
    assert float(got["clip_by_global_norm/0/leaf_norm"]) == 5.0


def test_a_nonfinite_leaf_is_the_one_that_reads_nan():
    tx = oc.clip_by_global_norm(1.0, nonfinite="zero_update", leaf_norms=True)
    g = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.array([3.0, 4.0])}
    out, state = tx.update(g, tx.init(g))
    held = state.leaf_pre_clip_norms
    assert held.paths == ("a", "b")
    assert np.isnan(held.values[0])
    assert float(held.values[1]) == 5.0
    assert float(jnp.max(jnp.abs(out["b"]))) == 0.0
    assert int(state.clip_stats.is_nonfinite) == 1


def test_bad_input_raises():
    with pytest.raises(TypeError, match="leaf_norms must be a bool"):
        oc.clip_by_global_norm(1.0, leaf_norms="yes")
    with pytest.raises(TypeError, match="leaf_norms must be a bool"):
        oc.soft_clip_by_global_norm(1.0, leaf_norms=1)
    tx = oc.clip_by_global_norm(1.0, leaf_norms=True)
    with pytest.raises(ValueError, match="shaped like the updates"):
        tx.update({"a": jnp.ones(2)}, tx.init(None))
    with pytest.raises(ValueError, match=r"state: \['a'\], updates: \['b'\]"):
        tx.update({"b": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}))


def test_inject_hyperparams_max_norm_and_zero_meta_gradient():
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0, leaf_norms=True)
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.zeros(3)}
    state = tx.init(g)
    state.hyperparams["max_norm"] = jnp.asarray(2.0)
    out, state = jax.jit(tx.update)(g, state)
    np.testing.assert_allclose(out["a"], [1.2, 1.6], rtol=1e-6)
    held = state.inner_state.leaf_pre_clip_norms
    assert held.values.dtype == jnp.float32 and held.values.shape == (2,)
    assert held.values.tolist() == [5.0, 0.0]
    # No NaN from the clip at zero gradients, also for the meta-gradient.
    clip = oc.clip_by_global_norm(1.0, leaf_norms=True)

    def loss(x):
        tree = {"a": x, "b": 2.0 * x}
        out, state = clip.update(tree, clip.init(tree))
        return jnp.sum(out["a"]) + state.clip_stats.pre_clip_norm

    grad = jax.grad(loss)(jnp.zeros(3))
    assert np.all(np.isfinite(grad))


def test_guards_keep_the_leaf_norms_of_the_step_they_skip():
    # An inner clip's statistics are rolled back with the inner state on a
    # skipped step; the guard's own per-leaf norms show the spike.
    params = {"layer1": {"w": jnp.ones((2, 3))}, "layer2": {"b": jnp.ones(3)}}
    inner = optax.chain(oc.clip_by_global_norm(1.0, leaf_norms=True), optax.adam(0.1))
    tx = oc.skip_on_spike(inner, window=4, sigma=3.0, leaf_norms=True)
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    calm = []
    for _ in range(4):
        g = jax.tree.map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params
        )
        calm.append(g)
        _, state = update(g, state, params)
    spike = {"layer1": calm[-1]["layer1"], "layer2": {"b": jnp.full(3, 1e3)}}
    before = state.guarded_state
    out, state = update(spike, state, params)
    got = oc.get_stats(state)
    assert got["skip_on_spike/is_skipped"] == 1
    assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(out))
    want1 = reference.norm([np.asarray(spike["layer1"]["w"])], 2.0)
    np.testing.assert_allclose(
        got["skip_on_spike/leaf_norm/layer1/w"], want1, rtol=1e-6
    )
    np.testing.assert_allclose(
        got["skip_on_spike/leaf_norm/layer2/b"], 1e3 * np.sqrt(3.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        got["skip_on_spike/grad_norm"], np.hypot(want1, 1e3 * np.sqrt(3.0)), 1e-6
    )
    # The inner clip's per-leaf norms are the last applied step's, as before.
    assert jax.tree.all(jax.tree.map(jnp.array_equal, state.guarded_state, before))
    want_calm = reference.norm([np.asarray(calm[-1]["layer2"]["b"])], 2.0)
    key = "clip_by_global_norm/leaf_norm/layer2/b"
    np.testing.assert_allclose(got[key], want_calm, rtol=1e-6)


def test_skip_nonfinite_leaf_norms_name_the_nan_leaf():
    g = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.array([3.0, 4.0])}
    tx = oc.skip_nonfinite(optax.sgd(0.1), leaf_norms=True)
    out, state = jax.jit(tx.update)(g, tx.init(g), g)
    got = oc.get_stats(state, fields=("leaf_norm", "is_skipped"))
    assert np.isnan(got["skip_nonfinite/leaf_norm/a"])
    assert float(got["skip_nonfinite/leaf_norm/b"]) == 5.0
    assert got["skip_nonfinite/is_skipped"] == 1
    # Off by default: the state (and a checkpoint of it) is as before.
    plain = oc.skip_nonfinite(optax.sgd(0.1)).init(g)
    assert plain.guard_leaf_norms is None
    assert len(jax.tree.leaves(plain)) + 1 == len(jax.tree.leaves(tx.init(g)))
    with pytest.raises(TypeError, match="leaf_norms must be a bool"):
        oc.skip_on_spike(optax.sgd(0.1), leaf_norms=1)
    with pytest.raises(ValueError, match=r"state: \['a', 'b'\], updates: \['c'\]"):
        tx.update({"c": jnp.ones(2)}, tx.init(g), g)


@pytest.mark.usefixtures("n_devices")
def test_shard_map_axis_name_gives_each_leafs_global_norm():
    mesh = jax.make_mesh((8,), ("data",))
    grads = {
        "w": _rng.normal(size=(16, 4)).astype(np.float32),
        "r": _rng.normal(size=(8,)).astype(np.float32),  # replicated
    }
    specs = {"w": P("data"), "r": P()}
    txs = [f(1.0, axis_name="data", leaf_norms=True) for f in FACTORIES.values()]

    def step(g):
        out = []
        for tx in txs:
            _, state = tx.update(g, tx.init(g))
            out.append((oc.get_stats(state), state.clip_stats.pre_clip_norm))
        return out

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs,), out_specs=P()))
    placed = {
        k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in grads.items()
    }
    results = jax.device_get(fn(placed))
    for name, (stats, total) in zip(FACTORIES, results, strict=True):
        for k in grads:
            got = stats[f"{name}/leaf_norm/{k}"]
            np.testing.assert_allclose(got, reference.norm([grads[k]]), rtol=1e-6)
        np.testing.assert_allclose(
            total, reference.norm(list(grads.values())), rtol=1e-6
        )


def test_cost_benchmark_runs(capsys):
    out = leaf_norms_benchmark.main(
        ["--leaves", "4", "--size", "64", "--reps", "3", "--compiles", "1"]
    )
    assert out["off_ms"] > 0 and out["on_ms"] > 0 and out["compile_on_s"] > 0
    assert "4 leaves of 64 float32" in capsys.readouterr().out
