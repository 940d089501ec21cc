"""Fused GPU kernels for SpeCa's memory-bound work, with torch fallbacks (same math) for the CPU.

- `accumulate`: a speculative step adds, to a residual stream x, every forecast block's gate * forecast, where
  each forecast is a linear combination of that block's cached Taylor terms. One kernel for all the blocks
  (pointer tables) reads every term once and writes x once, instead of one kernel per term, gate and block.
- `taylor_update`: a full step turns the new features and the old terms into new terms in one pass.
- `forecast_error`: a speculative step's verification, the error of a feature's forecast (a combination of its
  Taylor terms) against the real feature, in one pass that reads each term and the feature once, instead of
  building the forecast and several float32 copies (about 1.3 GB of traffic at FLUX size, 0.4 ms on an H100).
Used on CUDA when Triton is importable (it ships with CUDA builds of torch, not with the CPU wheel), unless the
environment sets SPECLAB_FUSED=0.
"""

from __future__ import annotations

import os

import torch

from .metrics import verification_errors

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None

MAX_TERMS = 5  # Taylor order 4


def _fusable(tensors) -> bool:
    t0 = tensors[0]
    return triton is not None and t0.is_cuda and os.environ.get("SPECLAB_FUSED", "1") != "0" and all(
        t.is_contiguous() and t.dtype == t0.dtype and t.device == t0.device for t in tensors
    )


# ---- accumulate: x + sum_k gate_k * sum_i coef_i * terms_k[i][:, rows_k] ---------------------------------
def torch_accumulate(x, entries, gates, coefs):
    """entries: (terms, gate_index, row_start); gates [G, B, C]; terms [B, N_k, C]."""
    n = x.shape[1]
    for terms, gi, r0 in entries:
        acc = terms[0][:, r0:r0 + n]
        if coefs[0] != 1.0:
            acc = acc * coefs[0]
        for t, c in zip(terms[1:len(coefs)], coefs[1:]):
            acc = torch.add(acc, t[:, r0:r0 + n], alpha=c)
        x = torch.addcmul(x, gates[gi].unsqueeze(1), acc)
    return x


