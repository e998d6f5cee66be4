"""Where the compile time of a per-leaf clip goes, on N leaves (XLA:CPU).

Run it::

  python -m benchmarks.compile_per_leaf                 # 1000 leaves, ~1 minute
  python -m benchmarks.compile_per_leaf --leaves 3000 --out /tmp/compile.md

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
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax import lax

import optax_clip as oc
from benchmarks.run import leaf_shapes, make_tree


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

    return {
        "optax.clip_by_block_rms": update(optax.clip_by_block_rms(1.0)),
        "optax_clip.clip_by_block_norm": update(oc.clip_by_block_norm(1.0)),
        "optax_clip.clip_by_global_norm": update(oc.clip_by_global_norm(1.0)),
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measures every program once; prints (and with ``--out`` writes) a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1000)
    parser.add_argument("--values", type=int, default=4_000_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tree = make_tree(leaf_shapes(args.values, args.leaves), jnp.float32, seed=2)
    leaves = jax.tree.leaves(tree)
    seconds = {}
    for name, (fn, fn_args) in programs(leaves).items():
        seconds[name] = compile_seconds(fn, *fn_args)
        print(f"{seconds[name]:7.2f} s  {name}", flush=True)
    lines = [
        f"Compile time (trace + compile) on {len(leaves)} float32 leaves, "
        f"{args.values} values, jax {jax.__version__}, {jax.default_backend()} "
        f"(`python -m benchmarks.compile_per_leaf --leaves {args.leaves}`):",
        "",
        "| program | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in seconds.items()),
    ]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return seconds


if __name__ == "__main__":
    main()
