"""Section g: the whole train step of a GPT-style Flax NNX model, per clip.

Run from the repository root (one section of ``python -m benchmarks.run``)::

  python -m benchmarks.run --sections g --gpt small   # ~10M parameters
  python -m benchmarks.run --sections g --gpt large   # ~55M, 389 leaves
  python -m benchmarks.run --sections g --gpt tiny    # seconds (the test)
  python -m benchmarks.run --sections g --gpt small,large --json g.json

What it measures: the step users run, not a stand-in. A GPT-style model
(token and position embeddings, pre-LayerNorm blocks with causal multi-head
attention -- separate q, k, v and output projections with biases -- and a GELU
MLP, a final LayerNorm and an untied output head) is trained on a fixed batch of
random tokens: next-token cross-entropy, ``nnx.value_and_grad``, then
``optimizer.update(model, grads)`` of an ``nnx.Optimizer(model, tx,
wrt=nnx.Param)``, all in one ``jax.jit`` over the split model and optimizer
state (``nnx.merge`` inside, ``nnx.state`` out), which is donated. Not
``nnx.jit``: it walks the model and optimizer in Python on every call (about
45 ms a step at 389 leaves here), which would add the same time to every
variant and hide the clip. The variants differ only in ``tx``:

* ``adamw`` alone (the baseline);
* ``chain(optax.clip_by_global_norm(1.0), adamw)`` and
  ``optax.apply_if_finite`` around it;
* ``chain(T, adamw)`` for every public optax_clip transform ``T`` (the
  arguments of tests/registry.py; ``adagc`` without warm-up, so that its
  per-tensor phase is timed);
* ``spam_clip(adamw)`` (it wraps the optimizer whose second moment it reads);
* the update clips after adamw (``chain(adamw, T)``), and ``stable_adamw``
  in its place;
* both guards around ``chain(optax_clip.clip_by_global_norm(1.0), adamw)``,
  given the loss (``update(..., loss=loss)``), and ``skip_on_spike`` with
  ``reset_on_skip=True``.

Every variant is compiled first (trace and compile timed apart, ahead of
time), then timed in interleaved rounds: each round runs every variant for
``steps`` steps and waits for its state, the order rotating each round.
Reported per variant: the median time of one step, its ratio to adamw alone
(median of the per-round ratios) and the share of the step the clip or guard
takes, ``1 - 1 / ratio`` = (t - t_adamw) / t. With torch installed, the same
model in PyTorch (float32) is timed with and without
``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`` before its AdamW
step, in its own interleaved loop after the JAX variants. Absolute times
across frameworks on CPU say little (different kernels, threading); the
ratio clip / no clip within each framework is the point.

All variants stay in memory together: about 0.7 GB each for ``large`` in
float32 (parameters and two Adam moments), 10 GB for the 14 variants.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_clip as oc
from benchmarks.run import (
    MAX_NORM,
    adamw,
    median_ms,
    paired_ratio,
    skip_aware_adamw,
    time_interleaved,
    torch_version,
)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model sizes and how long to time it."""

    vocab: int
    d: int  # model width
    layers: int
    heads: int
    seq: int  # tokens per sequence (and rows of the position table)
    batch: int
    rounds: int  # interleaved rounds
    steps: int  # steps of each variant per round
    tied: bool = False  # output head = token embedding, transposed


GPT_PRESETS = {
    "tiny": GPTConfig(
        vocab=64, d=32, layers=2, heads=2, seq=16, batch=2, rounds=2, steps=2
    ),
    "small": GPTConfig(
        vocab=8192, d=256, layers=8, heads=8, seq=128, batch=8, rounds=7, steps=3
    ),
    "large": GPTConfig(
        vocab=16384, d=384, layers=24, heads=6, seq=128, batch=4, rounds=7, steps=2
    ),
}


def n_params(cfg: GPTConfig) -> int:
    """Parameters of :class:`GPT`: embeddings, 12 d^2 + 13 d per block, head."""
    d = cfg.d
    block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    head = 0 if cfg.tied else d * cfg.vocab
    return cfg.vocab * d + cfg.seq * d + cfg.layers * block + 2 * d + head


def n_leaves(cfg: GPTConfig) -> int:
    """Arrays of :class:`GPT`: 16 per block (8 kernels and biases of the
    attention, 4 of the MLP, 4 LayerNorm scales and biases), 2 embeddings,
    the final LayerNorm's 2 and the head's kernel."""
    return 16 * cfg.layers + 4 + (0 if cfg.tied else 1)


