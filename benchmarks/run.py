"""Benchmarks of optax_clip against optax and PyTorch, written to ``results.md``.

Run from the repository root::

  python -m benchmarks.run --quick   # 10M parameters, optax compile up to 1000
                                     # leaves (about half an hour on 2 cores)
  python -m benchmarks.run --full    # 10M and 100M parameters, optax compile at
                                     # 3000 leaves (about 90 minutes on 2 cores)
  python -m benchmarks.run --tiny    # seconds; what tests/test_benchmarks.py runs

Sections (``--sections abcde`` picks some):

a. Train-step overhead: ``chain(clip, adamw)`` vs ``adamw`` alone, for
   ``optax_clip.clip_by_global_norm`` and ``optax.clip_by_global_norm``,
   float32 parameters with float32 and with bfloat16 gradients.
b. The clip alone vs the memory floor (one reduction pass and one scale pass
   over the same arrays, the simplest jitted code), and vs optax.
c. The clip alone vs ``torch.nn.utils.clip_grad_norm_(..., foreach=True)`` on
   CPU, on the same values (skipped when torch is not installed; the ``bench``
   extra installs it). Sections b and c are timed together.
d. Compile time of the clip and of ``chain(clip, adamw)`` at 100, 1000 and 3000
   leaves, optax_clip vs optax, each in a fresh subprocess with a timeout.
e. The adaptive transforms and guards that exist in this version of optax_clip
   vs static global-norm clipping, in the same train step.
f. Trees like users': a transformer-shaped tree (embedding, attention and MLP
   matrices, biases, norm scales), and the same tree with a feature that has
   made a clip slow before (an all-zero leaf, an all-zero tree, a leaf of one
   repeated value, a leaf of subnormals, float32 and bf16 leaves mixed, tiny
   and large leaves mixed): each transform alone, time with the feature /
   time without it (same compiled function where the dtypes allow).
g. The whole train step of a GPT-style Flax NNX model (loss, value_and_grad,
   ``optimizer.update``) with every clip and guard, vs adamw alone, and the
   same model in PyTorch with and without ``clip_grad_norm_``; sizes are
   presets (``--gpt tiny|small|large``, or several: ``--gpt small,large``).
   Not in the default sections: ask for it (``--sections g``). See
   ``benchmarks/train_step.py``.

Method: every variant of a table runs in one process on the same arrays, jitted
once and warmed up, then timed in interleaved repetitions (the order rotates
each repetition) with ``jax.block_until_ready``; a table reports the median
time of each variant and, for each ratio, the median over repetitions of the
ratio of the two variants' times in that repetition (robust to load that
drifts during the run). Train steps donate the parameters and optimizer
state, as a real train step would; the clip alone reads the same gradients
every call (so it always clips) and writes into a donated output buffer.
torch is timed in its own loop after the JAX variants (its idle OpenMP
threads spin and slow whatever runs next). Timings on a shared machine are
noisy: compare ratios, not absolute times, and note the load recorded in the
results.

Several runs (e.g. one section each) can be saved with ``--json FILE`` and
combined into one report with ``--merge FILE [FILE ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_clip as oc

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results.md"
MAX_NORM = 1.0
M = 1_000_000


@dataclasses.dataclass
class Preset:
    """Sizes and repetitions of one mode."""

    sizes: list[tuple[int, int]]  # (total parameters, leaves)
    grad_dtypes: tuple[str, ...]
    reps: int
    warmup: int
    compile_leaves: list[int]
    compile_shape: tuple[int, ...]
    optax_compile_max: int  # optax is compiled up to this many leaves
    adaptive_sizes: list[tuple[int, int]]
    transformer: tuple[int, int, int] = (384, 6, 8192)  # d_model, layers, vocab
    gpt: str = "small"  # section g's model (benchmarks/train_step.py)


PRESETS = {
    "tiny": Preset(
        sizes=[(4096, 4)],
        grad_dtypes=("float32",),
        reps=2,
        warmup=1,
        compile_leaves=[4],
        compile_shape=(8,),
        optax_compile_max=4,
        adaptive_sizes=[(4096, 4)],
        transformer=(16, 1, 64),
        gpt="tiny",
    ),
    "quick": Preset(
        sizes=[(10 * M, 16), (10 * M, 256), (10 * M, 2048)],
        grad_dtypes=("float32", "bfloat16"),
        reps=9,
        warmup=2,
        compile_leaves=[100, 1000, 3000],
        compile_shape=(8,),
        optax_compile_max=1000,
        adaptive_sizes=[(10 * M, 256)],
    ),
    "full": Preset(
        sizes=[
            (10 * M, 16),
            (10 * M, 256),
            (10 * M, 2048),
            (100 * M, 16),
            (100 * M, 256),
            (100 * M, 2048),
        ],
        grad_dtypes=("float32", "bfloat16"),
        reps=11,
        warmup=2,
        compile_leaves=[100, 1000, 3000],
        compile_shape=(8,),
        optax_compile_max=3000,
        adaptive_sizes=[(10 * M, 256), (10 * M, 2048)],
        gpt="large",
    ),
}


# --------------------------------------------------------------------------
# Arrays and timing.
# --------------------------------------------------------------------------


def leaf_shapes(total: int, n_leaves: int) -> list[tuple[int, ...]]:
    """``n_leaves`` equal leaves holding about ``total`` values (matrices if big)."""
    size = max(1, total // n_leaves)
    if size >= 1024:
        size -= size % 128
        return [(size // 128, 128)] * n_leaves
    return [(size,)] * n_leaves


def make_tree(shapes, dtype, seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    """A dict of random normal leaves (global norm well above ``MAX_NORM``)."""
    key = jax.random.key(seed)
    out = {}
    for i, shape in enumerate(shapes):
        leaf_key = jax.random.fold_in(key, i)
        out[f"w{i:05d}"] = (scale * jax.random.normal(leaf_key, shape)).astype(dtype)
    return jax.block_until_ready(out)


def tree_copy(tree):
    return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_interleaved(
    cases: dict[str, Callable[[], Any]], reps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each case, interleaved, after ``warmup`` rounds."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            jax.block_until_ready(cases[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            jax.block_until_ready(cases[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(ts: list[float]) -> float:
    return 1e3 * statistics.median(ts)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repetitions of ``num[r] / den[r]``."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


class TrainStep:
    """``params, state = step(params, state, grads)``, donating params and state."""

    def __init__(self, tx: optax.GradientTransformation, params, grads):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.fn = jax.jit(step, donate_argnums=(0, 1))
        self.params = tree_copy(params)
        # Copied: an init may share one buffer between fields (not donatable).
        self.state = tree_copy(tx.init(self.params))
        self.grads = grads

    def __call__(self):
        self.params, self.state = self.fn(self.params, self.state, self.grads)
        return self.params

    def temp_mb(self) -> float:
        """Temporary memory the compiled step reserves (outputs excluded), MB."""
        compiled = self.fn.lower(self.params, self.state, self.grads).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 1e6


class ClipAlone:
    """``out, state = clip(grads, state)`` on the same gradients every call.

    The gradients are not donated: fed back, the clipped output would sit at
    the threshold from the second call on and time the "nothing to clip"
    case. Each call reads the gradients (norm), reads them again and writes
    the output (scale), as in a train step where the gradients are fresh. The
    output goes into a donated buffer of the same shapes (the last output), so
    no call allocates: fresh multi-megabyte outputs made the timings depend
    on the allocator (up to 1.4x between two runs of the same program).
    """

    def __init__(self, tx: optax.GradientTransformation, grads):
        def step(g, out, s):
            del out  # only its buffer is reused
            return tx.update(g, s)

        self.fn = jax.jit(step, donate_argnums=(1, 2))
        self.grads = tree_copy(grads)
        self.out = tree_copy(grads)
        self.state = tree_copy(tx.init(self.grads))

    def __call__(self):
        self.out, self.state = self.fn(self.grads, self.out, self.state)
        return self.out

    @classmethod
    def sharing(cls, other: ClipAlone, grads) -> ClipAlone:
        """A case on other gradients with ``other``'s jitted function."""
        case = cls.__new__(cls)
        case.fn = other.fn
        case.grads = tree_copy(grads)
        case.out = tree_copy(grads)
        case.state = tree_copy(other.state)
        return case


