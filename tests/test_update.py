"""Update clipping against NumPy float64 references and hand cases.

``clip_update_by_history`` against levanter's rule written in NumPy,
``clip_update_by_param_norm`` against per-leaf norms in float64, and
``stable_adamw`` against StableAdamW (Wortsman et al. 2023, as the authors'
``StableAdamWUnfused`` gist computes it, with the bias correction folded into
the decays) over several steps with a spike.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import optax_clip as oc
from optax_clip import _stats

# ---------------------------------------------------------------------------
# clip_update_by_history
# ---------------------------------------------------------------------------


def np_history(norms, window, sigma, min_history, cap=math.inf):
    """levanter's rule: (scale, threshold) per step; the window keeps raw norms."""
    kept, out = [], []
    for n in norms:
        if len(kept) >= max(min_history, 2):
            mean, std = np.mean(kept), np.std(kept)  # population std
            level = min(mean + sigma * max(std, 1e-6), cap)
        else:
            level = cap
        scale = 1.0 if n <= level else level / n
        out.append((scale, level))
        if np.isfinite(n):
            kept = (kept + [n])[-window:]
    return out


def _direction():
    rng = np.random.default_rng(0)
    d = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    n = reference.norm(list(d.values()))
    return {k: v / n for k, v in d.items()}


def test_history_matches_levanter_rule():
    rng = np.random.default_rng(1)
    norms = list(1.0 + 0.1 * rng.standard_normal(20))
    norms[3], norms[8], norms[9] = 9.0, np.nan, 40.0  # spikes and a NaN step
    norms[16:] = [5.0] * 4  # a lasting change of scale
    window, sigma, need = 6, 2.0, 3
    want = np_history(norms, window, sigma, need)
    tx = oc.clip_update_by_history(window, sigma, min_history=need)
    update, state = jax.jit(tx.update), tx.init(None)
    d = _direction()
    for i, (n, (scale, level)) in enumerate(zip(norms, want, strict=True)):
        g = {k: jnp.asarray(n * v, jnp.float32) for k, v in d.items()}
        out, state = update(g, state)
        s = state.clip_stats
        if not np.isfinite(n):
            assert not np.all(np.isfinite(np.asarray(out["w"]))), i
            assert int(s.is_nonfinite) == 1
            continue
        for k in d:
            np.testing.assert_allclose(out[k], n * d[k] * scale, rtol=2e-5, err_msg=i)
        np.testing.assert_allclose(s.clip_threshold, level, rtol=2e-5, err_msg=i)
        assert int(s.is_clipped) == int(scale < 1), i
    # The window holds the last 6 finite *unclipped* norms.
    finite = [n for n in norms if np.isfinite(n)][-window:]
    np.testing.assert_allclose(
        np.sort(state.update_norm_window), np.sort(finite), rtol=1e-5
    )
    assert int(state.update_window_len) == window
    # The 5.0 steps: clipped at first, accepted once the window fills with them.
    assert [w[0] < 1 for w in want[16:]] == [True, True, False, False]
    stats = oc.get_stats(state)
    assert int(stats["clip_update_by_history/num_nonfinite"]) == 1
    before = [n for n in norms[:-1] if np.isfinite(n)][-window:]  # the last test
    np.testing.assert_allclose(
        stats["clip_update_by_history/update_norm_std"], np.std(before), rtol=1e-5
    )


def test_history_traced_hyperparameters_and_cap():
    tx = optax.inject_hyperparams(oc.clip_update_by_history, static_args=("window",))(
        window=4, sigma=3.0, min_history=2
    )
    update, state = jax.jit(tx.update), tx.init(None)
    for n in [1.0, 1.0, 1.0]:
        out, state = update(jnp.array([n]), state)
    # sigma 3, std 0: the threshold is 1 + 3e-6.
    out, state = update(jnp.array([2.0]), state)
    np.testing.assert_allclose(out, [1.0 + 3e-6], rtol=1e-6)
    # A fixed cap is in force too.
    state.hyperparams["max_norm"] = jnp.asarray(0.5, jnp.float32)
    out, state = update(jnp.array([0.8]), state)
    np.testing.assert_allclose(out, [0.5], rtol=1e-6)
    # A traced sigma out of range: NaN update, the window left alone.
    window = state.inner_state.update_norm_window
    state.hyperparams["sigma"] = jnp.asarray(-1.0, jnp.float32)
    out, state = update(jnp.array([1.0]), state)
    assert np.isnan(float(out[0]))
    np.testing.assert_array_equal(state.inner_state.update_norm_window, window)
    assert update._cache_size() == 1