if triton is not None:

    @triton.jit
    def _accumulate_kernel(X, OUT, TPTR, GPTR, ROW, BSTRIDE, c0, c1, c2, c3, c4, NC, C, K,
                           I: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < NC
        ch = offs % C
        dt = X.dtype.element_ty
        acc = tl.load(X + b * NC + offs, mask=mask).to(tl.float32)
        for k in range(K):
            g_ptr = tl.load(GPTR + k).to(tl.pointer_type(dt))
            g = tl.load(g_ptr + b * C + ch, mask=mask).to(tl.float32)
            base = b * tl.load(BSTRIDE + k) + tl.load(ROW + k) + offs
            s = tl.load(tl.load(TPTR + k * I).to(tl.pointer_type(dt)) + base, mask=mask).to(tl.float32) * c0
            if I > 1:
                s += tl.load(tl.load(TPTR + k * I + 1).to(tl.pointer_type(dt)) + base, mask=mask).to(tl.float32) * c1
            if I > 2:
                s += tl.load(tl.load(TPTR + k * I + 2).to(tl.pointer_type(dt)) + base, mask=mask).to(tl.float32) * c2
            if I > 3:
                s += tl.load(tl.load(TPTR + k * I + 3).to(tl.pointer_type(dt)) + base, mask=mask).to(tl.float32) * c3
            if I > 4:
                s += tl.load(tl.load(TPTR + k * I + 4).to(tl.pointer_type(dt)) + base, mask=mask).to(tl.float32) * c4
            acc += g * s
        tl.store(OUT + b * NC + offs, acc.to(dt), mask=mask)


def accumulate(x: torch.Tensor, entries, gates: torch.Tensor, coefs: list[float]) -> torch.Tensor:
    if not entries:
        return x
    I = len(coefs)
    flat = [t for terms, _, _ in entries for t in terms[:I]]
    if I > MAX_TERMS or not _fusable([x.contiguous(), gates, *flat]):
        return torch_accumulate(x, entries, gates, coefs)
    x = x.contiguous()
    B, n, C = x.shape
    gstride = gates.stride(0) * gates.element_size()
    tptr, gptr, row, bstride = [], [], [], []
    for terms, gi, r0 in entries:
        tptr += [t.data_ptr() for t in terms[:I]]
        gptr.append(gates.data_ptr() + gi * gstride)
        row.append(r0 * C)
        bstride.append(terms[0].shape[1] * C)
    # Pinned + non_blocking: the copy joins the stream without stalling the host (the caching host
    # allocator keeps the buffer until the copy is done).
    table = torch.tensor(tptr + gptr + row + bstride, dtype=torch.int64).pin_memory().to(x.device, non_blocking=True)
    K = len(entries)
    t_tab, g_tab = table[: K * I], table[K * I: K * I + K]
    r_tab, s_tab = table[K * I + K: K * I + 2 * K], table[K * I + 2 * K:]
    cs = [float(c) for c in coefs] + [0.0] * (MAX_TERMS - I)
    out = torch.empty_like(x)
    block = 1024
    grid = (triton.cdiv(n * C, block), B)
    _accumulate_kernel[grid](x, out, t_tab, g_tab, r_tab, s_tab, *cs, n * C, C, K, I=I, BLOCK=block)
    return out


# ---- add_terms: x + sum_i coef_i * terms[i] (the stack forecast added to a stream) ---------------------------
def add_terms(x: torch.Tensor, terms: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
    """A new tensor x + sum_i coefs[i] * terms[i], in x's dtype (terms may be kept in another dtype).
    One torch op per term: at order 1 this is two passes over a stream, a few tens of microseconds at FLUX size
    on an H100, against milliseconds for the block that runs next (no fused kernel needed)."""
    out = torch.add(x, terms[0], alpha=coefs[0]) if terms[0].dtype == x.dtype else x + coefs[0] * terms[0].to(x.dtype)
    for t, c in zip(terms[1:len(coefs)], coefs[1:]):
        out.add_(t if t.dtype == x.dtype else t.to(x.dtype), alpha=c)
    return out


# ---- taylor_update: new terms from the new features and the old terms -------------------------------------
def torch_taylor_update(f, old, inv):
    new = [f]
    for i, v in enumerate(inv):
        new.append((new[i] - old[i]) * v)
    return new


if triton is not None:

    @triton.jit
    def _taylor_update_kernel(F, O0, O1, O2, O3, N1, N2, N3, N4, v0, v1, v2, v3, NE,
                              M: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < NE
        dt = F.dtype.element_ty
        cur = tl.load(F + offs, mask=mask).to(tl.float32)
        cur = (cur - tl.load(O0 + offs, mask=mask).to(tl.float32)) * v0
        tl.store(N1 + offs, cur.to(dt), mask=mask)
        if M > 1:
            cur = (cur - tl.load(O1 + offs, mask=mask).to(tl.float32)) * v1
            tl.store(N2 + offs, cur.to(dt), mask=mask)
        if M > 2:
            cur = (cur - tl.load(O2 + offs, mask=mask).to(tl.float32)) * v2
            tl.store(N3 + offs, cur.to(dt), mask=mask)
        if M > 3:
            cur = (cur - tl.load(O3 + offs, mask=mask).to(tl.float32)) * v3
            tl.store(N4 + offs, cur.to(dt), mask=mask)


def taylor_update(f: torch.Tensor, old: list[torch.Tensor], inv: list[float]) -> list[torch.Tensor]:
    """[f, (f - old0) * inv0, ((f - old0) * inv0 - old1) * inv1, ...] — len(inv) higher terms.
    The new terms go to fresh buffers (the old ones are dropped), so nothing is read after it is written."""
    M = len(inv)
    if M == 0:
        return [f]
    if M > MAX_TERMS - 1 or not _fusable([f, *old[:M]]):
        return torch_taylor_update(f, old, inv)
    news = [torch.empty_like(f) for _ in range(M)]
    olds = list(old[:M]) + [f] * (4 - M)
    outs = news + [f] * (4 - M)
    vs = [float(v) for v in inv] + [0.0] * (4 - M)
    block = 1024
    _taylor_update_kernel[(triton.cdiv(f.numel(), block),)](f, *olds, *outs, *vs, f.numel(), M=M, BLOCK=block)
    return [f] + news


# ---- forecast_error: verification error of sum_i coef_i * terms[i] against the real feature ----------------
N_SUMS = 8  # per row: sum |d|/(|r|+eps), sum |d|, sum |r|, sum d^2, sum r^2, sum p*r, sum p^2, sum (|d|/(|r|+eps))^2


def torch_forecast(terms: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
    """sum_i coefs[i] * terms[i], in the terms' dtype."""
    p = terms[0] if coefs[0] == 1.0 else terms[0] * coefs[0]
    for t, c in zip(terms[1:len(coefs)], coefs[1:]):
        p = torch.add(p, t, alpha=c)
    return p


if triton is not None:

    @triton.jit
    def _forecast_error_kernel(T0, T1, T2, T3, T4, R, OUT, c0, c1, c2, c3, c4, C, eps,
                               I: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * C
        rel = tl.zeros([BLOCK], dtype=tl.float32)
        rel2 = tl.zeros([BLOCK], dtype=tl.float32)
        s_ad = tl.zeros([BLOCK], dtype=tl.float32)
        s_ar = tl.zeros([BLOCK], dtype=tl.float32)
        s_dd = tl.zeros([BLOCK], dtype=tl.float32)
        s_rr = tl.zeros([BLOCK], dtype=tl.float32)
        s_pr = tl.zeros([BLOCK], dtype=tl.float32)
        s_pp = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < C
            p = tl.load(T0 + base + offs, mask=mask, other=0.0).to(tl.float32) * c0
            if I > 1:
                p += tl.load(T1 + base + offs, mask=mask, other=0.0).to(tl.float32) * c1
            if I > 2:
                p += tl.load(T2 + base + offs, mask=mask, other=0.0).to(tl.float32) * c2
            if I > 3:
                p += tl.load(T3 + base + offs, mask=mask, other=0.0).to(tl.float32) * c3
            if I > 4:
                p += tl.load(T4 + base + offs, mask=mask, other=0.0).to(tl.float32) * c4
            r = tl.load(R + base + offs, mask=mask, other=0.0).to(tl.float32)
            d = p - r
            ad = tl.abs(d)
            ar = tl.abs(r)
            q = tl.where(mask, ad / (ar + eps), 0.0)
            rel += q
            rel2 += q * q
            s_ad += ad
            s_ar += ar
            s_dd += d * d
            s_rr += r * r
            s_pr += p * r
            s_pp += p * p
        out = OUT + row * 8
        tl.store(out, tl.sum(rel, axis=0))
        tl.store(out + 1, tl.sum(s_ad, axis=0))
        tl.store(out + 2, tl.sum(s_ar, axis=0))
        tl.store(out + 3, tl.sum(s_dd, axis=0))
        tl.store(out + 4, tl.sum(s_rr, axis=0))
        tl.store(out + 5, tl.sum(s_pr, axis=0))
        tl.store(out + 6, tl.sum(s_pp, axis=0))
        tl.store(out + 7, tl.sum(rel2, axis=0))


def row_sums(terms: list[torch.Tensor], coefs: list[float], real: torch.Tensor, eps: float) -> torch.Tensor:
    """Per row of `real` ([B, N, C], contiguous): the sums `forecast_error` needs, float32 [B, N, N_SUMS], from
    one Triton pass (the caller checks that Triton can run on these tensors)."""
    I = len(coefs)
    B, N, C = real.shape
    out = torch.empty(B, N, N_SUMS, device=real.device, dtype=torch.float32)
    ts = list(terms[:I]) + [terms[0]] * (MAX_TERMS - I)
    cs = [float(c) for c in coefs] + [0.0] * (MAX_TERMS - I)
    block = min(1024, triton.next_power_of_2(C))
    _forecast_error_kernel[(B * N,)](*ts, real, out, *cs, C, float(eps), I=I, BLOCK=block)
    return out


def errors_from_sums(sums: torch.Tensor, n_channels: int, metric: str, eps: float,
                     image_rows: slice | None = None,
                     whole_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-sample error [B] ([1] with whole_batch), per-token map of the image rows or None) from `row_sums`;
    the definitions of `metrics.verification_errors`."""
    tok = None
    if image_rows is not None:
        img = sums[:, image_rows]
        tok = ((img[..., 1] / n_channels) / (img[..., 2] / n_channels + eps)).mean(dim=0)
    total = sums.sum(dim=1)  # [B, N_SUMS]
    n = sums.shape[1] * n_channels
    if whole_batch and metric != "cosine":
        total, n = total.sum(dim=0, keepdim=True), n * sums.shape[0]
    if metric == "rel_l1":
        err = total[:, 0] / n
    elif metric == "rel_rms":
        err = (total[:, 7] / n).sqrt()
    elif metric == "rel_l2":
        err = total[:, 3].sqrt() / (total[:, 4].sqrt() + eps)
    elif metric == "cosine":
        err = 1.0 - total[:, 5] / (total[:, 6].sqrt().clamp_min(eps) * total[:, 4].sqrt().clamp_min(eps))
        if whole_batch:
            err = err.mean(dim=0, keepdim=True)
    else:
        raise ValueError(f"metric={metric!r} is unknown: use one of rel_l1, rel_rms, rel_l2, cosine")
    return err, tok


def forecast_error(terms: list[torch.Tensor], coefs: list[float], real: torch.Tensor, metric: str, eps: float,
                   image_rows: slice | None = None,
                   whole_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Verification of the forecast sum_i coefs[i] * terms[i] against `real` ([B, N, C]): (per-sample error
    [B] ([1] with whole_batch), per-token map of `image_rows` or None), as `metrics.verification_errors`
    defines them. Fused on CUDA (the forecast is formed in float32 inside the kernel, never stored); the torch
    path builds the forecast."""
    I = len(coefs)
    if real.dim() == 3 and I <= MAX_TERMS and _fusable([real, *terms[:I]]):
        return errors_from_sums(row_sums(terms, coefs, real, eps), real.shape[-1], metric, eps, image_rows,
                                whole_batch)
    return verification_errors(torch_forecast(terms, coefs), real, metric, eps, image_rows, whole_batch)
