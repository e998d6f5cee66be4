"""The public unit-wise helpers: against optax and a NumPy float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc

# (shape, axes one unit spans by default)
SHAPES = [((), ()), ((5,), (0,)), ((1, 4), (0, 1)), ((3, 4), (0,)), ((2, 3, 4), (0,))]
SHAPES += [((2, 2, 3, 4), (0, 1, 2)), ((2, 2, 2, 3, 4), (0, 1, 2, 3))]


def ref_norm(x, axes):
    x = np.asarray(x, np.float64)
    return np.broadcast_to(np.sqrt((x * x).sum(axis=axes, keepdims=True)), x.shape)


def norms_of(xs, **kw):
    """unitwise_norm of every array, in one compiled program (eager is slow)."""
    return jax.jit(lambda xs: [oc.unitwise_norm(x, **kw) for x in xs])(xs)


def test_unitwise_norm_matches_optax_and_reference():
    xs = [jax.random.normal(jax.random.key(i), s) for i, (s, _) in enumerate(SHAPES)]

    @jax.jit
    def ours(xs):  # one compiled program (eager calls are slow)
        full = [oc.unitwise_norm(x) for x in xs]
        return full, oc.unitwise_norm(xs[5], axis=(2, 1, 0))  # HWIO, named

    full, named = ours(xs)
    compact = [
        jax.eval_shape(lambda x: oc.unitwise_norm(x, keepdims=True), x) for x in xs
    ]
    theirs = jax.jit(lambda xs: [optax.transforms.unitwise_norm(x) for x in xs])(xs)
    for x, (shape, axes), o, c, t in zip(
        xs, SHAPES, full, compact, theirs, strict=True
    ):
        np.testing.assert_allclose(o, ref_norm(x, axes), rtol=1e-6)
        np.testing.assert_allclose(o, t, rtol=1e-6)
        assert c.shape == tuple(1 if d in axes else n for d, n in enumerate(shape))
    np.testing.assert_allclose(named, full[5], rtol=1e-6)


def test_unitwise_norm_overflow_bf16_and_errors():
    w = jnp.array([[3.0, 1e20], [4.0, 0.0]])
    b = (jnp.arange(1.0, 301.0) / 7).astype(jnp.bfloat16)
    ours, got = norms_of([w, b])
    np.testing.assert_allclose(ours[0], [5.0, 1e20], rtol=1e-6)
    assert np.isinf(optax.transforms.unitwise_norm(w)[0, 1])  # what it avoids
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got[0], ref_norm(b, (0,))[0], rtol=1e-6)
    with pytest.raises(ValueError, match="unitwise_norm: axis"):
        oc.unitwise_norm(w, axis=2)
    with pytest.raises(ValueError, match="no default unit"):
        oc.unitwise_norm(jnp.ones((2, 2, 2, 2, 2, 2)))
    with pytest.raises(TypeError, match="floating-point"):
        oc.unitwise_norm(jnp.ones(3, jnp.int32))


def test_unitwise_clip_matches_optax_and_reference():
    g = jax.random.normal(jax.random.key(0), (8, 6)) * jnp.arange(6.0)  # unit 0: 0
    n = oc.unitwise_norm(g)
    for limit in (jnp.zeros(6), jnp.ones(6), jnp.linspace(0.5, 10.0, 6)):
        ours = jax.jit(oc.unitwise_clip)(n, limit, g)
        lim = np.broadcast_to(np.asarray(limit, np.float64), (6,))
        norms = ref_norm(g, (0,))[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(norms > lim, lim / norms, 1.0)
        np.testing.assert_allclose(ours, np.asarray(g, np.float64) * f, 1e-6, 1e-7)
        limits = jnp.broadcast_to(limit, g.shape)
        theirs = jax.jit(optax.transforms.unitwise_clip)(n, limits, g)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    # The compact norms work too, and below the limit the unit is exact.
    compact = norms_of([g], keepdims=True)[0]
    np.testing.assert_array_equal(jax.jit(oc.unitwise_clip)(compact, 1e3, g), g)


def test_unitwise_clip_overflow_zero_and_errors():
    g = jnp.array([[1e30, 1.0], [1e30, 0.0]])
    clip = jax.jit(lambda g: oc.unitwise_clip(oc.unitwise_norm(g), 1e-10, g))
    out = clip(g)
    np.testing.assert_allclose(out[:, 0], [2**-0.5 * 1e-10] * 2, rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], [1e-10, 0.0], rtol=1e-6)

    # bf16 units are scaled in float32 and rounded toward zero: within the limit.
    b = (jnp.arange(1.0, 9.0).reshape(4, 2) / 3).astype(jnp.bfloat16)
    out = jax.jit(lambda g: oc.unitwise_clip(oc.unitwise_norm(g), 0.3, g))(b)
    assert out.dtype == jnp.bfloat16
    got = np.sqrt((np.asarray(out, np.float64) ** 2).sum(axis=0))
    assert np.all(got <= 0.3) and np.all(got > 0.29)

    def loss(g):
        return jnp.sum(oc.unitwise_clip(oc.unitwise_norm(g), 0.0, g))

    d = jax.jit(jax.grad(loss))(jnp.zeros((3, 2)))
    assert bool(jnp.all(jnp.isfinite(d)))
    with pytest.raises(ValueError, match=">= 0"):
        oc.unitwise_clip(jnp.ones((1, 2)), -1.0, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="does not broadcast"):
        oc.unitwise_clip(jnp.ones((3, 1, 2)), 1.0, jnp.ones((3, 2)))
