"""Demo: gradient clipping rescues a recurrent network whose gradients explode.

Run it with::

  pip install "optax_clip[examples]"
  python -m optax_clip.demo            # 1 to 2 minutes on a 2-core CPU
  python -m optax_clip.demo --help

It trains the same small Flax NNX recurrent network (an IRNN: ReLU units and an
identity-initialised recurrent matrix, Le et al. 2015) on the adding problem
(Hochreiter & Schmidhuber 1997) with sequences of 100 steps, once per clipping
method, every time chained with the same Adam optimizer (cosine learning-rate
decay), from the same initialisation and on the same batches. Then it prints a
table and writes a PNG of the loss and the pre-clip gradient norm of every run.

The data are synthetic (made here, no download). Only ``jax``, ``optax`` and
``optax_clip`` are imported with this module; Flax, tqdm and matplotlib (the
``examples`` extra) are imported when the demo runs. ``--help`` works without
them; running without them stops at once with the command that installs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_clip

#: The clipping methods the demo compares, each chained before the same Adam.
#: Thresholds are the usual defaults, not tuned on this task. Adding a method is
#: one line: a name and a function returning an ``optax.GradientTransformation``.
METHODS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "none": optax.identity,
    "clip_by_value": lambda: optax_clip.clip_by_value(1.0),
    "clip_by_global_norm": lambda: optax_clip.clip_by_global_norm(1.0),
    "clip_by_block_norm": lambda: optax_clip.clip_by_block_norm(1.0),
    "zclip": lambda: optax_clip.zclip(),  # adaptive threshold, its defaults
}

#: What the demo needs besides optax_clip's own dependencies: the ``examples``
#: extra (``pip install "optax_clip[examples]"``).
EXTRAS = ("flax", "matplotlib", "tqdm")

#: Mean squared error of always predicting the mean target (1.0): the loss of a
#: network that has learnt nothing. The sum of two U(0, 1) has variance 1/6.
BASELINE_LOSS = 1.0 / 6.0


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one training run (the command-line flags set some of them)."""

    steps: int = 1500
    seq_len: int = 100
    seed: int = 0
    batch_size: int = 32
    hidden_size: int = 32
    learning_rate: float = 3e-3


@dataclasses.dataclass
class RunResult:
    """What one training run recorded.

    Attributes:
      method: name of the clipping method.
      seed: the run's seed.
      losses: training loss of every step.
      grad_norms: global L2 norm of every step's gradient, before clipping.
      clipped: 1.0 where the clipper rescaled the step (``None``: no clipper).
      eval_steps: the steps after which the model was evaluated.
      eval_losses: loss on held-out sequences after those steps.
      wall_time: seconds the run took, compilation included.
    """

    method: str
    seed: int
    losses: np.ndarray
    grad_norms: np.ndarray
    clipped: np.ndarray | None
    eval_steps: np.ndarray
    eval_losses: np.ndarray
    wall_time: float

    @property
    def final_loss(self) -> float:
        """Held-out loss of the final parameters."""
        return float(self.eval_losses[-1])

    @property
    def best_loss(self) -> float:
        """Lowest held-out loss of the run (NaN if none was finite)."""
        finite = self.eval_losses[np.isfinite(self.eval_losses)]
        return float(finite.min()) if finite.size else math.nan

    @property
    def nonfinite_steps(self) -> int:
        """Number of training steps whose loss was NaN or Inf."""
        return int(np.sum(~np.isfinite(self.losses)))

    @property
    def clip_fraction(self) -> float | None:
        """Fraction of the steps that the clipper rescaled (None: no clipper)."""
        return None if self.clipped is None else float(np.mean(self.clipped))

    @property
    def max_grad_norm(self) -> float:
        """Largest pre-clip gradient norm (NaN steps ignored; Inf counts)."""
        norms = self.grad_norms[~np.isnan(self.grad_norms)]
        return float(norms.max()) if norms.size else math.nan


