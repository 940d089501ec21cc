"""Verification error metrics, one value per sample (dim 0 is the batch)."""

from __future__ import annotations

import torch


def per_sample_error(pred: torch.Tensor, real: torch.Tensor, metric: str, eps: float) -> torch.Tensor:
    """Error of a forecast against the real features, shape [batch], float32."""
    p = pred.float().flatten(1)
    r = real.float().flatten(1)
    if metric == "rel_l1":
        # elementwise relative L1, as the reference code: mean(|p - r| / (|r| + eps))
        return ((p - r).abs() / (r.abs() + eps)).mean(dim=1)
    if metric == "rel_l2":
        return (p - r).norm(dim=1) / (r.norm(dim=1) + eps)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(p, r, dim=1, eps=eps)
    raise ValueError(f"metric={metric!r} is unknown: use one of rel_l1, rel_l2, cosine")


def per_token_error(pred: torch.Tensor, real: torch.Tensor, eps: float) -> torch.Tensor:
    """Relative L1 per token, averaged over the batch and channels: [tokens]. For the error heatmap."""
    p = pred.float()
    r = real.float()
    return ((p - r).abs().mean(dim=-1) / (r.abs().mean(dim=-1) + eps)).mean(dim=0)
