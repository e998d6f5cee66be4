"""Training outcomes on real text: a byte-level GPT, every clip, one page.

Run from the repository root (needs the ``test`` or ``examples`` extra: flax,
orbax-checkpoint and matplotlib)::

  python -m benchmarks.outcomes            # the full run, writes docs/outcomes.md
  python -m benchmarks.outcomes --tiny --out /tmp/o.md   # seconds (the test)

What it does (every setting is printed on the page it writes):

* **Data.** The source files of the Python standard library of the running
  interpreter (``sysconfig.get_paths()["stdlib"]``), read as bytes; nothing is
  fetched. Part ``lib``: every ``.py`` file outside the test suites; part
  ``test``: the ``.py`` files of the test suites (any path with a ``test``,
  ``tests`` or ``idle_test`` directory). ``site-packages`` is left out. A file
  is held out when the first 8 hex digits of the SHA-256 of its relative path,
  as an integer, are 0 mod 10 (about one file in ten), so the split depends on
  the path only. Each part's files are concatenated in sorted order.
* **Model.** :class:`benchmarks.train_step.GPT` with a vocabulary of the 256
  byte values (embeddings, pre-LayerNorm blocks of causal attention and a GELU
  MLP, a final LayerNorm, an untied head), float32.
* **Pre-training** on ``lib``: AdamW (weight decay 0.1), linear warm-up then
  cosine decay to 10% of the peak; batches of random windows, the same
  sequence of batches for every method at a given seed. A learning-rate sweep
  without clipping first, then every method of :data:`METHODS` at the peak
  learning rates of the preset and each seed. Reported: held-out bits per
  byte, loss spikes (:func:`count_spikes`), non-finite steps, the clipped or
  skipped fraction (from :func:`optax_clip.get_stats`), seconds per run and
  compile time.
* **Fine-tuning.** The no-clip model pre-trained at the first learning rate
  (seed 0) is saved with orbax, restored, and fine-tuned on ``test`` with AdamW,
  warm-up and the token and position embeddings frozen
  (``optax.multi_transform``), for each method of the preset's ``ft_methods``.
  Reported: held-out bits per byte on ``test`` (learned) and on ``lib``
  (forgotten).

Each method's train step is compiled once: the seed, the step number and the
peak learning rate are inputs of the step (the learning rate multiplies the
update of an AdamW with learning rate 1, which is AdamW's update with that
rate, decoupled weight decay included).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_clip as oc

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "outcomes.md"
SPIKE_FACTOR = 1.5  # a step is a spike when its loss > SPIKE_FACTOR x ...
SPIKE_WINDOW = 25  # ... the median loss of the SPIKE_WINDOW steps before it
HELD_OUT_MOD = 10  # one file in HELD_OUT_MOD is held out
TEST_DIRS = frozenset({"test", "tests", "idle_test"})


# --------------------------------------------------------------------------
# Settings.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Model, data and schedule of one mode."""

    d: int  # model width
    layers: int
    heads: int
    seq: int  # bytes per sequence
    batch: int
    steps: int  # pre-training steps per run
    warmup: int  # warm-up steps (pre-training)
    lrs: tuple[float, ...]  # peak learning rates of the comparison
    sweep_lrs: tuple[float, ...]  # peak learning rates of the no-clip sweep
    seeds: int
    methods: tuple[str, ...]  # names in METHODS
    probe_steps: int  # steps of the run suggest_max_norm reads
    eval_windows: int  # held-out windows of `seq` bytes
    ft_steps: int
    ft_warmup: int
    ft_lrs: tuple[float, ...]  # peak learning rates of the fine-tuning
    ft_methods: tuple[str, ...]
    weight_decay: float = 0.1
    final_lr_frac: float = 0.1  # cosine decays to this fraction of the peak


# --------------------------------------------------------------------------
# The methods: one line each. ``make(opt, ctx)`` returns the optimizer given
# AdamW with learning rate 1 (``opt``, optax_clip.adamw for the guard's fast
# path) and ``ctx`` (the threshold suggest_max_norm picked).
# --------------------------------------------------------------------------


class Method(NamedTuple):
    make: Callable[[Callable[[], Any], dict], Any]
    label: str  # how the page writes it
    pass_loss: bool = False


def _chain(clip):
    return lambda opt, ctx: optax.chain(clip(ctx), opt())


