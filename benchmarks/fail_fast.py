"""What ``nonfinite="raise"`` costs on a healthy step.

Run it::

  python -m benchmarks.fail_fast                 # 10 leaves of 1M, ~1 minute
  python -m benchmarks.fail_fast --leaves 10 --size 1048576 --reps 41

It times the optimizer call ``chain(clip_by_global_norm(1.0, nonfinite=...),
adamw(1e-3))`` under ``jit`` (params and state donated, the same finite
gradients every call), with ``nonfinite="propagate"`` and ``"raise"``
interleaved with a second, identical ``"propagate"`` step (the control: its
ratio shows the noise of the machine), and reports the median time of each
and the medians of the per-round ratios to ``"propagate"``.
"""

from __future__ import annotations

import argparse
import platform

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


def measure(leaves: int, size: int, reps: int) -> dict[str, float]:
    shapes = leaf_shapes(leaves * size, leaves)
    grads = make_tree(shapes, jnp.float32, seed=0)
    params = make_tree(shapes, jnp.float32, seed=1)
    steps = {
        policy: TrainStep(
            optax.chain(
                oc.clip_by_global_norm(1.0, nonfinite=policy), optax.adamw(1e-3)
            ),
            params,
            grads,
        )
        for policy in ("propagate", "raise")
    }
    # A second copy of the propagate step: its ratio is the noise floor.
    steps["control"] = TrainStep(
        optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-3)), params, grads
    )
    ts = time_interleaved(steps, reps=reps, warmup=3)
    return {
        "propagate_ms": median_ms(ts["propagate"]),
        "raise_ms": median_ms(ts["raise"]),
        "ratio": paired_ratio(ts["raise"], ts["propagate"]),
        "control": paired_ratio(ts["control"], ts["propagate"]),
    }


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=10)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--reps", type=int, default=41)
    args = parser.parse_args(argv)
    out = measure(args.leaves, args.size, args.reps)
    print(
        f"{args.leaves} leaves of {args.size} float32, {jax.default_backend()} "
        f"({platform.processor() or platform.machine()}), {args.reps} rounds: "
        f"propagate {out['propagate_ms']:.2f} ms, raise {out['raise_ms']:.2f} ms, "
        f"raise / propagate {out['ratio']:.3f}, the same propagate step again / "
        f"propagate {out['control']:.3f} (medians of per-round ratios)"
    )
    return out


if __name__ == "__main__":
    main()
