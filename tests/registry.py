"""Every public transform of optax_clip, described once for the contract suite.

Add a ``Case`` here for each new public transform; ``test_public_api`` fails if
a public factory has no case, and ``test_contract`` runs every case through the
same checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import optax_clip as oc


@dataclasses.dataclass(frozen=True)
class Case:
    """How to build one public transform for the contract checks.

    Attributes:
      name: the public factory's name (``optax_clip.<name>``).
      make: builds the transform from keyword overrides of ``kwargs``.
      kwargs: default keyword arguments.
      threshold: name of the argument that bounds the output (set to 0 in the
        ``max_norm=0`` check and traced in the ``inject_hyperparams`` check),
        or None when the transform has none.
      bound: a function of the kwargs giving the largest output norm (2-norm,
        global) the transform promises, or None.
      needs_params: whether ``update`` needs ``params``.
      policy: the non-finite policy the case runs with by default (propagate
        or zero_update); ``"skip"`` for wrappers that skip the step.
      inject_static: argument names to keep static under inject_hyperparams.
      wrapper: True for transforms that wrap an inner optimizer.
      extra_args: extra keyword arguments for ``update``.
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    kwargs: dict = dataclasses.field(default_factory=dict)
    threshold: str | None = None
    bound: Callable[[dict], float] | None = None
    needs_params: bool = False
    policy: str = "propagate"
    inject_static: tuple = ()
    wrapper: bool = False
    extra_args: dict = dataclasses.field(default_factory=dict)

    def build(self, **overrides: Any) -> optax.GradientTransformation:
        return self.make(**{**self.kwargs, **overrides})

    @property
    def all_kwargs(self) -> dict:
        return dict(self.kwargs)


def _global(kw):
    return kw["max_norm"]


def _sqrt_leaves_bound(n_leaves: int):
    return lambda kw: kw["max_norm"] * n_leaves**0.5


CASES: list[Case] = [
    Case(
        "clip_by_global_norm",
        oc.clip_by_global_norm,
        {"max_norm": 1.0},
        threshold="max_norm",
        bound=_global,
    ),
    Case(
        "clip_by_block_norm",
        oc.clip_by_block_norm,
        {"max_norm": 1.0},
        threshold="max_norm",
        # Each of the (at most 3) leaves of the contract trees is bounded.
        bound=_sqrt_leaves_bound(3),
    ),
    Case(
        "clip_by_block_rms",
        oc.clip_by_block_rms,
        {"max_rms": 1.0},
        threshold="max_rms",
        bound=None,  # per leaf: max_rms * sqrt(leaf size)
    ),
    Case(
        "clip_by_spectral_norm",
        oc.clip_by_spectral_norm,
        {"max_norm": 1.0},
        threshold="max_norm",
        # The contract trees: a 4x3 matrix (Frobenius norm at most sqrt(3)
        # times its top singular value, clipped to max_norm), a vector and a
        # scalar (clipped by their norms). The top singular value is estimated
        # from below, which tests/test_spectral.py bounds.
        bound=lambda kw: kw["max_norm"] * 5**0.5,
        inject_static=("power_iters", "ns_steps"),
    ),
    Case(
        "clip_by_value",
        oc.clip_by_value,
        {"max_delta": 1.0},
        threshold="max_delta",
        bound=None,
    ),
    Case(
        "soft_clip_by_global_norm",
        oc.soft_clip_by_global_norm,
        {"max_norm": 1.0},
        threshold="max_norm",
        bound=_global,
    ),
]


# Adaptive thresholds and training-step guards (issue 3).


def _skip_nonfinite(max_norm=1.0):
    """skip_nonfinite around a clip, so the threshold checks apply to it."""
    return oc.skip_nonfinite(oc.clip_by_global_norm(max_norm))


def _skip_on_spike(max_norm=1.0, window=8, sigma=6.0):
    """skip_on_spike around a clip; inactive for the contract's first steps."""
    return oc.skip_on_spike(oc.clip_by_global_norm(max_norm), window, sigma)


