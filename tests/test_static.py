"""Fixed-threshold clipping against NumPy float64 references and hand cases."""

import functools
import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from hypothesis import example, given, settings
from hypothesis import strategies as st

import optax_clip as oc

P_TYPES = [1.0, 2.0, np.inf]
NORM_ARG = {1.0: "l1", 2.0: "l2", np.inf: "inf"}


def np_norm(leaves, p):
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    return float(np.linalg.norm(flat, ord=p)) if flat.size else 0.0


def ref_global_clip(leaves, c, p):
    n = np_norm(leaves, p)
    s = 1.0 if n <= c else c / n
    return [np.asarray(x, np.float64) * s for x in leaves]


def sample(seed, scale):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(scale * rng.normal(size=(5, 4)), jnp.float32),
        "b": jnp.asarray(scale * rng.normal(size=(4,)), jnp.float32),
    }


@functools.cache
def jitted_update(factory, **kwargs):
    tx = factory(**kwargs)
    return tx, jax.jit(tx.update)


# ---------------------------------------------------------------------------
# clip_by_global_norm
# ---------------------------------------------------------------------------


def test_worked_example_from_the_literature():
    # [3, 4, 5] has norm sqrt(50) = 5 sqrt(2); with threshold 5 it is divided by
    # sqrt(2).
    tx = oc.clip_by_global_norm(5.0)
    g = jnp.array([3.0, 4.0, 5.0])
    out, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(out, np.array([3.0, 4.0, 5.0]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(state.clip_stats.pre_clip_norm, np.sqrt(50), rtol=1e-6)
    np.testing.assert_allclose(state.clip_stats.post_clip_norm, 5.0, rtol=1e-6)
    np.testing.assert_allclose(state.clip_stats.clip_scale, 1 / np.sqrt(2), rtol=1e-6)


@pytest.mark.parametrize("p", P_TYPES)
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_global_norm_matches_numpy(p, scale):
    g = sample(0, scale)
    _, update = jitted_update(
        oc.clip_by_global_norm, max_norm=2.0, norm_type=NORM_ARG[p]
    )
    tx = oc.clip_by_global_norm(2.0, NORM_ARG[p])
    out, state = update(g, tx.init(g))
    want = ref_global_clip([g["b"], g["w"]], 2.0, p)
    np.testing.assert_allclose(out["b"], want[0], rtol=1e-5)
    np.testing.assert_allclose(out["w"], want[1], rtol=1e-5)
    s = state.clip_stats
    n = np_norm(jax.tree.leaves(g), p)
    np.testing.assert_allclose(s.pre_clip_norm, n, rtol=1e-5)
    np.testing.assert_allclose(s.post_clip_norm, min(n, 2.0), rtol=1e-5)
    np.testing.assert_allclose(
        s.post_clip_norm, np_norm(jax.tree.leaves(out), p), rtol=1e-5
    )
    assert int(s.is_clipped) == int(n > 2.0)


def test_threshold_equal_to_norm_is_identity():
    g = jnp.array([3.0, 4.0])
    tx = oc.clip_by_global_norm(5.0)
    out, state = tx.update(g, tx.init(g))
    chex.assert_trees_all_equal(out, g)
    assert int(state.clip_stats.is_clipped) == 0


def test_overflowing_float32_is_clipped_not_zeroed():
    # optax and PyTorch return all zeros here (the norm overflows to inf).
    g = {"a": jnp.array([1e30, 1.0], jnp.float32), "b": jnp.array([3.0, 4.0])}
    tx = oc.clip_by_global_norm(1.0)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(out["a"], [1.0, 1e-30], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [3e-30, 4e-30], rtol=1e-6)
    np.testing.assert_allclose(state.clip_stats.pre_clip_norm, 1e30, rtol=1e-6)
    assert int(state.clip_stats.is_nonfinite) == 0
    optax_out, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    assert float(jnp.max(jnp.abs(optax_out["a"]))) == 0.0  # what we fix


def test_overflow_near_float_max_needs_split_scale():
    # The scale 1/3.16e38 is subnormal in float32 (flushed to 0 on CPU); the
    # scale is applied as two normal factors.
    g = jnp.array([1e38, -3e38, 1.0], jnp.float32)
    tx = oc.clip_by_global_norm(1.0)
    out, _ = jax.jit(tx.update)(g, tx.init(g))
    want = np.array([1e38, -3e38, 1.0]) / np.hypot(1e38, 3e38)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-30)


def test_scale_below_the_normal_range_keeps_statistics_and_direction():
    # Clipping a norm of 3e38 to 1 needs a scale of 3.3e-39 (subnormal): the
    # update is right, and the statistics do not read like a zeroed step.
    tx = oc.clip_by_global_norm(1.0)
    out, state = jax.jit(tx.update)(jnp.array([3e38], jnp.float32), tx.init(None))
    np.testing.assert_allclose(out, [1.0], rtol=1e-6)
    s = state.clip_stats
    np.testing.assert_allclose(s.post_clip_norm, 1.0, rtol=1e-6)
    assert float(s.clip_scale) == np.finfo(np.float32).tiny  # not 0
    assert int(s.is_clipped) == 1 and int(s.is_nonfinite) == 0


@pytest.mark.parametrize("c", [1e-20, 1e-30, 1e-36])
def test_tiny_threshold_on_a_huge_norm(c):
    # The scale c / 3.2e38 is far below the float32 range; neither of the two
    # factors it is applied as may underflow.
    g = jnp.array([3e38, -1e38, 1e30], jnp.float32)
    tx = oc.clip_by_global_norm(c)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    want = np.array([3e38, -1e38, 1e30]) * (c / np.linalg.norm([3e38, 1e38, 1e30]))
    # Results below the normal range are flushed to 0 (XLA:CPU, like GPUs).
    tiny = np.finfo(np.float32).tiny
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=tiny)
    np.testing.assert_allclose(state.clip_stats.post_clip_norm, c, rtol=1e-5)


