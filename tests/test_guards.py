"""skip_nonfinite, skip_on_spike, checkpointing and a spiky training run.

A skipped step must leave the parameters and the wrapped optimizer's state
bit-for-bit as they were, and the run must then continue exactly as if the
step had not happened. Every adaptive state must survive a save/restore
mid-run and continue bit-for-bit like the uninterrupted run.
"""

import collections

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from example_loader import load_example

import optax_clip as oc


def assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes()


def make_grads(n, seed=0, shape=(5,)):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(n)]


def run_steps(tx, grads, params, extra=None):
    """Applies ``tx`` to each gradient with one jitted step; returns history."""
    state = tx.init(params)

    @jax.jit
    def step(g, state, params, kw):
        updates, state = tx.update(g, state, params, **kw)
        return optax.apply_updates(params, updates), state, updates

    history = []
    for i, g in enumerate(grads):
        kw = {} if extra is None else extra[i]
        params, state, updates = step(g, state, params, kw)
        history.append((params, state, updates))
    return history


# --------------------------------------------------------------------------
# skip_nonfinite
# --------------------------------------------------------------------------


def test_skip_nonfinite_never_poisons_adam_unlike_apply_if_finite():
    good = make_grads(6, seed=1)
    nan = jnp.full((5,), jnp.nan)
    seq = [good[0], nan, nan, nan, good[1], good[2], good[3]]
    params = jnp.ones(5)

    # optax: after max_consecutive_errors bad steps the NaN enters Adam's
    # moments, and every later update is NaN although the gradients are fine.
    theirs = run_steps(optax.apply_if_finite(optax.adam(1e-2), 2), seq, params)
    assert not np.all(np.isfinite(np.asarray(theirs[-1][2])))
    assert not np.all(np.isfinite(np.asarray(theirs[-1][1].inner_state[0].mu)))

    ours = run_steps(oc.skip_nonfinite(optax.adam(1e-2)), seq, params)
    # Each skipped step: zero update, parameters and inner state untouched.
    for i in (1, 2, 3):
        np.testing.assert_array_equal(np.asarray(ours[i][2]), 0.0)
        assert_bitwise_equal(ours[i][0], ours[0][0])
        assert_bitwise_equal(ours[i][1].guarded_state, ours[0][1].guarded_state)
    # Afterwards the run is bit-for-bit the run that never saw the bad steps.
    clean = run_steps(oc.skip_nonfinite(optax.adam(1e-2)), [seq[0], *seq[4:]], params)
    for mine, ref in zip(ours[4:], clean[1:], strict=True):
        assert_bitwise_equal(mine[0], ref[0])
        assert_bitwise_equal(mine[1].guarded_state, ref[1].guarded_state)
    state = ours[-1][1]
    assert int(state.skipped_steps) == 3 and int(state.skip_streak) == 0
    assert int(ours[3][1].skip_streak) == 3
    stats = oc.get_stats(state)
    assert int(stats["skip_nonfinite/num_nonfinite"]) == 3
    assert int(stats["skip_nonfinite/skipped_steps"]) == 3


def test_skip_nonfinite_statistics():
    tx = oc.skip_nonfinite(optax.sgd(1.0))
    params = jnp.zeros(2)
    steps = [jnp.array([3.0, 4.0]), jnp.array([jnp.inf, 1.0]), jnp.array([0.0, 1.0])]
    history = [s for _, s, _ in run_steps(tx, steps, params)]
    got = [jax.device_get(oc.get_stats(s)) for s in history]
    keys = {
        "grad_norm",
        "is_skipped",
        "is_nonfinite",
        "num_updates",
        "num_nonfinite",
        "skipped_steps",
        "skip_streak",
        "skip_fraction",
    }
    assert set(got[0]) == {f"skip_nonfinite/{k}" for k in keys}

    def series(key):
        return [float(g[f"skip_nonfinite/{key}"]) for g in got]

    assert series("grad_norm")[0] == 5.0 and series("grad_norm")[2] == 1.0
    assert series("grad_norm")[1] == np.inf
    assert series("is_skipped") == series("is_nonfinite") == [0, 1, 0]
    assert series("num_updates") == [1, 2, 3]
    assert series("num_nonfinite") == series("skipped_steps") == [0, 1, 1]
    assert series("skip_streak") == [0, 1, 0]
    assert series("skip_fraction") == pytest.approx([0, 1 / 2, 1 / 3])
    # The short names are properties of the state too.
    last = history[-1]
    assert float(last.grad_norm) == 1.0 and int(last.num_updates) == 3
    assert int(history[1].is_skipped) == int(history[1].is_nonfinite) == 1
    assert int(last.num_nonfinite) == int(last.skipped_steps) == 1


