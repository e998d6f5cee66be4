"""Both code paths of the global norm against NumPy float64 references.

``global_norm`` reduces same-shape float32 leaves together (units of up to
``GROUP_SIZE``) and first concatenates tiny local/replicated leaves
(``PACK_MAX_LEAF``), when their layout allows it; ``group_size=1`` reduces
every leaf on its own. Each test runs both paths, including overflow, bf16,
empty and ``None`` leaves and sharded trees (``Explicit`` and ``Auto`` mesh
axes, ``shard_map`` with ``axis_name``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_clip as oc
from optax_clip import _core
from optax_clip import _numerics as num

PATHS = {"grouped": None, "per_leaf": 1}
P_TYPES = [1.0, 2.0, np.inf]


def ref_norm(leaves, p):
    flat = [np.abs(np.asarray(x, np.complex128)).ravel() for x in leaves]
    flat = np.concatenate(flat + [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    if p == np.inf:
        return float(np.max(flat))
    m = np.max(flat)
    if m == 0 or not np.isfinite(m):
        return float(m)
    return float(m * np.sum((flat / m) ** p) ** (1 / p))


def assert_norm_gradient(g, t):
    """``g`` is the gradient of the global 2-norm at ``t``: ``t / ||t||``."""
    n = ref_norm(jax.tree.leaves(t), 2.0)
    for gx, x in zip(jax.tree.leaves(g), jax.tree.leaves(t), strict=True):
        np.testing.assert_allclose(gx, np.asarray(x, np.float64) / n, rtol=1e-5)


def big_tree(seed=0, big=None):
    """Leaves that take every path: grouped, packed, alone, bf16, empty, None."""
    rng = np.random.default_rng(seed)

    def arr(shape, dtype=jnp.float32, scale=1.0):
        return jnp.asarray(scale * rng.normal(size=shape), dtype)

    tree = {
        "same": [arr((6, 5)) for _ in range(37)],  # 3 units of <= 16
        "tiny": [arr((3,)) for _ in range(25)],  # packed into one buffer
        "large": [arr((20_000,)) for _ in range(2)],  # alone
        "bf16": [arr((6, 5), jnp.bfloat16) for _ in range(4)],  # alone / packed
        "f16": arr((7,), jnp.float16),
        "scalar": jnp.asarray(-2.5, jnp.float32),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "none": None,
    }
    if big is not None:
        tree["same"][5] = tree["same"][5].at[1, 2].set(big)
        tree["tiny"][7] = tree["tiny"][7].at[0].set(-big / 3)
    return tree


_norm = jax.jit(num.global_norm, static_argnums=(1, 2), static_argnames="group_size")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", P_TYPES)
def test_paths_match_numpy(p, path):
    tree = big_tree()
    got = _norm(tree, p, (), group_size=PATHS[path])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got), ref_norm(jax.tree.leaves(tree), p), rtol=1e-5
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("big", [1e30, 3e37])
def test_paths_no_overflow(path, big):
    tree = big_tree(1, big=big)
    for p in P_TYPES:
        got = _norm(tree, p, (), group_size=PATHS[path])
        want = ref_norm(jax.tree.leaves(tree), p)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_paths_no_underflow(path):
    # Squares of 1e-25 are below float32's smallest normal; every path rescales.
    tree = jax.tree.map(lambda x: (x * 1e-25).astype(jnp.float32), big_tree(2))
    tree["bf16"] = None
    for p in (1.0, 2.0):
        got = _norm(tree, p, (), group_size=PATHS[path])
        want = ref_norm(jax.tree.leaves(tree), p)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where", ["same", "tiny", "large"])
def test_paths_nonfinite(path, where):
    for bad, check in [(np.nan, np.isnan), (np.inf, np.isposinf)]:
        tree = big_tree(3)
        tree[where][1] = tree[where][1].at[0].set(bad)
        for p in P_TYPES:
            got = float(_norm(tree, p, (), group_size=PATHS[path]))
            assert check(got), (bad, p, got)


@pytest.mark.parametrize("path", PATHS)
def test_paths_bf16_accumulate_in_float32(path):
    # optax stalls at 16 here (bf16 cross-leaf adds); the true norm is sqrt(320).
    tree = [jnp.ones((256,), jnp.bfloat16)] + [jnp.ones((1,), jnp.bfloat16)] * 64
    got = _norm(tree, 2.0, (), group_size=PATHS[path])
    np.testing.assert_allclose(float(got), np.sqrt(320), rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_paths_empty_and_none(path):
    for empty in ({}, [None], {"a": jnp.zeros((0,))}, [jnp.zeros((0, 3))] * 20):
        for p in P_TYPES:
            assert float(num.global_norm(empty, p, group_size=PATHS[path])) == 0.0


@pytest.mark.parametrize("path", PATHS)
def test_paths_gradient(path):
    tree = {"same": [jnp.full((2, 3), 2.0)] * 6, "tiny": [jnp.arange(3.0)] * 6}
    # Jitted: eager differentiation through lax.cond retraces every branch.
    grad_norm = jax.jit(jax.grad(lambda t: num.global_norm(t, group_size=PATHS[path])))
    for scale in (1.0, 1e30):  # plain and rescaled regimes
        t = jax.tree.map(lambda x, s=scale: x * s, tree)
        assert_norm_gradient(grad_norm(t), t)
    zeros = jax.tree.map(jnp.zeros_like, tree)
    for p in P_TYPES:
        g = jax.jit(
            jax.grad(lambda t, p=p: num.global_norm(t, p, group_size=PATHS[path]))
        )(zeros)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


def test_automatic_choice_of_units():
    leaves = [jnp.ones((4, 4))] * 40 + [jnp.ones((4, 4), jnp.bfloat16)] * 3
    leaves += [jnp.ones((num.GROUP_MAX_LEAF + 1,))] * 2
    units = num._units(leaves, [()] * len(leaves), num.GROUP_SIZE)
    sizes = sorted(len(xs) for xs, _ in units)
    # f32 same-shape leaves grouped; bf16 (conversion) and large leaves alone.
    assert sizes == [1, 1, 1, 1, 1, 8, 16, 16]
    packed, axes = num._pack([jnp.ones((3,))] * 30 + [jnp.ones((9000,))], [()] * 31)
    assert [x.shape for x in packed] == [(9000,), (90,)] and axes == [(), ()]
    assert len(num._units(leaves, [()] * len(leaves), 1)) == len(leaves)


def test_many_tiny_leaves_make_a_small_program():
    # The rescaling branch (lax.cond) must not take thousands of operands: XLA
    # compiles that very slowly. Packing makes them a few buffers of at most
    # PACK_CHUNK leaves (one 3000-operand concatenate alone compiles for 5 s).
    tree = [jax.ShapeDtypeStruct((8,), jnp.float32)] * 500
    jaxpr = jax.make_jaxpr(num.global_norm)(tree)
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    assert len(conds[0].invars) <= -(-500 // num.PACK_CHUNK) + 2
    concats = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "concatenate"]
    assert concats and max(len(e.invars) for e in concats) <= num.PACK_CHUNK


def _explicit_tree(mesh):
    rng = np.random.default_rng(4)

    def put(shape, spec):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return {
        "rows": [put((16, 4), P("data")) for _ in range(20)],  # grouped by spec
        "cols": [put((16, 8), P(None, "data")) for _ in range(3)],
        "repl_tiny": [put((5,), P()) for _ in range(10)],  # packed
        "shard_tiny": [put((8,), P("data")) for _ in range(3)],  # never packed
    }


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_jit(n_devices, axis_type):
    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(axis_type,))
    tree = _explicit_tree(mesh)
    want = ref_norm(jax.tree.leaves(tree), 2.0)
    for group_size in PATHS.values():
        got = _norm(tree, 2.0, (), group_size=group_size)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # The whole clip under jit: no ShardingTypeError, shardings kept.
    tx = oc.clip_by_global_norm(1.0)
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    np.testing.assert_allclose(float(state.clip_stats.pre_clip_norm), want, rtol=1e-5)
    np.testing.assert_allclose(float(num.global_norm(out)), 1.0, rtol=1e-5)
    if axis_type == AxisType.Explicit:
        assert out["rows"][0].sharding.spec[0] == "data"
        assert out["cols"][0].sharding.spec[1] == "data"


def test_shard_map_axis_name(n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",))
    tree = _explicit_tree(mesh)
    del tree["cols"]
    want = ref_norm(jax.tree.leaves(tree), 2.0)
    specs = {
        "rows": [P("data")] * 20,
        "repl_tiny": [P()] * 10,
        "shard_tiny": [P("data")] * 3,
    }
    for group_size in PATHS.values():
        fn = jax.shard_map(
            lambda t, g=group_size: num.global_norm(t, 2.0, ("data",), group_size=g),
            mesh=mesh,
            in_specs=(specs,),
            out_specs=P(),
        )
        np.testing.assert_allclose(float(jax.jit(fn)(tree)), want, rtol=1e-5)


def test_bf16_round_toward_zero_fast_path():
    rng = np.random.default_rng(5)
    v = rng.normal(size=20_000) * 10.0 ** rng.integers(-30, 30, size=20_000)
    y = jnp.asarray(
        np.concatenate([v, [0.0, -0.0, 1e38, -3.3e38, 65504.0]]), jnp.float32
    )
    fast = np.asarray(_core._bf16_toward_zero(y).astype(jnp.float32))
    slow = np.asarray(_core._cast_toward_zero(y, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(fast, slow)
    assert np.all(np.abs(fast) <= np.abs(np.asarray(y)))
    special = jnp.asarray([np.inf, -np.inf, np.nan], jnp.float32)
    out = np.asarray(_core._bf16_toward_zero(special).astype(jnp.float32))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    # Differentiated like a plain cast.
    g = jax.grad(
        lambda y: jnp.sum(_core._bf16_toward_zero(3.0 * y).astype(jnp.float32))
    )
    np.testing.assert_array_equal(g(jnp.ones(3)), [3.0, 3.0, 3.0])


def test_bf16_to_f32_bits_is_exact():
    x = jnp.asarray(np.random.default_rng(6).normal(size=1000) * 1e20, jnp.bfloat16)
    np.testing.assert_array_equal(_core._bf16_to_f32(x), x.astype(jnp.float32))
    g = jax.grad(lambda x: jnp.sum(_core._bf16_to_f32(x) * 2.0))(x)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(g == 2.0))


def test_bf16_clip_matches_reference():
    tree = {
        "a": [jnp.full((6, 5), 3.0, jnp.bfloat16)] * 4,
        "b": jnp.ones(9, jnp.bfloat16),
    }
    tx = oc.clip_by_global_norm(1.0)
    out, _ = jax.jit(tx.update)(tree, tx.init(tree))
    n = ref_norm(jax.tree.leaves(tree), 2.0)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        exact = np.asarray(x, np.float64) / n
        got = np.asarray(y, np.float64)
        assert np.all(got <= exact) and np.all(got >= exact * (1 - 2**-7))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("policy", ["propagate", "zero_update"])
def test_16bit_clip_writes_no_float32_copy(dtype, policy):
    # XLA:CPU converts a bf16/fp16 select to float32; that conversion of the
    # gradient merged with the norm's and was written out on every step. The
    # clip selects bit patterns instead: for bf16 the compiled program has no
    # float32 array of the gradient's shape (fp16 still has one: its scale
    # pass converts with the same op as the norm), and the values are as
    # before.
    tx = oc.clip_by_global_norm(1.0, nonfinite=policy)
    g = {"a": jax.ShapeDtypeStruct((256, 96), dtype)}
    hlo = jax.jit(tx.update).lower(g, jax.eval_shape(tx.init, g)).compile().as_text()
    if dtype == jnp.bfloat16:
        assert "f32[256,96]" not in hlo.split("ENTRY")[1]
        # The same for the per-leaf clips (one scalar scale per leaf).
        for per_leaf in (oc.clip_by_block_norm(1.0, nonfinite=policy), oc.adagc()):
            state = jax.eval_shape(per_leaf.init, g)
            text = jax.jit(per_leaf.update).lower(g, state).compile().as_text()
            assert "f32[256,96]" not in text.split("ENTRY")[1]
    x = jnp.asarray(np.random.default_rng(8).normal(size=(256, 96)), dtype)
    small = x * jnp.asarray(1e-4, dtype)  # below the threshold: returned as is
    for tree in ({"a": x}, {"a": small}):
        out, _ = jax.jit(tx.update)(tree, tx.init(tree))
        if tree["a"] is small:
            assert np.asarray(out["a"]).tobytes() == np.asarray(small).tobytes()
        else:
            n = np.linalg.norm(np.asarray(x, np.float64))
            got = np.asarray(out["a"], np.float64)
            want = np.asarray(x, np.float64) / n
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=1.2e-7)
    bad = {"a": x.at[3, 4].set(jnp.nan)}
    out, _ = jax.jit(tx.update)(bad, tx.init(bad))
    if policy == "zero_update":
        assert not np.any(np.asarray(out["a"], np.float32))
    else:
        assert np.all(np.isnan(np.asarray(out["a"], np.float32)))
    # Differentiated like a select (a bitcast alone would give no gradient);
    # loose: the backward pass sums in 16 bits.
    state = tx.init({"a": small})
    grad = jax.grad(lambda c: jnp.sum(tx.update({"a": small * c}, state)[0]["a"]))
    np.testing.assert_allclose(
        float(grad(jnp.asarray(1.0, dtype))),
        float(jnp.sum(small.astype(jnp.float32))),
        rtol=0.1,
    )


def test_materialize_is_the_identity():
    x = {"a": jnp.float32(2.0), "b": jnp.arange(3), "c": jnp.bool_(True)}
    out = num.materialize(x)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(out), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    f = jax.jit(jax.grad(lambda v: num.materialize(v * v) * 3.0))
    assert float(f(2.0)) == 12.0
    np.testing.assert_array_equal(
        jax.vmap(num.materialize)(jnp.arange(4.0)), np.arange(4.0)
    )


# --------------------------------------------------------------------------
# Per-leaf norms: tiny leaves of one size are reduced as the rows of a stack.
# --------------------------------------------------------------------------


def _row_tree(seed=0, big=None):
    rng = np.random.default_rng(seed)
    tree = big_tree(seed, big)
    # 70 leaves of size 4 in two shapes, interleaved: two stacks (PACK_CHUNK
    # is 64), and the unit order differs from the leaf order.
    tree["size4"] = [
        jnp.asarray(rng.normal(size=(2, 2) if i % 2 else (4,)), jnp.float32)
        for i in range(70)
    ]
    tree["zero"] = jnp.zeros((3,), jnp.float32)
    if big is not None:
        tree["size4"][41] = tree["size4"][41].at[0].set(big)
    return tree


_leaf_norms = jax.jit(num.leaf_norms, static_argnums=(1, 2))


@pytest.mark.parametrize("p", P_TYPES)
@pytest.mark.parametrize("big", [None, 1e38, 1e-40])
def test_leaf_norms_stacked_rows_match_numpy(p, big):
    tree = _row_tree(big=big)
    leaves = jax.tree.leaves(tree)
    got = _leaf_norms(tree, p)
    assert len(got) == len(leaves)
    for x, n in zip(leaves, got, strict=True):
        assert n.dtype == num.accumulation_dtype(x.dtype)
        np.testing.assert_allclose(float(n), ref_norm([x], p), rtol=2e-6, atol=0)
    assert len(num._row_units(leaves, [()] * len(leaves))) < len(leaves) // 2


@pytest.mark.parametrize("p", P_TYPES)
def test_leaf_norms_stacked_rows_nonfinite(p):
    tree = _row_tree()
    tree["size4"][10] = tree["size4"][10].at[1].set(jnp.nan)
    tree["size4"][11] = tree["size4"][11].at[0, 1].set(-jnp.inf)
    leaves = jax.tree.leaves(tree)
    got = np.asarray([float(n) for n in _leaf_norms(tree, p)])
    bad = [i for i, x in enumerate(leaves) if not np.all(np.isfinite(x))]
    assert len(bad) == 2
    assert np.isnan(got[bad[0]]) and got[bad[1]] == np.inf
    good = np.delete(np.arange(len(leaves)), bad)
    want = np.asarray([ref_norm([leaves[i]], p) for i in good])
    np.testing.assert_allclose(got[good], want, rtol=2e-6)


def test_leaf_norms_many_tiny_leaves_make_a_small_program():
    tree = [jax.ShapeDtypeStruct((8,), jnp.float32)] * 500
    jaxpr = jax.make_jaxpr(num.leaf_norm_vector)(tree)
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    # The stacks, the branch index, the sums and the in-range flags.
    assert len(conds[0].invars) <= -(-500 // num.PACK_CHUNK) + 3


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_leaf_norms_sharded_jit(n_devices, axis_type):
    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(axis_type,))
    tree = _explicit_tree(mesh)
    leaves = jax.tree.leaves(tree)
    got = _leaf_norms(tree, 2.0)
    want = [ref_norm([x], 2.0) for x in leaves]
    np.testing.assert_allclose([float(n) for n in got], want, rtol=1e-5)
    tx = oc.clip_by_block_norm(1.0)
    out, _ = jax.jit(tx.update)(tree, tx.init(tree))
    post = [ref_norm([x], 2.0) for x in jax.tree.leaves(out)]
    np.testing.assert_allclose(post, np.minimum(want, 1.0), rtol=1e-5)


def test_leaf_norms_shard_map_axis_name(n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",))
    tree = _explicit_tree(mesh)
    del tree["cols"]
    specs = {
        "rows": [P("data")] * 20,
        "repl_tiny": [P()] * 10,
        "shard_tiny": [P("data")] * 3,
    }
    fn = jax.shard_map(
        lambda t: num.leaf_norm_vector(t, 2.0, ("data",)),
        mesh=mesh,
        in_specs=(specs,),
        out_specs=P(),
    )
    want = [ref_norm([x], 2.0) for x in jax.tree.leaves(tree)]
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(tree)), want, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_gradient_sized_temporaries(dtype):
    # The overflow-safe branch once reserved twice the gradients' bytes of
    # temporary memory on every step (max |x| through abs and a bit cast, and
    # grouped leaves, were written out before XLA:CPU's YNNPACK reductions,
    # which cannot fuse them), and AGC on bf16 eight times. The compiled
    # programs now hold no array of a gradient's size beyond their outputs.
    def s(shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    tree = {
        "big": s((512, 256)),
        "grouped": [s((64, 128))] * 20,
        "tiny": [s((8,))] * 100,
    }
    small = {"big": tree["big"], "grouped": tree["grouped"][:2]}  # AGC compiles slowly
    cases = {
        "global": (oc.clip_by_global_norm(1.0), tree),
        "block": (oc.clip_by_block_norm(1.0), tree),
        "zclip": (oc.zclip(), tree),
        "adagc": (oc.adagc(), tree),
        "agc": (oc.adaptive_grad_clip(0.01), small),
    }
    for name, (tx, g) in cases.items():
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(g))
        state = jax.eval_shape(tx.init, g)
        fn = jax.jit(lambda g, st, p, tx=tx: tx.update(g, st, p))
        temp = fn.lower(g, state, g).compile().memory_analysis().temp_size_in_bytes
        # AGC: per-unit norms and scales (small, but not a few scalars).
        assert temp < (0.2 if name == "agc" else 0.05) * nbytes, (name, temp, nbytes)


# --------------------------------------------------------------------------
# Many mid-size leaves: the rescaled branch groups them (BRANCH_GROUP_SIZE).
# --------------------------------------------------------------------------


def _mid_tree(big=None, bad=False):
    """More than BRANCH_GROUP_SIZE // 4 units of leaves reduced one by one."""
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


