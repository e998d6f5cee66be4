"""Adaptive gradient clipping (AGC) against NumPy float64 and optax."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc


def ref_agc(g, p, clipping, eps, axis=None):
    """NFNets' unit-wise clip in float64, with its default unit convention."""
    g = np.asarray(g, np.float64)
    p = np.asarray(p, np.float64)
    if axis is not None:
        axes = axis
    elif np.squeeze(g).ndim <= 1:
        axes = tuple(range(g.ndim))
    elif g.ndim in (2, 3):
        axes = (0,)
    else:
        axes = tuple(range(g.ndim - 1))
    gn = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
    pn = np.sqrt(np.sum(p * p, axis=axes, keepdims=True))
    limit = clipping * np.maximum(pn, eps)
    return g * np.where(gn > limit, limit / np.where(gn > 0, gn, 1.0), 1.0)


def agc_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    shapes = {
        "dense": (6, 4),
        "bias": (4,),
        "row": (1, 5),
        "scalar": (),
        "heads": (3, 2, 4),
        "conv": (3, 3, 2, 4),
        "conv3d": (2, 2, 2, 2, 3),
    }
    return {
        k: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
        for k, shape in shapes.items()
    }


def test_agc_matches_reference_and_optax():
    grads = agc_tree(0, scale=1.0)
    params = agc_tree(1, scale=0.3)
    params["bias"] = jnp.zeros(4)  # zero-initialised: eps applies
    tx = oc.adaptive_grad_clip(0.5)
    out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    for k in grads:
        want = ref_agc(grads[k], params[k], 0.5, 1e-3)
        np.testing.assert_allclose(np.asarray(out[k]), want, rtol=1e-5, atol=1e-7)
    theirs, _ = jax.jit(optax.adaptive_grad_clip(0.5).update)(
        grads, optax.EmptyState(), params
    )
    chex.assert_trees_all_close(out, theirs, rtol=1e-5, atol=1e-7)
    units_clipped = sum(
        int(np.sum(np.any(np.asarray(out[k]) != np.asarray(grads[k]), axis=0)))
        for k in ("dense",)
    )
    assert units_clipped > 0
    stats = oc.get_stats(state)
    assert int(stats["adaptive_grad_clip/clipped_units"]) >= units_clipped
    assert int(stats["adaptive_grad_clip/is_clipped"]) == 1
    np.testing.assert_allclose(
        float(stats["adaptive_grad_clip/post_clip_norm"]),
        math.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in out.values())),
        rtol=1e-5,
    )


def test_agc_huge_and_low_precision_values():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    grads = {"w": jnp.ones((4, 3)).at[0, 0].set(1e20), "b": jnp.ones(3)}
    tx = oc.adaptive_grad_clip(0.1)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # The huge unit is scaled to its limit 0.1 * 2 along its own direction;
    # optax's norm overflows and the unit becomes zero.
    np.testing.assert_allclose(np.asarray(out["w"][:, 0]), [0.2, 0, 0, 0], atol=1e-6)
    theirs, _ = jax.jit(optax.adaptive_grad_clip(0.1).update)(grads, None, params)
    np.testing.assert_array_equal(np.asarray(theirs["w"][:, 0]), 0.0)
    # bf16: the unit norm is accumulated in float32.
    g16 = jnp.full((4096, 2), 0.01, jnp.bfloat16)
    p16 = jnp.ones((4096, 2), jnp.bfloat16)
    tx = oc.adaptive_grad_clip(0.001)
    out16, _ = jax.jit(tx.update)({"w": g16}, tx.init({"w": p16}), {"w": p16})
    limit = 0.001 * math.sqrt(4096)
    got = float(jnp.linalg.norm(out16["w"][:, 0].astype(jnp.float32)))
    assert limit * 0.99 <= got <= limit
    # The per-unit select works on bf16 bit patterns: an unclipped unit
    # (column 1, a subnormal-free small gradient) comes back bit for bit, and
    # zero_update gives exact zeros when one unit is NaN.
    g16 = g16.at[:, 1].set(jnp.bfloat16(1e-5))
    out16, _ = jax.jit(tx.update)({"w": g16}, tx.init({"w": p16}), {"w": p16})
    assert np.asarray(out16["w"][:, 1]).tobytes() == np.asarray(g16[:, 1]).tobytes()
    tx0 = oc.adaptive_grad_clip(0.001, nonfinite="zero_update")
    bad = {"w": g16.at[5, 0].set(jnp.nan)}
    out0, _ = jax.jit(tx0.update)(bad, tx0.init({"w": p16}), {"w": p16})
    assert out0["w"].dtype == jnp.bfloat16
    assert not np.any(np.asarray(out0["w"], np.float32))


