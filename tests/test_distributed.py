"""Global norms under pmap, shard_map and sharded jit, on 8 simulated CPU devices.

Every distributed result is compared with two independent references: NumPy
float64 maths written here, and the same transforms run on one device. Each
case asserts the pre-clip norm itself (an active clip would hide a wrong norm
by rescaling it away), and ``test_without_axis_name_the_norm_is_per_shard``
shows that these checks fail when the norm is not global.

XLA compiles dominate the run time, so each test compiles one function for
all the transforms it covers.
"""

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from registry import CASES

import optax_clip as oc

pytestmark = pytest.mark.usefixtures("n_devices")

RTOL, ATOL = 1e-5, 1e-6

_rng = np.random.default_rng(0)
# w and v are split over the devices; r is replicated, except under pmap
# (where every leaf is split by rows).
GRADS = {
    "w": _rng.normal(size=(16, 8)).astype(np.float32),
    "v": (0.5 * _rng.normal(size=(8,))).astype(np.float32),
    "r": _rng.normal(size=(8,)).astype(np.float32),
}
SPECS_1D = {"w": P("data"), "v": P("data"), "r": P()}
SPECS_2D = {"w": P("data", "model"), "v": P("model"), "r": P()}


@functools.cache
def mesh_1d(axis_type=AxisType.Explicit):
    return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


@functools.cache
def mesh_2d(axis_type=AxisType.Explicit):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def put(tree, mesh, specs):
    return {
        k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()
    }


def _shard_rows(x, n=8):
    """``(n, rows / n, ...)``: device ``d`` gets rows ``d * rows / n ...``."""
    return x.reshape((n, -1) + x.shape[1:])


def _unshard_rows(x):
    return x.reshape((-1,) + x.shape[2:])


# --------------------------------------------------------------------------
# The fixed-threshold transforms, and their NumPy float64 references.
# --------------------------------------------------------------------------

SOFT_MAX, SOFT_KNEE = 20.0, 0.5


def transforms(axis_name=None, names=None):
    """Every fixed-threshold transform; thresholds chosen so that most clip."""
    txs = {
        "global_l2": oc.clip_by_global_norm(1.0, axis_name=axis_name),
        "global_l1": oc.clip_by_global_norm(50.0, "l1", axis_name=axis_name),
        "global_inf": oc.clip_by_global_norm(1.0, "inf", axis_name=axis_name),
        "block": oc.clip_by_block_norm(2.0, axis_name=axis_name),
        "soft": oc.soft_clip_by_global_norm(SOFT_MAX, SOFT_KNEE, axis_name=axis_name),
        "value": oc.clip_by_value(1.5, axis_name=axis_name),
    }
    return txs if names is None else {k: txs[k] for k in names}


def apply_all(txs, grads):
    """``{name: (clipped updates, pre-clip norm, is_nonfinite)}`` for one step."""
    out = {}
    for name, tx in txs.items():
        updates, state = tx.update(grads, tx.init(grads))
        stats = state.clip_stats
        out[name] = (updates, stats.pre_clip_norm, stats.is_nonfinite)
    return out


def with_chain(grads, names=None):
    """``apply_all``, plus a full chain (clip, then AdamW with params)."""
    out = apply_all(transforms(names=names), grads)
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-2))
    updates, state = tx.update(grads, tx.init(grads), grads)
    stats = oc.get_stats(state)
    out["chain"] = (
        updates,
        stats["clip_by_global_norm/pre_clip_norm"],
        stats["clip_by_global_norm/is_nonfinite"],
    )
    return out


def np_norm(tree, p=2.0):
    x = np.concatenate([np.asarray(v, np.float64).ravel() for v in tree.values()])
    if p == np.inf:
        return float(np.max(np.abs(x)))
    return float(np.sum(np.abs(x) ** p) ** (1.0 / p))


def np_scaled(tree, s):
    return {k: np.asarray(v, np.float64) * s for k, v in tree.items()}


def np_soft(n, c=SOFT_MAX, knee=SOFT_KNEE):
    tau = knee * c
    return n if n <= tau else tau + (c - tau) * -np.expm1(-(n - tau) / (c - tau))


