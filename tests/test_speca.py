"""SpeCa on a tiny random FLUX: the forecaster, decision rules, schedule replay, sigma coordinates, the batch decision,
verification metrics, the trace, errors. (Exactness, remove(), compute counted from leaf Linears and isolation run
for every family in tests/test_contract.py.)"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

import accel
from families import FLUX
from tiny import embeds, run, tiny_flux_pipe

# accel internals these tests reach, imported in this one place (a moved module is a one-line change here)
from accel.adapters import TokenLayout, adapter_for
from accel.kernels import accumulate
from accel.metrics import per_sample_error, verification_errors
from accel.taylor import Forecast, TaylorForecaster

STEPS = 12
FORECASTS = ("stack", "per_block", "output")


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipe()


@pytest.fixture(scope="module")
def baseline(pipe):
    return run(pipe, STEPS)


# ---- forecaster ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_newton_forecast_exact_on_polynomials(order):
    g = torch.Generator().manual_seed(order)
    coeffs = torch.randn(order + 1, 5, 7, generator=g, dtype=torch.float64)

    def poly(x):
        return sum(c * x**i for i, c in enumerate(coeffs))

    f = TaylorForecaster(order, "newton")
    for x in [0.0, 1.0, 3.0, 4.0, 7.0][: order + 1]:  # uneven spacing
        f.update(x, {"a": poly(x)})
    for x in [8.0, 9.5, 12.0]:
        torch.testing.assert_close(f.predict(x)["a"], poly(x), rtol=1e-9, atol=1e-7)


def test_reference_form_exact_to_first_order_only():
    lin = TaylorForecaster(2, "reference")
    quad = TaylorForecaster(2, "reference")
    for x in (0.0, 2.0, 4.0):
        lin.update(x, {"a": torch.tensor([3.0 * x + 1.0], dtype=torch.float64)})
        quad.update(x, {"a": torch.tensor([x * x], dtype=torch.float64)})
    assert lin.predict(7.0)["a"].item() == pytest.approx(22.0)
    # TaylorSeer's recursive differences lag: D = (16, 6, 2), so 16 + 6k + 2k^2/2 at k=3 is 43, not 49
    assert quad.predict(7.0)["a"].item() == pytest.approx(43.0)


def test_forecaster_order_grows_with_history():
    f = TaylorForecaster(3)
    f.update(0.0, {"a": torch.zeros(1)})
    assert f.active_order == 0 and f.predict(5.0)["a"].item() == 0.0
    f.update(1.0, {"a": torch.ones(1)})
    assert f.active_order == 1 and f.predict(5.0)["a"].item() == pytest.approx(5.0)


def test_forecast_coefficients_by_hand():
    newton = TaylorForecaster(2, "newton")
    reference = TaylorForecaster(2, "reference")
    for f in (newton, reference):
        with pytest.raises(RuntimeError, match=r"^TaylorForecaster\.predict before any full step$"):
            f.predict(1.0)
        for x in (0.0, 1.0, 3.0):
            f.update(x, {"a": torch.zeros(1)})
    # nodes newest first (3, 1, 0): 1, (x - 3), (x - 3)(x - 1)
    assert newton.coefficients(5.0) == [1.0, 2.0, 8.0]
    # k = x - 3: k^i / i!, as many as the terms (order 2 -> 3)
    assert reference.coefficients(5.0) == [1.0, 2.0, 2.0] and len(reference.terms["a"]) == 3
    one = TaylorForecaster(3, "reference")
    one.update(2.0, {"a": torch.zeros(1)})
    assert one.coefficients(6.0) == [1.0] and one.active_order == 0
    default = TaylorForecaster(2)  # the Newton form unless asked otherwise
    for x in (0.0, 1.0, 3.0):
        default.update(x, {"a": torch.zeros(1)})
    assert default.coefficients(5.0) == [1.0, 2.0, 8.0]


def test_forecast_is_the_coefficients_times_the_terms():
    t0, t1 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    assert Forecast({"a": [t0, t1]}, [0.5, 2.0])["a"].tolist() == [1.5, 7.0]
    assert Forecast({"a": [t0, t1]}, [1.0, -1.0])["a"].tolist() == [0.5, -6.0]
    assert Forecast({"a": [t0, t1]}, [3.0])["a"].tolist() == [3.0, -6.0]  # fewer coefficients: fewer terms
    assert Forecast({"a": [t0, t1]}, [2.0, 0.0])["a"].tolist() == [2.0, -4.0]


def test_threshold_schedule():
    cfg = accel.SpeCaConfig(threshold=7.0, decay=0.3)
    assert cfg.threshold_at(0, 50) == pytest.approx(7.0)
    assert cfg.threshold_at(25, 50) == pytest.approx(7.0 * math.sqrt(0.3))
    assert cfg.threshold_at(50, 50) == pytest.approx(2.1)
    assert accel.SpeCaConfig(threshold=7.0, decay=1.0).threshold_at(40, 50) == pytest.approx(7.0)


# ---- block rebuild ------------------------------------------------------------------------------------
def test_forecast_of_real_features_rebuilds_block_output(pipe):
    """Inputs + gate * real features, as a speculative step adds them, == the block's own output."""
    adapter = adapter_for(pipe.transformer)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 16, 32, generator=g)
    enc = torch.randn(1, 8, 32, generator=g)
    temb = torch.randn(1, 32, generator=g)
    ids = torch.zeros(24, 3)
    ids[8:, 1] = torch.arange(16) // 4
    ids[8:, 2] = torch.arange(16) % 4
    rope = pipe.transformer.pos_embed(ids)
    for block in adapter.blocks():
        captured = {}
        handles = []
        for site in adapter.feature_sites(block):
            def grab(mod, inp, out, site=site):
                if site.index is None:
                    captured[site.names[0]] = out
                else:
                    for name, i in zip(site.names, site.index):
                        captured[name] = out[i]
            handles.append(site.module.register_forward_hook(grab))
        kwargs = dict(hidden_states=hidden, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
        with torch.no_grad():
            real = block.module(**kwargs)
            sites = adapter.gate_sites(block)
            gates = torch.stack([
                F.linear(adapter.gate_input(temb), *_rows(g.linear, g.n_chunks, g.chunk)) for g in sites
            ])
            index = {g.feature: i for i, g in enumerate(sites)}
            streams = adapter.block_streams((), kwargs)
            for c in adapter.contributions(block, TokenLayout(grid=(4, 4), n_text=8)):
                entry = ([captured[c.feature]], index[c.feature], c.row_start)
                streams[c.stream] = accumulate(streams[c.stream], [entry], gates, [1.0])
            rebuilt = adapter.block_output(block, streams)
        for h in handles:
            h.remove()
        torch.testing.assert_close(rebuilt[0], real[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rebuilt[1], real[1], rtol=1e-5, atol=1e-5)


def _rows(linear, n_chunks, chunk):
    d = linear.out_features // n_chunks
    return linear.weight[chunk * d:(chunk + 1) * d], linear.bias[chunk * d:(chunk + 1) * d]


# ---- real compute and decision rules --------------------------------------------------------------------
@pytest.mark.parametrize("forecast", FORECASTS)
def test_warmup_and_max_spec_steps_shape_the_run(pipe, forecast):
    """(Real compute against leaf Linears: tests/test_contract.py.) Warm-up steps are full, never more than
    max_spec_steps speculative steps in a row, and a speculative step computes exactly the verify block."""
    cfg = accel.SpeCaConfig(forecast=forecast, threshold=1e9, warmup_steps=3, min_spec_steps=1, max_spec_steps=4)
    with accel.apply(pipe, cfg) as handle:
        run(pipe, STEPS)
        trace = handle.trace
    n_blocks = len(adapter_for(pipe.transformer).blocks())
    s = trace.summary()
    assert s["blocks_computed"] == s["full_steps"] * n_blocks + s["accepted_steps"]
    decisions = [r.decision for r in trace.steps]
    assert decisions[:3] == ["full"] * 3
    assert [r.reason for r in trace.steps if r.decision == "full"][3:] == ["max_spec"] * (s["full_steps"] - 3)
    run_len = 0
    for d in decisions:
        run_len = run_len + 1 if d != "full" else 0
        assert run_len <= 4
    assert decisions[3:8] == ["accepted"] * 4 + ["full"]  # exactly 4, then forced full
    assert s["ideal_speedup"] > 1.5


@pytest.mark.parametrize("forecast", FORECASTS)
def test_tight_threshold_rejects_after_grace_and_recomputes(pipe, baseline, forecast):
    cfg = accel.SpeCaConfig(forecast=forecast, threshold=0.0, warmup_steps=2, min_spec_steps=2, max_spec_steps=8)
    with accel.apply(pipe, cfg) as handle:
        run(pipe, STEPS)
        recs = handle.trace.steps
    by_step = {r.step: r for r in recs}
    # steps 2 and 3 are the grace period (accepted whatever the error), step 4 is verified and rejected
    assert [by_step[i].decision for i in range(5)] == ["full", "full", "accepted", "accepted", "rejected"]
    assert by_step[2].reason == by_step[3].reason == "grace"
    assert by_step[4].reason == "recomputed" and by_step[4].error > 0
    n_blocks = recs[0].blocks_total
    assert by_step[4].blocks_computed == n_blocks + 1  # the verify block, then the full recompute
    assert all(r.error is not None for r in recs if r.decision != "full")


@pytest.mark.parametrize("forecast", FORECASTS)
def test_defer_policy_makes_next_step_full(pipe, forecast):
    cfg = accel.SpeCaConfig(forecast=forecast, threshold=0.0, warmup_steps=2, min_spec_steps=0, on_reject="defer")
    with accel.apply(pipe, cfg) as handle:
        run(pipe, STEPS)
        recs = handle.trace.steps
    assert recs[2].decision == "rejected" and recs[2].reason == "deferred"
    assert recs[2].blocks_computed == 1
    assert recs[3].decision == "full" and recs[3].reason == "after_reject"


@pytest.mark.parametrize("forecast", FORECASTS)
def test_schedule_replay_reproduces_run(pipe, forecast):
    cfg = accel.SpeCaConfig(forecast=forecast, threshold=8.0, min_spec_steps=1)
    with accel.apply(pipe, cfg) as handle:
        first = run(pipe, STEPS)
        trace = handle.trace
    schedule = trace.schedule()
    assert len(schedule) == STEPS and schedule[0]
    with accel.apply(pipe, accel.SpeCaConfig(schedule=schedule, forecast=forecast)) as handle:
        replay = run(pipe, STEPS)
        assert handle.trace.schedule() == schedule
    assert torch.equal(first, replay)


def test_schedule_shorter_than_the_run_ends_with_full_steps(pipe):
    with accel.apply(pipe, accel.SpeCaConfig(schedule=[True, True, False, False])) as handle:
        run(pipe, 6)
    recs = handle.trace.steps
    assert [r.decision for r in recs] == ["full", "full", "accepted", "accepted", "full", "full"]
    assert all(r.reason == "schedule" for r in recs)


def test_without_maps_the_run_is_the_same(pipe):
    runs = []
    for maps in (True, False):
        with accel.apply(pipe, accel.SpeCaConfig(threshold=8.0, min_spec_steps=1, record_maps=maps)) as handle:
            runs.append((run(pipe, STEPS), handle.trace))
    (out, trace), (out_nomaps, trace_nomaps) = runs
    assert torch.equal(out, out_nomaps)
    assert [(r.decision, r.errors) for r in trace_nomaps.steps] == [(r.decision, r.errors) for r in trace.steps]
    assert all(r.maps == {} for r in trace_nomaps.steps)
    assert sum("error" in r.maps for r in trace.steps) == sum(r.errors is not None for r in trace.steps) > 0


def test_verify_block_in_the_double_stream(pipe):
    """verify_block=0, a double block: its MLP feature holds the image tokens only; the error map covers them."""
    with accel.apply(pipe, accel.SpeCaConfig(threshold=1e9, min_spec_steps=0, verify_block=0)) as handle:
        run(pipe, 6)
    spec = [r for r in handle.trace.steps if r.decision == "accepted"]
    assert spec and all(r.error > 0 and r.maps["error"].shape == (4, 4) and (r.maps["error"] > 0).all()
                        for r in spec)


def test_reference_form_runs(pipe, baseline):
    with accel.apply(pipe, accel.SpeCaConfig(threshold=1e9, taylor_form="reference")) as handle:
        out = run(pipe, STEPS)
    assert torch.isfinite(out).all()
    assert handle.trace.summary()["accepted_steps"] > 0
    assert 0 < ((out - baseline).norm() / baseline.norm()).item() < 0.5


SIGMA_SCHEDULE = [True, True, True, False, False, True, False, False, True, False, False, False]


def _replay(pipe, distance, **kw):
    # the stack forecast: on random weights the model's output (forecast="output") is too rough for the bound below
    cfg = accel.SpeCaConfig(schedule=SIGMA_SCHEDULE, order=2, distance=distance, forecast="stack")
    with accel.apply(pipe, cfg) as handle:
        out = FLUX.run(pipe, **kw)
        trace = handle.trace
    return out, trace


def test_sigma_distance_forecasts_in_sigma_coordinates():
    """A forecast is the interpolating polynomial through the last full steps, and that does not change under an
    affine change of coordinate. So where the sigmas are affine in the step index, "sigma" and "step" distances
    forecast the same features; on a shifted (non-linear) schedule they must not."""
    pipe = tiny_flux_pipe()
    affine = [float(s) for s in np.linspace(1.0, 0.2, STEPS)]
    out_step, _ = _replay(pipe, "step", sigmas=affine)
    out_sigma, trace = _replay(pipe, "sigma", sigmas=affine)
    assert [r.sigma for r in trace.steps] == pytest.approx(affine)
    torch.testing.assert_close(out_sigma, out_step, rtol=1e-5, atol=1e-6)

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    out_step, _ = _replay(pipe, "step")
    out_sigma, trace = _replay(pipe, "sigma")
    sig = [r.sigma for r in trace.steps]
    gaps = -np.diff(sig)
    assert gaps.max() / gaps.min() > 3  # the schedule is far from affine in the step index
    plain = FLUX.run(pipe)
    for out in (out_step, out_sigma):
        assert 0 < ((out - plain).norm() / plain.norm()).item() < 0.05
    assert ((out_sigma - out_step).norm() / out_step.norm()).item() > 1e-3


# ---- batches ------------------------------------------------------------------------------------------------
def _two_samples():
    prompt = FLUX.prompt(1, 2)
    return prompt, FLUX.latents(21, 2)


def _first_verified(cfg, **kw):
    pipe = tiny_flux_pipe()
    with accel.apply(pipe, cfg) as handle:
        FLUX.run(pipe, **kw)
        return handle.trace.steps[2]


@pytest.mark.parametrize("forecast", FORECASTS)
def test_batch_step_is_accepted_only_if_every_sample_passes(forecast):
    """Step 2 is the first verified step (2 warm-up steps, no grace): its per-sample errors do not depend on
    the threshold. With a threshold between the two samples' errors the step is rejected; above both, accepted."""
    prompt, x = _two_samples()
    kw = dict(batch=2, latents=x, **prompt)
    base = dict(decay=1.0, warmup_steps=2, min_spec_steps=0, forecast=forecast)
    rec = _first_verified(accel.SpeCaConfig(threshold=1e9, **base), **kw)
    lo, hi = sorted(rec.errors)
    assert rec.decision == "accepted" and rec.reason == "verified" and len(rec.errors) == 2
    assert rec.error == hi and hi > 1.05 * lo
    # each sample's error is its own: the same as that sample run alone
    for b in range(2):
        alone = _first_verified(accel.SpeCaConfig(threshold=1e9, **base), latents=x[b:b + 1],
                                prompt_embeds=prompt["prompt_embeds"][b:b + 1],
                                pooled_prompt_embeds=prompt["pooled_prompt_embeds"][b:b + 1])
        # (rel_l1 is elementwise and ill-conditioned: batch-1 and batch-2 matmuls differ in the 4th digit)
        assert alone.errors[0] == pytest.approx(rec.errors[b], rel=1e-2)
    between = _first_verified(accel.SpeCaConfig(threshold=(lo + hi) / 2, **base), **kw)
    assert between.errors == pytest.approx(rec.errors, rel=1e-6)
    assert between.threshold == pytest.approx((lo + hi) / 2)
    assert between.decision == "rejected" and between.reason == "recomputed"
    above = _first_verified(accel.SpeCaConfig(threshold=hi * 1.01, **base), **kw)
    assert above.decision == "accepted"


# ---- verification metrics (accel/metrics.py) against hand computations ----------------------------------------
def _metric_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2, 10, 6, generator=g, dtype=torch.float64)
    real[1] *= 40.0  # samples of very different scale: a pooled or unnormalised metric cannot pass
    pred = real + torch.randn(2, 10, 6, generator=g, dtype=torch.float64) * torch.tensor([0.1, 3.0])[:, None, None]
    return pred.to(dtype), real.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_metric_matches_a_hand_computation(dtype):
    pred, real = _metric_inputs(dtype)
    p, r = pred.double(), real.double()
    eps = 1e-6
    by_hand = {
        "rel_l1": torch.stack([((p[b] - r[b]).abs() / (r[b].abs() + eps)).mean() for b in range(2)]),
        "rel_l2": torch.stack([(p[b] - r[b]).norm() / (r[b].norm() + eps) for b in range(2)]),
        "cosine": torch.stack([1 - (p[b] * r[b]).sum() / (p[b].norm() * r[b].norm()) for b in range(2)]),
    }
    keep_p, keep_r = pred.clone(), real.clone()
    for metric, expect in by_hand.items():
        err, tok = verification_errors(pred, real, metric, eps)
        assert err.shape == (2,) and err.dtype == torch.float32 and tok is None
        torch.testing.assert_close(err.double(), expect, rtol=1e-5, atol=1e-6)
        assert torch.equal(pred, keep_p) and torch.equal(real, keep_r)  # inputs untouched
    # the per-token map: per image row, mean |p - r| / (mean |r| + eps), averaged over the batch
    rows = slice(3, 9)
    _, tok = verification_errors(pred, real, "rel_l1", eps, image_rows=rows)
    d = (p - r)[:, rows].abs().mean(-1) / (r[:, rows].abs().mean(-1) + eps)
    torch.testing.assert_close(tok.double(), d.mean(0), rtol=1e-5, atol=1e-6)


def test_metrics_eps_where_the_real_features_vanish():
    """eps keeps every metric finite where the real features are (near) zero; the values by hand."""
    eps = 1e-6
    real = torch.tensor([[[0.0, 0.0], [1.0, -1.0]], [[2.0, 0.0], [0.0, 0.0]]])  # sample 1, row 1: zero
    pred = torch.tensor([[[0.5, 0.0], [1.0, -1.0]], [[2.0, 0.0], [0.25, 0.25]]])
    err, tok = verification_errors(pred, real, "rel_l2", eps, image_rows=slice(1, 2))
    torch.testing.assert_close(err, torch.tensor([0.5 / (2**0.5 + eps), (0.125**0.5) / (2.0 + eps)]))
    # token map of row 1: sample 0 exact (0), sample 1 mean|d| 0.25 over mean|r| 0 + eps; averaged over the batch
    torch.testing.assert_close(tok, torch.tensor([0.25 / eps / 2]))
    zero = torch.zeros(1, 4)
    assert verification_errors(zero + 1.0, zero, "rel_l2", eps)[0].item() == pytest.approx(2.0 / eps)
    # cosine: each norm counts as at least eps (torch's cosine_similarity with eps=eps)
    tiny = torch.tensor([[1e-7, 0.0], [3e-7, 4e-7]])
    other = torch.tensor([[1e-7, 0.0], [3e-7, -4e-7]])
    err, _ = verification_errors(other, tiny, "cosine", eps)
    torch.testing.assert_close(err, torch.tensor([1 - 1e-14 / eps**2, 1 - (9e-14 - 16e-14) / eps**2]))
    with pytest.raises(ValueError, match=r"^metric='l3' is unknown: use one of rel_l1, rel_rms, rel_l2, cosine$"):
        verification_errors(pred, real, "l3", eps)


def test_per_sample_error_is_the_verification_error():
    """`metrics.per_sample_error` (the benchmarks' error of a forecast): verification_errors' error, float32."""
    pred, real = _metric_inputs(torch.float64)
    for metric in ("rel_l1", "rel_rms", "rel_l2", "cosine"):
        for whole in (False, True):
            err = per_sample_error(pred, real, metric, 1e-3, whole_batch=whole)
            assert err.dtype == torch.float32 and err.shape == ((1,) if whole else (2,))
            assert torch.equal(err, verification_errors(pred, real, metric, 1e-3, whole_batch=whole)[0])
    assert torch.equal(per_sample_error(pred, real, "rel_l2", 1e-3),  # per sample unless asked otherwise
                       verification_errors(pred, real, "rel_l2", 1e-3)[0])
    small, large = (per_sample_error(pred, real, "rel_l1", eps) for eps in (1e-3, 10.0))
    assert (small > large).all()  # eps is passed on


def test_whole_batch_error_in_a_run():
    """batch_error="whole_batch": one error for the batch, the elementwise metric over both samples, between the
    two samples' own errors."""
    prompt, x = _two_samples()
    base = dict(threshold=1e9, warmup_steps=2, min_spec_steps=0, metric="rel_l1")
    per = _first_verified(accel.SpeCaConfig(**base), batch=2, latents=x, **prompt)
    whole = _first_verified(accel.SpeCaConfig(batch_error="whole_batch", **base), batch=2, latents=x, **prompt)
    assert len(per.errors) == 2 and len(whole.errors) == 1 and whole.error == whole.errors[0]
    # rel_l1 is a mean over elements, the samples have as many: the whole batch's error is the samples' mean
    assert whole.error == pytest.approx(sum(per.errors) / 2, rel=1e-4)


def test_metrics_in_a_run_are_per_sample():
    """The configured metric reaches the trace: rel_l2 and cosine errors are small numbers in [0, 2], per sample."""
    prompt, x = _two_samples()
    for metric in ("rel_l2", "cosine"):
        rec = _first_verified(accel.SpeCaConfig(threshold=1e9, warmup_steps=2, min_spec_steps=0, metric=metric),
                              batch=2, latents=x, **prompt)
        assert len(rec.errors) == 2 and all(0 < e < 2 for e in rec.errors) and rec.errors[0] != rec.errors[1]


# ---- trace ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("forecast", FORECASTS)
def test_trace_round_trips_and_has_error_maps(pipe, tmp_path, forecast):
    with accel.apply(pipe, accel.SpeCaConfig(forecast=forecast, threshold=1e9)) as handle:
        run(pipe, STEPS, size=64)
    trace = handle.trace
    spec = [r for r in trace.steps if r.decision == "accepted"]
    assert spec and all(torch.tensor(r.maps["error"]).shape == (4, 4) for r in spec)
    assert trace.token_grid == [4, 4]
    path = tmp_path / "t.json"
    trace.to_json(str(path))
    back = accel.Trace.load(path)
    assert back.summary() == trace.summary() and back.steps[5] == trace.steps[5]
    assert back.steps[5].maps["error"].dtype == trace.steps[5].maps["error"].dtype == "float32"
    csv = trace.to_csv()
    assert csv.count("\n") == STEPS + 1 and "decision" in csv.splitlines()[0]
    with pytest.raises(ValueError, match="not a SpecLab trace"):
        accel.Trace.from_json('{"a": 1}')


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(threshold=-1.0), "threshold"),
        (dict(order=5), "order"),
        (dict(decay=0.0), "decay"),
        (dict(min_spec_steps=4, max_spec_steps=2), "max_spec_steps"),
        (dict(metric="l3"), "metric"),
        (dict(on_reject="retry"), "on_reject"),
        (dict(warmup_steps=0), "warmup_steps"),
        (dict(schedule=[False, True]), "schedule"),
        (dict(distance="time"), "distance"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        accel.SpeCaConfig(**kwargs)


def test_bad_pipelines_and_blocks_raise(pipe):
    class NotAPipe:
        transformer = nn.Linear(2, 2)
        scheduler = None

    with pytest.raises(ValueError, match="unsupported model: Linear"):
        accel.apply(NotAPipe(), accel.SpeCaConfig())
    with pytest.raises(ValueError, match="unsupported pipeline"):
        accel.apply(object(), accel.SpeCaConfig())
    with pytest.raises(ValueError, match="verify_block"):
        accel.apply(pipe, accel.SpeCaConfig(verify_block=99))
    with pytest.raises(ValueError, match="unknown config"):
        accel.apply(pipe, {"threshold": 1})
    with accel.apply(pipe, accel.SpeCaConfig()):
        with pytest.raises(ValueError, match="already attached"):
            accel.apply(pipe, accel.SpeCaConfig())


# ---- the stack forecast ---------------------------------------------------------------------------------
def _lagrange(xs, ys, x):
    """The polynomial through (xs, ys) at x, in float64 (independent of accel.taylor)."""
    out = 0.0
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (x - xj) / (xi - xj)
        out = out + w * yi
    return out


@pytest.mark.parametrize("order", [1, 2])
def test_stack_forecast_is_the_polynomial_through_the_recorded_stacks(pipe, order):
    """On a speculative step the verify block receives the streams entering the first block plus the
    interpolating polynomial (degree = order) through the full steps' recorded growth of the streams up to the
    verify block: so a stack whose growth is a polynomial of degree <= order in the step is forecast exactly."""
    schedule = [True, True, True, False, False, True, False, False, False, True, False, False]
    seen = _record_stack(pipe, accel.SpeCaConfig(schedule=schedule, order=order, forecast="stack"), STEPS)
    full = [i for i, f in enumerate(schedule) if f]
    for k in (i for i, f in enumerate(schedule) if not f):
        nodes = [i for i in full if i < k][-(order + 1):]
        for s in ("img", "txt"):
            growth = [seen[i][f"v_{s}"] - seen[i][s] for i in nodes]
            expected = seen[k][s] + _lagrange(nodes, growth, float(k))
            torch.testing.assert_close(seen[k][f"v_{s}"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_output_forecast_is_the_polynomial_through_the_full_steps_outputs(pipe, order):
    """forecast="output": a speculative step's model output is the interpolating polynomial (degree = order)
    through the outputs of the last full steps, and the verification still runs (an error on every speculative
    step); a full step's output is the model's own."""
    t = pipe.transformer
    outs = []
    schedule = [True, True, True, False, False, True, False, False, False, True, False, False]
    with accel.apply(pipe, accel.SpeCaConfig(schedule=schedule, order=order, forecast="output")) as handle:
        hooked = t.forward
        t.forward = lambda *a, **k: outs.append(hooked(*a, **k)[0].double()) or (outs[-1].float(),)
        try:
            run(pipe, STEPS)
        finally:
            del t.forward
    full = [i for i, f in enumerate(schedule) if f]
    for k in (i for i, f in enumerate(schedule) if not f):
        nodes = [i for i in full if i < k][-(order + 1):]
        expected = _lagrange(nodes, [outs[i] for i in nodes], float(k))
        torch.testing.assert_close(outs[k], expected, rtol=1e-5, atol=1e-5)
    assert all((r.error is not None) == (r.decision != "full") for r in handle.trace.steps)


def _record_stack(pipe, cfg, steps):
    """Per step: the streams entering the first block ("img", "txt") and the verify block (the last one: "v_img",
    "v_txt"), in float64, from plain torch hooks."""
    t = pipe.transformer
    seen: dict[int, dict] = {}
    step = {"i": -1}

    def count(mod, args, kwargs):
        step["i"] += 1

    def first_in(name):
        def hook(mod, inp, out):
            seen.setdefault(step["i"], {})[name] = out.double()
        return hook

    def verify_in(mod, args, kwargs):
        seen.setdefault(step["i"], {}).update(v_img=kwargs["hidden_states"].double(),
                                              v_txt=kwargs["encoder_hidden_states"].double())

    handles = [t.register_forward_pre_hook(count, with_kwargs=True),
               t.x_embedder.register_forward_hook(first_in("img")),
               t.context_embedder.register_forward_hook(first_in("txt")),
               t.single_transformer_blocks[-1].register_forward_pre_hook(verify_in, with_kwargs=True)]
    try:
        with accel.apply(pipe, cfg):
            run(pipe, steps)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_stack_forecast_restarts_in_the_warmup(pipe):
    """warmup_restarts_taylor: the full steps before step warmup_steps - 1 start the terms again, so step 5 of
    F s F s F s ... (warm-up 5) is forecast from steps 2 and 4 only (a line), not from 0, 2 and 4."""
    schedule = [True, False, True, False, True, False, False, True, False]
    cfg = accel.SpeCaConfig(schedule=schedule, order=2, forecast="stack", warmup_steps=5, warmup_restarts_taylor=True)
    seen = _record_stack(pipe, cfg, len(schedule))
    since = {1: [0], 3: [2], 5: [2, 4], 6: [2, 4], 8: [2, 4, 7]}  # full steps the forecast of step k goes through
    for k, nodes in since.items():
        for s in ("img", "txt"):
            growth = [seen[i][f"v_{s}"] - seen[i][s] for i in nodes]
            expected = seen[k][s] + _lagrange(nodes, growth, float(k))
            torch.testing.assert_close(seen[k][f"v_{s}"], expected, rtol=1e-4, atol=1e-4)
    growth = [seen[i]["v_img"] - seen[i]["img"] for i in (0, 2, 4)]
    quadratic = seen[5]["img"] + _lagrange([0, 2, 4], growth, 5.0)  # what step 5 would be without the restarts
    assert (seen[5]["v_img"] - quadratic).norm() / growth[-1].norm() > 0.1


def test_stack_forecast_with_a_bf16_cache(pipe):
    """cache_dtype="bfloat16": the recorded growth is kept in bf16 and the forecast is still the line through it,
    to bf16 rounding of the streams whose difference the growth is (measured: at most 0.75 % of a stream)."""
    schedule = [True, True, True, False, False, True, False, False, False]
    seen = _record_stack(pipe, accel.SpeCaConfig(schedule=schedule, order=1, forecast="stack", cache_dtype="bfloat16"),
                         len(schedule))
    full = [i for i, f in enumerate(schedule) if f]
    for k in (i for i, f in enumerate(schedule) if not f):
        nodes = [i for i in full if i < k][-2:]
        for s in ("img", "txt"):
            growth = [seen[i][f"v_{s}"] - seen[i][s] for i in nodes]
            expected = seen[k][s] + _lagrange(nodes, growth, float(k))
            err = ((seen[k][f"v_{s}"] - expected).norm() / seen[k][s].norm()).item()
            assert err < 0.02, (k, s, err)


@pytest.mark.parametrize("forecast", FORECASTS)
def test_a_speculative_step_repeating_a_full_step_reproduces_it(pipe, forecast):
    """Sigmas 1, 0.6, 0.6, 0.3: step 2 has step 1's latents (the Euler step between them is 0) and timestep, so its
    order-0 forecast is exactly step 1's features and gates. Whichever block verifies, and whether it keeps its
    real output or its forecast, the speculative step 2 gives step 1's model output (to summation order)."""
    outs = []
    hook = pipe.transformer.register_forward_hook(lambda mod, args, kwargs, out: outs.append(out[0].clone()),
                                                  with_kwargs=True)
    try:
        for verify_block in (0, 1, 3, -1):
            for verify_output in ("real", "forecast"):
                outs.clear()
                cfg = accel.SpeCaConfig(schedule=[True, True, False, True], order=0, forecast=forecast,
                                        verify_block=verify_block, verify_output=verify_output)
                with accel.apply(pipe, cfg) as handle:
                    run(pipe, 4, sigmas=[1.0, 0.6, 0.6, 0.3])
                assert [r.decision for r in handle.trace.steps] == ["full", "full", "accepted", "full"]
                assert handle.trace.steps[2].error < 1e-4
                torch.testing.assert_close(outs[2], outs[1], rtol=1e-5, atol=1e-5,
                                           msg=f"verify_block={verify_block}, verify_output={verify_output}")
    finally:
        hook.remove()


def test_per_block_gates_of_modulation_linears_with_and_without_bias():
    """The per-block forecast's gates come from every modulation linear's rows in one product: with every other
    linear bias-free (the others keep their biases), or all of them, step 2 repeating step 1 still gives step 1's
    output."""
    for unbiased in ("every other", "all"):
        p = tiny_flux_pipe()
        for i, lin in enumerate(adapter_for(p.transformer).modulation_linears()):
            if unbiased == "all" or i % 2 == 0:
                lin.bias = None
        outs = []
        p.transformer.register_forward_hook(lambda mod, args, kwargs, out: outs.append(out[0].clone()),
                                            with_kwargs=True)
        with accel.apply(p, accel.SpeCaConfig(schedule=[True, True, False, True], order=0, forecast="per_block")) as h:
            run(p, 4, sigmas=[1.0, 0.6, 0.6, 0.3])
        assert h.trace.steps[2].error < 1e-4, unbiased
        torch.testing.assert_close(outs[2], outs[1], rtol=1e-5, atol=1e-5, msg=unbiased)


def test_stack_forecast_after_a_verify_block_in_the_middle(pipe):
    """verify_block=1 (the last double block): on a speculative step the streams leaving the model's last block are
    the verify block's real output plus the polynomial through the full steps' growth from the verify block's
    output to the last block's."""
    t = pipe.transformer
    seen: dict[int, dict] = {}
    step = {"i": -1}

    def count(mod, args, kwargs):
        step["i"] += 1

    def verify_out(mod, args, kwargs, out):
        seen.setdefault(step["i"], {})["v"] = out[1].double()  # a double block returns (text, image)

    def last_out(mod, args, kwargs):
        seen.setdefault(step["i"], {})["last"] = args[0].double()  # norm_out takes the image stream

    handles = [t.register_forward_pre_hook(count, with_kwargs=True),
               t.transformer_blocks[1].register_forward_hook(verify_out, with_kwargs=True),
               t.norm_out.register_forward_pre_hook(last_out, with_kwargs=True)]
    schedule = [True, True, True, False, False, True, False, False]
    try:
        with accel.apply(pipe, accel.SpeCaConfig(schedule=schedule, order=2, forecast="stack", verify_block=1)):
            run(pipe, len(schedule))
    finally:
        for h in handles:
            h.remove()
    full = [i for i, f in enumerate(schedule) if f]
    for k in (i for i, f in enumerate(schedule) if not f):
        nodes = [i for i in full if i < k][-3:]
        growth = [seen[i]["last"] - seen[i]["v"] for i in nodes]
        expected = seen[k]["v"] + _lagrange(nodes, growth, float(k))
        torch.testing.assert_close(seen[k]["last"], expected, rtol=1e-4, atol=1e-4)


def test_stack_cache_bytes_with_the_first_block_verifying(pipe):
    """verify_block=0: nothing before it, so the stack keeps only the growth after it and its feature."""
    order = 1
    with accel.apply(pipe, accel.SpeCaConfig(threshold=1e9, order=order, forecast="stack", verify_block=0)) as handle:
        run(pipe, STEPS)
    C, n_img, n_txt, f32 = pipe.transformer.inner_dim, 16, 8, 4
    # growth after it: image + text rows; its feature: the image MLP output (image rows)
    assert handle.trace.meta["cache_bytes_terms"] == (order + 1) * ((n_img + n_txt) + n_img) * C * f32


@pytest.mark.parametrize("forecast", FORECASTS)
def test_verify_block_in_the_middle(pipe, baseline, forecast):
    """A verify block that is not the last: the blocks after it are forecast too; one block computed per
    speculative step, and an all-full run stays bit-identical."""
    with accel.apply(pipe, accel.SpeCaConfig(schedule=[True] * STEPS, verify_block=1, forecast=forecast)):
        assert torch.equal(run(pipe, STEPS), baseline)
    calls = []
    linears = [m for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear) and "transformer_blocks" in n]
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in linears]
    cfg = accel.SpeCaConfig(threshold=1e9, min_spec_steps=1, verify_block=1, forecast=forecast)
    try:
        with accel.apply(pipe, cfg) as handle:
            out = run(pipe, STEPS)
    finally:
        for h in hooks:
            h.remove()
    s = handle.trace.summary()
    per_double = sum(1 for m in pipe.transformer.transformer_blocks[1].modules() if isinstance(m, nn.Linear))
    assert s["accepted_steps"] > 0
    assert len(calls) == s["full_steps"] * len(linears) + s["accepted_steps"] * per_double
    assert all(r.error is not None and r.error > 0 for r in handle.trace.steps if r.decision != "full")
    rel = ((out - baseline).norm() / baseline.norm()).item()
    # random weights: the model's output jumps from step to step, so forecasting it directly is far off (0.94
    # measured); forecasting the blocks stays closer. The trained models behave the other way (docs/speca.md).
    assert 0 < rel < (0.5 if forecast != "output" else 1.5)


@pytest.mark.parametrize("forecast", FORECASTS)
def test_cache_bytes_count_what_is_kept(pipe, forecast):
    order = 1
    with accel.apply(pipe, accel.SpeCaConfig(threshold=1e9, order=order, forecast=forecast)) as handle:
        run(pipe, STEPS)
    meta = handle.trace.meta
    t = pipe.transformer
    C, n_img, n_txt, f32 = t.inner_dim, 16, 8, 4  # 64 x 64 -> 4 x 4 image tokens
    n_double, n_single = len(t.transformer_blocks), len(t.single_transformer_blocks)
    if forecast in ("stack", "output"):
        # streams' growth up to the verify block (image + text rows) and the verify block's proj_out (joint rows)
        terms = (order + 1) * ((n_img + n_txt) + (n_img + n_txt)) * C * f32
        if forecast == "output":  # and the model's output: image tokens x the output channels
            terms += (order + 1) * n_img * t.out_channels * f32
        gates = 0
    else:
        rows = n_double * 2 * (n_img + n_txt) + n_single * (n_img + n_txt)  # attn, ff (+ ctx); proj_out
        terms = (order + 1) * rows * C * f32
        gates = (4 * n_double + n_single) * (C * C + C) * f32  # stacked gate rows of the modulation linears
    rotary = 2 * (n_img + n_txt) * t.config.attention_head_dim * f32  # pos_embed's (cos, sin), kept for the run
    assert meta["cache_bytes_terms"] == terms
    assert meta["cache_bytes"] == terms + gates + rotary
    # cache_dtype="bfloat16": the terms take half the bytes (the gate rows stay in the model's dtype)
    cfg = accel.SpeCaConfig(threshold=1e9, order=order, forecast=forecast, cache_dtype="bfloat16")
    with accel.apply(pipe, cfg) as handle:
        run(pipe, STEPS)
    assert handle.trace.meta["cache_bytes_terms"] == terms // 2
    assert handle.trace.meta["cache_bytes"] == terms // 2 + gates + rotary


def test_unsynchronised_runs_decide_alike(pipe):
    """sync_timing=False defers only the errors no decision needs: the steps judged by the threshold are still
    verified at once, so the decisions (rejections included) and the output are the synchronised run's."""
    runs = []
    for sync in (True, False):
        with accel.apply(pipe, accel.SpeCaConfig(threshold=0.05, decay=1.0, sync_timing=sync)) as handle:
            out = run(pipe, STEPS)
        runs.append((out, [(r.decision, r.reason, r.error) for r in handle.trace.steps]))
    assert any(d == "rejected" for d, _, _ in runs[0][1]) and any(d == "accepted" for d, _, _ in runs[0][1])
    assert runs[1][1] == runs[0][1] and torch.equal(runs[1][0], runs[0][0])


def test_a_run_that_starts_late_is_full_until_it_has_history(pipe):
    """img2img (strength 0.5): the run starts at step 6, past the warm-up steps' numbers, with no forecast history:
    its first step is full ("no_history"), the others then follow the threshold."""
    from diffusers import FluxImg2ImgPipeline

    p = FluxImg2ImgPipeline(**pipe.components)
    p.set_progress_bar_config(disable=True)
    pe, pooled = embeds()
    x = torch.randn(1, 16, pipe.transformer.config.in_channels, generator=torch.Generator().manual_seed(3))
    with accel.apply(p, accel.SpeCaConfig(threshold=1e9, warmup_steps=3)) as handle:
        p(prompt_embeds=pe, pooled_prompt_embeds=pooled, image=torch.zeros(1, 3, 64, 64), latents=x, height=64,
          width=64, num_inference_steps=STEPS, strength=0.5, output_type="latent")
    steps = handle.trace.steps
    assert steps[0].step == STEPS // 2 and (steps[0].decision, steps[0].reason) == ("full", "no_history")
    assert all(r.decision != "full" for r in steps[1:])


def test_warmup_steps_are_full_and_say_so(pipe):
    cfg = accel.SpeCaConfig(threshold=1e9, warmup_steps=3, spec_after_full=False)
    with accel.apply(pipe, cfg) as handle:
        run(pipe, STEPS)
    steps = handle.trace.steps
    assert [(r.decision, r.reason) for r in steps[:3]] == [("full", "warmup")] * 3
    assert all(r.reason != "warmup" for r in steps[3:])


def test_errors_no_decision_needs_fill_the_trace_of_an_unsynchronised_run(pipe):
    """sync_timing=False: an error that no decision needs is read without a host sync (`DeviceReads`: on a GPU
    once the device has run the step; on the CPU at once) and fills its record and the trace's series; an
    `on_step` viewer asks for no read of its own."""
    seen = []
    cfg = accel.SpeCaConfig(schedule=[True, True, True, False, False, True] * 2, sync_timing=False)
    with accel.apply(pipe, cfg) as handle:
        handle.on_step = lambda r: seen.append(r.error)
        run(pipe, STEPS)
        handle.on_step = None
        run(pipe, STEPS)
    spec = [i for i, f in enumerate(cfg.schedule) if not f]
    assert all(seen[i] is not None for i in spec)
    first, second = handle.traces
    assert [r.error for r in second.steps] == [r.error for r in first.steps] == seen
    series = second.series().error
    assert np.isfinite(series[spec]).all() and series[spec] == pytest.approx([seen[i] for i in spec])
    assert all(second.steps[i].maps["error"].shape == (4, 4) for i in spec)


@pytest.mark.parametrize("forecast", FORECASTS)
def test_unverified_steps_keep_the_forecast_of_every_block(pipe, baseline, forecast):
    """verify_in_grace=False: a grace step computes no block (the verify block's output is forecast too) and
    traces no error; a judged step computes the verify block. verify_output="forecast" keeps the forecast on a
    verified step too, so its output does not depend on whether the step verified."""
    cfg = dict(forecast=forecast, threshold=1e9, warmup_steps=2, min_spec_steps=2, max_spec_steps=4)
    with accel.apply(pipe, accel.SpeCaConfig(verify_in_grace=False, **cfg)) as handle:
        out = run(pipe, STEPS)
    spec = [r for r in handle.trace.steps if r.decision != "full"]
    assert [r.reason for r in spec][:3] == ["grace", "grace", "verified"]
    assert all((r.blocks_computed, r.error is None) == ((0, True) if r.reason == "grace" else (1, False))
               for r in spec)
    assert 0 < ((out - baseline).norm() / baseline.norm()).item() < 0.5
    with accel.apply(pipe, accel.SpeCaConfig(verify_in_grace=False, verify_output="forecast", **cfg)):
        unverified_output = run(pipe, STEPS)
    with accel.apply(pipe, accel.SpeCaConfig(verify_in_grace=True, verify_output="forecast", **cfg)) as handle:
        verified_output = run(pipe, STEPS)
    assert all(r.error is not None for r in handle.trace.steps if r.decision != "full")
    torch.testing.assert_close(verified_output, unverified_output, rtol=0, atol=0)


def test_controlnet_residuals_are_refused_on_a_speculative_step(pipe):
    t = pipe.transformer
    samples = [torch.zeros(1, 16, t.inner_dim)]

    def with_controlnet(mod, args, kwargs):
        return args, {**kwargs, "controlnet_block_samples": samples}

    hook = t.register_forward_pre_hook(with_controlnet, with_kwargs=True, prepend=True)
    try:
        with accel.apply(pipe, accel.SpeCaConfig(schedule=[True] * 3 + [False] * (STEPS - 3))):
            with pytest.raises(NotImplementedError, match="ControlNet"):
                run(pipe, STEPS)
    finally:
        hook.remove()


class _CountedReads(torch.Tensor):
    """A tensor that counts the reads that would wait for a device (float(), item(), cpu(), tolist())."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__float__, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_locating_a_step_reads_the_schedule_once_per_run(pipe):
    """The scheduler's sigmas (and timesteps) live on the device during a run: a step's location reads a host copy
    taken once per schedule, never the device tensor each step (that would stall every speculative step)."""
    from types import SimpleNamespace

    from diffusers.hooks import HookRegistry

    with accel.apply(pipe, accel.SpeCaConfig()):
        driver = HookRegistry.check_if_exists_or_initialize(pipe.transformer).get_hook("speclab_speca")
        sigmas = torch.linspace(1.0, 0.0, STEPS + 1).as_subclass(_CountedReads)
        timesteps = (torch.linspace(1.0, 0.0, STEPS + 1)[:-1] * 1000).as_subclass(_CountedReads)
        real = driver.pipe
        driver.pipe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=timesteps, sigmas=sigmas, step_index=0))
        state = accel.speca.SpeCaState()
        reads = []
        try:
            with pipe.transformer.cache_context("cond"):
                for i in range(STEPS):
                    driver.pipe.scheduler.step_index = i
                    info = driver._locate(state, (), {})
                    reads.append(_CountedReads.reads)
                    state.last_step = i
                    assert info.sigma == pytest.approx(1.0 - i / STEPS) and info.step == i
        finally:
            driver.pipe = real
    assert reads[0] > 0 and reads[-1] == reads[0]  # the first step copies the schedule; later steps read nothing