def adding_problem(
    rng: np.random.Generator, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of the adding problem.

    Each input step holds a random value in ``[0, 1)`` and a marker; exactly two
    steps are marked, one in each half of the sequence. The target is the sum
    of the two marked values, so the network must remember a value for up to
    ``seq_len`` steps. Predicting the mean (1.0) gives a loss of 1/6.

    Args:
      rng: a NumPy random generator.
      batch_size: number of sequences.
      seq_len: number of steps per sequence (at least 2).

    Returns:
      ``(inputs, targets)``, float32 arrays of shapes
      ``(batch_size, seq_len, 2)`` and ``(batch_size,)``.

    Example:
      >>> import numpy as np
      >>> from optax_clip.demo import adding_problem
      >>> x, y = adding_problem(np.random.default_rng(0), batch_size=4, seq_len=10)
      >>> x.shape, y.shape
      ((4, 10, 2), (4,))
      >>> bool((x[..., 1].sum(axis=1) == 2).all())  # two marked steps each
      True
      >>> bool(np.allclose(y, (x[..., 0] * x[..., 1]).sum(axis=1)))
      True

    References:
      Hochreiter & Schmidhuber, `Long Short-Term Memory
      <https://doi.org/10.1162/neco.1997.9.8.1735>`_, 1997
    """
    values = rng.random((batch_size, seq_len), dtype=np.float32)
    half = seq_len // 2
    rows = np.arange(batch_size)
    markers = np.zeros((batch_size, seq_len), np.float32)
    markers[rows, rng.integers(0, half, batch_size)] = 1.0
    markers[rows, rng.integers(half, seq_len, batch_size)] = 1.0
    inputs = np.stack([values, markers], axis=-1)
    targets = np.sum(values * markers, axis=-1)
    return inputs, targets


def build_model(hidden_size: int, seed: int) -> Any:
    """The demo's network: an IRNN (Le et al., 2015) as a Flax NNX module.

    ``h_t = relu(W h_{t-1} + U x_t + b)`` with ``W`` initialised to the
    identity, and a linear read-out of the last ``h_T``. The identity keeps
    the signal alive over long sequences, and it is exactly what makes the
    gradients explode: nothing bounds ``h_t``, so a small change of ``W``
    changes ``h_T`` by a factor that grows like ``|W|^T``.
    """
    from flax import nnx  # the `examples` extra

    class IRNN(nnx.Module):
        def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
            self.encoder = nnx.Linear(2, hidden_size, rngs=rngs)
            self.recurrent = nnx.Param(jnp.eye(hidden_size))
            self.readout = nnx.Linear(hidden_size, 1, rngs=rngs)

        def __call__(self, inputs: jax.Array) -> jax.Array:
            drive = jnp.swapaxes(self.encoder(inputs), 0, 1)  # (time, batch, hidden)
            w = self.recurrent[...]

            def step(h, drive_t):
                return jax.nn.relu(h @ w + drive_t), None

            h, _ = jax.lax.scan(step, jnp.zeros_like(drive[0]), drive)
            return self.readout(h)[:, 0]

    return IRNN(hidden_size, rngs=nnx.Rngs(seed))


def train(
    method: str,
    clipper: optax.GradientTransformation,
    config: Config,
    on_progress: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Trains the IRNN with ``optax.chain(clipper, optax.adam(...))``.

    The model's initial parameters, the training batches and the held-out
    sequences depend only on ``config.seed``, so runs with different clippers
    differ only by the clipping. Steps run in chunks of a jitted
    ``jax.lax.scan``; the model is evaluated after every chunk.

    Args:
      method: name of the method (recorded in the result).
      clipper: the clipping transformation (``optax.identity()`` for none).
      config: the run's settings.
      on_progress: called after every chunk with (steps done, held-out loss).

    Returns:
      The record of the run.
    """
    from flax import nnx

    start = time.perf_counter()
    model = build_model(config.hidden_size, config.seed)
    # Adam with a cosine decay of the learning rate: the common recipe.
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps, 0.01)
    tx = optax.chain(clipper, optax.adam(schedule))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    reports_clipping = bool(optax_clip.get_stats(optimizer.opt_state))
    graphdef, state = nnx.split((model, optimizer))
    # Measures every method's pre-clip gradient norm the same, overflow-safe
    # way: a global-norm clipper with an infinite threshold only records it.
    norm_meter = optax_clip.clip_by_global_norm(math.inf)

    def loss_fn(model, inputs, targets):
        return jnp.mean((model(inputs) - targets) ** 2)

    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
        optimizer.update(model, grads)
        _, meter = norm_meter.update(nnx.as_pure(grads), norm_meter.init(None))
        clipped = jnp.zeros((), jnp.int32)
        if reports_clipping:  # 1 if any clip in the chain rescaled the step
            flags = optax_clip.get_stats(optimizer.opt_state, fields=("is_clipped",))
            clipped = jnp.max(jnp.stack(list(flags.values())))
        record = (loss, meter.clip_stats.pre_clip_norm, clipped)
        return nnx.state((model, optimizer)), record

    @jax.jit
    def train_chunk(state, batches, held_out):
        state, records = jax.lax.scan(train_step, state, batches)
        model, _ = nnx.merge(graphdef, state)
        return state, records, loss_fn(model, *held_out)

    rng = np.random.default_rng(config.seed)  # the same data for every method
    held_out = adding_problem(rng, 512, config.seq_len)
    # The largest chunk (<= 25 steps) that divides `steps`: one compilation.
    chunk = max(d for d in range(1, 26) if config.steps % d == 0)
    records, eval_losses = [], []
    for begin in range(0, config.steps, chunk):
        batches = adding_problem(rng, chunk * config.batch_size, config.seq_len)
        batches = jax.tree.map(
            lambda a: a.reshape(chunk, config.batch_size, *a.shape[1:]), batches
        )
        state, record, eval_loss = train_chunk(state, batches, held_out)
        records.append(jax.device_get(record))
        eval_losses.append(float(eval_loss))
        if on_progress is not None:
            on_progress(begin + chunk, eval_losses[-1])
    losses, norms, clipped = (np.concatenate(r) for r in zip(*records, strict=True))
    return RunResult(
        method=method,
        seed=config.seed,
        losses=losses.astype(np.float64),
        grad_norms=norms.astype(np.float64),
        clipped=clipped.astype(np.float64) if reports_clipping else None,
        eval_steps=np.arange(chunk, config.steps + 1, chunk),
        eval_losses=np.asarray(eval_losses, np.float64),
        wall_time=time.perf_counter() - start,
    )


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if spec == "loss":  # 4 decimals, or 3 significant digits for blown-up losses
        spec = ".4f" if abs(x) < 1e4 else ".3g"
    return format(x, spec)


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table with one row per run (see :func:`outcome`)."""
    header = (
        "| method | outcome | final loss | best loss | non-finite steps "
        "| clipped steps | max pre-clip norm | time [s] |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in results:
        lines.append(
            f"| {r.method} | {outcome(r)} | {_fmt(r.final_loss, 'loss')} "
            f"| {_fmt(r.best_loss, 'loss')} | {r.nonfinite_steps} "
            f"| {_fmt(r.clip_fraction, '.0%')} | {_fmt(r.max_grad_norm, '.3g')} "
            f"| {r.wall_time:.1f} |"
        )
    return "\n".join(lines)


def outcome(result: RunResult) -> str:
    """One word: ``"diverged"``, ``"trained"`` or ``"stalled"``.

    Judged on the final held-out loss, against the loss of predicting the
    mean: diverged if it is NaN, Inf or more than 10 times that; trained if it
    is less than a quarter of it; stalled otherwise.
    """
    if not result.final_loss < 10 * BASELINE_LOSS:  # also NaN
        return "diverged"
    return "trained" if result.final_loss < 0.25 * BASELINE_LOSS else "stalled"


def format_seed_table(results: Sequence[RunResult]) -> str:
    """A Markdown table of final losses: one row per method, one column per seed."""
    methods = list(dict.fromkeys(r.method for r in results))
    seeds = sorted({r.seed for r in results})
    by_key = {(r.method, r.seed): r for r in results}
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds)
    lines = [head + " | trained | diverged |", "|" + "---|" * (len(seeds) + 3)]
    for m in methods:
        runs = [by_key[m, s] for s in seeds]
        cells = " | ".join(_fmt(r.final_loss, "loss") for r in runs)
        trained = sum(outcome(r) == "trained" for r in runs)
        diverged = sum(outcome(r) == "diverged" for r in runs)
        lines.append(
            f"| {m} | {cells} | {trained}/{len(runs)} | {diverged}/{len(runs)} |"
        )
    return "\n".join(lines)


def _rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Median of the last ``window`` values at every step."""
    padded = np.concatenate([np.full(window - 1, np.nan), x])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    medians = [w[~np.isnan(w)] for w in windows]
    return np.array([np.median(w) if w.size else np.nan for w in medians])