def reference(grads):
    """NumPy float64 ``{name: (clipped updates, pre-clip norm)}``."""
    ref = {}
    for name, c, p in [("global_l2", 1.0, 2.0), ("global_l1", 50.0, 1.0)]:
        n = np_norm(grads, p)
        ref[name] = (np_scaled(grads, min(1.0, c / n)), n)
    n = np_norm(grads, np.inf)
    ref["global_inf"] = (np_scaled(grads, min(1.0, 1.0 / n)), n)
    block = {
        k: np.asarray(v, np.float64) * min(1.0, 2.0 / np_norm({k: v}))
        for k, v in grads.items()
    }
    ref["block"] = (block, np_norm(grads))
    n = np_norm(grads)
    ref["soft"] = (np_scaled(grads, np_soft(n) / n), n)
    clipped = {
        k: np.clip(np.asarray(v, np.float64), -1.5, 1.5) for k, v in grads.items()
    }
    ref["value"] = (clipped, np_norm(grads, np.inf))
    return ref


@functools.cache
def single_device():
    """Every transform and the chain, unsharded on one device (one compile)."""
    return jax.device_get(jax.jit(with_chain)(GRADS))


def check(results, n_shards=1):
    """Asserts full-array results (pre-norms per device) against both references."""
    ref, single = reference(GRADS), single_device()
    assert results and set(results) <= set(single)
    for name, (updates, pre, bad) in results.items():
        assert np.all(np.asarray(bad) == 0), name
        pre = np.broadcast_to(np.asarray(pre), (n_shards,))
        np.testing.assert_allclose(pre, single[name][1], rtol=RTOL, err_msg=name)
        want_pre = ref["global_l2" if name == "chain" else name][1]
        np.testing.assert_allclose(pre, want_pre, rtol=RTOL, err_msg=name)
        for k in GRADS:
            got = np.asarray(updates[k])
            np.testing.assert_allclose(
                got, single[name][0][k], RTOL, ATOL, err_msg=name
            )
            if name != "chain":
                np.testing.assert_allclose(got, ref[name][0][k], RTOL, ATOL)


def out_specs(specs, names):
    """shard_map out_specs of ``apply_all``: updates like the input, scalars P()."""
    return {name: (specs, P(), P()) for name in names}


# --------------------------------------------------------------------------
# pmap
# --------------------------------------------------------------------------


def test_pmap_axis_name_gives_the_global_norm():
    # Every leaf is split by rows over the 8 devices.
    fn = jax.pmap(functools.partial(apply_all, transforms("i")), axis_name="i")
    res = jax.device_get(fn({k: _shard_rows(v) for k, v in GRADS.items()}))
    res = {
        name: ({k: _unshard_rows(u) for k, u in updates.items()}, pre, bad)
        for name, (updates, pre, bad) in res.items()
    }
    check(res, n_shards=8)


def test_pmap_data_parallel_pmean_then_clip_without_axis_name():
    # Each device has its own gradient of the same replicated parameters; the
    # right order is pmean first, then clip without axis_name. Clipping first
    # is wrong, and axis_name on replicated gradients counts them 8 times.
    rng = np.random.default_rng(3)
    grads = {k: GRADS[k] for k in ("w", "v")}
    noise = {k: rng.normal(size=(8,) + v.shape) for k, v in grads.items()}
    per_device = {
        k: (grads[k] + noise[k] - noise[k].mean(0)).astype(np.float32) for k in grads
    }
    mean = {k: per_device[k].astype(np.float64).mean(0) for k in grads}
    tx, wrong = oc.clip_by_global_norm(1.0), oc.clip_by_global_norm(1.0, axis_name="i")

    def step(g):
        clip_first, _ = tx.update(g, tx.init(g))
        g = lax.pmean(g, "i")
        out, state = tx.update(g, tx.init(g))
        _, bad = wrong.update(g, wrong.init(g))
        pre = (state.clip_stats.pre_clip_norm, bad.clip_stats.pre_clip_norm)
        return out, lax.pmean(clip_first, "i"), pre

    out, clip_first, (pre, overcounted) = jax.pmap(step, axis_name="i")(per_device)
    n = np_norm(mean)
    np.testing.assert_allclose(pre, n, rtol=RTOL)
    np.testing.assert_allclose(overcounted, np.sqrt(8.0) * n, rtol=RTOL)
    for k in grads:
        want = np.broadcast_to(mean[k] / n, out[k].shape)
        np.testing.assert_allclose(out[k], want, RTOL, ATOL)
    assert abs(np_norm({k: v[0] for k, v in clip_first.items()}) - 1.0) > 0.05


