"""SpeCa on a tiny random FLUX: exactness, real compute savings, decision rules, state isolation, errors."""

import math

import pytest
import torch
from torch import nn

import accel
from accel.adapters import adapter_for
import torch.nn.functional as F

from accel.adapters import TokenLayout
from accel.kernels import accumulate
from accel.taylor import TaylorForecaster
from tiny import embeds, run, tiny_flux_pipe

STEPS = 12


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipe()


@pytest.fixture(scope="module")
def baseline(pipe):
    return run(pipe, STEPS)


class LinearCounter:
    """Counts real calls of every nn.Linear inside the transformer blocks (plain torch forward hooks)."""

    def __init__(self, transformer):
        self.calls = 0
        self.handles = []
        for name, m in transformer.named_modules():
            if isinstance(m, nn.Linear) and "transformer_blocks" in name:
                self.handles.append(m.register_forward_hook(self._hit))

    def _hit(self, *_):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


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


def test_threshold_schedule():
    cfg = accel.SpeCaConfig(threshold=7.0, decay=0.3)
    assert cfg.threshold_at(0, 50) == pytest.approx(7.0)
    assert cfg.threshold_at(25, 50) == pytest.approx(7.0 * math.sqrt(0.3))
    assert cfg.threshold_at(50, 50) == pytest.approx(2.1)
    assert accel.SpeCaConfig(decay=1.0).threshold_at(40, 50) == pytest.approx(7.0)


# ---- exactness ----------------------------------------------------------------------------------------
def test_all_full_is_bit_identical_and_remove_restores(pipe, baseline):
    handle = accel.apply(pipe, accel.SpeCaConfig(schedule=[True] * STEPS))
    out = run(pipe, STEPS)
    assert torch.equal(out, baseline)
    s = handle.trace.summary()
    assert s["full_steps"] == STEPS and s["ideal_speedup"] == 1.0
    handle.remove()
    assert torch.equal(run(pipe, STEPS), baseline)


def test_remove_after_speculation_restores_baseline(pipe, baseline):
    with accel.apply(pipe, accel.SpeCaConfig(threshold=1e9)) as handle:
        out = run(pipe, STEPS)
        assert handle.trace.summary()["accepted_steps"] > 0
        assert not torch.equal(out, baseline)
    assert torch.equal(run(pipe, STEPS), baseline)


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
def test_loose_threshold_drops_real_block_compute(pipe):
    counter = LinearCounter(pipe.transformer)
    run(pipe, STEPS)
    plain_calls = counter.calls
    counter.calls = 0
    cfg = accel.SpeCaConfig(threshold=1e9, warmup_steps=3, min_spec_steps=1, max_spec_steps=4)
    with accel.apply(pipe, cfg) as handle:
        run(pipe, STEPS)
        trace = handle.trace
    accel_calls = counter.calls
    counter.close()
    n_blocks = len(adapter_for(pipe.transformer).blocks())
    s = trace.summary()
    assert accel_calls < plain_calls
    # leaf-layer calls agree with the trace's block count: full steps run every block, accepted ones
    # only the verify block (a single block: 3 linears of the 7 a double block has... count per step)
    per_full = plain_calls / STEPS
    verify_linears = sum(1 for m in pipe.transformer.single_transformer_blocks[-1].modules() if isinstance(m, nn.Linear))
    expected = s["full_steps"] * per_full + s["accepted_steps"] * verify_linears
    assert accel_calls == expected
    assert s["blocks_computed"] == s["full_steps"] * n_blocks + s["accepted_steps"]
    decisions = [r.decision for r in trace.steps]
    assert decisions[:3] == ["full"] * 3
    # max_spec_steps: never more than 4 speculative steps in a row
    run_len = 0
    for d in decisions:
        run_len = run_len + 1 if d != "full" else 0
        assert run_len <= 4
    assert s["ideal_speedup"] > 1.5


def test_tight_threshold_rejects_after_grace_and_recomputes(pipe, baseline):
    cfg = accel.SpeCaConfig(threshold=0.0, warmup_steps=2, min_spec_steps=2, max_spec_steps=8)
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


