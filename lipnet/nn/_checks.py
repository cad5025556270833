"""Input checks shared by the layers: a clear error instead of a silent NaN or a shape crash.

The finiteness check costs one host sync per checked layer; on GPU training loops call
``set_input_checks(False)`` once the pipeline is trusted (weights are still validated by the core).
"""

from __future__ import annotations

import torch

from ..validate import positive_int

_enabled = True


def set_input_checks(enabled: bool) -> None:
    """Turn the per-layer input checks (shape, channels, finiteness) on or off globally."""
    global _enabled
    _enabled = bool(enabled)


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def plain_eager() -> bool:
    """True outside torch.compile tracing and torch.func transforms: where lipnet's hand-written
    autograd Functions (faster backward passes) run. Inside either, the layers take their composite
    form, which dynamo traces without a graph break and torch.func differentiates in both modes."""
    if torch.compiler.is_compiling():
        return False
    return not _functorch_active()


def input_checks_enabled() -> bool:
    """Whether the per-layer input checks are on (see :func:`set_input_checks`)."""
    return _enabled


def check_channels(in_channels: int, out_channels: int, groups: int) -> None:
    """Raise ValueError unless the three are positive ints and ``groups`` divides both channel counts
    (the convolutions' construction-time check)."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        positive_int(v, name)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}")


def check_input(x: torch.Tensor, layer: str, *, channels: int, ndims: tuple[int, ...]) -> None:
    """Raise ValueError naming ``layer`` unless ``x`` has a dim in ``ndims``, ``channels`` channels
    (dim 1 when batched, dim 0 otherwise) and only finite values."""
    if not _enabled or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: expected a tensor input, got {type(x).__name__}")
    if x.dim() not in ndims:
        raise ValueError(f"{layer}: expected a {' or '.join(map(str, ndims))}-D input, got shape {tuple(x.shape)}")
    channel_dim = 1 if x.dim() == max(ndims) else 0
    if x.shape[channel_dim] != channels:
        raise ValueError(
            f"{layer}: expected {channels} channels/features in dim {channel_dim}, got shape {tuple(x.shape)}"
        )
    # The sum is NaN/inf whenever an entry is, and a reduction is ~40x cheaper than isfinite().all()
    # on CPU (0.28 vs 11 ms for 64x64x32x32 at 1 thread); the exact test only runs if the sum is
    # not finite (it may overflow on huge finite inputs, which then pass).
    # Under torch.func transforms (vmap of per-sample gradients) a data-dependent test is not allowed;
    # those calls re-run a model that already passed the checks on the same data.
    if _functorch_active():
        return
    if not torch.isfinite(x.detach().sum()) and not torch.isfinite(x).all():
        raise ValueError(f"{layer}: input contains NaN or inf")