@pytest.mark.parametrize(
    "guard", [oc.skip_nonfinite, lambda inner: oc.skip_on_spike(inner, 4)]
)
def test_guard_state_fields_are_distinct_from_an_inner_clip(guard):
    # optax.tree.get raises on a name that appears twice; the guard's own
    # fields must not repeat the ClipStats names of a clip inside it.
    tx = guard(optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    params = jnp.zeros(3)
    state = tx.init(params)
    _, state = tx.update(jnp.array([3.0, 4.0, 0.0]), state, params)
    names = [f for f in type(state)._fields if f != "guarded_state"]
    names += list(oc.ClipStats._fields)
    for name in names:
        optax.tree.get(state, name)  # raises KeyError if repeated
    assert int(optax.tree.get(state, "guard_num_updates")) == 1
    assert int(optax.tree.get(state, "num_updates")) == 1  # the clip's
    assert float(optax.tree.get(state, "pre_clip_norm")) == 5.0
    assert float(optax.tree.get(state, "guard_grad_norm")) == 5.0


def loss_recorder():
    """An inner transform that needs ``loss`` and keeps the last one."""

    def init(params):
        del params
        return {"last_loss": jnp.zeros((), jnp.float32)}

    def update(updates, state, params=None, *, loss, **extra):
        del params, extra, state
        return updates, {"last_loss": jnp.asarray(loss, jnp.float32)}

    return optax.GradientTransformationExtraArgs(init, update)


def test_skip_nonfinite_loss_is_checked_and_forwarded():
    tx = oc.skip_nonfinite(loss_recorder())
    params = jnp.zeros(2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out, state = update(jnp.ones(2), state, params, loss=0.5)
    assert float(state.guarded_state["last_loss"]) == 0.5
    out, state = update(jnp.ones(2), state, params, loss=jnp.inf)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert float(state.guarded_state["last_loss"]) == 0.5
    assert int(state.skipped_steps) == 1
    with pytest.raises(ValueError, match="scalar"):
        tx.update(jnp.ones(2), state, params, loss=jnp.ones(2))


@pytest.mark.parametrize(
    "guard", [oc.skip_nonfinite, lambda inner: oc.skip_on_spike(inner, 4)]
)
def test_extra_arguments_that_are_not_arrays_are_forwarded(guard):
    # optax.contrib.sophia takes the objective as a callable; a string and a
    # Python int pass through too, as in optax.apply_if_finite.
    def obj_fn(p):
        return jnp.sum(p**2)

    params = jnp.array([1.0, 2.0])
    grads = jax.grad(obj_fn)(params)
    sophia = optax.contrib.sophia(0.1, update_interval=1)
    tx, ref = guard(sophia), optax.apply_if_finite(sophia, 3)
    out, state = tx.update(grads, tx.init(params), params, obj_fn=obj_fn)
    want, _ = ref.update(grads, ref.init(params), params, obj_fn=obj_fn)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    seen = {}

    def recorder():
        def update(u, s, params=None, *, note, fn, k):
            seen.update(note=note, fn=fn(2), k=k)
            return u, s

        return optax.GradientTransformationExtraArgs(lambda p: (), update)

    tx = guard(recorder())
    tx.update(grads, tx.init(params), params, note="hi", fn=lambda x: x + 1, k=3)
    assert seen == {"note": "hi", "fn": 3, "k": 3}


def test_skip_nonfinite_inner_output_dtype_and_none_leaves():
    # Adam turns bf16 gradients into float32 updates; a skipped step must
    # return zeros of the inner's output dtype, with None leaves kept.
    tx = oc.skip_nonfinite(optax.adam(1e-2))
    params = {"a": jnp.ones(3), "n": None}
    grads = {"a": jnp.array([1.0, jnp.nan, 2.0], jnp.bfloat16), "n": None}
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert out["n"] is None and out["a"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["a"]), 0.0)


@pytest.mark.parametrize("guard", [oc.skip_nonfinite, oc.skip_on_spike])
def test_skipped_step_keeps_key_state_and_finite_meta_gradient(guard):
    # The inner update runs and is selected away: a PRNG key in the inner
    # state must come back unchanged, and differentiating through a skipped
    # NaN step must not pull the NaN of the discarded branch into the gradient
    # (hyper-parameters in the state; see _guarded_update for closures).
    def make(lr):
        adam = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
        return guard(optax.chain(optax.add_noise(0.1, 0.55, 0), adam))

    def loss(lr, g):
        tx = make(lr)
        params = jnp.ones(3)
        state = tx.init(params)
        u, state = tx.update(g, state, params)
        u2, state2 = tx.update(jnp.ones(3), state, params)
        return jnp.sum(u) + jnp.sum(u2), (state, state2)

    bad = jnp.array([1.0, jnp.nan, 2.0])
    (value, (state, state2)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        0.1, bad
    )
    assert int(state.skipped_steps) == 1
    init = make(0.1).init(jnp.ones(3))

    def raw(tree):
        def f(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.key_data(x)
            return x

        return jax.tree.map(f, tree)

    assert_bitwise_equal(raw(state.guarded_state), raw(init.guarded_state))
    # the second (good) step is Adam's first: -lr * sign(g + noise) ~ -0.1 each
    assert np.isfinite(float(value)) and np.isfinite(float(grad))
    np.testing.assert_allclose(float(grad), float(value) / 0.1, rtol=1e-5)
    assert int(state2.skipped_steps) == 1


# --------------------------------------------------------------------------
# skip_on_spike
# --------------------------------------------------------------------------


def ref_skip_on_spike(values, window, sigma, min_history):
    """One-sided rolling z-score test (MaxText/OLMo-core practice), float64."""
    hist = collections.deque(maxlen=window)
    skip, z, level = [], [], []
    for x in np.asarray(values, np.float64):
        if len(hist) >= max(min_history, 2):
            h = np.array(hist)
            mean, std = h.mean(), h.std(ddof=1)
            skip.append(x - mean > sigma * std)
            z.append((x - mean) / std)
            level.append(mean + sigma * std)
        else:
            skip.append(False)
            z.append(0.0)
            level.append(np.inf)
        hist.append(x)
    return np.array(skip), np.array(z), np.array(level)


@pytest.mark.parametrize("window,sigma,min_history", [(128, 6.0, None), (16, 3.0, 5)])
def test_skip_on_spike_matches_reference(window, sigma, min_history):
    rng = np.random.default_rng(3)
    steps = 600
    norms = np.exp(0.1 * rng.standard_normal(steps)) * np.linspace(2.0, 1.0, steps)
    spikes = rng.choice(np.arange(steps), size=15, replace=False)
    norms[spikes] *= rng.uniform(1.5, 50.0, size=15)
    norms = norms.astype(np.float32)
    tx = oc.skip_on_spike(optax.sgd(1.0), window, sigma, min_history=min_history)

    @jax.jit
    def run(norms):
        def body(state, n):
            out, state = tx.update(n[None], state, jnp.zeros(1))
            rec = {
                "skipped": state.guard_is_skipped,
                "z": state.grad_zscore,
                "level": state.grad_norm_threshold,
                "out": out[0],
            }
            return state, rec

        return jax.lax.scan(body, tx.init(jnp.zeros(1)), norms)

    state, got = run(jnp.asarray(norms))
    need = max(2, window // 2) if min_history is None else min_history
    skip, z, level = ref_skip_on_spike(norms, window, sigma, need)
    np.testing.assert_array_equal(np.asarray(got["skipped"]).astype(bool), skip)
    np.testing.assert_allclose(np.asarray(got["z"]), z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["level"]), level, rtol=1e-5)
    out = np.asarray(got["out"])
    np.testing.assert_array_equal(out[skip], 0.0)
    np.testing.assert_array_equal(out[~skip], -norms[~skip])
    assert skip.sum() >= 3 and int(state.skipped_steps) == skip.sum()
    assert int(state.spike_steps) == skip.sum()  # all finite: every skip a spike


def test_skip_on_spike_skipped_step_is_as_if_absent():
    grads = make_grads(40, seed=4, shape=(3, 2))
    spike = 25
    spiky = list(grads)
    spiky[spike] = 1e4 * grads[spike]
    params = {"w": jnp.ones((3, 2))}
    wrap = [{"w": g} for g in spiky]
    tx = oc.skip_on_spike(optax.adam(1e-2), window=32, sigma=6.0, min_history=10)
    ours = run_steps(tx, wrap, params)
    assert int(ours[spike][1].skip_streak) == 1
    assert_bitwise_equal(ours[spike][0], ours[spike - 1][0])
    assert_bitwise_equal(ours[spike][1].guarded_state, ours[spike - 1][1].guarded_state)
    np.testing.assert_array_equal(np.asarray(ours[spike][2]["w"]), 0.0)
    # Continuing: identical to the run without that batch (no other skips).
    without = [g for i, g in enumerate(wrap) if i != spike]
    ref = run_steps(tx, without, params)
    for mine, theirs in zip(ours[spike + 1 :], ref[spike:], strict=True):
        assert_bitwise_equal(mine[0], theirs[0])
        assert_bitwise_equal(mine[1].guarded_state, theirs[1].guarded_state)
    assert int(ours[-1][1].skipped_steps) == 1


def test_skip_on_spike_loss_inactive_one_sided_and_nonfinite():
    tx = oc.skip_on_spike(optax.sgd(1.0), window=8, sigma=3.0)
    params = jnp.zeros(2)
    update = jax.jit(tx.update)
    state = tx.init(params)
    # Inactive until min_history (= 4) values: an early spike goes through.
    out, state = update(jnp.ones(2), state, params, loss=1.0)
    out, state = update(100 * jnp.ones(2), state, params, loss=1.0)
    np.testing.assert_array_equal(np.asarray(out), -100.0)
    for scale in (1.0, 1.1, 0.9, 1.05, 0.95, 1.0):
        out, state = update(scale * jnp.ones(2), state, params, loss=1.0 + scale / 10)
    # One-sided: a tiny gradient is not a spike.
    out, state = update(1e-3 * jnp.ones(2), state, params, loss=1.1)
    assert int(state.skipped_steps) == 0
    # A loss spike with an ordinary gradient is skipped.
    out, state = update(jnp.ones(2), state, params, loss=50.0)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert int(state.skipped_steps) == 1 and float(state.loss_zscore) > 3.0
    # A NaN is always skipped and never enters a window.
    window = np.asarray(state.norm_window).copy()
    out, state = update(jnp.array([jnp.nan, 1.0]), state, params, loss=1.0)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    np.testing.assert_array_equal(np.asarray(state.norm_window), window)
    stats = oc.get_stats(state)
    assert int(stats["skip_on_spike/skipped_steps"]) == 2
    assert int(stats["skip_on_spike/skip_streak"]) == 2
    assert int(stats["skip_on_spike/num_nonfinite"]) == 1
    assert int(stats["skip_on_spike/spike_steps"]) == 1  # the loss spike
    assert int(stats["skip_on_spike/num_updates"]) == 11
    assert int(stats["skip_on_spike/is_skipped"]) == 1
    assert int(stats["skip_on_spike/is_nonfinite"]) == 1
    assert float(stats["skip_on_spike/skip_fraction"]) == pytest.approx(2 / 11)
    assert np.isnan(float(stats["skip_on_spike/grad_norm"]))


def test_skip_on_spike_validation_and_nested_stats():
    with pytest.raises(ValueError, match=">= 2"):
        oc.skip_on_spike(optax.sgd(1.0), window=1)
    with pytest.raises(ValueError, match="min_history"):
        oc.skip_on_spike(optax.sgd(1.0), window=8, min_history=9)
    with pytest.raises(ValueError):
        oc.skip_on_spike(optax.sgd(1.0), sigma=-1.0)
    factory = optax.inject_hyperparams(
        lambda window=8, sigma=6.0: oc.skip_on_spike(optax.sgd(1.0), window, sigma)
    )
    tx = factory()
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(tx.update)(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
    # The statistics of a clip inside the guard are found through it.
    tx = oc.skip_on_spike(optax.chain(oc.zclip(), optax.adam(1e-3)), window=8)
    _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
    stats = oc.get_stats(state)
    assert "zclip/norm_mean" in stats and "skip_on_spike/grad_zscore" in stats


def test_flax_train_states():
    """Linen's TrainState cannot pass ``loss``; NNX's Optimizer forwards it."""
    from flax import nnx
    from flax.training import train_state

    params = {"w": jnp.ones(3)}
    tx = oc.skip_on_spike(optax.adam(1e-2), window=4)
    ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    apply = jax.jit(lambda ts, g: ts.apply_gradients(grads=g))
    for scale in (1.0, 1.1, 0.9, 1.0, 1e4):
        ts = apply(ts, {"w": scale * jnp.ones(3)})
    assert int(ts.opt_state.skipped_steps) == 1

    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, oc.skip_nonfinite(loss_recorder()), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    opt.update(model, jax.tree.map(jnp.zeros_like, grads), loss=0.25)
    assert float(opt.opt_state.guarded_state["last_loss"][...]) == 0.25


# --------------------------------------------------------------------------
# Checkpointing: save mid-run, restore, continue bit-for-bit.
# --------------------------------------------------------------------------


def every_state():
    """One optimizer holding the state of every transform of issue 3."""
    clips = optax.chain(
        oc.adaptive_grad_clip(0.5),
        oc.adagc(warmup_steps=5),
        oc.autoclip(50.0, history=8),
        oc.zclip(warmup_steps=5),
        optax.adam(1e-2),
    )
    return oc.skip_nonfinite(oc.skip_on_spike(clips, window=8))


def test_checkpoint_restore_continues_bit_for_bit():
    tx = every_state()
    params0 = {
        "w": jnp.full((4, 3), 0.5, jnp.float32),
        "b": jnp.full(3, 0.1, jnp.float32),
    }
    noises = jnp.asarray(np.random.default_rng(0).standard_normal((30, 4, 3)))

    @jax.jit
    def step(params, state, i):
        noise = noises[i]
        scale = jnp.where(i % 9 == 8, 300.0, 1.0)  # periodic spikes
        grads = {"w": scale * (params["w"] + noise), "b": scale * noise[0]}
        grads["b"] = jnp.where(i == 13, jnp.nan, grads["b"])  # one bad step
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def run(params, state, start, stop):
        for i in range(start, stop):
            params, state = step(params, state, i)
        return params, state

    full = run(params0, tx.init(params0), 0, 30)
    half = run(params0, tx.init(params0), 0, 12)
    blob = flax.serialization.to_bytes(half)
    restored = flax.serialization.from_bytes((params0, tx.init(params0)), blob)
    restored = jax.tree.map(jnp.asarray, restored)
    chex.assert_trees_all_equal_structs(restored, half)
    resumed = run(*restored, 12, 30)
    assert_bitwise_equal(resumed, full)
    assert step._cache_size() == 1  # the restored state has the same types
    stats = oc.get_stats(resumed[1])
    for name in ("adaptive_grad_clip", "adagc", "autoclip", "zclip"):
        assert int(stats[f"{name}/num_updates"]) > 0
    assert int(stats["skip_nonfinite/skipped_steps"]) == 1
    assert int(stats["skip_on_spike/skipped_steps"]) >= 1


# --------------------------------------------------------------------------
# A spiky training run, and the comparison script's smoke test.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_spike_rescue_zclip_and_skip_beat_no_clipping(capsys):
    example = load_example("spike_rescue")
    seeds = (0, 1)
    names = ("none", "zclip", "skip_on_spike")
    results = example.main(steps=300, seeds=seeds, names=names)
    printed = capsys.readouterr().out
    assert "| seed | none | zclip | skip_on_spike |" in printed
    assert set(results) == set(names)
    for i in range(len(seeds)):
        assert results["zclip"][i] < results["none"][i]
        assert results["skip_on_spike"][i] < results["none"][i]
