"""Fine-tune a pre-trained Flax NNX model with AdamW and gradient clipping.

The recipe: Orbax checkpoint, warm-up + cosine schedule, a frozen layer,
``clip_by_global_norm`` with its statistics logged.

1. Pre-train a small MLP on a synthetic regression task (8 outputs of a random
   "teacher" network) and save it with Orbax.
2. Restore it into a fresh model and fine-tune it on a shifted task (other
   outputs of the same teacher, larger and offset) whose labels are partly
   corrupted by heavy-tailed noise, as fine-tuning data often is. The
   embedding layer is frozen (an NNX filter), the rest trains with
   ``optax.adamw`` on a warm-up + cosine schedule at a high peak learning rate,
   after ``optax_clip.clip_by_global_norm``.
3. Fine-tune again without clipping and compare the losses on clean held-out
   data.

    python examples/finetune_adamw.py
"""

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import optax_clip

IN, HIDDEN, OUT = 16, 64, 8
BATCH_SIZE = 64
PEAK_LR = 1e-2  # high for fine-tuning
MAX_NORM = 1.0


class MLP(nnx.Module):
    """Embedding, one hidden layer and a linear head."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.hidden = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # noqa: D102
        x = nnx.gelu(self.embed(x))
        x = nnx.gelu(self.hidden(x))
        return self.head(x)


def make_tasks(seed: int):
    """A random teacher; returns two samplers: pre-training and fine-tuning."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN)
    w2 = rng.normal(size=(HIDDEN, 2 * OUT)) / np.sqrt(HIDDEN)

    def features(x):  # the teacher's 16 outputs: 8 for each task
        return np.tanh(x @ w1) @ w2

    def pretrain_batch(rng, n):
        x = rng.normal(size=(n, IN))
        return x.astype(np.float32), features(x)[:, :OUT].astype(np.float32)

    def finetune_batch(rng, n, corrupt=True):
        x = rng.normal(size=(n, IN))
        y = 3.0 * features(x)[:, OUT:] + 1.0  # shifted: other outputs, scaled
        if corrupt:  # 5% of the labels get heavy-tailed (Cauchy) noise
            bad = rng.random((n, 1)) < 0.05
            y = y + bad * 10.0 * rng.standard_cauchy((n, OUT))
        return x.astype(np.float32), y.astype(np.float32)

    return pretrain_batch, finetune_batch


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


evaluate = nnx.jit(loss_fn)

# Fine-tuning trains every parameter except the embedding layer's.
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")))


@nnx.jit
def pretrain_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def finetune_step(model, optimizer, x, y):
    # Differentiate only the trainable parameters: no gradient for the frozen.
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))
    loss, grads = grad_fn(model, x, y)
    optimizer.update(model, grads)
    return loss


def pretrain(steps: int, seed: int, checkpoint_dir: Path) -> tuple[MLP, float]:
    """Pre-trains an MLP and saves its state to ``checkpoint_dir`` with Orbax."""
    pretrain_batch, _ = make_tasks(seed)
    rng = np.random.default_rng(seed + 1)
    model = MLP(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    for _ in range(steps):
        loss = pretrain_step(model, optimizer, *pretrain_batch(rng, BATCH_SIZE))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(checkpoint_dir / "pretrained", nnx.state(model))
    return model, float(loss)


def restore(checkpoint_dir: Path) -> MLP:
    """A new MLP holding the saved parameters."""
    abstract_model = nnx.eval_shape(lambda: MLP(rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(checkpoint_dir / "pretrained", abstract_state)
    return nnx.merge(graphdef, state)


def finetune(model, steps: int, seed: int, clip: bool = True, log_every: int = 50):
    """Fine-tunes ``model`` in place; returns (optimizer, log: a list of dicts)."""
    _, finetune_batch = make_tasks(seed)
    rng = np.random.default_rng(seed + 2)  # the same batches with and without clip
    held_out = finetune_batch(np.random.default_rng(seed + 3), 1024, corrupt=False)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=PEAK_LR,
        warmup_steps=max(1, steps // 10),
        decay_steps=steps,
        end_value=PEAK_LR / 100,
    )
    clipper = optax_clip.clip_by_global_norm(MAX_NORM) if clip else optax.identity()
    tx = optax.chain(clipper, optax.adamw(schedule, weight_decay=1e-4))
    optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)  # state for trainable only
    log = [{"step": 0, "held_out_loss": float(evaluate(model, *held_out))}]
    for step in range(1, steps + 1):
        finetune_step(model, optimizer, *finetune_batch(rng, BATCH_SIZE))
        if step % log_every == 0 or step == steps:
            # What the clipper did: last step's norms and scale, running counts.
            stats = jax.device_get(optax_clip.get_stats(optimizer.opt_state))
            log.append(
                {
                    "step": step,
                    "held_out_loss": float(evaluate(model, *held_out)),
                    "lr": float(schedule(step - 1)),
                    **{k.split("/")[-1]: v.item() for k, v in stats.items()},
                }
            )
    for line in log:
        text = f"  step {line['step']:4d}  held-out loss {line['held_out_loss']:8.4f}"
        if "pre_clip_norm" in line:
            text += f"  lr {line['lr']:.2e}  grad norm {line['pre_clip_norm']:8.3g}"
            text += f"  scale {line['clip_scale']:.3f}"
            text += f"  clipped so far {line['clip_fraction']:4.0%}"
        print(text)
    return optimizer, log


def main(steps: int = 500, seed: int = 0) -> float:
    """Pre-trains, saves, restores and fine-tunes; returns the clipped run's loss."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = Path(tmp).resolve()
        _, loss = pretrain(steps, seed, checkpoint_dir)
        print(f"pre-trained for {steps} steps: loss {loss:.4f}; saved with Orbax")
        results = {}
        for clip in (True, False):
            model = restore(checkpoint_dir)
            frozen = jax.tree.map(jnp.copy, nnx.state(model.embed))
            print(f"fine-tuning {'with' if clip else 'without'} clipping:")
            _, log = finetune(model, steps, seed, clip)
            results[clip] = log[-1]["held_out_loss"]
            unchanged = jax.tree.map(jnp.array_equal, frozen, nnx.state(model.embed))
            assert all(jax.tree.leaves(unchanged)), "the embedding must stay frozen"
    print(
        f"clean held-out loss after fine-tuning at peak lr {PEAK_LR:g}: "
        f"with clip_by_global_norm({MAX_NORM:g}) {results[True]:.4f}, "
        f"without clipping {results[False]:.4f}"
    )
    return results[True]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.seed)
