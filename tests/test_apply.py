"""The shared apply step (``_apply``): scales, rounding, division."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import optax_clip as oc
from optax_clip import _apply

TINY = float(np.finfo(np.float32).tiny)


@pytest.mark.parametrize(
    "num, den", [(1.0, 2.0), (1.0, 3e38), (1e-20, 3e38), (4 * TINY, 3.4e38), (0.0, 5.0)]
)
def test_make_scale_factors_are_normal_and_exact(num, den):
    s = jax.jit(_apply.make_scale)(jnp.float32(num), jnp.float32(den))
    exact = num / den
    hi, lo = float(s.hi), float(s.lo)
    assert hi == 0 or hi >= TINY
    assert lo == 0 or lo >= TINY
    # x * hi * lo for the largest element x = den: num, within rounding.
    np.testing.assert_allclose(
        np.float32(den) * np.float32(hi) * np.float32(lo), num, 1e-6
    )
    want_value = exact if exact >= TINY or exact == 0 else TINY
    np.testing.assert_allclose(float(s.value), want_value, rtol=1e-6)


def test_divide_by_scalar_beyond_the_reciprocal_range():
    v = jnp.asarray([3e38, 1e37, 0.0, 2.0])
    d = jnp.float32(3.3e38)
    got = jax.jit(_apply.divide_by_scalar)(v, d)
    want = np.asarray(v, np.float64) / 3.3e38
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=TINY)
    assert float(jax.jit(lambda v, d: v / d)(v, d)[0]) == 0.0  # what it avoids


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cast_toward_zero(dtype):
    # The value of ``dtype`` closest to y among those no larger in magnitude.
    y = jnp.asarray(np.random.default_rng(0).normal(size=5000) * 100, jnp.float32)
    r = _apply.cast_toward_zero(y, dtype)
    away = jnp.nextafter(r, jnp.where(y > 0, jnp.inf, -jnp.inf).astype(dtype))
    y64 = np.abs(np.asarray(y, np.float64))
    assert np.all(np.abs(np.asarray(r, np.float64)) <= y64)
    assert np.all(np.abs(np.asarray(away, np.float64)) > y64)


def test_bf16_clip_matches_reference():
    tree = {
        "a": [jnp.full((6, 5), 3.0, jnp.bfloat16)] * 4,
        "b": jnp.ones(9, jnp.bfloat16),
    }
    tx = oc.clip_by_global_norm(1.0)
    out, _ = jax.jit(tx.update)(tree, tx.init(tree))
    n = reference.norm(jax.tree.leaves(tree))
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        exact = np.asarray(x, np.float64) / n
        got = np.asarray(y, np.float64)
        assert np.all(got <= exact) and np.all(got >= exact * (1 - 2**-7))