def test_what_optax_and_torch_do_on_overflow():
    # The README's first row: optax zeroes the update on float32 1e20 and on
    # fp16 300; PyTorch's clip_grad_norm_ (when installed) on float32 1e20.
    g32 = jnp.array([1e20, 1.0], jnp.float32)
    g16 = jnp.array([300.0, 1.0], jnp.float16)
    for g in (g32, g16):
        theirs, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
        assert not np.any(np.asarray(theirs, np.float32))
        ours, _ = oc.clip_by_global_norm(1.0).update(
            g, oc.clip_by_global_norm(1.0).init(g)
        )
        assert float(np.linalg.norm(np.asarray(ours, np.float64))) > 0.99
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1e20, 1.0], dtype=torch.float32)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert not torch.any(p.grad != 0)


def test_fp16_overflow_is_clipped():
    g = jnp.array([300.0, 1.0], jnp.float16)  # 300**2 > 65504
    tx = oc.clip_by_global_norm(1.0)
    out, _ = jax.jit(tx.update)(g, tx.init(g))
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float64), [1.0, 1 / 300], rtol=2e-3)
    assert np_norm([out], 2) <= 1.0


def test_bf16_clipped_norm_never_exceeds_bound():
    # Rounding to nearest would overshoot by up to 0.4%; we round toward zero.
    tree = [jnp.ones((1,), jnp.bfloat16) for _ in range(40)]
    tx = oc.clip_by_global_norm(1.0)
    out, _ = jax.jit(tx.update)(tree, tx.init(tree))
    n = np_norm(out, 2)
    assert 0.99 < n <= 1.0
    plain = [np.float64(jnp.asarray(1 / np.sqrt(40), jnp.bfloat16))] * 40
    assert np_norm(plain, 2) > 1.0  # round-to-nearest would overshoot


