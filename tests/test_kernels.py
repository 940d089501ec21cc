"""SpeCa's fused kernels (accel/kernels.py): the torch fallbacks compute the documented math (CPU, against naive
loops), and each Triton kernel matches its fallback on random inputs (CUDA + Triton only; run on a GPU machine with
scripts/gpu_kernel_tests.sh)."""

import importlib.util

import pytest
import torch

# the accel internals these tests reach, imported in this one place (a moved module is a one-line change here)
from accel import kernels as K

HAS_TRITON = importlib.util.find_spec("triton") is not None
GPU_REASON = ("needs a CUDA device" if not torch.cuda.is_available() else
              "needs Triton (the CPU wheel of torch ships none)" if not HAS_TRITON or K.triton is None else "")
gpu = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "runs")


# ---- inputs ------------------------------------------------------------------------------------------------
def accumulate_inputs(batch, n, channels, blocks, n_terms, dtype, device, seed=0):
    """x [B, n, C]; per block `n_terms` Taylor terms [B, N_k, C] with N_k >= n and a row offset, a gate index into
    gates [G, B, C] (G > blocks, indices shuffled), and Taylor-like coefficients."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x = randn(batch, n, channels)
    gates = randn(blocks + 2, batch, channels)
    order = torch.randperm(blocks + 2, generator=g).tolist()
    entries = []
    for k in range(blocks):
        extra = int(torch.randint(0, 9, (1,), generator=g))
        r0 = int(torch.randint(0, extra + 1, (1,), generator=g))
        terms = [randn(batch, n + extra, channels) for _ in range(n_terms)]
        entries.append((terms, order[k], r0))
    step = 0.5 + float(torch.rand(1, generator=g)) * 2.5
    coefs = [step ** i / max(1, i) for i in range(n_terms)]  # like Newton / Taylor coefficients
    return x, entries, gates, coefs


def naive_accumulate(x, entries, gates, coefs):
    """x + sum over blocks of gate * sum_i coef_i * term_i[:, r0 : r0 + n], one element at a time, in float64."""
    out = x.double().clone()
    b_n, n, c_n = x.shape
    for terms, gi, r0 in entries:
        for b in range(b_n):
            for t in range(n):
                forecast = torch.zeros(c_n, dtype=torch.float64)
                for term, coef in zip(terms[:len(coefs)], coefs):
                    forecast += coef * term[b, r0 + t].double()
                out[b, t] += gates[gi, b].double() * forecast
    return out


def naive_taylor_update(f, old, inv):
    """Newton's recurrence, term by term: new_0 = f, new_{i+1} = (new_i - old_i) * inv_i."""
    new = [f.double()]
    for i, v in enumerate(inv):
        new.append((new[i] - old[i].double()) * v)
    return new


# ---- CPU: the fallbacks are the documented math ------------------------------------------------------------------
@pytest.mark.parametrize("blocks,n_terms", [(1, 1), (2, 3), (3, 5)])
def test_torch_accumulate_is_the_documented_sum(blocks, n_terms):
    x, entries, gates, coefs = accumulate_inputs(2, 5, 4, blocks, n_terms, torch.float64, "cpu")
    expect = naive_accumulate(x, entries, gates, coefs)
    torch.testing.assert_close(K.torch_accumulate(x, entries, gates, coefs), expect, rtol=1e-12, atol=1e-12)
    # on the CPU the public entry point is the fallback
    torch.testing.assert_close(K.accumulate(x, entries, gates, coefs), expect, rtol=1e-12, atol=1e-12)
    # fewer coefficients than terms: only the first len(coefs) terms count
    short = coefs[:1]
    torch.testing.assert_close(K.torch_accumulate(x, entries, gates, short),
                               naive_accumulate(x, entries, gates, short), rtol=1e-12, atol=1e-12)
    assert K.accumulate(x, [], gates, coefs) is x