def test_branch_groups_mid_size_leaves():
    leaves = jax.tree.leaves(_mid_tree())
    axes = [()] * len(leaves)
    units = num._units(*num._pack(leaves, axes), num.GROUP_SIZE)
    assert num._regroup_branch(len(units))
    grouped = num._units(leaves, axes, num.BRANCH_GROUP_SIZE, np.inf, narrow=True)
    assert len(grouped) == 4  # bf16 (and the zero leaf), f32, other, c64
    row_units = num._row_units(leaves, axes)
    groups, positions, perm = num._branch_groups(row_units)
    assert len(groups) == 4 and perm is not None
    assert sorted(j for pos in positions for j in pos) == list(range(len(leaves)))


@pytest.mark.parametrize("p", P_TYPES)
@pytest.mark.parametrize("big", [None, 1e30, 3e37, 1e-40])
def test_branch_groups_match_numpy(p, big):
    tree = _mid_tree(big)
    leaves = jax.tree.leaves(tree)
    want = ref_norm(leaves, p)
    np.testing.assert_allclose(float(_norm(tree, p)), want, rtol=2e-6, atol=0)
    got = _leaf_norms(tree, p)
    for x, n in zip(leaves, got, strict=True):
        np.testing.assert_allclose(float(n), ref_norm([x], p), rtol=2e-6, atol=0)