def test_mixed_dtypes_keep_their_dtype():
    g = {"a": jnp.ones((3,), jnp.bfloat16) * 10, "b": jnp.ones((2,), jnp.float32) * 10}
    tx = oc.clip_by_global_norm(1.0)
    out, state = tx.update(g, tx.init(g))
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    np.testing.assert_allclose(state.clip_stats.pre_clip_norm, np.sqrt(500), rtol=1e-6)


def test_float64_inputs_under_x64():
    with jax.enable_x64(True):
        g = jnp.asarray([1e200, 1e200], jnp.float64)
        tx = oc.clip_by_global_norm(1.0)
        out, _ = tx.update(g, tx.init(g))
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, [2**-0.5, 2**-0.5], rtol=1e-12)


def test_block_norm_mixed_float64_and_float32_leaves_under_x64():
    # The per-leaf scales are computed on one float64 vector; the float32
    # leaf keeps its dtype and gets its own (float32-exact) scale.
    with jax.enable_x64(True):
        g = {
            "a": jnp.asarray([3e200, 4e200], jnp.float64),
            "b": jnp.asarray([3.0, 4.0], jnp.float32),
            "c": jnp.asarray([0.3, 0.4], jnp.float32),
        }
        tx = oc.clip_by_block_norm(1.0)
        out, state = jax.jit(tx.update)(g, tx.init(g))
        assert out["a"].dtype == jnp.float64 and out["b"].dtype == jnp.float32
        np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-12)
        np.testing.assert_allclose(out["b"], [0.6, 0.8], rtol=1e-6)
        np.testing.assert_array_equal(out["c"], g["c"])
        # Stats are float32 (a fixed state dtype): 5e200 is recorded as Inf.
        np.testing.assert_allclose(
            state.clip_stats.post_clip_norm, math.sqrt(2.25), rtol=1e-6
        )


def test_block_norm_threshold_keeps_float64_range():
    # A float64 threshold of 1e300 is not rounded to float32 (inf).
    with jax.enable_x64(True):
        g = {"a": jnp.asarray([3e305, 4e305], jnp.float64)}
        tx = oc.clip_by_block_norm(1e300)
        out, _ = jax.jit(tx.update)(g, tx.init(g))
        np.testing.assert_allclose(out["a"], [6e299, 8e299], rtol=1e-12)


def test_max_norm_inf_records_stats_but_never_clips():
    g = sample(1, 1e6)
    tx = oc.clip_by_global_norm(np.inf)
    out, state = tx.update(g, tx.init(g))
    chex.assert_trees_all_equal(out, g)
    np.testing.assert_allclose(
        state.clip_stats.pre_clip_norm, np_norm(jax.tree.leaves(g), 2), rtol=1e-5
    )


def test_meta_gradient_matches_numpy_finite_differences():
    # d/dx sum(clip(x)) for x = [3, 4], c = 1: f(x) = (x1 + x2) / |x|.
    x = jnp.array([3.0, 4.0])
    tx = oc.clip_by_global_norm(1.0)
    grad = jax.grad(lambda v: jnp.sum(tx.update(v, tx.init(v))[0]))(x)
    n = 5.0
    want = np.array([1 / n - 7 * 3 / n**3, 1 / n - 7 * 4 / n**3])
    np.testing.assert_allclose(grad, want, rtol=1e-5)


def test_counts_accumulate_and_saturate():
    tx = oc.clip_by_global_norm(1.0)
    state = tx.init(None)
    update = jax.jit(tx.update)
    for g in [
        jnp.array([3.0]),
        jnp.array([0.5]),
        jnp.array([jnp.nan]),
        jnp.array([9.0]),
    ]:
        _, state = update(g, state)
    s = state.clip_stats
    assert (int(s.num_updates), int(s.num_clipped), int(s.num_nonfinite)) == (4, 2, 1)
    big = jnp.iinfo(jnp.int32).max
    s = s._replace(num_updates=jnp.int32(big), num_clipped=jnp.int32(big))
    _, state = update(jnp.array([9.0]), state._replace(clip_stats=s))
    assert int(state.clip_stats.num_updates) == big
    assert int(state.clip_stats.num_clipped) == big


