"""Norms (``_norms``) against NumPy float64 references: dtypes, overflow, zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from optax_clip import _norms as num
from optax_clip import _xla_cpu

P_TYPES = [1.0, 2.0, np.inf]


def mixed_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "f32": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=(11,)), jnp.bfloat16),
        "f16": jnp.asarray(rng.normal(size=(3, 2, 2)), jnp.float16),
        "scalar": jnp.asarray(-2.5, jnp.float32),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "none": None,
    }


@pytest.mark.parametrize("p", P_TYPES)
def test_global_norm_matches_numpy(p):
    tree = mixed_tree()
    got = jax.jit(lambda t: num.global_norm(t, p))(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got), reference.norm(jax.tree.leaves(tree), p), rtol=2e-6
    )


@pytest.mark.parametrize("p", P_TYPES)
def test_leaf_norms_match_numpy(p):
    tree = mixed_tree(1)
    got = jax.jit(lambda t: num.leaf_norms(t, p))(tree)
    want = [reference.norm([x], p) for x in jax.tree.leaves(tree)]
    np.testing.assert_allclose([float(g) for g in got], want, rtol=2e-6)


@pytest.mark.parametrize("p", P_TYPES)
@pytest.mark.parametrize(
    "dtype,big",
    [
        (jnp.float32, 1e30),
        (jnp.float32, 3e38),
        (jnp.bfloat16, 1e30),
        (jnp.float16, 300.0),
    ],
)
def test_no_overflow(p, dtype, big):
    x = jnp.asarray([big, -big / 3, 1.0, 0.0], dtype)
    tree = {"a": x, "b": jnp.ones((3,), dtype)}
    want = reference.norm(jax.tree.leaves(tree), p)
    if not np.isfinite(want) or want > float(np.finfo(np.float32).max):
        pytest.skip("true norm beyond float32")
    got = jax.jit(lambda t: num.global_norm(t, p))(tree)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    leaf = jax.jit(lambda t: num.leaf_norms(t, p))(tree)[0]
    np.testing.assert_allclose(float(leaf), reference.norm([tree["a"]], p), rtol=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_no_underflow(p):
    # Squares of 1e-25 are far below float32's smallest normal (1e-38).
    tree = {"a": jnp.full((4,), 1e-25, jnp.float32), "b": jnp.zeros((2,))}
    got = num.global_norm(tree, p)
    np.testing.assert_allclose(
        float(got), reference.norm(jax.tree.leaves(tree), p), rtol=1e-6
    )
    got_leaf = num.leaf_norms(tree, p)
    np.testing.assert_allclose(
        float(got_leaf[0]), reference.norm([tree["a"]], p), rtol=1e-6
    )
    assert float(got_leaf[1]) == 0.0


def test_bf16_accumulates_in_float32_across_leaves():
    # optax adds per-leaf sums in bf16: once the running sum reaches 256, adding
    # a leaf's 1.0 is lost (1000 such leaves give 16 instead of 31.62). Here:
    # one leaf with sum of squares 256, then 64 leaves of 1.0 (true norm 17.89).
    tree = [jnp.ones((256,), jnp.bfloat16)] + [jnp.ones((1,), jnp.bfloat16)] * 64
    got = jax.jit(num.global_norm)(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), np.sqrt(320), rtol=1e-6)
    import optax

    assert float(optax.tree.norm(tree)) == 16.0  # what we fix


def test_fp16_large_leaf_sum():
    # 1e5 fp16 ones: the leaf's sum of squares (1e5) exceeds fp16's range.
    x = jnp.ones((100_000,), jnp.float16)
    np.testing.assert_allclose(float(num.global_norm(x)), np.sqrt(1e5), rtol=1e-6)


def test_float64_leaves_accumulate_in_float64():
    with jax.enable_x64(True):
        x = jnp.asarray([1e200, 1.0, -3e199], jnp.float64)
        got = num.global_norm({"a": x, "b": jnp.ones(2, jnp.float32)})
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), np.hypot(1e200, 3e199), rtol=1e-12)


def test_complex_leaves():
    x = jnp.asarray([3 + 4j, 1j], jnp.complex64)
    for p in P_TYPES:
        np.testing.assert_allclose(
            float(num.global_norm(x, p)), reference.norm([x], p), rtol=1e-6
        )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("p", P_TYPES)
def test_nonfinite_input_gives_nonfinite_norm(bad, p):
    tree = {"a": jnp.asarray([1.0, bad]), "b": jnp.ones(3)}
    assert not np.isfinite(float(num.global_norm(tree, p)))
    leaf = num.leaf_norms(tree, p)
    assert not np.isfinite(float(leaf[0])) and np.isfinite(float(leaf[1]))


def test_empty_tree():
    for empty in ({}, [], None, {"a": None}):
        assert float(num.global_norm(empty)) == 0.0
        assert num.leaf_norms(empty).shape == (0,)


@pytest.mark.parametrize("p", P_TYPES)
def test_gradient_of_norm_is_finite_at_zero(p):
    zeros = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    g = jax.grad(lambda t: num.global_norm(t, p))(zeros)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    g = jax.grad(lambda t: jnp.sum(num.leaf_norms(t, p)))(zeros)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


def test_gradient_of_norm_matches_analytic():
    x = jnp.asarray([3.0, -4.0])
    np.testing.assert_allclose(jax.grad(num.global_norm)(x), [0.6, -0.8], rtol=1e-6)
    # In the rescaled (overflow) regime too.
    big = jnp.asarray([3e30, -4e30])
    np.testing.assert_allclose(jax.grad(num.global_norm)(big), [0.6, -0.8], rtol=1e-6)


def test_norm_of_values():
    vals = jnp.asarray([3e30, 4e30, 0.0], jnp.float32)
    np.testing.assert_allclose(float(num.norm_of_values(vals, 2.0)), 5e30, rtol=1e-6)
    np.testing.assert_allclose(float(num.norm_of_values(vals, 1.0)), 7e30, rtol=1e-6)
    assert float(num.norm_of_values(vals, np.inf)) == pytest.approx(4e30)
    assert float(num.norm_of_values(jnp.zeros((0,)), 2.0)) == 0.0


# --------------------------------------------------------------------------
# The rescaled pass: two fixed factors (2**-K, 2**K) instead of one per leaf.
# --------------------------------------------------------------------------

# Values whose squares leave the float32 range both ways, the extremes of the
# range, and shapes that take every path (a scalar, stacked and single leaves).
EXTREMES = [3e38, 1e30, 2e19, 3e-20, 1e-25, 2e-38]


def _extreme_tree(dtype=jnp.float32):
    rng = np.random.default_rng(7)
    tree = {}
    for i, big in enumerate(EXTREMES):  # the scalar stays a normal float
        tree[f"s{i}"] = jnp.asarray(big * rng.uniform(0.6, 1), dtype)
        tree[f"v{i}"] = jnp.asarray(big * rng.uniform(-1, 1, size=(3,)), dtype)
        tree[f"w{i}"] = jnp.asarray(big * rng.uniform(-1, 1, size=(5000,)), dtype)
    tree["zero"] = jnp.zeros((4,), dtype)
    tree["one"] = jnp.ones((4,), dtype)
    return tree


def _finite64(x):
    return reference.flush_subnormals(x)


@pytest.mark.parametrize("tuned", [True, False])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_rescaled_leaf_norms_at_the_float_range_ends(p, tuned):
    tree = _extreme_tree()
    with _xla_cpu.forced(tuned):
        got = np.asarray(jax.jit(lambda t: num.leaf_norms(t, p))(tree))
    want = [reference.norm([_finite64(x)], p) for x in jax.tree.leaves(tree)]
    finite = np.asarray(want) <= float(np.finfo(np.float32).max)
    np.testing.assert_allclose(got[finite], np.asarray(want)[finite], rtol=1e-5)
    assert np.all(got[~finite] == np.inf)  # the norm itself is beyond float32


def test_rescaled_leaf_norms_float64_and_complex():
    with jax.enable_x64(True):
        tree = {
            "f64_big": jnp.asarray([1e200, -3e199, 1.0], jnp.float64),
            "f64_small": jnp.asarray([1e-200, 2e-200], jnp.float64),
            "f32_big": jnp.asarray([3e38, 3e38], jnp.float32),  # norm > f32 max
            "c64": jnp.asarray([3e30 + 4e30j, 1e-30j], jnp.complex64),
            "c64_small": jnp.asarray([3e-25 - 4e-25j], jnp.complex64),
        }
        for p in (1.0, 2.0):
            got = jax.jit(lambda t, p=p: num.leaf_norms(t, p))(tree)
            assert got.dtype == jnp.float64
            want = [reference.norm([x], p) for x in jax.tree.leaves(tree)]
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_rescaled_pass_with_both_overflow_and_underflow_gradients():
    # One leaf overflows, another underflows, in the same step: d||x||/dx = x/||x||
    # in each (no NaN from the factor the leaf does not use).
    tree = {
        "big": jnp.asarray([3e30, -4e30, 1e29]),
        "small": jnp.asarray([[3e-25, 4e-25], [0.0, 1e-25]]),
        "plain": jnp.asarray([1.0, 2.0]),
    }
    weights = jnp.asarray([1.0, 2.0, 3.0])
    for tuned in (True, False):
        with _xla_cpu.forced(tuned):
            g = jax.jit(jax.grad(lambda t: jnp.dot(num.leaf_norms(t), weights)))(tree)
            gu = jax.jit(jax.grad(lambda x: jnp.sum(num.unit_norms([x], [(0,)])[0])))(
                tree["small"]
            )
        for w, k in zip([1.0, 2.0, 3.0], sorted(tree), strict=True):
            x = np.asarray(tree[k], np.float64)
            np.testing.assert_allclose(g[k], w * x / reference.norm([x]), rtol=1e-5)
        x = np.asarray(tree["small"], np.float64)
        np.testing.assert_allclose(gu, x / np.linalg.norm(x, axis=0), rtol=1e-5)


@pytest.mark.parametrize("tuned", [True, False])
def test_rescaled_unit_norms(tuned):
    # Same-shape arrays share one reduction in the rescaled pass; units of one
    # array overflow, underflow or neither; units over () are elementwise.
    rng = np.random.default_rng(8)
    scales = np.asarray([3e38, 1e25, 1.0, 1e-25, 2e-38, 0.0])
    arrays = [
        jnp.asarray(rng.uniform(-1, 1, size=(7, 6)) * scales, jnp.float32)
        for _ in range(3)
    ]
    arrays.append(jnp.asarray(rng.uniform(-1, 1, size=(5, 6)) * scales, jnp.bfloat16))
    arrays.append(jnp.asarray(scales[:5], jnp.float32))
    axes = [(0,), (0,), (0, 1), (0,), ()]
    with _xla_cpu.forced(tuned):
        got = jax.jit(lambda xs: num.unit_norms(xs, axes))(arrays)
    for x, ax, g in zip(arrays, axes, got, strict=True):
        a = np.abs(np.asarray(_finite64(x), np.float64))
        m = np.max(a, axis=ax, keepdims=True) if ax else a
        safe = np.where(m > 0, m, 1.0)
        want = m * np.sqrt(np.sum((a / safe) ** 2, axis=ax, keepdims=True))
        finite = want <= float(np.finfo(np.float32).max)
        assert g.shape == want.shape and g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g)[finite], want[finite], rtol=1e-5)
        assert np.all(np.asarray(g)[~finite] == np.inf)
