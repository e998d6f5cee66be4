"""The reduction plan: results do not depend on it, and it keeps programs small.

Every norm goes through ``_plan.make``: tiny leaves are stacked and reduced
row by row, and many same-shape leaves share one fused reduction in the
rescaled pass. Each test runs with the plan as it is ("planned") and with both
mechanisms switched off ("unplanned", every leaf reduced on its own), on
trees that take every path (overflow, underflow, bf16, empty and ``None``
leaves, sharded trees under ``Explicit`` and ``Auto`` mesh axes, ``shard_map``
with ``axis_name``), against NumPy float64.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_clip as oc
from optax_clip import _norms, _plan

P_TYPES = [1.0, 2.0, np.inf]


@contextlib.contextmanager
def unplanned():
    saved = _plan.STACK_MAX_LEAF, _plan.BRANCH_GROUP_SIZE
    _plan.STACK_MAX_LEAF, _plan.BRANCH_GROUP_SIZE = 0, 1
    try:
        yield
    finally:
        _plan.STACK_MAX_LEAF, _plan.BRANCH_GROUP_SIZE = saved


MODES = {"planned": contextlib.nullcontext, "unplanned": unplanned}
# The unplanned programs (one reduction per leaf) compile slowly.
MODE_PARAMS = [
    pytest.param("planned"),
    pytest.param("unplanned", marks=pytest.mark.slow),
]


@functools.cache
def _jitted(name, p, mode):
    """One jitted function per case: trees of the same shapes compile once."""
    return jax.jit(lambda t: getattr(_norms, name)(t, p))


def global_norm(tree, p=2.0, mode="planned"):
    with MODES[mode]():  # a new tree structure is traced inside the mode
        return _jitted("global_norm", p, mode)(tree)


def leaf_norms(tree, p=2.0, mode="planned"):
    with MODES[mode]():
        return np.asarray(_jitted("leaf_norms", p, mode)(tree))


def check(tree, p, mode, rtol=2e-6, atol=0.0):
    """Global and per-leaf norms of ``tree`` against NumPy float64."""
    leaves = jax.tree.leaves(tree)
    got = float(global_norm(tree, p, mode))
    np.testing.assert_allclose(got, reference.norm(leaves, p), rtol, atol)
    want = [reference.norm([x], p) for x in leaves]
    np.testing.assert_allclose(leaf_norms(tree, p, mode), want, rtol, atol)


def assert_norm_gradient(g, t):
    """``g`` is the gradient of the global 2-norm at ``t``: ``t / ||t||``."""
    n = reference.norm(jax.tree.leaves(t), 2.0)
    for gx, x in zip(jax.tree.leaves(g), jax.tree.leaves(t), strict=True):
        np.testing.assert_allclose(gx, np.asarray(x, np.float64) / n, rtol=1e-5)


def big_tree(seed=0, big=None, mode="planned"):
    """Leaves that take every path: stacked, alone, grouped, bf16, empty, None.

    Fewer leaves of each kind when ``mode`` is "unplanned" (each leaf reduced
    on its own: one leaf of a kind covers the path, and these programs
    compile slowly).
    """
    rng = np.random.default_rng(seed)
    n_same, n_tiny, n_size4 = (37, 25, 70) if mode == "planned" else (6, 8, 6)

    def arr(shape, dtype=jnp.float32, scale=1.0):
        return jnp.asarray(scale * rng.normal(size=shape), dtype)

    tree = {
        "same": [arr((6, 5)) for _ in range(n_same)],  # stacked (30 values each)
        "tiny": [arr((3,)) for _ in range(n_tiny)],  # stacked
        "size4": [arr((2, 2) if i % 2 else (4,)) for i in range(n_size4)],  # 2 stacks
        "large": [arr((20_000,)) for _ in range(2)],  # alone
        "bf16": [arr((6, 5), jnp.bfloat16) for _ in range(4)],
        "f16": arr((7,), jnp.float16),
        "scalar": jnp.asarray(-2.5, jnp.float32),
        "zero": jnp.zeros((3,), jnp.float32),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "none": None,
    }
    if big is not None:
        tree["same"][5] = tree["same"][5].at[1, 2].set(big)
        tree["tiny"][7] = tree["tiny"][7].at[0].set(-big / 3)
        k = min(41, n_size4 - 1)  # odd: a (2, 2) leaf
        tree["size4"][k] = tree["size4"][k].at[0].set(big)
    return tree


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("p", P_TYPES)
@pytest.mark.parametrize("big", [None, 1e30, 3e37, 1e-40])
def test_norms_match_numpy(p, mode, big):
    check(big_tree(1, big=big, mode=mode), p, mode)


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_no_underflow(mode):
    # Squares of 1e-25 are below float32's smallest normal; every path rescales.
    tree = jax.tree.map(
        lambda x: (x * 1e-25).astype(jnp.float32), big_tree(2, mode=mode)
    )
    tree["bf16"] = None
    for p in (1.0, 2.0):
        check(tree, p, mode, rtol=1e-5)


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("where", ["same", "tiny", "large"])
def test_nonfinite(mode, where):
    for bad, is_bad in [(np.nan, np.isnan), (np.inf, np.isposinf)]:
        tree = big_tree(3, mode=mode)
        del tree["size4"]  # fewer leaves to compile
        tree[where][1] = tree[where][1].at[0].set(bad)
        position = [
            i for i, x in enumerate(jax.tree.leaves(tree)) if x is tree[where][1]
        ]
        for p in P_TYPES:
            assert is_bad(float(global_norm(tree, p, mode))), (bad, p)
            per_leaf = leaf_norms(tree, p, mode)
            assert is_bad(per_leaf[position[0]])
            assert np.sum(~np.isfinite(per_leaf)) == 1


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_bf16_accumulates_in_float32(mode):
    # optax stalls at 16 here (bf16 cross-leaf adds); the true norm is sqrt(320).
    tree = [jnp.ones((256,), jnp.bfloat16)] + [jnp.ones((1,), jnp.bfloat16)] * 64
    np.testing.assert_allclose(float(global_norm(tree, 2.0, mode)), np.sqrt(320))


def test_empty_and_none():
    for empty in ({}, [None], {"a": jnp.zeros((0,))}, [jnp.zeros((0, 3))] * 20):
        for mode in MODES:
            for p in P_TYPES:
                assert float(global_norm(empty, p, mode)) == 0.0
                assert not np.any(leaf_norms(empty, p, mode))


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_gradient(mode):
    tree = {"same": [jnp.full((2, 3), 2.0)] * 6, "tiny": [jnp.arange(3.0)] * 6}
    with MODES[mode]():
        grad_norm = jax.jit(jax.grad(_norms.global_norm))
        for scale in (1.0, 1e30):  # plain and rescaled passes
            t = jax.tree.map(lambda x, s=scale: x * s, tree)
            assert_norm_gradient(grad_norm(t), t)
        zeros = jax.tree.map(jnp.zeros_like, tree)
        for p in P_TYPES:
            g = jax.jit(jax.grad(lambda t, p=p: _norms.global_norm(t, p)))(zeros)
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


def test_plan_stacks_tiny_leaves_and_covers_every_leaf():
    leaves = jax.tree.leaves(big_tree())
    plan = _plan.make(leaves, [()] * len(leaves))
    rows = [i for seg in plan.segments for i in seg.leaves] + list(plan.empty)
    assert sorted(rows) == list(range(len(leaves)))
    stacks = [seg for seg in plan.segments if seg.stacked]
    assert stacks and all(len(s.leaves) <= _plan.STACK_ROWS for s in stacks)
    assert len(plan.segments) < len(leaves) // 4
    with unplanned():
        plan = _plan.make(leaves, [()] * len(leaves))
    assert not any(seg.stacked for seg in plan.segments)
    assert len(plan.segments) == len(leaves) - 1  # all but the empty leaf


@pytest.mark.parametrize("fn", [_norms.global_norm, _norms.leaf_norms])
def test_many_tiny_leaves_make_a_small_program(fn):
    # The rescaled pass (a lax.cond) must not take thousands of operands, and
    # no concatenate thousands: XLA compiles those very slowly.
    tree = [jax.ShapeDtypeStruct((8,), jnp.float32)] * 500
    jaxpr = jax.make_jaxpr(fn)(tree)
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    assert len(conds[0].invars) <= -(-500 // _plan.STACK_ROWS) + 6
    concats = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "concatenate"]
    assert max(len(e.invars) for e in concats) <= _plan.STACK_ROWS


def _explicit_tree(mesh):
    rng = np.random.default_rng(4)

    def put(shape, spec):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return {
        "rows": [put((16, 4), P("data")) for _ in range(20)],
        "cols": [put((16, 8), P(None, "data")) for _ in range(3)],
        "repl_tiny": [put((5,), P()) for _ in range(10)],  # stacked
        "shard_tiny": [put((8,), P("data")) for _ in range(3)],  # never stacked
    }


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_jit(n_devices, axis_type):
    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(axis_type,))
    tree = _explicit_tree(mesh)
    for mode in MODES:
        check(tree, 2.0, mode, rtol=1e-5)
    # The whole clips under jit: no ShardingTypeError, shardings kept.
    want = reference.norm(jax.tree.leaves(tree), 2.0)
    tx = oc.clip_by_global_norm(1.0)
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    np.testing.assert_allclose(float(state.clip_stats.pre_clip_norm), want, rtol=1e-5)
    # Under jit: an eager op-by-op norm of arrays sharded over 8 simulated
    # devices once aborted the process (SIGABRT inside XLA:CPU's dispatch).
    post_norm = jax.jit(_norms.global_norm)(out)
    np.testing.assert_allclose(float(post_norm), 1.0, rtol=1e-5)
    tx = oc.clip_by_block_norm(1.0)
    out, _ = jax.jit(tx.update)(tree, tx.init(tree))
    post = [reference.norm([x], 2.0) for x in jax.tree.leaves(out)]
    pre = [reference.norm([x], 2.0) for x in jax.tree.leaves(tree)]
    np.testing.assert_allclose(post, np.minimum(pre, 1.0), rtol=1e-5)
    if axis_type == AxisType.Explicit:
        assert out["rows"][0].sharding.spec[0] == "data"
        assert out["cols"][0].sharding.spec[1] == "data"


def test_shard_map_axis_name(n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",))
    tree = _explicit_tree(mesh)
    del tree["cols"]
    specs = {
        "rows": [P("data")] * 20,
        "repl_tiny": [P()] * 10,
        "shard_tiny": [P("data")] * 3,
    }
    leaves = jax.tree.leaves(tree)
    for mode in MODES:
        with MODES[mode]():
            fn = jax.shard_map(
                lambda t: (
                    _norms.global_norm(t, 2.0, ("data",)),
                    _norms.leaf_norms(t, 2.0, ("data",)),
                ),
                mesh=mesh,
                in_specs=(specs,),
                out_specs=(P(), P()),
            )
            total, per_leaf = jax.jit(fn)(tree)
        np.testing.assert_allclose(float(total), reference.norm(leaves, 2.0), 1e-5)
        want = [reference.norm([x], 2.0) for x in leaves]
        np.testing.assert_allclose(np.asarray(per_leaf), want, rtol=1e-5)


# --------------------------------------------------------------------------
# Many mid-size leaves: the rescaled pass groups them (BRANCH_GROUP_SIZE).
# --------------------------------------------------------------------------


def _mid_tree(big=None, bad=False):
    """More than BRANCH_GROUP_MIN mid-size leaves, in a few shapes."""
    rng = np.random.default_rng(3)
    tree = {
        "bf16": [
            jnp.asarray(rng.normal(size=(70, 70)), jnp.bfloat16) for _ in range(24)
        ],
        "f32": [
            jnp.asarray(rng.normal(size=(16_500,)), jnp.float32) for _ in range(12)
        ],
        "other": jnp.asarray(rng.normal(size=(100, 170)), jnp.float32),
        "c64": jnp.asarray(rng.normal(size=5000) + 1j * rng.normal(size=5000)),
        "zero": jnp.zeros((70, 70), jnp.bfloat16),
    }
    tree["c64"] = tree["c64"].astype(jnp.complex64)
    if big is not None:
        tree["bf16"][5] = tree["bf16"][5].at[3, 4].set(big)
        tree["f32"][7] = tree["f32"][7].at[11].set(-big / 3)
    if bad:
        tree["bf16"][9] = tree["bf16"][9].at[0, 0].set(jnp.nan)
        tree["f32"][2] = tree["f32"][2].at[5].set(jnp.inf)
    return tree


def test_branch_groups_of_mid_size_leaves():
    leaves = jax.tree.leaves(_mid_tree())
    plan = _plan.make(leaves, [()] * len(leaves))
    sizes = sorted(stop - start for start, stop in plan.branch_groups)
    assert sizes == [12, 25]  # f32, and bf16 with the zero leaf
    for start, stop in plan.branch_groups:
        shapes = {plan.segments[i].array.shape for i in range(start, stop)}
        assert len(shapes) == 1
    assert plan.to_leaf_order is not None


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("p", P_TYPES)
@pytest.mark.parametrize("big", [None, 1e30, 3e37, 1e-40])
def test_branch_groups_match_numpy(p, big, mode):
    check(_mid_tree(big), p, mode)


@pytest.mark.parametrize("p", P_TYPES)
def test_branch_groups_nonfinite(p):
    tree = _mid_tree(big=1e30, bad=True)
    leaves = jax.tree.leaves(tree)
    assert np.isnan(float(global_norm(tree, p)))
    got = leaf_norms(tree, p)
    nan_at = [i for i, x in enumerate(leaves) if x is tree["bf16"][9]][0]
    inf_at = [i for i, x in enumerate(leaves) if x is tree["f32"][2]][0]
    assert np.isnan(got[nan_at]) and got[inf_at] == np.inf
    good = np.delete(np.arange(len(leaves)), [nan_at, inf_at])
    want = [reference.norm([leaves[i]], p) for i in good]
    np.testing.assert_allclose(got[good], want, rtol=2e-6)


def test_branch_groups_gradient():
    tree = _mid_tree()
    tree = {k: v for k, v in tree.items() if k in ("bf16", "f32", "other")}
    tree["bf16"] = [x.astype(jnp.float32) for x in tree["bf16"]]
    # Per-leaf: d(sum_i w_i ||x_i||)/dx_i = w_i x_i / ||x_i||.
    w = np.arange(1.0, 38.0)

    def weighted(t):
        return jnp.dot(_norms.leaf_norms(t), jnp.asarray(w, jnp.float32))

    grad_global = jax.jit(jax.grad(_norms.global_norm))
    grad_weighted = jax.jit(jax.grad(weighted))
    for scale in (1.0, 1e30):  # plain and rescaled passes
        t = jax.tree.map(lambda x, s=scale: x * s, tree)
        assert_norm_gradient(grad_global(t), t)
        g = grad_weighted(t)
        pairs = zip(jax.tree.leaves(g), jax.tree.leaves(t), strict=True)
        for i, (gx, x) in enumerate(pairs):
            x = np.asarray(x, np.float64)
            want = w[i] * x / reference.norm([x], 2.0)
            np.testing.assert_allclose(gx, want, rtol=1e-5, atol=1e-30)


# --------------------------------------------------------------------------
# Which pass runs: ordinary trees never take the rescaled pass.
# --------------------------------------------------------------------------


def _rescaled_pass_runs(tree, per_leaf):
    """Whether the norms of ``tree`` take the rescaled pass (its predicate)."""
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    plan = _plan.make(leaves, [()] * len(leaves))
    sums, maxes = _norms._plain_pass(plan, 2.0, jnp.float32)
    s, m = jnp.concatenate(sums), jnp.concatenate(maxes)
    if not per_leaf:
        s, m = jnp.sum(s), jnp.max(m)
    return bool(jnp.any(_norms._needs_rescale(s, m)))


def _trap_trees():
    rng = np.random.default_rng(7)
    healthy = {
        "w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(32,)), jnp.float32),
        "h": jnp.asarray(rng.normal(size=(32, 16)), jnp.bfloat16),
    }
    return {
        "zero_leaf": {**healthy, "frozen": jnp.zeros((64, 32))},
        "all_zero": jax.tree.map(jnp.zeros_like, healthy),
        "repeated_value": {**healthy, "c": jnp.full((128,), 0.125)},
        "subnormal_only": {**healthy, "s": jnp.full((16,), 1e-40, jnp.float32)},
        "mixed_f32_bf16": healthy,
        "tiny_and_large": {
            **healthy,
            "t": jnp.full((3,), 1e-12),
            "l": jnp.full((3,), 1e12),
        },
    }


@pytest.mark.parametrize("name", list(_trap_trees()))
def test_ordinary_trees_never_take_the_rescaled_pass(name):
    tree = _trap_trees()[name]
    for per_leaf in (False, True):
        assert not _rescaled_pass_runs(tree, per_leaf), (name, per_leaf)
    # Subnormals count as zero (XLA flushes them).
    check(tree, 2.0, "planned", rtol=1e-5, atol=float(jnp.finfo(jnp.float32).tiny))


def test_overflow_and_underflow_take_the_rescaled_pass():
    for value in (1e30, 1e-25):
        tree = {"a": jnp.full((4,), value, jnp.float32), "b": jnp.ones(3)}
        assert _rescaled_pass_runs(tree, per_leaf=True)
        assert _rescaled_pass_runs(tree, per_leaf=False) == (value > 1)
