"""Where the compile time of a per-leaf clip goes, on N leaves (XLA:CPU).

Run it::

  python -m benchmarks.compile_per_leaf                 # 1000 leaves, a few minutes
  python -m benchmarks.compile_per_leaf --leaves 3000 --out /tmp/compile.md
  python -m benchmarks.compile_per_leaf --repeat 3 --only block,adagc

It compiles (``jit(...).lower(...).compile()``, trace included) the per-leaf
clips of optax and optax_clip on the same tree, and a few programs that isolate
one ingredient of them: scaling every leaf by a scalar taken from a vector
(what a per-leaf clip does after computing its scales as one vector), by
scalars that arrive as separate arguments, by one shared scalar, and optax's
shape (each leaf reduced and scaled on its own). Issue 16 asks for the
per-leaf clips to compile at most 1.5x slower than optax's
``clip_by_block_rms``; this says which part to change.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax import lax

import optax_clip as oc
from benchmarks.run import leaf_shapes, make_tree
from optax_clip import _apply, _norms


def compile_seconds(fn, *args) -> float:
    """Trace and compile ``fn`` for ``args`` (no cache: a fresh ``jit``)."""
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def programs(leaves: list[jax.Array]) -> dict[str, tuple]:
    """``name: (fn, args)`` of every measured program."""
    n = len(leaves)
    vec = jnp.ones((n,), jnp.float32)
    scalars = [jnp.float32(1.0)] * n

    def update(tx):
        state = tx.init(leaves)
        return (lambda g, s: tx.update(g, s)[0]), (leaves, state)

    def entry(v, i):
        return lax.reshape(lax.slice_in_dim(v, i, i + 1), ())

    def plain_pass(g):
        plan, dtype = _norms._prepare(g, ())
        sums, maxes = _norms._plain_pass(plan, 2.0, dtype)
        return jnp.concatenate(sums), jnp.concatenate(maxes)

    def with_params(tx):
        state = tx.init(leaves)
        return (lambda g, s: tx.update(g, s, g)[0]), (leaves, state)

    return {
        "optax.clip_by_block_rms": update(optax.clip_by_block_rms(1.0)),
        "optax_clip.clip_by_block_norm": update(oc.clip_by_block_norm(1.0)),
        "optax_clip.clip_by_block_rms": update(oc.clip_by_block_rms(1.0)),
        "optax_clip.adagc": update(oc.adagc()),
        "optax_clip.adaptive_grad_clip": with_params(oc.adaptive_grad_clip(0.01)),
        "optax_clip.clip_by_global_norm": update(oc.clip_by_global_norm(1.0)),
        "per-leaf norms alone (_norms.leaf_norms, both passes)": (
            lambda g: _norms.leaf_norms(g),
            (leaves,),
        ),
        "plain pass of the per-leaf norms alone (sum and max)": (
            plain_pass,
            (leaves,),
        ),
        "apply step alone (_apply.apply_per_leaf, norms given)": (
            lambda g, v: _apply.apply_per_leaf(g, v, v, "propagate", 2.0).updates,
            (leaves, vec),
        ),
        "each leaf reduced by one jnp.sum alone": (
            lambda g: jnp.stack([jnp.sum(x * x) for x in g]),
            (leaves,),
        ),
        "each leaf times entry i of one vector": (
            lambda g, v: [x * entry(v, i) for i, x in enumerate(g)],
            (leaves, vec),
        ),
        "each leaf times its own scalar argument": (
            lambda g, s: [x * si for x, si in zip(g, s, strict=True)],
            (leaves, scalars),
        ),
        "every leaf times one scalar": (
            lambda g, s: [x * s for x in g],
            (leaves, jnp.float32(1.0)),
        ),
        "entries of one vector, without the leaves": (
            lambda v: [entry(v, i) * 2.0 for i in range(n)],
            (vec,),
        ),
        "each leaf reduced and scaled on its own (optax's shape)": (
            lambda g: [x / jnp.maximum(1.0, jnp.sqrt(jnp.sum(x * x))) for x in g],
            (leaves,),
        ),
    }


BASELINE = "optax.clip_by_block_rms"


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measures the programs ``--repeat`` times, interleaved; writes a table.

    Prints each compile as it ends; the table holds the median of each
    program and its ratio to optax's ``clip_by_block_rms`` (measured in the
    same rounds). Compile times on a loaded machine are noisy: compare ratios.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1000)
    parser.add_argument("--values", type=int, default=4_000_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--only", default="", help="comma-separated substrings of program names"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tree = make_tree(leaf_shapes(args.values, args.leaves), jnp.float32, seed=2)
    leaves = jax.tree.leaves(tree)
    chosen = {
        name: prog
        for name, prog in programs(leaves).items()
        if name == BASELINE
        or not args.only
        or any(part in name for part in args.only.split(","))
    }
    times: dict[str, list[float]] = {name: [] for name in chosen}
    for _ in range(args.repeat):
        for name, (fn, fn_args) in chosen.items():
            times[name].append(compile_seconds(fn, *fn_args))
            print(f"{times[name][-1]:7.2f} s  {name}", flush=True)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    ratio = {
        name: statistics.median(a / b for a, b in zip(t, times[BASELINE], strict=True))
        for name, t in times.items()
    }
    command = f"python -m benchmarks.compile_per_leaf --leaves {args.leaves}"
    if args.repeat > 1:
        command += f" --repeat {args.repeat}"
    if args.only:
        command += f" --only {args.only}"
    lines = [
        f"Compile time (trace + compile) on {len(leaves)} float32 leaves, "
        f"{args.values} values, jax {jax.__version__}, {jax.default_backend()}, "
        f"median of {args.repeat} (`{command}`):",
        "",
        f"| program | seconds | / {BASELINE} |",
        "|---|---|---|",
        *(f"| {k} | {v:.2f} | {ratio[k]:.2f} |" for k, v in seconds.items()),
    ]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return seconds


if __name__ == "__main__":
    main()
