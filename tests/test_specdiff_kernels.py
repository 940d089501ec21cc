"""SpecDiff's kernels (accel/kernels.py) against torch references: attention received per key from Q, K and the
row log-sum-exp, the log-sum-exp itself, and the K/V cache row update; the attention call that returns its LSE.

The torch fallbacks (what a CPU runs) are checked against a float64 softmax; the Triton kernels against the
fallbacks on CUDA (skipped without a GPU; `python -m scripts.bench.specdiff_kernels` is the full GPU check).
"""

import math

import pytest
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from accel import kernels
from accel.adapters.kv_attention import _sdpa_with_lse, attention_received

CASES = [  # b, sq, sk, h, d, key_start, n_keys, query_stride, masked
    (1, 37, 45, 3, 16, 5, 33, 1, False),
    (2, 70, 90, 2, 32, 10, 80, 3, True),
    (2, 20, 130, 2, 16, 0, 130, 2, True),
    (1, 64, 64, 4, 64, 8, 56, 4, False),
]


def softmax64(q, k, key_mask=None):
    """float64 softmax map [B, H, Sq, Sk] and its row log-sum-exp [B, H, Sq]."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    return torch.exp(logits - lse[..., None]), lse


def inputs(case, device="cpu", dtype=torch.float32, seed=0):
    b, sq, sk, h, d, ks, nk, st, masked = case
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, sq, h, d, generator=g) * 2).to(device, dtype)
    k = (torch.randn(b, sk, h, d, generator=g) * 2).to(device, dtype)
    km = qw = None
    if masked:
        km = torch.rand(b, sk, generator=g) > 0.3
        km[:, ks:ks + nk] = True
        km = km.to(device)
        qw = (torch.rand(b, sq, generator=g) > 0.2).float().to(device)
    return q, k, km, qw


@pytest.mark.parametrize("case", CASES)
def test_torch_row_logsumexp_and_column_sums_match_float64_softmax(case):
    b, sq, sk, h, d, ks, nk, st, masked = case
    q, k, km, qw = inputs(case)
    probs, lse64 = softmax64(q, k, km)
    scale = 1 / math.sqrt(d)
    lse = kernels.torch_row_logsumexp(q, k, scale, km, st, chunk=7)
    torch.testing.assert_close(lse.double(), lse64[:, :, ::st], rtol=1e-6, atol=1e-5)
    sums = kernels.torch_column_sums(q, k, lse, scale, ks, nk, qw, st, chunk=5)
    w = torch.ones(b, sq, dtype=torch.float64) if qw is None else qw.double()
    ref = torch.einsum("bhqk,bq->bk", probs[:, :, ::st], w[:, ::st])[:, ks:ks + nk]
    torch.testing.assert_close(sums.double(), ref, rtol=1e-5, atol=1e-6)
    # the public entry points take the fallbacks on the CPU (no Triton there), same values
    assert torch.equal(kernels.row_logsumexp(q, k, scale, km, st, chunk=7), lse)
    assert torch.equal(kernels.column_sums(q, k, lse, scale, ks, nk, qw, st, chunk=5), sums)
    if not masked:  # the defaults: every query scored, every key counted
        lse1 = kernels.torch_row_logsumexp(q, k, scale)
        torch.testing.assert_close(lse1.double(), lse64, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(kernels.torch_column_sums(q, k, lse1, scale, ks, nk).double(),
                                   probs.sum(dim=(1, 2))[:, ks:ks + nk], rtol=1e-5, atol=1e-6)


def test_torch_score_fallbacks_stay_on_the_device_in_float32():
    """float32 results whatever torch's default dtype, made on the inputs' device (the meta device: nothing
    touches the CPU)."""
    case = CASES[1]  # masked keys, weighted queries, a stride
    b, sq, sk, h, d, ks, nk, st, masked = case
    q, k, km, qw = inputs(case)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lse = kernels.torch_row_logsumexp(q, k, 0.25, km, st)
        sums = kernels.torch_column_sums(q, k, lse, 0.25, ks, nk, qw, st)
    finally:
        torch.set_default_dtype(prev)
    assert lse.dtype == sums.dtype == torch.float32
    m = [None if t is None else t.to("meta") for t in (q, k, km, qw)]
    lse = kernels.torch_row_logsumexp(m[0], m[1], 0.25, m[2], st)
    assert kernels.torch_column_sums(m[0], m[1], lse, 0.25, ks, nk, m[3], st).device.type == "meta"


@pytest.mark.parametrize("case", CASES)
def test_attention_received_is_column_means_over_scored_queries(case):
    """Head- and query-averaged attention received (valid queries only), with the LSE computed here or
    given (as the attention call returns it, [B, H, >= Sq], any strides)."""
    b, sq, sk, h, d, ks, nk, st, masked = case
    q, k, km, qw = inputs(case, seed=1)
    probs, lse64 = softmax64(q, k, km)
    w = torch.ones(b, sq, dtype=torch.float64) if qw is None else qw.double()
    w = w[:, ::st]
    ref = torch.einsum("bhqk,bq->bk", probs[:, :, ::st], w)[:, ks:ks + nk] / (h * w.sum(1, keepdim=True))
    got = attention_received(q, k, nk, km, None if qw is None else qw.bool(), chunk=6, key_start=ks, query_stride=st)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    padded = torch.full((b, sq + 9, h), float("nan")).transpose(1, 2)  # [B, H, Sq + 9], H-major strides
    padded[:, :, :sq] = lse64.float()
    given = attention_received(q, k, nk, km, None if qw is None else qw.bool(), key_start=ks, query_stride=st,
                               lse=padded)
    torch.testing.assert_close(given, got, rtol=1e-5, atol=1e-7)


def test_kv_scatter_equals_index_copy():
    g = torch.Generator().manual_seed(2)
    kc, vc = torch.randn(2, 30, 3, 8, generator=g), torch.randn(2, 30, 3, 8, generator=g)
    rows = torch.tensor([29, 0, 7, 8, 15])
    kn, vn = torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 5, 3, 8, generator=g)
    kc2, vc2 = kc.clone(), vc.clone()
    kernels.kv_scatter(kc, vc, rows, kn, vn)
    kc2.index_copy_(1, rows, kn)
    vc2.index_copy_(1, rows, vn)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_with_lse_is_the_plain_attention_call(dtype):
    """The attention call that also returns its row LSE is the op diffusers' dispatch would run (bit for bit),
    and the LSE is the log-sum-exp of the scaled logits."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g).to(dtype) for n in (21, 33, 33))
    got = _sdpa_with_lse(q, k, v)
    assert got is not None
    out, lse = got
    assert torch.equal(out, dispatch_attention_fn(q, k, v))
    torch.testing.assert_close(lse.double()[:, :, :21], softmax64(q.float(), k.float())[1],
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_enabled()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernels_match_torch_fallbacks(case, dtype):
    b, sq, sk, h, d, ks, nk, st, masked = case
    q, k, km, qw = inputs(case, device="cuda", dtype=dtype, seed=4)
    scale = 1 / math.sqrt(d)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=3e-3, atol=1e-4)  # fp32: tf32 dot
    lse_t = kernels.torch_row_logsumexp(q, k, scale, km, st)
    lse = kernels.row_logsumexp(q, k, scale, km, st)
    torch.testing.assert_close(lse, lse_t, **tol)
    sums = kernels.column_sums(q, k, lse_t, scale, ks, nk, qw, st)
    torch.testing.assert_close(sums, kernels.torch_column_sums(q, k, lse_t, scale, ks, nk, qw, st), **tol)
    kc = torch.randn(b, sk, h, d, device="cuda").to(dtype)
    vc = torch.randn_like(kc)
    rows = torch.randperm(sk, device="cuda")[:sq]
    kn, vn = q.contiguous(), torch.randn_like(q)
    kc2, vc2 = kc.clone(), vc.clone()
    kernels.kv_scatter(kc, vc, rows, kn, vn)
    kernels.torch_kv_scatter(kc2, vc2, rows, kn, vn)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