def test_defer_policy_makes_next_step_full(pipe):
    cfg = accel.SpeCaConfig(threshold=0.0, warmup_steps=2, min_spec_steps=0, on_reject="defer")
    with accel.apply(pipe, cfg) as handle:
        run(pipe, STEPS)
        recs = handle.trace.steps
    assert recs[2].decision == "rejected" and recs[2].reason == "deferred"
    assert recs[2].blocks_computed == 1
    assert recs[3].decision == "full" and recs[3].reason == "after_reject"


def test_schedule_replay_reproduces_run(pipe):
    cfg = accel.SpeCaConfig(threshold=8.0, min_spec_steps=1)
    with accel.apply(pipe, cfg) as handle:
        first = run(pipe, STEPS)
        trace = handle.trace
    schedule = trace.schedule()
    assert len(schedule) == STEPS and schedule[0]
    with accel.apply(pipe, accel.SpeCaConfig(schedule=schedule)) as handle:
        replay = run(pipe, STEPS)
        assert handle.trace.schedule() == schedule
    assert torch.equal(first, replay)


def test_sigma_distance_and_reference_form_run(pipe, baseline):
    for cfg in (accel.SpeCaConfig(threshold=1e9, distance="sigma"), accel.SpeCaConfig(threshold=1e9, taylor_form="reference")):
        with accel.apply(pipe, cfg) as handle:
            out = run(pipe, STEPS)
        assert torch.isfinite(out).all()
        assert handle.trace.summary()["accepted_steps"] > 0
        rel = ((out - baseline).norm() / baseline.norm()).item()
        assert rel < 0.5


# ---- state isolation -------------------------------------------------------------------------------------
def test_interleaved_pipelines_do_not_share_state():
    a, b = tiny_flux_pipe(seed=0), tiny_flux_pipe(seed=5)
    cfg = dict(threshold=1e9, min_spec_steps=1)
    with accel.apply(a, accel.SpeCaConfig(**cfg)):
        alone_a = run(a, STEPS)
    with accel.apply(b, accel.SpeCaConfig(**cfg)):
        alone_b = run(b, STEPS, seed=3)
    ha, hb = accel.apply(a, accel.SpeCaConfig(**cfg)), accel.apply(b, accel.SpeCaConfig(**cfg))
    inner = {}

    def in_the_middle(p, i, t, kw):
        if i == 5:  # a whole run of b inside step 5 of a
            inner["b"] = run(b, STEPS, seed=3)
        return kw

    out_a = run(a, STEPS, callback_on_step_end=in_the_middle)
    assert torch.equal(out_a, alone_a) and torch.equal(inner["b"], alone_b)
    # and one after another on the same pipeline: the second run starts from a clean state
    again = run(a, STEPS)
    assert torch.equal(again, alone_a)
    assert len(ha.traces) == 2 and len(hb.traces) == 1
    ha.remove(), hb.remove()


def test_true_cfg_keeps_separate_states(pipe):
    pe, pooled = embeds(seed=1)
    ne, npooled = embeds(seed=2)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=ne,
              negative_pooled_prompt_embeds=npooled, true_cfg_scale=3.0, height=64, width=64,
              num_inference_steps=STEPS, output_type="latent")
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    with accel.apply(pipe, accel.SpeCaConfig(schedule=[True] * STEPS)) as handle:
        full = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        assert handle.trace.contexts() == ["cond", "uncond"]
    assert torch.equal(full, base)
    with accel.apply(pipe, accel.SpeCaConfig(threshold=1e9, min_spec_steps=1)) as handle:
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        trace = handle.trace
    cond, uncond = trace.for_context("cond"), trace.for_context("uncond")
    assert len(cond) == len(uncond) == STEPS
    assert torch.isfinite(out).all()
    # each branch verified against its own forecast: the errors differ
    assert [r.error for r in cond if r.error] != [r.error for r in uncond if r.error]


def test_batch_decision_uses_every_sample(pipe):
    with accel.apply(pipe, accel.SpeCaConfig(threshold=1e9, min_spec_steps=0)) as handle:
        run(pipe, STEPS, batch=2)
        recs = [r for r in handle.trace.steps if r.errors]
    assert recs and all(len(r.errors) == 2 and r.error == max(r.errors) for r in recs)


# ---- trace ----------------------------------------------------------------------------------------------
def test_trace_round_trips_and_has_error_maps(pipe, tmp_path):
    with accel.apply(pipe, accel.SpeCaConfig(threshold=1e9)) as handle:
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
