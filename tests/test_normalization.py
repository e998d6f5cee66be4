"""AdaGN against NumPy float64, and Stable-SPAM composed of parts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc


def adagn_reference(grads_seq, gamma1, gamma2, eps):
    """Stable-SPAM's AdaGN step by step, per leaf, in float64 (the paper's maths)."""
    n_leaves = len(grads_seq[0])
    m, v = np.zeros(n_leaves), np.zeros(n_leaves)
    outs = []
    for t, grads in enumerate(grads_seq, start=1):
        out = []
        for i, g in enumerate(grads):
            g = np.asarray(g, np.float64)
            n = np.linalg.norm(g)
            m[i] = gamma1 * m[i] + (1 - gamma1) * n
            v[i] = gamma2 * v[i] + (1 - gamma2) * n**2
            c = (m[i] / (1 - gamma1**t)) / (np.sqrt(v[i] / (1 - gamma2**t)) + eps)
            out.append(g / n * c if n > 0 else g)
        outs.append(out)
    return outs


def _grads(seed, steps):
    rng = np.random.default_rng(seed)
    seq = []
    for t in range(steps):
        spike = 50.0 if t == 4 else 1.0
        seq.append(
            [
                (spike * rng.normal(size=(4, 3))).astype(np.float32),
                np.zeros(5, np.float32),  # a frozen leaf
                (0.01 * rng.normal(size=7)).astype(np.float32),
            ]
        )
    return seq


@pytest.mark.parametrize("gammas", [(0.7, 0.9), (0.5, 0.99)])
def test_matches_numpy_float64(gammas):
    seq = _grads(0, 8)
    want = adagn_reference(seq, *gammas, 1e-8)
    tx = oc.adagn(*gammas)
    update = jax.jit(tx.update)
    state = tx.init([jnp.asarray(g) for g in seq[0]])
    for t, grads in enumerate(seq):
        out, state = update([jnp.asarray(g) for g in grads], state)
        for got, ref in zip(out, want[t], strict=True):
            np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-12)
    stats = oc.get_stats(state)
    assert int(stats["adagn/adagn_steps"]) == 8
    norms_out = [np.linalg.norm(np.asarray(x, np.float64)) for x in want[-1]]
    np.testing.assert_allclose(
        stats["adagn/post_clip_norm"], np.linalg.norm(norms_out), rtol=1e-6
    )


def test_a_spike_is_brought_back_below_one():
    seq = _grads(1, 6)
    tx = oc.adagn()
    state = tx.init([jnp.asarray(g) for g in seq[0]])
    for t, grads in enumerate(seq):
        out, state = tx.update([jnp.asarray(g) for g in grads], state)
        n = float(jnp.linalg.norm(out[0]))
        if t < 4:
            assert 0.8 < n < 1.2
        elif t == 4:  # the spike: m moves faster than sqrt(v)
            assert n < 0.8 and int(state.clip_stats.is_clipped) == 1
        else:  # v remembers the spike longer than m: still damped
            assert n < 0.8


def test_huge_values_keep_direction_and_norm():
    # Squares of 1e30 overflow float32: the norm, its EMAs and the scale do not.
    g = jnp.asarray([3e30, -4e30, 0.0], jnp.float32)
    tx = oc.adagn()
    state = tx.init(g)
    out, state = tx.update(g, state)
    np.testing.assert_allclose(out, [0.6, -0.8, 0.0], rtol=1e-6)
    np.testing.assert_allclose(state.adagn_norm_rms, np.sqrt(0.1) * 5e30, rtol=1e-6)
    tiny = jnp.asarray([3e-37, 4e-37], jnp.float32)  # scale 1/n near the float max
    out, _ = oc.adagn(eps=0.0).update(tiny, oc.adagn().init(tiny))
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=1e-6)
    # A norm near the float max: 1/n is subnormal (flushed to 0 if used as is).
    top = jnp.asarray([3e38, -1e38], jnp.float32)
    out, _ = oc.adagn().update(top, oc.adagn().init(top))
    np.testing.assert_allclose(out, [3 / 10**0.5, -1 / 10**0.5], rtol=1e-6)
    # eps = 0 and a norm whose EMAs flush to 0: left as it is, never NaN.
    edge = jnp.asarray([1.2e-38, 0.0], jnp.float32)
    out, _ = oc.adagn(eps=0.0).update(edge, oc.adagn().init(edge))
    np.testing.assert_array_equal(out, edge)


def test_nonfinite_step_leaves_the_emas():
    tx = oc.adagn(nonfinite="zero_update")
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    state = tx.init(g)
    _, state = tx.update(g, state)
    bad = {"a": jnp.array([jnp.nan, 4.0]), "b": jnp.array([1.0])}
    out, after = tx.update(bad, state)
    assert not np.any(np.asarray(out["a"])) and not np.any(np.asarray(out["b"]))
    np.testing.assert_array_equal(after.adagn_norm_ema, state.adagn_norm_ema)
    np.testing.assert_array_equal(after.adagn_norm_rms, state.adagn_norm_rms)
    assert int(after.adagn_steps) == 1 and int(after.clip_stats.num_nonfinite) == 1


def test_bad_hyperparameters_raise_and_traced_ones_work():
    for kwargs in (
        {"gamma1": 1.0},
        {"gamma1": -0.1},
        {"gamma2": float("nan")},
        {"eps": -1.0},
        {"eps": float("inf")},
    ):
        with pytest.raises(ValueError):
            oc.adagn(**kwargs)
    with pytest.raises(ValueError, match="nonfinite"):
        oc.adagn(nonfinite="skip")
    tx = optax.inject_hyperparams(oc.adagn)(gamma1=0.7, gamma2=0.9)
    g = jnp.array([3.0, 4.0])
    state = tx.init(g)
    update = jax.jit(tx.update)
    _, state = update(g, state)
    out_a, _ = update(10 * g, state)
    state.hyperparams["gamma1"] = jnp.asarray(
        0.0, jnp.float32
    )  # m_hat = n: c is larger
    out_b, _ = update(10 * g, state)
    assert update._cache_size() == 1
    assert float(jnp.linalg.norm(out_b)) > float(jnp.linalg.norm(out_a))
    state.hyperparams["gamma1"] = jnp.asarray(
        1.5, jnp.float32
    )  # out of range: NaN, never silent
    out_c, _ = update(g, state)
    assert np.all(np.isnan(np.asarray(out_c)))
    with pytest.raises(ValueError, match="different tree structure"):
        oc.adagn().update({"a": g, "b": g}, oc.adagn().init({"a": g}))


def stable_spam_reference(params, grads_seq, lr, betas, eps, theta, gamma1, gamma2):
    """Stable-SPAM's step (AdaClip, AdaGN, Adam) per tensor in float64.

    Transcribed from the paper's algorithm without weight decay, learning-rate
    warm-up or momentum reset (none of which fire in these few steps).
    """
    b1, b2 = betas
    p = [np.asarray(x, np.float64).copy() for x in params]
    k = len(p)
    m_max, m_norm, v_norm = np.zeros(k), np.zeros(k), np.zeros(k)
    mu = [np.zeros_like(x) for x in p]
    nu = [np.zeros_like(x) for x in p]
    history = []
    for t, grads in enumerate(grads_seq, start=1):
        for i, g in enumerate(grads):
            g = np.asarray(g, np.float64).copy()
            big = np.max(np.abs(g))
            m_max[i] = theta * m_max[i] + (1 - theta) * big
            m_max_hat = m_max[i] / (1 - theta**t)
            over = np.abs(g) > m_max_hat
            g[over] = g[over] / big * m_max_hat
            n = np.linalg.norm(g)
            m_norm[i] = gamma1 * m_norm[i] + (1 - gamma1) * n
            v_norm[i] = gamma2 * v_norm[i] + (1 - gamma2) * n**2
            c = (m_norm[i] / (1 - gamma1**t)) / (
                np.sqrt(v_norm[i] / (1 - gamma2**t)) + eps
            )
            if n > 0:
                g = g / n * c
            mu[i] = b1 * mu[i] + (1 - b1) * g
            nu[i] = b2 * nu[i] + (1 - b2) * g * g
            denom = np.sqrt(nu[i]) / np.sqrt(1 - b2**t) + eps
            p[i] = p[i] - lr / (1 - b1**t) * mu[i] / denom
        history.append([x.copy() for x in p])
    return history


def test_stable_spam_composed_of_parts_matches_its_algorithm():
    rng = np.random.default_rng(7)
    params = [rng.normal(size=(6, 4)), rng.normal(size=9)]
    seq = [
        [(30.0 if t == 5 else 1.0) * rng.normal(size=x.shape) for x in params]
        for t in range(10)
    ]
    lr, betas, eps, theta, gamma1, gamma2 = 1e-2, (0.9, 0.999), 1e-8, 0.9, 0.7, 0.9
    want = stable_spam_reference(params, seq, lr, betas, eps, theta, gamma1, gamma2)
    tx = oc.skip_nonfinite(
        optax.chain(
            oc.adaclip(theta),
            oc.adagn(gamma1, gamma2, eps),
            oc.adam(lr, b1=betas[0], b2=betas[1], eps=eps),
        ),
        reset_every=1000,
    )
    p = [jnp.asarray(x, jnp.float32) for x in params]
    state = tx.init(p)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for t, grads in enumerate(seq):
        p, state = step(p, state, [jnp.asarray(g, jnp.float32) for g in grads])
        for got, ref in zip(p, want[t], strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    stats = oc.get_stats(state)
    assert int(stats["adaclip/num_clipped"]) >= 1  # the spike was clipped