# --------------------------------------------------------------------------
# shard_map
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, axis_type",
    [("1d_mixed", AxisType.Auto), ("2d_mixed", AxisType.Explicit)],
    ids=["1d_mixed-auto", "2d_mixed-explicit"],
)
def test_shard_map_axis_name_counts_replicated_leaves_once(layout, axis_type):
    if layout == "1d_mixed":
        mesh, specs, axes = mesh_1d(axis_type), SPECS_1D, "data"
    else:
        mesh, specs, axes = mesh_2d(axis_type), SPECS_2D, ("data", "model")
    txs = transforms(axes)
    # check_vma=True (the default) also proves statically that every norm is
    # replicated: out_specs P() is refused for a value that may vary.
    fn = jax.jit(
        jax.shard_map(
            functools.partial(apply_all, txs),
            mesh=mesh,
            in_specs=(specs,),
            out_specs=out_specs(specs, txs),
        )
    )
    check(jax.device_get(fn(put(GRADS, mesh, specs))))


@functools.cache
def _norms_without_vma():
    """Per-device pre-clip norms under shard_map(check_vma=False), one compile."""
    plain = oc.clip_by_global_norm(1.0)
    named = oc.clip_by_global_norm(1.0, axis_name="data")

    def pre(tx, g):
        return tx.update(g, tx.init(g))[1].clip_stats.pre_clip_norm[None]

    def f(g):
        sharded = {k: g[k] for k in ("w", "v")}
        return pre(plain, g), pre(named, g), pre(named, sharded)

    fn = jax.shard_map(
        f, mesh=mesh_1d(), in_specs=(SPECS_1D,), out_specs=P("data"), check_vma=False
    )
    return jax.device_get(jax.jit(fn)(put(GRADS, mesh_1d(), SPECS_1D)))


def test_without_axis_name_the_norm_is_per_shard():
    # The failure the other tests guard against: without axis_name each device
    # clips by the norm of its own shard (plus the replicated leaf).
    per_device = _norms_without_vma()[0]
    shards = [
        np_norm({"w": w, "v": v, "r": GRADS["r"]})
        for w, v in zip(_shard_rows(GRADS["w"]), _shard_rows(GRADS["v"]), strict=True)
    ]
    np.testing.assert_allclose(per_device, shards, rtol=RTOL)
    assert np.all(np.abs(per_device - np_norm(GRADS)) > 0.1 * np_norm(GRADS))


def test_shard_map_without_vma_treats_every_leaf_as_a_shard():
    # With check_vma=False JAX carries no replication information: every leaf
    # is summed over the named axes. Right when every leaf is a shard...
    _, all_leaves, sharded_only = _norms_without_vma()
    sharded = {k: GRADS[k] for k in ("w", "v")}
    np.testing.assert_allclose(sharded_only, np_norm(sharded), rtol=RTOL)
    # ...and a replicated leaf then counts once per device (documented).
    want = np.sqrt(np_norm(sharded) ** 2 + 8 * np_norm({"r": GRADS["r"]}) ** 2)
    np.testing.assert_allclose(all_leaves, want, rtol=RTOL)


def test_shard_map_unknown_axis_name_raises():
    tx = oc.clip_by_global_norm(1.0, axis_name="batch")
    fn = jax.shard_map(
        lambda g: tx.update(g, tx.init(g))[1].clip_stats.pre_clip_norm,
        mesh=mesh_1d(),
        in_specs=(SPECS_1D,),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match="not a mesh axis"):
        jax.eval_shape(fn, put(GRADS, mesh_1d(), SPECS_1D))


@functools.cache
def _shard_map_1d_fn():
    txs = transforms("data", names=["global_l2", "global_l1", "block", "soft"])
    return jax.jit(
        jax.shard_map(
            functools.partial(apply_all, txs),
            mesh=mesh_1d(),
            in_specs=(SPECS_1D,),
            out_specs=out_specs(SPECS_1D, txs),
        )
    )


