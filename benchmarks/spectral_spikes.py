"""Spectral clipping on examples/spike_rescue.py's task (issue 18's evidence).

Run from the repository root (about 2 minutes on 2 cores)::

  python -m benchmarks.spectral_spikes
  python -m benchmarks.spectral_spikes --steps 100 --seeds 2   # seconds

The task, data, seeds and Adam of ``examples/spike_rescue.py`` (an MLP
16-64-64-1 regressing a teacher at learning rate 0.05, a batch corrupted 30x
every 50 steps; its functions are reused, its README table is not touched),
with these methods, each with the same Adam:

* ``none`` and ``clip_by_global_norm`` (1.0), as in spike_rescue;
* ``spectral hard`` and ``spectral soft``: ``clip_by_spectral_norm(1.0)``
  of the gradient (hard, and SPECTRA's soft map), vectors by their norm;
* ``spectral soft, update``: SPECTRA's placement, the soft clip of Adam's
  direction before the learning rate:
  ``chain(scale_by_adam(), clip_by_spectral_norm(5.0, mode="soft",
  vectors="pass"), scale(-lr))``.

Printed: the final clean eval MSE per seed and the median (lower is better).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optax

import optax_clip as oc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import spike_rescue  # noqa: E402


def methods(learning_rate: float) -> dict[str, optax.GradientTransformation]:
    adam = optax.adam(learning_rate)
    return {
        "none": adam,
        "clip_by_global_norm": optax.chain(oc.clip_by_global_norm(1.0), adam),
        "spectral hard": optax.chain(oc.clip_by_spectral_norm(1.0), adam),
        "spectral soft": optax.chain(oc.clip_by_spectral_norm(1.0, mode="soft"), adam),
        "spectral soft, update": optax.chain(
            optax.scale_by_adam(),
            oc.clip_by_spectral_norm(5.0, mode="soft", vectors="pass"),
            optax.scale(-learning_rate),
        ),
    }


def main(steps=600, seeds=(0, 1, 2, 3, 4), learning_rate=0.05) -> dict:
    start = time.perf_counter()
    data = {s: spike_rescue.make_data(s, steps, 50, 30.0) for s in seeds}
    results = {}
    for name, tx in methods(learning_rate).items():
        run = spike_rescue.make_run(tx)
        results[name] = [float(run(*data[s])[0]) for s in seeds]
    print(
        f"Final clean eval MSE after {steps} steps (lr={learning_rate}), "
        "spike_rescue's corrupted batches; lower is better.\n"
    )
    print(spike_rescue.markdown_table(results, seeds))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    main(args.steps, tuple(range(args.seeds)), args.lr)