def test_agc_errors_and_axis():
    tx = oc.adaptive_grad_clip(0.01)
    g = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(g, tx.init(g))
    with pytest.raises(ValueError, match="tree structure"):
        tx.update(g, tx.init(g), {"v": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="shape"):
        tx.update(g, tx.init(g), {"w": jnp.ones((3, 2))})
    six = {"k": jnp.ones((1, 2, 1, 2, 1, 2))}
    with pytest.raises(ValueError, match="axis="):
        tx.update(six, tx.init(six), six)
    tx = oc.adaptive_grad_clip(0.5, axis=(0, 1, 2, 3, 4))
    out, _ = jax.jit(tx.update)(six, tx.init(six), six)
    chex.assert_trees_all_close(out, jax.tree.map(lambda x: 0.5 * x, six))
    with pytest.raises(TypeError, match="axis"):
        oc.adaptive_grad_clip(0.1, axis=1.5)


@pytest.mark.parametrize(
    "shape, axis",
    [((2, 3, 4), (1, 2, 3)), ((3,), 1), ((3,), -2), ((2, 3), (0, -2)), ((), 0)],
)
def test_agc_axis_out_of_bounds_or_repeated_raises(shape, axis):
    # optax raises too; wrapping the axis (a % ndim) clipped the wrong units.
    g = {"k": jnp.ones(shape)}
    tx = oc.adaptive_grad_clip(0.1, axis=axis)
    with pytest.raises(ValueError, match="out of bounds|repeated"):
        tx.update(g, tx.init(g), g)
    with pytest.raises(ValueError):
        optax.adaptive_grad_clip(0.1, axis=axis).update(g, None, g)


def test_agc_negative_axis_counts_from_the_end():
    g = {"k": jnp.arange(1.0, 7.0).reshape(2, 3)}
    p = {"k": jnp.ones((2, 3))}
    for axis in (-1, 1):
        tx = oc.adaptive_grad_clip(0.5, axis=axis)
        out, _ = jax.jit(tx.update)(g, tx.init(p), p)
        want = ref_agc(np.asarray(g["k"]), np.ones((2, 3)), 0.5, 1e-3, axis=(1,))
        np.testing.assert_allclose(out["k"], want, rtol=1e-6)


@pytest.mark.parametrize("policy", ["propagate", "zero_update"])
def test_agc_nonfinite_parameter_is_a_nonfinite_unit(policy):
    # Documented: the unit of a NaN/Inf parameter is treated like a unit whose
    # gradient holds a NaN/Inf (the model is corrupt; the step is flagged).
    g = {"w": jnp.ones((2, 3))}
    p = {"w": jnp.ones((2, 3)).at[0, 1].set(jnp.inf)}
    tx = oc.adaptive_grad_clip(0.1, nonfinite=policy)
    out, state = jax.jit(tx.update)(g, tx.init(p), p)
    assert int(state.clip_stats.is_nonfinite) == 1
    if policy == "propagate":
        assert np.all(np.isnan(out["w"][:, 1]))
        np.testing.assert_allclose(out["w"][:, [0, 2]], 0.1, rtol=1e-6)
    else:
        np.testing.assert_array_equal(out["w"], 0.0)
    # clipping=inf never clips (and is not mistaken for a corrupt parameter).
    tx = oc.adaptive_grad_clip(math.inf, eps=0.0)
    zero_p = {"w": jnp.zeros((2, 3)).at[:, 0].set(1.0)}
    out, state = jax.jit(tx.update)(g, tx.init(zero_p), zero_p)
    np.testing.assert_array_equal(out["w"][:, 0], 1.0)
    np.testing.assert_array_equal(out["w"][:, 1:], 0.0)  # lambda * 0 = 0
    assert int(state.clip_stats.is_nonfinite) == 0