def test_history_rejects_bad_arguments():
    for kwargs, err in [
        ({"window": 1}, ValueError),
        ({"window": 2.5}, TypeError),
        ({"sigma": -1.0}, ValueError),
        ({"sigma": math.nan}, ValueError),
        ({"window": 8, "min_history": 9}, ValueError),
        ({"min_history": 1}, ValueError),
        ({"nonfinite": "skip"}, ValueError),
    ]:
        with pytest.raises(err):
            oc.clip_update_by_history(**kwargs)


# ---------------------------------------------------------------------------
# clip_update_by_param_norm
# ---------------------------------------------------------------------------


def _leaves(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
        "b": jnp.zeros(4, jnp.float32),  # a zero-initialised bias
        "h": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
        "e": jnp.zeros((0,), jnp.float32),
    }
    updates = {
        k: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype)
        for k, p in params.items()
    }
    return params, updates


@jax.jit
def _param_norm_step(ratio, updates, params):
    # The ratio traced: one compilation serves every ratio.
    tx = oc.clip_update_by_param_norm(ratio, 1e-3)
    return tx.update(updates, tx.init(params), params)


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.1, math.inf])
def test_param_norm_matches_numpy(ratio):
    params, updates = _leaves()
    eps = 1e-3
    out, state = _param_norm_step(jnp.float32(ratio), updates, params)
    limits, clipped = [], 0
    for k in params:
        u = np.asarray(updates[k], np.float64)
        p = np.asarray(params[k], np.float64)
        un, limit = reference.norm([u]), ratio * max(reference.norm([p]), eps)
        limit = 0.0 if ratio == 0 else limit
        scale = 1.0 if un <= limit else limit / un
        clipped += scale < 1
        limits.append(limit)
        rtol = 1e-2 if updates[k].dtype == jnp.bfloat16 else 2e-6
        np.testing.assert_allclose(
            np.asarray(out[k], np.float64), u * scale, rtol=rtol, atol=1e-30
        )
        assert out[k].dtype == updates[k].dtype
    assert int(state.param_clipped_tensors) == clipped
    np.testing.assert_allclose(
        state.clip_stats.clip_threshold, reference.norm([np.array(limits)]), rtol=1e-6
    )


def test_param_norm_zero_params_and_meta_gradients_are_finite():
    params = {"b": jnp.zeros(3)}
    tx = oc.clip_update_by_param_norm(0.1, min_param_norm=0.0)
    state = tx.init(params)

    def total(u, p):
        out, _ = tx.update(u, state, p)
        return jnp.sum(out["b"])

    u = {"b": jnp.array([1.0, -2.0, 0.5])}
    out, _ = jax.jit(tx.update)(u, state, params)
    np.testing.assert_array_equal(out["b"], 0.0)  # a zero parameter cannot move
    meta = jax.jit(jax.grad(total, argnums=(0, 1)))
    chex.assert_tree_all_finite(meta(u, params))
    chex.assert_tree_all_finite(meta({"b": jnp.zeros(3)}, params))


def test_param_norm_nonfinite_parameter_and_bad_params():
    params, updates = _leaves()
    params = dict(params, w=params["w"].at[0, 0].set(jnp.inf))
    tx = oc.clip_update_by_param_norm(0.1, nonfinite="zero_update")
    out, state = jax.jit(tx.update)(updates, tx.init(params), params)
    assert int(state.clip_stats.is_nonfinite) == 1
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, updates))
    tx = oc.clip_update_by_param_norm(0.1)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(updates, tx.init(params))
    with pytest.raises(ValueError, match="tree structure"):
        tx.update(updates, tx.init(params), {"w": params["w"]})
    with pytest.raises(ValueError, match="shape"):
        tx.update({"w": jnp.ones(3)}, tx.init(None), {"w": jnp.ones(4)})
    with pytest.raises(ValueError):
        oc.clip_update_by_param_norm(0.1, min_param_norm=math.inf)


# ---------------------------------------------------------------------------
# stable_adamw
# ---------------------------------------------------------------------------