@pytest.mark.parametrize("p", P_TYPES)
def test_branch_groups_nonfinite(p):
    tree = _mid_tree(big=1e30, bad=True)
    leaves = jax.tree.leaves(tree)
    assert np.isnan(float(_norm(tree, p)))
    got = np.asarray([float(n) for n in _leaf_norms(tree, p)])
    nan_at = [i for i, x in enumerate(leaves) if x is tree["bf16"][9]][0]
    inf_at = [i for i, x in enumerate(leaves) if x is tree["f32"][2]][0]
    assert np.isnan(got[nan_at]) and got[inf_at] == np.inf
    good = np.delete(np.arange(len(leaves)), [nan_at, inf_at])
    want = np.asarray([ref_norm([leaves[i]], p) for i in good])
    np.testing.assert_allclose(got[good], want, rtol=2e-6)


def test_branch_groups_gradient():
    tree = _mid_tree()
    tree = {k: v for k, v in tree.items() if k in ("bf16", "f32", "other")}
    tree["bf16"] = [x.astype(jnp.float32) for x in tree["bf16"]]
    assert num._regroup_branch(len(num._row_units(jax.tree.leaves(tree), [()] * 37)))
    # Per-leaf: d(sum_i w_i ||x_i||)/dx_i = w_i x_i / ||x_i||.
    w = np.arange(1.0, 38.0)

    def weighted(t):
        return jnp.dot(num.leaf_norm_vector(t), jnp.asarray(w, jnp.float32))

    grad_global = jax.jit(jax.grad(num.global_norm))
    grad_weighted = jax.jit(jax.grad(weighted))
    for scale in (1.0, 1e30):  # plain and rescaled regimes
        t = jax.tree.map(lambda x, s=scale: x * s, tree)
        assert_norm_gradient(grad_global(t), t)
        g = grad_weighted(t)
        pairs = zip(jax.tree.leaves(g), jax.tree.leaves(t), strict=True)
        for i, (gx, x) in enumerate(pairs):
            x = np.asarray(x, np.float64)
            want = w[i] * x / ref_norm([x], 2.0)
            np.testing.assert_allclose(gx, want, rtol=1e-5, atol=1e-30)
