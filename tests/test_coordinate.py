"""spam_clip, adaclip and the guards' momentum reset, against NumPy float64.

The references are written from the papers' rules (SPAM, arXiv 2501.06842;
Stable-SPAM, arXiv 2502.17055), not from the library.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc

LR, B1, B2, EPS = 0.1, 0.9, 0.99, 1e-8


def gradient_steps(n=10, spike_at=7, seed=0):
    """A short run of small trees: a spike in two entries, a late-starting leaf."""
    rng = np.random.default_rng(seed)
    steps = []
    for t in range(n):
        g = {
            "w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32),
            # Zero for the first 5 steps (v = 0 there), like an unused embedding row.
            "late": (rng.normal(size=(2,)) if t >= 5 else np.zeros(2)).astype(
                np.float32
            ),
        }
        if t == spike_at:
            g["w"][0, 1] = 300.0
            g["b"][2] = -50.0
        steps.append(g)
    return steps


def run(tx, steps, params=None):
    params = jax.tree.map(jnp.zeros_like, steps[0]) if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs, states = [], []
    for g in steps:
        out, state = update(g, state, params)
        outs.append(jax.device_get(out))
        states.append(state)
    return outs, states


# --------------------------------------------------------------------------
# NumPy float64 references
# --------------------------------------------------------------------------


def adam64(steps, clip=None, reset_before=()):
    """Adam in float64; ``clip(g, v, count)`` is applied to each gradient first.

    ``reset_before``: 1-based steps before which m, v and the count are zeroed.
    Returns the updates and the clipped gradients.
    """
    m = {k: np.zeros(v.shape) for k, v in steps[0].items()}
    v = {k: np.zeros(x.shape) for k, x in steps[0].items()}
    count = 0
    outs, fed = [], []
    for t, g in enumerate(steps, start=1):
        if t in reset_before:
            m = {k: np.zeros_like(x) for k, x in m.items()}
            v = {k: np.zeros_like(x) for k, x in v.items()}
            count = 0
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        if clip is not None:
            g = {k: clip(g[k], v[k], count) for k in g}
        fed.append(g)
        count += 1
        m = {k: B1 * m[k] + (1 - B1) * g[k] for k in g}
        v = {k: B2 * v[k] + (1 - B2) * g[k] ** 2 for k in g}
        out = {}
        for k in g:
            m_hat = m[k] / (1 - B1**count)
            v_hat = v[k] / (1 - B2**count)
            out[k] = -LR * m_hat / (np.sqrt(v_hat) + EPS)
        outs.append(out)
    return outs, fed


def spam64(theta, warmup):
    """SPAM's rule: where g^2 > theta * v (and v > 0, after the warm-up)."""

    def clip(g, v, count):
        if count < warmup:
            return g
        spike = (v > 0) & (g * g > theta * v)
        return np.where(spike, np.sign(g) * np.sqrt(theta * v), g)

    return clip


def adaclip64(steps, theta):
    """Stable-SPAM's AdaClip, leaf by leaf; returns outputs and clipped counts."""
    ema = {k: 0.0 for k in steps[0]}
    outs, counts = [], []
    for t, g in enumerate(steps, start=1):
        out, n = {}, 0
        for k, x in g.items():
            x = np.asarray(x, np.float64)
            big = np.max(np.abs(x))
            ema[k] = theta * ema[k] + (1 - theta) * big
            m_hat = ema[k] / (1 - theta**t)
            over = np.abs(x) > m_hat * (1 + 1e-6)  # ties: rounding either way
            out[k] = np.where(over, x * m_hat / max(big, 1e-300), x)
            n += int(np.sum(over))
        outs.append(out)
        counts.append(n)
    return outs, counts


def assert_close(got, want, rtol=2e-5, atol=1e-6):
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol, atol)