# ---------------------------------------------------------------------------
# clip_by_block_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", P_TYPES)
def test_block_norm_matches_numpy(p):
    g = {"w": sample(2, 3.0)["w"], "b": jnp.array([0.1, 0.2, -0.1, 0.0])}
    tx = oc.clip_by_block_norm(1.0, NORM_ARG[p])
    out, state = jax.jit(tx.update)(g, tx.init(g))
    for k in g:
        want = ref_global_clip([g[k]], 1.0, p)[0]
        np.testing.assert_allclose(out[k], want, rtol=1e-5)
    s = state.clip_stats
    np.testing.assert_allclose(
        s.pre_clip_norm, np_norm(jax.tree.leaves(g), p), rtol=1e-5
    )
    np.testing.assert_allclose(
        s.post_clip_norm, np_norm(jax.tree.leaves(out), p), rtol=1e-5
    )
    scales = [min(1.0, 1.0 / np_norm([g[k]], p)) for k in g]
    np.testing.assert_allclose(s.clip_scale, min(scales), rtol=1e-5)


def test_block_norm_nonfinite_leaf_is_isolated_under_propagate():
    g = {"bad": jnp.array([jnp.nan, 1.0]), "ok": jnp.array([3.0, 4.0])}
    tx = oc.clip_by_block_norm(1.0)
    out, state = tx.update(g, tx.init(g))
    assert bool(jnp.all(jnp.isnan(out["bad"])))
    np.testing.assert_allclose(out["ok"], [0.6, 0.8], rtol=1e-6)
    assert int(state.clip_stats.num_nonfinite) == 1
    tx = oc.clip_by_block_norm(1.0, nonfinite="zero_update")
    out, _ = tx.update(g, tx.init(g))
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, g))


def test_block_norm_zero_leaf_and_overflow_leaf_together():
    # Zero leaves send the per-leaf norms through the rescaled pass; results
    # must not change.
    g = {"z": jnp.zeros(3), "big": jnp.array([3e30, 4e30]), "s": jnp.array([0.3, 0.4])}
    tx = oc.clip_by_block_norm(1.0)
    out, _ = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(out["big"], [0.6, 0.8], rtol=1e-6)
    chex.assert_trees_all_equal(out["s"], g["s"])
    chex.assert_trees_all_equal(out["z"], g["z"])


# ---------------------------------------------------------------------------
# clip_by_value
# ---------------------------------------------------------------------------


def test_value_clip_symmetric_and_stats():
    g = {"a": jnp.array([-3.0, 0.5, 2.0]), "b": jnp.array([[0.1, -0.2]])}
    tx = oc.clip_by_value(1.0)
    out, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(out["a"], [-1.0, 0.5, 1.0])
    chex.assert_trees_all_equal(out["b"], g["b"])
    s = state.clip_stats
    assert float(s.pre_clip_norm) == 3.0 and float(s.post_clip_norm) == 1.0
    np.testing.assert_allclose(s.clip_scale, 1 / 3, rtol=1e-6)
    assert int(s.is_clipped) == 1 and float(s.clip_threshold) == 1.0


def test_value_clip_asymmetric():
    g = jnp.array([-3.0, -0.05, 0.5, 2.0])
    tx = oc.clip_by_value(min_value=-0.1, max_value=1.0)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(out, np.clip(np.asarray(g), -0.1, 1.0))
    assert float(state.clip_stats.pre_clip_norm) == 3.0
    assert float(state.clip_stats.post_clip_norm) == 1.0  # max(|-0.1|, |1.0|)
    # Only the lower bound is active here.
    out, state = tx.update(jnp.array([-0.5, 0.2]), tx.init(g))
    np.testing.assert_allclose(out, [-0.1, 0.2])
    assert int(state.clip_stats.is_clipped) == 1