def test_torch_accumulate_scales_the_first_term():
    """A first coefficient other than 1 (Taylor forecasts always start with 1) still multiplies the first term."""
    x, entries, gates, _ = accumulate_inputs(2, 5, 4, 2, 3, torch.float64, "cpu", seed=3)
    for coefs in ([0.5, 2.0, -1.5], [2.0, 0.5, -1.5]):
        torch.testing.assert_close(K.torch_accumulate(x, entries, gates, coefs),
                                   naive_accumulate(x, entries, gates, coefs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_higher", [0, 1, 2, 4])
def test_torch_taylor_update_is_newtons_recurrence(n_higher):
    g = torch.Generator().manual_seed(n_higher)
    f = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    old = [torch.randn(2, 6, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    keep = [o.clone() for o in old]
    inv = [1.0 / d for d in (1.0, 3.0, -2.0, 0.5)][:n_higher]
    for fn in (K.torch_taylor_update, K.taylor_update):
        new = fn(f, old, inv)
        assert len(new) == n_higher + 1 and new[0] is f
        for got, want in zip(new, naive_taylor_update(f, old, inv)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert all(torch.equal(o, k) for o, k in zip(old, keep))  # old terms are read, never written


def naive_row_sums(terms, coefs, real, eps):
    """The per-row sums `kernels.row_sums` (Triton) documents, in float64: sum |d|/(|r|+eps), sum |d|, sum |r|,
    sum d^2, sum r^2, sum p*r, sum p^2, sum (|d|/(|r|+eps))^2, with p the forecast and d = p - r."""
    p = sum(c * t.double() for c, t in zip(coefs, terms))
    r = real.double()
    d = p - r
    q = d.abs() / (r.abs() + eps)
    parts = [q, d.abs(), r.abs(), d * d, r * r, p * r, p * p, q * q]
    return torch.stack([x.sum(-1) for x in parts], dim=-1)


def test_errors_from_sums_are_the_metrics():
    """The fused verification's last step (plain torch, run on the GPU after the Triton sums): every metric, per
    sample and over the whole batch, and the token map, as `metrics.verification_errors` defines them."""
    from accel.metrics import verification_errors

    g = torch.Generator().manual_seed(5)
    terms = [torch.randn(2, 7, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    coefs = [1.0, 0.5, -0.25]
    real = torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    real[1] *= 30.0  # samples of different scale: a pooled or unnormalised error cannot pass
    eps = 1e-3
    sums = naive_row_sums(terms, coefs, real, eps)
    pred = K.torch_forecast(terms, coefs)
    for metric in ("rel_l1", "rel_rms", "rel_l2", "cosine"):
        for whole in (False, True):
            want, want_map = verification_errors(pred, real, metric, eps, slice(2, 6), whole)
            got, got_map = K.errors_from_sums(sums, 6, metric, eps, slice(2, 6), whole)
            assert got.shape == ((1,) if whole else (2,)), (metric, whole)
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(got_map.double(), want_map.double(), rtol=1e-6, atol=1e-9)
    err, tok = K.errors_from_sums(sums, 6, "rel_l1", eps)  # per sample unless asked otherwise
    assert tok is None and torch.equal(err, K.errors_from_sums(sums, 6, "rel_l1", eps, whole_batch=False)[0])
    assert err.shape == (2,)
    # forecast_error, on the CPU: the torch forecast, then the definition (per sample unless asked otherwise)
    err, tok = K.forecast_error(terms, coefs, real, "rel_l2", eps)
    assert tok is None and torch.equal(err, verification_errors(pred, real, "rel_l2", eps)[0])
    err, tok = K.forecast_error(terms, coefs, real, "cosine", eps, slice(1, 3), whole_batch=True)
    want, want_map = verification_errors(pred, real, "cosine", eps, slice(1, 3), True)
    assert torch.equal(err, want) and torch.equal(tok, want_map)
    with pytest.raises(ValueError, match=r"^metric='l3' is unknown: use one of rel_l1, rel_rms, rel_l2, cosine$"):
        K.errors_from_sums(sums, 6, "l3", eps)


def test_torch_forecast_and_add_terms():
    t0, t1, t2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0]), torch.tensor([8.0, 8.0])
    assert K.torch_forecast([t0, t1, t2], [0.5, 2.0]).tolist() == [1.5, 7.0]  # fewer coefficients: fewer terms
    assert K.torch_forecast([t0, t1], [1.0, -1.0]).tolist() == [0.5, -6.0]
    assert K.torch_forecast([t0, t1], [2.0, 1.0]).tolist() == [2.5, 0.0]
    x = torch.tensor([10.0, 20.0])
    assert K.add_terms(x, [t0, t1, t2], [0.5, 2.0]).tolist() == [11.5, 27.0] and x.tolist() == [10.0, 20.0]
    # terms kept in another dtype: the sum in x's dtype
    out = K.add_terms(x.double(), [t0, t1.half()], [3.0, 1.0])
    assert out.dtype == torch.float64 and out.tolist() == [13.5, 18.0]
    # a stream in lower precision than the terms (a bf16 model, terms kept in float32): still x's dtype
    for terms in ([t0, t1], [t0.bfloat16(), t1], [t0, t1.bfloat16()]):
        out = K.add_terms(x.bfloat16(), terms, [2.0, 0.5])
        assert out.dtype == torch.bfloat16 and out.tolist() == [12.25, 18.0]


# ---- GPU: each Triton kernel against its fallback ----------------------------------------------------------------
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
"""Kernel vs fallback, relative to the output's largest magnitude for atol. bf16: the kernel accumulates in float32
and rounds once; the fallback rounds after every torch op, a few bf16 ulps (2^-8) over the sum."""

SHAPES = [  # batch, tokens, channels, blocks, terms
    (1, 7, 3, 1, 1),
    (2, 300, 64, 3, 2),
    (3, 1000, 130, 4, 3),  # n * C not a multiple of the kernel's block
    (2, 512, 3072, 5, 5),  # FLUX-like width, order 4
]


def _fallback_not_called(monkeypatch, name):
    def refuse(*a, **k):
        raise AssertionError(f"{name} fell back to torch: the Triton kernel did not run")

    monkeypatch.setattr(K, name, refuse)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_accumulate_matches_fallback(shape, dtype, monkeypatch):
    batch, n, c, blocks, n_terms = shape
    x, entries, gates, coefs = accumulate_inputs(batch, n, c, blocks, n_terms, dtype, "cuda", seed=sum(shape))
    fallback = K.torch_accumulate(x, entries, gates, coefs)
    reference = K.torch_accumulate(x.double(), [([t.double() for t in ts], gi, r0) for ts, gi, r0 in entries],
                                   gates.double(), coefs)
    keep = x.clone()
    with monkeypatch.context() as m:
        _fallback_not_called(m, "torch_accumulate")
        fused = K.accumulate(x, entries, gates, coefs)
    torch.cuda.synchronize()
    assert fused.dtype == dtype and fused.shape == x.shape and torch.equal(x, keep)
    scale = reference.abs().max().item()
    tol = TOL[dtype]
    torch.testing.assert_close(fused, fallback, rtol=tol["rtol"], atol=tol["atol"] * scale)
    # the kernel is the more exact of the two: within about one rounding of the float64 sum
    one_rounding = 4e-6 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(fused.double(), reference, rtol=one_rounding, atol=one_rounding * scale)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_higher", [1, 2, 3, 4])
@pytest.mark.parametrize("numel", [(5, 7), (2, 1000, 130), (2, 4096, 3072)], ids=lambda s: "x".join(map(str, s)))
def test_triton_taylor_update_matches_fallback(numel, n_higher, dtype, monkeypatch):
    g = torch.Generator().manual_seed(n_higher)
    f = torch.randn(*numel, generator=g).to("cuda", dtype)
    old = [torch.randn(*numel, generator=g).to("cuda", dtype) for _ in range(n_higher)]
    keep = [o.clone() for o in old]
    inv = [1.0 / d for d in (1.0, 2.5, -3.0, 0.75)][:n_higher]
    fallback = K.torch_taylor_update(f, old, inv)
    reference = naive_taylor_update(f.cpu(), [o.cpu() for o in old], inv)
    with monkeypatch.context() as m:
        _fallback_not_called(m, "torch_taylor_update")
        fused = K.taylor_update(f, old, inv)
    torch.cuda.synchronize()
    assert len(fused) == n_higher + 1 and fused[0] is f
    assert all(torch.equal(o, k) for o, k in zip(old, keep))
    tol = TOL[dtype]
    for i, (a, b, r) in enumerate(zip(fused, fallback, reference)):
        assert a.dtype == dtype and a.shape == f.shape, i
        scale = r.abs().max().item()
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale)
        one_rounding = 4e-6 if dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(a.double().cpu(), r, rtol=one_rounding, atol=one_rounding * scale)


# ---- coefficients as a device tensor (SpeCa's CUDA graphs read them from a buffer) ---------------------------
@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_add_terms_and_forecast_take_a_coefficient_tensor(n_terms):
    from accel.kernels import add_terms, forecast_error, torch_forecast

    g = torch.Generator().manual_seed(n_terms)
    x = torch.randn(2, 10, 12, generator=g)
    terms = [torch.randn(2, 10, 12, generator=g) for _ in range(3)]
    coefs = [1.0, 2.5, -0.5][:n_terms]
    buf = torch.tensor(coefs)
    want = x.double() + sum(c * t.double() for c, t in zip(coefs, terms))
    torch.testing.assert_close(add_terms(x, terms, buf).double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(add_terms(x, terms, coefs).double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch_forecast(terms, buf), torch_forecast(terms, coefs), rtol=1e-6, atol=1e-6)
    real = torch.randn(2, 10, 12, generator=g)
    for metric in ("rel_l1", "rel_l2"):
        e_buf, m_buf = forecast_error(terms, buf, real, metric, 1e-6, slice(2, None))
        e, m = forecast_error(terms, coefs, real, metric, 1e-6, slice(2, None))
        torch.testing.assert_close(e_buf, e)
        torch.testing.assert_close(m_buf, m)


def test_taylor_store_keeps_the_terms_addresses():
    """With a persistent store the forecaster's terms keep their addresses from one full step to the next (a CUDA
    graph reads them) and hold exactly the values of a forecaster without one."""
    from accel.taylor import TaylorForecaster

    store = {}
    a, b = TaylorForecaster(2, store=store), TaylorForecaster(2)
    g = torch.Generator().manual_seed(0)
    ptrs = []
    for x in (0.0, 1.0, 3.0, 4.5, 6.0):
        f = torch.randn(3, 5, generator=g)
        a.update(x, {"h": f})
        b.update(x, {"h": f})
        ptrs.append([t.data_ptr() for t in a.terms["h"]])
        for ta, tb in zip(a.terms["h"], b.terms["h"]):
            assert torch.equal(ta, tb)
        assert all(t is store[("h", i)] for i, t in enumerate(a.terms["h"]))
    assert ptrs[2] == ptrs[3] == ptrs[4]  # order 2 reached: the same three buffers from then on
    a.update(7.0, {"h": torch.randn(3, 5, generator=g)}, restart=True)
    assert a.terms["h"][0].data_ptr() == ptrs[-1][0]
