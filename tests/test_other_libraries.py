"""What optax and PyTorch do on the inputs of the docs' "what it fixes" table.

Each test runs the other library on one row of the table in
``docs/guides/numerics.md`` and asserts what that row says (optax always;
PyTorch when the ``bench`` extra is installed, else that part is skipped), and
then that optax_clip gets it right.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc


def _torch():
    return pytest.importorskip("torch", reason="pip install -e '.[bench]'")


def _torch_clip(grads, max_norm, dtype_name="float32"):
    torch = _torch()
    dtype = getattr(torch, dtype_name)
    params = [torch.nn.Parameter(torch.zeros(len(g), dtype=dtype)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.tensor(g, dtype=dtype)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    out = [p.grad.float().numpy().astype(np.float64) for p in params]
    return float(total), out


def _ours(grads, max_norm=1.0):
    tx = oc.clip_by_global_norm(max_norm)
    return tx.update(grads, tx.init(grads))[0]


def _l2(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree)))


def test_row_float32_overflow_zeroes_the_update_in_optax():
    g = [jnp.array([1e20, 1.0], jnp.float32)]
    theirs, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    assert not np.any(np.asarray(theirs[0]))  # all zeros: the step is lost
    assert _l2(_ours(g)) == pytest.approx(1.0, rel=1e-6)


def test_row_float32_overflow_zeroes_the_update_in_torch():
    total, out = _torch_clip([[1e20, 1.0]], 1.0)
    assert total == float("inf") and not np.any(out[0])


def test_row_fp16_overflow_zeroes_the_update_in_optax_not_in_torch():
    g = [jnp.array([300.0, 1.0], jnp.float16)]  # 300**2 > 65504
    theirs, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    assert not np.any(np.asarray(theirs[0]))
    assert _l2(_ours(g)) == pytest.approx(1.0, rel=2e-3)
    total, out = _torch_clip([[300.0, 1.0]], 1.0, "float16")
    assert total == pytest.approx(300.0, rel=1e-2)  # torch accumulates in float32
    assert _l2(out) == pytest.approx(1.0, rel=2e-3)


def test_row_bf16_leaf_norms_added_in_bf16_in_optax():
    tree = [jnp.ones((1,), jnp.bfloat16)] * 1000
    assert float(optax.tree.norm(tree)) == 16.0  # not 31.62
    tx = oc.clip_by_global_norm(1.0)
    state = tx.update(tree, tx.init(tree))[1]
    assert float(state.clip_stats.pre_clip_norm) == pytest.approx(np.sqrt(1000))


def test_row_bf16_clip_rounds_to_nearest_in_torch():
    # torch's norm is right (31.625) but the clipped bf16 values are rounded
    # to nearest, so the clipped norm exceeds the bound.
    total, out = _torch_clip([[1.0]] * 1000, 1.0, "bfloat16")
    assert total == pytest.approx(np.sqrt(1000), rel=1e-2)
    assert _l2(out) > 1.0
    assert _l2(_ours([jnp.ones((1,), jnp.bfloat16)] * 1000)) <= 1.0


def test_row_zero_threshold_and_zero_gradient_give_nan_in_optax():
    z = jnp.zeros(3)
    theirs, _ = optax.clip_by_global_norm(0.0).update(z, optax.EmptyState())
    assert np.all(np.isnan(theirs))
    np.testing.assert_array_equal(_ours(z, 0.0), z)


def test_row_meta_gradient_at_zero_is_nan_in_optax():
    def total(clip):
        return lambda v: jnp.sum(clip.update(v, clip.init(v))[0])

    z = jnp.zeros(3)
    assert np.all(np.isnan(jax.grad(total(optax.clip_by_global_norm(1.0)))(z)))
    assert np.all(np.isfinite(jax.grad(total(oc.clip_by_global_norm(1.0)))(z)))


def test_row_zero_threshold_in_torch_is_fine():
    total, out = _torch_clip([[0.0, 0.0, 0.0]], 0.0)
    assert total == 0.0 and not np.any(out[0])


def test_row_apply_if_finite_lets_nan_into_adam_after_its_limit():
    tx = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=2)
    params = jnp.ones(2)
    state = tx.init(params)
    nan = jnp.full(2, jnp.nan)  # a NaN loss makes every gradient NaN
    for _ in range(3):
        _, state = tx.update(nan, state, params)
    assert np.isnan(np.asarray(state.inner_state[0].mu)).all()  # poisoned
    updates, _ = tx.update(jnp.ones(2), state, params)
    assert np.isnan(np.asarray(updates)).all()  # and every later step is NaN
    ours = oc.skip_nonfinite(optax.adam(1e-2))
    state = ours.init(params)
    for _ in range(3):
        _, state = ours.update(nan, state, params)
    assert np.isfinite(np.asarray(ours.update(jnp.ones(2), state, params)[0])).all()


def test_row_optax_clip_has_no_state_to_log():
    state = optax.clip_by_global_norm(1.0).init({"w": jnp.zeros(3)})
    assert jax.tree.leaves(state) == []  # nothing to read the norm from
    tx = oc.clip_by_global_norm(1.0)
    state = tx.update({"w": jnp.full(3, 2.0)}, tx.init({"w": jnp.zeros(3)}))[1]
    assert float(oc.get_stats(state)["clip_by_global_norm/pre_clip_norm"]) == (
        pytest.approx(np.sqrt(12.0))
    )
