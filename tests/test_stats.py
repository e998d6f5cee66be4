"""get_stats finds clip statistics inside any optax nesting, with distinct keys."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from registry import CASES

import optax_clip as oc
from optax_clip import _stats

PARAMS = {"enc": {"w": jnp.ones((2, 3))}, "head": {"w": jnp.ones((3,))}}
GRADS = {"enc": {"w": jnp.full((2, 3), 2.0)}, "head": {"w": jnp.array([3.0, 4.0, 0.0])}}
ENC_NORM = np.sqrt(6 * 4.0)
TOTAL_NORM = np.sqrt(6 * 4.0 + 25.0)


def step(tx, n=1, **extra):
    state = tx.init(PARAMS)
    for _ in range(n):
        _, state = jax.jit(tx.update)(GRADS, state, PARAMS, **extra)
    return oc.get_stats(state)


def test_chain_two_clippers_get_distinct_keys():
    tx = optax.chain(
        oc.clip_by_global_norm(1.0), oc.clip_by_global_norm(0.5), optax.adam(1e-3)
    )
    stats = step(tx)
    assert float(stats["clip_by_global_norm/0/pre_clip_norm"]) == pytest.approx(
        TOTAL_NORM, rel=1e-6
    )
    assert float(stats["clip_by_global_norm/1/pre_clip_norm"]) == pytest.approx(1.0)
    assert float(stats["clip_by_global_norm/1/post_clip_norm"]) == pytest.approx(0.5)


def test_single_clipper_has_short_keys_and_all_fields():
    stats = step(optax.chain(oc.clip_by_block_norm(1.0), optax.sgd(0.1)), n=3)
    fields = set(oc.ClipStats._fields) | {"clip_fraction"}
    assert set(stats) == {f"clip_by_block_norm/{f}" for f in fields}
    assert int(stats["clip_by_block_norm/num_updates"]) == 3
    assert float(stats["clip_by_block_norm/clip_fraction"]) == 1.0
    for value in stats.values():
        assert value.shape == ()


def test_prefix():
    stats = oc.get_stats(oc.clip_by_value(1.0).init(None), prefix="train/")
    assert all(k.startswith("train/clip_by_value/") for k in stats)


def test_inject_hyperparams():
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=2.0)
    stats = step(tx)
    assert float(stats["clip_by_global_norm/clip_threshold"]) == 2.0
    assert float(stats["clip_by_global_norm/post_clip_norm"]) == pytest.approx(2.0)


def test_masked_clips_only_the_masked_subset():
    mask = {"enc": {"w": True}, "head": {"w": False}}
    tx = optax.chain(optax.masked(oc.clip_by_global_norm(1.0), mask), optax.sgd(0.1))
    stats = step(tx)
    assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
        ENC_NORM, rel=1e-6
    )


def test_partition_two_groups():
    labels = {"enc": {"w": "enc"}, "head": {"w": "head"}}
    tx = optax.partition(
        {"enc": oc.clip_by_global_norm(1.0), "head": oc.clip_by_value(1.0)}, labels
    )
    stats = step(tx)
    assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
        ENC_NORM, rel=1e-6
    )
    assert float(stats["clip_by_value/pre_clip_norm"]) == 4.0


def test_partition_same_method_twice_is_keyed_by_path():
    labels = {"enc": {"w": "a"}, "head": {"w": "b"}}
    tx = optax.partition(
        {"a": oc.clip_by_global_norm(1.0), "b": oc.clip_by_global_norm(1.0)}, labels
    )
    stats = step(tx)
    keys = [k for k in stats if k.endswith("/pre_clip_norm")]
    assert len(keys) == 2 and all("inner_states" in k for k in keys)
    values = sorted(float(stats[k]) for k in keys)
    np.testing.assert_allclose(values, sorted([5.0, ENC_NORM]), rtol=1e-6)


def test_multisteps():
    tx = optax.MultiSteps(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)), 2)
    stats = step(tx, n=4)
    assert int(stats["clip_by_global_norm/num_updates"]) == 2  # every 2nd step
    assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
        TOTAL_NORM, rel=1e-6
    )


def test_works_under_jit_and_inside_lax_scan():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))

    def body(state, _):
        _, state = tx.update(GRADS, state, PARAMS)
        return state, oc.get_stats(state)["clip_by_global_norm/pre_clip_norm"]

    _, norms = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3))(tx.init(PARAMS))
    np.testing.assert_allclose(norms, [TOTAL_NORM] * 3, rtol=1e-6)


def test_optimizer_state_without_clippers_gives_empty_dict():
    # The same logging code serves a run with clipping switched off.
    assert oc.get_stats(optax.adam(1e-3).init(PARAMS)) == {}
    assert oc.get_stats(optax.chain(optax.identity(), optax.sgd(0.1)).init({})) == {}
    assert oc.get_stats(optax.identity().init(PARAMS)) == {}  # EmptyState()
    assert oc.get_stats(optax.adam(1e-3).init(PARAMS), fields=("is_clipped",)) == {}


@pytest.mark.parametrize(
    "tx",
    [
        oc.clip_by_global_norm(1.0),
        optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3)),
        oc.skip_nonfinite(optax.adam(1e-3)),
    ],
    ids=["clip", "chain", "guard"],
)
def test_transformation_instead_of_state_is_a_type_error(tx):
    with pytest.raises(TypeError, match="pass the state, not the transformation"):
        oc.get_stats(tx)
    assert oc.get_stats(tx.init(PARAMS))  # what it should have been given


@pytest.mark.parametrize(
    "thing, what",
    [({}, "a dict"), (PARAMS, "a dict"), (None, "None"), (jnp.ones(2), "Array")],
    ids=["empty", "params", "none", "array"],
)
def test_not_an_optimizer_state_is_a_value_error(thing, what):
    with pytest.raises(ValueError, match="no optimizer state") as err:
        oc.get_stats(thing)
    message = str(err.value)
    assert what in message
    for hint in ("tx.init(params)", "optimizer.opt_state", "state.opt_state"):
        assert hint in message


def test_state_converted_to_plain_dicts_is_a_value_error():
    import flax.serialization

    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = tx.init(PARAMS)
    plain = flax.serialization.to_state_dict(state)  # NamedTuples became dicts
    with pytest.raises(ValueError, match=r"converted.*tx\.init\(params\)"):
        oc.get_stats(plain)
    guard = oc.skip_nonfinite(optax.adam(1e-3)).init(PARAMS)
    with pytest.raises(ValueError, match="converted"):
        oc.get_stats(flax.serialization.to_state_dict(guard))
    # Restored into its target, it has its types back.
    restored = flax.serialization.from_state_dict(tx.init(PARAMS), plain)
    assert set(oc.get_stats(restored)) == set(oc.get_stats(state))


def test_flax_nnx_state_names_optimizer_opt_state():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-2))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"NNX State.*optimizer\.opt_state"):
        oc.get_stats(nnx.state(opt))
    _, split_state = nnx.split(opt)
    with pytest.raises(ValueError, match=r"optimizer\.opt_state"):
        oc.get_stats(split_state)
    # The optimizer itself and its opt_state work, with and without a clip.
    assert set(oc.get_stats(opt)) == set(oc.get_stats(opt.opt_state))
    assert "clip_by_global_norm/pre_clip_norm" in oc.get_stats(opt.opt_state)
    plain = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    assert oc.get_stats(plain.opt_state) == {} and oc.get_stats(plain) == {}
    with pytest.raises(ValueError, match=r"optimizer\.opt_state"):
        oc.get_stats(nnx.state(plain))


def test_clip_inside_wrappers_is_found():
    wrappers = {
        "masked": lambda c: optax.masked(c, {"enc": {"w": True}, "head": {"w": False}}),
        "multi_steps": lambda c: optax.MultiSteps(c, 2),
        "apply_if_finite": lambda c: optax.apply_if_finite(c, 3),
        "lookahead": lambda c: optax.lookahead(c, 2, 0.5),
        "named_chain": lambda c: optax.named_chain(("clip", c), ("sgd", optax.sgd(1))),
        "inject": lambda c: optax.inject_hyperparams(
            lambda lr: optax.chain(c, optax.sgd(lr))
        )(lr=0.1),
    }
    for name, wrap in wrappers.items():
        tx = wrap(oc.clip_by_global_norm(1.0))
        if name == "lookahead":
            params = optax.LookaheadParams.init_synced(PARAMS)
        else:
            params = PARAMS
        state = tx.init(params)
        stats = oc.get_stats(state)
        assert "clip_by_global_norm/num_updates" in stats, name


# --------------------------------------------------------------------------
# Field selection
# --------------------------------------------------------------------------


def test_fields_selects_fields_and_keeps_key_format():
    tx = optax.chain(oc.clip_by_global_norm(1.0), oc.zclip(), optax.sgd(0.1))
    state = tx.init(PARAMS)
    _, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    every = oc.get_stats(state)
    picked = oc.get_stats(state, fields=("pre_clip_norm", "is_clipped"))
    assert set(picked) == {
        f"{m}/{f}"
        for m in ("clip_by_global_norm", "zclip")
        for f in ("pre_clip_norm", "is_clipped")
    }
    for key, value in picked.items():
        np.testing.assert_array_equal(value, every[key])
    # A field only one transform has; a derived field; a prefix.
    assert set(oc.get_stats(state, fields=["norm_mean"])) == {"zclip/norm_mean"}
    frac = oc.get_stats(state, fields=("clip_fraction",), prefix="train/")
    assert set(frac) == {
        "train/clip_by_global_norm/clip_fraction",
        "train/zclip/clip_fraction",
    }
    assert float(frac["train/clip_by_global_norm/clip_fraction"]) == 1.0
    # Under jit, and with path-qualified keys for a repeated method.
    two = optax.chain(oc.clip_by_global_norm(1.0), oc.clip_by_global_norm(0.5))
    s2 = two.init(PARAMS)
    got = jax.jit(lambda s: oc.get_stats(s, fields=("num_updates",)))(s2)
    assert set(got) == {
        "clip_by_global_norm/0/num_updates",
        "clip_by_global_norm/1/num_updates",
    }


def test_fields_with_guards():
    tx = oc.skip_on_spike(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0)))
    state = tx.init(PARAMS)
    _, state = tx.update(GRADS, state, PARAMS)
    got = oc.get_stats(state, fields=("num_updates", "skip_fraction"))
    assert set(got) == {
        "skip_on_spike/num_updates",
        "skip_on_spike/skip_fraction",
        "clip_by_global_norm/num_updates",
    }
    assert float(got["skip_on_spike/skip_fraction"]) == 0.0


def test_unknown_field_lists_the_known_ones():
    state = oc.clip_by_global_norm(1.0).init(PARAMS)
    with pytest.raises(ValueError, match="'pre_clip_nrm'") as err:
        oc.get_stats(state, fields=("pre_clip_nrm", "is_clipped"))
    message = str(err.value)
    for owner in KNOWN_OWNERS:
        for key in _stats.stats_keys(owner):
            assert key in message


def test_field_no_transform_in_the_state_reports():
    state = oc.clip_by_global_norm(1.0).init(PARAMS)
    with pytest.raises(ValueError, match=r"no transform.*'norm_mean'") as err:
        oc.get_stats(state, fields=("pre_clip_norm", "norm_mean"))
    assert "clip_by_global_norm: pre_clip_norm" in str(err.value)


def test_fields_must_be_a_sequence_of_names():
    state = oc.clip_by_global_norm(1.0).init(PARAMS)
    with pytest.raises(TypeError, match="sequence of field names"):
        oc.get_stats(state, fields="pre_clip_norm")
    with pytest.raises(ValueError, match="at least one"):
        oc.get_stats(state, fields=())


# --------------------------------------------------------------------------
# Every key is documented, and every transform reports what it declares
# --------------------------------------------------------------------------

KNOWN_OWNERS = _stats._known_owners()


def documented_keys():
    return set(re.findall(r"``([a-z_]+)``", oc.get_stats.__doc__))


def test_every_state_class_is_known():
    names = {cls._stats_name for cls in KNOWN_OWNERS}
    # stable_adamw is an optimizer, not a contract case (tests/test_update.py).
    assert names == {c.name for c in CASES} | {"stable_adamw"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reported_keys_are_declared_and_documented(case):
    tx = case.build()
    params = jax.tree.map(lambda x: 0.5 * x, GRADS)
    state = tx.init(params)
    _, state = tx.update(GRADS, state, params, **case.extra_args)
    owner = next(
        node
        for node in jax.tree.leaves(state, is_leaf=_stats._is_stats_owner)
        if getattr(type(node), "_stats_name", None) == case.name
    )
    keys = _stats.stats_keys(type(owner))
    stats = oc.get_stats(state)
    mine = {k.split("/", 1)[1] for k in stats if k.startswith(case.name + "/")}
    assert mine == set(keys)
    undocumented = set(keys) - documented_keys()
    assert not undocumented, f"document {sorted(undocumented)} in get_stats"
    for key in keys:  # the docstring says which family reports it
        assert f"``{key}``" in oc.get_stats.__doc__
    for k, value in stats.items():
        assert value.shape == (), k


def test_guards_report_no_clip_fields():
    for name in ("skip_nonfinite", "skip_on_spike"):
        owner = next(c for c in KNOWN_OWNERS if c._stats_name == name)
        keys = _stats.stats_keys(owner)
        assert not [k for k in keys if "clip" in k], name
        assert "clip_stats" not in owner._fields


def test_optax_tree_get_finds_our_distinct_field_names():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = tx.init(PARAMS)
    _, state = tx.update(GRADS, state, PARAMS)
    assert float(optax.tree.get(state, "pre_clip_norm")) == pytest.approx(TOTAL_NORM)


def test_flax_nnx_optimizer():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-2))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((4, 3))

    @nnx.jit
    def train_step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2) * 1e3)(model)
        opt.update(model, grads)
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
        return loss, norm

    _, norm = train_step(model, opt)
    stats = oc.get_stats(opt.opt_state)
    np.testing.assert_allclose(
        stats["clip_by_global_norm/pre_clip_norm"], norm, rtol=1e-5
    )
    assert int(stats["clip_by_global_norm/is_clipped"]) == 1


def test_flax_linen_train_state():
    import flax.linen as nn
    from flax.training import train_state

    model = nn.Dense(2)
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-2))
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx
    )
    x = jnp.ones((4, 3))

    @jax.jit
    def train_step(state):
        def loss_fn(p):
            return jnp.mean(state.apply_fn({"params": p}, x) ** 2) * 1e3

        grads = jax.grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), optax.tree.norm(grads)

    state, norm = train_step(state)
    stats = oc.get_stats(state.opt_state)
    np.testing.assert_allclose(
        stats["clip_by_global_norm/pre_clip_norm"], norm, rtol=1e-5
    )
    # The TrainState itself holds the optimizer state: the same statistics.
    assert oc.get_stats(state).keys() == stats.keys()