def _read_pass(grads):
    """One reduction pass over the gradients (the least a global norm costs)."""
    leaves = jax.tree.leaves(grads)
    return jnp.sum(
        jnp.stack([jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves])
    )


def _floor_clip(grads):
    """The memory floor: one reduction pass and one scale pass, nothing else."""
    leaves = jax.tree.leaves(grads)
    total = jnp.sum(
        jnp.stack([jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves])
    )
    c = jnp.minimum(1.0, MAX_NORM / jnp.sqrt(total))
    return jax.tree.map(lambda x: (x.astype(jnp.float32) * c).astype(x.dtype), grads)


class FloorClip:
    """:func:`_floor_clip` on its own copy of the arrays (output buffer as above)."""

    def __init__(self, grads, flat: bool = False):
        self.fn = jax.jit(lambda g, out: _floor_clip(g), donate_argnums=1)
        if flat:  # the same number of bytes in one contiguous buffer
            leaves = jax.tree.leaves(grads)
            n = sum(x.size for x in leaves)
            self.grads = jnp.ones((n,), leaves[0].dtype)
        else:
            self.grads = tree_copy(grads)
        self.out = tree_copy(self.grads)

    def __call__(self):
        self.out = self.fn(self.grads, self.out)
        return self.out


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


class TorchClip:
    """``torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)``, CPU.

    In place, so from the second call on the norm is at the threshold; torch
    multiplies by the clamped coefficient anyway (same traffic every call).
    """

    def __init__(self, grads):
        import torch

        self.torch = torch
        self.params = []
        for x in jax.tree.leaves(grads):
            tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
                str(x.dtype)
            ]
            p = torch.empty(x.shape, dtype=tdtype)
            p.grad = torch.from_numpy(np.array(x, np.float32)).to(tdtype)
            self.params.append(p)

    def __call__(self):
        with self.torch.no_grad():
            return self.torch.nn.utils.clip_grad_norm_(
                self.params, MAX_NORM, foreach=True
            )


def adamw():
    return optax.adamw(1e-3, weight_decay=1e-4)


def skip_aware_adamw():
    """:func:`adamw`'s optimizer from optax_clip: the guards' fast path."""
    return oc.adamw(1e-3, weight_decay=1e-4)


# --------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------


def _size_label(total: int, n: int, dtype: str) -> str:
    t = f"{total / M:g}M" if total >= M else f"{total:,}"
    return f"{t} / {n} leaves / {'bf16' if dtype == 'bfloat16' else 'f32'} grads"