def test_value_clip_nonfinite_passes_through_under_propagate():
    g = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 5.0])
    tx = oc.clip_by_value(1.0)
    out, state = tx.update(g, tx.init(g))
    assert bool(jnp.isnan(out[0])) and out[1] == jnp.inf and out[2] == -jnp.inf
    assert float(out[3]) == 1.0
    assert int(state.clip_stats.is_nonfinite) == 1
    # optax.clip turns Inf into the bound, hiding it:
    np.testing.assert_array_equal(optax.clip(1.0).update(g, None)[0][1:], [1, -1, 1])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bound", [0.3, 0.1, 1 / 3])
def test_value_clip_never_exceeds_its_bounds_in_16_bits(dtype, bound):
    # Rounded to nearest, a bf16 bound of 0.3 is 0.30078125.
    g = jnp.array([5.0, -5.0, 0.0], dtype)
    for tx in (
        oc.clip_by_value(bound),
        oc.clip_by_value(min_value=-bound, max_value=bound),
    ):
        out = np.asarray(jax.jit(tx.update)(g, tx.init(g))[0], np.float64)
        assert np.all(np.abs(out) <= bound)
        assert np.all(np.abs(out[:2]) > bound * (1 - 2**-7))  # the closest inside


def test_value_clip_bounds_beyond_the_dtype_range_saturate():
    g = jnp.array([1.0, -1.0, 60000.0], jnp.float16)
    tx = oc.clip_by_value(min_value=1e5, max_value=1e6)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_array_equal(out, [65504.0] * 3)  # not inf
    assert int(state.clip_stats.is_nonfinite) == 0
    tx = oc.clip_by_value(1e6)
    out, _ = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_array_equal(out, g)


def test_value_clip_argument_errors():
    with pytest.raises(ValueError, match="either"):
        oc.clip_by_value()
    with pytest.raises(ValueError, match="either"):
        oc.clip_by_value(1.0, min_value=0.0, max_value=1.0)
    with pytest.raises(ValueError, match="both"):
        oc.clip_by_value(min_value=0.0)
    with pytest.raises(ValueError, match="<="):
        oc.clip_by_value(min_value=1.0, max_value=0.0)
    with pytest.raises(ValueError, match="NaN"):
        oc.clip_by_value(min_value=float("nan"), max_value=0.0)


# ---------------------------------------------------------------------------
# soft_clip_by_global_norm
# ---------------------------------------------------------------------------


def soft_ref(n, c, k):
    tau = k * c
    if n <= tau:
        return n
    return tau + (c - tau) * (1 - np.exp(-(n - tau) / (c - tau)))


@pytest.mark.parametrize("knee", [0.0, 0.5, 0.9])
def test_soft_clip_matches_formula_monotone_continuous_bounded(knee):
    tx = oc.soft_clip_by_global_norm(2.0, knee=knee)
    update = jax.jit(tx.update)
    state = tx.init(None)
    direction = np.array([0.6, -0.8])
    norms = np.concatenate([np.linspace(0, 10, 401), [1e3, 1e30]])
    outs = []
    for n in norms:
        out, _ = update(jnp.asarray(direction * n, jnp.float32), state)
        outs.append(np.linalg.norm(np.asarray(out, np.float64)))
        if n > 0:  # direction preserved
            np.testing.assert_allclose(np.asarray(out) / outs[-1], direction, rtol=1e-5)
    outs = np.array(outs)
    want = np.array([soft_ref(n, 2.0, knee) for n in norms])
    np.testing.assert_allclose(outs, want, rtol=1e-5, atol=1e-6)
    assert np.all(outs <= 2.0 * (1 + 1e-6))  # never above max_norm
    assert np.all(np.diff(outs[:401]) >= -1e-6)  # monotone
    assert np.max(np.abs(np.diff(outs[:401]))) <= 10 / 400 * (1 + 1e-4)  # 1-Lipschitz
    assert outs[-1] == pytest.approx(2.0, rel=1e-6)  # saturates