# --------------------------------------------------------------------------
# The model and the step, in Flax NNX.
# --------------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.heads = heads
        self.ln1 = nnx.LayerNorm(d, **kw)
        self.q = nnx.Linear(d, d, **kw)
        self.k = nnx.Linear(d, d, **kw)
        self.v = nnx.Linear(d, d, **kw)
        self.o = nnx.Linear(d, d, **kw)
        self.ln2 = nnx.LayerNorm(d, **kw)
        self.up = nnx.Linear(d, 4 * d, **kw)
        self.down = nnx.Linear(4 * d, d, **kw)

    def __call__(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).reshape(b, t, self.heads, -1) for f in (self.q, self.k, self.v))
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.tok = nnx.Embed(cfg.vocab, cfg.d, **kw)
        self.pos = nnx.Embed(cfg.seq, cfg.d, **kw)
        self.blocks = nnx.List(
            [Block(cfg.d, cfg.heads, dtype, rngs) for _ in range(cfg.layers)]
        )
        self.ln_f = nnx.LayerNorm(cfg.d, **kw)
        self.head = (
            None if cfg.tied else nnx.Linear(cfg.d, cfg.vocab, use_bias=False, **kw)
        )

    def __call__(self, tokens):
        x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.tok.attend(x) if self.head is None else self.head(x)


def loss_fn(model: GPT, tokens) -> jax.Array:
    """Next-token cross-entropy (in float32) over a batch of sequences."""
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_step(graphdef, pass_loss: bool):
    """``state, loss = step(state, tokens)``: one train step, state donated."""

    def step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads, **({"loss": loss} if pass_loss else {}))
        return nnx.state((model, optimizer)), loss

    return jax.jit(step, donate_argnums=0)


def variants(names: list[str] | None = None) -> dict[str, tuple[Any, bool]]:
    """``name: (tx, pass_loss)`` of every variant (or of adamw and ``names``)."""
    ours = {
        "clip_by_global_norm": lambda: oc.clip_by_global_norm(MAX_NORM),
        "clip_by_block_norm": lambda: oc.clip_by_block_norm(MAX_NORM),
        "clip_by_block_rms": lambda: oc.clip_by_block_rms(MAX_NORM),
        "clip_by_spectral_norm": lambda: oc.clip_by_spectral_norm(MAX_NORM),
        "clip_by_value": lambda: oc.clip_by_value(1.0),
        "soft_clip_by_global_norm": lambda: oc.soft_clip_by_global_norm(MAX_NORM),
        "autoclip": lambda: oc.autoclip(10.0, history=16, max_norm=MAX_NORM),
        "zclip": lambda: oc.zclip(max_norm=MAX_NORM, warmup_steps=2),
        "adagc": lambda: oc.adagc(MAX_NORM, warmup_steps=0),
        "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(100.0),
        "adaclip": lambda: oc.adaclip(),
        "adagn": lambda: oc.adagn(),
    }
    out = {
        "adamw": (adamw(), False),
        "optax.clip_by_global_norm": (
            optax.chain(optax.clip_by_global_norm(MAX_NORM), adamw()),
            False,
        ),
        "optax.apply_if_finite": (
            optax.apply_if_finite(
                optax.chain(optax.clip_by_global_norm(MAX_NORM), adamw()), 10
            ),
            False,
        ),
    }
    out.update({k: (optax.chain(make(), adamw()), False) for k, make in ours.items()})
    out["spam_clip"] = (oc.spam_clip(adamw()), False)  # wraps adamw: reads its nu
    # Update clips sit after the optimizer; stable_adamw is adamw's replacement.
    out["clip_update_by_history"] = (
        optax.chain(adamw(), oc.clip_update_by_history(16)),
        False,
    )
    out["clip_update_by_param_norm"] = (
        optax.chain(adamw(), oc.clip_update_by_param_norm(100.0)),
        False,
    )
    out["stable_adamw"] = (oc.stable_adamw(1e-3, weight_decay=1e-4), False)
    clip_adamw = lambda: optax.chain(oc.clip_by_global_norm(MAX_NORM), adamw())  # noqa: E731
    out["skip_nonfinite"] = (oc.skip_nonfinite(clip_adamw()), True)
    out["skip_on_spike"] = (oc.skip_on_spike(clip_adamw(), window=8, sigma=6.0), True)
    # The guards' fast path: optax_clip.adamw (optax's, computed from the kept state).
    clip_oc_adamw = lambda: optax.chain(  # noqa: E731
        oc.clip_by_global_norm(MAX_NORM), skip_aware_adamw()
    )
    out["skip_nonfinite [oc.adamw]"] = (oc.skip_nonfinite(clip_oc_adamw()), True)
    out["skip_on_spike [oc.adamw]"] = (
        oc.skip_on_spike(clip_oc_adamw(), window=8, sigma=6.0),
        True,
    )
    out["skip_on_spike [oc.adamw, reset_on_skip]"] = (
        oc.skip_on_spike(clip_oc_adamw(), window=8, sigma=6.0, reset_on_skip=True),
        True,
    )
    if names is not None:
        unknown = set(names) - set(out)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; use {list(out)}")
        out = {k: v for k, v in out.items() if k == "adamw" or k in names}
    return out