METHODS: dict[str, Method] = {
    "none": Method(lambda opt, ctx: opt(), "AdamW alone"),
    "clip_by_value": Method(
        _chain(lambda c: oc.clip_by_value(0.01)), "clip_by_value(0.01)"
    ),
    "clip_by_global_norm": Method(
        _chain(lambda c: oc.clip_by_global_norm(1.0)), "clip_by_global_norm(1.0)"
    ),
    "clip_by_global_norm[suggested]": Method(
        _chain(
            lambda c: optax.inject_hyperparams(oc.clip_by_global_norm)(
                max_norm=c["suggested"]
            )
        ),
        "clip_by_global_norm(suggest_max_norm of the probe)",
    ),
    "clip_by_block_norm": Method(
        _chain(lambda c: oc.clip_by_block_norm(0.25)), "clip_by_block_norm(0.25)"
    ),
    "clip_by_block_rms": Method(
        _chain(lambda c: oc.clip_by_block_rms(0.01)), "clip_by_block_rms(0.01)"
    ),
    "soft_clip_by_global_norm": Method(
        _chain(lambda c: oc.soft_clip_by_global_norm(1.0)),
        "soft_clip_by_global_norm(1.0)",
    ),
    "autoclip": Method(_chain(lambda c: oc.autoclip(10.0)), "autoclip(10.0)"),
    "zclip": Method(_chain(lambda c: oc.zclip()), "zclip() (defaults)"),
    "adagc": Method(_chain(lambda c: oc.adagc()), "adagc() (defaults)"),
    "adaptive_grad_clip": Method(
        _chain(lambda c: oc.adaptive_grad_clip(0.01)), "adaptive_grad_clip(0.01)"
    ),
    "clip_by_spectral_norm": Method(
        _chain(lambda c: oc.clip_by_spectral_norm(1.0)), "clip_by_spectral_norm(1.0)"
    ),
    "adaclip": Method(_chain(lambda c: oc.adaclip()), "adaclip() (defaults)"),
    "spam_clip": Method(
        lambda opt, ctx: oc.spam_clip(opt()), "spam_clip(AdamW) (defaults)"
    ),
    "stable_adamw": Method(
        lambda opt, ctx: oc.stable_adamw(1.0, weight_decay=ctx["wd"]),
        "stable_adamw (max_rms=1.0)",
    ),
    # The step scales AdamW-at-rate-1's update by the schedule, so this clip sees
    # the update before the learning rate: its history is free of the schedule.
    "clip_update_by_history": Method(
        lambda opt, ctx: optax.chain(opt(), oc.clip_update_by_history()),
        "chain(AdamW, clip_update_by_history()) (defaults)",
    ),
    "skip_on_spike": Method(
        lambda opt, ctx: oc.skip_on_spike(
            optax.chain(
                oc.clip_by_global_norm(1.0), oc.adamw(1.0, weight_decay=ctx["wd"])
            )
        ),
        "skip_on_spike(chain(clip_by_global_norm(1.0), optax_clip.adamw))",
        pass_loss=True,
    ),
}

PRESETS = {
    "full": Config(
        d=64,
        layers=4,
        heads=4,
        seq=64,
        batch=16,
        steps=300,
        warmup=30,
        lrs=(1e-2, 1.0),
        sweep_lrs=(1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0),
        seeds=3,
        methods=tuple(METHODS),
        probe_steps=100,
        eval_windows=256,
        ft_steps=150,
        ft_warmup=15,
        ft_lrs=(0.03, 0.3),
        ft_methods=(
            "none",
            "clip_by_global_norm",
            "clip_by_global_norm[suggested]",
            "zclip",
            "skip_on_spike",
        ),
    ),
    "tiny": Config(
        d=16,
        layers=1,
        heads=2,
        seq=16,
        batch=8,
        steps=30,
        warmup=3,
        lrs=(1e-2,),
        sweep_lrs=(1e-2,),
        seeds=1,
        methods=("none", "clip_by_global_norm"),
        probe_steps=10,
        eval_windows=16,
        ft_steps=6,
        ft_warmup=2,
        ft_lrs=(1e-2,),
        ft_methods=("none", "clip_by_global_norm"),
    ),
}


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(rel: str) -> bool:
    """Whether the file at relative path ``rel`` is held out (path only)."""
    digest = hashlib.sha256(rel.encode()).hexdigest()
    return int(digest[:8], 16) % HELD_OUT_MOD == 0


def part_of(rel: Path) -> str | None:
    """``"lib"``, ``"test"`` or None (not a ``.py`` file, or site-packages)."""
    if rel.suffix != ".py" or rel.parts[0] in ("site-packages", "dist-packages"):
        return None
    if "__pycache__" in rel.parts:
        return None
    return "test" if TEST_DIRS.intersection(rel.parts[:-1]) else "lib"


def split_files(root: Path | None = None) -> dict[tuple[str, str], list[str]]:
    """``(part, "train" | "held")``: sorted relative paths."""
    root = root or stdlib_root()
    out: dict[tuple[str, str], list[str]] = {
        (p, s): [] for p in ("lib", "test") for s in ("train", "held")
    }
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        part = part_of(rel)
        if part is None or not path.is_file():
            continue
        key = rel.as_posix()
        out[(part, "held" if is_held_out(key) else "train")].append(key)
    return {k: sorted(v) for k, v in out.items()}


def load_bytes(paths: list[str], root: Path | None = None) -> np.ndarray:
    root = root or stdlib_root()
    return np.frombuffer(b"".join((root / p).read_bytes() for p in paths), np.uint8)


# --------------------------------------------------------------------------
# Spikes.
# --------------------------------------------------------------------------


def count_spikes(losses, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW):
    """Steps whose loss exceeds ``factor`` x the median of the ``window``
    finite losses before it (steps with fewer before them are not tested;
    non-finite losses are counted apart, as non-finite steps)."""
    losses = np.asarray(losses, np.float64)
    count = 0
    for t in range(window, len(losses)):
        past = losses[t - window : t]
        past = past[np.isfinite(past)]
        if (
            len(past)
            and np.isfinite(losses[t])
            and losses[t] > factor * np.median(past)
        ):
            count += 1
    return count


# --------------------------------------------------------------------------
# Model and steps.
# --------------------------------------------------------------------------