def test_soft_clip_derivative_continuous_at_knee():
    c, k = 1.0, 0.5
    tx = oc.soft_clip_by_global_norm(c, knee=k)
    state = tx.init(None)

    def out_norm(n):
        return jnp.linalg.norm(tx.update(jnp.array([n, 0.0]), state)[0])

    below, above = jax.grad(out_norm)(0.5 - 1e-4), jax.grad(out_norm)(0.5 + 1e-4)
    np.testing.assert_allclose([below, above], [1.0, 1.0], atol=1e-3)


@pytest.mark.parametrize("c", [1e38, 2e38, 3e38])
def test_soft_clip_with_a_huge_concrete_threshold_under_jit(c):
    # XLA turns a division by a constant into a product with its reciprocal,
    # subnormal (0) above 8.5e37; eager and traced thresholds were right.
    g = jnp.array([3.4e38, 0.0], jnp.float32)
    tx = oc.soft_clip_by_global_norm(c, knee=0.0)
    want = soft_ref(3.4e38, c, 0.0)
    for update in (tx.update, jax.jit(tx.update)):
        out, _ = update(g, tx.init(g))
        np.testing.assert_allclose(out, [want, 0.0], rtol=1e-5)


def test_soft_clip_rejects_bad_knee():
    for knee in (-0.1, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError):
            oc.soft_clip_by_global_norm(1.0, knee=knee)


# ---------------------------------------------------------------------------
# Construction errors shared by all static transforms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [oc.clip_by_global_norm, oc.clip_by_block_norm, oc.soft_clip_by_global_norm],
)
def test_construction_errors(factory):
    with pytest.raises(ValueError, match=">= 0"):
        factory(-1.0)
    with pytest.raises(ValueError, match="NaN"):
        factory(float("nan"))
    with pytest.raises(ValueError, match="scalar"):
        factory(np.ones(3))
    with pytest.raises(TypeError, match="schedule"):
        factory(optax.constant_schedule(1.0))
    with pytest.raises(TypeError):
        factory("1.0")
    with pytest.raises(ValueError, match="norm_type"):
        factory(1.0, norm_type=3)
    with pytest.raises(ValueError, match="nonfinite"):
        factory(1.0, nonfinite="ignore")
    factory(jnp.asarray(1.0))  # a concrete JAX scalar is fine
    factory(np.float32(1.0))


# ---------------------------------------------------------------------------
# Property tests (hypothesis): global-norm clipping
# ---------------------------------------------------------------------------

FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
_CLIP = {}


