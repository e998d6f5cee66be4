"""What ``leaf_norms=True`` (per-leaf norms in the statistics) costs.

Run it::

  python -m benchmarks.leaf_norms                 # 256 leaves of 4096, ~1 minute
  python -m benchmarks.leaf_norms --leaves 256 --size 4096 --reps 41 --compiles 3

It times the optimizer call ``chain(clip_by_global_norm(1.0, leaf_norms=...),
adamw(1e-3))`` under ``jit`` (params and state donated, the same gradients
every call), with the option off and on, interleaved with a second, identical
"off" step (the control: its ratio shows the noise of the machine), and
reports the median time of each and the medians of the per-round ratios to
"off". It also compiles (trace included, a fresh ``jit`` each time) the
clip's ``update`` alone with the option off and on, alternating, and reports
the median compile times.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optax_clip as oc
from benchmarks.run import (
    TrainStep,
    leaf_shapes,
    make_tree,
    median_ms,
    paired_ratio,
    time_interleaved,
)


def compile_seconds(tx: optax.GradientTransformation, grads) -> float:
    """Trace and compile ``tx.update`` for ``grads`` (a fresh ``jit``)."""
    state = tx.init(grads)
    start = time.perf_counter()
    jax.jit(tx.update).lower(grads, state).compile()
    return time.perf_counter() - start


def measure(leaves: int, size: int, reps: int, compiles: int) -> dict[str, float]:
    shapes = leaf_shapes(leaves * size, leaves)
    grads = make_tree(shapes, jnp.float32, seed=0)
    params = make_tree(shapes, jnp.float32, seed=1)

    def chain(on):
        return optax.chain(
            oc.clip_by_global_norm(1.0, leaf_norms=on), optax.adamw(1e-3)
        )

    steps = {
        "off": TrainStep(chain(False), params, grads),
        "on": TrainStep(chain(True), params, grads),
        # A second copy of the "off" step: its ratio is the noise floor.
        "control": TrainStep(chain(False), params, grads),
    }
    ts = time_interleaved(steps, reps=reps, warmup=3)
    comp: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(compiles):
        for on in (False, True):
            comp[on].append(
                compile_seconds(oc.clip_by_global_norm(1.0, leaf_norms=on), grads)
            )
    return {
        "off_ms": median_ms(ts["off"]),
        "on_ms": median_ms(ts["on"]),
        "ratio": paired_ratio(ts["on"], ts["off"]),
        "control": paired_ratio(ts["control"], ts["off"]),
        "compile_off_s": statistics.median(comp[False]),
        "compile_on_s": statistics.median(comp[True]),
    }


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=256)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=41)
    parser.add_argument("--compiles", type=int, default=3)
    args = parser.parse_args(argv)
    out = measure(args.leaves, args.size, args.reps, args.compiles)
    print(
        f"{args.leaves} leaves of {args.size} float32, {jax.default_backend()} "
        f"({platform.processor() or platform.machine()}), {args.reps} rounds: "
        f"off {out['off_ms']:.2f} ms, on {out['on_ms']:.2f} ms, on / off "
        f"{out['ratio']:.3f}, the same off step again / off {out['control']:.3f} "
        f"(medians of per-round ratios); compile of the clip's update "
        f"(median of {args.compiles}): off {out['compile_off_s']:.2f} s, "
        f"on {out['compile_on_s']:.2f} s"
    )
    return out


if __name__ == "__main__":
    main()