def gpt_config(cfg: Config):
    from benchmarks.train_step import GPTConfig

    return GPTConfig(
        vocab=256, d=cfg.d, layers=cfg.layers, heads=cfg.heads, seq=cfg.seq,
        batch=cfg.batch, rounds=0, steps=0,
    )  # fmt: skip


def init_model(cfg: Config, seed: int):
    """``graphdef, params`` of a fresh model (weights from ``seed``)."""
    from flax import nnx

    from benchmarks.train_step import GPT

    model = GPT(gpt_config(cfg), jnp.float32, nnx.Rngs(seed))
    return nnx.split(model)


def schedule(t, steps: int, warmup: int, final_frac: float):
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to ``final_frac``."""
    t = jnp.asarray(t, jnp.float32)
    warm = (t + 1) / warmup
    prog = jnp.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)
    cos = final_frac + (1 - final_frac) * 0.5 * (1 + jnp.cos(jnp.pi * prog))
    return jnp.where(t < warmup, warm, cos)


def _loss(graphdef, params, tokens):
    from flax import nnx

    from benchmarks.train_step import loss_fn

    return loss_fn(nnx.merge(graphdef, params), tokens)


def make_step(graphdef, tx, pass_loss: bool, cfg: Config, steps: int, warmup: int):
    """``params, state, loss, grad_norm = step(params, state, data, seed, t,
    peak_lr)``; params and state donated. The batch is ``cfg.batch`` windows
    of ``data`` drawn from ``fold_in(key(seed), t)``."""
    offsets = jnp.arange(cfg.seq + 1)

    def step(params, state, data, seed, t, peak_lr):
        key = jax.random.fold_in(jax.random.key(seed), t)
        starts = jax.random.randint(key, (cfg.batch,), 0, data.shape[0] - cfg.seq - 1)
        tokens = data[starts[:, None] + offsets].astype(jnp.int32)
        loss, grads = jax.value_and_grad(lambda p: _loss(graphdef, p, tokens))(params)
        grad_norm = optax.tree.norm(grads)
        extra = {"loss": loss} if pass_loss else {}
        updates, state = tx.update(grads, state, params, **extra)
        lr = peak_lr * schedule(t, steps, warmup, cfg.final_lr_frac)
        updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
        return optax.apply_updates(params, updates), state, loss, grad_norm

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval(graphdef, cfg: Config):
    """``bits_per_byte(params, data_windows)``: mean held-out loss / ln 2."""

    @jax.jit
    def evaluate(params, windows):
        return _loss(graphdef, params, windows) / math.log(2.0)

    return evaluate


def eval_windows(data: np.ndarray, cfg: Config) -> jax.Array:
    """``cfg.eval_windows`` evenly spaced windows of ``seq + 1`` bytes."""
    starts = np.linspace(0, len(data) - cfg.seq - 2, cfg.eval_windows).astype(np.int64)
    return jnp.asarray(data[starts[:, None] + np.arange(cfg.seq + 1)], jnp.int32)


def clip_fractions(state) -> tuple[float | None, float | None]:
    """(clipped fraction, skipped fraction) from get_stats (None: not recorded)."""
    stats = oc.get_stats(state)
    clipped = [float(v) for k, v in stats.items() if k.endswith("/clip_fraction")]
    skipped = [float(v) for k, v in stats.items() if k.endswith("/skip_fraction")]
    return (clipped[0] if clipped else None), (skipped[0] if skipped else None)


class Trainer:
    """One method's compiled step (compiled once, reused for every run)."""

    def __init__(self, name, tx, pass_loss, graphdef, params, cfg, steps, warmup, data):
        self.name, self.tx, self.cfg, self.steps = name, tx, cfg, steps
        fn = make_step(graphdef, tx, pass_loss, cfg, steps, warmup)
        state = tx.init(params)
        t0 = time.perf_counter()
        self.fn = fn.lower(
            params, state, data, jnp.int32(0), jnp.int32(0), jnp.float32(0)
        ).compile()
        self.compile_s = time.perf_counter() - t0

    def run(self, params, data, seed: int, peak_lr: float, state=None):
        """Trains ``params`` (copied) for ``steps``; returns params, state and
        the per-step losses and gradient norms (NumPy)."""
        params = jax.tree.map(jnp.copy, params)
        state = jax.tree.map(jnp.copy, self.tx.init(params) if state is None else state)
        losses, norms = [], []
        t0 = time.perf_counter()
        for t in range(self.steps):
            params, state, loss, norm = self.fn(
                params, state, data, jnp.int32(seed), jnp.int32(t), jnp.float32(peak_lr)
            )
            losses.append(loss)
            norms.append(norm)
        losses = np.asarray(jax.device_get(losses), np.float64)
        norms = np.asarray(jax.device_get(norms), np.float64)
        return params, state, losses, norms, time.perf_counter() - t0


def summarize(name, lr, seed, losses, norms, bpb, state, seconds, extra=None):
    clipped, skipped = clip_fractions(state)
    return {
        "method": name,
        "lr": lr,
        "seed": seed,
        "bpb": float(bpb),
        "spikes": count_spikes(losses),
        "nonfinite": int(np.sum(~np.isfinite(losses) | ~np.isfinite(norms))),
        "clipped": clipped,
        "skipped": skipped,
        "seconds": seconds,
        "final_train_loss": float(losses[-1]),
        **(extra or {}),
    }


# --------------------------------------------------------------------------
# The experiment.
# --------------------------------------------------------------------------


