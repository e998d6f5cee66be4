"""The contract every public transform of optax_clip satisfies.

Each case of ``registry.CASES`` runs through the same checks: jit and eager,
dtypes, zero gradients, a zero threshold, NaN and Inf, huge values, gradients
through ``update``, odd trees, chaining with AdamW, ``inject_hyperparams``,
``vmap``, ``scan`` and stable state shapes and dtypes.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from registry import CASES

import optax_clip as oc

IDS = [c.name for c in CASES]


def tree(dtype=jnp.float32, scale=1.0, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": (scale * jax.random.normal(k1, (4, 3))).astype(dtype),
        "b": (scale * jax.random.normal(k2, (3,))).astype(dtype),
        "s": (scale * jax.random.normal(k3, ())).astype(dtype),
    }


def params_like(t):
    return jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, t)


_BUILT = {}


def built(case, **overrides):
    """``(tx, jitted update)`` for a case, shared by all tests.

    Compilation dominates the cost of this suite: reusing one jitted ``update``
    per (case, overrides) lets every test with the same shapes share it.
    """
    key = (case.name, tuple(sorted(overrides.items())))
    if key not in _BUILT:
        tx = case.build(**overrides)
        _BUILT[key] = (tx, jax.jit(tx.update))
    return _BUILT[key]


def run(case, grads, jit=True, steps=1, params=None, **overrides):
    tx, jitted = built(case, **overrides)
    params = params_like(grads) if params is None else params
    state = tx.init(params)
    update = jitted if jit else tx.update
    out = None
    for _ in range(steps):
        out, state = update(grads, state, params, **case.extra_args)
    return out, state


def norm64(t):
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)]
    return float(np.sqrt(sum(np.sum(x * x) for x in leaves))) if leaves else 0.0


def all_finite(t):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(t))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_structure_and_jit_agree(case, dtype):
    grads = tree(dtype, scale=3.0)
    out_jit, state_jit = run(case, grads, jit=True, steps=2)
    chex.assert_trees_all_equal_shapes_and_dtypes(out_jit, grads)
    if dtype != jnp.float32:
        return  # eager execution is slow; one dtype shows jit and eager agree
    out_eager, state_eager = run(case, grads, jit=False, steps=2)
    chex.assert_trees_all_equal_shapes_and_dtypes(out_eager, grads)
    chex.assert_trees_all_close(out_jit, out_eager, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(state_jit, state_eager)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_is_stable_scan_carry(case):
    grads = tree(scale=3.0)
    tx = case.build()
    params = params_like(grads)
    state0 = tx.init(params)

    def body(state, g):
        u, state = tx.update(g, state, params, **case.extra_args)
        return state, u

    gs = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 0.5 * x]), grads)
    state3, _ = jax.lax.scan(body, state0, gs)
    chex.assert_trees_all_equal_shapes_and_dtypes(state3, state0)
    for leaf in jax.tree.leaves(state0):
        assert leaf.dtype in (jnp.float32, jnp.int32, jnp.bool_, jnp.uint32), leaf.dtype


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_gradients_are_finite_and_zero(case):
    grads = jax.tree.map(jnp.zeros_like, tree())
    out, _ = run(case, grads)
    chex.assert_trees_all_close(out, grads)
    assert all_finite(out)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.threshold], ids=lambda c: c.name
)
def test_zero_threshold_never_nan(case):
    for scale in (0.0, 1.0):
        grads = tree(scale=scale)
        out, _ = run(case, grads, steps=3, **{case.threshold: 0.0})
        assert all_finite(out)
        if case.bound is not None or case.name == "clip_by_value":
            chex.assert_trees_all_close(out, jax.tree.map(jnp.zeros_like, grads))


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.wrapper], ids=lambda c: c.name
)
def test_gradient_through_update_is_finite(case):
    """Meta-gradients: d(sum of output)/d(input), at zero and at a generic point."""
    tx, _ = built(case)
    params = params_like(tree())
    state = tx.init(params)

    @jax.jit
    @jax.grad
    def grad_of_sum(g):
        out, _ = tx.update(g, state, params, **case.extra_args)
        return sum(jnp.sum(x) for x in jax.tree.leaves(out))

    for grads in (jax.tree.map(jnp.zeros_like, tree()), tree(scale=3.0)):
        chex.assert_tree_all_finite(grad_of_sum(grads))


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.wrapper], ids=lambda c: c.name
)
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("policy", ["propagate", "zero_update"])
def test_nonfinite_policy(case, bad, policy):
    grads = tree()
    grads["b"] = grads["b"].at[1].set(bad)
    tx, update = built(case, nonfinite=policy)
    out, state = run(case, grads, nonfinite=policy)
    stats = oc.get_stats(state)
    (key,) = [k for k in stats if k.endswith("/num_nonfinite")]
    assert int(stats[key]) == 1
    if policy == "zero_update":
        chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, grads))
    else:
        # The bad value is never hidden: the step stays visibly non-finite.
        assert not bool(jnp.all(jnp.isfinite(out["b"])))
    # The next, finite step is handled normally.
    good = tree(seed=1)
    out2, _ = update(good, state, params_like(good), **case.extra_args)
    assert all_finite(out2)


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.wrapper], ids=lambda c: c.name
)
def test_nonfinite_raise(case):
    # A finite step is exactly the "propagate" step; a non-finite one raises
    # under jit, naming the transform and the leaf.
    good = tree(seed=1)
    out, _ = run(case, good, nonfinite="raise")
    chex.assert_trees_all_equal(out, run(case, good)[0])
    grads = tree()
    grads["b"] = grads["b"].at[1].set(jnp.nan)
    text = rf"optax_clip\.{case.name}\(nonfinite='raise'\).* 1 of 3 leaves: \['b'\]"
    with pytest.raises(Exception, match=text):
        jax.block_until_ready(run(case, grads, nonfinite="raise"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize(
    "dtype,big", [(jnp.float32, 1e30), (jnp.bfloat16, 1e30), (jnp.float16, 300.0)]
)
def test_huge_values_keep_direction_and_bound(case, dtype, big):
    grads = tree(dtype)
    grads["w"] = grads["w"].at[0, 0].set(big)
    out, _ = run(case, grads, steps=1)
    assert all_finite(out)
    if case.name == "clip_by_value":
        assert float(jnp.max(jnp.abs(out["w"].astype(jnp.float32)))) <= 1.0
        return
    # Direction: the output is a positive multiple of the input, leaf by leaf.
    g = np.asarray(grads["w"], np.float64).ravel()
    o = np.asarray(out["w"], np.float64).ravel()
    cos = g @ o / (np.linalg.norm(g) * np.linalg.norm(o))
    assert cos > 0.999
    if case.bound is not None:
        assert norm64(out) <= case.bound(case.kwargs) * (1 + 1e-5)
        assert norm64(out) >= 0.5 * case.bound(case.kwargs) / 3**0.5  # not zeroed


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_odd_trees(case):
    tx, _ = built(case)
    # Empty trees.
    for empty in ({}, [], ()):
        out, _ = jax.jit(tx.update)(empty, tx.init(empty), empty)
        assert out == empty
    # Scalar leaves and None leaves.
    grads = {"a": jnp.float32(3.0), "n": None, "b": [jnp.array([4.0]), None]}
    params = {"a": jnp.float32(1.0), "n": None, "b": [jnp.array([1.0]), None]}
    state = tx.init(params)
    out, state = jax.jit(tx.update)(grads, state, params, **case.extra_args)
    assert out["n"] is None and out["b"][1] is None
    assert all_finite(out)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chains_with_adamw(case):
    params = tree(seed=3)
    tx = optax.chain(case.build(), optax.adamw(1e-2, weight_decay=1e-4))
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        grads = jax.tree.map(lambda p: p * (1.0 + i) + 1.0, params)
        updates, state = tx.update(grads, state, params, **case.extra_args)
        return optax.apply_updates(params, updates), state

    state0 = state
    for i in range(4):
        params, state = step(params, state, jnp.float32(i))
    assert all_finite(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    assert step._cache_size() == 1  # no recompilation across steps
    assert oc.get_stats(state)  # its statistics are found through the chain


def _our_field_names(state):
    """Field names of every optax_clip state node in ``state`` (and ClipStats)."""
    names = set()
    for node in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, tuple) and hasattr(x, "_fields")
    ):
        if hasattr(type(node), "_stats_name") or isinstance(node, oc.ClipStats):
            names.update(node._fields)
            for child in node:  # a guard's inner chain, a state's ClipStats
                names.update(_our_field_names(child))
    return names


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_field_names_are_distinctive(case):
    # optax.tree.get raises on a field name found twice in a state: ours must
    # differ from optax's (AdamW's count, mu, nu) and, for a guard, from the
    # ClipStats of the clip inside it.
    params = tree(seed=3)
    tx = optax.chain(case.build(), optax.adamw(1e-2, weight_decay=1e-4))
    state = tx.init(params)
    names = _our_field_names(state)
    assert "clip_stats" in names or "guarded_state" in names
    for name in sorted(names):
        optax.tree.get(state, name)  # KeyError if the name is not unique


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.threshold], ids=lambda c: c.name
)
def test_inject_hyperparams_traced_threshold(case):
    grads = tree(scale=10.0)
    params = params_like(grads)
    tx = optax.inject_hyperparams(case.make, static_args=case.inject_static)(
        **case.kwargs
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    out_a, state = update(grads, state, params, **case.extra_args)
    state.hyperparams[case.threshold] = jnp.asarray(0.25, jnp.float32)
    out_b, state = update(grads, state, params, **case.extra_args)
    assert update._cache_size() == 1  # the threshold is traced, not baked in
    assert norm64(out_b) < norm64(out_a)
    if case.bound is not None:
        kw = {**case.kwargs, case.threshold: 0.25}
        assert norm64(out_b) <= case.bound(kw) * (1 + 1e-5)


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.wrapper], ids=lambda c: c.name
)
def test_vmap_matches_loop(case):
    tx, update = built(case)
    batch = [tree(scale=s, seed=i) for i, s in enumerate([0.1, 1.0, 30.0])]
    params = params_like(batch[0])
    state = tx.init(params)

    def one(g):
        return tx.update(g, state, params, **case.extra_args)[0]

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)
    got = jax.jit(jax.vmap(one))(stacked)
    want = [update(g, state, params, **case.extra_args)[0] for g in batch]
    want = jax.tree.map(lambda *xs: jnp.stack(xs), *want)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_below_threshold_is_identity(case):
    if case.threshold is None:
        pytest.skip("no fixed threshold")
    grads = tree(scale=1e-3)
    out, _ = run(case, grads, steps=2, **{case.threshold: 1e3})
    chex.assert_trees_all_equal(out, grads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_threshold_rejected_at_construction(case):
    if case.threshold is None:
        pytest.skip("no threshold argument")
    for bad, err in [(-1.0, ValueError), (float("nan"), ValueError)]:
        with pytest.raises(err):
            case.build(**{case.threshold: bad})
    with pytest.raises(ValueError, match="scalar"):
        case.build(**{case.threshold: jnp.ones(2)})


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_bool_updates_are_rejected(case, dtype):
    grads = jax.tree.map(lambda x: x.astype(dtype), tree())
    tx = case.build()
    params = params_like(tree())
    with pytest.raises(TypeError, match="floating-point"):
        tx.update(grads, tx.init(params), params, **case.extra_args)


def mixed_x64_tree(scale):
    """float64 beside float32, bf16 and fp16 leaves (call under x64)."""
    t = tree(jnp.float64, scale=scale)
    t["b"] = t["b"].astype(jnp.float32)
    t["s"] = t["s"].astype(jnp.bfloat16)
    t["h"] = (scale * jnp.arange(3.0) / 4).astype(jnp.float16)
    return t


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mixed_float64_tree_under_x64(case):
    with jax.enable_x64(True):
        tx = case.build()
        update = jax.jit(tx.update)
        params = params_like(mixed_x64_tree(1.0))
        state0 = tx.init(params)
        # An all-zero tree is zeros, never NaN (nor a skipped step).
        zeros = mixed_x64_tree(0.0)
        out, state = update(zeros, state0, params, **case.extra_args)
        chex.assert_trees_all_equal(out, zeros)
        chex.assert_trees_all_equal_dtypes(out, zeros)
        assert int(oc.get_stats(state)[f"{case.name}/num_nonfinite"]) == 0
        # The state keeps its dtypes (a lax.scan carry), and a live tree with
        # one all-zero leaf stays finite.
        live = mixed_x64_tree(3.0)
        live["b"] = jnp.zeros_like(live["b"])
        for _ in range(3):
            out, state = update(live, state, params, **case.extra_args)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
        assert all_finite(out)
        np.testing.assert_array_equal(out["b"], 0.0)
