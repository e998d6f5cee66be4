"""optax_clip: correct, observable and fast gradient clipping for JAX and Optax.

Every method is an :class:`optax.GradientTransformation` over arbitrary pytrees;
chain it before your optimizer::

  tx = optax.chain(optax_clip.clip_by_global_norm(1.0), optax.adamw(1e-3))

and read what it did with :func:`optax_clip.get_stats`.
"""

from optax_clip._adaptive import (
    AdaGCState,
    AutoClipState,
    MaxNormSuggestion,
    ZClipState,
    adagc,
    autoclip,
    suggest_max_norm,
    zclip,
)
from optax_clip._agc import (
    AdaptiveGradClipState,
    adaptive_grad_clip,
    unitwise_clip,
    unitwise_norm,
)
from optax_clip._coordinate import AdaClipState, SpamClipState, adaclip, spam_clip
from optax_clip._guards import (
    SkipNonfiniteState,
    SkipOnSpikeState,
    skip_nonfinite,
    skip_on_spike,
)
from optax_clip._normalization import AdaGNState, adagn
from optax_clip._per_example import (
    per_example_global_norm_clip,
    per_example_layer_norm_clip,
)
from optax_clip._skippable import adam, adamw, scale_by_adam, sgd
from optax_clip._spectral import ClipBySpectralNormState, clip_by_spectral_norm
from optax_clip._static import (
    ClipByBlockNormState,
    ClipByBlockRMSState,
    ClipByGlobalNormState,
    ClipByValueState,
    SoftClipByGlobalNormState,
    clip_by_block_norm,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_value,
    soft_clip_by_global_norm,
)
from optax_clip._stats import ClipStats, get_stats
from optax_clip._update import (
    ClipUpdateByHistoryState,
    ClipUpdateByParamNormState,
    StableAdamWState,
    clip_update_by_history,
    clip_update_by_param_norm,
    stable_adamw,
)
from optax_clip._validation import NonFinitePolicy

__version__ = "0.1.0"

__all__ = (
    "AdaClipState",
    "AdaGCState",
    "AdaGNState",
    "AdaptiveGradClipState",
    "AutoClipState",
    "ClipByBlockNormState",
    "ClipByBlockRMSState",
    "ClipByGlobalNormState",
    "ClipBySpectralNormState",
    "ClipByValueState",
    "ClipStats",
    "ClipUpdateByHistoryState",
    "ClipUpdateByParamNormState",
    "MaxNormSuggestion",
    "NonFinitePolicy",
    "SkipNonfiniteState",
    "SkipOnSpikeState",
    "SoftClipByGlobalNormState",
    "SpamClipState",
    "StableAdamWState",
    "ZClipState",
    "adaclip",
    "adagc",
    "adagn",
    "adam",
    "adamw",
    "adaptive_grad_clip",
    "autoclip",
    "clip_by_block_norm",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_spectral_norm",
    "clip_by_value",
    "clip_update_by_history",
    "clip_update_by_param_norm",
    "get_stats",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
    "scale_by_adam",
    "sgd",
    "skip_nonfinite",
    "skip_on_spike",
    "soft_clip_by_global_norm",
    "spam_clip",
    "stable_adamw",
    "suggest_max_norm",
    "unitwise_clip",
    "unitwise_norm",
    "zclip",
)