def run(cfg: Config, log=print, methods: tuple[str, ...] | None = None) -> dict:
    methods = methods or cfg.methods
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; use {list(METHODS)}")
    t_start = time.perf_counter()
    files = split_files()
    data = {k: load_bytes(v) for k, v in files.items()}
    data_info = {
        f"{p}/{s}": {"files": len(files[(p, s)]), "bytes": int(data[(p, s)].size)}
        for (p, s) in files
    }
    log(f"[data] {data_info}")
    train_a = jnp.asarray(data[("lib", "train")])
    train_b = jnp.asarray(data[("test", "train")])
    held_a = eval_windows(data[("lib", "held")], cfg)
    held_b = eval_windows(data[("test", "held")], cfg)

    graphdef, params0 = init_model(cfg, 0)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    n_leaves = len(jax.tree.leaves(params0))
    evaluate = make_eval(graphdef, cfg)
    inits = {s: init_model(cfg, s)[1] for s in range(cfg.seeds)}
    ctx = {"suggested": 1.0, "wd": cfg.weight_decay}

    def unit_adamw():
        return optax.adamw(1.0, weight_decay=cfg.weight_decay)

    trainers: dict[str, Trainer] = {}

    def trainer(name: str) -> Trainer:
        if name not in trainers:
            m = METHODS[name]
            tx = m.make(unit_adamw, ctx)
            trainers[name] = Trainer(
                name, tx, m.pass_loss, graphdef, params0, cfg, cfg.steps, cfg.warmup,
                train_a,
            )  # fmt: skip
            log(f"[compile] {name}: {trainers[name].compile_s:.1f} s")
        return trainers[name]

    # 1. The sweep, without clipping (seed 0).
    sweep = []
    curves: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}
    for lr in cfg.sweep_lrs:
        _, state, losses, norms, sec = trainer("none").run(inits[0], train_a, 0, lr)
        p_final = _
        row = summarize(
            "none", lr, 0, losses, norms, evaluate(p_final, held_a), state, sec
        )
        row["max_loss"] = float(
            np.nanmax(np.where(np.isfinite(losses), losses, np.nan))
        )
        sweep.append(row)
        log(f"[sweep] {row}")

    # 2. Every method at each learning rate and seed.
    rows, suggestions, pretrained = [], {}, None
    for lr in cfg.lrs:
        runs_none = {}
        for name in ["none", *[m for m in methods if m != "none"]]:
            if name == "clip_by_global_norm[suggested]":
                probe = runs_none[0][1][: cfg.probe_steps]
                s = oc.suggest_max_norm(probe)
                suggestions[lr] = {"max_norm": s.max_norm, "explanation": s.explanation}
                ctx["suggested"] = s.max_norm
                log(f"[suggest] lr {lr:g}: {s.explanation}")
            tr = trainer(name)
            for seed in range(cfg.seeds):
                state0 = None
                if name == "clip_by_global_norm[suggested]":
                    state0 = tr.tx.init(inits[seed])
                    state0[0].hyperparams["max_norm"] = jnp.asarray(
                        ctx["suggested"], state0[0].hyperparams["max_norm"].dtype
                    )
                params, state, losses, norms, sec = tr.run(
                    inits[seed], train_a, seed, lr, state=state0
                )
                bpb = evaluate(params, held_a)
                row = summarize(name, lr, seed, losses, norms, bpb, state, sec)
                rows.append(row)
                log(f"[train] {row}")
                if seed == 0:
                    curves[(name, lr)] = (losses, norms)
                if name == "none":
                    runs_none[seed] = (losses, norms)
                    if lr == cfg.lrs[0] and seed == 0:
                        pretrained = params

    # 3. Fine-tuning: save, restore, fine-tune with the embeddings frozen.
    finetune = finetune_runs(
        cfg, pretrained, graphdef, params0, train_b, held_a, held_b, evaluate, ctx, log
    )
    return {
        "config": dataclasses.asdict(cfg),
        "methods": {m: METHODS[m].label for m in methods},
        "data": data_info,
        "model": {"params": int(n_params), "leaves": n_leaves},
        "sweep": sweep,
        "rows": rows,
        "suggestions": {str(k): v for k, v in suggestions.items()},
        "finetune": finetune,
        "compile_s": {k: t.compile_s for k, t in trainers.items()},
        "curves": {
            f"{k[0]}@{k[1]:g}": [v[0].tolist(), v[1].tolist()]
            for k, v in curves.items()
        },
        "total_s": time.perf_counter() - t_start,
        "machine": machine(),
    }


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def frozen_labels(params):
    """``"frozen"`` for the token and position embeddings, else ``"train"``."""

    def label(path, _):
        names = [_key(p) for p in path]
        return "frozen" if names and names[0] in ("tok", "pos") else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def save_restore(params, directory: Path):
    """Saves ``params`` with orbax and restores them (checked equal)."""
    import orbax.checkpoint as ocp

    path = (directory / "pretrained").absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params)
        ckpt.wait_until_finished()
        restored = ckpt.restore(path, params)
    same = jax.tree.all(
        jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, restored)
    )
    if not same:
        raise RuntimeError("orbax restored different parameters")
    return restored


