"""Per-coordinate clips and the momentum reset: outcome and cost.

Two measurements, each printed as a markdown table::

  python -m benchmarks.coordinate_clip outcomes   # 5 seeds, about 2 min on CPU
  python -m benchmarks.coordinate_clip timing     # optimizer step, about 1 min

``outcomes``: the setup of ``examples/spike_rescue.py`` (an MLP regressing a
teacher with Adam at lr 0.05, one batch in 50 corrupted: inputs and random
targets times 30), the same batches for every method, the final clean
held-out MSE per seed. Methods: no clipping, ``clip_by_global_norm(1.0)``,
``spam_clip`` (SPAM's defaults, theta 5000, 20 warm-up steps; and theta 50,
to see how much the threshold matters),
``adaclip`` (Stable-SPAM's theta 0.999), ``adaclip`` then ``adagn``
(Stable-SPAM without its momentum reset), ``skip_on_spike`` and
``skip_on_spike`` with ``reset_on_skip=True``; all around the same Adam;
and Adam on the same data without the corrupted batches.

``timing``: one optimizer step (``update`` + ``apply_updates``, parameters
and state donated, under ``jit``) on a GPT-shaped tree (d=256, 4 blocks,
vocabulary 8192: about 5.3M float32 values in 44 leaves), every variant
timed in interleaved rounds (the order rotating), reported as the median of
the per-round ratios to AdamW alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
import optax

import optax_clip as oc
from benchmarks.run import (
    TrainStep,
    median_ms,
    paired_ratio,
    time_interleaved,
    transformer_tree,
)

ROOT = Path(__file__).resolve().parents[1]


def _spike_rescue():
    path = ROOT / "examples" / "spike_rescue.py"
    spec = importlib.util.spec_from_file_location("spike_rescue", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("spike_rescue", module)
    spec.loader.exec_module(module)
    return module


def outcome_methods(lr: float) -> dict[str, optax.GradientTransformation]:
    return {
        "none": optax.adam(lr),
        "clip_by_global_norm": optax.chain(oc.clip_by_global_norm(1.0), optax.adam(lr)),
        "spam_clip": oc.spam_clip(optax.adam(lr)),
        "spam_clip, theta=50": oc.spam_clip(optax.adam(lr), 50.0),
        "adaclip": optax.chain(oc.adaclip(), optax.adam(lr)),
        "adaclip, adagn": optax.chain(oc.adaclip(), oc.adagn(), optax.adam(lr)),
        "skip_on_spike": oc.skip_on_spike(oc.adam(lr)),
        "skip_on_spike, reset_on_skip": oc.skip_on_spike(
            oc.adam(lr), reset_on_skip=True
        ),
    }


def outcomes(steps: int = 600, seeds=(0, 1, 2, 3, 4), lr: float = 0.05) -> str:
    sr = _spike_rescue()
    data = {s: sr.make_data(s, steps, 50, 30.0) for s in seeds}
    results = {}
    for name, tx in outcome_methods(lr).items():
        run = sr.make_run(tx)
        results[name] = [float(run(*data[s])[0]) for s in seeds]
    clean = {s: sr.make_data(s, steps, 0, 1.0) for s in seeds}
    run = sr.make_run(optax.adam(lr))
    results["none, no spikes"] = [float(run(*clean[s])[0]) for s in seeds]
    return (
        f"Final clean eval MSE, {steps} Adam steps (lr={lr}), a corrupted batch "
        "every 50 steps (examples/spike_rescue.py's setup); lower is better.\n\n"
        + sr.markdown_table(results, seeds)
    )


def timing_variants() -> dict[str, optax.GradientTransformation]:
    def adamw():
        return optax.adamw(1e-3, weight_decay=1e-4)

    def oc_adamw():
        return oc.adamw(1e-3, weight_decay=1e-4)

    return {
        "adamw": adamw(),
        "chain(clip_by_global_norm, adamw)": optax.chain(
            oc.clip_by_global_norm(1.0), adamw()
        ),
        "chain(adaclip, adamw)": optax.chain(oc.adaclip(), adamw()),
        "chain(adagn, adamw)": optax.chain(oc.adagn(), adamw()),
        "chain(adaclip, adagn, adamw)": optax.chain(oc.adaclip(), oc.adagn(), adamw()),
        "spam_clip(adamw)": oc.spam_clip(adamw()),
        "skip_on_spike(oc.adamw)": oc.skip_on_spike(oc_adamw()),
        "skip_on_spike(oc.adamw, reset_on_skip)": oc.skip_on_spike(
            oc_adamw(), reset_on_skip=True
        ),
        "skip_on_spike(oc.adamw, reset_every=500)": oc.skip_on_spike(
            oc_adamw(), reset_every=500
        ),
    }


def timing(reps: int = 30, warmup: int = 3, d: int = 256) -> str:
    params = transformer_tree(d, 4, 8192, seed=1)
    grads = transformer_tree(d, 4, 8192, seed=2)
    n = sum(x.size for x in jax.tree.leaves(params))
    steps = {k: TrainStep(tx, params, grads) for k, tx in timing_variants().items()}
    times = time_interleaved(steps, reps, warmup)
    base = times["adamw"]
    lines = [
        f"One optimizer step, {n / 1e6:.1f}M float32 values in "
        f"{len(jax.tree.leaves(params))} leaves, {jax.devices()[0].platform}; "
        f"median of {reps} interleaved rounds.\n",
        "| variant | ms | ratio to adamw |",
        "|---|---|---|",
    ]
    for k, ts in times.items():
        lines.append(f"| {k} | {median_ms(ts):.2f} | {paired_ratio(ts, base):.2f} |")
    spread = statistics.pstdev(base) / statistics.mean(base)
    lines.append(f"\n(adamw's own round-to-round spread: {100 * spread:.0f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["outcomes", "timing"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.what == "outcomes":
        print(outcomes(args.steps, tuple(range(args.seeds))))
    else:
        np.random.seed(0)
        print(timing(args.reps))


if __name__ == "__main__":
    main()
