"""Spectral clipping of matrices: the top singular value of each 2-D leaf."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from optax_clip import (
    _apply,
    _collectives,
    _fail_fast,
    _norms,
    _plan,
    _reduce,
    _validation,
)
from optax_clip._stats import ClipStats, init_clip_stats

Mode = Literal["hard", "soft"]
Vectors = Literal["norm", "pass"]
HigherRank = Literal["batch", "flatten"]

_MODES = ("hard", "soft")
_VECTORS = ("norm", "pass")
_HIGHER_RANK = ("batch", "flatten")
# Weight of the fixed vector mixed into the warm start on every step, so that
# an estimate orthogonal to a new gradient's row space (e.g. an embedding's
# gradient on tokens the previous step did not see) still finds its norm.
_RESEED = 2.0**-10
# Largest threshold, relative to the largest magnitude of a matrix, that the
# soft clip works with: above it, sigma**2 / c**2 < 2**-80 for every singular
# value of the matrix and the map is the identity in float32 and float64 alike.
_LARGEST_RELATIVE_THRESHOLD = 2.0**60


class ClipBySpectralNormState(NamedTuple):
    """State of :func:`clip_by_spectral_norm`.

    Attributes:
      clip_stats: :class:`optax_clip.ClipStats` of the last step, in units of
        spectral norm: ``pre_clip_norm`` is the largest (estimated) top
        singular value over all matrices (and vector norms, with
        ``vectors="norm"``), ``post_clip_norm`` the largest after the clip,
        ``clip_scale`` the smallest factor applied to a top singular value.
      singular_vectors: for each leaf (same tree as the parameters), the
        current estimate of the top right-singular vector of each matrix, a
        float32 array of shape ``batch + (n,)`` for a leaf of shape
        ``batch + (m, n)`` (``(n,)`` with ``higher_rank="flatten"``), and of
        shape ``(0,)`` for leaves that are not matrices. Unit vectors, warm
        starts of the next step's power iteration.
      clipped_matrices: the number of matrices (each matrix of a stack counts)
        whose estimated top singular value exceeded ``max_norm`` on the last
        step (int32).
      matrix_clip_fraction: ``clipped_matrices`` over the number of matrices
        in the update (float32; 0 without matrices).
    """

    clip_stats: ClipStats
    singular_vectors: Any
    clipped_matrices: jax.Array
    matrix_clip_fraction: jax.Array
    _stats_name = "clip_by_spectral_norm"
    _stats_fields = ("clipped_matrices", "matrix_clip_fraction")


def _matrix_shape(shape: tuple[int, ...], higher_rank: str):
    """The ``batch + (m, n)`` shape a leaf is clipped as, or None (not a matrix)."""
    if len(shape) < 2:
        return None
    if higher_rank == "flatten":
        return (math.prod(shape[:-1]), shape[-1])
    return tuple(shape)


def _seed_vector(n: int) -> np.ndarray:
    """A fixed unit vector with no zero entry (float64; a constant of the trace).

    ``1 + frac(j * golden ratio)``: entries in ``[1, 2)``, unlike ones not
    orthogonal to rows such as ``[1, -1, 0, ...]``.
    """
    j = np.arange(n, dtype=np.float64)
    r = 1.0 + np.mod(j * 0.6180339887498949, 1.0)
    return r / np.linalg.norm(r) if n else r


def _initial_vectors(params: Any, higher_rank: str) -> Any:
    def one(p):
        mat = _matrix_shape(jnp.shape(p), higher_rank)
        if mat is None:
            return jnp.zeros((0,), jnp.float32)
        seed = jnp.asarray(_seed_vector(mat[-1]), jnp.float32)
        return jnp.broadcast_to(seed, mat[:-2] + mat[-1:])

    return jax.tree.map(one, params)


def _safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """2-norm over ``axis`` (kept), 0 with a finite gradient at 0.

    For vectors whose entries are at most a few thousand in magnitude (the
    scaled iterates), so the squares neither overflow nor underflow.
    """
    return _norms.safe_root(jnp.sum(x * x, axis=axis, keepdims=True), 2.0)


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else 0 (finite gradients at 0)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, jnp.ones_like(den)), 0.0)


class _Matrix(NamedTuple):
    """One leaf as matrices, with a power of two above each one's magnitude.

    ``x * f1 * f2`` (``f1 * f2 = 2**-e``, two normal floats) has entries of
    magnitude below 1, matrix by matrix.
    """

    x: jax.Array  # batch + (m, n), the leaf's values in the working dtype
    e: jax.Array  # batch + (1, 1), integer exponents
    f1: jax.Array  # batch + (1, 1)
    f2: jax.Array  # batch + (1, 1)
    bad: jax.Array  # batch + (1, 1), a NaN or Inf in the matrix

    def scaled(self) -> jax.Array:
        """The matrices times ``2**-e`` (0 where bad); a copy, for the soft clip."""
        xs = (self.x * self.f1) * self.f2
        return jnp.where(self.bad, jnp.zeros_like(xs), xs)


def _as_matrix(x: jax.Array, mat_shape: tuple, dtype: Any) -> _Matrix:
    """The leaf as matrices and, for each, the power of two above its magnitude.

    Dividing by it is exact, and afterwards no product or sum of the power
    iteration or of Newton-Schulz can overflow or underflow, whatever the
    magnitude of the gradient (1e30 in float32, 300 in float16, 1e-30).
    """
    if x.size:
        a = lax.stop_gradient(_reduce.magnitude(x, dtype).reshape(mat_shape))
        m = _collectives.nan_max(a, axis=(-2, -1), keepdims=True)
    else:
        m = jnp.zeros(mat_shape[:-2] + (1, 1), dtype)
    e = _norms.exponent(m)
    f1, f2 = _norms.pow2_factors(e, dtype)
    return _Matrix(x.astype(dtype).reshape(mat_shape), e, f1, f2, ~jnp.isfinite(m))


def _scaled_matvec(m: _Matrix, v: jax.Array, transpose: bool) -> jax.Array:
    """``(x * 2**-e) @ v`` (or its transpose), without a scaled copy of ``x``.

    ``f1`` goes into the vector and ``f2`` onto the result: with a unit
    vector and entries below ``2**e``, every product and partial sum is within
    ``2**(+-64) * n`` of 1.
    """
    f1, f2 = m.f1[..., 0], m.f2[..., 0]  # batch + (1,)
    if not _plan.is_local(m.x):
        # Maybe sharded: a product and a sum, which any sharding of the matrix
        # allows (a dot over a sharded axis needs its output sharding spelled
        # out under explicit mesh axes).
        prod = (
            m.x * (v * f1)[..., :, None] if transpose else m.x * (v * f1)[..., None, :]
        )
        return jnp.sum(prod, axis=-2 if transpose else -1) * f2
    spec = "...mn,...m->...n" if transpose else "...mn,...n->...m"
    hp = lax.Precision.HIGHEST
    return jnp.einsum(spec, m.x, v * f1, precision=hp) * f2


def _power_iteration(m: _Matrix, v: jax.Array, iters: int):
    """``(sigma, v_next)``: the top singular value of each scaled matrix.

    ``iters`` steps of ``u = A v, w = A^T u, v = w / |w|`` from the warm start
    ``v`` (plus a small fixed vector), and ``sigma = |A^T u| / |A v|`` from the
    last step: a lower bound on the top singular value that converges to it
    (at least the Rayleigh estimate ``|A v|``). The iteration vector is not
    differentiated; ``sigma`` is (through ``A``). An all-zero matrix gives
    ``sigma = 0`` and keeps ``v``.
    """
    seed = jnp.asarray(_seed_vector(m.x.shape[-1]), m.x.dtype)
    v = lax.stop_gradient(v.astype(m.x.dtype))
    start = v + _RESEED * seed
    start = start / jnp.maximum(_safe_norm(start), 1e-30)
    frozen = m._replace(x=lax.stop_gradient(m.x))
    cur = start
    for _ in range(iters - 1):
        w = _scaled_matvec(frozen, _scaled_matvec(frozen, cur, False), True)
        wn = _safe_norm(w)
        cur = jnp.where(wn > 0, _safe_divide(w, wn), cur)
    u = _scaled_matvec(m, cur, False)
    w = _scaled_matvec(m, u, True)
    un, wn = _safe_norm(u), _safe_norm(w)
    sigma = _safe_divide(wn, un)
    nxt = jnp.where(wn > 0, lax.stop_gradient(_safe_divide(w, wn)), v)
    return sigma[..., None], nxt


def _newton_schulz_inv_sqrt(a: jax.Array, steps: int) -> jax.Array:
    """``a**(-1/2)`` for symmetric ``a`` with eigenvalues in ``(0, 1]``.

    The coupled Newton-Schulz iteration of SPECTRA's code:
    ``T = (3 I - Z Y) / 2; Y <- Y T; Z <- T Z`` from ``Y = a, Z = I``.
    """
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    y, z = a, jnp.broadcast_to(eye, a.shape)
    hp = lax.Precision.HIGHEST
    for _ in range(steps):
        t = 0.5 * (3.0 * eye - jnp.matmul(z, y, precision=hp))
        y = jnp.matmul(y, t, precision=hp)
        z = jnp.matmul(t, z, precision=hp)
    return z


def _soft_matrices(xs: jax.Array, cs: jax.Array, steps: int) -> jax.Array:
    """SPECTRA's ``(I + X X^T / c^2)^(-1/2) X`` for scaled matrices ``xs``.

    ``cs`` (shape ``batch + (1, 1)``) is the threshold in the matrices' scale.
    With ``beta`` an upper bound on the top eigenvalue of ``X X^T`` (the
    smaller of Gershgorin's and the Frobenius norm, as in SPECTRA's code), the
    iteration runs on ``(c^2 I + X X^T) / (c^2 + beta)``, whose eigenvalues
    are in ``(0, 1]``, and ``(I + X X^T / c^2)^(-1/2) = c / sqrt(c^2 + beta)``
    times its inverse square root. The Gram matrix is of the smaller side.
    """
    wide = xs.shape[-2] <= xs.shape[-1]
    x = xs if wide else jnp.swapaxes(xs, -1, -2)
    hp = lax.Precision.HIGHEST
    gram = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=hp)
    gersh = jnp.max(jnp.sum(jnp.abs(gram), axis=-1), axis=-1)[..., None, None]
    frob = _norms.safe_root(jnp.sum(gram * gram, axis=(-2, -1), keepdims=True), 2.0)
    beta = jnp.minimum(gersh, frob)
    c = jnp.minimum(cs, _LARGEST_RELATIVE_THRESHOLD)
    c2 = c * c
    d = c2 + beta
    a = _safe_divide(c2, d)
    b = _safe_divide(jnp.ones_like(d), d)
    eye = jnp.eye(x.shape[-2], dtype=x.dtype)
    z = _newton_schulz_inv_sqrt(a * eye + b * gram, steps)
    out = _norms.safe_root(a, 2.0) * jnp.matmul(z, x, precision=hp)
    return out if wide else jnp.swapaxes(out, -1, -2)


def _soft_factor(sigma: jax.Array, c: jax.Array) -> jax.Array:
    """``1 / sqrt(1 + sigma**2 / c**2)`` (1 at ``sigma = 0``, 0 at ``c = 0``)."""
    pos = c > 0
    rho = jnp.where(
        pos, sigma / jnp.where(pos, c, 1.0), jnp.where(sigma > 0, jnp.inf, 0.0)
    )
    rho = jnp.where(jnp.isnan(c), jnp.nan, rho)
    return 1.0 / jnp.hypot(jnp.ones_like(rho), rho)


def clip_by_spectral_norm(
    max_norm: jax.typing.ArrayLike,
    *,
    mode: Mode = "hard",
    power_iters: int = 1,
    ns_steps: int = 10,
    vectors: Vectors = "norm",
    higher_rank: HigherRank = "batch",
    nonfinite: _validation.NonFinitePolicy = "propagate",
) -> optax.GradientTransformation:
    r"""Clips the spectral norm (top singular value) of each matrix in the update.

    With ``mode="hard"`` (default), each matrix :math:`G` (a 2-D leaf, or
    each matrix of a stack) is scaled by its estimated top singular value
    :math:`\hat\sigma`; with ``mode="soft"``, every singular value is mapped
    as in SPECTRA:

    .. math::

      \text{hard:}\quad G \leftarrow G \cdot
      \min\left(1, \frac{c}{\hat\sigma(G)}\right), \qquad
      \text{soft:}\quad G \leftarrow \left(I + G G^\top / c^2\right)^{-1/2} G,
      \quad \sigma_i \mapsto \frac{\sigma_i}{\sqrt{1 + \sigma_i^2 / c^2}}

    **Hard.** :math:`\hat\sigma` comes from ``power_iters`` steps a call of the
    power iteration (:math:`u = G v,\ w = G^\top u,\ v \leftarrow w/\lVert w
    \rVert`, :math:`\hat\sigma = \lVert w \rVert / \lVert u \rVert`), warm
    started from the previous step's right-singular vector, kept in the state
    (a small fixed vector is mixed in, so that a gradient orthogonal to the
    previous estimate is still measured). :math:`\hat\sigma` never exceeds
    the true :math:`\sigma_{\max}` and converges to it (geometrically, at the
    rate :math:`(\sigma_2/\sigma_1)^2` an iteration, over the calls of a run
    whose gradients keep their top direction), so the top singular value
    after the clip is at most :math:`c\,\sigma_{\max}/\hat\sigma`: exactly
    :math:`c` once the estimate has converged, somewhat more on the first
    steps, when the top direction jumps, or when the top singular values are
    nearly equal (Muon's orthogonalised updates: use ``mode="soft"`` there).
    The direction of each matrix is kept, and a matrix with
    :math:`\hat\sigma \le c` is returned bit for bit.

    **Soft** (SPECTRA): the map above, computed without an SVD: the inverse
    square root by ``ns_steps`` coupled Newton-Schulz iterations on the Gram
    matrix of the smaller side, scaled by an upper bound on its top eigenvalue
    (the smaller of Gershgorin's bound and the Frobenius norm), as in the
    authors' code. Every singular value is shrunk (none is left exactly) and
    the result's top singular value is below :math:`c`. Newton-Schulz needs
    about :math:`\log(\sigma_{\max}/c) / \log 1.5` steps to converge on the
    singular values below :math:`c`: with ``ns_steps=10`` (SPECTRA's default)
    they come out smaller than the formula says once :math:`\sigma_{\max}`
    is far above :math:`c` (``tests/test_spectral.py``, a 16x8 matrix: by
    up to 15 % at :math:`\sigma_{\max} = 50c`, by half at :math:`100c`;
    exact to 0.1 % at :math:`100c` with 16 steps), as in SPECTRA's code. Costs
    ``3 * ns_steps + 2`` products of matrices of the smaller side a matrix,
    where the hard clip costs ``2 * power_iters`` matrix-vector products. The
    power iteration also runs in this mode, for the statistics. SPECTRA's
    shape factor and threshold schedule are left to the chain
    (:func:`optax.scale`, :func:`optax.inject_hyperparams`).

    **Which leaves.** A leaf of shape ``batch + (m, n)`` with more than two
    dimensions is a stack of matrices (e.g. layers scanned with
    ``nnx.scan``), each clipped on its own (``higher_rank="batch"``), or,
    with ``higher_rank="flatten"``, one ``(prod(shape[:-1]), n)`` matrix (a
    convolution kernel ``(h, w, in, out)`` as its fan-in by fan-out matrix).
    Vectors and scalars (biases, norm scales) are clipped by their 2-norm,
    which is their spectral norm as a ``1 x n`` matrix (``vectors="norm"``),
    or passed through untouched (``vectors="pass"``).

    **Numerics.** Each matrix is divided by a power of two above its largest
    magnitude before the iterations, which run in float32 (float64 for
    float64 leaves): no overflow or underflow at any magnitude (1e30 in
    float32, 300 in float16, bf16 leaves), no NaN at zero gradients, a zero
    threshold gives zeros; the gradient through ``update`` (meta-gradients)
    is finite. Sharding: under ``jit`` a matrix may be split across devices
    (also along explicit mesh axes): the hard clip's matrix-vector products
    become partial sums that XLA combines, and the soft clip gathers each
    split matrix for Newton-Schulz and splits the result as the input was.
    Inside ``shard_map`` or ``pmap`` each device must hold whole matrices
    (for example data-parallel gradients after their ``psum``): there is no
    ``axis_name``, as nothing is measured across leaves.

    Non-finite policy: with ``"propagate"`` only a matrix (or vector) whose
    own values hold a NaN or Inf comes out all NaN; with ``"zero_update"``
    the whole update becomes zeros. The singular-vector estimates of a
    non-finite matrix are kept from the step before.

    Args:
      max_norm: the threshold :math:`c` on each matrix's top singular value
        (a scalar >= 0; may be traced by :func:`optax.inject_hyperparams`).
      mode: ``"hard"`` (default): scale by ``min(1, c / sigma_max)``;
        ``"soft"``: SPECTRA's soft spectral clip.
      power_iters: power-iteration steps per call (>= 1; static: list it in
        the ``static_args`` of :func:`optax.inject_hyperparams`).
      ns_steps: Newton-Schulz iterations of the soft clip (>= 1; static, as
        ``power_iters``; 10 as in SPECTRA).
      vectors: ``"norm"`` (default): clip 1-D and scalar leaves by their
        2-norm (soft: ``g / sqrt(1 + |g|^2 / c^2)``); ``"pass"``: leave them.
      higher_rank: ``"batch"`` (default) or ``"flatten"``, for leaves with
        more than two dimensions (see above).
      nonfinite: ``"propagate"`` (default), ``"zero_update"`` or ``"raise"``.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ClipBySpectralNormState`.

    Example:
      >>> import jax.numpy as jnp, optax_clip
      >>> tx = optax_clip.clip_by_spectral_norm(max_norm=1.0)
      >>> grads = {"w": jnp.array([[3.0, 0.0], [4.0, 0.0]]), "b": jnp.array([0.5])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> clipped["w"]  # rank 1, top singular value 5 -> 1; the direction is kept
      Array([[0.6, 0. ],
             [0.8, 0. ]], dtype=float32)
      >>> clipped["b"]  # a vector: clipped by its norm, here untouched
      Array([0.5], dtype=float32)
      >>> float(state.clip_stats.pre_clip_norm), int(state.clipped_matrices)
      (5.0, 1)

    References:
      Jiang, Semenov and Stich, `Enhancing LLM Training via Spectral Clipping
      <https://arxiv.org/abs/2603.14315>`_, ICML 2026 (SPECTRA; the soft clip
      and its Newton-Schulz iteration, code at
      https://github.com/mlolab/llm-spectral-clipping); Miyato et al.,
      `Spectral Normalization for Generative Adversarial Networks
      <https://arxiv.org/abs/1802.05957>`_, 2018 (one warm-started power
      iteration a step).
    """
    mode = _validation.choice("mode", mode, _MODES)
    vectors = _validation.choice("vectors", vectors, _VECTORS)
    higher_rank = _validation.choice("higher_rank", higher_rank, _HIGHER_RANK)
    power_iters = _validation.static_int("power_iters", power_iters, minimum=1)
    ns_steps = _validation.static_int("ns_steps", ns_steps, minimum=1)
    policy = _validation.policy(nonfinite)
    valid = _validation.nonnegative("max_norm", max_norm)

    def init_fn(params):
        return ClipBySpectralNormState(
            clip_stats=init_clip_stats(max_norm),
            singular_vectors=_initial_vectors(params, higher_rank),
            clipped_matrices=jnp.zeros((), jnp.int32),
            matrix_clip_fraction=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves = [jnp.asarray(x) for x in _validation.float_leaves(updates)]
        vecs, vec_def = jax.tree.flatten(state.singular_vectors)
        _check_vectors(leaves, vecs, higher_rank)
        dtype = _norms.tree_accumulation_dtype(leaves)
        threshold = _apply.threshold_array(max_norm, dtype, valid)
        units = [
            _measure(x, v, threshold, dtype, power_iters, vectors, higher_rank)
            for x, v in zip(leaves, vecs, strict=True)
        ]
        if mode == "hard":
            new_leaves, scales, any_bad = _apply_hard(leaves, units, policy)
        else:
            new_leaves, scales, any_bad = _apply_soft(leaves, units, policy, ns_steps)
        out = jax.tree.unflatten(jax.tree.structure(updates), new_leaves)
        applied, n_clipped, n_matrices = _summary(units, scales, any_bad, policy)
        stats = _apply.record(
            state.clip_stats, applied._replace(updates=out), threshold
        )
        new_vecs = jax.tree.unflatten(vec_def, [u.next_vector for u in units])
        fraction = n_clipped.astype(jnp.float32) / max(n_matrices, 1)
        return out, ClipBySpectralNormState(stats, new_vecs, n_clipped, fraction)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return _fail_fast.wrap(tx, policy, "clip_by_spectral_norm")


def _check_vectors(leaves: list, vecs: list, higher_rank: str) -> None:
    """Raises if the update's leaves do not match the state's (init's) tree."""
    if len(leaves) != len(vecs):
        raise ValueError(
            "clip_by_spectral_norm: the update has "
            f"{len(leaves)} array leaves but the state was initialised for "
            f"{len(vecs)}; call init with parameters of the update's tree."
        )
    for i, (x, v) in enumerate(zip(leaves, vecs, strict=True)):
        mat = _matrix_shape(x.shape, higher_rank)
        want = (0,) if mat is None else mat[:-2] + mat[-1:]
        if tuple(v.shape) != want:
            raise ValueError(
                f"clip_by_spectral_norm: leaf {i} of the update has shape "
                f"{x.shape}, which needs a singular-vector estimate of shape "
                f"{want}, but the state holds one of shape {tuple(v.shape)}; "
                "call init with parameters of the update's tree."
            )


class _Unit(NamedTuple):
    """One leaf, measured: the quantities its clip and statistics need.

    ``sigma_s`` and ``threshold_s`` are the top singular value (or 2-norm) and
    the threshold divided by ``2**e`` (shape ``batch + (1, 1)`` for matrices,
    ``(1,) * ndim`` for other leaves); ``sigma`` is the top singular value
    itself, flattened, for the statistics (float32; empty for passed leaves).
    """

    kind: str  # "matrix", "vector" or "pass"
    sigma_s: jax.Array
    threshold_s: jax.Array
    bad: jax.Array
    sigma: jax.Array
    matrix: _Matrix | None
    next_vector: jax.Array


def _measure(x, v, threshold, dtype, iters, vectors, higher_rank) -> _Unit:
    mat = _matrix_shape(x.shape, higher_rank)
    if mat is not None:
        m = _as_matrix(x, mat, dtype)
        sigma_s, nxt = _power_iteration(m, v, iters)
        bad = m.bad | ~jnp.isfinite(sigma_s)
        nxt = jnp.where(bad[..., 0], v, nxt.astype(v.dtype))
        up1, up2 = _norms.pow2_factors(-m.e, dtype)
        sigma = jnp.where(bad, jnp.nan, (sigma_s * up1) * up2)
        threshold_s = (threshold * m.f1) * m.f2
        kind, matrix = "matrix", m
    else:
        ones = (1,) * x.ndim
        if vectors == "pass":
            bad = ~jnp.all(jnp.isfinite(x)).reshape(ones)
            zero = jnp.zeros(ones, dtype)
            sigma = jnp.zeros((0,), dtype)
            sigma_s, threshold_s, kind = zero, zero + threshold, "pass"
        else:
            (norm,) = _norms.unit_norms([x], [tuple(range(x.ndim))])
            norm = norm.astype(dtype).reshape(ones)
            bad = ~jnp.isfinite(norm)
            sigma_s, sigma = norm, norm
            threshold_s, kind = jnp.broadcast_to(threshold, ones), "vector"
        matrix, nxt = None, v
    return _Unit(
        kind,
        sigma_s,
        threshold_s,
        bad,
        jnp.ravel(sigma).astype(jnp.float32),
        matrix,
        nxt,
    )


def _leaf_view(x: jax.Array, arr: jax.Array) -> jax.Array:
    """A per-matrix array broadcastable to the leaf ``x``.

    ``batch + (1, 1)`` for a stack, ``(1, 1)`` for one matrix, ``(1,) * ndim``
    for other leaves: kept as it is, unless the leaf was flattened into one
    matrix (``(1, 1)`` for a leaf of more dimensions).
    """
    return arr if arr.ndim == x.ndim else arr.reshape((1,) * x.ndim)


def _apply_hard(leaves, units, policy):
    """Scales each matrix by ``min(1, c / sigma)`` (the library's apply step)."""
    if not leaves:
        return [], [], jnp.zeros((), bool)
    pairs = list(zip(leaves, units, strict=True))
    norms = [_leaf_view(x, u.sigma_s) for x, u in pairs]
    thr = [_leaf_view(x, u.threshold_s) for x, u in pairs]
    bad = [_leaf_view(x, u.bad) for x, u in pairs]
    applied, _ = _apply.apply_per_unit(leaves, norms, thr, bad, policy)
    scales = []
    for u in units:
        num, den, _ = _apply.clip_factor(u.sigma_s, u.threshold_s)
        scales.append(_safe_divide(num, den))
    return applied.updates, scales, applied.nonfinite


def _split_spec(x: jax.Array):
    """The spec of ``x`` if it is split along explicit mesh axes, else None."""
    try:
        sharding = jax.typeof(x).sharding
        mesh = sharding.mesh
        if mesh.empty or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
            return None
        spec = sharding.spec
        return spec if any(part is not None for part in spec) else None
    except Exception:  # pragma: no cover - a JAX without sharding in types
        return None


def _reshard(x: jax.Array, spec: Any) -> jax.Array:
    return jax.sharding.reshard(x, spec)


def _apply_soft(leaves, units, policy, steps):
    """SPECTRA's map on matrices, ``1 / sqrt(1 + |g|^2 / c^2)`` on vectors."""
    if not leaves:
        return [], [], jnp.zeros((), bool)
    any_bad = jnp.any(jnp.stack([jnp.any(u.bad) for u in units]))
    fill = 0.0 if policy == "zero_update" else jnp.nan
    out, scales = [], []
    for x, u in zip(leaves, units, strict=True):
        factor = _soft_factor(u.sigma_s, u.threshold_s)
        scales.append(factor)
        if u.kind == "pass":
            y = x
        elif u.kind == "vector":
            one = jnp.ones_like(factor)
            y = _apply.scale_leaf(x, _apply.make_scale(factor, one))
        else:
            m = u.matrix
            spec = _split_spec(x)
            xs = m.scaled() if spec is None else _reshard(m.scaled(), P())
            ys = _soft_matrices(xs, u.threshold_s, steps)
            up1, up2 = _norms.pow2_factors(-m.e, m.x.dtype)
            y = ((ys * up1) * up2).reshape(x.shape).astype(x.dtype)
            y = y if spec is None else _reshard(y, spec)
        bad = _leaf_view(x, u.bad)
        if policy == "zero_update":
            bad = jnp.broadcast_to(any_bad, bad.shape)
        out.append(jnp.where(bad, jnp.asarray(fill, x.dtype), y))
    return out, scales, any_bad


def _summary(units, scales, any_bad, policy):
    """``(Applied, matrices clipped, matrices)``: the inputs of the record step."""
    f32 = jnp.float32
    sig, post, fac, clipped, n_matrices, n_clipped = [], [], [], [], 0, []
    for u, s in zip(units, scales, strict=True):
        if u.kind == "pass":
            continue
        good = ~jnp.ravel(u.bad)
        over = ~(jnp.ravel(u.sigma_s) <= jnp.ravel(u.threshold_s))
        s = jnp.ravel(s).astype(f32)
        sig.append(u.sigma)
        post.append(u.sigma * s)
        fac.append(s)
        clipped.append(jnp.any(over & good))
        if u.kind == "matrix":
            n_matrices += int(np.prod(u.bad.shape))
            n_clipped.append(jnp.sum(over & good, dtype=jnp.int32))
    fill = 0.0 if policy == "zero_update" else jnp.nan
    if sig:
        pre = _collectives.nan_max(jnp.concatenate(sig))
        post_max = _collectives.nan_max(jnp.concatenate(post))
        scale = jnp.min(jnp.concatenate(fac))
        is_clipped = jnp.any(jnp.stack(clipped))
    else:
        pre = post_max = jnp.zeros((), f32)
        scale, is_clipped = jnp.ones((), f32), jnp.zeros((), bool)
    pre = jnp.where(any_bad, jnp.nan, pre)
    post_max = jnp.where(any_bad, fill, post_max)
    scale = jnp.where(any_bad, fill, scale)
    count = sum(n_clipped) if n_clipped else jnp.zeros((), jnp.int32)
    applied = _apply.Applied(None, pre, post_max, scale, is_clipped & ~any_bad, any_bad)
    return applied, jnp.asarray(count, jnp.int32), n_matrices
