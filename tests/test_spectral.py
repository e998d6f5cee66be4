"""clip_by_spectral_norm against NumPy's float64 SVD.

The contract suite (tests/test_contract.py) covers the default (hard) mode on
the shared trees; here: the estimate and the clip against ``numpy.linalg.svd``,
stacked leaves, the soft (SPECTRA) mode against an SVD of the same formula,
magnitudes from 1e-30 to 1e30, bf16, re-seeding after a change of row space,
the soft mode's own contract (jit, scan, zeros, meta-gradients, traced
thresholds, non-finite policy) and composition with optax.contrib.muon.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc


def spectrum_matrix(m, n, top, ratio=0.5, seed=0):
    """An ``m x n`` float64 matrix with singular values ``top * ratio**i``."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * (top * ratio ** np.arange(k))) @ v.T


def top_sv(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)[..., 0]


def soft_reference(g, c):
    """SPECTRA's map by SVD, in float64: sigma -> sigma / sqrt(1 + sigma^2/c^2)."""
    u, s, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return (u * (s / np.sqrt(1 + s**2 / c**2))[..., None, :]) @ vt


def run(tx, grads, steps, params=None):
    update = jax.jit(tx.update)
    state = tx.init(grads if params is None else params)
    for _ in range(steps):
        out, state = update(grads, state, params)
    return out, state