# --------------------------------------------------------------------------
# spam_clip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("adam", [optax.adam, oc.adam], ids=["optax", "optax_clip"])
def test_spam_clip_matches_numpy_over_steps_with_a_spike(adam):
    steps = gradient_steps()
    theta, warmup = 50.0, 3
    tx = oc.spam_clip(adam(LR, b1=B1, b2=B2, eps=EPS), theta, warmup_steps=warmup)
    outs, states = run(tx, steps)
    want, fed = adam64(steps, spam64(theta, warmup))
    for got, ref in zip(outs, want, strict=True):
        assert_close(got, ref)
    # The spike was clipped (and only where the rule says so).
    n_clipped = [int(s.clipped_coordinates) for s in states]
    want_n = [
        sum(int(np.sum(f[k] != np.asarray(g[k], np.float64))) for k in g)
        for f, g in zip(fed, steps, strict=True)
    ]
    assert n_clipped == want_n
    assert n_clipped[:warmup] == [0] * warmup and n_clipped[7] >= 2
    stats = oc.get_stats(states[7])
    pre = np.sqrt(
        sum(np.sum(np.asarray(x, np.float64) ** 2) for x in steps[7].values())
    )
    post = np.sqrt(sum(np.sum(x**2) for x in fed[7].values()))
    np.testing.assert_allclose(float(stats["spam_clip/pre_clip_norm"]), pre, 1e-6)
    np.testing.assert_allclose(float(stats["spam_clip/post_clip_norm"]), post, 1e-5)
    np.testing.assert_allclose(float(stats["spam_clip/clip_scale"]), post / pre, 1e-5)
    assert int(stats["spam_clip/num_clipped"]) == sum(n > 0 for n in n_clipped[:8])
    assert float(stats["spam_clip/clip_threshold"]) == theta


def test_spam_clip_leaves_coordinates_without_history_alone():
    # The "late" leaf is zero for 5 steps: v = 0 there after the warm-up.
    # SPAM's reference rule would set it to 0 (and keep it at 0 for ever).
    steps = gradient_steps()
    tx = oc.spam_clip(optax.scale_by_adam(b2=B2), 50.0, warmup_steps=2)
    _, states = run(tx, steps[:6])
    # Its first gradient entered Adam unclipped.
    np.testing.assert_array_equal(
        states[-1].spam_inner_state.nu["late"],
        (1 - B2) * steps[5]["late"].astype(np.float32) ** 2,
    )


def test_spam_clip_warmup_restarts_after_a_moment_reset():
    steps = [{"w": np.full(3, s, np.float32)} for s in [1, 1, 1, 1, 100, 1, 100]]
    inner = oc.spam_clip(oc.adam(LR, b2=B2), 10.0, warmup_steps=2)
    tx = oc.skip_on_spike(inner, window=64, sigma=np.inf, reset_every=5)
    _, states = run(tx, steps)
    clipped = [int(s.guarded_state.clipped_coordinates) for s in states]
    # Step 5 is a spike but the moments were reset before it (v = 0, count 0);
    # by step 7 v holds 2 gradients again and the spike is clipped.
    assert clipped == [0, 0, 3, 3, 0, 0, 3]


def moments_only(b2=B2):
    """Adam's moments kept, the (clipped) gradient returned: shows the clip."""
    adam = optax.scale_by_adam(b2=b2)
    return optax.GradientTransformation(
        adam.init, lambda u, s, p=None: (u, adam.update(u, s, p)[1])
    )


def test_spam_clip_nonfinite_policies():
    g = {"w": jnp.array([1.0, jnp.inf, 2.0])}
    for policy, want in [("propagate", [1.0, np.inf, 2.0]), ("zero_update", [0, 0, 0])]:
        tx = oc.spam_clip(moments_only(), 1.0, warmup_steps=0, nonfinite=policy)
        fed, state = jax.jit(tx.update)(g, tx.init(g))
        np.testing.assert_array_equal(fed["w"], want)
        assert int(oc.get_stats(state)["spam_clip/num_nonfinite"]) == 1


def test_spam_clip_gradient_wrt_theta_is_finite_at_zero():
    g = {"w": jnp.array([1.0, -3.0, 0.0])}
    inner = optax.scale_by_adam(b2=B2)
    state = oc.spam_clip(inner, 1.0, warmup_steps=1).init(g)
    _, state = oc.spam_clip(inner, 1.0, warmup_steps=1).update(g, state)

    def f(theta):
        tx = oc.spam_clip(inner, theta, warmup_steps=1)
        out, _ = tx.update(g, state)
        return jnp.sum(out["w"])

    grad = jax.jit(jax.grad(f))
    for theta in (0.0, 1.0):
        assert np.isfinite(float(grad(jnp.float32(theta))))


