"""The skip-aware optimizers: optax's maths bit for bit, the state kept on a skip."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clip as oc
from optax_clip import _skippable

PAIRS = {
    "adam": (lambda: oc.adam(1e-2), lambda: optax.adam(1e-2)),
    "nadam": (lambda: oc.adam(1e-2, nesterov=True), lambda: optax.nadam(1e-2)),
    "adam_mu_bf16": (
        lambda: oc.adam(1e-2, mu_dtype=jnp.bfloat16),
        lambda: optax.adam(1e-2, mu_dtype=jnp.bfloat16),
    ),
    "adamw": (
        lambda: oc.adamw(optax.cosine_decay_schedule(1e-2, 10), weight_decay=0.1),
        lambda: optax.adamw(optax.cosine_decay_schedule(1e-2, 10), weight_decay=0.1),
    ),
    "adamw_eps_root": (
        lambda: oc.adamw(1e-2, eps_root=1e-8, mask={"a": True, "b": False}),
        lambda: optax.adamw(1e-2, eps_root=1e-8, mask={"a": True, "b": False}),
    ),
    "sgd": (lambda: oc.sgd(0.1), lambda: optax.sgd(0.1)),
    "sgd_momentum": (lambda: oc.sgd(0.1, 0.9), lambda: optax.sgd(0.1, 0.9)),
    "sgd_nesterov": (
        lambda: oc.sgd(0.1, 0.9, nesterov=True),
        lambda: optax.sgd(0.1, 0.9, nesterov=True),
    ),
    "sgd_bf16_momentum": (
        lambda: oc.sgd(0.1, 0.9, accumulator_dtype=jnp.bfloat16),
        lambda: optax.sgd(0.1, 0.9, accumulator_dtype=jnp.bfloat16),
    ),
}


def _params():
    return {"a": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones((2, 3), jnp.bfloat16)}


def _grads(i):
    key = jax.random.key(i)
    return {
        "a": jax.random.normal(key, (6,)),
        "b": jax.random.normal(jax.random.fold_in(key, 1), (2, 3)).astype(jnp.bfloat16),
    }


def _run(tx, steps, skip=None):
    """Updates and states of ``steps`` jitted steps; ``skip``: inside a guard."""

    @jax.jit
    def step(params, state, g):
        if skip is None:
            return tx.update(g, state, params)
        with _skippable.guarding(jnp.asarray(skip)):
            return tx.update(g, state, params)

    params, state, out = _params(), tx.init(_params()), []
    for i in range(steps):
        updates, state = step(params, state, _grads(i))
        params = optax.apply_updates(params, updates)
        out.append((updates, state))
    return out


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("guarded", [False, True], ids=["alone", "not_skipped"])
def test_bit_for_bit_optax(name, guarded):
    ours, theirs = PAIRS[name]
    got = _run(ours(), 4, skip=False if guarded else None)
    want = _run(theirs(), 4)
    for (u1, s1), (u2, s2) in zip(got, want, strict=True):
        chex.assert_trees_all_equal(u1, u2)
        chex.assert_trees_all_equal(s1, s2)  # same state types and values
        chex.assert_trees_all_equal_dtypes(s1, s2)


@pytest.mark.parametrize("name", list(PAIRS))
def test_a_skipped_step_keeps_the_moments_bit_for_bit(name):
    tx = PAIRS[name][0]()
    params = _params()
    state = _run(tx, 2)[-1][1]  # moments that are not zero
    nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), _grads(9))
    with _skippable.guarding(jnp.asarray(True)) as guard:
        _, new = tx.update(nan, state, params)
    moments = [
        (o, n)
        for o, n in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True)
        if guard.is_kept(n)
    ]
    # Every moment (a schedule's count is left to the guard); plain SGD has none.
    assert len(moments) >= (0 if name == "sgd" else 2)
    for old, kept in moments:
        np.testing.assert_array_equal(kept, old)
        assert kept.dtype == old.dtype


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize(
    "guard",
    [oc.skip_nonfinite, lambda tx: oc.skip_on_spike(tx, window=16, sigma=4.0)],
    ids=["skip_nonfinite", "skip_on_spike"],
)
def test_under_a_guard_the_same_run_as_optax(name, guard):
    # A NaN step and a spike in the middle: skipped, the state untouched; the
    # whole run equals the guard around optax's optimizer, bit for bit.
    ours, theirs = (guard(make()) for make in PAIRS[name])
    grads = [_grads(i) for i in range(24)]
    grads[20] = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[20])
    grads[22] = jax.tree.map(lambda g: 1e4 * g, grads[22])
    runs = []
    for tx in (ours, theirs):
        step = jax.jit(lambda p, s, g, tx=tx: tx.update(g, s, p))
        params, state, seen = _params(), tx.init(_params()), []
        for g in grads:
            updates, new = step(params, state, g)
            params = optax.apply_updates(params, updates)
            seen.append((updates, new.guarded_state, int(new.skipped_steps)))
            state = new
        runs.append(seen)
    assert runs[0][-1][-1] == (1 if guard is oc.skip_nonfinite else 2)
    # NAdam's extra term is contracted differently by XLA around the select:
    # its values can differ by an ulp. Everything else is bit for bit.
    same = chex.assert_trees_all_equal
    if name == "nadam":
        same = functools.partial(chex.assert_trees_all_close, rtol=1e-6, atol=1e-9)
    for (u1, s1, n1), (u2, s2, n2) in zip(*runs, strict=True):
        same(u1, u2)
        same(s1, s2)
        assert n1 == n2


def test_kept_leaves_are_reported_to_every_active_guard():
    tx = oc.scale_by_adam()
    g = jnp.ones(3)
    state = tx.init(g)
    with _skippable.guarding(jnp.asarray(False)) as outer:
        with _skippable.guarding(jnp.asarray(True)) as inner:
            _, new = tx.update(g, state)
    for leaf in jax.tree.leaves(new):
        assert outer.is_kept(leaf) and inner.is_kept(leaf)
    chex.assert_trees_all_equal(new, state)  # either guard's skip keeps it
    assert _skippable.active_skip() is None  # nothing left active


def test_outside_a_guard_nothing_is_selected():
    # Outside a guard the update is optax's own function (same jaxpr).
    g = jnp.ones(3)
    ours, theirs = oc.scale_by_adam(), optax.scale_by_adam()
    jaxpr = lambda tx: str(jax.make_jaxpr(tx.update)(g, tx.init(g)))  # noqa: E731
    assert jaxpr(ours) == jaxpr(theirs)


def test_values_match_a_hand_computed_adam_step():
    g = np.array([0.5, -2.0])
    tx = oc.adam(0.1)
    with _skippable.guarding(jnp.asarray(False)):
        u, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(jnp.zeros(2)))
    m, v = 0.1 * g / (1 - 0.9), 0.001 * g**2 / (1 - 0.999)
    np.testing.assert_allclose(u, -0.1 * m / (np.sqrt(v) + 1e-8), rtol=2e-5)


def _compiled_step(tx, donate: bool) -> str:
    """The compiled HLO of a train step with ``tx`` on three 64x32 leaves."""
    params = {f"w{i}": jnp.ones((64, 32)) for i in range(3)}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return jitted.lower(params, tx.init(params), params).compile().as_text()


def _moment_copies(tx) -> int:
    """Copies of parameter-sized arrays in the compiled, donated train step."""
    return _compiled_step(tx, donate=True).count("f32[64,32]{1,0} copy(")


@pytest.mark.xla_cpu
@pytest.mark.parametrize("guard", [oc.skip_nonfinite, oc.skip_on_spike])
def test_a_guard_around_a_skip_aware_optimizer_copies_no_moment(guard):
    # The reason for this module: around optax.adamw, XLA copies every moment
    # buffer (the guard selects the state its update was not computed from).
    clip = oc.clip_by_global_norm(1.0)
    assert _moment_copies(guard(optax.chain(clip, optax.adamw(1e-3)))) >= 6
    assert _moment_copies(guard(optax.chain(clip, oc.adamw(1e-3)))) == 0
    assert _moment_copies(guard(optax.chain(clip, oc.sgd(1e-3, 0.9)))) == 0


def test_inside_multisteps_the_guard_still_keeps_the_state():
    # MultiSteps moves the inner state through a lax.cond: the guard cannot
    # see that it is kept and selects it itself. Correct, only not faster.
    def make(opt):
        return oc.skip_nonfinite(optax.MultiSteps(opt, every_k_schedule=2))

    runs = []
    for tx in (make(oc.adamw(1e-2)), make(optax.adamw(1e-2))):
        params, state, seen = _params(), tx.init(_params()), []
        for i in range(6):
            g = _grads(i)
            if i == 3:
                g = jax.tree.map(lambda x: x.at[0].set(jnp.inf), g)
            updates, new = jax.jit(tx.update)(g, state, params)
            if i == 3:
                chex.assert_trees_all_equal(new.guarded_state, state.guarded_state)
            params, state = optax.apply_updates(params, updates), new
            seen.append(params)
        runs.append(seen)
    chex.assert_trees_all_equal(runs[0], runs[1])


@pytest.mark.xla_cpu
def test_the_guard_and_the_inner_clip_measure_the_gradients_once():
    # The guard's norm and the inner clip's are the same computation on the
    # same gradients: XLA computes it once (as many reductions as unguarded).
    def reductions(tx):
        return _compiled_step(tx, donate=False).count(" reduce(")

    inner = lambda: optax.chain(oc.clip_by_global_norm(1.0), oc.adamw(1e-3))  # noqa: E731
    plain = reductions(inner())
    assert plain > 0
    assert reductions(oc.skip_nonfinite(inner())) == plain
