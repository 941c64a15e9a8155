"""Likelihood helpers for the variational-bound term of the diffusion loss."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Half the width of one of the 256 quantisation bins covering [-1, 1].
_HALF_BIN = 1.0 / 255.0
_LOG_FLOOR = 1e-12


def mean_flat(t: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over every dimension except the batch dimension; with ``weight`` (broadcastable to ``t``, e.g. a
    (B, 1, H, W) mask of the pixels that count), the weighted mean."""
    if weight is None:
        return t.reshape(t.shape[0], -1).mean(dim=1)
    weight = weight.expand_as(t).reshape(t.shape[0], -1)
    return (t.reshape(t.shape[0], -1) * weight).sum(dim=1) / weight.sum(dim=1)


def normal_kl(
    mean1: Tensor | float,
    logvar1: Tensor | float,
    mean2: Tensor | float,
    logvar2: Tensor | float,
) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    ref = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor))
    mean1, logvar1, mean2, logvar2 = (
        a if isinstance(a, Tensor) else torch.tensor(a, dtype=ref.dtype, device=ref.device)
        for a in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Standard normal CDF via the tanh approximation used by GELU."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-probability of 8-bit data in [-1, 1] under a binned Gaussian."""
    inv_std = torch.exp(-log_scales)
    centered = x - means
    cdf_upper = approx_standard_normal_cdf((centered + _HALF_BIN) * inv_std)
    cdf_lower = approx_standard_normal_cdf((centered - _HALF_BIN) * inv_std)

    # The outermost bins absorb all mass beyond the data range.
    log_first_bin = torch.log(cdf_upper.clamp(min=_LOG_FLOOR))
    log_last_bin = torch.log((1.0 - cdf_lower).clamp(min=_LOG_FLOOR))
    log_inner_bin = torch.log((cdf_upper - cdf_lower).clamp(min=_LOG_FLOOR))

    return torch.where(
        x < -0.999,
        log_first_bin,
        torch.where(x > 0.999, log_last_bin, log_inner_bin),
    )
