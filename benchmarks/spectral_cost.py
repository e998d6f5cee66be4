"""The optimizer call with spectral clipping vs adamw alone (issue 18).

Run from the repository root::

  python -m benchmarks.spectral_cost            # ~2 minutes on 2 cores (40 rounds)
  python -m benchmarks.spectral_cost --reps 5   # seconds (a smoke run)

A tree of four 512x512 and four 1024x256 float32 matrices and eight
vectors of 512 (about 2.1M parameters). Each variant is ``chain(T, adamw)``
(``adamw`` alone is the baseline) as one jitted step that donates the
parameters and optimizer state and applies the update (``run.TrainStep``);
the variants are timed in interleaved rounds (``run.time_interleaved``).
Printed per variant: the median time of one call and the median over rounds
of its ratio to adamw alone in the same round.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import optax_clip as oc
from benchmarks import run


def spectral_tree(seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 16)
    tree = {}
    for i in range(4):
        tree[f"sq{i}"] = jax.random.normal(keys[i], (512, 512))
        tree[f"tall{i}"] = jax.random.normal(keys[4 + i], (1024, 256))
        tree[f"bias{i}"] = jax.random.normal(keys[8 + i], (512,))
        tree[f"scale{i}"] = jax.random.normal(keys[12 + i], (512,))
    return tree


def variants() -> dict[str, optax.GradientTransformation]:
    adamw = run.adamw
    return {
        "adamw": adamw(),
        "clip_by_global_norm": optax.chain(oc.clip_by_global_norm(1.0), adamw()),
        "spectral hard, power_iters=1": optax.chain(
            oc.clip_by_spectral_norm(1.0, power_iters=1), adamw()
        ),
        "spectral hard, power_iters=2": optax.chain(
            oc.clip_by_spectral_norm(1.0, power_iters=2), adamw()
        ),
        "spectral soft, ns_steps=10": optax.chain(
            oc.clip_by_spectral_norm(1.0, mode="soft"), adamw()
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args(argv)
    params = spectral_tree(0)
    grads = jax.tree.map(lambda x: 10.0 * x, spectral_tree(1))
    steps = {name: run.TrainStep(tx, params, grads) for name, tx in variants().items()}
    times = run.time_interleaved(steps, reps=args.reps, warmup=2)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{n / 1e6:.2f}M parameters, {args.reps} interleaved rounds, {jax.devices()}")
    out = {}
    for name, ts in times.items():
        ms = run.median_ms(ts)
        ratio = run.paired_ratio(ts, times["adamw"])
        out[name] = (ms, ratio)
        print(f"{name:32s} {ms:8.2f} ms   x{ratio:.2f} of adamw alone")
    return out


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