def _same_curve(results: Sequence[RunResult]) -> dict[str, str]:
    """``{method: earlier method}`` for runs whose held-out losses coincide.

    Such curves are drawn on top of each other (zclip that never clips is
    exactly the run without clipping); the legend says so.
    """
    out: dict[str, str] = {}
    for i, r in enumerate(results):
        for earlier in results[:i]:
            a, b = r.eval_losses, earlier.eval_losses
            if a.shape == b.shape and np.allclose(a, b, rtol=1e-4, equal_nan=True):
                out[r.method] = earlier.method
                break
    return out


def _curve_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct look for each method, so that coinciding curves stay visible.

    ``"none"`` is a wide grey band under everything; every other method has
    its own colour, line style and marker, drawn narrower on top.
    """
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    colors += ["tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    dashes = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    styles, k = {}, 0
    for method in methods:
        if method == "none":
            styles[method] = {
                "color": "0.55",
                "ls": "-",
                "lw": 4.0,
                "alpha": 0.6,
                "zorder": 1,
            }
            continue
        styles[method] = {
            "color": colors[k % len(colors)],
            "ls": dashes[k % len(dashes)],
            "marker": markers[k % len(markers)],
            "lw": 1.3,
            "ms": 4,
            "zorder": 3 + k,
        }
        k += 1
    return styles


def _markevery(n_points: int, index: int, n_curves: int) -> tuple[int, int]:
    """Markers on about 8 points per curve, staggered between curves."""
    every = max(1, n_points // 8)
    return (index * max(1, every // max(n_curves, 1))) % every, every


def figure_format(path: Path) -> str:
    """The figure format ``path`` asks for: its suffix, or ``"png"`` without one.

    Raises:
      ValueError: for a suffix matplotlib cannot write.
    """
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in supported:
        raise ValueError(
            f"cannot write a figure to {str(path)!r}: its suffix "
            f"{path.suffix!r} is not a format matplotlib writes (use one of "
            f"{', '.join('.' + f for f in sorted(supported))}, or none for PNG)"
        )
    return fmt


def plot(results: Sequence[RunResult], path: Path, title: str) -> Any:
    """Writes the held-out loss and pre-clip gradient norm curves to ``path``.

    The file is written at exactly ``path``, in the format its suffix names
    (``.png``, ``.pdf``, ``.svg``, ...; PNG when it has none).

    Returns:
      The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fmt = figure_format(path)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_norm = fig.subplots(1, 2)
    top = 10.0  # losses above this (60x the mean predictor's) are drawn at it
    styles = _curve_styles([r.method for r in results])
    same = _same_curve(results)
    for i, r in enumerate(results):
        style = styles[r.method]
        label = r.method
        if r.method in same:
            label += f" (same curve as {same[r.method]})"
        shown = np.where(np.isfinite(r.eval_losses), r.eval_losses, top)
        ax_loss.plot(
            r.eval_steps,
            np.minimum(shown, top),
            label=label,
            markevery=_markevery(len(shown), i, len(results)),
            **style,
        )
        steps = np.arange(1, len(r.grad_norms) + 1)
        ax_norm.plot(steps, r.grad_norms, lw=0.4, alpha=0.25, color=style["color"])
        ax_norm.plot(
            steps,
            _rolling_median(r.grad_norms, 25),
            markevery=_markevery(len(steps), i, len(results)),
            **{**style, "lw": style["lw"] * 0.9},
        )
        bad = np.flatnonzero(~np.isfinite(r.losses))
        if bad.size:  # where the run broke down
            ax_loss.axvline(bad[0] + 1, color=style["color"], ls=":", lw=1)
    ax_loss.axhline(
        BASELINE_LOSS, color="gray", ls=":", lw=1, label="predicting the mean"
    )
    ax_loss.set(
        yscale="log",
        ylim=(None, top * 1.5),
        xlabel="step",
        ylabel=f"held-out loss (MSE; above {top:g} drawn at {top:g})",
        title="loss",
    )
    ax_norm.set(
        yscale="log",
        xlabel="step",
        ylabel="global gradient norm before clipping",
        title="gradient norm (faint: each step; line: median of 25 steps)",
    )
    ax_loss.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, size=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=110)
    return fig


