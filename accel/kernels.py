"""Fused GPU kernels for SpeCa's memory-bound work, with torch fallbacks (same math) for the CPU.

- `accumulate`: a speculative step adds, to a residual stream x, every forecast block's gate * forecast, where
  each forecast is a linear combination of that block's cached Taylor terms. One kernel for all the blocks
  (pointer tables) reads every term once and writes x once, instead of one kernel per term, gate and block.
- `taylor_update`: a full step turns the new features and the old terms into new terms in one pass.
- `forecast_error`: a speculative step's verification, the error of a feature's forecast (a combination of its
  Taylor terms) against the real feature, in one pass that reads each term and the feature once, instead of
  building the forecast and several float32 copies (about 1.3 GB of traffic at FLUX size, 0.4 ms on an H100).

And for SpecDiff (section below): `column_sums` (attention received per key from Q, K and the row
log-sum-exp, never materialising the attention map), `row_logsumexp` (that LSE, when the attention call
cannot return it) and `kv_scatter` (the K/V cache row update, K and V in one launch).

Used on CUDA when Triton is importable (it ships with CUDA builds of torch, not with the CPU wheel), unless the
environment sets SPECLAB_FUSED=0 (SPECLAB_TRITON=0 too, for the SpecDiff kernels); under TRITON_INTERPRET=1 the
SpecDiff kernels also run on CPU tensors (tests).
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


# =====================================================================================================
# SpecDiff: attention received per key, and the K/V cache row update
# =====================================================================================================
# `column_sums`: for every key k of a scored range and every head h, sum over the scored queries q of
#     w_q * exp(scale * <q_h, k_h> - lse[q, h])
# i.e. the columns of the softmax map, summed, without materialising it: lse (the row log-sum-exp of the
# scaled logits over ALL keys) comes from the attention call itself where the backend returns it, else from
# `row_logsumexp` (one more pass over the keys). `kv_scatter` writes the computed tokens' K and V rows into
# the cache in one launch.
LOG2E = 1.4426950408889634
# Tile shapes (BM queries x BN keys per step) and launch settings; module-level so that a benchmark can try others.
COLSUM_CONFIG = dict(BM=64, BN=128, num_warps=8, num_stages=2)
LSE_CONFIG = dict(BM=64, BN=64, num_warps=4, num_stages=2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_enabled() -> bool:
    """The SpecDiff Triton kernels are used: Triton importable and not turned off by SPECLAB_FUSED=0 (as every
    fused kernel here) or SPECLAB_TRITON=0."""
    return (triton is not None and os.environ.get("SPECLAB_FUSED", "1") != "0"
            and os.environ.get("SPECLAB_TRITON", "1") != "0")


def _triton_ok(*tensors) -> bool:
    """Every tensor on CUDA (or on the CPU under TRITON_INTERPRET=1, for tests), Triton on."""
    if not triton_enabled():
        return False
    return all(t.is_cuda or (_interpreting() and t.device.type == "cpu") for t in tensors)


def _head_dim_ok(d: int) -> bool:
    return d >= 16 and d & (d - 1) == 0 and d <= 256  # tl.arange / tl.dot: a power of two, at least 16


def torch_row_logsumexp(query, key, scale, key_mask=None, query_stride=1, chunk=1024):
    """[B, H, ceil(Sq / query_stride)] float32: log-sum-exp over all keys of `scale * q.k` (masked keys out)."""
    q = query[:, ::query_stride].transpose(1, 2)  # B H Sq' D
    kt = key.transpose(1, 2).transpose(-1, -2)  # B H D Sk
    out = []
    for s in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, s:s + chunk].float(), kt.float()) * scale
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        out.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(out, dim=-1)


def torch_column_sums(query, key, lse, scale, key_start, n_keys, query_weight=None, query_stride=1, chunk=1024):
    """[B, n_keys] float32: sum over heads and scored queries of w_q * exp(scale * q.k - lse), keys
    `key_start : key_start + n_keys`. `lse` [B, H, Sq'] for the scored queries (every `query_stride`-th)."""
    q = query[:, ::query_stride].transpose(1, 2)  # B H Sq' D
    kt = key[:, key_start:key_start + n_keys].transpose(1, 2).transpose(-1, -2)  # B H D n
    w = None if query_weight is None else query_weight[:, ::query_stride].float()
    acc = torch.zeros(query.shape[0], n_keys, dtype=torch.float32, device=query.device)
    for s in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, s:s + chunk].float(), kt.float()) * scale
        p = torch.exp(logits - lse[:, :, s:s + chunk, None].float())
        if w is not None:
            acc += torch.einsum("bhqk,bq->bk", p, w[:, s:s + chunk])
        else:
            acc += p.sum(dim=(1, 2))
    return acc