def _clip(c, values):
    key = values.shape
    if key not in _CLIP:
        tx = oc.clip_by_global_norm(1.0)
        _CLIP[key] = jax.jit(
            lambda c, v: oc.clip_by_global_norm(c).update(v, tx.init(v))[0]
        )
    return _CLIP[key](jnp.float32(c), values)


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(np.float32, st.sampled_from([(3,), (4, 2)]), elements=FINITE),
    c=st.floats(0.0009765625, 16384.0, width=32),
)
# Subnormal values below the threshold (XLA:CPU flushes them in x * 1).
@example(values=np.full((3,), 1e-45, np.float32), c=1.0)
def test_property_global_norm_clip(values, c):
    g = jnp.asarray(values)
    out = np.asarray(_clip(c, g), np.float64)
    n = np.linalg.norm(values.astype(np.float64))
    # Never above the bound.
    assert np.linalg.norm(out) <= c * (1 + 1e-6)
    if n <= c * (1 - 1e-6):  # below: exactly unchanged
        np.testing.assert_array_equal(out, values)
    if n > 0 and np.linalg.norm(out) > 0:  # direction preserved
        cos = (
            out.ravel() @ values.ravel().astype(np.float64) / (np.linalg.norm(out) * n)
        )
        assert cos > 1 - 1e-6
    # Idempotent: clipping twice equals clipping once.
    twice = np.asarray(_clip(c, jnp.asarray(out, jnp.float32)), np.float64)
    np.testing.assert_allclose(twice, out, rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------------------
# Property tests (hypothesis): mixed-dtype trees under jax_enable_x64
# ---------------------------------------------------------------------------

# float64 leaves beside float32, bf16 and fp16 ones: all-zero leaves, tiny
# values (squares underflow) and huge ones (squares overflow), thresholds
# from far below to far above the norm.
MIXED = [np.float64, np.float32, jnp.bfloat16, np.float16]
MAGNITUDES = {  # (tiny, huge) powers of ten per dtype, inside its normal range
    np.float64: (-300, 305),
    np.float32: (-36, 37),
    jnp.bfloat16: (-36, 37),
    np.float16: (-4, 4),
}


@st.composite
def mixed_trees(draw):
    leaves = {}
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(MIXED))
        shape = draw(st.sampled_from([(1,), (3,), (2, 2)]))
        kind = draw(st.sampled_from(["zero", "unit", "tiny", "huge"]))
        mant = draw(hnp.arrays(np.float64, shape, elements=st.floats(-9.9, 9.9)))
        tiny, huge = MAGNITUDES[dtype]
        exp = {"zero": None, "unit": 0, "tiny": tiny, "huge": huge}[kind]
        values = np.zeros(shape) if exp is None else mant * 10.0**exp
        top = 0.9 * float(jnp.finfo(dtype).max)
        leaves[f"l{i}_{kind}"] = np.clip(values, -top, top).astype(dtype)
    return leaves


def _mixed_fns(p):
    def global_(c, g):
        tx = oc.clip_by_global_norm(c, NORM_ARG[p])
        return tx.update(g, tx.init(g))[0]

    def block(c, g):
        tx = oc.clip_by_block_norm(c, NORM_ARG[p])
        return tx.update(g, tx.init(g))[0]

    def soft(c, g):
        tx = oc.soft_clip_by_global_norm(c, 0.5, NORM_ARG[p])
        return tx.update(g, tx.init(g))[0]

    return {"global": jax.jit(global_), "block": jax.jit(block), "soft": jax.jit(soft)}


_MIXED_FNS = {p: _mixed_fns(p) for p in P_TYPES}


def _close(got, want, dtype, all_f64):
    """Per-leaf tolerance: the leaf's rounding, and the norm's (float32 partial
    sums of narrower leaves, unless every leaf is float64)."""
    eps = float(jnp.finfo(dtype).eps)
    rtol = max(4 * eps, 1e-12 if all_f64 else 1e-6)
    tiny = float(jnp.finfo(dtype).tiny)  # results below it are flushed to 0
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol, 4 * tiny)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    tree=mixed_trees(),
    exp=st.sampled_from([-300, -30, -5, 0, 5, 30, 300]),
    p=st.sampled_from(P_TYPES),
)
@example(  # the all-zero mixed tree that came out NaN
    tree={"a": np.zeros(3), "b": np.zeros(2, np.float32), "c": np.zeros(2, np.float16)},
    exp=0,
    p=2.0,
)
@example(  # an all-zero float32 leaf beside a live float64 one
    tree={"a": np.ones(3), "b": np.zeros(2, np.float32)}, exp=0, p=2.0
)
def test_property_mixed_dtype_trees_under_x64(tree, exp, p):
    c = 10.0**exp
    all_f64 = all(x.dtype == np.float64 for x in tree.values())
    with jax.enable_x64(True):
        g = {k: jnp.asarray(v) for k, v in tree.items()}
        outs = {name: fn(c, g) for name, fn in _MIXED_FNS[p].items()}
    keys = sorted(tree)
    # Subnormals of a leaf's dtype count as zero (documented: XLA flushes them).
    leaves = [reference.flush_subnormals(tree[k]) for k in keys]
    n = reference.norm(leaves, p)
    want = {
        "global": reference.rescaled(leaves, min(n, c), n),
        "soft": reference.rescaled(leaves, reference.soft(n, c, 0.5), n),
        "block": [
            reference.rescaled([x], min(m, c), m)[0]
            for x, m in ((x, reference.norm([x], p)) for x in leaves)
        ],
    }
    for name, out in outs.items():
        for k, w in zip(keys, want[name], strict=True):
            assert out[k].dtype == tree[k].dtype, (name, k)
            assert np.all(np.isfinite(np.asarray(out[k], np.float64))), (name, k)
            _close(out[k], w, tree[k].dtype, all_f64)