def section_a(preset: Preset, log) -> list[dict]:
    """Train-step overhead of chain(clip, adamw) over adamw."""
    rows = []
    for total, n in preset.sizes:
        shapes = leaf_shapes(total, n)
        params = make_tree(shapes, jnp.float32, seed=1, scale=0.02)
        for dtype in preset.grad_dtypes:
            grads = make_tree(shapes, dtype, seed=2)
            read = jax.jit(_read_pass)
            cases = {
                "adamw": TrainStep(adamw(), params, grads),
                "read": lambda read=read, grads=grads: read(grads),
                "optax_clip": TrainStep(
                    optax.chain(oc.clip_by_global_norm(MAX_NORM), adamw()),
                    params,
                    grads,
                ),
                "optax": TrainStep(
                    optax.chain(optax.clip_by_global_norm(MAX_NORM), adamw()),
                    params,
                    grads,
                ),
            }
            ts = time_interleaved(cases, preset.reps, preset.warmup)
            row = {
                "size": _size_label(sum(math.prod(s) for s in shapes), n, dtype),
                **{f"{k}_ms": median_ms(v) for k, v in ts.items()},
                "optax_clip_ratio": paired_ratio(ts["optax_clip"], ts["adamw"]),
                "optax_ratio": paired_ratio(ts["optax"], ts["adamw"]),
                # adamw plus one read of the gradients: the least any clip adds
                "bound_ratio": 1 + paired_ratio(ts["read"], ts["adamw"]),
                **{
                    f"{k}_temp_mb": cases[k].temp_mb()
                    for k in ("adamw", "optax_clip", "optax")
                },
            }
            log(f"[a] {row}")
            rows.append(row)
            del cases, grads
            gc.collect()
        del params
        gc.collect()
    return rows


def section_bc(preset: Preset, log, use_torch: bool) -> list[dict]:
    """The clip alone vs the memory floor, optax and torch."""
    rows = []
    for total, n in preset.sizes:
        shapes = leaf_shapes(total, n)
        for dtype in preset.grad_dtypes:
            grads = make_tree(shapes, dtype, seed=3)
            cases: dict[str, Callable[[], Any]] = {
                "optax_clip": ClipAlone(oc.clip_by_global_norm(MAX_NORM), grads),
                "floor": FloorClip(grads),
                "optax": ClipAlone(optax.clip_by_global_norm(MAX_NORM), grads),
                "flat_floor": FloorClip(grads, flat=True),
            }
            torch_case = TorchClip(grads) if use_torch else None
            nbytes = tree_bytes(grads)
            del grads
            ts = time_interleaved(cases, preset.reps, preset.warmup)
            if torch_case is not None:
                # Timed on its own: torch's idle OpenMP threads spin after each
                # call and took the 2 cores from the JAX case timed next (that
                # case ran 1.3x slower when interleaved).
                ts.update(time_interleaved({"torch": torch_case}, preset.reps, 3))
                time.sleep(1.0)  # let them go idle before the next JAX timing
            med = {k: median_ms(v) for k, v in ts.items()}
            row = {
                "size": _size_label(sum(math.prod(s) for s in shapes), n, dtype),
                **{f"{k}_ms": v for k, v in med.items()},
                "floor_ratio": paired_ratio(ts["optax_clip"], ts["floor"]),
                "optax_ratio": paired_ratio(ts["optax_clip"], ts["optax"]),
                # bytes moved by the ideal clip: read (reduce), read + write (scale)
                "flat_floor_gbs": 3 * nbytes / (med["flat_floor"] * 1e-3) / 1e9,
                "optax_clip_gbs": 3 * nbytes / (med["optax_clip"] * 1e-3) / 1e9,
            }
            if use_torch:  # not paired: separate loops
                row["torch_ratio"] = med["optax_clip"] / med["torch"]
            log(f"[bc] {row}")
            rows.append(row)
            del cases
            gc.collect()
    return rows


def _adaptive_variants() -> dict[str, optax.GradientTransformation]:
    """chain(X, adamw) for every adaptive transform / guard this version has,
    and for the per-leaf static clip (which shares adagc's per-leaf path)."""
    clip = oc.clip_by_global_norm(MAX_NORM)
    out = {"clip_by_global_norm": optax.chain(clip, adamw())}
    for name, make in [
        ("clip_by_block_norm", lambda: oc.clip_by_block_norm(MAX_NORM)),
        ("zclip", lambda: oc.zclip()),
        ("autoclip", lambda: oc.autoclip()),
        ("adagc", lambda: oc.adagc()),
    ]:
        if hasattr(oc, name):
            out[name] = optax.chain(make(), adamw())
    for name in ("skip_nonfinite", "skip_on_spike"):
        if hasattr(oc, name):
            guard = getattr(oc, name)
            out[f"{name}(clip+adamw)"] = guard(optax.chain(clip, adamw()))
            if hasattr(oc, "adamw"):  # the fast path
                out[f"{name}(clip+oc.adamw)"] = guard(
                    optax.chain(clip, skip_aware_adamw())
                )
    return out


def section_e(preset: Preset, log) -> list[dict]:
    rows = []
    for total, n in preset.adaptive_sizes:
        shapes = leaf_shapes(total, n)
        params = make_tree(shapes, jnp.float32, seed=1, scale=0.02)
        grads = make_tree(shapes, jnp.float32, seed=2)
        cases = {
            k: TrainStep(tx, params, grads) for k, tx in _adaptive_variants().items()
        }
        ts = time_interleaved(cases, preset.reps, preset.warmup)
        ref = ts["clip_by_global_norm"]
        size = _size_label(sum(math.prod(s) for s in shapes), n, "float32")
        for name, t in ts.items():
            row = {
                "size": size,
                "transform": name,
                "ms": median_ms(t),
                "ratio": paired_ratio(t, ref),
            }
            log(f"[e] {row}")
            rows.append(row)
        del cases, params, grads
        gc.collect()
    return rows


# --------------------------------------------------------------------------
# Section f: trees like users', and features that once made a clip slow.
# --------------------------------------------------------------------------


