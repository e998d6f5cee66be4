"""What each performance mechanism of the core buys, measured by switching it off.

Run from the repository root::

  python -m benchmarks.workarounds            # about 10 minutes on 2 cores
  python -m benchmarks.workarounds --tiny     # seconds (what the tests run)

Writes ``benchmarks/workarounds.md`` (``--out`` to change). Each row times
the same computation with a mechanism on and off, side by side in one
process (interleaved repetitions, medians of paired ratios), or compiles it
both ways. The mechanisms (see ``docs/performance.md``):

* ``xla_cpu``: every workaround of ``optax_clip/_xla_cpu.py`` (off: the plain
  forms GPUs and TPUs run): the clip alone, time and temporary memory.
* ``plain pass``: the fused ``(sum |x|**2, max |x|)`` reduction of the plain
  pass against a plain ``jnp.sum`` of squares alone (what trap immunity costs).
* ``stacks``: tiny leaves stacked (``_plan.STACK_MAX_LEAF``): compile and step.
* ``branch groups``: many mid-size leaves sharing one reduction in the
  rescaled pass (``_plan.BRANCH_GROUP_SIZE``): step time (the pass is not
  taken, but its program costs host time on every call on XLA:CPU).
* ``fusion barrier``: the per-leaf scale computed once
  (``_reduce.fusion_barrier``): compile time of the per-leaf clip.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import optax_clip as oc
from benchmarks.run import ClipAlone, median_ms, paired_ratio, time_interleaved
from optax_clip import _plan, _reduce, _xla_cpu

ROOT = Path(__file__).resolve().parents[1]


#: The clips each mechanism is measured on: the global and the per-leaf norm.
CLIPS = (
    ("clip_by_global_norm", lambda: oc.clip_by_global_norm(1.0)),
    ("clip_by_block_norm", lambda: oc.clip_by_block_norm(1.0)),
)


def tree_of(n: int, size: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (size // 128, 128) if size >= 1024 and size % 128 == 0 else (size,)
    return {f"w{i:05d}": jnp.asarray(rng.normal(size=shape), dtype) for i in range(n)}


@contextlib.contextmanager
def patched(module, **values):
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def _identity(x):
    return x


def _sums_and_maxes(leaves):
    return [_reduce.sum_and_max(x, 2.0) for x in leaves]


def _sums(leaves):
    return [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]


def _compile_s(tx, tree) -> float:
    state = jax.eval_shape(tx.init, tree)
    t0 = time.process_time()
    jax.jit(tx.update).lower(tree, state).compile()
    return time.process_time() - t0


def _temp_mb(tx, tree) -> float:
    state = jax.eval_shape(tx.init, tree)
    compiled = jax.jit(tx.update).lower(tree, state).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 1e6


def _pair(make_on, make_off, reps, warmup):
    """Times two cases built under two settings; returns (on ms, off ms, ratio)."""
    ts = time_interleaved({"on": make_on(), "off": make_off()}, reps, warmup)
    return median_ms(ts["on"]), median_ms(ts["off"]), paired_ratio(ts["off"], ts["on"])


def run(sizes: dict, reps: int, warmup: int, log) -> list[dict]:
    rows = []

    def add(**row):
        log(row)
        rows.append(row)

    # 1. The XLA:CPU workarounds, all together.
    for dtype in ("float32", "bfloat16"):
        tree = tree_of(*sizes["mid"], dtype)
        for name, make in CLIPS:

            def built(tuned, make=make, tree=tree):
                with _xla_cpu.forced(tuned):
                    case = ClipAlone(make(), tree)
                    jax.block_until_ready(case())  # traced and compiled here
                return case

            on, off, ratio = _pair(
                lambda: built(True), lambda: built(False), reps, warmup
            )
            with _xla_cpu.forced(True):
                temp_on = _temp_mb(make(), tree)
            with _xla_cpu.forced(False):
                temp_off = _temp_mb(make(), tree)
            add(
                mechanism="xla_cpu",
                case=f"{name}, {len(tree)} leaves, {dtype}",
                on=f"{on:.2f} ms, {temp_on:.1f} MB temp",
                off=f"{off:.2f} ms, {temp_off:.1f} MB temp",
                ratio=ratio,
            )

    # 2. The plain pass: sum and max together vs the sum alone.
    for dtype in ("float32", "bfloat16"):
        tree = tree_of(*sizes["mid"], dtype)
        leaves = jax.tree.leaves(tree)
        fused = functools.partial(jax.jit(_sums_and_maxes), leaves)
        plain = functools.partial(jax.jit(_sums), leaves)
        ts = time_interleaved({"fused": fused, "sum": plain}, reps, warmup)
        add(
            mechanism="plain pass",
            case=f"{len(leaves)} leaves, {dtype}",
            on=f"{median_ms(ts['fused']):.2f} ms (sum and max)",
            off=f"{median_ms(ts['sum']):.2f} ms (sum only)",
            ratio=paired_ratio(ts["sum"], ts["fused"]),
        )

    # 3. Stacks of tiny leaves: compile and step time.
    tree = tree_of(sizes["tiny"][0], sizes["tiny"][1], "float32")
    for name, make in CLIPS:
        on_s = _compile_s(make(), tree)
        with patched(_plan, STACK_MAX_LEAF=0):
            off_s = _compile_s(make(), tree)
        add(
            mechanism="stacks",
            case=f"{name}, {len(tree)} leaves of {sizes['tiny'][1]}, compile",
            on=f"{on_s:.1f} s",
            off=f"{off_s:.1f} s",
            ratio=off_s / on_s,
        )

    # 4. Branch groups: many mid-size bf16 leaves, the pass not taken.
    tree = tree_of(*sizes["many"], "bfloat16")
    for name, make in CLIPS:

        def grouped(on, make=make, tree=tree):
            size = _plan.BRANCH_GROUP_SIZE if on else 1
            with patched(_plan, BRANCH_GROUP_SIZE=size):
                case = ClipAlone(make(), tree)
                jax.block_until_ready(case())
            return case

        on, off, ratio = _pair(
            lambda: grouped(True), lambda: grouped(False), reps, warmup
        )
        add(
            mechanism="branch groups",
            case=f"{name}, {len(tree)} leaves, bfloat16, step",
            on=f"{on:.2f} ms",
            off=f"{off:.2f} ms",
            ratio=ratio,
        )

    # 5. The fusion barrier: compile time of the per-leaf clip.
    tree = tree_of(*sizes["barrier"], "float32")
    on_s = _compile_s(oc.clip_by_block_norm(1.0), tree)
    with patched(_reduce, fusion_barrier=_identity):
        off_s = _compile_s(oc.clip_by_block_norm(1.0), tree)
    add(
        mechanism="fusion barrier",
        case=f"clip_by_block_norm, {len(tree)} leaves, compile",
        on=f"{on_s:.1f} s",
        off=f"{off_s:.1f} s",
        ratio=off_s / on_s,
    )
    return rows


SIZES = {
    "full": {
        "mid": (256, 39_040),
        "tiny": (1000, 8),
        "many": (2048, 4864),
        "barrier": (300, 64),
    },
    "tiny": {"mid": (4, 1024), "tiny": (20, 8), "many": (20, 256), "barrier": (8, 64)},
}


def write(path: Path, rows: list[dict], command: str) -> None:
    lines = [
        "# What each mechanism of the core buys",
        "",
        f"`{command}` on {platform.machine()} ({jax.default_backend()}), jax "
        f"{jax.__version__}, {time.strftime('%Y-%m-%d')}. Ratio = off / on "
        "(above 1: the mechanism helps). Step times are medians of interleaved "
        "repetitions; compile times are process CPU seconds.",
        "",
        "| mechanism | case | on | off | off / on |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mechanism']} | {r['case']} | {r['on']} | {r['off']} | "
            f"{r['ratio']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "workarounds.md"
    )
    args = parser.parse_args(argv)
    sizes = SIZES["tiny" if args.tiny else "full"]
    reps = args.reps or (2 if args.tiny else 15)
    rows = run(sizes, reps, 1 if args.tiny else 3, lambda r: print(r, flush=True))
    command = "python -m benchmarks.workarounds " + " ".join(argv or [])
    write(args.out, rows, command.strip())
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