def torch_kv_scatter(k_cache, v_cache, rows, k_new, v_new) -> None:
    k_cache.index_copy_(1, rows, k_new.to(k_cache.dtype))
    v_cache.index_copy_(1, rows, v_new.to(v_cache.dtype))


if triton is not None:

    @triton.jit
    def _row_lse_kernel(Q, K, KM, OUT, sqb, sqs, sqh, skb, sks, skh, skmb, sob, soh, H, SQS, SK, q_stride,
                        scale_log2, HAS_KM: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # one program: BM scored queries of one (batch, head); online max / sum over every key block
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < SQS
        qi = offs_m.to(tl.int64) * q_stride
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sqs + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        for n0 in range(0, SK, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask_n = offs_n < SK
            k = tl.load(K + b * skb + h * skh + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :],
                        mask=mask_n[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # log2 units
            valid = mask_n
            if HAS_KM:
                valid = valid & (tl.load(KM + b * skmb + offs_n, mask=mask_n, other=0) != 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural log, as the attention kernels return it
        tl.store(OUT + b * sob + h * soh + offs_m, lse, mask=mask_m)

    @triton.jit
    def _column_sums_kernel(Q, K, LSE, W, OUT, sqb, sqs, sqh, skb, sks, skh, slb, slh, sls, swb, sws, sob, soh,
                            H, SQS, NK, key_start, q_stride, scale_log2,
                            HAS_W: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # one program: BN keys of one (batch, head), kept in registers; stream every scored query block
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < NK
        offs_d = tl.arange(0, D)
        k = tl.load(K + b * skb + h * skh + (key_start + offs_n.to(tl.int64))[:, None] * sks + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        acc = tl.zeros([BN], dtype=tl.float32)
        for m0 in range(0, SQS, BM):
            offs_m = m0 + tl.arange(0, BM)
            mask_m = offs_m < SQS
            qi = offs_m.to(tl.int64) * q_stride
            q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sqs + offs_d[None, :], mask=mask_m[:, None], other=0.0)
            lse = tl.load(LSE + b * slb + h * slh + offs_m * sls, mask=mask_m, other=0.0) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k))
            p = tl.exp2(s * scale_log2 - lse[:, None])
            if HAS_W:
                w = tl.load(W + b * swb + qi * sws, mask=mask_m, other=0.0)
                p = p * w[:, None]
            p = tl.where(mask_m[:, None], p, 0.0)
            acc += tl.sum(p, 0)
        tl.store(OUT + b * sob + h * soh + offs_n, acc, mask=mask_n)

    @triton.jit
    def _kv_scatter_kernel(KC, VC, ROWS, KN, VN, scb, scs, snkb, snks, snvb, snvs, E, BLOCK: tl.constexpr):
        # one program: one computed token's K and V rows (E = heads * head_dim elements each) of one sample
        i = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        r = tl.load(ROWS + i).to(tl.int64)
        for e0 in range(0, E, BLOCK):
            offs = e0 + tl.arange(0, BLOCK)
            m = offs < E
            kv = tl.load(KN + b * snkb + i * snks + offs, mask=m)
            tl.store(KC + b * scb + r * scs + offs, kv.to(KC.dtype.element_ty), mask=m)
            vv = tl.load(VN + b * snvb + i * snvs + offs, mask=m)
            tl.store(VC + b * scb + r * scs + offs, vv.to(VC.dtype.element_ty), mask=m)


def _scored_queries(sq: int, query_stride: int) -> int:
    return (sq + query_stride - 1) // query_stride


def row_logsumexp(query: torch.Tensor, key: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
                  query_stride: int = 1, chunk: int = 1024) -> torch.Tensor:
    """Row log-sum-exp of the scaled logits over every key (masked keys out), for every `query_stride`-th
    query: float32 [B, H, ceil(Sq / query_stride)]. `query` [B, Sq, H, D], `key` [B, Sk, H, D], `key_mask`
    [B, Sk] bool (True = a real key) or None."""
    b, sq, h, d = query.shape
    if not (_triton_ok(query, key) and _head_dim_ok(d) and query.stride(-1) == 1 and key.stride(-1) == 1):
        return torch_row_logsumexp(query, key, scale, key_mask, query_stride, chunk)
    n = _scored_queries(sq, query_stride)
    out = torch.empty(b, h, n, dtype=torch.float32, device=query.device)
    km = key_mask.to(torch.int8).contiguous() if key_mask is not None else out
    bm, bn = LSE_CONFIG["BM"], LSE_CONFIG["BN"]
    _row_lse_kernel[(triton.cdiv(n, bm), b * h)](
        query, key, km, out, query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1),
        key.stride(2), km.stride(0) if key_mask is not None else 0, out.stride(0), out.stride(1), h, n, key.shape[1],
        query_stride, scale * LOG2E, HAS_KM=key_mask is not None, D=d, BM=bm, BN=bn,
        num_warps=LSE_CONFIG["num_warps"], num_stages=LSE_CONFIG["num_stages"])
    return out


def column_sums(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float, key_start: int,
                n_keys: int, query_weight: torch.Tensor | None = None, query_stride: int = 1,
                chunk: int = 1024) -> torch.Tensor:
    """Attention received by the keys `key_start : key_start + n_keys`, summed over heads and over every
    `query_stride`-th query (each weighted by `query_weight` [B, Sq] when given): float32 [B, n_keys].
    `lse` [B, H, ceil(Sq / query_stride)]: the scored queries' row log-sum-exp over ALL keys (any strides).
    `chunk`: queries per step of the torch fallback (memory chunk x keys x heads)."""
    b, sq, h, d = query.shape
    if not (_triton_ok(query, key, lse) and _head_dim_ok(d) and query.stride(-1) == 1 and key.stride(-1) == 1):
        return torch_column_sums(query, key, lse, scale, key_start, n_keys, query_weight, query_stride, chunk)
    n = _scored_queries(sq, query_stride)
    out = torch.empty(b, h, n_keys, dtype=torch.float32, device=query.device)
    w = query_weight.float().contiguous() if query_weight is not None else out
    bm, bn = COLSUM_CONFIG["BM"], COLSUM_CONFIG["BN"]
    _column_sums_kernel[(triton.cdiv(n_keys, bn), b * h)](
        query, key, lse, w, out, query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1),
        key.stride(2), lse.stride(0), lse.stride(1), lse.stride(2), w.stride(0) if query_weight is not None else 0,
        w.stride(1) if query_weight is not None else 0, out.stride(0), out.stride(1), h, n, n_keys, key_start,
        query_stride, scale * LOG2E, HAS_W=query_weight is not None, D=d, BM=bm, BN=bn,
        num_warps=COLSUM_CONFIG["num_warps"], num_stages=COLSUM_CONFIG["num_stages"])
    return out.sum(dim=1)


def kv_scatter(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, k_new: torch.Tensor,
               v_new: torch.Tensor) -> None:
    """In place: `k_cache[:, rows] = k_new`, `v_cache[:, rows] = v_new` (caches [B, S, H, D], new rows
    [B, len(rows), H, D]), both in one launch. `rows` must be distinct (the computed tokens' positions)."""
    e = k_cache.shape[2] * k_cache.shape[3]

    def rows_dense(t):  # each token's H x D elements contiguous
        return t.stride(3) == 1 and t.stride(2) == t.shape[3]

    if not (_triton_ok(k_cache, v_cache, rows, k_new, v_new) and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.stride() == v_cache.stride() and rows_dense(k_new) and rows_dense(v_new) and rows.numel()):
        return torch_kv_scatter(k_cache, v_cache, rows, k_new, v_new)
    block = 1024 if e >= 1024 else triton.next_power_of_2(e)
    _kv_scatter_kernel[(rows.numel(), k_cache.shape[0])](
        k_cache, v_cache, rows, k_new, v_new, k_cache.stride(0), k_cache.stride(1), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1), e, BLOCK=block, num_warps=4)
