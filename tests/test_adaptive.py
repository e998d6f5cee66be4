"""autoclip, zclip, adagc, adaptive_grad_clip and suggest_max_norm.

The adaptive transforms are driven through ``jax.lax.scan`` over a few
thousand steps of synthetic norm sequences with injected spikes, and every
step's threshold and scale are compared with straightforward NumPy float64
re-implementations of the published algorithms written below.
"""

import collections
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from example_loader import load_example

import optax_clip as oc
from optax_clip import _adaptive

RTOL = 1e-5


def norm_sequence(steps, seed, spikes_every=37):
    """Positive norms with drift, noise, an early transient and spikes."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    trend = (1.0 + 0.5 * np.sin(t / 250.0)) * np.exp(-t / 5000.0)
    n = trend * np.exp(0.2 * rng.standard_normal(steps))
    n[:5] *= 30.0  # large norms right after initialisation
    spikes = rng.choice(np.arange(10, steps), size=steps // spikes_every, replace=False)
    n[spikes] *= rng.uniform(3.0, 1000.0, size=spikes.size)
    return n.astype(np.float32)


def drive(tx, grads_seq, record):
    """Runs ``tx`` over ``grads_seq`` (leading axis = steps) in one scan."""
    example = jax.tree.map(lambda x: x[0], grads_seq)

    @jax.jit
    def run(grads_seq):
        def body(state, g):
            out, state = tx.update(g, state)
            return state, record(g, out, state)

        return jax.lax.scan(body, tx.init(example), grads_seq)

    return jax.tree.map(np.asarray, run(grads_seq))


def single_leaf(norms):
    # A one-element leaf: its norm is the sequence value itself.
    return jnp.asarray(norms)[:, None]


def gate_record(g, out, state):
    del g, out
    return {
        "threshold": state.clip_stats.clip_threshold,
        "scale": state.clip_stats.clip_scale,
        "clipped": state.clip_stats.is_clipped,
    }


# --------------------------------------------------------------------------
# AutoClip
# --------------------------------------------------------------------------


def ref_autoclip(norms, percentile, history, max_norm=math.inf):
    hist = collections.deque(maxlen=history)
    thr, scale, rank = [], [], []
    for n in np.asarray(norms, np.float64):
        hist.append(n)
        c = min(float(np.percentile(np.array(hist), percentile)), max_norm)
        thr.append(c)
        scale.append(min(1.0, c / n))
        rank.append(100.0 * np.mean(np.array(hist) <= n))
    return np.array(thr), np.array(scale), np.array(rank)


@pytest.mark.parametrize(
    "percentile,history,max_norm",
    [(10.0, 1000, math.inf), (90.0, 64, math.inf), (50.0, 300, 2.0)],
)
def test_autoclip_matches_reference(percentile, history, max_norm):
    norms = norm_sequence(2500, seed=1)
    tx = oc.autoclip(percentile, history, max_norm=max_norm)

    def record(g, out, state):
        return {**gate_record(g, out, state), "rank": state.norm_rank}

    _, got = drive(tx, single_leaf(norms), record)
    thr, scale, rank = ref_autoclip(norms, percentile, history, max_norm)
    np.testing.assert_allclose(got["threshold"], thr, rtol=RTOL)
    np.testing.assert_allclose(got["scale"], scale, rtol=RTOL)
    np.testing.assert_allclose(got["rank"], rank, rtol=RTOL)
    # Before the buffer fills the history is everything seen so far: without a
    # cap the first step is never clipped; the threshold never exceeds the cap.
    assert got["scale"][0] == (1.0 if max_norm == math.inf else 2.0 / norms[0])
    assert np.all(got["threshold"] <= max_norm)
    assert 0.05 < got["clipped"].mean() < 0.999


def test_autoclip_history_must_be_static():
    with pytest.raises(TypeError, match="integer"):
        oc.autoclip(history=2.5)
    with pytest.raises(ValueError, match=">= 1"):
        oc.autoclip(history=0)
    with pytest.raises(ValueError):
        oc.autoclip(percentile=101.0)
    tx = optax.inject_hyperparams(oc.autoclip)(percentile=10.0, history=8)
    params = jnp.zeros(3)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(tx.update)(jnp.ones(3), tx.init(params), params)
    tx = optax.inject_hyperparams(oc.autoclip, static_args=("history",))(
        percentile=10.0, history=8
    )
    out, _ = jax.jit(tx.update)(jnp.ones(3), tx.init(params), params)
    chex.assert_trees_all_close(out, jnp.ones(3))


# --------------------------------------------------------------------------
# ZClip
# --------------------------------------------------------------------------


def ref_zclip(
    norms,
    alpha=0.97,
    z_thresh=2.5,
    warmup=25,
    max_norm=math.inf,
    mode="zscore",
    clip_option="adaptive_scaling",
    clip_factor=1.0,
    eps=1e-6,
    freeze=False,
):
    """The ZClip reference step() (bluorion-com/ZClip), in float64."""
    buf, mean, var = [], None, None
    out = collections.defaultdict(list)
    for n in np.asarray(norms, np.float64):
        if mean is None:
            buf.append(n)
            if len(buf) >= warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            clip_to, level, z = max_norm, max_norm, 0.0
        else:
            std = var**0.5
            clip_val = None
            z = (n - mean) / (std + eps)
            if mode == "percentile":
                level = mean + z_thresh * std
                if n > level:
                    clip_val = level
            else:
                level = mean + z_thresh * (std + eps)
                if z > z_thresh:
                    if clip_option == "adaptive_scaling":
                        eta = z / z_thresh
                        clip_val = (mean + z_thresh * std / eta) * clip_factor
                    else:
                        clip_val = mean
            clip_to = min(clip_val if clip_val is not None else n, max_norm)
            level = min(level, max_norm)
            if not (freeze and clip_val is not None):
                fed = clip_val if clip_val is not None else n
                mean = alpha * mean + (1 - alpha) * fed
                var = alpha * var + (1 - alpha) * (fed - mean) ** 2
        out["level"].append(level)
        out["scale"].append(min(1.0, clip_to / n))
        out["z"].append(z)
        out["mean"].append(mean if mean is not None else np.nan)
        out["var"].append(var if var is not None else np.nan)
    return {k: np.array(v) for k, v in out.items()}


ZCLIP_CONFIGS = [
    {},
    {"clip_option": "mean", "max_norm": 5.0},
    {"mode": "percentile", "alpha": 0.9, "z_thresh": 2.0},
    {"clip_factor": 0.5, "freeze": True, "warmup": 10},
]


@pytest.mark.parametrize("cfg", ZCLIP_CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_zclip_matches_reference(cfg):
    norms = norm_sequence(3000, seed=2)
    kwargs = {k: v for k, v in cfg.items() if k not in ("warmup", "freeze")}
    tx = oc.zclip(
        warmup_steps=cfg.get("warmup", 25),
        freeze_ema_on_spike=cfg.get("freeze", False),
        **kwargs,
    )

    def record(g, out, state):
        return {
            **gate_record(g, out, state),
            "z": state.norm_zscore,
            "mean": state.norm_mean,
            "var": state.norm_var,
        }

    _, got = drive(tx, single_leaf(norms), record)
    ref = ref_zclip(norms, **cfg)
    warm = cfg.get("warmup", 25)
    np.testing.assert_allclose(got["threshold"], ref["level"], rtol=RTOL)
    np.testing.assert_allclose(got["scale"], ref["scale"], rtol=RTOL)
    np.testing.assert_allclose(got["z"][warm:], ref["z"][warm:], rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(got["mean"][warm - 1 :], ref["mean"][warm - 1 :], RTOL)
    np.testing.assert_allclose(got["var"][warm - 1 :], ref["var"][warm - 1 :], RTOL)
    # The spikes are caught: most injected spikes are clipped.
    assert got["clipped"][warm:].sum() >= 0.7 * (3000 // 37)


def test_zclip_stats_and_validation():
    tx = oc.zclip(warmup_steps=3)
    state = tx.init(None)
    update = jax.jit(tx.update)
    for n in [1.0, 1.1, 0.9, 1.0, 40.0]:
        _, state = update(jnp.array([n]), state)
    stats = oc.get_stats(state)
    for key in ("norm_mean", "norm_std", "norm_zscore", "norms_seen", "num_clipped"):
        assert f"zclip/{key}" in stats
    assert int(stats["zclip/num_clipped"]) == 1
    assert float(stats["zclip/norm_zscore"]) > 2.5
    np.testing.assert_allclose(
        float(stats["zclip/norm_std"]), math.sqrt(float(state.norm_var)), rtol=1e-6
    )
    for bad in (
        {"mode": "median"},
        {"clip_option": "max"},
        {"alpha": 1.0},
        {"z_thresh": 0.0},
        {"warmup_steps": 0},
        {"warmup_steps": 2.5},
        {"clip_factor": -1.0},
    ):
        with pytest.raises(ValueError):
            oc.zclip(**bad)


# --------------------------------------------------------------------------
# AdaGC
# --------------------------------------------------------------------------


def ref_adagc(norms, max_norm=1.0, clip_ratio=1.04, beta=0.99, warmup=100):
    """AdaGC (Wang et al. 2025; the authors' Megatron code, without its eps)."""
    norms = np.asarray(norms, np.float64)
    gamma = None
    scales, thresholds, gammas = [], [], []
    for step, n in enumerate(norms, start=1):
        if step <= warmup:
            h = min(1.0, max_norm / np.sqrt(np.sum(n**2)))
            clipped = n * h
            gamma = clipped.copy() if gamma is None else np.minimum(gamma, clipped)
            scales.append(np.full_like(n, h))
            thresholds.append(max_norm)
        else:
            if gamma is None:
                gamma = n.copy()
            limit = clip_ratio * gamma
            scales.append(np.where(n > limit, limit / n, 1.0))
            thresholds.append(np.sqrt(np.sum(limit**2)))
            gamma = beta * gamma + (1 - beta) * np.minimum(n, limit)
        gammas.append(gamma.copy())
    return np.array(scales), np.array(thresholds), np.array(gammas)


def leaf_norms64(x):
    """Per-step 2-norms (float64) of a leaf whose leading axis is the step."""
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    return np.sqrt(np.sum(x * x, axis=1))


def adagc_grads(norms):
    """Three leaves of different shapes whose norms follow ``norms[:, i]``."""
    rng = np.random.default_rng(0)
    units = [rng.standard_normal(s) for s in [(3,), (2, 2), ()]]
    units = [u / np.linalg.norm(u) if u.ndim else np.float64(1.0) for u in units]
    return {
        name: jnp.asarray(norms[:, i].reshape((-1,) + (1,) * u.ndim) * u, jnp.float32)
        for i, (name, u) in enumerate(zip(["a", "b", "c"], units, strict=True))
    }


@pytest.mark.parametrize(
    "kwargs", [{}, {"max_norm": 0.7, "clip_ratio": 1.2, "beta": 0.9, "warmup": 0}]
)
def test_adagc_matches_reference(kwargs):
    steps = 2500
    norms = np.stack([norm_sequence(steps, seed=s, spikes_every=53) for s in (3, 4, 5)])
    norms = norms.T * np.array([0.5, 1.0, 0.2], np.float32)
    grads = adagc_grads(norms)
    warm = kwargs.pop("warmup", 100)
    tx = oc.adagc(warmup_steps=warm, **kwargs)

    def record(g, out, state):
        def scale(x, y):
            return jnp.vdot(y, x) / jnp.vdot(x, x)

        return {
            "scales": jnp.stack([scale(g[k], out[k]) for k in "abc"]),
            "threshold": state.clip_stats.clip_threshold,
            "gammas": state.tensor_norm_ema,
            "clipped": state.clipped_tensors,
        }

    _, got = drive(tx, grads, record)
    measured = np.stack([leaf_norms64(grads[k]) for k in "abc"], axis=1)
    scales, thresholds, gammas = ref_adagc(measured, warmup=warm, **kwargs)
    np.testing.assert_allclose(got["scales"], scales, rtol=RTOL)
    np.testing.assert_allclose(got["threshold"], thresholds, rtol=RTOL)
    np.testing.assert_allclose(got["gammas"], gammas, rtol=RTOL)
    ref_clipped = (scales[warm:] < 1.0).sum(axis=1)
    np.testing.assert_array_equal(got["clipped"][warm:], ref_clipped)
    assert ref_clipped.sum() > 50  # the per-tensor phase did clip spikes


def test_adagc_clips_only_the_spiking_tensor():
    tx = oc.adagc(warmup_steps=2)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        _, state = update({"a": jnp.ones(3) * 0.1, "b": jnp.ones(2) * 0.1}, state)
    out, state = update({"a": jnp.ones(3) * 50.0, "b": jnp.ones(2) * 0.1}, state)
    chex.assert_trees_all_close(out["b"], jnp.ones(2) * 0.1)
    np.testing.assert_allclose(
        float(jnp.linalg.norm(out["a"])), 1.04 * 0.1 * math.sqrt(3), rtol=1e-5
    )
    stats = oc.get_stats(state)
    assert int(stats["adagc/clipped_tensors"]) == 1
    with pytest.raises(ValueError, match="tree structure"):
        update({"a": jnp.ones(3)}, state)
    for bad in ({"clip_ratio": 0.0}, {"beta": 1.0}, {"warmup_steps": -1}):
        with pytest.raises(ValueError):
            oc.adagc(**bad)


def test_adagc_warmup_clip_of_a_huge_norm_keeps_direction():
    # The warm-up's global scale 1 / 3e38 is subnormal: multiplied into each
    # tensor's norm it flushed to 0 and zeroed the update.
    tx = oc.adagc(max_norm=1.0, warmup_steps=5)
    g = {"a": jnp.array([3e38, 0.0], jnp.float32), "b": jnp.array([1e37, 1e37])}
    out, state = jax.jit(tx.update)(g, tx.init(g))
    n = math.sqrt(9e76 + 2e74)
    np.testing.assert_allclose(out["a"], [3e38 / n, 0.0], rtol=1e-5)
    np.testing.assert_allclose(out["b"], [1e37 / n] * 2, rtol=1e-5)
    assert int(state.clip_stats.is_nonfinite) == 0


def test_adagc_reference_norms_as_a_tree():
    # The EMAs are one vector in leaf order; reference_norms maps them back.
    params = {"a": jnp.zeros(3), "b": {"c": jnp.zeros((2, 2)), "d": jnp.zeros(1)}}
    tx = oc.adagc(warmup_steps=1)
    state = tx.init(params)
    assert state.tensor_norm_ema.shape == (3,)
    assert state.tensor_norm_ema.dtype == jnp.float32
    g = {"a": jnp.full(3, 0.1), "b": {"c": jnp.full((2, 2), 0.2), "d": jnp.ones(1)}}
    _, state = jax.jit(tx.update)(g, state)
    tree = state.reference_norms(params)
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    # Warm-up step 1 (global norm sqrt(0.03 + 0.16 + 1) = 1.0909 > 1): every
    # gamma is its tensor's norm times the global scale 1 / 1.0909.
    h = 1 / math.sqrt(0.03 + 0.16 + 1.0)
    want = {"a": 0.1 * math.sqrt(3) * h, "b": {"c": 0.4 * h, "d": h}}
    chex.assert_trees_all_close(tree, want, rtol=1e-6)
    with pytest.raises(ValueError, match="2 leaves"):
        state.reference_norms({"a": 1.0, "b": 2.0})


# --------------------------------------------------------------------------
# A non-finite step never touches the adaptive statistics.
# --------------------------------------------------------------------------

FACTORIES = {
    "autoclip": lambda policy: oc.autoclip(10.0, 16, nonfinite=policy),
    "zclip": lambda policy: oc.zclip(warmup_steps=4, nonfinite=policy),
    "adagc": lambda policy: oc.adagc(warmup_steps=4, nonfinite=policy),
}


@pytest.mark.parametrize(
    "name,policy",
    [(name, "propagate") for name in FACTORIES] + [("autoclip", "zero_update")],
)
def test_nonfinite_step_leaves_statistics_alone(name, policy):
    tx = FACTORIES[name](policy)
    grads = jnp.asarray(norm_sequence(40, seed=7))[:, None] * jnp.ones((1, 3))
    bad = grads.at[20, 1].set(jnp.nan)
    clean = jnp.concatenate([grads[:20], grads[21:]])

    @jax.jit
    def run(seq):
        def body(state, g):
            out, state = tx.update(g, state)
            return state, out

        return jax.lax.scan(body, tx.init(seq[0]), seq)

    state_bad, out_bad = run(bad)
    _, out_ok = run(clean)
    # Every later step is handled exactly as if the bad step had not happened.
    np.testing.assert_array_equal(np.asarray(out_bad[21:]), np.asarray(out_ok[20:]))
    if policy == "propagate":
        assert not np.all(np.isfinite(np.asarray(out_bad[20])))
    else:
        np.testing.assert_array_equal(np.asarray(out_bad[20]), 0.0)
    stats = oc.get_stats(state_bad)
    assert int(stats[f"{name}/num_nonfinite"]) == 1
    assert not any(np.any(np.isnan(np.asarray(v))) for v in jax.tree.leaves(state_bad))


# --------------------------------------------------------------------------
# suggest_max_norm and the threshold-choosing example
# --------------------------------------------------------------------------


def test_suggest_max_norm():
    rng = np.random.default_rng(0)
    norms = np.concatenate([[80.0, 40.0, 20.0], 1.0 + 0.1 * rng.standard_normal(297)])
    norms[150] = np.nan
    s = oc.suggest_max_norm(norms, percentile=95.0, discard_first=0.1)
    kept = norms[30:]
    kept = kept[np.isfinite(kept)]
    assert s.max_norm == pytest.approx(np.percentile(kept, 95.0), rel=1e-12)
    assert (s.num_used, s.num_discarded, s.num_nonfinite) == (269, 30, 1)
    assert s.median == pytest.approx(np.median(kept))
    assert s.clip_fraction == pytest.approx(np.mean(kept > s.max_norm))
    assert "95th percentile" in s.explanation
    # Works on a JAX array straight from get_stats records.
    s2 = oc.suggest_max_norm(jnp.asarray(norms, jnp.float32), discard_first=0.0)
    assert s2.num_discarded == 0 and s2.num_nonfinite == 1
    for bad in ({"percentile": 120.0}, {"discard_first": 1.0}):
        with pytest.raises(ValueError):
            oc.suggest_max_norm(norms, **bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        oc.suggest_max_norm([np.nan, np.inf])
    # Norms are never negative: these are something else (losses, logs).
    with pytest.raises(ValueError, match="negative"):
        oc.suggest_max_norm([-1.0, -2.0, -3.0])


@pytest.mark.slow
def test_choose_threshold_example(capsys):
    example = load_example("choose_threshold")
    result = example.main(steps=120)
    printed = capsys.readouterr().out
    assert "max_norm=" in printed
    norms = np.asarray(result["recorded_norms"])
    assert norms.shape == (120,) and np.all(np.isfinite(norms))
    want = oc.suggest_max_norm(norms).max_norm
    assert result["max_norm"] == pytest.approx(want)
    assert 0.0 < result["clip_fraction"] < 0.5
    assert result["final_loss"] < result["initial_loss"]


# --------------------------------------------------------------------------
# The decide steps alone: norms in, thresholds and next state out (no pytree)
# --------------------------------------------------------------------------


def _scan_decide(decide, state, norms):
    def step(state, n):
        threshold, level, state = decide(state, n)
        return state, (threshold, level)

    return jax.tree.map(np.asarray, jax.lax.scan(jax.jit(step), state, norms)[1])


def test_decide_steps_match_the_references():
    norms = norm_sequence(800, seed=6)
    n = jnp.asarray(norms)
    # AutoClip: the level is the percentile of the history.
    state = oc.autoclip(50.0, 64).init(None)
    thr, level = _scan_decide(
        lambda s, x: _adaptive._autoclip_decide(s, x, True, 50.0, jnp.float32(np.inf)),
        state,
        n,
    )
    want, want_scale, _ = ref_autoclip(norms, 50.0, 64)
    np.testing.assert_allclose(level, want, rtol=RTOL)
    np.testing.assert_allclose(np.minimum(1, thr / norms), want_scale, rtol=RTOL)
    # ZClip: the spike level and the threshold a step is clipped to.
    hp = _adaptive._ZClipParams(
        *(jnp.float32(v) for v in (0.97, 2.5, 1.0, 1e-6)),
        warmup_steps=jnp.int32(25),
        cap=jnp.float32(np.inf),
    )
    config = _adaptive._ZClipConfig("zscore", "adaptive_scaling", False)
    state = oc.zclip().init(None)
    thr, level = _scan_decide(
        lambda s, x: _adaptive._zclip_decide(s, x, True, hp, config), state, n
    )
    ref = ref_zclip(norms)
    np.testing.assert_allclose(level, ref["level"], rtol=RTOL)
    np.testing.assert_allclose(np.minimum(1, thr / norms), ref["scale"], rtol=RTOL)
    # AdaGC: every tensor's threshold, on a vector of norms per step.
    per_tensor = np.stack([norms, 0.5 * norm_sequence(800, seed=7)], axis=1)
    hp = _adaptive._AdaGCParams(
        jnp.float32(1.0), jnp.float32(1.04), jnp.float32(0.99), jnp.int32(100)
    )
    state = oc.adagc().init({"a": jnp.zeros(1), "b": jnp.zeros(1)})

    def adagc_step(s, x):
        return _adaptive._adagc_decide(s, x, jnp.linalg.norm(x), True, hp)

    thr, _ = _scan_decide(adagc_step, state, jnp.asarray(per_tensor))
    want_scales, _, _ = ref_adagc(per_tensor)
    np.testing.assert_allclose(np.minimum(1, thr / per_tensor), want_scales, rtol=1e-4)
