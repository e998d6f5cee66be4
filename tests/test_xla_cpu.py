"""The XLA:CPU workarounds: same values as the plain forms, and what they buy.

``_xla_cpu.forced(False)`` traces the plain forms that GPUs and TPUs run, so
they are tested here on the CPU too: every public transform gives the same
results with and without the workarounds. The tests marked ``xla_cpu`` check
what a workaround is for in XLA:CPU's compiled program (no float32 copy of
bf16 gradients, no gradient-sized temporaries); they say when one can go.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from registry import CASES

import optax_clip as oc
from optax_clip import _apply, _xla_cpu


def test_bf16_round_toward_zero_fast_path():
    rng = np.random.default_rng(5)
    v = rng.normal(size=20_000) * 10.0 ** rng.integers(-30, 30, size=20_000)
    y = jnp.asarray(
        np.concatenate([v, [0.0, -0.0, 1e38, -3.3e38, 65504.0]]), jnp.float32
    )
    fast = np.asarray(_xla_cpu.bf16_toward_zero(y).astype(jnp.float32))
    with _xla_cpu.forced(False):
        slow = np.asarray(_apply.cast_toward_zero(y, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(fast, slow)
    assert np.all(np.abs(fast) <= np.abs(np.asarray(y)))
    special = jnp.asarray([np.inf, -np.inf, np.nan], jnp.float32)
    out = np.asarray(_xla_cpu.bf16_toward_zero(special).astype(jnp.float32))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    # Differentiated like a plain cast.
    g = jax.grad(
        lambda y: jnp.sum(_xla_cpu.bf16_toward_zero(3.0 * y).astype(jnp.float32))
    )
    np.testing.assert_array_equal(g(jnp.ones(3)), [3.0, 3.0, 3.0])


def test_bf16_to_f32_bits_is_exact():
    x = jnp.asarray(np.random.default_rng(6).normal(size=1000) * 1e20, jnp.bfloat16)
    with _xla_cpu.forced(True):
        wide = _xla_cpu.widen(x, jnp.float32)
        g = jax.grad(lambda x: jnp.sum(_xla_cpu.widen(x, jnp.float32) * 2.0))(x)
    np.testing.assert_array_equal(wide, x.astype(jnp.float32))
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(g == 2.0))


def test_select_of_16_bit_floats():
    a = jnp.asarray([1.5, -2.0, jnp.nan], jnp.bfloat16)
    b = jnp.zeros(3, jnp.bfloat16)
    for tuned in (True, False):
        with _xla_cpu.forced(tuned):
            out = _xla_cpu.select(jnp.asarray([True, False, True]), a, b)
            g = jax.grad(lambda a: jnp.sum(_xla_cpu.select(True, a, b).astype(float)))(
                a
            )
        np.testing.assert_array_equal(np.asarray(out, np.float32), [1.5, 0.0, np.nan])
        np.testing.assert_array_equal(np.asarray(g, np.float32), [1.0, 1.0, 1.0])


def test_entries_read_out_every_value_exactly():
    # A kernel that slices a vector compiles ~40x slower on XLA:CPU than an
    # elementwise one; entries() reads the values out with reductions. The
    # same values as the slices (the plain form), also for inf and NaN, and
    # differentiated as the slices.
    special = [1.5, -2.0, np.inf, -np.inf, np.nan, 0.0, 3.4e38, 1.2e-38]
    v = jnp.asarray(special + list(range(70)), jnp.float32)  # three groups
    w = np.linspace(-1e300, 1e300, v.size)
    want = [(np.asarray(v)[i], w[i]) for i in range(v.size)]
    for tuned in (True, False):
        with _xla_cpu.forced(tuned), jax.enable_x64(True):
            w = jnp.asarray(w, jnp.float64)
            got = jax.jit(lambda a, b: _xla_cpu.entries((a, b)))(v, w)
            grad = jax.grad(
                lambda a: sum(i * e[0] for i, e in enumerate(_xla_cpu.entries((a,))))
            )(jnp.ones(40))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got[0][0].shape == () and got[0][1].dtype == w.dtype
        np.testing.assert_array_equal(grad, np.arange(40.0))


def _tree(dtype, scale):
    rng = np.random.default_rng(9)
    return {
        "w": jnp.asarray(scale * rng.normal(size=(48, 32)), dtype),
        "b": [jnp.asarray(scale * rng.normal(size=(32,)), dtype) for _ in range(20)],
        "zero": jnp.zeros((16,), dtype),
    }


#: One transform per path through the core (global, per leaf, per unit, by
#: value, soft, adaptive); bf16 runs only these, float32 runs every case.
_BF16_CASES = {
    "clip_by_global_norm",
    "clip_by_block_norm",
    "clip_by_value",
    "soft_clip_by_global_norm",
    "adagc",
    "adaptive_grad_clip",
    "zclip",
}
_PLAIN_FORM_PARAMS = [
    pytest.param(case, dtype, id=f"{jnp.dtype(dtype).name}-{case.name}")
    for dtype in (jnp.float32, jnp.bfloat16)
    for case in CASES
    if dtype == jnp.float32 or case.name in _BF16_CASES
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "dtype"), _PLAIN_FORM_PARAMS)
def test_plain_forms_give_the_same_results(case, dtype):
    # Bitwise equal, but for the rescaled pass (its plain form sums without
    # compensation): the 1e30 tree takes it, and is compared within rounding.
    scales = (1.0, 1e30 if dtype == jnp.float32 else 1e-25)
    outs = {}
    for tuned in (True, False):
        with _xla_cpu.forced(tuned):  # traced here, once for both scales
            tx = case.build()
            update = jax.jit(tx.update)
            for scale in scales:
                grads = _tree(dtype, scale)
                params = jax.tree.map(lambda x: jnp.full_like(x, 0.5), grads)
                state = tx.init(params)
                for _ in range(3):
                    out, state = update(grads, state, params, **case.extra_args)
                outs[tuned, scale] = (out, oc.get_stats(state))
    chex.assert_trees_all_equal(outs[True, 1.0], outs[False, 1.0])
    chex.assert_trees_all_close(
        outs[True, scales[1]], outs[False, scales[1]], rtol=1e-5, atol=0
    )


@pytest.mark.slow
@pytest.mark.xla_cpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("policy", ["propagate", "zero_update"])
def test_16bit_clip_writes_no_float32_copy(dtype, policy):
    # XLA:CPU converts a bf16/fp16 select to float32; that conversion of the
    # gradient merged with the norm's and was written out on every step. The
    # clip selects bit patterns instead: for bf16 the compiled program has no
    # float32 array of the gradient's shape (fp16 still has one: its scale
    # pass converts with the same op as the norm), and the values are as
    # before.
    tx = oc.clip_by_global_norm(1.0, nonfinite=policy)
    g = {"a": jax.ShapeDtypeStruct((256, 96), dtype)}
    hlo = jax.jit(tx.update).lower(g, jax.eval_shape(tx.init, g)).compile().as_text()
    if dtype == jnp.bfloat16:
        assert "f32[256,96]" not in hlo.split("ENTRY")[1]
        for per_leaf in (oc.clip_by_block_norm(1.0, nonfinite=policy), oc.adagc()):
            state = jax.eval_shape(per_leaf.init, g)
            text = jax.jit(per_leaf.update).lower(g, state).compile().as_text()
            assert "f32[256,96]" not in text.split("ENTRY")[1]
    x = jnp.asarray(np.random.default_rng(8).normal(size=(256, 96)), dtype)
    small = x * jnp.asarray(1e-4, dtype)  # below the threshold: returned as is
    for tree in ({"a": x}, {"a": small}):
        out, _ = jax.jit(tx.update)(tree, tx.init(tree))
        if tree["a"] is small:
            assert np.asarray(out["a"]).tobytes() == np.asarray(small).tobytes()
        else:
            n = reference.norm([x])
            want = np.asarray(x, np.float64) / n
            np.testing.assert_allclose(
                np.asarray(out["a"], np.float64), want, 2e-2, 1.2e-7
            )
    bad = {"a": x.at[3, 4].set(jnp.nan)}
    out, _ = jax.jit(tx.update)(bad, tx.init(bad))
    if policy == "zero_update":
        assert not np.any(np.asarray(out["a"], np.float32))
    else:
        assert np.all(np.isnan(np.asarray(out["a"], np.float32)))
    # Differentiated like a select (a bitcast alone would give no gradient);
    # loose: the backward pass sums in 16 bits.
    state = tx.init({"a": small})
    grad = jax.grad(lambda c: jnp.sum(tx.update({"a": small * c}, state)[0]["a"]))
    np.testing.assert_allclose(
        float(grad(jnp.asarray(1.0, dtype))),
        float(jnp.sum(small.astype(jnp.float32))),
        rtol=0.1,
    )


@pytest.mark.slow
@pytest.mark.xla_cpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_gradient_sized_temporaries(dtype):
    # A reduction of computed values (|x|, rescaled values) is handed to
    # YNNPACK, which writes them out first: the rescaled pass, though it
    # rarely runs, reserved twice the gradients' bytes on every step. The
    # compiled programs hold no array of a gradient's size beyond their
    # outputs.
    def s(shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    tree = {
        "big": s((512, 256)),
        "grouped": [s((64, 128))] * 20,
        "tiny": [s((8,))] * 100,
    }
    small = {"big": tree["big"], "grouped": tree["grouped"][:2]}  # AGC compiles slowly
    cases = {
        "global": (oc.clip_by_global_norm(1.0), tree),
        "block": (oc.clip_by_block_norm(1.0), tree),
        "value": (oc.clip_by_value(1.0), tree),
        "zclip": (oc.zclip(), tree),
        "adagc": (oc.adagc(), tree),
        "agc": (oc.adaptive_grad_clip(0.01), small),
    }
    for name, (tx, g) in cases.items():
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(g))
        state = jax.eval_shape(tx.init, g)
        fn = jax.jit(lambda g, st, p, tx=tx: tx.update(g, st, p))
        temp = fn.lower(g, state, g).compile().memory_analysis().temp_size_in_bytes
        # AGC: per-unit norms and scales (small, but not a few scalars);
        # clip_by_value: a few scalars per leaf (121 leaves here).
        limit = {"agc": 0.2, "value": 0.1}.get(name, 0.05)
        assert temp < limit * nbytes, (name, temp, nbytes)
