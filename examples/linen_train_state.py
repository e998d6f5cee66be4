"""Gradient clipping with Flax Linen and ``flax.training.train_state.TrainState``.

A Linen MLP learns a synthetic regression task whose training labels are
partly corrupted by heavy-tailed noise (5% of them), so a few batches give
gradients hundreds of times larger than the rest. The optimizer is
``optax.chain(optax_clip.clip_by_global_norm(1.0), optax.adam(1e-2))`` inside a
``TrainState``; the clip statistics are read from ``state.opt_state`` with
``optax_clip.get_stats``. The same run without clipping is printed for
comparison (loss on clean held-out data).

    python examples/linen_train_state.py
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import optax_clip

IN, HIDDEN, OUT = 16, 64, 4
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
MAX_NORM = 1.0


class MLP(nn.Module):
    """Two hidden layers and a linear head."""

    @nn.compact
    def __call__(self, x):  # noqa: D102
        x = nn.gelu(nn.Dense(HIDDEN)(x))
        x = nn.gelu(nn.Dense(HIDDEN)(x))
        return nn.Dense(OUT)(x)


def make_task(seed: int):
    """A random teacher network; returns a batch sampler for its task."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN)
    w2 = rng.normal(size=(HIDDEN, OUT)) * 3.0 / np.sqrt(HIDDEN)

    def batch(rng, n, corrupt=True):
        x = rng.normal(size=(n, IN))
        y = np.tanh(x @ w1) @ w2
        if corrupt:  # 5% of the labels get heavy-tailed (Cauchy) noise
            bad = rng.random((n, 1)) < 0.05
            y = y + bad * 10.0 * rng.standard_cauchy((n, OUT))
        return x.astype(np.float32), y.astype(np.float32)

    return batch


@jax.jit
def train_step(state: train_state.TrainState, x, y):
    def loss_fn(params):
        return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads)  # clip, Adam, apply
    return state, loss


@jax.jit
def evaluate(state: train_state.TrainState, x, y):
    return jnp.mean((state.apply_fn({"params": state.params}, x) - y) ** 2)


def train(steps=1000, seed=0, clip=True, log_every=100):
    """Trains the MLP; returns the final TrainState and a log (a list of dicts)."""
    batch = make_task(seed)
    rng = np.random.default_rng(seed + 1)  # the same batches with and without clip
    held_out = batch(np.random.default_rng(seed + 2), 1024, corrupt=False)
    model = MLP()
    params = model.init(jax.random.key(seed), held_out[0][:1])["params"]
    clipper = optax_clip.clip_by_global_norm(MAX_NORM) if clip else optax.identity()
    tx = optax.chain(clipper, optax.adam(LEARNING_RATE))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    log = [{"step": 0, "held_out_loss": float(evaluate(state, *held_out))}]
    for step in range(1, steps + 1):
        state, _ = train_step(state, *batch(rng, BATCH_SIZE))
        if step % log_every == 0 or step == steps:
            stats = jax.device_get(optax_clip.get_stats(state.opt_state))
            log.append(
                {
                    "step": step,
                    "held_out_loss": float(evaluate(state, *held_out)),
                    **{k.split("/")[-1]: v.item() for k, v in stats.items()},
                }
            )
            if clip:
                line = log[-1]
                print(
                    f"  step {step:5d}  held-out loss {line['held_out_loss']:8.4f}"
                    f"  grad norm {line['pre_clip_norm']:8.3g}"
                    f"  clipped so far {line['clip_fraction']:4.0%}"
                )
    return state, log


def main(steps: int = 1000, seed: int = 0) -> float:
    """Trains with and without clipping; returns the clipped run's held-out loss."""
    print(f"Adam(lr={LEARNING_RATE:g}) after clip_by_global_norm({MAX_NORM:g}):")
    clipped = train(steps, seed, clip=True)[1][-1]["held_out_loss"]
    unclipped = train(steps, seed, clip=False)[1][-1]["held_out_loss"]
    print(
        f"clean held-out loss after {steps} steps: with clipping {clipped:.4f}, "
        f"without clipping {unclipped:.4f}"
    )
    return clipped


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.seed)
