"""Train a Flax NNX model over 8 devices with a global-norm clip, three ways.

The same model, data and optimizer,
``optax.chain(optax_clip.clip_by_global_norm(...), optax.adamw(...))``, are
trained:

1. on one device (the reference);
2. with a sharded ``jax.jit`` step over 8 devices: data parallel, the batch
   split over a mesh axis and the parameters replicated. XLA computes the
   global norm by itself: no ``axis_name``;
3. with ``jax.shard_map`` over the same 8 devices, FSDP style: each weight
   matrix is split by rows over the devices (biases are replicated), the batch
   too. Inside ``shard_map`` every device only sees its own piece, so the clip
   gets ``axis_name="data"``: the per-device partial sums are added across
   devices, and the replicated biases are counted once.

It prints the pre-clip gradient norm of every step (read with
``optax_clip.get_stats``) for the three runs and checks that they agree.
On a CPU-only machine the 8 devices are simulated:

    python examples/data_parallel.py
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_clip

N_DEVICES = 8
IN, HIDDEN, OUT = 16, 32, 4
BATCH_SIZE = 64
MAX_NORM = 0.5
LEARNING_RATE = 1e-2
STAT = "clip_by_global_norm/pre_clip_norm"


def use_simulated_cpu_devices(n: int = N_DEVICES) -> None:
    """Asks for ``n`` CPU devices; only possible before JAX initialises."""
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # already initialised (e.g. imported by a test)
        pass


class MLP(nnx.Module):
    """A two-layer perceptron."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The model's output for a batch ``x``."""
        return self.head(nnx.gelu(self.hidden(x)))


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


def make_optimizer(model: MLP, axis_name=None) -> nnx.Optimizer:
    tx = optax.chain(
        optax_clip.clip_by_global_norm(MAX_NORM, axis_name=axis_name),
        optax.adamw(LEARNING_RATE),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def make_batches(steps: int, seed: int):
    """Synthetic regression batches (a fixed random teacher, noisy labels)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(IN, OUT)) / np.sqrt(IN)
    for _ in range(steps):
        x = rng.normal(size=(BATCH_SIZE, IN))
        y = np.sin(x @ teacher) + 0.1 * rng.normal(size=(BATCH_SIZE, OUT))
        yield x.astype(np.float32), y.astype(np.float32)


# --------------------------------------------------------------------------
# 1 and 2: one device, and a sharded jit step (the code is the same).
# --------------------------------------------------------------------------


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss, optax_clip.get_stats(optimizer.opt_state)[STAT]


def train_with_jit(steps: int, seed: int, mesh=None):
    """One device (``mesh=None``) or data parallel over ``mesh``'s "data" axis."""
    model = MLP(rngs=nnx.Rngs(seed))
    optimizer = make_optimizer(model)  # no axis_name under jit
    if mesh is not None:
        # Replicate the parameters and optimizer state on every device.
        state = nnx.state((model, optimizer))
        nnx.update((model, optimizer), jax.device_put(state, NamedSharding(mesh, P())))
        batch_sharding = NamedSharding(mesh, P("data"))
    else:
        batch_sharding = jax.devices()[0]
    losses, norms = [], []
    for x, y in make_batches(steps, seed):
        x, y = jax.device_put((x, y), batch_sharding)
        loss, norm = train_step(model, optimizer, x, y)
        losses.append(float(loss))
        norms.append(float(norm))
    return losses, norms


# --------------------------------------------------------------------------
# 3: shard_map, parameters and batch split over the devices (FSDP style).
# --------------------------------------------------------------------------


def fsdp_spec(x) -> P:
    """Weight matrices are split by rows; biases and scalars are replicated."""
    return P("data") if jnp.ndim(x) == 2 and x.shape[0] % N_DEVICES == 0 else P()


def train_with_shard_map(steps: int, seed: int, mesh):
    model = MLP(rngs=nnx.Rngs(seed))
    optimizer = make_optimizer(model, axis_name="data")  # the norm is global
    graphdef, params = nnx.split(model)
    opt_graphdef, opt_state = nnx.split(optimizer)
    param_specs = jax.tree.map(fsdp_spec, params)
    opt_specs = jax.tree.map(fsdp_spec, opt_state)

    def step(params, opt_state, x, y):
        def local_loss(params):
            # Gather the full weights for the forward pass; the gradient of
            # the gather hands each device the (summed) gradient of its rows.
            full = jax.tree.map(
                lambda a, s: lax.all_gather(a, "data", tiled=True) if s else a,
                params,
                param_specs,
            )
            # pmean: the mean loss over the whole batch. (Its gradient with
            # respect to the replicated biases is already the full mean.)
            return lax.pmean(loss_fn(nnx.merge(graphdef, full), x, y), "data")

        loss, grads = jax.value_and_grad(local_loss)(params)
        model, optimizer = (
            nnx.merge(graphdef, params),
            nnx.merge(opt_graphdef, opt_state),
        )
        optimizer.update(model, grads)  # clips with axis_name="data"
        norm = optax_clip.get_stats(optimizer.opt_state)[STAT]
        return nnx.state(model), nnx.state(optimizer), loss, norm

    sharded_step = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(param_specs, opt_specs, P("data"), P("data")),
            # With check_vma=True (the default) JAX proves that the loss and
            # the norm are the same on every device, or refuses out_specs P().
            out_specs=(param_specs, opt_specs, P(), P()),
        )
    )

    def put(tree, specs):
        return jax.tree.map(
            lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs
        )

    params, opt_state = put(params, param_specs), put(opt_state, opt_specs)
    losses, norms = [], []
    for x, y in make_batches(steps, seed):
        x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
        params, opt_state, loss, norm = sharded_step(params, opt_state, x, y)
        losses.append(float(loss))
        norms.append(float(norm))
    return losses, norms