def missing_extras() -> list[str]:
    """The modules of :data:`EXTRAS` (or their dependencies) that do not import."""
    missing = []
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(err.name or name)
    return missing


def _require_extras() -> None:
    """Exits with the command that installs the ``examples`` extra if needed."""
    missing = missing_extras()
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise SystemExit(
            f"python -m optax_clip.demo needs the 'examples' extra "
            f"({', '.join(EXTRAS)}): no module named {names}. Install it with\n"
            f'  pip install "optax_clip[examples]"\n'
            f"or, from a clone of the repository,\n"
            f'  pip install -e ".[examples]"'
        )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m optax_clip.demo",
        description=(
            "Trains a ReLU recurrent network (IRNN) on the adding problem with "
            "Adam, once per clipping method, and compares the runs."
        ),
        epilog=(
            "Needs the 'examples' extra (flax, matplotlib, tqdm): "
            'pip install "optax_clip[examples]", or pip install -e ".[examples]" '
            "from a clone."
        ),
    )
    defaults = Config()
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help="training steps per run (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="first seed (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="number of seeds (seed, seed+1, ...); >1 adds a per-seed table",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=defaults.seq_len,
        help="sequence length (default: %(default)s)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help=f"methods to compare (default: all of {', '.join(METHODS)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_output/optax_clip_demo.png"),
        help=(
            "where to write the figure: exactly this path, in the format its "
            "suffix names (.png, .pdf, .svg, ...; PNG when it has none) "
            "(default: %(default)s)"
        ),
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1 or args.seq_len < 2:
        parser.error("--steps and --seeds must be >= 1, --seq-len >= 2")
    _require_extras()  # after parsing: --help works without the extras
    try:
        figure_format(args.out)  # before training, not after it
    except ValueError as err:
        parser.error(f"--out: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """Runs the demo (see ``python -m optax_clip.demo --help``).

    Args:
      argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
      The results of every run, in the order they ran.
    """
    args = _parse(argv)
    from tqdm import tqdm

    seeds = range(args.seed, args.seed + args.seeds)
    total = args.steps * len(args.methods) * len(seeds)
    results: list[RunResult] = []
    with tqdm(total=total, unit="step", disable=None) as bar:
        for seed in seeds:
            config = Config(steps=args.steps, seq_len=args.seq_len, seed=seed)
            for method in args.methods:
                bar.set_description(f"seed {seed} {method}")
                done = 0

                def progress(steps_done, loss):
                    nonlocal done
                    bar.update(steps_done - done)
                    bar.set_postfix(loss=f"{loss:.3g}")
                    done = steps_done

                results.append(train(method, METHODS[method](), config, progress))
    cfg = Config(steps=args.steps, seq_len=args.seq_len)
    print(
        f"\nIRNN (hidden {cfg.hidden_size}) on the adding problem, sequence length "
        f"{cfg.seq_len}, batch {cfg.batch_size}, {cfg.steps} steps of "
        f"Adam (learning rate {cfg.learning_rate:g}, cosine decay) after each "
        f"clipper, the same initialisation and data for all. Losses are mean "
        f"squared errors on 512 held-out sequences; predicting the mean gives "
        f"{BASELINE_LOSS:.4f}. Clipped steps: the fraction of steps the clipper "
        f"rescaled (from optax_clip.get_stats); max pre-clip norm: the largest "
        f"global gradient norm; time includes compilation.\n"
    )
    for seed in seeds:
        print(f"seed {seed}:")
        print(format_table([r for r in results if r.seed == seed]), end="\n\n")
    if len(seeds) > 1:
        print(
            f"Final loss per seed (trained: below {0.25 * BASELINE_LOSS:.4f}; "
            f"diverged: NaN, Inf or above {10 * BASELINE_LOSS:.4f}):"
        )
        print(format_seed_table(results), end="\n\n")
    first = [r for r in results if r.seed == args.seed]
    plot(
        first,
        args.out,
        f"IRNN on the adding problem (T={cfg.seq_len}), clipper + Adam (lr "
        f"{cfg.learning_rate:g}, cosine decay), seed {args.seed}",
    )
    print(f"Wrote {args.out.resolve()} ({figure_format(args.out).upper()})")
    return results


if __name__ == "__main__":
    main()