def np_stable_adamw(params, grads, lr, b1, b2, eps, wd, d):
    """StableAdamW (the authors' gist) in float64: parameters and RMS per step."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    trajectory, rms_seen = [], []
    for t, g in enumerate(grads, start=1):
        b1h = b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)
        b2h = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        rms_t = {}
        for k in p:
            gk = np.asarray(g[k], np.float64)
            m[k] = b1h * m[k] + (1 - b1h) * gk
            v[k] = b2h * v[k] + (1 - b2h) * gk * gk
            rms = np.sqrt(np.mean(gk * gk / np.maximum(v[k], eps**2)))
            lr_t = lr / max(1.0, rms / d)
            # The gist: weight decay at the full learning rate.
            p[k] = p[k] * (1 - lr * wd) - lr_t * m[k] / (np.sqrt(v[k]) + eps)
            rms_t[k] = rms
        trajectory.append({k: x.copy() for k, x in p.items()})
        rms_seen.append(rms_t)
    return trajectory, rms_seen


def _adam_problem(steps=8, spike_at=5):
    rng = np.random.default_rng(2)
    params = {
        "w": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
        "z": jnp.zeros(3, jnp.float32),  # a leaf that never gets a gradient
    }
    grads = []
    for t in range(steps):
        g = {k: rng.standard_normal(np.shape(v)) for k, v in params.items()}
        g["z"] = np.zeros(3)
        if t == spike_at:
            g["w"] = 50.0 * g["w"]  # a spike in one tensor
        grads.append({k: jnp.asarray(v, jnp.float32) for k, v in g.items()})
    return params, grads


def _stable(max_rms):
    return oc.stable_adamw(
        0.01, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, max_rms=max_rms
    )


@jax.jit
def _stable_step(max_rms, p, s, g):
    # max_rms traced: one compilation serves every value.
    u, s = _stable(max_rms).update(g, s, p)
    return optax.apply_updates(p, u), s


@pytest.mark.parametrize("max_rms", [1.0, 0.5])
def test_stable_adamw_matches_numpy_paper_algorithm(max_rms):
    params, grads = _adam_problem()
    hp = {"lr": 0.01, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "wd": 0.1, "d": max_rms}
    want, rms_seen = np_stable_adamw(params, grads, **hp)
    p, s = params, _stable(max_rms).init(params)
    for t, g in enumerate(grads):
        p, s = _stable_step(jnp.float32(max_rms), p, s, g)
        for k in p:
            np.testing.assert_allclose(p[k], want[t][k], rtol=1e-5, atol=1e-6)
        top = max(rms_seen[t].values())
        np.testing.assert_allclose(s.max_moment_rms, top, rtol=1e-5)
        n_clipped = sum(r > max_rms for r in rms_seen[t].values())
        assert int(s.moment_clipped_tensors) == n_clipped
    # The spike step (t = 5) clipped "w"; the first step clips nothing.
    assert max(rms_seen[5].values()) > 2.0 and rms_seen[0]["w"] <= 1.0
    assert int(s.clip_stats.num_clipped) >= 1
    assert float(s.clip_stats.clip_threshold) == max_rms


def test_stable_adamw_without_clipping_is_optax_adamw_bit_for_bit():
    params, grads = _adam_problem(steps=3)
    ours = oc.stable_adamw(1e-2, weight_decay=0.1, max_rms=math.inf)
    theirs = optax.adamw(1e-2, weight_decay=0.1)
    s1, s2 = ours.init(params), theirs.init(params)
    # Its adam_state is optax.adamw's: a checkpoint loads into either.
    chex.assert_trees_all_equal_structs(s1.adam_state, s2)
    for g in grads:
        u1, s1 = jax.jit(ours.update)(g, s1, params)
        u2, s2 = jax.jit(theirs.update)(g, s2, params)
        chex.assert_trees_all_equal(u1, u2)
    chex.assert_trees_all_equal(s1.adam_state, s2)


def test_stable_adamw_zero_gradients_threshold_zero_and_traced_hyperparams():
    params, grads = _adam_problem(steps=2)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = oc.stable_adamw(0.1, weight_decay=0.0)
    update = jax.jit(tx.update)
    out, _ = update(zeros, tx.init(params), params)
    chex.assert_trees_all_equal(out, zeros)  # zeros, never NaN
    # A gradient whose square overflows float32: v is inf there, as in optax;
    # the ratio is 0, never NaN, and the step is AdamW's.
    huge = dict(grads[0], w=grads[0]["w"].at[0, 0].set(1e30))
    out, state = update(huge, tx.init(params), params)
    ref, _ = optax.adamw(0.1, weight_decay=0.0).update(
        huge, optax.adamw(0.1, weight_decay=0.0).init(params), params
    )
    chex.assert_trees_all_close(out, ref, rtol=1e-6)
    assert int(state.clip_stats.is_nonfinite) == 0
    tx = optax.inject_hyperparams(oc.stable_adamw)(
        learning_rate=0.1, weight_decay=0.0, max_rms=1.0
    )
    update, state = jax.jit(tx.update), tx.init(params)
    _, state = update(grads[0], state, params)
    state.hyperparams["max_rms"] = jnp.asarray(0.0, jnp.float32)
    out, state = update(grads[1], state, params)
    # max_rms = 0: no step along Adam's direction (the weight decay, 0 here,
    # would remain).
    chex.assert_trees_all_equal(out, zeros)
    chex.assert_tree_all_finite(out)
    assert update._cache_size() == 1
    stats = oc.get_stats(state)
    assert int(stats["stable_adamw/moment_clipped_tensors"]) == 2  # not "z"
    with pytest.raises(ValueError):
        oc.stable_adamw(0.1, max_rms=-1.0)


def test_stable_adamw_reports_its_documented_keys():
    params, grads = _adam_problem(steps=1)
    tx = oc.stable_adamw(0.1)
    _, state = jax.jit(tx.update)(grads[0], tx.init(params), params)
    stats = oc.get_stats(state)
    keys = _stats.stats_keys(oc.StableAdamWState)
    assert {k.split("/", 1)[1] for k in stats} == set(keys)
    for key in keys:
        assert f"``{key}``" in oc.get_stats.__doc__, key
    # Its field names are distinct from optax's and each other (optax.tree.get).
    for name in ("clip_stats", "adam_state", "moment_clipped_tensors", "nu"):
        optax.tree.get(state, name)


def test_stable_adamw_nonfinite_raise_names_the_leaf():
    params, grads = _adam_problem(steps=1)
    tx = oc.stable_adamw(0.01, nonfinite="raise")
    update, state = jax.jit(tx.update), tx.init(params)
    chex.assert_tree_all_finite(update(grads[0], state, params)[0])
    bad = dict(grads[0], b=grads[0]["b"].at[0].set(jnp.nan))
    text = r"optax_clip\.stable_adamw\(nonfinite='raise'\).* 1 of 3 leaves: \['b'\]"
    with pytest.raises(Exception, match=text):
        jax.block_until_ready(update(bad, state, params))
    # The other policies: the step is flagged; zero_update zeroes it.
    for policy in ("propagate", "zero_update"):
        tx = oc.stable_adamw(0.01, nonfinite=policy)
        out, state = jax.jit(tx.update)(bad, tx.init(params), params)
        assert int(state.clip_stats.is_nonfinite) == 1, policy
        if policy == "zero_update":
            chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, out))
        else:
            assert np.all(np.isnan(out["b"])) and np.all(np.isfinite(out["w"]))


def test_stable_adamw_under_skip_nonfinite_keeps_the_moments():
    params, grads = _adam_problem(steps=4, spike_at=-1)
    tx = oc.skip_nonfinite(oc.stable_adamw(0.01, weight_decay=0.1))
    plain = oc.stable_adamw(0.01, weight_decay=0.1)
    bad = dict(grads[2], b=grads[2]["b"].at[0].set(jnp.nan))
    s, sp = tx.init(params), plain.init(params)
    guarded, unguarded = jax.jit(tx.update), jax.jit(plain.update)
    for g in [grads[0], grads[1], bad, grads[3]]:
        u, s = guarded(g, s, params)
        if g is not bad:
            up, sp = unguarded(g, sp, params)
            chex.assert_trees_all_close(u, up, rtol=1e-6)
        else:
            chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
    chex.assert_trees_all_equal(s.guarded_state.adam_state, sp.adam_state)
    assert int(oc.get_stats(s)["skip_nonfinite/skipped_steps"]) == 1


# ---------------------------------------------------------------------------
# Sharded leaves: each tensor's RMS is that of the whole tensor
# ---------------------------------------------------------------------------


def test_stable_adamw_of_sharded_leaves_matches_unsharded(n_devices):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((n_devices,), ("data",))
    rng = np.random.default_rng(4)
    params = {
        "w": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
    }
    grads = {k: jnp.asarray(0.5 * v) for k, v in params.items()}
    grads["w"] = grads["w"].at[:2].set(0.0)  # one shard has no gradient
    specs = {"w": P("data"), "b": P()}
    # max_rms 0.5: the first step's RMS (at most 1) is clipped.
    tx = oc.stable_adamw(0.1, max_rms=0.5)
    want, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    stx = oc.stable_adamw(0.1, max_rms=0.5, axis_name="data")
    state = stx.init(params)
    state_specs = jax.tree.map(
        lambda x: P("data") if np.shape(x) == (16, 4) else P(), state
    )

    def put(tree, tree_specs):
        return jax.tree.map(
            lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, tree_specs
        )

    step = jax.jit(
        jax.shard_map(
            stx.update,
            mesh=mesh,
            in_specs=(specs, state_specs, specs),
            out_specs=(specs, state_specs),
        )
    )
    got, state = step(put(grads, specs), put(state, state_specs), put(params, specs))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    # Shard-local RMS (1 for the shards with a gradient instead of sqrt(14/16)
    # for the whole of w) would scale them by 0.5 instead of 0.53.
    np.testing.assert_allclose(state.max_moment_rms, 1.0, rtol=1e-5)  # b's
    assert int(state.moment_clipped_tensors) == 2