def test_spam_clip_gradient_wrt_the_moment_is_zero_where_it_is_not_positive():
    # d/dv of the bound sqrt(theta * v): 0 where v <= 0 (never inf or NaN).
    g = {"w": jnp.array([5.0, 5.0, 5.0, 0.5])}
    tx = oc.spam_clip(moments_only(), 1.0, warmup_steps=0)
    state = tx.init(g)
    nu = {"w": jnp.array([0.0, -1.0, 4.0, 4.0])}  # clipped: only entry 2
    state = state._replace(spam_inner_state=state.spam_inner_state._replace(nu=nu))

    def f(v):
        inner = state.spam_inner_state._replace(nu={"w": v})
        out, _ = tx.update(g, state._replace(spam_inner_state=inner))
        return jnp.sum(out["w"])

    # Entry 2 is fed sqrt(1 * 4) = 2: d/dv = 1 / (2 sqrt(4)) = 0.25.
    np.testing.assert_array_equal(jax.jit(jax.grad(f))(nu["w"]), [0, 0, 0.25, 0])


@pytest.mark.xla_cpu
def test_spam_clip_copies_no_moment_in_a_donated_step():
    # Every kernel reads the moment through one square root: before, the
    # clip's test v > 0 read it in several kernels and XLA copied each
    # second-moment buffer to update it in place (5x AdamW's step on CPU).
    params = {f"w{i}": jnp.ones((64, 32)) for i in range(3)}
    tx = oc.spam_clip(optax.adamw(1e-3))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    hlo = jitted.lower(params, tx.init(params), params).compile().as_text()
    assert hlo.count("f32[64,32]{1,0} copy(") == 0


def test_spam_clip_rejects_inner_states_without_one_second_moment():
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="found none"):
        oc.spam_clip(optax.sgd(0.1, momentum=0.9)).init(params)
    two = optax.multi_transform(
        {"a": optax.adam(0.1), "b": optax.adam(0.2)}, {"w": "a", "v": "b"}
    )
    with pytest.raises(ValueError, match="found 2"):
        oc.spam_clip(two).init({"w": jnp.zeros(2), "v": jnp.zeros(1)})
    with pytest.raises(TypeError, match="wraps an optimizer"):
        oc.spam_clip(optax.adam)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="theta"):
            oc.spam_clip(optax.adam(0.1), bad)
    with pytest.raises(ValueError, match="warmup_steps"):
        oc.spam_clip(optax.adam(0.1), warmup_steps=-1)


# --------------------------------------------------------------------------
# adaclip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.9, 0.999])
def test_adaclip_matches_numpy_over_steps_with_a_spike(theta):
    steps = gradient_steps()
    outs, states = run(oc.adaclip(theta), steps)
    want, counts = adaclip64(steps, theta)
    for got, ref in zip(outs, want, strict=True):
        assert_close(got, ref)
    assert [int(s.clipped_coordinates) for s in states] == counts
    assert counts[0] == 0 and counts[7] >= 2
    # The largest magnitude after the spike's step: the spiking leaf's m_hat.
    stats = oc.get_stats(states[7])
    post = max(np.max(np.abs(x)) for x in want[7].values())
    np.testing.assert_allclose(float(stats["adaclip/post_clip_norm"]), post, 1e-5)
    assert float(stats["adaclip/pre_clip_norm"]) == 300.0
    assert int(stats["adaclip/adaclip_steps"]) == 8


def test_adaclip_nonfinite_step_keeps_its_ema():
    steps = gradient_steps(4)
    bad = jax.tree.map(np.copy, steps[2])
    bad["b"][0] = np.nan
    outs, states = run(oc.adaclip(0.9), [steps[0], steps[1], bad, steps[2]])
    assert np.all(np.isnan(outs[2]["b"])) and np.all(np.isfinite(outs[2]["w"]))
    np.testing.assert_array_equal(states[2].adaclip_max_ema, states[1].adaclip_max_ema)
    want, _ = adaclip64(steps[:3], 0.9)
    assert_close(outs[3], want[2])  # as if the NaN step had not happened
    zeroed, _ = run(oc.adaclip(0.9, nonfinite="zero_update"), [bad])
    for x in jax.tree.leaves(zeroed[0]):
        np.testing.assert_array_equal(x, 0.0)


