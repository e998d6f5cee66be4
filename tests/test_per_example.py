"""Per-example clipping: against optax and a NumPy float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc

# Jitted once: the threshold is traced, so every call with the same tree
# shapes shares one compilation (eager calls run op by op, slowly).
GLOBAL = jax.jit(oc.per_example_global_norm_clip, static_argnames="nonfinite")
OPTAX_GLOBAL = jax.jit(optax.per_example_global_norm_clip)
OPTAX_LAYER = jax.jit(optax.per_example_layer_norm_clip, static_argnames="uniform")
LAYER = jax.jit(
    oc.per_example_layer_norm_clip, static_argnames=("uniform", "nonfinite")
)


def batch(seed=0, n=5, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    scales = jnp.asarray([0.1, 1.0, 3.0, 0.0, 10.0][:n])  # one all-zero example
    return {
        "w": (scales[:, None, None] * jax.random.normal(k1, (n, 4, 3))).astype(dtype),
        "b": (scales[:, None] * jax.random.normal(k2, (n, 3))).astype(dtype),
        "s": (scales * jax.random.normal(k3, (n,))).astype(dtype),
    }


def ref_clip_sum(grads, thresholds, drop=()):
    """float64: each example's part of each leaf scaled by its factor, summed.

    ``thresholds``: one per leaf (leaf order) for the layer-wise clip, or a
    scalar for the global one.
    """
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    n = leaves[0].shape[0]
    per_leaf = np.stack([np.sqrt((x.reshape(n, -1) ** 2).sum(1)) for x in leaves])
    if np.ndim(thresholds) == 0:
        norms = np.broadcast_to(np.sqrt((per_leaf**2).sum(0)), per_leaf.shape)
        c = np.full(len(leaves), float(thresholds))
    else:
        norms, c = per_leaf, np.asarray(thresholds, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(norms > c[:, None], c[:, None] / norms, 1.0)
    keep = np.ones(n)
    keep[list(drop)] = 0.0
    shape = lambda x: (n,) + (1,) * (x.ndim - 1)  # noqa: E731
    with np.errstate(invalid="ignore"):  # Inf * 0 in a dropped example
        sums = [
            np.where(keep.reshape(shape(x)) > 0, x * f[i].reshape(shape(x)), 0.0).sum(0)
            for i, x in enumerate(leaves)
        ]
    counts = ((norms > c[:, None]) & (keep > 0)).sum(1)
    return sums, counts


def assert_sums(got, want, rtol=1e-6):
    for g, w in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("c", [0.0, 2.0, 1e30, np.inf])
def test_global_matches_optax_and_reference(c):
    g = batch()
    got, n = GLOBAL(g, c)
    want, counts = ref_clip_sum(g, c)
    assert_sums(got, want)
    assert int(n) == counts[0]
    theirs, n_theirs = OPTAX_GLOBAL(g, c)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, 1e-6, 1e-6), got, theirs)
    assert int(n) == int(n_theirs)


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("c", [0.0, 1.0, np.inf])
def test_layer_matches_optax_and_reference(uniform, c):
    g = batch(seed=1)
    got, n = LAYER(g, c, uniform)
    sizes = np.asarray([x[0].size for x in jax.tree.leaves(g)], np.float64)
    share = np.full(3, 1 / 3) if uniform else sizes / sizes.sum()
    want, counts = ref_clip_sum(g, c * np.sqrt(share))
    assert_sums(got, want)
    np.testing.assert_array_equal(jax.tree.leaves(n), counts)
    theirs, n_theirs = OPTAX_LAYER(g, c, uniform)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, 1e-6, 1e-6), got, theirs)
    jax.tree.map(np.testing.assert_array_equal, n, n_theirs)


def test_overflowing_example_is_clipped_not_dropped():
    # Example 0's squares overflow float32: optax's norm is inf and it drops
    # the example (multiplier 0); here it is clipped to norm c like the rest.
    g = batch()
    g["w"] = g["w"].at[0, 0, 0].set(1e20).at[0, 1, 1].set(-3e30)
    got, n = GLOBAL(g, 1.0)
    want, counts = ref_clip_sum(g, 1.0)
    assert_sums(got, want)
    assert int(n) == counts[0] == 4
    theirs, _ = OPTAX_GLOBAL(g, 1.0)
    without_0, _ = ref_clip_sum(g, 1.0, drop=(0,))
    assert_sums(theirs, without_0)  # what optax gets: example 0 left out
    # The same in one leaf of the layer-wise clip.
    got, _ = LAYER(g, 1.0)
    assert_sums(got, ref_clip_sum(g, np.full(3, 3**-0.5))[0])


def test_bf16_leaves_are_accumulated_in_float32():
    g = batch(dtype=jnp.bfloat16)
    got, _ = GLOBAL(g, 1.0)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    assert_sums(got, ref_clip_sum(g, 1.0)[0], rtol=1e-2)


def test_zero_never_nan_and_gradient_is_finite():
    zeros = jax.tree.map(jnp.zeros_like, batch())
    for fn in (GLOBAL, LAYER):
        for c in (0.0, 1.0):
            out, n = fn(zeros, c)
            assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
    grad = jax.jit(
        jax.grad(
            lambda g, c: sum(
                jnp.sum(x) for x in jax.tree.leaves(GLOBAL(g, c)[0] | LAYER(g, c)[0])
            )
        )
    )
    for g, c in ((zeros, 0.0), (zeros, 1.0), (batch(), 0.0), (batch(), 1.0)):
        d = grad(g, c)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(d))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_example_policies(bad):
    g = batch()
    g["b"] = g["b"].at[2, 1].set(bad)
    out, _ = GLOBAL(g, 1.0)
    assert not bool(jnp.all(jnp.isfinite(out["b"])))  # propagate: never hidden
    out, n = GLOBAL(g, 1.0, nonfinite="zero_update")
    want, counts = ref_clip_sum(g, 1.0, drop=(2,))
    assert_sums(out, want)
    assert int(n) == counts[0]
    out, n = LAYER(g, 1.0, nonfinite="zero_update")
    want, _ = ref_clip_sum(g, np.full(3, 3**-0.5))
    want[0] = ref_clip_sum({"b": g["b"]}, [3**-0.5], drop=(2,))[0][0]
    assert_sums(out, want)  # only example 2's part of leaf b is left out
    assert int(n["b"]) == ref_clip_sum({"b": g["b"]}, [3**-0.5], drop=(2,))[1][0]
    with pytest.raises(Exception, match=r"per_example_global_norm_clip.*\['b'\]"):
        f = jax.jit(
            lambda g: oc.per_example_global_norm_clip(g, 1.0, nonfinite="raise")
        )
        jax.block_until_ready(f(g))


def test_bad_input_is_rejected():
    g = batch()
    for fn in (oc.per_example_global_norm_clip, oc.per_example_layer_norm_clip):
        with pytest.raises(ValueError, match=">= 0"):
            fn(g, -1.0)
        with pytest.raises(ValueError, match="NaN"):
            fn(g, float("nan"))
        with pytest.raises(ValueError, match="leading batch axis"):
            fn({"a": jnp.ones((5, 2)), "b": jnp.ones((4, 2))}, 1.0)
        with pytest.raises(TypeError, match="floating-point"):
            fn({"a": jnp.ones((5, 2), jnp.int32)}, 1.0)
    # A traced threshold: no recompilation, and a negative one gives NaN.
    GLOBAL(g, 1.0)
    compiled = GLOBAL._cache_size()
    out, _ = GLOBAL(g, -1.0)
    assert GLOBAL._cache_size() == compiled
    assert bool(jnp.all(jnp.isnan(out["w"])))
