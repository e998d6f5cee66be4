"""Independent NumPy float64 references shared by the tests.

Written from the maths, not from the library: norms scaled by the largest
magnitude so that float64 inputs near the float range do not overflow here.
"""

import numpy as np


def flat64(leaves):
    """All values of ``leaves`` as one float64 (or complex128) vector."""
    parts = [np.asarray(x).astype(np.complex128).ravel() for x in leaves]
    flat = np.concatenate(parts + [np.zeros(0, np.complex128)])
    return flat.real if not np.any(flat.imag) else flat


def norm(leaves, p=2.0):
    """The ``p``-norm of all the values of ``leaves`` (1, 2 or inf), in float64."""
    a = np.abs(flat64(leaves))
    if a.size == 0:
        return 0.0
    m = float(np.max(a))
    if p == np.inf or m == 0 or not np.isfinite(m):
        return m
    return m * float(np.sum((a / m) ** p) ** (1.0 / p))


def flush_subnormals(x):
    """``x`` with the values subnormal in its accumulation dtype set to 0.

    The accumulation dtype is float64 for float64 values, float32 otherwise:
    XLA reads subnormal float32 and float64 inputs of arithmetic as 0 (bf16
    subnormals become float32 subnormals; fp16 ones are normal in float32).
    """
    x = np.asarray(x)
    wide = x.dtype == np.float64
    tiny = np.finfo(np.float64 if wide else np.float32).tiny
    return np.where(np.abs(x.astype(np.float64)) < tiny, np.zeros((), x.dtype), x)


def soft(n, c, knee):
    """The output norm of ``soft_clip_by_global_norm`` for an input norm ``n``."""
    tau = knee * c
    if n <= tau:
        return n
    return tau + (c - tau) * -np.expm1(-(n - tau) / (c - tau))


def scaled(leaves, s):
    """Each leaf in float64 times ``s``."""
    return [np.asarray(x).astype(np.float64) * s for x in leaves]


def rescaled(leaves, target, n):
    """Each leaf times ``target / n`` (1 for ``n == 0``), without underflow.

    ``x * (target / n)``, or ``(x / n) * target`` when the ratio alone is
    below the float64 range (clipping a norm of 1e305 to 1e-300).
    """
    if n == 0:
        return scaled(leaves, 1.0)
    s = target / n
    if s >= np.finfo(np.float64).tiny:
        return scaled(leaves, s)
    return [(np.asarray(x).astype(np.float64) / n) * target for x in leaves]
