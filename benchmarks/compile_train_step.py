"""Compile time of a whole train step with thousands of leaves (issue 16, item 3).

Run it::

  python -m benchmarks.compile_train_step                 # 187 layers: 2997 leaves
  python -m benchmarks.compile_train_step --layers 62     # 997 leaves

The GPT-style Flax NNX model of ``benchmarks/train_step.py`` (section g), made
deep and narrow (d=64, 4 heads, vocabulary 256, 16 tokens: small arrays, many
of them): 16 leaves per layer, 2997 in all at 187 layers. Each variant's step
(loss, ``value_and_grad``, ``optimizer.update``, one ``jit`` with donation) is
traced and compiled ahead of time, once, and the seconds are reported with
their ratio to the same step with optax's clip in the same position
(``optax.clip_by_global_norm`` for the global clips, ``optax.clip_by_block_rms``
for the per-leaf ones), and to ``adamw`` alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_clip as oc
from benchmarks.train_step import GPTConfig, JaxCase, adamw, n_leaves

#: ``name: (the clip chained before adamw, the optax variant it is compared with)``.
CLIPS = {
    "optax.clip_by_global_norm": (
        optax.clip_by_global_norm,
        "optax.clip_by_global_norm",
    ),
    "clip_by_global_norm": (oc.clip_by_global_norm, "optax.clip_by_global_norm"),
    "optax.clip_by_block_rms": (optax.clip_by_block_rms, "optax.clip_by_block_rms"),
    "clip_by_block_rms": (oc.clip_by_block_rms, "optax.clip_by_block_rms"),
    "clip_by_block_norm": (oc.clip_by_block_norm, "optax.clip_by_block_rms"),
}


def variants() -> dict[str, tuple[optax.GradientTransformation, str]]:
    """``name: (tx, the optax variant it is compared with)``."""
    out = {"adamw": (adamw(), "adamw")}
    for name, (clip, ref) in CLIPS.items():
        out[name] = (optax.chain(clip(1.0), adamw()), ref)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=187)
    parser.add_argument("--only", default=None, help="comma-separated variants")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (median)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = GPTConfig(
        vocab=256, d=64, layers=args.layers, heads=4, seq=16, batch=2, rounds=1, steps=1
    )
    tokens = jnp.asarray(
        np.random.default_rng(0).integers(0, cfg.vocab, (cfg.batch, cfg.seq + 1)),
        jnp.int32,
    )
    chosen = variants()
    if args.only:
        names = set(args.only.split(","))
        names |= {chosen[k][1] for k in names}  # and what each is compared with
        chosen = {k: v for k, v in chosen.items() if k in names}
    # Untimed: the first compile in a process pays for XLA's own set-up.
    small = dataclasses.replace(cfg, layers=1)
    JaxCase(small, jnp.float32, adamw(), False, tokens, 1)
    rows, times = [], {name: [] for name in chosen}
    for _ in range(args.repeat):  # rounds, every variant once per round
        for name, (tx, _) in chosen.items():
            case = JaxCase(cfg, jnp.float32, tx, False, tokens, 1)
            times[name].append(case.trace_s + case.compile_s)
            print(f"{name}: trace {case.trace_s:.2f} s, compile {case.compile_s:.2f} s")
            del case
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    for name, (_, ref) in chosen.items():
        rows.append(
            {
                "variant": name,
                "seconds": seconds[name],
                "ratio_optax": seconds[name] / seconds[ref],
                "ratio_adamw": seconds[name] / seconds["adamw"]
                if "adamw" in seconds
                else float("nan"),
                "compared_with": ref,
            }
        )
    lines = [
        f"Compile time (trace + compile, median of {args.repeat} rounds) of the "
        "whole train step, "
        f"GPT d={cfg.d}, {cfg.layers} layers, {n_leaves(cfg)} leaves, float32, "
        f"jax {jax.__version__}, {jax.devices()[0].platform} "
        f"({platform.machine()}); `python -m benchmarks.compile_train_step "
        f"--layers {cfg.layers} --repeat {args.repeat}`:",
        "",
        "| variant | seconds | / the optax variant | / adamw |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seconds']:.2f} | {r['ratio_optax']:.2f} "
            f"({r['compared_with']}) | {r['ratio_adamw']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    main()