def test_adaclip_traced_theta_and_validation():
    steps = gradient_steps(3)
    tx = optax.inject_hyperparams(oc.adaclip)(theta=0.9)
    outs, _ = run(tx, steps)
    want, _ = adaclip64(steps, 0.9)
    assert_close(outs[2], want[2])
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="theta"):
            oc.adaclip(bad)


# --------------------------------------------------------------------------
# Momentum reset in the guards
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adam,guard",
    [(optax.adam, "skip_nonfinite"), (oc.adam, "skip_on_spike")],
    ids=["generic", "fast"],
)
def test_reset_every_matches_numpy(adam, guard):
    steps = gradient_steps(8, spike_at=99)
    inner = adam(LR, b1=B1, b2=B2, eps=EPS)
    if guard == "skip_nonfinite":
        tx = oc.skip_nonfinite(inner, reset_every=3)
    else:
        tx = oc.skip_on_spike(inner, window=8, sigma=np.inf, reset_every=3)
    outs, _ = run(tx, steps)
    want, _ = adam64(steps, reset_before=(3, 6))
    for got, ref in zip(outs, want, strict=True):
        assert_close(got, ref)


@pytest.mark.parametrize("adam", [optax.adam, oc.adam], ids=["generic", "fast"])
def test_reset_on_skip_zeroes_the_moments_exactly(adam):
    steps = gradient_steps(10, spike_at=99)
    steps[6] = jax.tree.map(lambda x: 1e3 * x, steps[6])  # a norm spike
    tx = oc.skip_on_spike(adam(LR, b1=B1, b2=B2, eps=EPS), 4, 3.0, reset_on_skip=True)
    outs, states = run(tx, steps)
    assert [int(s.is_skipped) for s in states] == [0] * 6 + [1, 0, 0, 0]
    (adam_state,) = [
        x
        for x in jax.tree.leaves(
            states[6].guarded_state,
            is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState),
        )
        if isinstance(x, optax.ScaleByAdamState)
    ]
    assert int(adam_state.count) == 0
    for x in jax.tree.leaves((adam_state.mu, adam_state.nu)):
        np.testing.assert_array_equal(x, 0.0)
    for x in jax.tree.leaves(outs[6]):
        np.testing.assert_array_equal(x, 0.0)
    # After the skip: Adam from scratch on the remaining steps.
    want, _ = adam64(steps[7:])
    for got, ref in zip(outs[7:], want, strict=True):
        assert_close(got, ref)
    # Without the option the skipped step keeps the state bit for bit.
    keep = oc.skip_on_spike(adam(LR, b1=B1, b2=B2, eps=EPS), 4, 3.0)
    _, kept = run(keep, steps[:7])
    for a, b in zip(
        jax.tree.leaves(kept[6].guarded_state),
        jax.tree.leaves(kept[5].guarded_state),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_reset_applies_to_sgd_momentum_and_lion():
    steps = gradient_steps(4, spike_at=99)
    for inner in (optax.sgd(LR, momentum=0.9), oc.sgd(LR, momentum=0.9)):
        tx = oc.skip_nonfinite(inner, reset_every=2)
        outs, _ = run(tx, steps)
        # After the reset before step 2, the trace is the gradient itself.
        assert_close(
            outs[1], {k: -LR * np.asarray(v, np.float64) for k, v in steps[1].items()}
        )
    tx = oc.skip_nonfinite(optax.lion(LR), reset_every=2)
    _, states = run(tx, steps[:2])
    mu = states[1].guarded_state[0].mu  # reset, then one step: (1 - b2) g
    np.testing.assert_allclose(mu["w"], 0.01 * steps[1]["w"], rtol=1e-6)


def test_reset_options_are_checked():
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="reset_every"):
        oc.skip_on_spike(optax.adam(0.1), reset_every=0)
    with pytest.raises(ValueError, match="reset_every"):
        oc.skip_nonfinite(optax.adam(0.1), reset_every=2.5)
    with pytest.raises(TypeError, match="reset_on_skip"):
        oc.skip_nonfinite(optax.adam(0.1), reset_on_skip=1)
    # An optimizer without moments the reset knows: a clear error at init.
    for inner in (optax.rmsprop(0.1), oc.clip_by_global_norm(1.0)):
        with pytest.raises(ValueError, match="ScaleByAdamState"):
            oc.skip_on_spike(inner, reset_on_skip=True).init(params)
        oc.skip_on_spike(inner).init(params)  # fine without the option