CASES += [
    Case(
        "autoclip",
        oc.autoclip,
        {"percentile": 10.0, "history": 16, "max_norm": 1.0},
        threshold="max_norm",
        bound=_global,
        inject_static=("history",),
    ),
    Case(
        "zclip",
        oc.zclip,
        # A short warm-up, so that the contract's few steps also reach the
        # z-score phase; max_norm bounds every phase.
        {"max_norm": 1.0, "warmup_steps": 2},
        threshold="max_norm",
        bound=_global,
    ),
    Case(
        "adagc",
        oc.adagc,
        # The contract's few steps are all warm-up (global clip to max_norm);
        # tests/test_adaptive.py covers the per-tensor phase.
        {"max_norm": 1.0},
        threshold="max_norm",
        bound=_global,
    ),
    Case(
        "adaptive_grad_clip",
        oc.adaptive_grad_clip,
        # Units are clipped separately, which changes the direction of a leaf
        # as soon as two units of it are clipped; with clipping=100 (and the
        # contract's params of 0.5) only a unit holding a huge value is, so
        # the direction check stays meaningful.
        {"clipping": 100.0},
        threshold="clipping",
        bound=None,
        needs_params=True,
    ),
    Case(
        "skip_nonfinite",
        _skip_nonfinite,
        {"max_norm": 1.0},
        threshold="max_norm",
        bound=_global,
        policy="skip",
        wrapper=True,
    ),
    Case(
        "skip_on_spike",
        _skip_on_spike,
        {"max_norm": 1.0, "window": 8, "sigma": 6.0},
        threshold="max_norm",
        bound=_global,
        policy="skip",
        inject_static=("window",),
        wrapper=True,
    ),
]


# Per-coordinate clips (issue 18).


def _moments_only():
    """Records Adam's moments (b2=0.9) and returns the gradient it is given.

    Inside ``spam_clip`` it makes the wrapper's output the clipped gradient,
    so that the clip's contract is what the checks see.
    """
    adam = optax.scale_by_adam(b2=0.9)
    return optax.GradientTransformation(
        adam.init, lambda u, s, p=None: (u, adam.update(u, s, p)[1])
    )


def _spam_clip(theta=5000.0, warmup_steps=1, nonfinite="propagate", axis_name=None):
    """spam_clip around ``_moments_only``: on from the second step."""
    return oc.spam_clip(
        _moments_only(),
        theta,
        warmup_steps=warmup_steps,
        nonfinite=nonfinite,
        axis_name=axis_name,
    )


CASES += [
    Case(
        "spam_clip",
        _spam_clip,
        {"theta": 5000.0, "warmup_steps": 1},
        threshold="theta",
        bound=None,  # per coordinate: sqrt(theta * v)
    ),
    Case(
        "adaclip",
        oc.adaclip,
        {"theta": 0.999},
        threshold=None,  # theta is an EMA decay in [0, 1), not a bound
        bound=None,
    ),
    Case(
        "adagn",
        oc.adagn,
        {"gamma1": 0.7, "gamma2": 0.9},
        threshold=None,  # normalizes every step: no bound, no identity region
        bound=None,
    ),
]

# Update clipping (issue 18): placed after the optimizer; stable_adamw is an
# optimizer (tests/test_public_api.py's OPTIMIZERS), tested in test_update.py.

CASES += [
    Case(
        "clip_update_by_history",
        oc.clip_update_by_history,
        # A short window, so that the contract's few steps also reach the
        # phase where the window clips; max_norm bounds every phase.
        {"window": 4, "max_norm": 1.0},
        threshold="max_norm",
        bound=_global,
        inject_static=("window",),
    ),
    Case(
        "clip_update_by_param_norm",
        oc.clip_update_by_param_norm,
        # With the contract's params of 0.5, only a leaf holding a huge value
        # is clipped at a ratio of 100.
        {"max_ratio": 100.0},
        threshold="max_ratio",
        bound=None,
        needs_params=True,
    ),
]

CASES_BY_NAME = {c.name: c for c in CASES}
