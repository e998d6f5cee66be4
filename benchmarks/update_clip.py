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
   per variant the median time, the median of the per-round ratios to
   adamw alone, the temporary memory the compiled call reserves and the
   page faults per call (the process's minor faults over the timed calls).
3. **Why a clip after the optimizer costs more on CPU** (``--repro``): the
   same effect in a few lines of ``jax.numpy`` on one 2048 x 2048 float32
   leaf (16 MiB an array), an Adam-like step with and without a global-norm
   clip of its update in three spellings (docs/performance.md, section 9).

Run it::

  python -m benchmarks.update_clip            # outcome, 5 seeds (~2 minutes)
  python -m benchmarks.update_clip --cost     # cost (~1 minute)
  python -m benchmarks.update_clip --repro    # the jnp reproduction (~30 s)
  # the same with the temporaries reused (no page faults; see section 9):
  T=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2000000000
  GLIBC_TUNABLES=$T:glibc.malloc.arena_max=1 python -m benchmarks.update_clip --cost
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

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
    runs, temp = {}, {}
    for name, tx in variants.items():

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        # Copied: an init may share one buffer between fields (not donatable).
        p, s = jax.tree.map(jnp.copy, (params, tx.init(params)))
        compiled = fn.lower(p, s, grads).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        p, s = fn(p, s, grads)  # compile
        jax.block_until_ready(p)
        runs[name] = [fn, p, s]
    times = {n: [] for n in variants}
    faults = dict.fromkeys(variants, 0)
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, p, s = runs[name]
            f0 = _minor_faults()
            t0 = time.perf_counter()
            for _ in range(steps):
                p, s = fn(p, s, grads)
            jax.block_until_ready((p, s))
            times[name].append((time.perf_counter() - t0) / steps)
            faults[name] += _minor_faults() - f0
            runs[name][1:] = [p, s]
    base = np.asarray(times["adamw"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    lines = [
        f"Optimizer call on {n_params:,} float32 parameters in "
        f"{len(params)} leaves, {rounds} interleaved rounds of {steps} steps "
        f"({jax.devices()[0].platform}; GLIBC_TUNABLES="
        f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}).\n",
        "| variant | median ms | ratio to adamw | temporaries MiB "
        "| page faults per call |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        t = np.asarray(times[name])
        ratio = float(np.median(t / base))
        per_call = faults[name] / (rounds * steps)
        lines.append(
            f"| {name} | {1e3 * np.median(t):.3f} | {ratio:.2f} | "
            f"{temp[name]:.1f} | {per_call:,.0f} |"
        )
    return "\n".join(lines)


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _adam_like(p, mu, nu, g):
    """One Adam step's moments and update ``-lr (m / (sqrt(v) + eps) + wd p)``."""
    mu = 0.9 * mu + 0.1 * g
    nu = 0.999 * nu + 0.001 * g * g
    return -1e-3 * (mu / (jnp.sqrt(nu) + 1e-8) + 1e-4 * p), mu, nu


def _clip_where(u):
    """optax's spelling: ``where(norm < 1, u, u / norm)``."""
    n = jnp.sqrt(jnp.sum(u * u))
    return jnp.where(n < 1.0, u, u / n)


def _clip_product(u):
    """A product with the scale: ``u * min(1, 1 / norm)``."""
    return u * jnp.minimum(1.0, 1.0 / jnp.sqrt(jnp.sum(u * u)))


def _clip_cond(u):
    """The product, the sum redone inside a ``lax.cond`` if it overflowed
    (the shape of optax_clip's norm: the branch needs the update as an
    operand)."""
    s = jnp.sum(u * u)
    s = lax.cond(s < jnp.inf, lambda: s, lambda: 1e30 * jnp.sum((u * 1e-15) ** 2))
    return u * jnp.minimum(1.0, 1.0 / jnp.sqrt(s))


def repro(rounds: int, shape=(2048, 2048)) -> str:
    """The temporaries and page faults of a clip after an Adam-like step, in jnp."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    p0, mu0, nu0, g = (jax.random.normal(k, shape) for k in keys)
    nu0 = nu0 * nu0
    forms = {
        "no clip": lambda u: u,
        "where(norm < 1, u, u / norm)": _clip_where,
        "u * min(1, 1 / norm)": _clip_product,
        "u * min(1, 1 / norm), sum in lax.cond": _clip_cond,
    }
    cases, temp, faults = {}, {}, {}
    for name, clip in forms.items():

        def step(p, mu, nu, g, clip=clip):
            u, mu, nu = _adam_like(p, mu, nu, g)
            return p + clip(u), mu, nu

        fn = jax.jit(step, donate_argnums=(0, 1, 2))
        box = [jnp.copy(p0), jnp.copy(mu0), jnp.copy(nu0)]
        compiled = fn.lower(*box, g).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        box[:] = fn(*box, g)
        jax.block_until_ready(box)
        faults[name] = 0

        def run(fn=fn, box=box, name=name):
            f0 = _minor_faults()
            box[:] = fn(*box, g)
            jax.block_until_ready(box)
            faults[name] += _minor_faults() - f0
            return box[0]

        cases[name] = run
    from benchmarks.run import median_ms, paired_ratio, time_interleaved

    times = time_interleaved(cases, rounds, 2)
    for name in faults:  # the two warm-up rounds counted too
        faults[name] /= rounds + 2
    base = times["no clip"]
    lines = [
        f"An Adam-like step on one {shape[0]} x {shape[1]} float32 leaf (p, mu, nu "
        f"donated), {rounds} interleaved rounds ({jax.devices()[0].platform}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}).\n",
        "| clip of the update | median ms | ratio | temporaries MiB "
        "| page faults per call |",
        "|---|---|---|---|---|",
    ]
    for name in forms:
        lines.append(
            f"| {name} | {median_ms(times[name]):.2f} | "
            f"{paired_ratio(times[name], base):.2f} | {temp[name]:.1f} | "
            f"{faults[name]:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--repro", action="store_true")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.repro:
        print(repro(args.rounds))
    elif args.cost:
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
