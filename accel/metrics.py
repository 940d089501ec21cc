"""Verification error metrics, one value per sample (dim 0 is the batch), and the per-token error map."""

from __future__ import annotations

import torch


def verification_errors(pred: torch.Tensor, real: torch.Tensor, metric: str, eps: float,
                        image_rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-sample error [batch], per-token relative L1 map of the image rows [tokens] or None).
    Both come from one float32 difference, in place where possible: this runs on every speculative step."""
    p = pred.float()
    r = real.float()
    diff = p.sub_(r) if p is not pred else p - r  # p is a fresh copy unless pred was already float32
    tok = None
    if image_rows is not None:
        d = diff[:, image_rows].abs().mean(dim=-1)
        tok = (d / (r[:, image_rows].abs().mean(dim=-1) + eps)).mean(dim=0)
    if metric == "rel_l1":
        # elementwise relative L1, as the reference code: mean(|p - r| / (|r| + eps))
        err = diff.abs_().div_(r.abs().add_(eps)).flatten(1).mean(dim=1)
    elif metric == "rel_l2":
        err = diff.flatten(1).norm(dim=1) / (r.flatten(1).norm(dim=1) + eps)
    elif metric == "cosine":
        err = 1.0 - torch.nn.functional.cosine_similarity(pred.float().flatten(1), r.flatten(1), dim=1, eps=eps)
    else:
        raise ValueError(f"metric={metric!r} is unknown: use one of rel_l1, rel_l2, cosine")
    return err, tok


def per_sample_error(pred: torch.Tensor, real: torch.Tensor, metric: str, eps: float) -> torch.Tensor:
    """Error of a forecast against the real features, shape [batch], float32."""
    return verification_errors(pred, real, metric, eps)[0]