@pytest.mark.parametrize("bad", [1e30, np.nan], ids=["overflow", "nan"])
def test_shard_map_overflow_or_nan_on_one_device_only(bad):
    # The overflow fallback (a lax.cond holding collectives) must be taken by
    # every device alike: it is decided on the already reduced total.
    grads = {k: v.copy() for k, v in GRADS.items()}
    grads["w"][7, 3] = bad  # rows 6 and 7 live on device 3 only
    res = jax.device_get(_shard_map_1d_fn()(put(grads, mesh_1d(), SPECS_1D)))
    if np.isnan(bad):
        for name, (updates, pre, flag) in res.items():
            assert np.isnan(pre) and flag == 1, name
            if name != "block":  # block: only the NaN leaf is NaN
                assert all(np.all(np.isnan(u)) for u in updates.values()), name
        assert np.all(np.isnan(res["block"][0]["w"]))
        assert np.all(np.isfinite(res["block"][0]["v"]))
        return
    ref = reference(grads)
    for name, (updates, pre, flag) in res.items():
        assert flag == 0, name
        np.testing.assert_allclose(pre, ref[name][1], rtol=RTOL, err_msg=name)
        for k in grads:
            np.testing.assert_allclose(updates[k], ref[name][0][k], RTOL, ATOL)
    assert abs(np_norm(res["global_l2"][0]) - 1.0) < 1e-5


# --------------------------------------------------------------------------
# Sharded jit (no axis_name: XLA inserts the collectives)
# --------------------------------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*(\S.*?)\s+(all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter|collective-broadcast)(?:-start)?\("
)


def collective_shapes(hlo_text):
    """``[(op, result type)]`` for every cross-device collective in the HLO."""
    return [(m.group(2), m.group(1)) for m in _COLLECTIVE.finditer(hlo_text)]


def test_collective_parser_sees_an_all_gather():
    # Guards the no-all-gather assertion below against a parser that sees nothing.
    mesh = mesh_1d(AxisType.Auto)
    x = jax.device_put(GRADS["w"], NamedSharding(mesh, P("data")))
    gather = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P()))
    ops = collective_shapes(gather.lower(x).compile().as_text())
    assert any(op == "all-gather" and "[16,8]" in t for op, t in ops), ops


JIT_LAYOUTS = {
    "data_parallel": (mesh_1d, {"w": P(), "v": P(), "r": P()}),
    "fsdp": (mesh_1d, SPECS_1D),
    "data_x_model": (mesh_2d, SPECS_2D),
}
# One transform per norm routine (global_norm, leaf_norms, reduce_max).
ONE_PER_ROUTINE = ("global_l2", "block", "value")


@pytest.mark.parametrize(
    "axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"]
)
@pytest.mark.parametrize("layout", list(JIT_LAYOUTS))
def test_sharded_jit_matches_one_device_without_gathering(layout, axis_type):
    make_mesh, specs = JIT_LAYOUTS[layout]
    mesh = make_mesh(axis_type)
    grads = put(GRADS, mesh, specs)
    # Every transform and a chain where the gradients are sharded under
    # Explicit axes (there a norm that ravels or concatenates leaves raises
    # ShardingTypeError); one per norm routine elsewhere, to keep it short.
    full = axis_type == AxisType.Explicit and layout != "data_parallel"
    fn = functools.partial(with_chain, names=None if full else ONE_PER_ROUTINE)
    compiled = jax.jit(fn).lower(grads).compile()
    out = compiled(grads)
    check(jax.device_get(out))
    # Only scalar partial sums cross devices: no gradient-sized all-gather.
    ops = collective_shapes(compiled.as_text())
    for op, result_type in ops:
        dims = re.findall(r"\[([^\]]*)\]", result_type)
        assert all(d == "" for d in dims), (op, result_type)
    if layout != "data_parallel":
        assert any(op == "all-reduce" for op, _ in ops)
    if axis_type == AxisType.Explicit:  # the updates stay sharded like the input
        for name, (updates, *_) in out.items():
            for k in GRADS:
                same = updates[k].sharding.is_equivalent_to(
                    grads[k].sharding, GRADS[k].ndim
                )
                assert same, (name, k, updates[k].sharding)
    if layout != "data_parallel":
        _check_nan_on_one_shard(compiled, mesh, specs)


def _check_nan_on_one_shard(compiled, mesh, specs):
    """A NaN held by one device only is seen by all (same compiled function).

    XLA's cross-device max drops NaN on the CPU backend, so a norm that
    relies on a max to see NaN (the inf-norm, the rescaled overflow path)
    would come out finite here.
    """
    grads = {k: v.copy() for k, v in GRADS.items()}
    grads["w"][13, 6] = np.nan  # a single element of one shard
    res = jax.device_get(compiled(put(grads, mesh, specs)))
    for name, (updates, pre, bad) in res.items():
        assert bad == 1, name
        assert np.isnan(pre), name
        if name in ("value", "block"):  # only the NaN element / leaf is NaN
            assert np.all(np.isfinite(updates["v"])), name
        else:  # propagate: the whole step is NaN, never a silent clip
            assert all(np.all(np.isnan(u)) for u in updates.values()), name


