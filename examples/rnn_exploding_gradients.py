"""Train a ReLU recurrent network whose gradients explode, with gradient clipping.

The task is the adding problem (Hochreiter & Schmidhuber, 1997): a sequence of
random values, two of them marked; the target is the sum of the two marked
values, so the network must carry a value across up to ``seq_len`` steps. The
network is an IRNN (Le et al., 2015): ReLU units with the recurrent matrix
initialised to the identity, which carries the signal but also lets the
hidden state, and the gradient, grow without bound (by a factor that can reach
``|W|^T`` over ``T`` steps). Its gradient norm reaches 1e6 and more in the
first steps (and far more later), so Adam's running second moment is swamped
and training stalls or blows up, unless the gradient is clipped first:

    tx = optax.chain(optax_clip.clip_by_global_norm(1.0), optax.adam(schedule))

Run it (under a minute on a 2-core CPU), then without clipping to compare:

    python examples/rnn_exploding_gradients.py
    python examples/rnn_exploding_gradients.py --no-clip

``python -m optax_clip.demo`` runs this task for several clipping methods and
plots the curves.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_clip

BATCH_SIZE = 32
HIDDEN_SIZE = 32
LEARNING_RATE = 3e-3
MAX_NORM = 1.0  # the usual default; the pre-clip norm is logged below


def adding_problem(rng: np.random.Generator, batch_size: int, seq_len: int):
    """A batch of (inputs, targets): inputs (batch, seq_len, 2), targets (batch,)."""
    values = rng.random((batch_size, seq_len), dtype=np.float32)
    markers = np.zeros((batch_size, seq_len), np.float32)
    rows = np.arange(batch_size)
    markers[rows, rng.integers(0, seq_len // 2, batch_size)] = 1.0  # first half
    markers[rows, rng.integers(seq_len // 2, seq_len, batch_size)] = 1.0  # second
    inputs = np.stack([values, markers], axis=-1)
    targets = np.sum(values * markers, axis=-1)
    return inputs, targets


class IRNN(nnx.Module):
    """h_t = relu(W h_{t-1} + U x_t + b), W initialised to the identity."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        self.encoder = nnx.Linear(2, hidden_size, rngs=rngs)
        self.recurrent = nnx.Param(jnp.eye(hidden_size))
        self.readout = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, inputs: jax.Array) -> jax.Array:  # noqa: D102
        drive = jnp.swapaxes(self.encoder(inputs), 0, 1)  # (time, batch, hidden)
        w = self.recurrent[...]

        def step(h, drive_t):
            return jax.nn.relu(h @ w + drive_t), None

        h, _ = jax.lax.scan(step, jnp.zeros_like(drive[0]), drive)
        return self.readout(h)[:, 0]  # prediction from the last hidden state


def loss_fn(model: IRNN, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean((model(inputs) - targets) ** 2)


@nnx.jit
def train_step(model: IRNN, optimizer: nnx.Optimizer, inputs, targets):
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
    optimizer.update(model, grads)  # clip, then Adam, then apply: in place
    return loss


evaluate = nnx.jit(loss_fn)


def make_optimizer(steps: int, clip: bool = True) -> optax.GradientTransformation:
    """Adam with a cosine decay, after global-norm clipping unless ``clip=False``."""
    schedule = optax.cosine_decay_schedule(LEARNING_RATE, steps, alpha=0.01)
    clipper = optax_clip.clip_by_global_norm(MAX_NORM) if clip else optax.identity()
    return optax.chain(clipper, optax.adam(schedule))


def train(steps=1500, seed=0, clip=True, seq_len=100, log_every=100):
    """Trains an IRNN; returns (model, optimizer, log), log a list of dicts."""
    rng = np.random.default_rng(seed)
    held_out = adding_problem(rng, 512, seq_len)
    model = IRNN(HIDDEN_SIZE, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, make_optimizer(steps, clip), wrt=nnx.Param)
    log = [{"step": 0, "held_out_loss": float(evaluate(model, *held_out))}]
    for step in range(1, steps + 1):
        loss = train_step(model, optimizer, *adding_problem(rng, BATCH_SIZE, seq_len))
        if step % log_every == 0 or step == steps:
            # The clipper's statistics: pre/post-clip norm, scale, counts, ...
            stats = jax.device_get(optax_clip.get_stats(optimizer.opt_state))
            log.append(
                {
                    "step": step,
                    "loss": float(loss),
                    "held_out_loss": float(evaluate(model, *held_out)),
                    **{k.split("/")[-1]: v.item() for k, v in stats.items()},
                }
            )
            line = log[-1]
            text = f"step {step:5d}  loss {line['loss']:10.4g}"
            text += f"  held-out loss {line['held_out_loss']:10.4g}"
            if stats:
                text += f"  grad norm {line['pre_clip_norm']:9.3g}"
                text += f"  clipped so far {line['clip_fraction']:4.0%}"
            print(text)
    return model, optimizer, log


def main(steps: int = 1500, seed: int = 0, clip: bool = True, seq_len: int = 100):
    """Trains and returns the final held-out loss (1/6 = predicting the mean)."""
    _, _, log = train(steps, seed, clip, seq_len)
    final = log[-1]["held_out_loss"]
    print(f"{'with' if clip else 'without'} clipping: final held-out loss {final:.4g}")
    return final


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--no-clip", action="store_true", help="train without it")
    args = parser.parse_args()
    main(args.steps, args.seed, clip=not args.no_clip, seq_len=args.seq_len)
