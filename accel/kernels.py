"""One fused GPU kernel for speculative steps: out = x + gate * sum_i c_i * T_i.

A forecast block adds `gate * forecast` to the residual stream, and the forecast is a linear combination of the
cached Taylor terms. Done with torch ops that is one kernel per term plus one for the gate, each reading and
writing a full-size tensor; fused it reads every term once and writes the output once, in float32 registers.
Used on CUDA when Triton is importable; `forecast_add` falls back to torch ops elsewhere (same math).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch, not with the CPU wheel.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None

MAX_TERMS = 5  # order 4


def torch_forecast_add(x, gate, terms, coefs, rows: slice | None = None):
    rows = rows if rows is not None else slice(None)
    acc = terms[0][:, rows] if coefs[0] == 1.0 else terms[0][:, rows] * coefs[0]
    for t, c in zip(terms[1:], coefs[1:]):
        acc = torch.add(acc, t[:, rows], alpha=c)
    return torch.addcmul(x, gate, acc)


if triton is not None:

    @triton.jit
    def _forecast_add_kernel(X, G, OUT, T0, T1, T2, T3, T4, c0, c1, c2, c3, c4,
                             NC, C, t_batch_stride, t_offset, I: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < NC
        x = tl.load(X + b * NC + offs, mask=mask).to(tl.float32)
        g = tl.load(G + b * C + offs % C, mask=mask).to(tl.float32)
        t = b * t_batch_stride + t_offset + offs
        s = tl.load(T0 + t, mask=mask).to(tl.float32) * c0
        if I > 1:
            s += tl.load(T1 + t, mask=mask).to(tl.float32) * c1
        if I > 2:
            s += tl.load(T2 + t, mask=mask).to(tl.float32) * c2
        if I > 3:
            s += tl.load(T3 + t, mask=mask).to(tl.float32) * c3
        if I > 4:
            s += tl.load(T4 + t, mask=mask).to(tl.float32) * c4
        tl.store(OUT + b * NC + offs, (x + g * s).to(OUT.dtype.element_ty), mask=mask)


def can_fuse(x: torch.Tensor, terms: list[torch.Tensor]) -> bool:
    return (
        triton is not None and x.is_cuda and x.dim() == 3 and len(terms) <= MAX_TERMS
        and all(t.is_contiguous() and t.shape == terms[0].shape and t.dtype == terms[0].dtype for t in terms)
    )


def forecast_add(x, gate, terms, coefs, rows: slice | None = None):
    """x + gate * sum_i coefs[i] * terms[i][:, rows]; x [B, n, C], gate [B, 1, C], terms [B, N, C]."""
    if not can_fuse(x, terms):
        return torch_forecast_add(x, gate, terms, coefs, rows)
    B, N, C = terms[0].shape
    start = 0 if rows is None or rows.start is None else rows.start
    n = x.shape[1]
    x = x.contiguous()
    g = gate.reshape(B, C).contiguous()
    out = torch.empty_like(x)
    ts = list(terms) + [terms[0]] * (MAX_TERMS - len(terms))
    cs = [float(c) for c in coefs] + [0.0] * (MAX_TERMS - len(coefs))
    block = 1024
    grid = (triton.cdiv(n * C, block), B)
    _forecast_add_kernel[grid](x, g, out, *ts, *cs, n * C, C, N * C, start * C, I=len(terms), BLOCK=block)
    return out
