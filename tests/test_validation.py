"""Bad input: a clear error at construction, or a documented traced behaviour.

Concrete hyper-parameters are checked when a transform is built. Traced ones
(``optax.inject_hyperparams`` under ``jit``) cannot raise: an out-of-range
value makes the step's threshold NaN (the update is NaN, adaptive statistics
are left alone, guards skip the step). Non-float updates are rejected.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc
from optax_clip import _validation

G = {"w": jnp.array([[3.0, 4.0], [1.0, -2.0]]), "b": jnp.array([0.5, -0.5])}
P = jax.tree.map(lambda x: jnp.full_like(x, 0.5), G)


def traced_update(factory, good, **bad):
    """One jitted update of ``inject_hyperparams(factory)``, built with ``good``
    hyper-parameters and run with the ``bad`` ones. Returns ``(updates, state)``.
    """
    tx = optax.inject_hyperparams(factory)(**good)
    state = tx.init(P)
    for name, value in bad.items():
        state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    return jax.jit(tx.update)(G, state, P)


def all_nan(tree):
    return all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Traced out-of-range hyper-parameters
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, good, name, bad",
    [
        (oc.clip_by_global_norm, {"max_norm": 1.0}, "max_norm", -1.0),
        (oc.clip_by_global_norm, {"max_norm": 1.0}, "max_norm", math.nan),
        (oc.clip_by_block_norm, {"max_norm": 1.0}, "max_norm", -0.5),
        (oc.soft_clip_by_global_norm, {"max_norm": 1.0, "knee": 0.5}, "knee", 1.5),
        (oc.clip_by_value, {"max_delta": 1.0}, "max_delta", -1.0),
        (oc.adaptive_grad_clip, {"clipping": 0.1}, "clipping", -1.0),
    ],
)
def test_traced_out_of_range_value_makes_the_step_nan(factory, good, name, bad):
    out, _ = traced_update(factory, good)
    assert not all_nan(out)
    out, state = traced_update(factory, good, **{name: bad})
    assert all_nan(out)
    assert np.isnan(state.inner_state.clip_stats.clip_threshold)
    # The same value raises when it is concrete (eager inject_hyperparams).
    tx = optax.inject_hyperparams(factory)(**good)
    state = tx.init(P)
    state.hyperparams[name] = jnp.asarray(bad, jnp.float32)
    with pytest.raises(ValueError, match=name):
        tx.update(G, state, P)


def test_traced_clip_by_value_with_min_above_max_is_nan():
    good = {"min_value": -1.0, "max_value": 1.0}
    out, _ = traced_update(oc.clip_by_value, good)
    assert not all_nan(out)
    out, _ = traced_update(oc.clip_by_value, good, min_value=1.0, max_value=-1.0)
    assert all_nan(out)
    with pytest.raises(ValueError, match="min_value"):
        oc.clip_by_value(min_value=1.0, max_value=-1.0)


def test_schedule_going_negative_nan_under_jit_and_raises_eagerly():
    schedule = optax.linear_schedule(1.0, -1.0, 4)  # negative from step 3 on
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=schedule)
    update, state = jax.jit(tx.update), tx.init(G)
    outs = []
    for _ in range(4):
        out, state = update(G, state)
        outs.append(out)
    assert not all_nan(outs[2]) and all_nan(outs[3])
    eager_state = tx.init(G)
    for _ in range(3):
        _, eager_state = tx.update(G, eager_state)
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        tx.update(G, eager_state)


# What each adaptive transform keeps, and good hyper-parameters to start from.
ADAPTIVE = {
    "zclip": (
        {"alpha": 0.9, "warmup_steps": 1},
        ("norm_mean", "norm_var", "norms_seen"),
    ),
    "autoclip": (
        {"percentile": 50.0, "history": 4},
        ("norm_history", "history_pos", "history_len"),
    ),
    "adagc": ({"beta": 0.9, "warmup_steps": 1}, ("tensor_norm_ema", "adagc_steps")),
}


@pytest.mark.parametrize(
    "method, name, bad",
    [
        ("zclip", "alpha", 1.5),
        ("zclip", "warmup_steps", 0.5),
        ("autoclip", "percentile", 150.0),
        ("adagc", "beta", 1.0),
    ],
)
def test_traced_out_of_range_leaves_adaptive_state_alone(method, name, bad):
    factory = getattr(oc, method)
    good, kept = ADAPTIVE[method]
    static = ("history",) if "history" in good else ()
    # Two good steps, then a bad one: NaN update, statistics untouched.
    tx = optax.inject_hyperparams(factory, static_args=static)(**good)
    update, state = jax.jit(tx.update), tx.init(P)
    for _ in range(2):
        out, state = update(G, state, P)
    assert not all_nan(out)
    before = state
    state.hyperparams[name] = jnp.asarray(bad, jnp.float32)
    out, state = update(G, state, P)
    assert all_nan(out)
    for field in kept:
        np.testing.assert_array_equal(
            getattr(state.inner_state, field), getattr(before.inner_state, field)
        )
    assert np.isnan(state.inner_state.clip_stats.clip_threshold)


@pytest.mark.parametrize("name, bad", [("sigma", -1.0), ("min_history", 2.5)])
def test_traced_out_of_range_guard_value_skips(name, bad):
    def guard(sigma, min_history):
        return oc.skip_on_spike(optax.adam(0.1), 4, sigma, min_history=min_history)

    tx = optax.inject_hyperparams(guard)(sigma=6.0, min_history=2)
    update, state = jax.jit(tx.update), tx.init(P)
    out, state = update(G, state, P)
    assert int(state.inner_state.skipped_steps) == 0
    before = state.inner_state.guarded_state
    state.hyperparams[name] = jnp.asarray(bad, jnp.float32)
    out, state = update(G, state, P)
    assert int(state.inner_state.skipped_steps) == 1
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
    jax.tree.map(np.testing.assert_array_equal, state.inner_state.guarded_state, before)
    assert np.isnan(state.inner_state.grad_norm_threshold)
    assert int(state.inner_state.guard_is_skipped) == 1
    assert int(state.inner_state.spike_steps) == 0  # skipped, but not as a spike


# --------------------------------------------------------------------------
# Construction errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: oc.skip_on_spike(optax.sgd(1.0), window=8, min_history=3.5), "int"),
        (lambda: oc.skip_on_spike(optax.sgd(1.0), window=8, min_history=9), "int"),
        (lambda: oc.skip_on_spike(optax.sgd(1.0), window=8, sigma=-1.0), ">= 0"),
        (lambda: oc.zclip(warmup_steps=2.5), "integer"),
        (lambda: oc.zclip(alpha=1.5), "alpha"),
        (lambda: oc.autoclip(percentile=150.0), "percentile"),
        (lambda: oc.adagc(warmup_steps=-1), "integer"),
        (lambda: oc.clip_by_value(min_value=1.0, max_value=0.0), "min_value"),
        (lambda: oc.clip_by_value(min_value=math.nan, max_value=0.0), "NaN"),
        (lambda: oc.adaptive_grad_clip(-0.1), ">= 0"),
    ],
)
def test_bad_values_raise_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("guard", [oc.skip_nonfinite, oc.skip_on_spike])
def test_guard_of_something_that_is_no_optimizer(guard):
    with pytest.raises(TypeError, match="wraps an optimizer.*got 1.0"):
        guard(1.0)
    with pytest.raises(TypeError, match=r"if adam builds an optimizer, call it"):
        guard(optax.adam)  # the factory, not an optimizer
    with pytest.raises(TypeError, match="wraps an optimizer"):
        guard(optax.adam(1e-3).init)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"window": 8.0}, TypeError, r"window must be an integer >= 2, got 8.0"),
        ({"window": True}, TypeError, "window must be an integer >= 2"),
        ({"window": 1}, ValueError, "window must be >= 2"),
        ({"sigma": "6"}, TypeError, "sigma must be a real number"),
        ({"sigma": math.nan}, ValueError, "sigma must not be NaN"),
        ({"sigma": -0.5}, ValueError, "sigma must be >= 0"),
        ({"sigma": np.ones(2)}, ValueError, "sigma must be a scalar"),
        ({"min_history": True}, TypeError, r"min_history must be an integer in"),
        ({"min_history": 1}, ValueError, r"min_history must be an integer in \[2, 8\]"),
        ({"axis_name": 1.5}, TypeError, "axis_name"),
    ],
)
def test_skip_on_spike_arguments_checked_at_construction(kwargs, err, match):
    kwargs = {"window": 8, **kwargs}
    with pytest.raises(err, match=match):
        oc.skip_on_spike(optax.sgd(1.0), **kwargs)


def test_skip_on_spike_accepts_numpy_and_concrete_jax_values():
    inner = optax.sgd(1.0)
    tx = oc.skip_on_spike(inner, np.int64(8), np.float32(3.0), min_history=4.0)
    assert tx.init(jnp.zeros(2)).norm_window.shape == (8,)
    oc.skip_on_spike(inner, 8, jnp.asarray(3.0), min_history=jnp.asarray(4))
    oc.skip_on_spike(inner, 8, math.inf)  # no spike test, only NaN/Inf skips


def test_traced_hyper_parameter_must_be_a_scalar():
    def make(c):
        return oc.clip_by_global_norm(c)

    with pytest.raises(ValueError, match="scalar"):
        jax.jit(lambda c: make(c).update(G, make(c).init(G))[0])(jnp.ones(2))


# --------------------------------------------------------------------------
# Non-float updates
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_non_float_updates_name_the_leaf(dtype):
    grads = {"w": jnp.ones(3), "step": jnp.ones(2, dtype)}
    tx = oc.clip_by_global_norm(1.0)
    with pytest.raises(TypeError, match=r"\['step'\].*" + jnp.dtype(dtype).name):
        tx.update(grads, tx.init(grads))


def test_float_leaves_accepts_float_and_complex():
    tree = {"a": jnp.ones(2, jnp.bfloat16), "c": jnp.ones(2, jnp.complex64), "n": None}
    assert len(_validation.float_leaves(tree)) == 2


@pytest.mark.parametrize(
    "value,expected",
    [(1, 1.0), (2, 2.0), (2.0, 2.0), (np.inf, np.inf), ("inf", np.inf), ("L2", 2.0)],
)
def test_norm_type_names(value, expected):
    assert _validation.norm_type(value) == expected


@pytest.mark.parametrize("value", [3, 0, -1, 0.5, "fro", "l3", None, True, [2]])
def test_unknown_norm_type_rejected(value):
    with pytest.raises(ValueError, match="norm_type"):
        _validation.norm_type(value)


def test_norm_type_error_names_exactly_the_accepted_spellings():
    with pytest.raises(ValueError) as err:
        oc.clip_by_global_norm(1.0, norm_type=3)
    message = str(err.value)
    assert message.startswith("norm_type must be 'l2', 'l1' or 'inf'")
    assert message.endswith("got 3.")
    # Every spelling the message names is accepted, in any case ...
    quoted = re.findall(r"'([^']+)'", message)
    assert set(quoted) == {"l2", "l1", "inf", "linf", "2", "1"}
    for word in quoted:
        assert _validation.norm_type(word) == _validation.norm_type(word.upper())
    assert "or the number 2, 1 or math.inf;" in message
    for number in (2, 1, math.inf, 2.0, np.float32(1.0)):  # ... and those numbers
        assert _validation.norm_type(number) == number
    # ... and nothing else of the kind.
    for word in ("l0", "l3", "2.5", "linfinity", "infinity", "fro", "max"):
        with pytest.raises(ValueError, match="norm_type must be"):
            _validation.norm_type(word)
    for factory in (oc.clip_by_block_norm, oc.soft_clip_by_global_norm):
        with pytest.raises(ValueError, match="'l2', 'l1' or 'inf'"):
            factory(1.0, norm_type="fro")
    with pytest.raises(ValueError, match="'l2', 'l1' or 'inf'"):
        oc.autoclip(norm_type="fro")


def test_choice_errors_name_the_accepted_spellings():
    with pytest.raises(ValueError, match="mode must be 'zscore' or 'percentile'"):
        oc.zclip(mode="z")
    oc.zclip(mode="ZScore")  # any case, as the message says
    with pytest.raises(
        ValueError,
        match="nonfinite must be 'propagate', 'zero_update' or 'raise', got 'skip'",
    ):
        oc.clip_by_global_norm(1.0, nonfinite="skip")


def test_axis_name_forms():
    assert _validation.axis_name(None) == ()
    assert _validation.axis_name("d") == ("d",)
    assert _validation.axis_name(("d", "m")) == ("d", "m")
    with pytest.raises(ValueError, match="repeated"):
        _validation.axis_name(("d", "d"))
    with pytest.raises(TypeError):
        _validation.axis_name(1.5)
