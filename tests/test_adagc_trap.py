"""AdaGC's warm-up trap and ``warmup_max_drop``, against a NumPy float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc

WARMUP, STEPS = 10, 80


def ref_adagc(norms, warmup, max_drop=None, max_norm=1.0, ratio=1.04, beta=0.99):
    """The authors' per-step rule; with ``max_drop`` a reference falls by at
    most that factor in one warm-up step. Returns scales and references."""
    gamma, scales, gammas = None, [], []
    for step, n in enumerate(np.asarray(norms, np.float64), start=1):
        if step <= warmup:
            h = min(1.0, max_norm / np.sqrt(np.sum(n**2)))
            c = n * h
            if gamma is None:
                gamma = c
            else:
                low = c if max_drop is None else np.maximum(c, gamma / max_drop)
                gamma = np.minimum(gamma, low)
            scales.append(np.full_like(n, h))
        else:
            limit = ratio * gamma
            scales.append(np.where(n > limit, limit / n, 1.0))
            gamma = beta * gamma + (1 - beta) * np.minimum(n, limit)
        gammas.append(gamma)
    return np.array(scales), np.array(gammas)


def norms_with_glitch():
    """Three tensors with noisy norms below the global cap; tensor 0 times 1000
    at warm-up step 5."""
    rng = np.random.default_rng(0)
    norms = np.array([0.05, 0.2, 0.1]) * np.exp(0.1 * rng.standard_normal((STEPS, 3)))
    norms[4, 0] *= 1000.0
    return norms.astype(np.float32)


@pytest.mark.parametrize("max_drop", [None, 1.04])
def test_warmup_trap_and_remedy_match_reference(max_drop):
    norms = norms_with_glitch()
    directions = [np.ones(4) / 2.0, np.array([0.6, 0.8]), np.ones(())]
    grads = {  # leaves a, b, c with the norms of columns 0, 1, 2
        k: jnp.asarray(norms[:, i].reshape((-1,) + (1,) * d.ndim) * d, jnp.float32)
        for i, (k, d) in enumerate(zip("abc", directions, strict=True))
    }
    tx = oc.adagc(warmup_steps=WARMUP, warmup_max_drop=max_drop)

    def step(state, g):
        out, state = tx.update(g, state)
        scale = jnp.stack(
            [jnp.vdot(out[k], g[k]) / jnp.vdot(g[k], g[k]) for k in "abc"]
        )
        return state, (scale, state.tensor_norm_ema, state.clipped_tensors)

    state = tx.init(jax.tree.map(lambda x: x[0], grads))
    _, (scales, gammas, clipped) = jax.jit(lambda s, g: jax.lax.scan(step, s, g))(
        state, grads
    )
    want_scales, want_gammas = ref_adagc(norms, WARMUP, max_drop)
    np.testing.assert_allclose(gammas, want_gammas, rtol=1e-5)
    np.testing.assert_allclose(scales, want_scales, rtol=1e-5)
    want_clipped = (want_scales[WARMUP:] < 1).sum(axis=1)
    np.testing.assert_array_equal(clipped[WARMUP:], want_clipped)
    # Tensor-steps of b and c clipped after warm-up, with and without the glitch.
    clean = norms.copy()
    clean[4, 0] /= 1000.0
    trapped = int((want_scales[WARMUP:, 1:] < 1).sum())
    usual = int((ref_adagc(clean, WARMUP, max_drop)[0][WARMUP:, 1:] < 1).sum())
    if max_drop is None:
        # The trap: the glitch in tensor a divided b's and c's references by
        # about 50, and they are clipped on every step after warm-up (140 of
        # 140; 96 without the glitch).
        assert trapped == 2 * (STEPS - WARMUP) > usual + 40
    else:
        # A reference fell by 4 % at most: about as often as without (94, 87).
        assert trapped <= usual + 10


def test_warmup_max_drop_is_validated_and_traceable():
    for bad in (0.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match="warmup_max_drop"):
            oc.adagc(warmup_max_drop=bad)
    tx = oc.adagc(warmup_steps=2, warmup_max_drop=1.0)  # 1: a reference never falls
    state = tx.init({"a": jnp.zeros(2)})
    update = jax.jit(tx.update)
    _, state = update({"a": jnp.array([0.3, 0.4])}, state)
    _, state = update({"a": jnp.array([0.03, 0.04])}, state)
    np.testing.assert_allclose(state.tensor_norm_ema, [0.5], rtol=1e-6)
    # Traced by inject_hyperparams: the same rule, one compilation.
    tx = optax.inject_hyperparams(oc.adagc)(warmup_steps=2, warmup_max_drop=1.0)
    state = tx.init({"a": jnp.zeros(2)})
    update = jax.jit(tx.update)
    _, state = update({"a": jnp.array([0.3, 0.4])}, state)
    state.hyperparams["warmup_max_drop"] = jnp.asarray(2.0, jnp.float32)
    _, state = update({"a": jnp.array([0.03, 0.04])}, state)
    assert update._cache_size() == 1
    np.testing.assert_allclose(state.inner_state.tensor_norm_ema, [0.25], rtol=1e-6)
