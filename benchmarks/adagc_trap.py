"""AdaGC's warm-up trap, and the ``warmup_max_drop`` remedy, measured.

Run it::

  python -m benchmarks.adagc_trap                  # 5 seeds, Adam, ~20 s on CPU
  python -m benchmarks.adagc_trap --optimizer sgd  # SGD with momentum 0.9

The model and data of ``examples/spike_rescue.py`` (an MLP regressing a
teacher; 6 tensors, no corrupted batches), trained for 1500 steps with
``chain(adagc(warmup_steps=100), optimizer)``. At step ``--spike-at``
(default 50, inside AdaGC's global-clip warm-up) the first layer's weight
gradient is multiplied by ``--factor`` (default 1000), a glitch in one tensor.
During warm-up each tensor's reference is the smallest globally clipped norm
it has had, so that step divides the five other tensors' references by the
factor the global clip applied (about 15 here); afterwards a reference can
grow by at most
``beta + (1 - beta) * clip_ratio`` (0.04 %) a step, so those tensors are
clipped on every remaining step.

For each variant the table gives the share of the tensor-steps after warm-up
on which a tensor was clipped (``clipped_tensors`` of the state, the authors'
per-step rule ``||g_i|| > clip_ratio * gamma_i``) and the final clean
held-out loss (median over seeds), with and without the glitch.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import optax_clip as oc
from examples.spike_rescue import _loss, make_data

WARMUP = 100


def glitches(steps: int, spike_at: int | None, factor: float) -> np.ndarray:
    """Per-step factor on the first layer's weight gradient (1 but at the spike)."""
    out = np.ones(steps, np.float32)
    if spike_at is not None:
        out[spike_at] = factor
    return out


def make_run(tx: optax.GradientTransformation):
    """Jitted ``(data, glitch factors) -> (final eval loss, clipped per step)``."""

    @jax.jit
    def run(params, xs, ys, x_eval, y_eval, glitch):
        def step(carry, batch):
            params, state = carry
            x, y, factor = batch
            grads = jax.grad(_loss)(params, x, y)
            # A glitch in one tensor (a numerical fault, a rare token's row).
            grads[0]["w"] = grads[0]["w"] * factor
            updates, state = tx.update(grads, state, params)
            clipped = oc.get_stats(state)["adagc/clipped_tensors"]
            return (optax.apply_updates(params, updates), state), clipped

        carry = (params, tx.init(params))
        (params, _), clipped = jax.lax.scan(step, carry, (xs, ys, glitch))
        return _loss(params, x_eval, y_eval), clipped

    return run


def variants(opt: optax.GradientTransformation) -> dict:
    return {
        "adagc (authors' rule)": optax.chain(oc.adagc(warmup_steps=WARMUP), opt),
        "adagc, warmup_max_drop=1.04": optax.chain(
            oc.adagc(warmup_steps=WARMUP, warmup_max_drop=1.04), opt
        ),
    }


def measure(seeds, steps, spike_at, factor, opt) -> list[dict]:
    rows = []
    data = {seed: make_data(seed, steps, 0, 1.0) for seed in seeds}
    for name, tx in variants(opt).items():
        run = make_run(tx)
        for spike in (spike_at, None):
            losses, shares = [], []
            for seed in seeds:
                glitch = glitches(steps, spike, factor)
                loss, clipped = run(*data[seed], glitch)
                n_tensors = 6
                after = np.asarray(clipped)[WARMUP:]
                losses.append(float(loss))
                shares.append((int(after.sum()), n_tensors * after.size))
            rows.append(
                {
                    "variant": name,
                    "spike": spike is not None,
                    "clipped": sum(c for c, _ in shares),
                    "tensor_steps": sum(t for _, t in shares),
                    "loss": float(np.median(losses)),
                    "losses": losses,
                }
            )
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--spike-at", type=int, default=50)
    parser.add_argument("--factor", type=float, default=1000.0)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args(argv)
    lr = args.lr or {"adam": 0.01, "sgd": 0.1}[args.optimizer]
    opt = optax.adam(lr) if args.optimizer == "adam" else optax.sgd(lr, 0.9)
    start = time.perf_counter()
    rows = measure(range(args.seeds), args.steps, args.spike_at, args.factor, opt)
    print(
        f"{args.steps} steps of {args.optimizer} (lr={lr}), AdaGC warm-up "
        f"{WARMUP} steps, {args.seeds} seeds; the first layer's weight gradient "
        f"times {args.factor:g} at step {args.spike_at}, or never.\n"
    )
    print(
        "| variant | glitch | tensor-steps clipped after warm-up | "
        "final eval loss (median) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        share = f"{r['clipped']:,} of {r['tensor_steps']:,}"
        share += f" ({100 * r['clipped'] / r['tensor_steps']:.1f} %)"
        spike = f"step {args.spike_at}" if r["spike"] else "never"
        print(f"| {r['variant']} | {spike} | {share} | {r['loss']:.4f} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