class JaxCase:
    """One variant: its own model and optimizer, compiled ahead of time."""

    def __init__(self, cfg: GPTConfig, dtype, tx, pass_loss: bool, tokens, steps: int):
        model = GPT(cfg, dtype, nnx.Rngs(0))  # the same initial weights for all
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        self.n_params, self.n_leaves = sum(x.size for x in leaves), len(leaves)
        graphdef, state = nnx.split((model, optimizer))
        # Copied: an init may share one buffer between fields (not donatable).
        self.state = jax.tree.map(jnp.copy, state)
        self.tokens, self.steps = tokens, steps
        t0 = time.perf_counter()
        lowered = make_step(graphdef, pass_loss).lower(self.state, tokens)
        t1 = time.perf_counter()
        self.fn = lowered.compile()
        self.trace_s, self.compile_s = t1 - t0, time.perf_counter() - t1

    def __call__(self):
        for _ in range(self.steps):
            self.state, self.loss = self.fn(self.state, self.tokens)
        return self.state, self.loss


# --------------------------------------------------------------------------
# The same model and step in PyTorch (optional).
# --------------------------------------------------------------------------


def torch_model(cfg: GPTConfig):
    """:class:`GPT` in torch, float32 (same layers, shapes and parameters)."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    class TorchBlock(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg.d
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            h = self.ln1(x)
            q, k, v = (
                f(h).view(b, t, cfg.heads, -1).transpose(1, 2)
                for f in (self.q, self.k, self.v)
            )
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(cfg.vocab, cfg.d)
            self.pos = nn.Embedding(cfg.seq, cfg.d)
            self.blocks = nn.ModuleList(TorchBlock() for _ in range(cfg.layers))
            self.ln_f = nn.LayerNorm(cfg.d)
            self.head = None if cfg.tied else nn.Linear(cfg.d, cfg.vocab, bias=False)

        def forward(self, tokens):
            x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            x = self.ln_f(x)
            return x @ self.tok.weight.T if self.head is None else self.head(x)

    torch.manual_seed(0)
    return TorchGPT()


class TorchCase:
    """forward, backward, optional ``clip_grad_norm_``, AdamW step; in torch."""

    def __init__(self, cfg: GPTConfig, tokens: np.ndarray, clip: bool, steps: int):
        import torch

        self.torch, self.clip, self.steps = torch, clip, steps
        self.model = torch_model(cfg)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-3, weight_decay=1e-4
        )
        self.tokens = torch.from_numpy(tokens).long()
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def __call__(self):
        F = self.torch.nn.functional  # noqa: N806
        x, y = self.tokens[:, :-1], self.tokens[:, 1:]
        for _ in range(self.steps):
            self.opt.zero_grad(set_to_none=True)
            logits = self.model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
            if self.clip:
                self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
            self.opt.step()
        return loss.item()


# --------------------------------------------------------------------------
# The section.
# --------------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def section_g(
    log,
    preset: str = "small",
    dtype: str = "float32",
    names: list[str] | None = None,
    rounds: int | None = None,
    use_torch: bool = True,
) -> list[dict]:
    """Rows of section g (see the module docstring); ``names`` picks variants."""
    cfg = GPT_PRESETS[preset]
    rounds = rounds or cfg.rounds
    tokens_np = np.random.default_rng(0).integers(
        0, cfg.vocab, (cfg.batch, cfg.seq + 1), dtype=np.int32
    )
    tokens = jnp.asarray(tokens_np)
    txs = variants(names)
    cases, compiled = {}, {}
    for name, (tx, pass_loss) in txs.items():
        cases[name] = JaxCase(cfg, jnp.dtype(dtype), tx, pass_loss, tokens, cfg.steps)
        compiled[name] = (cases[name].trace_s, cases[name].compile_s)
        log(
            f"[g] compiled {name}: trace {compiled[name][0]:.2f} s, "
            f"compile {compiled[name][1]:.2f} s"
        )
    count, n = cases["adamw"].n_params, cases["adamw"].n_leaves
    model = (
        f"{preset}: {count / 1e6:.2f}M params / {n} leaves / "
        f"{'bf16' if dtype == 'bfloat16' else 'f32'} / "
        f"{cfg.batch}x{cfg.seq} tokens"
    )
    log(
        f"[g] {model} (d={cfg.d}, layers={cfg.layers}, heads={cfg.heads}, "
        f"vocab={cfg.vocab}); {rounds} rounds of {cfg.steps} steps"
    )
    ts = time_interleaved(cases, rounds, warmup=1)
    base = ts["adamw"]
    rows = []
    for name, t in ts.items():
        ratio = paired_ratio(t, base)
        rows.append(
            {
                "model": model,
                "framework": "jax",
                "variant": name,
                "params": count,
                "leaves": n,
                "ms": median_ms(t) / cfg.steps,
                "ratio": ratio,
                "share": 1 - 1 / ratio,
                "trace_s": compiled[name][0],
                "compile_s": compiled[name][1],
                "loss": float(cases[name].loss),
            }
        )
        log(f"[g] {rows[-1]}")
    del cases
    gc.collect()
    rows += _torch_rows(cfg, tokens_np, rounds, model, use_torch, log)
    return rows


def _torch_rows(cfg, tokens_np, rounds, model, use_torch, log) -> list[dict]:
    common = {"model": model, "framework": "torch"}
    if not use_torch or torch_version() is None:
        why = "torch not installed" if torch_version() is None else "torch skipped"
        return [{**common, "variant": why, "ms": None, "ratio": None, "share": None}]
    import torch

    torch.set_num_threads(_cpu_count())
    cases = {
        "adamw": TorchCase(cfg, tokens_np, clip=False, steps=cfg.steps),
        "clip_grad_norm_": TorchCase(cfg, tokens_np, clip=True, steps=cfg.steps),
    }
    ts = time_interleaved(cases, rounds, warmup=1)
    time.sleep(1.0)  # its idle OpenMP threads spin for a while
    rows = []
    for name, t in ts.items():
        ratio = paired_ratio(t, ts["adamw"])
        rows.append(
            {
                **common,
                "variant": name,
                "params": cases[name].n_params,
                "ms": median_ms(t) / cfg.steps,
                "ratio": ratio,
                "share": 1 - 1 / ratio,
                "threads": torch.get_num_threads(),
            }
        )
        log(f"[g] {rows[-1]}")
    return rows


def report_lines(rows: list[dict]) -> list[str]:
    """The section's part of results.md."""
    from benchmarks.run import _f, _table

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        "## g. The whole train step of a GPT-style Flax NNX model",
        "",
        "Loss, `nnx.value_and_grad` and `optimizer.update(model, grads)` in one "
        "`jax.jit`, model and optimizer state donated (see "
        "`benchmarks/train_step.py`). Variants: `chain(X, adamw)`; "
        "`optax.apply_if_finite(chain(optax.clip_by_global_norm, adamw), 10)`; "
        "the guards wrap `chain(optax_clip.clip_by_global_norm, adamw)` and are "
        "given the loss. ratio = step time / adamw's (median of per-round "
        "ratios); share = the part of the step the clip or guard takes, "
        "1 - 1/ratio. Compile: ahead of time, trace and compile. torch: the same "
        "model in float32 with `clip_grad_norm_(model.parameters(), 1.0)` before "
        "`AdamW.step()`, timed in its own loop; absolute times across frameworks "
        "on CPU say little, compare the ratios. In a report merged from several "
        "runs (see the top), each row comes from one of them and its ratio is to "
        "that run's `adamw`: compare ratios, not milliseconds, across rows.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [
            f"Model: {model}.",
            "",
            *_table(
                [
                    "framework",
                    "variant",
                    "ms / step",
                    "ratio",
                    "share",
                    "trace s",
                    "compile s",
                ],
                [
                    [
                        r["framework"],
                        r["variant"],
                        _f(r["ms"]),
                        _f(r["ratio"], 3),
                        pct(r["share"]),
                        _f(r.get("trace_s")),
                        _f(r.get("compile_s")),
                    ]
                    for r in rows
                    if r["model"] == model
                ],
            ),
            "",
        ]
    return lines