def transformer_shapes(d: int, layers: int, vocab: int) -> dict[str, Any]:
    """Leaf shapes of a GPT-style model: embeddings, attention, MLP, norms."""
    block = {
        "qkv": (d, 3 * d),
        "qkv_bias": (3 * d,),
        "out": (d, d),
        "out_bias": (d,),
        "up": (d, 4 * d),
        "up_bias": (4 * d,),
        "down": (4 * d, d),
        "down_bias": (d,),
        "ln1_scale": (d,),
        "ln2_scale": (d,),
    }
    shapes: dict[str, Any] = {"embed": (vocab, d), "pos": (256, d)}
    shapes.update({f"block{i}": dict(block) for i in range(layers)})
    shapes["ln_f_scale"] = (d,)
    return shapes


def transformer_tree(d: int, layers: int, vocab: int, dtype="float32", seed=5):
    """Random normal leaves of :func:`transformer_shapes`, in ``dtype``."""
    shapes = transformer_shapes(d, layers, vocab)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    flat = jax.tree.leaves(shapes, is_leaf=is_shape)
    key = jax.random.key(seed)
    leaves = [
        jax.random.normal(jax.random.fold_in(key, i), shape).astype(dtype)
        for i, shape in enumerate(flat)
    ]
    treedef = jax.tree.structure(shapes, is_leaf=is_shape)
    return jax.block_until_ready(treedef.unflatten(leaves))


def trap_trees(tree) -> dict[str, Any]:
    """``tree`` and copies with one feature each (see section f)."""
    leaves, treedef = jax.tree.flatten(tree)
    middle = len(leaves) // 2

    def replaced(i, value):
        new = list(leaves)
        new[i] = value
        return jax.block_until_ready(treedef.unflatten(new))

    dtype = leaves[0].dtype
    tiny = 1e-40 if dtype != jnp.float16 else 1e-7  # subnormal in the dtype
    return {
        "healthy": tree,
        "zero leaf": replaced(middle, jnp.zeros_like(leaves[middle])),
        "all-zero tree": jax.tree.map(jnp.zeros_like, tree),
        "repeated value": replaced(1, jnp.full_like(leaves[1], 0.125)),
        "subnormal leaf": replaced(middle, jnp.full_like(leaves[middle], tiny)),
        "tiny and large leaves": jax.tree.map(
            lambda x: x * jnp.asarray(1e-12 if x.ndim == 1 else 1e6, x.dtype), tree
        ),
        "f32 and bf16 leaves": jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if x.ndim == 1 else x, tree
        ),
    }


def _trap_transforms() -> dict[str, optax.GradientTransformation]:
    return {
        "clip_by_global_norm": oc.clip_by_global_norm(MAX_NORM),
        "clip_by_block_norm": oc.clip_by_block_norm(MAX_NORM),
        "soft_clip_by_global_norm": oc.soft_clip_by_global_norm(MAX_NORM),
        "clip_by_value": oc.clip_by_value(0.01),
        "zclip": oc.zclip(),
        "autoclip": oc.autoclip(),
        "adagc": oc.adagc(warmup_steps=0),
    }


def section_f(preset: Preset, log) -> list[dict]:
    rows = []
    for dtype in preset.grad_dtypes:
        tree = transformer_tree(*preset.transformer, dtype)
        leaves = jax.tree.leaves(tree)
        size = sum(x.size for x in leaves)
        trees = trap_trees(tree)
        if dtype != "float32":
            del trees["f32 and bf16 leaves"]
        for name, tx in _trap_transforms().items():
            base = ClipAlone(tx, trees["healthy"])
            cases = {v: ClipAlone.sharing(base, g) for v, g in trees.items()}
            ts = time_interleaved(cases, preset.reps, preset.warmup)
            for variant, t in ts.items():
                row = {
                    "tree": f"transformer {size / M:.1f}M / {len(leaves)} "
                    f"leaves / {'bf16' if dtype == 'bfloat16' else 'f32'}",
                    "transform": name,
                    "variant": variant,
                    "ms": median_ms(t),
                    "ratio": paired_ratio(t, ts["healthy"]),
                }
                log(f"[f] {row}")
                rows.append(row)
            del cases, base
            gc.collect()
    return rows


# --------------------------------------------------------------------------
# Section d: compile time, in subprocesses (a timeout can stop one).
# --------------------------------------------------------------------------


def _compile_one(impl: str, what: str, leaves: int, shape: tuple[int, ...]) -> dict:
    struct = {
        f"w{i:05d}": jax.ShapeDtypeStruct(shape, jnp.float32) for i in range(leaves)
    }
    clip = (
        oc.clip_by_global_norm(MAX_NORM)
        if impl == "optax_clip"
        else optax.clip_by_global_norm(MAX_NORM)
    )
    per_leaf = {
        ("optax_clip", "block"): lambda: oc.clip_by_block_norm(MAX_NORM),
        ("optax", "block"): lambda: optax.clip_by_block_rms(MAX_NORM),
        ("optax_clip", "adagc"): oc.adagc,
    }
    if what in ("block", "adagc"):
        tx = per_leaf[impl, what]()
        fn = jax.jit(lambda g, s: tx.update(g, s), donate_argnums=(0, 1))
        args = (struct, jax.eval_shape(tx.init, struct))
    elif what == "clip":
        tx = clip
        fn = jax.jit(lambda g, s: tx.update(g, s), donate_argnums=(0, 1))
        args = (struct, jax.eval_shape(tx.init, struct))
    else:
        tx = optax.chain(clip, adamw())

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        fn = jax.jit(step, donate_argnums=(0, 1))
        args = (struct, jax.eval_shape(tx.init, struct), struct)
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    c0 = time.process_time()
    lowered.compile()
    t2 = time.perf_counter()
    c1 = time.process_time()
    return {
        "impl": impl,
        "what": what,
        "leaves": leaves,
        "shape": list(shape),
        "trace_s": t1 - t0,
        "compile_s": t2 - t1,
        "compile_cpu_s": c1 - c0,
    }