def main(steps: int = 20, seed: int = 0) -> float:
    """Trains three ways; returns the largest relative difference of the norms."""
    if jax.device_count() < N_DEVICES:
        raise RuntimeError(
            f"needs {N_DEVICES} devices, found {jax.device_count()}: run as a "
            "script, or call use_simulated_cpu_devices() before using JAX."
        )
    mesh = jax.make_mesh((N_DEVICES,), ("data",), devices=jax.devices()[:N_DEVICES])
    ref_losses, ref_norms = train_with_jit(steps, seed)
    jit_losses, jit_norms = train_with_jit(steps, seed, mesh)
    sm_losses, sm_norms = train_with_shard_map(steps, seed, mesh)

    print("step   loss     pre-clip norm: 1 device   sharded jit   shard_map")
    for i in range(steps):
        print(
            f"{i:4d}  {ref_losses[i]:.4f}  {ref_norms[i]:23.6f}  "
            f"{jit_norms[i]:12.6f}  {sm_norms[i]:10.6f}"
        )
    ref = np.asarray(ref_norms)
    worst = 0.0
    for name, norms, losses in [
        ("sharded jit", jit_norms, jit_losses),
        ("shard_map", sm_norms, sm_losses),
    ]:
        rel = float(np.max(np.abs(np.asarray(norms) - ref) / ref))
        loss_rel = float(np.max(np.abs(np.asarray(losses) - ref_losses) / ref_losses))
        print(f"{name}: largest relative difference {rel:.1e} (norms), ", end="")
        print(f"{loss_rel:.1e} (losses)")
        if rel > 1e-4 or loss_rel > 1e-4:
            raise AssertionError(f"{name} does not match the single-device run")
        worst = max(worst, rel, loss_rel)
    clipped = int(np.sum(ref > MAX_NORM))
    print(f"{clipped} of {steps} steps were clipped to norm {MAX_NORM}.")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    use_simulated_cpu_devices()
    main(steps=args.steps, seed=args.seed)