# clip_by_block_rms: optax's clip_by_block_rms, with our norms.


def _rms_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(3.0 * rng.standard_normal((16, 8)), jnp.float32),
        "b": jnp.asarray(0.1 * rng.standard_normal(8), jnp.float32),
        "s": jnp.asarray([5.0], jnp.float32),
        "e": jnp.zeros((0,), jnp.float32),
    }


@pytest.mark.parametrize("max_rms", [0.0, 0.05, 1.0, 4.0, 1e30])
def test_block_rms_matches_numpy_and_optax(max_rms):
    tree = _rms_tree()
    tx = oc.clip_by_block_rms(max_rms)
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    for name, x in tree.items():
        x64 = np.asarray(x, np.float64)
        rms = np.sqrt(np.mean(x64**2)) if x64.size else 0.0
        want = x64 * (min(1.0, max_rms / rms) if rms > 0 else 1.0)
        np.testing.assert_allclose(out[name], want, rtol=2e-6, atol=1e-30)
    theirs, _ = optax.clip_by_block_rms(max_rms).update(tree, optax.EmptyState())
    for name in ("w", "b", "s"):  # optax divides 0/0 on the empty leaf
        np.testing.assert_allclose(out[name], theirs[name], rtol=2e-6)
    s = state.clip_stats
    assert float(s.clip_threshold) == np.float32(max_rms)
    np.testing.assert_allclose(s.pre_clip_norm, reference.norm(list(tree.values()), 2))
    assert int(s.is_clipped) == int(max_rms < 5.0)  # the leaf "s" has RMS 5


def test_block_rms_overflow_is_clipped_where_optax_returns_zeros():
    g = {"w": jnp.array([1e20, 1.0, 0.0, 0.0], jnp.float32)}
    out, _ = oc.clip_by_block_rms(1.0).update(g, oc.clip_by_block_rms(1.0).init(g))
    np.testing.assert_allclose(out["w"], [2.0, 2e-20, 0.0, 0.0], rtol=1e-6)
    theirs, _ = optax.clip_by_block_rms(1.0).update(g, optax.EmptyState())
    assert not np.any(np.asarray(theirs["w"]))


def test_block_rms_of_a_sharded_leaf_is_the_whole_leafs(n_devices):
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((n_devices,), ("data",))
    tree = {"w": _rms_tree()["w"], "b": _rms_tree()["b"]}
    specs = {"w": P("data"), "b": P()}
    tree = jax.tree.map(
        lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)),
        tree,
        specs,
    )
    want, _ = oc.clip_by_block_rms(1.0).update(
        tree, oc.clip_by_block_rms(1.0).init(tree)
    )
    tx = oc.clip_by_block_rms(1.0, axis_name="data")
    state = jax.device_put(tx.init(tree), jax.sharding.NamedSharding(mesh, P()))
    step = jax.jit(
        jax.shard_map(
            tx.update,
            mesh=mesh,
            in_specs=(specs, P()),
            out_specs=(specs, P()),
        )
    )
    got, _ = step(tree, state)
    for name in tree:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
