"""The fused verification kernel (`kernels.forecast_error`) against the torch definition (forecast formed in float64).

Runs on CUDA, or on the CPU through Triton's interpreter (`TRITON_INTERPRET=1` set before the import, with a
Triton install); skipped otherwise (the CPU torch wheel has no Triton). The torch path itself is what every CPU
test of SpeCa runs.
"""

import itertools
import os

import pytest
import torch

from accel import kernels
from accel.metrics import verification_errors

RUNNABLE = kernels.triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="needs Triton on CUDA, or TRITON_INTERPRET=1")


@pytest.mark.parametrize("n_terms", [1, 2, 3, 5])
@pytest.mark.parametrize("channels", [48, 1500])
def test_forecast_error_matches_the_definition(n_terms, channels):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(n_terms * 7 + channels)
    B, N = 2, 24
    terms = [torch.randn(B, N, channels, generator=g, device=device) for _ in range(n_terms)]
    coefs = [1.0, 2.5, -3.25, 0.5, 7.0][:n_terms]
    real = torch.randn(B, N, channels, generator=g, device=device)
    pred64 = kernels.torch_forecast([t.double() for t in terms], coefs)
    sums = kernels.row_sums(terms, coefs, real, 1e-6)
    for metric, whole_batch in itertools.product(("rel_l1", "rel_rms", "rel_l2", "cosine"), (False, True)):
        rows = slice(8, None)
        want, want_map = verification_errors(pred64, real.double(), metric, 1e-6, rows, whole_batch)
        got, got_map = kernels.errors_from_sums(sums, channels, metric, 1e-6, rows, whole_batch)
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_map.double(), want_map.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_coefficients_from_a_device_buffer_match_the_scalars(n_terms):
    """The kernel reads the coefficients from a tensor (what a CUDA graph replays with) exactly as when they are
    passed as numbers."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(n_terms)
    terms = [torch.randn(2, 16, 300, generator=g, device=device) for _ in range(n_terms)]
    real = torch.randn(2, 16, 300, generator=g, device=device)
    coefs = [1.0, -0.75, 0.3125][:n_terms]
    buf = torch.tensor(coefs + [9.0, 9.0], device=device)[:n_terms]  # entries past the terms are never read
    torch.testing.assert_close(kernels.row_sums(terms, buf, real, 1e-6), kernels.row_sums(terms, coefs, real, 1e-6))
