"""Workarounds for XLA:CPU, used only when compiling for the CPU (private).

Each function here has a plain equivalent that gives the same values, and is
what GPUs and TPUs run. On XLA:CPU some plain forms cost a full-size copy of
the gradients or many times the time (measurements, and how to check whether
a workaround is still needed, in ``docs/performance.md``):

* a bf16/fp16 ``select`` is done in float32 by XLA:CPU; that conversion of the
  gradient merges with the norm's own and is written out on every step;
* the bf16 -> float32 conversion of the apply step merges with the norm's;
* a conversion inside the rescaled branch of a ``lax.cond`` is hoisted out of
  it and shared with the plain pass;
* a reduction whose input is computed (``|x|``, rescaled values) is handed to
  YNNPACK, which cannot fuse the computation and writes it out first;
* a reduction of several outputs runs on one thread (YNNPACK's use them all).

:func:`enabled` says whether they are in use: for the CPU backend, unless a
test forces the plain forms with :func:`forced`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_FORCED: bool | None = None


def enabled() -> bool:
    """Whether the XLA:CPU workarounds are in use (decided at trace time)."""
    if _FORCED is not None:
        return _FORCED
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def forced(value: bool):
    """Uses (True) or avoids (False) the workarounds while tracing, for tests."""
    global _FORCED
    previous, _FORCED = _FORCED, value
    try:
        yield
    finally:
        _FORCED = previous


#: Full reductions of at least this many values are split into rows.
SPLIT_MIN = 1 << 17


def split_rows(x: jax.Array) -> jax.Array | None:
    """``x`` as ``(k, n / k)`` rows to reduce on ``k`` threads, or None.

    XLA:CPU runs a reduction of several outputs (sum and max together) on one
    thread, but splits one over rows across its threads. Free: a reshape.
    """
    if not enabled() or x.size < SPLIT_MIN:
        return None
    for k in (16, 8, 4, 2):
        if x.size % k == 0:
            return lax.reshape(x, (k, x.size // k))
    return None


def _pick(pred: jax.Array, on_true: jax.Array, on_false: jax.Array):
    """``lax.select`` for a scalar ``pred`` (fast to trace), else ``jnp.where``.

    ``jnp.where`` broadcasts ``pred`` with the operands' sharding (``lax.select``
    rejects a replicated, hand-broadcast one under ``Explicit`` mesh axes).
    """
    if jnp.ndim(pred) == 0:
        return lax.select(pred, on_true, on_false)
    return jnp.where(pred, on_true, on_false)


def select(pred: jax.Array, on_true: jax.Array, on_false: jax.Array):
    """``where(pred, on_true, on_false)``; 16-bit floats selected as integers."""
    dtype = on_true.dtype
    if enabled() and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
        return _select16(pred, on_true, on_false)
    return _pick(pred, on_true, on_false)


@jax.custom_jvp
def _select16(pred: jax.Array, on_true: jax.Array, on_false: jax.Array):
    bits = _pick(
        pred,
        lax.bitcast_convert_type(on_true, jnp.uint16),
        lax.bitcast_convert_type(on_false, jnp.uint16),
    )
    return lax.bitcast_convert_type(bits, on_true.dtype)


@_select16.defjvp
def _select16_jvp(primals, tangents):
    pred, a, b = primals
    _, ta, tb = tangents
    return _select16(pred, a, b), _pick(pred, ta, tb)


def convert(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` as ``dtype``; lax directly (a few thousand leaves trace faster)."""
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def widen(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` converted to the wider ``dtype``; bf16 -> f32 through its bits."""
    if enabled() and x.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32:
        return _bf16_to_f32(x)
    return convert(x, dtype)


@jax.custom_jvp
def _bf16_to_f32(x: jax.Array) -> jax.Array:
    """bfloat16 -> float32 (exact) by shifting the bits."""
    bits = lax.convert_element_type(lax.bitcast_convert_type(x, jnp.uint16), jnp.uint32)
    return lax.bitcast_convert_type(lax.shift_left(bits, jnp.uint32(16)), jnp.float32)


@_bf16_to_f32.defjvp
def _bf16_to_f32_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _bf16_to_f32(x), t.astype(jnp.float32)


@jax.custom_jvp
def bf16_toward_zero(y: jax.Array) -> jax.Array:
    """float32 -> bfloat16 rounding toward zero: the top 16 bits of ``y``.

    The same values as the generic rounding toward zero, with a quarter of the
    element-wise work. NaN stays NaN (every NaN that arithmetic on bf16 values
    produces has its quiet bit, which is kept). Differentiated like a cast.
    """
    top = lax.shift_right_logical(
        lax.bitcast_convert_type(y, jnp.uint32), jnp.uint32(16)
    )
    return lax.bitcast_convert_type(
        lax.convert_element_type(top, jnp.uint16), jnp.bfloat16
    )


@bf16_toward_zero.defjvp
def _bf16_toward_zero_jvp(primals, tangents):
    (y,), (t,) = primals, tangents
    return bf16_toward_zero(y), t.astype(jnp.bfloat16)


def magnitude_in_branch(x: jax.Array) -> jax.Array:
    """``|x|`` of a real ``x`` inside the rescaled branch.

    Spelled ``abs(max(x, -x))`` on XLA:CPU: the same values through other
    operations than the plain pass, whose conversion would otherwise be
    hoisted out of the branch and shared (and then written out in full).
    ``abs`` clears a NaN's sign bit.
    """
    if enabled():
        return lax.abs(lax.max(x, lax.neg(x)))
    return lax.abs(x)


#: Entries read out of a vector by one kernel (see :func:`entries`).
ENTRIES_GROUP = 32


def entry(vec: jax.Array, i: int) -> jax.Array:
    """Entry ``i`` of ``vec`` as a scalar (lax: traces fast)."""
    return lax.reshape(lax.slice_in_dim(vec, i, i + 1), ())


def entries(vectors: Any) -> list:
    """The entries of same-length float vectors as scalars: ``out[i][k] = v[k][i]``.

    The plain form is one slice per entry. XLA:CPU compiles a kernel that
    slices a vector (the slice fused into the consumer, or on its own) with
    its MLIR emitter, about 40 times slower to compile than an elementwise
    kernel: one per leaf made a per-leaf clip of 1000 leaves compile in 20 s
    (``benchmarks/compile_per_leaf.py``). Here the entries of up to
    :data:`ENTRIES_GROUP` indices come out of one reduction with an output
    per entry (``sum_j where(j == i, v_j, 0)``, exact: every other summand is
    +0), compiled by the fast emitter. Differentiated as the slices.
    """
    vectors = tuple(vectors)
    n = vectors[0].shape[0] if vectors else 0
    if not enabled() or n == 0:
        return [tuple(entry(v, i) for v in vectors) for i in range(n)]
    # One reduction per dtype (XLA rejects a reduction of mixed precisions).
    by_dtype: dict[Any, list[int]] = {}
    for c, v in enumerate(vectors):
        by_dtype.setdefault(v.dtype, []).append(c)
    out: list[list] = [[None] * len(vectors) for _ in range(n)]
    for start in range(0, n, ENTRIES_GROUP):
        k = min(ENTRIES_GROUP, n - start)
        for cols in by_dtype.values():
            chunks = tuple(lax.slice_in_dim(vectors[c], start, start + k) for c in cols)
            flat = _reduced_entries(chunks)
            for j in range(k):
                for q, c in enumerate(cols):
                    out[start + j][c] = flat[j * len(cols) + q]
    return [tuple(row) for row in out]


@jax.custom_jvp
def _reduced_entries(chunks: tuple) -> tuple:
    """``(c[0][0], c[1][0], ..., c[0][1], ...)`` of short vectors, one reduction."""
    k = chunks[0].shape[0]
    index = lax.broadcasted_iota(jnp.int32, (k,), 0)
    operands, inits = [], []
    for j in range(k):
        hit = index == j
        for c in chunks:
            operands.append(lax.select(hit, c, lax.full_like(c, 0)))
            inits.append(jnp.zeros((), c.dtype))
    n = len(operands)

    def add(u, v):
        return tuple(lax.add(u[i], v[i]) for i in range(n))

    return tuple(lax.reduce(tuple(operands), tuple(inits), add, (0,)))


@_reduced_entries.defjvp
def _reduced_entries_jvp(primals, tangents):
    (chunks,), (ts,) = primals, tangents
    k = chunks[0].shape[0]
    out_t = tuple(entry(t, j) for j in range(k) for t in ts)
    return _reduced_entries(chunks), out_t