def finetune_runs(
    cfg, pretrained, graphdef, params0, train_b, held_a, held_b, evaluate, ctx, log
):  # noqa: E501
    tmp = Path(tempfile.mkdtemp(prefix="outcomes_ckpt_"))
    try:
        base = save_restore(pretrained, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    labels = frozen_labels(base)
    out = {
        "base": {
            "lib_bpb": float(evaluate(base, held_a)),
            "test_bpb": float(evaluate(base, held_b)),
        },
        "frozen": sorted(
            {
                _key(p[0])
                for p, v in jax.tree_util.tree_leaves_with_path(labels)
                if v == "frozen"
            }
        ),
        "rows": [],
    }
    log(f"[finetune] base {out['base']}")

    def unit_adamw():
        return optax.adamw(1.0, weight_decay=cfg.weight_decay)

    # The suggested threshold: from the first third of the no-clip run (seed 0)
    # at the same learning rate.
    out["suggested"] = {}
    for name in cfg.ft_methods:
        m = METHODS[name]
        tx = optax.multi_transform(
            {"train": m.make(unit_adamw, ctx), "frozen": optax.set_to_zero()}, labels
        )
        tr = Trainer(
            name, tx, m.pass_loss, graphdef, base, cfg, cfg.ft_steps, cfg.ft_warmup,
            train_b,
        )  # fmt: skip
        log(f"[compile] finetune {name}: {tr.compile_s:.1f} s")
        for lr in cfg.ft_lrs:
            state0 = None
            if name == "clip_by_global_norm[suggested]":
                (none,) = [
                    r
                    for r in out["rows"]
                    if r["method"] == "none" and r["lr"] == lr and "norms" in r
                ]
                s = oc.suggest_max_norm(none["norms"][: max(cfg.ft_steps // 3, 2)])
                out["suggested"][str(lr)] = {
                    "max_norm": s.max_norm,
                    "explanation": s.explanation,
                }
                state0 = tx.init(base)
                inner = state0.inner_states["train"].inner_state[0]
                inner.hyperparams["max_norm"] = jnp.asarray(s.max_norm, jnp.float32)
            for seed in range(cfg.seeds):
                params, state, losses, norms, sec = tr.run(
                    base, train_b, 100 + seed, lr, state=state0
                )
                row = summarize(
                    name, lr, seed, losses, norms, evaluate(params, held_b), state,
                    sec, {"lib_bpb": float(evaluate(params, held_a))},
                )  # fmt: skip
                row["test_bpb"] = row.pop("bpb")
                row["compile_s"] = tr.compile_s
                out["rows"].append(row)
                log(f"[finetune] {row}")
                if seed == 0:
                    row["losses"], row["norms"] = losses.tolist(), norms.tolist()
    return out


def machine() -> dict:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cpus = os.cpu_count() or 1
    import flax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "cpus": str(cpus),
        "platform": platform.platform(),
        "device": str(jax.devices()[0].device_kind),
    }


# --------------------------------------------------------------------------
# The page.
# --------------------------------------------------------------------------

TABLE_COLUMNS = [
    "method",
    "held-out bits/byte",
    "vs none",
    "spikes",
    "non-finite steps",
    "clipped",
    "skipped",
    "s / run",
    "compile s",
]
FT_COLUMNS = [
    "method",
    "test bits/byte (learned)",
    "lib bits/byte (forgotten)",
    "spikes",
    "non-finite steps",
    "clipped",
    "s / run",
]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _pct(xs) -> str:
    xs = [x for x in xs if x is not None]
    return "n/a" if not xs else f"{100 * float(np.mean(xs)):.1f}%"


def _mean_sd(xs) -> tuple[float, float, int]:
    """Mean and sample standard deviation of the finite values, and how many
    were not finite (diverged)."""
    xs = np.asarray(xs, np.float64)
    ok = xs[np.isfinite(xs)]
    if not len(ok):
        return math.nan, math.nan, len(xs)
    return (
        float(ok.mean()),
        float(ok.std(ddof=1)) if len(ok) > 1 else 0.0,
        len(xs) - len(ok),
    )


def _fmt_bpb(xs) -> str:
    mean, sd, bad = _mean_sd(xs)
    if math.isnan(mean):
        text = "diverged"
    else:
        text = f"{mean:.3f} ± {sd:.3f}" if len(xs) > 1 else f"{mean:.3f}"
    return text + (
        f" ({bad} of {len(xs)} diverged)" if bad and not math.isnan(mean) else ""
    )


def verdict(method_bpb, none_bpb) -> str:
    """``"better"`` / ``"worse"`` when the difference of the means exceeds the
    larger of the two seed standard deviations (and 0.005 bits), else
    ``"same"``."""
    m, sm, _ = _mean_sd(method_bpb)
    n, sn, _ = _mean_sd(none_bpb)
    if math.isnan(m) or math.isnan(n):
        return "diverged" if math.isnan(m) and not math.isnan(n) else "n/a"
    margin = max(sm, sn, 0.005)
    return "better" if m < n - margin else "worse" if m > n + margin else "same"


def method_table(results: dict, lr: float) -> tuple[list[str], dict[str, str]]:
    rows = [r for r in results["rows"] if r["lr"] == lr]
    names = list(dict.fromkeys(r["method"] for r in rows))
    by = {n: [r for r in rows if r["method"] == n] for n in names}
    none_bpb = [r["bpb"] for r in by.get("none", [])]
    table, verdicts = [], {}
    for n in names:
        rs = by[n]
        bpb = [r["bpb"] for r in rs]
        verdicts[n] = verdict(bpb, none_bpb) if n != "none" else "-"
        delta = _mean_sd(bpb)[0] - _mean_sd(none_bpb)[0] if none_bpb else math.nan
        table.append(
            [
                f"`{n}`",
                _fmt_bpb(bpb),
                "-" if n == "none" else f"{delta:+.3f} ({verdicts[n]})",
                str(sum(r["spikes"] for r in rs)),
                str(sum(r["nonfinite"] for r in rs)),
                _pct(r["clipped"] for r in rs),
                _pct(r["skipped"] for r in rs),
                f"{np.mean([r['seconds'] for r in rs]):.1f}",
                f"{results['compile_s'].get(n, math.nan):.1f}",
            ]
        )
    return _table(TABLE_COLUMNS, table), verdicts


def figure(results: dict, path: Path) -> None:
    """Loss and pre-clip gradient norm of seed 0, per learning rate and method,
    and the fine-tuning runs."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state

    lrs = results["config"]["lrs"]
    ft_lrs = results["config"]["ft_lrs"]
    ft = results["finetune"]["rows"]
    nrows = len(lrs) + len(ft_lrs)
    fig = Figure(figsize=(13, 3.6 * nrows), layout="tight")
    axes = fig.subplots(nrows, 2, squeeze=False)
    cmap = matplotlib.colormaps["tab20"]
    names = list(results["methods"])
    styles = ["-", "--", "-.", ":"]

    def draw(ax_l, ax_n, curves, title):
        for i, (name, (losses, norms)) in enumerate(curves):
            kw = {"color": cmap(i % 20), "ls": styles[i % 4], "lw": 1.1, "label": name}
            ax_l.plot(np.arange(len(losses)), losses, **kw)
            ax_n.plot(np.arange(len(norms)), norms, **kw)
        ax_l.set_yscale("log")
        ax_n.set_yscale("log")
        ax_l.set_title(f"{title}: training loss (nats/byte), seed 0")
        ax_n.set_title(f"{title}: gradient norm before the clip, seed 0")
        for ax in (ax_l, ax_n):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)

    for row, lr in enumerate(lrs):
        curves = [
            (n, results["curves"][f"{n}@{lr:g}"])
            for n in names
            if f"{n}@{lr:g}" in results["curves"]
        ]
        draw(axes[row, 0], axes[row, 1], curves, f"pre-training, peak lr {lr:g}")
    for row, lr in enumerate(ft_lrs, start=len(lrs)):
        curves = [
            (r["method"], (r["losses"], r["norms"]))
            for r in ft
            if r["lr"] == lr and "losses" in r
        ]
        draw(axes[row, 0], axes[row, 1], curves, f"fine-tuning, peak lr {lr:g}")
        axes[row, 1].legend(fontsize=7, loc="upper right")
    axes[0, 1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.savefig(path, dpi=72)


def _notes(results: dict, lr: float, summary_lines: list[str]) -> list[str]:
    """Sentences computed from the rows at ``lr``: guards that never skipped,
    and the best method against AdamW alone at the first learning rate."""
    rows = [r for r in results["rows"] if r["lr"] == lr]
    names = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for n in names:
        skipped = [r["skipped"] for r in rows if r["method"] == n]
        if skipped and all(x == 0.0 for x in skipped):
            out.append(
                f"`{n}` skipped no step at this learning rate: its numbers are those "
                "of the chain inside it."
            )
    means = {
        n: _mean_sd([r["bpb"] for r in rows if r["method"] == n])[0] for n in names
    }
    finite = {n: m for n, m in means.items() if not math.isnan(m)}
    lr0 = results["config"]["lrs"][0]
    base = _mean_sd(
        [r["bpb"] for r in results["rows"] if r["lr"] == lr0 and r["method"] == "none"]
    )[0]
    if finite and lr != lr0 and not math.isnan(base):
        best = min(finite, key=finite.get)
        line = (
            f"Best at peak lr {lr:g}: `{best}`, {finite[best]:.3f} bits per byte; "
            f"AdamW alone at peak lr {lr0:g} reached {base:.3f}."
        )
        out.append(line)
        summary_lines.append(f"- {line}")
    return [x for line in out for x in (line, "")]


def write_page(
    results: dict, out: Path, command: str, rewrite: str | None = None
) -> None:
    """Writes the page ``out`` and its figure (``out`` with ``.png``);
    ``rewrite``: the command that rewrote it from saved results, if one did."""
    cfg = results["config"]
    fig_path = out.with_suffix(".png")
    figure(results, fig_path)
    d = results["data"]
    lines = [
        "# Training outcomes on real text",
        "",
        "What each clipping method does to a real training run: a small byte-level GPT "
        "trained on the Python standard library's own source, every method on the same "
        "batches and seeds, then a fine-tuning run on shifted data. Every number on "
        "this "
        "page was written by the command below (`benchmarks/outcomes.py`; the module's "
        "docstring describes each step).",
        "",
        "```text",
        command,
        "```",
        "",
        *(
            [
                "The page and figure were then rewritten from the saved results, "
                f"without training, by `{rewrite}`.",
                "",
            ]
            if rewrite
            else []
        ),
        f"Run on {results['machine']['platform']}, {results['machine']['cpus']} CPUs "
        "(shared with other jobs while it ran), Python "
        f"{results['machine']['python']}, "
        f"jax {results['machine']['jax']}, optax {results['machine']['optax']}, flax "
        f"{results['machine']['flax']}; the whole command took "
        f"{results['total_s'] / 60:.1f} minutes.",
        "",
        "## Settings",
        "",
        "**Data**: the `.py` files of this interpreter's standard library "
        "(`sysconfig.get_paths()['stdlib']`, site-packages left out), read as bytes, "
        "nothing downloaded. Part `lib` is every file outside the test suites, part "
        "`test` "
        "the files under a `test`, `tests` or `idle_test` directory (the shifted part "
        "used "
        "for fine-tuning). A file is held out when the first 8 hex digits of the "
        "SHA-256 "
        f"of its relative path are 0 mod {HELD_OUT_MOD}. Held-out loss: "
        f"{cfg['eval_windows']} evenly spaced windows of {cfg['seq'] + 1} bytes of the "
        "held-out files.",
        "",
        *_table(
            ["part", "train files", "train bytes", "held-out files", "held-out bytes"],
            [
                [
                    f"`{p}`",
                    str(d[f"{p}/train"]["files"]),
                    f"{d[f'{p}/train']['bytes']:,}",
                    str(d[f"{p}/held"]["files"]),
                    f"{d[f'{p}/held']['bytes']:,}",
                ]
                for p in ("lib", "test")
            ],
        ),
        "",
        f"**Model**: `benchmarks.train_step.GPT` over the 256 byte values, width "
        f"{cfg['d']}, {cfg['layers']} blocks, {cfg['heads']} heads, {cfg['seq']} bytes "
        f"of context; {results['model']['params']:,} parameters in "
        f"{results['model']['leaves']} arrays, float32.",
        "",
        f"**Pre-training**: {cfg['steps']} steps of {cfg['batch']} random windows of "
        f"part `lib` (the same batches for every method at a given seed), AdamW "
        f"(b1 0.9, b2 0.999, weight decay {cfg['weight_decay']}), linear warm-up over "
        f"{cfg['warmup']} steps then cosine decay to {cfg['final_lr_frac']:g} x the "
        "peak; "
        f"{cfg['seeds']} seed(s) (initial weights and batches) per method and learning "
        "rate. Each method's step is compiled once for all seeds and learning rates.",
        "",
        f"**Spikes**: a step is a spike when its loss is more than {SPIKE_FACTOR:g} x "
        "the "
        f"median loss of the {SPIKE_WINDOW} steps before it (`count_spikes`); the "
        "tables "
        "give the total over the seeds. Non-finite steps (a NaN or Inf loss or "
        "gradient) "
        "are counted apart. Clipped and skipped: the fraction of steps the method "
        "rescaled or skipped, from `optax_clip.get_stats` at the end of each run "
        "(`clip_fraction`, `skip_fraction`), mean over the seeds; a step counts as "
        "clipped when any part of it was rescaled, so per-element, per-unit and "
        "per-leaf methods reach 100% while touching little. **vs none**: the "
        "difference of the mean held-out bits per byte to AdamW alone; *better* or "
        "*worse* when it exceeds the larger of the two seed standard deviations "
        "(and 0.005), else *same*.",
        "",
        "**Methods** (thresholds as the library's defaults or papers suggest where "
        "they "
        "have one, otherwise picked once from the gradient sizes at initialisation, "
        "not "
        "tuned on the results):",
        "",
        *[f"- `{k}`: `{v}`" for k, v in results["methods"].items()],
        "",
        "## Learning-rate sweep without clipping",
        "",
        "AdamW alone, seed 0, the schedule above at each peak learning rate.",
        "",
        *_table(
            [
                "peak lr",
                "held-out bits/byte",
                "spikes",
                "non-finite steps",
                "largest loss",
            ],
            [
                [
                    f"{r['lr']:g}",
                    f"{r['bpb']:.3f}",
                    str(r["spikes"]),
                    str(r["nonfinite"]),
                    f"{r['max_loss']:.2f}",
                ]
                for r in results["sweep"]
            ],
        ),
        "",
    ]
    summary_lines = []
    for lr in cfg["lrs"]:
        table, verdicts = method_table(results, lr)
        sug = results["suggestions"].get(str(lr))
        lines += [f"## Every method at peak learning rate {lr:g}", ""]
        if sug:
            lines += [
                f"`suggest_max_norm` on the first {cfg['probe_steps']} steps of "
                f"the no-clip run (seed 0): {sug['explanation']}",
                "",
            ]
        lines += [*table, ""]
        groups = {
            v: [k for k, x in verdicts.items() if x == v]
            for v in set(verdicts.values())
        }
        for v, label in (
            (
                "better",
                "Helped (lower held-out loss than AdamW alone beyond the seed spread)",
            ),
            ("same", "Did not help (within the seed spread of AdamW alone)"),
            (
                "worse",
                "Hurt (higher held-out loss than AdamW alone beyond the seed spread)",
            ),
            ("diverged", "Diverged where AdamW alone did not"),
        ):
            if groups.get(v):
                summary_lines.append(
                    f"- lr {lr:g}, {label.split(' (')[0].lower()}: "
                    + ", ".join(f"`{k}`" for k in groups[v])
                )
                lines += [
                    f"{label}: " + ", ".join(f"`{k}`" for k in groups[v]) + ".",
                    "",
                ]
        lines += _notes(results, lr, summary_lines)
    ft = results["finetune"]
    lines += [
        "## Fine-tuning on a shifted part",
        "",
        f"The no-clip model pre-trained at peak lr {cfg['lrs'][0]:g} (seed 0) is saved "
        "with orbax (`StandardCheckpointer`), restored (checked equal), and "
        "fine-tuned on "
        f"part `test` for {cfg['ft_steps']} steps: AdamW with warm-up over "
        f"{cfg['ft_warmup']} steps and cosine decay to {cfg['final_lr_frac']:g} x the "
        "peak, the embeddings "
        f"({', '.join(f'`{x}`' for x in ft['frozen'])}) frozen with "
        "`optax.multi_transform` (the clip sees only the trained arrays), "
        f"{cfg['seeds']} seed(s) of batches, at each peak learning rate below. Before "
        f"fine-tuning: `test` {ft['base']['test_bpb']:.3f}, `lib` "
        f"{ft['base']['lib_bpb']:.3f} bits per byte. Lower is better in both columns: "
        "`test` is what was learned, `lib` what was kept (forgetting raises it).",
        "",
    ]
    for lr in cfg["ft_lrs"]:
        ft_rows = [r for r in ft["rows"] if r["lr"] == lr]
        names = list(dict.fromkeys(r["method"] for r in ft_rows))
        lines += [f"### Fine-tuning at peak learning rate {lr:g}", ""]
        sug = ft["suggested"].get(str(lr))
        if sug:
            lines += [
                "`suggest_max_norm` on the first third of the no-clip fine-tuning run "
                f"(seed 0): {sug['explanation']}",
                "",
            ]
        ft_table = []
        for n in names:
            rs = [r for r in ft_rows if r["method"] == n]
            ft_table.append(
                [
                    f"`{n}`",
                    _fmt_bpb([r["test_bpb"] for r in rs]),
                    _fmt_bpb([r["lib_bpb"] for r in rs]),
                    str(sum(r["spikes"] for r in rs)),
                    str(sum(r["nonfinite"] for r in rs)),
                    _pct(r["clipped"] for r in rs),
                    f"{np.mean([r['seconds'] for r in rs]):.1f}",
                ]
            )
        none_test = [r["test_bpb"] for r in ft_rows if r["method"] == "none"]
        none_lib = [r["lib_bpb"] for r in ft_rows if r["method"] == "none"]
        lines += [*_table(FT_COLUMNS, ft_table), ""]
        for n in names:
            if n == "none":
                continue
            rs = [r for r in ft_rows if r["method"] == n]
            learned = verdict([r["test_bpb"] for r in rs], none_test)
            kept = verdict([r["lib_bpb"] for r in rs], none_lib)
            summary_lines.append(
                f"- fine-tuning at lr {lr:g}, `{n}` vs AdamW alone: `test` "
                f"(learned) {learned}, `lib` (kept) {kept}"
            )
    lines += [
        "## Curves",
        "",
        f"![Loss and gradient norm per step]({fig_path.name})",
        "",
        "## Summary (from the tables above, by the rule stated in Settings)",
        "",
        *summary_lines,
        "",
        "## What this does not show",
        "",
        "- One small model, one corpus, a few hundred steps on a CPU: the spikes here "
        "come from a peak learning rate far above the stable range of the sweep, not "
        "from the slow instabilities of long runs at scale.",
        "- The thresholds were not tuned per method; a method that did not help here "
        "may help with another threshold (the table's clipped column says how often "
        "each one acted).",
        "- Differences smaller than the seed spread are reported as *same*; with "
        f"{cfg['seeds']} seed(s) that spread is itself uncertain.",
        "",
    ]
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.outcomes", description=__doc__
    )
    ap.add_argument("--tiny", action="store_true", help="seconds: the test's mode")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown page")
    ap.add_argument("--json", type=Path, default=None, help="also the raw results")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="pre-training steps")
    ap.add_argument("--lrs", type=str, default=None, help="comma-separated peak lrs")
    ap.add_argument("--sweep-lrs", type=str, default=None)
    ap.add_argument("--methods", type=str, default=None, help="comma-separated")
    ap.add_argument("--ft-lrs", type=str, default=None, help="comma-separated")
    ap.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="rewrite the page (and figure) from the results a --json run saved, "
        "without training",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        rewrite = " ".join(["python -m benchmarks.outcomes", *argv])
        write_page(results, args.out, results["command"], rewrite)
        print(f"[done] wrote {args.out} and {args.out.with_suffix('.png')}")
        return results
    cfg = PRESETS["tiny" if args.tiny else "full"]
    changes: dict[str, Any] = {}
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.lrs:
        changes["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    if args.sweep_lrs:
        changes["sweep_lrs"] = tuple(float(x) for x in args.sweep_lrs.split(","))
    if args.methods:
        changes["methods"] = tuple(dict.fromkeys(["none", *args.methods.split(",")]))
    if args.ft_lrs:
        changes["ft_lrs"] = tuple(float(x) for x in args.ft_lrs.split(","))
    cfg = dataclasses.replace(cfg, **changes)
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; use {','.join(METHODS)}")
    command = " ".join(["python -m benchmarks.outcomes", *argv])

    def log(msg):
        print(msg, flush=True)

    results = run(cfg, log)
    results["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_page(results, args.out, command)
    log(f"[done] wrote {args.out} and {args.out.with_suffix('.png')}")
    if args.json:
        args.json.write_text(json.dumps(results, default=float))
    return results


if __name__ == "__main__":
    main()