# --------------------------------------------------------------------------
# The other registered transforms (adaptive thresholds, guards): many steps
# under shard_map, pmap and sharded jit; the statistics (thresholds, EMAs,
# skip counters) identical on all devices and equal to one device's. Each
# test compiles one function for all the transforms.
# --------------------------------------------------------------------------

STEPS = 12
# A spike at step 5, a tiny step at 9, and a NaN on one device only at step 7.
SCALES = np.array([1, 1.2, 0.9, 1.1, 1, 20, 1, 0.8, 1.3, 1e-3, 1, 1], np.float32)
NAN_STEP, NAN_ROW = 7, 5  # rows 4 and 5 of "w" live on device 2
_FIXED = {
    "clip_by_global_norm",
    "clip_by_block_norm",
    "soft_clip_by_global_norm",
    "clip_by_value",
}
# Transforms without an axis_name: only sharded jit applies to them.
NO_AXIS_NAME = {"adaptive_grad_clip", "clip_by_spectral_norm"}
MANY_STEP_CASES = [c for c in CASES if c.name not in _FIXED]
AXIS_CASES = [c for c in MANY_STEP_CASES if c.name not in NO_AXIS_NAME]
MS_SPECS = {"w": P("data"), "v": P()}  # one split leaf, one replicated
MS_SEQ_SPECS = {"w": P(None, "data"), "v": P()}


def _accepts_axis_name(fn):
    try:
        return "axis_name" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _build(case, axis_name=None):
    """The registry case with ``axis_name`` (wrappers: on the guard and its clip)."""
    if axis_name is None:
        return case.build()
    if _accepts_axis_name(case.make):
        return case.build(axis_name=axis_name)
    assert case.wrapper, case.name
    kwargs = dict(case.kwargs)
    inner = oc.clip_by_global_norm(kwargs.pop("max_norm"), axis_name=axis_name)
    return getattr(oc, case.name)(inner, **kwargs, axis_name=axis_name)


@functools.cache
def _sequence():
    """``(gradients of every step, params)``, as NumPy arrays."""
    rng = np.random.default_rng(1)
    base = {k: GRADS[k] for k in ("w", "v")}
    seq = {
        k: np.stack([s * (v + 0.3 * rng.normal(size=v.shape)) for s in SCALES])
        for k, v in base.items()
    }
    seq = {k: v.astype(np.float32) for k, v in seq.items()}
    seq["w"][NAN_STEP, NAN_ROW, 0] = np.nan
    return seq, {k: np.full_like(v, 0.5) for k, v in base.items()}


def _run_steps(case, tx, seq, params):
    """Scans ``STEPS`` updates; returns the last updates and per-step stats."""

    def body(carry, g):
        updates, state = tx.update(g, carry[1], params, **case.extra_args)
        return (updates, state), oc.get_stats(state)

    zeros = jax.tree.map(lambda x: jnp.zeros_like(x[0]), seq)
    (updates, _), history = lax.scan(body, (zeros, tx.init(params)), seq)
    return updates, history


def _run_cases(cases, axis_name=None):
    def run(seq, params):
        return {c.name: _run_steps(c, _build(c, axis_name), seq, params) for c in cases}

    return run


@functools.cache
def _many_step_reference():
    return jax.device_get(jax.jit(_run_cases(MANY_STEP_CASES))(*_sequence()))


def _check_many(results, cases, mode):
    ref = _many_step_reference()
    assert set(results) == {c.name for c in cases}
    for name, (updates, hist) in results.items():
        ref_updates, ref_hist = ref[name]
        assert set(hist) == set(ref_hist), (mode, name)
        for key, want in ref_hist.items():
            got = hist[key]
            np.testing.assert_allclose(got, want, RTOL, ATOL, err_msg=f"{mode} {key}")
        for k, want in ref_updates.items():
            np.testing.assert_allclose(updates[k], want, RTOL, ATOL, err_msg=mode)


