"""The fused reductions (``_reduce``) against NumPy, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_clip import _reduce, _xla_cpu

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _values(dtype, seed=0, shape=(37, 11)):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape) * 3.0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("axis", [None, 0, 1, (0, 1)])
def test_sum_and_max_matches_numpy(dtype, p, axis):
    x = _values(dtype)
    s, m = jax.jit(lambda x: _reduce.sum_and_max(x, p, axis))(x)
    a = np.abs(np.asarray(x, np.float64))
    np.testing.assert_allclose(s, np.sum(a**p, axis=axis), rtol=1e-5)
    np.testing.assert_array_equal(m, np.max(a, axis=axis).astype(np.float32))
    assert s.dtype == m.dtype == jnp.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_sum_and_max_keep_nan_and_inf(bad):
    x = jnp.zeros(20_000).at[12_345].set(bad)  # XLA:CPU's float max drops NaN
    s, m = jax.jit(lambda x: _reduce.sum_and_max(x, 2.0))(x)
    assert (np.isnan(m) and np.isnan(s)) if np.isnan(bad) else (m == s == np.inf)
    assert float(_reduce.max_nonneg(jnp.abs(x))) != 0.0


def test_sum_and_max_complex_and_gradient():
    x = jnp.asarray([3 + 4j, 1j, -2.0], jnp.complex64)
    s, m = _reduce.sum_and_max(x, 2.0)
    np.testing.assert_allclose([s, m], [30.0, 5.0], rtol=1e-6)
    v = jnp.asarray([3.0, -4.0, 1.0])
    ds = jax.grad(lambda v: _reduce.sum_and_max(v, 2.0)[0])(v)
    dm = jax.grad(lambda v: _reduce.sum_and_max(v, 2.0)[1])(v)
    np.testing.assert_allclose(ds, 2 * np.asarray(v))
    np.testing.assert_allclose(dm, [0.0, -1.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extremes_match_numpy(dtype):
    x = _values(dtype, 1)
    for a in (x, -jnp.abs(x), jnp.abs(x), jnp.asarray([-0.0, 0.0], dtype)):
        top, bottom, mag = jax.jit(_reduce.extremes)(a)
        v = np.asarray(a, np.float64)
        assert (float(top), float(bottom)) == (v.max(), v.min())
        assert float(mag) == np.abs(v).max()
    for bad in (np.nan, np.inf, -np.inf):
        top, bottom, mag = _reduce.extremes(x.at[3, 4].set(bad))
        assert np.isnan(mag) if np.isnan(bad) else mag == np.inf
        if bad == np.inf:
            assert top == np.inf
        if bad == -np.inf:
            assert bottom == -np.inf
    g = jax.grad(lambda a: _reduce.extremes(a)[0] - _reduce.extremes(a)[1])(
        jnp.asarray([1.0, -2.0, 0.5])
    )
    np.testing.assert_array_equal(g, [1.0, -1.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("local", [True, False])
def test_fixed_scaled_sums_match_numpy(dtype, local):
    # hi (times 2**-K) of values whose squares overflow float32, lo (times
    # 2**K) of values whose squares underflow it.
    k = _reduce.fixed_exponent(dtype)
    assert k == 84 and _reduce.fixed_exponent(jnp.float16) == 84
    for shift, pick in ((70, 0), (-70, 1)):
        xs = [(_values(dtype, i, (9, 5)) * 2.0**shift).astype(dtype) for i in range(3)]
        for p in (1.0, 2.0):
            for axis in (None, 1):
                got = jax.jit(
                    lambda xs, p=p, axis=axis: _reduce.fixed_scaled_sums(
                        xs, p, axis, local
                    )
                )(xs)[pick]
                a = [np.abs(np.asarray(x, np.float64)) for x in xs]
                want = np.stack([np.sum(v**p, axis=axis) for v in a])
                assert got.shape == want.shape and got.dtype == jnp.float32
                f = 2.0 ** (-k if pick == 0 else k)
                np.testing.assert_allclose(got, want * f**p, rtol=1e-5)


def test_scaled_sum_of_all_matches_numpy():
    xs = [_values(jnp.float32, i, (9, 5)) for i in range(3)]
    f1, f2 = jnp.float32(0.5), jnp.float32(0.25)
    for local in (True, False):
        got = jax.jit(
            lambda xs, local=local: _reduce.scaled_sum_of_all(xs, 2.0, f1, f2, local)
        )(xs)
        want = sum(np.sum((np.asarray(x, np.float64) / 8) ** 2) for x in xs)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_fusion_barrier_is_the_identity():
    x = {"a": jnp.float32(2.0), "b": jnp.arange(3), "c": jnp.bool_(True)}
    out = _reduce.fusion_barrier(x)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(out), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    f = jax.jit(jax.grad(lambda v: _reduce.fusion_barrier(v * v) * 3.0))
    assert float(f(2.0)) == 12.0
    np.testing.assert_array_equal(
        jax.vmap(_reduce.fusion_barrier)(jnp.arange(4.0)), np.arange(4.0)
    )


@pytest.mark.parametrize("tuned", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_large_arrays_split_into_rows(tuned, dtype):
    # At SPLIT_MIN values and more, XLA:CPU reduces k rows on k threads; the
    # results are those of one reduction, NaN and Inf included.
    n = _xla_cpu.SPLIT_MIN * 2
    x = jnp.asarray(np.random.default_rng(3).normal(size=n), dtype)
    with _xla_cpu.forced(tuned):
        assert (_xla_cpu.split_rows(x) is not None) == tuned
        assert _xla_cpu.split_rows(x[: n - 1]) is None  # odd: not split
        fns = jax.jit(lambda x: (_reduce.sum_and_max(x, 2.0), _reduce.extremes(x)))
        (s, m), (top, bottom, mag) = fns(x)
        v = np.asarray(x, np.float64)
        np.testing.assert_allclose(s, np.sum(v * v), rtol=1e-5)
        assert float(m) == float(mag) == np.abs(v).max()
        assert (float(top), float(bottom)) == (v.max(), v.min())
        for bad in (np.nan, np.inf):
            (s, m), (_, _, mag) = fns(x.at[n - 7].set(bad))
            assert (np.isnan(m) and np.isnan(mag)) if np.isnan(bad) else m == np.inf
        grad = jax.grad(lambda x: _reduce.sum_and_max(x, 2.0)[0])(x.astype(jnp.float32))
        np.testing.assert_allclose(grad, 2 * np.asarray(x, np.float32), rtol=1e-6)


def test_column_reductions_are_two_reductions_with_the_same_values():
    # Over columns (the last axis kept: adaptive_grad_clip's units), the sum
    # and the max are two one-output reductions (XLA:CPU runs a two-output
    # one over columns about 3x slower); NaN, Inf and gradients as before.
    x = jnp.asarray(np.random.default_rng(4).normal(size=(96, 40)), jnp.float32)
    fn = jax.jit(lambda x: _reduce.sum_and_max(x, 2.0, 0))
    hlo = fn.lower(x).compile().as_text()
    assert "(f32[40]{0}, s32[40]{0}) reduce(" not in hlo
    s, m = fn(x)
    v = np.asarray(x, np.float64)
    np.testing.assert_allclose(s, np.sum(v * v, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(m, np.abs(v).max(axis=0).astype(np.float32))
    s, m = fn(x.at[5, 3].set(jnp.nan).at[7, 4].set(-jnp.inf))
    assert np.isnan(s[3]) and np.isnan(m[3]) and s[4] == m[4] == np.inf
    grad = jax.grad(lambda x: jnp.sum(_reduce.sum_and_max(x, 2.0, 0)[0]))(x)
    np.testing.assert_allclose(grad, 2 * np.asarray(x), rtol=1e-6)
