"""Fused GPU kernels for SpeCa's memory-bound work, with torch fallbacks (same math) for the CPU.

- `accumulate`: a speculative step adds, to a residual stream x, every forecast block's gate * forecast, where
  each forecast is a linear combination of that block's cached Taylor terms. One kernel for all the blocks
  (pointer tables) reads every term once and writes x once, instead of one kernel per term, gate and block.
- `taylor_update`: a full step turns the new features and the old terms into new terms in one pass.
Used on CUDA when Triton is importable (it ships with CUDA builds of torch, not with the CPU wheel).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None

MAX_TERMS = 5  # Taylor order 4


def _fusable(tensors) -> bool:
    t0 = tensors[0]
    return triton is not None and t0.is_cuda and all(
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