@pytest.mark.slow
def test_many_steps_reference_and_api():
    for case in MANY_STEP_CASES:
        hist = _many_step_reference()[case.name][1]
        assert hist, f"{case.name} records no statistics"
        assert hist[f"{case.name}/is_nonfinite"][NAN_STEP] == 1, case.name
        assert hist[f"{case.name}/num_updates"][-1] == STEPS, case.name
    for case in AXIS_CASES:
        assert _accepts_axis_name(getattr(oc, case.name)), case.name


@pytest.mark.slow
def test_many_steps_shard_map_states_are_replicated():
    # check_vma=True: out_specs P() for the statistics proves statically that
    # they are the same on every device; their values equal one device's.
    ref = _many_step_reference()
    stats_specs = {
        c.name: (MS_SPECS, jax.tree.map(lambda _: P(), ref[c.name][1]))
        for c in AXIS_CASES
    }
    fn = jax.shard_map(
        _run_cases(AXIS_CASES, "data"),
        mesh=mesh_1d(),
        in_specs=(MS_SEQ_SPECS, MS_SPECS),
        out_specs=stats_specs,
    )
    seq, params = _sequence()
    args = put(seq, mesh_1d(), MS_SEQ_SPECS), put(params, mesh_1d(), MS_SPECS)
    _check_many(jax.device_get(jax.jit(fn)(*args)), AXIS_CASES, "shard_map")


@pytest.mark.slow
def test_many_steps_pmap_states_identical_on_all_devices():
    seq, params = _sequence()
    # Every leaf split by rows: (devices, steps, rows / 8, ...).
    p_seq = {
        k: np.moveaxis(_shard_rows(np.moveaxis(v, 0, 1)), 2, 1) for k, v in seq.items()
    }
    p_params = {k: _shard_rows(v) for k, v in params.items()}
    fn = jax.pmap(_run_cases(AXIS_CASES, "i"), axis_name="i")
    res = jax.device_get(fn(p_seq, p_params))
    for _, hist in res.values():
        for key, h in hist.items():  # bitwise equal on every device
            np.testing.assert_array_equal(h, np.broadcast_to(h[:1], h.shape), key)
    res = {
        name: (
            {k: _unshard_rows(u) for k, u in upd.items()},
            {k: h[0] for k, h in hist.items()},
        )
        for name, (upd, hist) in res.items()
    }
    _check_many(res, AXIS_CASES, "pmap")


@pytest.mark.slow
def test_many_steps_sharded_jit_explicit_fsdp():
    seq, params = _sequence()
    args = put(seq, mesh_1d(), MS_SEQ_SPECS), put(params, mesh_1d(), MS_SPECS)
    res = jax.jit(_run_cases(MANY_STEP_CASES))(*args)
    _check_many(jax.device_get(res), MANY_STEP_CASES, "jit")


@pytest.mark.parametrize("spec", [P(None, "data", None), P(None, None, "data")])
def test_agc_explicit_mesh_with_sharded_unit_axes(spec):
    # The statistics are reduced array by array: raveling or concatenating
    # unit norms sharded along a kept axis raised ShardingTypeError.
    rng = np.random.default_rng(3)
    grads = {
        "k": rng.normal(size=(16, 8, 8)).astype(np.float32),
        "b": rng.normal(size=(8,)).astype(np.float32),
    }
    params = {
        k: (0.5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in grads.items()
    }
    specs = {"k": spec, "b": P()}
    tx = oc.adaptive_grad_clip(0.05)

    def step(g, p):
        out, state = tx.update(g, tx.init(p), p)
        return out, oc.get_stats(state)

    want_out, want_stats = jax.device_get(jax.jit(step)(grads, params))
    mesh = mesh_1d()
    got_out, got_stats = jax.device_get(
        jax.jit(step)(put(grads, mesh, specs), put(params, mesh, specs))
    )
    assert int(want_stats["adaptive_grad_clip/clipped_units"]) > 0
    for k in grads:
        np.testing.assert_allclose(got_out[k], want_out[k], RTOL, ATOL)
    for key, want in want_stats.items():
        np.testing.assert_allclose(got_stats[key], want, RTOL, ATOL, err_msg=key)
    # NumPy float64: the post-clip norm of the whole update.
    post = np.sqrt(
        sum(np.sum(np.asarray(v, np.float64) ** 2) for v in want_out.values())
    )
    np.testing.assert_allclose(
        got_stats["adaptive_grad_clip/post_clip_norm"], post, 1e-5
    )