def compile_worker(cases_json: str) -> None:
    # The first compile of a process also initializes XLA (~0.5 s here): pay
    # it before timing, or the first case of each worker carries it.
    jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(8)).compile()
    for case in json.loads(cases_json):
        out = _compile_one(case["impl"], case["what"], case["leaves"], case["shape"])
        print(json.dumps(out), flush=True)


def _run_compile_cases(cases: list[dict], timeout: float, log) -> list[dict]:
    """Runs cases in a worker subprocess; a case over ``timeout`` s is recorded
    as timed out and the remaining ones continue in a new worker."""
    results: list[dict] = []
    todo = list(cases)
    while todo:
        cmd = [sys.executable, "-m", "benchmarks.run", "--compile-worker"]
        proc = subprocess.Popen(
            [*cmd, json.dumps(todo)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        lines: queue.Queue = queue.Queue()

        def pump(stream=proc.stdout, sink=lines):
            for line in stream:
                sink.put(line)
            sink.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while todo:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                case = todo.pop(0)
                results.append({**case, "timeout_s": timeout})
                log(f"[d] timed out: {case}")
                proc.kill()
                break
            if line is None:  # worker died: record and go on
                case = todo.pop(0)
                results.append({**case, "error": f"worker exit {proc.wait()}"})
                log(f"[d] failed: {case}")
                break
            if not line.startswith("{"):
                continue
            res = json.loads(line)
            todo.pop(0)
            results.append(res)
            log(f"[d] {res}")
        proc.wait()
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    return results


#: What section d compiles: "clip" and "chain" (global norm) by default;
#: "block" (per-leaf clip; optax's nearest is ``clip_by_block_rms``) and
#: "adagc" (optax has none) on request (``--compile-what``).
COMPILE_WHAT = ("clip", "chain", "block", "adagc")


def section_d(
    preset: Preset, log, timeout: float, whats: tuple[str, ...] = ("clip", "chain")
) -> list[dict]:
    cases = []
    for n in preset.compile_leaves:
        for what in whats:
            for impl in ("optax_clip", "optax"):
                if impl == "optax" and n > preset.optax_compile_max:
                    continue
                if impl == "optax" and what == "adagc":
                    continue
                shape = list(preset.compile_shape)
                cases.append({"impl": impl, "what": what, "leaves": n, "shape": shape})
    return _run_compile_cases(cases, timeout, log)


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "cpu": f"{cpu}, {cores} cores usable",
        "memory": mem,
        "jax devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
        "python": platform.python_version(),
        "jax / jaxlib": f"{jax.__version__} / {jax.lib.__version__}"
        if hasattr(jax.lib, "__version__")
        else jax.__version__,
        "optax": optax.__version__,
        "optax_clip": oc.__version__,
        "torch": torch_version() or "not installed (section c skipped)",
    }


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "load unknown"


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def summary(results: dict) -> list[list[str]]:
    """Worst case of each target, as in the README table."""
    rows = []
    a = results.get("a") or []
    if a:
        rows.append(
            [
                "optimizer step: chain(clip, adamw) / adamw",
                "<= 1.10",
                _f(max(r["optax_clip_ratio"] for r in a)),
                _f(max(r["optax_ratio"] for r in a)),
            ]
        )
        rows.append(
            [
                "optimizer step: optax_clip ratio / bound (one extra read)",
                "~1",
                _f(max(r["optax_clip_ratio"] / r["bound_ratio"] for r in a)),
                _f(max(r["optax_ratio"] / r["bound_ratio"] for r in a)),
            ]
        )
        mem = [r for r in a if "optax_clip_temp_mb" in r]
        if mem:
            rows.append(
                [
                    "optimizer step: temporary memory over adamw's, MB (worst)",
                    "small",
                    _f(
                        max(r["optax_clip_temp_mb"] - r["adamw_temp_mb"] for r in mem),
                        1,
                    ),
                    _f(max(r["optax_temp_mb"] - r["adamw_temp_mb"] for r in mem), 1),
                ]
            )
    bc = results.get("bc") or []
    if bc:
        rows.append(
            [
                "clip alone / memory floor",
                "<= 1.20",
                _f(max(r["floor_ratio"] for r in bc)),
                _f(max(r["floor_ratio"] / r["optax_ratio"] for r in bc)),
            ]
        )
        rows.append(
            [
                "clip alone: optax_clip / optax",
                "<= 1.00",
                _f(max(r["optax_ratio"] for r in bc)),
                "1.00",
            ]
        )
        if all("torch_ratio" in r for r in bc):
            rows.append(
                [
                    "clip alone: optax_clip / torch clip_grad_norm_",
                    "<= 1.00",
                    _f(max(r["torch_ratio"] for r in bc)),
                    _f(max(r["torch_ratio"] / r["optax_ratio"] for r in bc)),
                ]
            )
    d = results.get("d") or []
    ok = [r for r in d if "compile_s" in r]
    if ok:
        top = max(r["leaves"] for r in ok)
        glob = [r for r in ok if r["what"] in ("clip", "chain")]
        mine = [r for r in glob if r["impl"] == "optax_clip" and r["leaves"] == top]
        theirs = [
            r
            for r in d
            if r["impl"] == "optax"
            and r["leaves"] == top
            and r["what"] in ("clip", "chain")
        ]
        worst = max((r["trace_s"] + r["compile_s"] for r in mine), default=None)
        other = [
            _f(r["trace_s"] + r["compile_s"], 1) if "compile_s" in r else "timeout"
            for r in theirs
        ]
        rows.append(
            [
                f"compile (trace + compile) at {top} leaves, s",
                "<= 10",
                _f(worst, 1),
                " / ".join(other) if other else "not run",
            ]
        )
    e = results.get("e") or []
    adaptive = [r for r in e if not r["transform"].startswith(("clip_by_g", "skip_"))]
    if adaptive:
        rows.append(
            [
                "adaptive vs static clip (step time)",
                "<= 1.05",
                _f(max(r["ratio"] for r in adaptive)),
                "",
            ]
        )
    g = [r for r in results.get("g") or [] if r["framework"] == "jax"]
    if g:
        largest = max(r["params"] for r in g)
        rows += _train_step_rows([r for r in g if r["params"] == largest])
        torch_rows = [
            r
            for r in results["g"]
            if r["framework"] == "torch" and r["variant"] != "adamw"
        ]
        if torch_rows:
            rows.append(
                [
                    "whole train step: torch clip_grad_norm_ / AdamW",
                    "",
                    "",
                    _f(max(r["ratio"] for r in torch_rows)),
                ]
            )
    guards = [r for r in e if r["transform"].startswith("skip_")]
    fast = [r for r in guards if "oc.adamw" in r["transform"]]
    if guards:
        rows.append(
            [
                "guards vs static clip (step time), around optax_clip.adamw"
                " [around optax.adamw]",
                "<= 1.15",
                _f(max((r["ratio"] for r in fast), default=None)),
                _f(max(r["ratio"] for r in guards if r not in fast)),
            ]
        )
    return rows


def _train_step_rows(g: list[dict]) -> list[list[str]]:
    """Summary rows of section g, for its largest model."""
    by = {r["variant"]: r["ratio"] for r in g}
    model = g[0]["model"].split(":")[0]
    clips = [
        v
        for k, v in by.items()
        if k != "adamw" and not k.startswith(("optax.", "skip_", "adaptive_grad_clip"))
    ]
    fast = [v for k, v in by.items() if k.startswith("skip_") and "oc." in k]
    generic = [v for k, v in by.items() if k.startswith("skip_") and "oc." not in k]
    return [
        [
            f"whole train step ({model}): every clip but AGC / adamw, worst",
            "<= 1.03",
            _f(max(clips)),
            _f(by.get("optax.clip_by_global_norm")),
        ],
        [
            f"whole train step ({model}): adaptive_grad_clip / adamw",
            "<= 1.03",
            _f(by.get("adaptive_grad_clip")),
            "",
        ],
        [
            f"whole train step ({model}): guards around optax_clip.adamw"
            " [around optax.adamw] / adamw",
            "<= 1.03",
            f"{_f(max(fast, default=None))} [{_f(max(generic, default=None))}]",
            _f(by.get("optax.apply_if_finite")),
        ],
    ]


def _provenance(meta: dict) -> str:
    runs = meta.get("runs")
    if not runs:
        return (
            f"Generated by `{meta['command']}` on {meta['date']} "
            f"({meta['mode']} mode, {meta['reps']} interleaved repetitions after "
            f"{meta['warmup']} warm-up rounds; wall time {meta['wall_s']:.0f} s)."
        )
    parts = "; ".join(
        f"`{r['command']}` ({r['date']}, {r['reps']} repetitions after "
        f"{r['warmup']} warm-up rounds, {r['wall_s']:.0f} s)"
        for r in runs
    )
    n = len(runs)
    return f"Merged from {n} runs of the harness, each section from one run: {parts}."


def _compile_case_key(row: dict) -> tuple:
    return (row["impl"], row["what"], row["leaves"], str(row["shape"]))


def _train_step_key(row: dict) -> tuple:
    return (row["model"], row["framework"], row["variant"])


#: Sections merged row by row (a later file's row wins), by these keys.
ROW_KEYS = {"d": _compile_case_key, "g": _train_step_key}


def merge_runs(paths: list[Path]) -> tuple[dict, dict]:
    """Results and meta of several ``--json`` files; a later file's section wins
    (sections d and g: a later file's row wins, the others' rows are kept, so a
    run of a few train-step variants adds to an earlier run of all)."""
    results: dict[str, Any] = {}
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for section, rows in data["results"].items():
            key = ROW_KEYS.get(section)
            if key is not None and section in results:
                merged = {key(r): r for r in results[section]}
                merged.update({key(r): r for r in rows})
                results[section] = list(merged.values())
            else:
                results[section] = rows
        runs.append(data["meta"])
    meta = {
        **runs[0],
        "runs": runs,
        "merge_command": "python -m benchmarks.run --merge "
        + " ".join(str(p) for p in paths),
        "load_start": runs[0]["load_start"],
        "load_end": runs[-1]["load_end"],
    }
    return results, meta


def write_report(path: Path, results: dict, meta: dict) -> None:
    lines = [
        "# optax_clip benchmarks",
        "",
        _provenance(meta),
        "",
        f"Load: {meta['load_start']} at the start, {meta['load_end']} at the end. "
        "Times on a shared machine are noisy; the ratios compare variants timed "
        "in the same process, interleaved, on the same arrays.",
        "",
        "## Machine",
        "",
        *_table(["", ""], [[k, v] for k, v in meta["machine"].items()]),
        "",
        "## Summary (worst case over all sizes)",
        "",
        *_table(
            ["target", "goal", "optax_clip", "reference (optax [/ optax])"],
            summary(results),
        ),
        "",
        "Reference column: optax for the train-step overhead and compile time; "
        "for the clip-alone rows, the same ratio for optax's clip.",
        "",
    ]
    a = results.get("a")
    if a:
        lines += [
            "## a. Optimizer-step overhead: chain(clip, adamw) vs adamw "
            "(the optimizer call alone; section g is the whole train step)",
            "",
            "Step = `tx.update` + `optax.apply_updates`, jitted, parameters and "
            "optimizer state donated; float32 parameters; ratio = step time / "
            "adamw step time (median of per-repetition ratios). bound = 1 + "
            "(one reduction pass over the gradients) / adamw: a global-norm clip "
            "must read every gradient before it can scale any, so no clip can go "
            "below it in this step, where the gradients are inputs (in a real "
            "step XLA can fuse that read into the backward pass). temp MB: the "
            "temporary memory each compiled step reserves (adamw / +optax_clip / "
            "+optax; runs before this column existed show a dash).",
            "",
            *_table(
                [
                    "size",
                    "adamw ms",
                    "+optax_clip ms",
                    "+optax ms",
                    "optax_clip ratio",
                    "optax ratio",
                    "bound",
                    "temp MB",
                ],
                [
                    [
                        r["size"],
                        _f(r["adamw_ms"]),
                        _f(r["optax_clip_ms"]),
                        _f(r["optax_ms"]),
                        _f(r["optax_clip_ratio"], 3),
                        _f(r["optax_ratio"], 3),
                        _f(r["bound_ratio"], 3),
                        " / ".join(
                            _f(r.get(f"{k}_temp_mb"), 1)
                            for k in ("adamw", "optax_clip", "optax")
                        )
                        if "adamw_temp_mb" in r
                        else "-",
                    ]
                    for r in a
                ],
            ),
            "",
        ]
    bc = results.get("bc")
    if bc:
        has_torch = all("torch_ms" in r for r in bc)
        header = [
            "size",
            "optax_clip ms",
            "floor ms",
            "optax ms",
            "torch ms",
            "/ floor",
            "/ optax",
            "/ torch",
            "flat floor GB/s",
            "optax_clip GB/s",
        ]
        lines += [
            "## b, c. The clip alone vs the memory floor, optax and PyTorch",
            "",
            "`clip_by_global_norm(1.0)` on the same gradient tree every call "
            "(norm well above 1: it always clips), output written into a "
            "donated buffer. floor = one reduction pass plus one scale pass "
            "over the same arrays (`sum(x*x)` per leaf, then `x*c`), jitted. "
            "Ratios are optax_clip's time over the other's (< 1: optax_clip is "
            "faster). torch = `clip_grad_norm_(..., foreach=True)` on CPU "
            f"({meta['machine']['torch']}), in place, timed in its own loop "
            "(its ratio is one of medians, not paired). GB/s counts 3 passes over the "
            "gradient bytes; the flat floor is the same floor on one contiguous "
            "buffer of the same size (the machine's practical bandwidth).",
            "",
            *_table(
                header,
                [
                    [
                        r["size"],
                        _f(r["optax_clip_ms"]),
                        _f(r["floor_ms"]),
                        _f(r["optax_ms"]),
                        _f(r.get("torch_ms")) if has_torch else "n/a",
                        _f(r["floor_ratio"], 3),
                        _f(r["optax_ratio"], 3),
                        _f(r.get("torch_ratio"), 3) if has_torch else "n/a",
                        _f(r["flat_floor_gbs"], 1),
                        _f(r["optax_clip_gbs"], 1),
                    ]
                    for r in bc
                ],
            ),
            "",
        ]
    d = results.get("d")
    if d:
        rows = []
        for r in d:
            if "compile_s" in r:
                vals = [_f(r["trace_s"]), _f(r["compile_s"]), _f(r["compile_cpu_s"])]
            else:
                why = f"> {r['timeout_s']:.0f} s" if "timeout_s" in r else r["error"]
                vals = [why, "", ""]
            rows.append(
                [r["what"], str(r["leaves"]), "x".join(map(str, r["shape"])), r["impl"]]
                + vals
            )
        lines += [
            "## d. Compile time",
            "",
            "`jax.jit(...).lower(...)` (trace) and `.compile()` of the clip "
            "alone and of the train step with `chain(clip, adamw)`, each case "
            "in a fresh worker process; CPU s is the process CPU time of the "
            "compile (less sensitive to other load than the wall time). "
            "`block`: the per-leaf clip alone (`clip_by_block_norm`; for optax "
            "`clip_by_block_rms`, its nearest per-leaf clip); `adagc`: adagc "
            "alone (optax has none).",
            "",
            *_table(
                [
                    "what",
                    "leaves",
                    "leaf shape",
                    "impl",
                    "trace s",
                    "compile s",
                    "CPU s",
                ],
                rows,
            ),
            "",
        ]
    e = results.get("e")
    if e:
        lines += [
            "## e. Adaptive transforms and guards vs static clipping",
            "",
            "Train step with `chain(X, adamw)` (guards wrap "
            "`chain(clip_by_global_norm, adamw)`); ratio = step time / step time "
            "of `chain(clip_by_global_norm, adamw)`.",
            "",
            *_table(
                ["size", "transform", "ms", "ratio"],
                [
                    [r["size"], r["transform"], _f(r["ms"]), _f(r["ratio"], 3)]
                    for r in e
                ],
            ),
            "",
        ]
    f = results.get("f")
    if f:
        worst: dict[str, float] = {}
        for r in f:
            if r["variant"] != "healthy":
                worst[r["transform"]] = max(worst.get(r["transform"], 0), r["ratio"])
        lines += [
            "## f. Trees like users', and features that once made a clip slow",
            "",
            "Each transform alone on a transformer-shaped tree; ratio = time with "
            "the feature / time on the healthy tree (the same compiled function, "
            "but for the mixed-dtype tree). Goal: at most 1.05.",
            "",
            *_table(
                ["tree", "transform", "variant", "ms", "ratio"],
                [
                    [
                        r["tree"],
                        r["transform"],
                        r["variant"],
                        _f(r["ms"]),
                        _f(r["ratio"], 3),
                    ]
                    for r in f
                ],
            ),
            "",
            "Worst ratio per transform: "
            + ", ".join(f"{k} {_f(v, 2)}" for k, v in worst.items())
            + ".",
            "",
        ]
    g = results.get("g")
    if g:
        from benchmarks import train_step

        lines += train_step.report_lines(g)
    lines += [
        "## Reproduce",
        "",
        "```",
        ".venv/bin/pip install torch==2.13.0   # optional, for section c",
        *(
            [r["command"] for r in meta["runs"]] + [meta["merge_command"]]
            if meta.get("runs")
            else [meta["command"]]
        ),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def _parse_size(text: str) -> tuple[int, int]:
    total, leaves = text.split(":")
    mult = {"K": 1000, "M": M}.get(total[-1].upper(), 1)
    number = total[:-1] if mult != 1 else total
    return int(float(number) * mult), int(leaves)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument("--full", action="store_const", const="full", dest="mode")
    mode.add_argument("--tiny", action="store_const", const="tiny", dest="mode")
    parser.add_argument("--sections", default="abcdef")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--sizes",
        default=None,
        help="override the sizes of sections a, b, c and e, e.g. 10M:256,1M:16",
    )
    parser.add_argument(
        "--dtypes", default=None, help="gradient dtypes, e.g. float32,bfloat16"
    )
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--gpt",
        default=None,
        help="section g's models, among tiny, small, large, e.g. small,large "
        "(default: tiny, small, large for --tiny, --quick, --full)",
    )
    parser.add_argument(
        "--gpt-dtype", choices=("float32", "bfloat16"), default="float32"
    )
    parser.add_argument(
        "--gpt-variants",
        default=None,
        help="section g: only these variants (and adamw), comma-separated",
    )
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=900.0,
        help="seconds one compile case may take (optax at 3000 leaves: ~120 s "
        "on a quiet 2-core machine)",
    )
    parser.add_argument(
        "--skip-optax-3000",
        action="store_true",
        help="do not compile optax at more than 1000 leaves",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also save the results as JSON"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="write one report from --json files instead of running",
    )
    parser.add_argument(
        "--compile-what",
        default="clip,chain",
        help=f"what section d compiles, among {','.join(COMPILE_WHAT)}",
    )
    parser.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    whats = tuple(w for w in args.compile_what.split(",") if w)
    unknown = sorted(set(whats) - set(COMPILE_WHAT))
    if unknown:
        parser.error(f"--compile-what: unknown {unknown}; use {COMPILE_WHAT}")
    if args.gpt and not set(args.gpt.split(",")) <= {"tiny", "small", "large"}:
        parser.error(f"--gpt: unknown model in {args.gpt}; use tiny, small, large")
    if args.compile_worker is not None:
        compile_worker(args.compile_worker)
        return {}
    if args.merge:
        results, meta = merge_runs(args.merge)
        write_report(args.out or DEFAULT_OUT, results, meta)
        return {"results": results, "meta": meta}
    mode_name = args.mode or "quick"
    preset = dataclasses.replace(PRESETS[mode_name])
    if args.reps:
        preset.reps = args.reps
    if args.sizes:
        preset.sizes = [_parse_size(s) for s in args.sizes.split(",")]
        preset.adaptive_sizes = preset.sizes
    if args.dtypes:
        preset.grad_dtypes = tuple(args.dtypes.split(","))
    if args.skip_optax_3000:
        preset.optax_compile_max = min(preset.optax_compile_max, 1000)
    out = args.out or DEFAULT_OUT
    use_torch = not args.no_torch and torch_version() is not None

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    load_start = _load()
    log(f"optax_clip benchmarks, {mode_name} mode, {load_start}")
    results: dict[str, Any] = {}
    if "a" in args.sections:
        results["a"] = section_a(preset, log)
    if "b" in args.sections or "c" in args.sections:
        results["bc"] = section_bc(preset, log, use_torch and "c" in args.sections)
    if "e" in args.sections:
        results["e"] = section_e(preset, log)
    if "f" in args.sections:
        results["f"] = section_f(preset, log)
    if "d" in args.sections:
        results["d"] = section_d(preset, log, args.compile_timeout, whats)
    if "g" in args.sections:
        from benchmarks import train_step  # imports this module

        results["g"] = []
        for gpt in (args.gpt or preset.gpt).split(","):
            results["g"] += train_step.section_g(
                log,
                gpt,
                args.gpt_dtype,
                args.gpt_variants.split(",") if args.gpt_variants else None,
                args.reps,
                use_torch,
            )
    cmd = "python -m benchmarks.run " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    meta = {
        "command": cmd.strip(),
        "mode": mode_name,
        "reps": preset.reps,
        "warmup": preset.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "wall_s": time.perf_counter() - t0,
        "load_start": load_start,
        "load_end": _load(),
        "machine": machine_info(),
    }
    write_report(out, results, meta)
    log(f"wrote {out}")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "meta": meta}, indent=1))
        log(f"wrote {args.json}")
    return {"results": results, "meta": meta}


if __name__ == "__main__":
    main()
