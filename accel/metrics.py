"""Verification error metrics, one value per sample (dim 0 is the batch), and the per-token error map."""

from __future__ import annotations

import torch


def verification_errors(pred: torch.Tensor, real: torch.Tensor, metric: str, eps: float,
                        image_rows: slice | None = None,
                        whole_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-sample error [batch], per-token relative L1 map of the image rows [tokens] or None).
    Both come from one float32 difference, in place where possible: this runs on every speculative step.

    Metrics (d = pred - real, r = real; means and norms over every element of a sample):
    - rel_l1: mean(|d| / (|r| + eps)), the released SpeCa code's "relative L1";
    - rel_rms: sqrt(mean((|d| / (|r| + eps))**2)), the released code's "relative L2" (the root mean square of
      the same elementwise ratio);
    - rel_l2: ||d|| / (||r|| + eps), a ratio of norms;
    - cosine: 1 - cos(pred, real).
    whole_batch: one error for the whole batch ([1]), as the released code takes it: rel_l1 / rel_rms / rel_l2
    over every element of the batch, cosine as 1 - the samples' mean cosine."""
    p = pred.float()
    r = real.float()
    diff = p.sub_(r) if p is not pred else p - r  # p is a fresh copy unless pred was already float32
    tok = None
    if image_rows is not None:
        d = diff[:, image_rows].abs().mean(dim=-1)
        tok = (d / (r[:, image_rows].abs().mean(dim=-1) + eps)).mean(dim=0)
    rows = (lambda t: t.reshape(1, -1)) if whole_batch else (lambda t: t.flatten(1))
    if metric == "rel_l1":
        # elementwise relative L1, as the reference code: mean(|p - r| / (|r| + eps))
        err = rows(diff.abs_().div_(r.abs().add_(eps))).mean(dim=1)
    elif metric == "rel_rms":
        err = rows(diff.abs_().div_(r.abs().add_(eps)).square_()).mean(dim=1).sqrt_()
    elif metric == "rel_l2":
        err = rows(diff).norm(dim=1) / (rows(r).norm(dim=1) + eps)
    elif metric == "cosine":
        err = 1.0 - torch.nn.functional.cosine_similarity(pred.float().flatten(1), r.flatten(1), dim=1, eps=eps)
        if whole_batch:
            err = err.mean(dim=0, keepdim=True)
    else:
        raise ValueError(f"metric={metric!r} is unknown: use one of rel_l1, rel_rms, rel_l2, cosine")
    return err, tok


def per_sample_error(pred: torch.Tensor, real: torch.Tensor, metric: str, eps: float,
                     whole_batch: bool = False) -> torch.Tensor:
    """Error of a forecast against the real features, shape [batch] ([1] with whole_batch), float32."""
    return verification_errors(pred, real, metric, eps, whole_batch=whole_batch)[0]