def test_estimate_and_hard_clip_match_svd_after_a_few_steps():
    # A matrix whose singular values halve (sigma_2 / sigma_1 = 0.5): each
    # power-iteration step shrinks the error of the estimate by about 4.
    g = spectrum_matrix(48, 32, top=7.0)
    stack = np.stack(
        [spectrum_matrix(24, 16, top=t, seed=s) for s, t in enumerate([0.5, 3.0, 9.0])]
    )
    grads = {"w": jnp.asarray(g, jnp.float32), "stack": jnp.asarray(stack, jnp.float32)}
    tx = oc.clip_by_spectral_norm(2.0)
    out, state = run(tx, grads, steps=6)
    stats = oc.get_stats(state)
    # The estimate: from below, within 1e-5 relative after 6 steps.
    np.testing.assert_allclose(
        stats["clip_by_spectral_norm/pre_clip_norm"], 9.0, rtol=1e-5
    )
    assert float(stats["clip_by_spectral_norm/pre_clip_norm"]) <= 9.0 * (1 + 1e-6)
    # The clip: G * min(1, c / sigma_max), matrix by matrix, as in float64.
    np.testing.assert_allclose(out["w"], g * 2.0 / 7.0, rtol=1e-5, atol=1e-6)
    want = stack * np.minimum(1.0, 2.0 / np.array([0.5, 3.0, 9.0]))[:, None, None]
    np.testing.assert_allclose(out["stack"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["stack"][0], grads["stack"][0])  # below: exact
    assert top_sv(out["w"]) <= 2.0 * (1 + 1e-5)
    assert np.all(top_sv(out["stack"]) <= 2.0 * (1 + 1e-5))
    assert int(state.clipped_matrices) == 3  # w and two of the stack
    np.testing.assert_allclose(state.matrix_clip_fraction, 3 / 4)
    # The state holds the top right-singular vectors (up to sign).
    v = np.linalg.svd(g)[2][0]
    assert abs(float(np.asarray(state.singular_vectors["w"]) @ v)) > 1 - 1e-5


def test_first_step_estimate_is_a_lower_bound():
    g = spectrum_matrix(40, 30, top=5.0, ratio=0.9, seed=3)
    tx = oc.clip_by_spectral_norm(1.0, power_iters=3)
    _, state = run(tx, {"w": jnp.asarray(g, jnp.float32)}, steps=1)
    est = float(state.clip_stats.pre_clip_norm)
    assert 0.9 * 5.0 < est <= 5.0 * (1 + 1e-6)


def test_a_gradient_orthogonal_to_the_estimate_is_still_measured():
    # Step 1 lives in columns 0..7, step 2 in columns 8..15: the warm start is
    # orthogonal to the new row space; the fixed vector mixed in finds it.
    a = np.zeros((12, 16))
    a[:, :8] = spectrum_matrix(12, 8, top=1.0, seed=1)
    b = np.zeros((12, 16))
    b[:, 8:] = spectrum_matrix(12, 8, top=100.0, seed=2)
    tx = oc.clip_by_spectral_norm(1.0, power_iters=2)
    update = jax.jit(tx.update)
    state = tx.init({"w": a})
    for _ in range(5):
        _, state = update({"w": jnp.asarray(a, jnp.float32)}, state)
    out, state = update({"w": jnp.asarray(b, jnp.float32)}, state)
    assert float(state.clip_stats.pre_clip_norm) > 0.9 * 100.0
    assert top_sv(out["w"]) < 1.2


@pytest.mark.parametrize(
    "dtype,big",
    [
        (jnp.float32, 1e30),
        (jnp.float32, 1e-30),
        (jnp.bfloat16, 1e30),
        (jnp.float16, 300.0),
    ],
)
def test_huge_and_tiny_matrices(dtype, big):
    g = spectrum_matrix(16, 8, top=1.0, seed=4) * big
    grads = {"w": jnp.asarray(g, dtype), "b": jnp.asarray(np.full(8, 0.1 * big), dtype)}
    tx = oc.clip_by_spectral_norm(0.5)
    out, state = run(tx, grads, steps=6)
    chex.assert_tree_all_finite((out, state))
    gin = np.asarray(grads["w"], np.float64)
    want = 0.5 if top_sv(gin) > 0.5 else top_sv(gin)
    np.testing.assert_allclose(
        top_sv(out["w"]), want, rtol=1e-2 if dtype != jnp.float32 else 1e-5
    )
    assert top_sv(out["w"]) <= 0.5 * (1 + 1e-5)  # rounded toward zero in bf16/fp16
    np.testing.assert_allclose(state.clip_stats.pre_clip_norm, top_sv(gin), rtol=1e-4)


def test_zero_matrices_and_zero_threshold():
    zeros = {
        "w": jnp.zeros((6, 4)),
        "stack": jnp.zeros((2, 3, 5), jnp.bfloat16),
        "b": jnp.zeros(3),
    }
    live = jax.tree.map(jnp.ones_like, zeros)
    static = ("mode", "power_iters", "ns_steps")
    for mode in ("hard", "soft"):
        # One compilation: the threshold is traced (1, then 0).
        tx = optax.inject_hyperparams(oc.clip_by_spectral_norm, static_args=static)(
            max_norm=1.0, mode=mode
        )
        update = jax.jit(tx.update)
        state = tx.init(zeros)
        for _ in range(2):
            out, state = update(zeros, state)
        chex.assert_trees_all_equal(out, zeros)
        chex.assert_tree_all_finite(state)
        vec = state.inner_state.singular_vectors["w"]
        np.testing.assert_allclose(jnp.linalg.norm(vec), 1.0, rtol=1e-6)
        state.hyperparams["max_norm"] = jnp.asarray(0.0, jnp.float32)
        out, state = update(live, state)
        chex.assert_trees_all_equal(out, zeros)
        assert update._cache_size() == 1


def test_soft_mode_matches_the_svd_of_the_same_formula():
    c = 2.0
    grads = {
        "wide": jnp.asarray(spectrum_matrix(12, 20, top=8.0, seed=5), jnp.float32),
        "tall": jnp.asarray(
            spectrum_matrix(30, 10, top=3.0, ratio=0.7, seed=6), jnp.float32
        ),
        "stack": jnp.asarray(
            np.stack([spectrum_matrix(8, 8, top=t, seed=7) for t in (0.1, 20.0)]),
            jnp.float32,
        ),
        "b": jnp.asarray([3.0, 4.0]),
    }
    tx = oc.clip_by_spectral_norm(c, mode="soft")
    out, state = run(tx, grads, steps=3)
    for name in ("wide", "tall", "stack"):
        want = soft_reference(grads[name], c)
        np.testing.assert_allclose(out[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
        assert np.all(top_sv(out[name]) < c)
    np.testing.assert_allclose(
        out["b"], np.array([3.0, 4.0]) / np.sqrt(1 + 25 / c**2), rtol=1e-6
    )
    # Statistics: the top singular value before, its image after.
    stats = oc.get_stats(state)
    np.testing.assert_allclose(
        stats["clip_by_spectral_norm/pre_clip_norm"], 20.0, rtol=1e-5
    )
    np.testing.assert_allclose(
        stats["clip_by_spectral_norm/post_clip_norm"],
        20.0 / np.sqrt(1 + 100),
        rtol=1e-5,
    )
    assert int(stats["clip_by_spectral_norm/clipped_matrices"]) == 3  # of 4 (sigma > c)


def test_soft_mode_bf16_and_huge_values():
    g = spectrum_matrix(16, 12, top=50.0, ratio=0.6, seed=8)
    for dtype, scale in ((jnp.bfloat16, 1.0), (jnp.float32, 1e28)):
        x = jnp.asarray(g * scale, dtype)
        out, _ = run(
            oc.clip_by_spectral_norm(scale, mode="soft", ns_steps=16), {"w": x}, steps=1
        )
        assert out["w"].dtype == dtype
        want = soft_reference(np.asarray(x, np.float64), scale)
        np.testing.assert_allclose(
            np.asarray(out["w"], np.float64), want, rtol=0, atol=2e-2 * scale
        )


def test_soft_mode_contract_jit_scan_gradients_and_traced_threshold():
    grads = {
        "w": jnp.asarray(spectrum_matrix(6, 4, top=5.0, seed=9), jnp.float32),
        "b": jnp.ones(3),
    }
    tx = oc.clip_by_spectral_norm(1.0, mode="soft")
    state0 = tx.init(grads)
    # The state is a stable scan carry.
    gs = jax.tree.map(lambda x: jnp.stack([x, 0 * x, 3 * x]), grads)
    state3, _ = jax.lax.scan(lambda s, g: tx.update(g, s)[::-1], state0, gs)
    chex.assert_trees_all_equal_shapes_and_dtypes(state3, state0)

    @jax.jit
    @jax.grad
    def grad_of_sum(g):
        return sum(jnp.sum(x) for x in jax.tree.leaves(tx.update(g, state0)[0]))

    for g in (jax.tree.map(jnp.zeros_like, grads), grads):
        chex.assert_tree_all_finite(grad_of_sum(g))
    # A traced threshold: one compilation, and the output follows it.
    itx = optax.inject_hyperparams(
        oc.clip_by_spectral_norm, static_args=("mode", "power_iters", "ns_steps")
    )(max_norm=1.0, mode="soft")
    update = jax.jit(itx.update)
    state = itx.init(grads)
    out_a, state = update(grads, state)
    state.hyperparams["max_norm"] = jnp.asarray(0.25, jnp.float32)
    out_b, state = update(grads, state)
    assert update._cache_size() == 1
    np.testing.assert_allclose(
        out_b["w"], soft_reference(grads["w"], 0.25), rtol=1e-4, atol=1e-6
    )
    assert top_sv(out_b["w"]) < 0.25 < top_sv(out_a["w"])


@pytest.mark.parametrize("policy", ["propagate", "zero_update"])
def test_soft_mode_nonfinite_policy(policy):
    grads = {"w": jnp.ones((4, 3)).at[1, 2].set(jnp.nan), "v": jnp.ones((3, 3))}
    tx = oc.clip_by_spectral_norm(1.0, mode="soft", nonfinite=policy)
    state0 = tx.init(grads)
    out, state = jax.jit(tx.update)(grads, state0)
    assert int(state.clip_stats.num_nonfinite) == 1
    # The bad matrix keeps its singular-vector estimate from the step before.
    chex.assert_trees_all_equal(
        state.singular_vectors["w"], state0.singular_vectors["w"]
    )
    if policy == "zero_update":
        chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, grads))
    else:
        assert bool(jnp.all(jnp.isnan(out["w"])))
        np.testing.assert_allclose(out["v"], soft_reference(grads["v"], 1.0), rtol=1e-4)


def test_leaf_options_vectors_and_higher_rank():
    kernel = jnp.asarray(
        spectrum_matrix(3 * 3 * 4, 5, top=6.0, seed=10).reshape(3, 3, 4, 5), jnp.float32
    )
    grads = {"kernel": kernel, "b": jnp.full(4, 10.0), "s": jnp.float32(-7.0)}
    out, state = run(
        oc.clip_by_spectral_norm(1.0, vectors="pass", higher_rank="flatten"),
        grads,
        steps=8,
    )
    np.testing.assert_array_equal(out["b"], grads["b"])
    np.testing.assert_array_equal(out["s"], grads["s"])
    np.testing.assert_allclose(
        top_sv(np.asarray(out["kernel"]).reshape(36, 5)), 1.0, rtol=1e-5
    )
    assert state.singular_vectors["kernel"].shape == (5,)
    assert state.singular_vectors["b"].shape == (0,)
    out, state = run(oc.clip_by_spectral_norm(1.0), grads, steps=1)
    assert state.singular_vectors["kernel"].shape == (3, 3, 5)  # 9 stacked 4x5 matrices
    np.testing.assert_allclose(out["b"], np.full(4, 0.5), rtol=1e-6)  # norm 20 -> 1
    np.testing.assert_allclose(out["s"], -1.0)


def test_bad_arguments_and_mismatched_trees_raise():
    for kw, err in [
        ({"mode": "svd"}, ValueError),
        ({"vectors": "clip"}, ValueError),
        ({"higher_rank": "last"}, ValueError),
        ({"power_iters": 0}, ValueError),
        ({"ns_steps": 1.5}, TypeError),
    ]:
        with pytest.raises(err):
            oc.clip_by_spectral_norm(1.0, **kw)
    tx = oc.clip_by_spectral_norm(1.0)
    state = tx.init({"w": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match="shape"):
        tx.update({"w": jnp.ones((3, 5))}, state)
    with pytest.raises(ValueError, match="leaves"):
        tx.update({"w": jnp.ones((3, 4)), "b": jnp.ones(2)}, state)


def test_composes_with_muon():
    params = {
        "w": jnp.asarray(spectrum_matrix(16, 8, top=1.0, seed=11), jnp.float32),
        "b": jnp.zeros(8),
    }
    grads = {
        "w": jnp.asarray(spectrum_matrix(16, 8, top=50.0, seed=12), jnp.float32),
        "b": jnp.ones(8),
    }
    muon = optax.contrib.muon(0.02)  # lr 0.02
    # Before muon: the gradient's spectrum is clipped before muon's momentum
    # (muon's orthogonalisation then sets the update's scale).
    before = optax.chain(oc.clip_by_spectral_norm(1.0), optax.contrib.muon(0.02))
    # After muon: the update's top singular value is bounded (here at 0.01);
    # muon's singular values are nearly equal, where the hard estimate
    # converges slowly (within 20 % here), and the soft clip is below c.
    hard = optax.chain(muon, oc.clip_by_spectral_norm(0.01, vectors="pass"))
    soft = optax.chain(
        muon, oc.clip_by_spectral_norm(0.01, mode="soft", vectors="pass")
    )
    out = {}
    for name, tx, bound in (
        ("before", before, None),
        ("hard", hard, 0.012),
        ("soft", soft, 0.01),
    ):
        updates, state = run(tx, grads, steps=3, params=params)
        chex.assert_tree_all_finite(updates)
        stats = oc.get_stats(state)
        assert stats["clip_by_spectral_norm/num_clipped"] == 3
        out[name] = updates
        if bound is not None:
            # Muon's update was above the threshold (the estimate is from
            # below), and the clipped one is at most the bound.
            assert stats["clip_by_spectral_norm/pre_clip_norm"] > 0.015
            assert top_sv(updates["w"]) <= bound
    # Muon's Adam branch (the vector) is passed untouched by both.
    np.testing.assert_array_equal(out["hard"]["b"], out["soft"]["b"])


def test_soft_mode_newton_schulz_convergence_far_above_the_threshold():
    # The docstring's numbers: singular values [s_max, 5, 1, 0.1], c = 1.
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((16, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((8, 4)))
    soft = {}
    for ns in (10, 16):
        tx = oc.clip_by_spectral_norm(1.0, mode="soft", ns_steps=ns)
        soft[ns] = (tx, jax.jit(tx.update))
    for top, steps, lowest in ((50.0, 10, (0.84, 0.86)), (100.0, 10, (0.5, 0.55))):
        s = np.array([top, 5.0, 1.0, 0.1])
        g = jnp.asarray((u * s) @ v.T, jnp.float32)
        ratios = {}
        for ns in (steps, 16):
            tx, update = soft[ns]
            out, _ = update({"w": g}, tx.init({"w": g}))
            got = np.linalg.svd(np.asarray(out["w"], np.float64), compute_uv=False)[:4]
            ratios[ns] = got / (s / np.sqrt(1 + s**2))
        assert lowest[0] < ratios[steps][3] < lowest[1]  # 15 % / half too small
        assert np.all(ratios[steps][:3] > ratios[steps][3])
        np.testing.assert_allclose(ratios[16], 1.0, rtol=1e-3)


def test_soft_mode_on_matrices_split_along_explicit_mesh_axes(n_devices):
    # Under jit the matrices may be sharded (here rows, and the last axis of a
    # stack, over 8 devices): the same numbers as unsharded, the same shardings.
    # (The hard mode: tests/test_distributed.py's sharded-jit run of the
    # registry's cases.)
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(13)
    grads = {
        "w": 5 * rng.standard_normal((16, 8)).astype(np.float32),
        "stack": rng.standard_normal((2, 16, 8)).astype(np.float32),
    }
    specs = {"w": P("data"), "stack": P(None, None, "data")}
    tx = oc.clip_by_spectral_norm(1.0, mode="soft")
    want, _ = run(tx, grads, steps=2)
    with jax.set_mesh(mesh):
        sharded = {
            k: jax.device_put(v, NamedSharding(mesh, specs[k]))
            for k, v in grads.items()
        }
        got, _ = run(tx, sharded, steps=2)
    for k in grads:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert got[k].sharding.is_equivalent_to(
            NamedSharding(mesh, specs[k]), 2 + (k == "stack")
        )
