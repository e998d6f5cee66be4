"""Update clipping on examples/spike_rescue.py's task, and its optimizer-call cost.

Two measurements for the update clips (issue 18):

1. **Outcome**: the spike-rescue task of ``examples/spike_rescue.py`` (an MLP
   regressing a teacher with Adam at lr 0.05, a corrupted batch every 50
   steps, the same batches for every method) with the update clips, against
   no clipping and ``clip_by_global_norm(1.0)`` before Adam. The table gives
   the final clean eval MSE per seed (lower is better).
2. **Cost** (``--cost``): the optimizer call alone (``tx.update`` and
   ``apply_updates``, jitted, parameters and state donated) on a tree of
   mixed leaves, timed in interleaved rounds (the order rotating each round);
   per variant the median time and the median of the per-round ratios to
   adamw alone.

Run it::

  python -m benchmarks.update_clip            # outcome, 5 seeds (~2 minutes)
  python -m benchmarks.update_clip --cost     # cost (~1 minute)
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_clip as oc

LR = 0.05
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """``examples/<name>.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def methods(lr: float = LR) -> dict[str, optax.GradientTransformation]:
    """The compared optimizers: Adam, with a gradient clip or an update clip."""
    adam = optax.adam(lr)
    return {
        "none": adam,
        "clip_by_global_norm": optax.chain(oc.clip_by_global_norm(1.0), adam),
        "clip_update_by_history": optax.chain(adam, oc.clip_update_by_history()),
        "zclip after adam": optax.chain(adam, oc.zclip()),
        **{
            f"clip_update_by_param_norm({r})": optax.chain(
                adam, oc.clip_update_by_param_norm(r)
            )
            for r in (0.01, 0.05, 0.2)
        },
        "stable_adamw": oc.stable_adamw(lr, weight_decay=0.0),
    }


def _clip_fraction(ex, tx, params, xs, ys) -> float:
    """Fraction of the steps the transform clipped (0 without statistics)."""

    @jax.jit
    def run(params, xs, ys):
        def step(carry, batch):
            params, state = carry
            grads = jax.grad(ex._loss)(params, *batch)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (_, state), _ = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
        stats = oc.get_stats(state, fields=None)
        fractions = [v for k, v in stats.items() if k.endswith("/clip_fraction")]
        return fractions[0] if fractions else jnp.zeros(())

    return float(run(params, xs, ys))


def outcome(steps: int, seeds: tuple[int, ...]):
    """Final clean eval MSE per method and seed, the table, and clip fractions."""
    ex = load_example("spike_rescue")
    data = {s: ex.make_data(s, steps, 50, 30.0) for s in seeds}
    results, fractions = {}, {}
    for name, tx in methods().items():
        run = ex.make_run(tx)
        results[name] = [float(run(*data[s])[0]) for s in seeds]
        fractions[name] = [_clip_fraction(ex, tx, *data[s][:3]) for s in seeds]
    # Controls: Adam at a 5x lower learning rate, and without the corrupted
    # batches.
    run = ex.make_run(optax.adam(LR / 5))
    results[f"none, lr {LR / 5:g}"] = [float(run(*data[s])[0]) for s in seeds]
    clean = {s: ex.make_data(s, steps, 0, 1.0) for s in seeds}
    run = ex.make_run(optax.adam(LR))
    results["none, no spikes"] = [float(run(*clean[s])[0]) for s in seeds]
    return results, ex.markdown_table(results, seeds), fractions


def _tree(seed: int = 0) -> dict:
    """A small transformer-like tree: matrices, vectors, a frozen zero leaf."""
    rng = np.random.default_rng(seed)
    shapes = [(1024, 512), (512, 1024), (512,), (1024,), (512, 512), (64, 512)] * 4
    tree = {
        f"p{i}": jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32)
        for i, s in enumerate(shapes)
    }
    tree["frozen"] = jnp.zeros((256, 64), jnp.float32)
    return tree


def cost(rounds: int, steps: int) -> str:
    adamw = lambda: optax.adamw(1e-3, weight_decay=1e-4)  # noqa: E731
    variants = {
        "adamw": adamw(),
        "chain(clip_by_global_norm, adamw)": optax.chain(
            oc.clip_by_global_norm(1.0), adamw()
        ),
        # Any clip after the optimizer, for reference (optax's and ours).
        "chain(adamw, optax.clip_by_global_norm)": optax.chain(
            adamw(), optax.clip_by_global_norm(1.0)
        ),
        "chain(adamw, clip_by_global_norm)": optax.chain(
            adamw(), oc.clip_by_global_norm(1.0)
        ),
        "chain(adamw, clip_update_by_history)": optax.chain(
            adamw(), oc.clip_update_by_history(16)
        ),
        "chain(adamw, clip_update_by_param_norm)": optax.chain(
            adamw(), oc.clip_update_by_param_norm(0.01)
        ),
        "stable_adamw": oc.stable_adamw(1e-3, weight_decay=1e-4),
    }
    params = _tree()
    grads = jax.tree.map(lambda x: x + 0.01, _tree(1))
    runs = {}
    for name, tx in variants.items():

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        # Copied: an init may share one buffer between fields (not donatable).
        p, s = jax.tree.map(jnp.copy, (params, tx.init(params)))
        p, s = fn(p, s, grads)  # compile
        jax.block_until_ready(p)
        runs[name] = [fn, p, s]
    times = {n: [] for n in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, p, s = runs[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                p, s = fn(p, s, grads)
            jax.block_until_ready((p, s))
            times[name].append((time.perf_counter() - t0) / steps)
            runs[name][1:] = [p, s]
    base = np.asarray(times["adamw"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    lines = [
        f"Optimizer call on {n_params:,} float32 parameters in "
        f"{len(params)} leaves, {rounds} interleaved rounds of {steps} steps "
        f"({jax.devices()[0].platform}).\n",
        "| variant | median ms | ratio to adamw |",
        "|---|---|---|",
    ]
    for name in names:
        t = np.asarray(times[name])
        ratio = float(np.median(t / base))
        lines.append(f"| {name} | {1e3 * np.median(t):.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.cost:
        print(cost(args.rounds, 20))
    else:
        _, table, fractions = outcome(args.steps, tuple(range(args.seeds)))
        print(
            f"Final clean eval MSE after {args.steps} Adam steps (lr={LR}), a "
            "corrupted batch (x*30, random y*30) every 50 steps; lower is "
            "better.\n"
        )
        print(table)
        print("\nShare of steps clipped (median over the seeds):\n")
        print("| method | clipped steps |\n|---|---|")
        for name, f in fractions.items():
            if name != "none":
                print(f"| {name} | {np.median(f):.1%} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
