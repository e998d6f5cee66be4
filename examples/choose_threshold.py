"""How to choose a fixed clipping threshold: record, suggest, train.

The recipe, on a small MLP regression trained with Adam:

1. Warm up unclipped for a few hundred steps with
   ``optax_clip.clip_by_global_norm(inf)`` in the chain: it clips nothing but
   records the pre-clip norm of every step in its state.
2. Read the norms with :func:`optax_clip.get_stats` and call
   :func:`optax_clip.suggest_max_norm`: it drops the first 10% of the steps
   (the transient right after initialisation) and returns the 90th
   percentile of the rest, with an explanation.
3. Train with ``optax_clip.clip_by_global_norm(suggested)`` and check with
   ``get_stats`` how often it clipped.

Run it::

  python examples/choose_threshold.py --steps 300
"""

from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_clip

D_IN, BATCH = 8, 32


def _init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (D_IN, 32)) / math.sqrt(D_IN),
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 1)) / math.sqrt(32),
        "b2": jnp.zeros(1),
        "teacher": jax.random.normal(k3, (D_IN,)),
    }


def _predict(params, x):
    return (jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"])[:, 0] + params[
        "b2"
    ][0]


def _batch(key, teacher):
    x = jax.random.normal(key, (BATCH, D_IN))
    return x, jnp.sin(x @ teacher)


@functools.partial(jax.jit, static_argnames=("steps", "seed", "learning_rate"))
def train(max_norm, steps: int, seed: int = 0, learning_rate: float = 3e-3):
    """Trains with ``clip_by_global_norm(max_norm)``; returns the records.

    ``max_norm`` is traced, so the recording run (``inf``) and the clipped run
    share one compilation. Returns ``(per-step pre-clip norms, per-step
    losses, final optimizer state)``.
    """
    params = _init(jax.random.key(seed))
    teacher = params.pop("teacher")
    tx = optax.chain(
        optax_clip.clip_by_global_norm(max_norm), optax.adam(learning_rate)
    )

    def loss_fn(params, x, y):
        return jnp.mean((_predict(params, x) - y) ** 2)

    def step(carry, i):
        params, state = carry
        x, y = _batch(jax.random.fold_in(jax.random.key(seed + 1), i), teacher)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        norm = optax_clip.get_stats(state)["clip_by_global_norm/pre_clip_norm"]
        return (params, state), (norm, loss)

    (_, state), (norms, losses) = jax.lax.scan(
        step, (params, tx.init(params)), jnp.arange(steps)
    )
    return norms, losses, state


def main(steps: int = 300, percentile: float = 90.0) -> dict:
    # 1. Warm-up run without clipping (the threshold is inf), recording norms.
    norms, losses, _ = train(jnp.float32(math.inf), steps)
    print(
        f"1. recorded {steps} pre-clip norms without clipping: "
        f"median {np.median(norms):.3g}, max {np.max(norms):.3g}"
    )
    # 2. Ask for a threshold.
    suggestion = optax_clip.suggest_max_norm(norms, percentile=percentile)
    print(f"2. {suggestion.explanation}")
    # 3. Train with it and look at how often it clipped.
    _, clipped_losses, state = train(jnp.float32(suggestion.max_norm), steps)
    stats = jax.device_get(optax_clip.get_stats(state))
    fraction = float(stats["clip_by_global_norm/clip_fraction"])
    print(
        f"3. trained {steps} steps with clip_by_global_norm({suggestion.max_norm:.3g})"
        f": clipped {100 * fraction:.1f}% of the steps; loss "
        f"{float(clipped_losses[0]):.4f} -> {float(np.mean(clipped_losses[-10:])):.4f}"
        f" (unclipped run: {float(np.mean(losses[-10:])):.4f})"
    )
    return {
        "recorded_norms": np.asarray(norms),
        "max_norm": suggestion.max_norm,
        "suggestion": suggestion,
        "clip_fraction": fraction,
        "initial_loss": float(clipped_losses[0]),
        "final_loss": float(np.mean(clipped_losses[-10:])),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--percentile", type=float, default=90.0)
    args = parser.parse_args()
    main(args.steps, args.percentile)
