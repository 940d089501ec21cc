"""SpecDiff on a tiny random FLUX: warm-up steps exact with K/V caching and scoring on, the K/V processor, cost
accounting, levels, starvation, C2/C3 outputs from each sample's history, the chunked score, one pre-run per CFG
branch, configs. (Exactness, remove(), token rows, isolation, and partial steps and importance against a reference
built from diffusers' attention run for every family in tests/test_contract.py.)"""

import math
import time

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

import accel
from tiny import TXT_LEN, embeds, run, tiny_flux_pipe

# accel internals these tests reach, imported in this one place (a moved module is a one-line change here)
from accel.adapters import TokenLayout, adapter_for
from accel.adapters.kv_attention import AttnControl, attention_received
from accel.specdiff import assign_levels, history_weights, normalise_scores, taylor_weights

STEPS = 12
SIZE = 128  # 8 x 8 = 64 image tokens
N_IMG = 64


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipe()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- exactness ----------------------------------------------------------------------------------------
# (all-full bit-identity, remove(), processors restored: tests/test_contract.py)
def test_full_steps_with_kv_and_scores_are_bit_identical(pipe):
    """Warm-up steps run through our processor (keeping K/V, scoring attention) and the pre-run runs in
    between: the latents after every warm-up step are still exactly the plain pipeline's."""
    def grab(store):
        def cb(p, i, t, kw):
            store.append(kw["latents"].clone())
            return kw
        return cb

    plain, ours = [], []
    run(pipe, STEPS, size=SIZE, callback_on_step_end=grab(plain))
    cfg = accel.SpecDiffConfig(cache_rate=0.9, warmup_steps=4, spec_steps=3, score_every=1)
    with accel.apply(pipe, cfg) as h:
        run(pipe, STEPS, size=SIZE, callback_on_step_end=grab(ours))
        trace = h.trace
    assert [r.decision for r in trace.steps[:5]] == ["full"] * 4 + ["partial"]
    assert trace.steps[3].extra["score_layers"] == 5  # the last warm-up step scored every layer
    for i in range(4):
        assert torch.equal(ours[i], plain[i]), i
    assert not torch.equal(ours[4], plain[4])


def test_processor_full_path_matches_diffusers_processor_bitwise(pipe):
    t = pipe.transformer
    ad = adapter_for(t)
    ctl = AttnControl(score_every=1, score_chunk=3)
    g = torch.Generator().manual_seed(3)
    for layer, attn in enumerate(ad.attention_modules()):
        x = torch.randn(2, 20, t.inner_dim, generator=g)
        ctx = torch.randn(2, TXT_LEN, t.inner_dim, generator=g) if attn.added_kv_proj_dim is not None else None
        n = 20 + (TXT_LEN if ctx is not None else 0)
        rope = t.pos_embed(torch.randint(0, 8, (n, 3), generator=g).float())
        ref = attn.processor(attn, x, ctx, None, rope)
        proc = ad.kv_cache_processor(attn, layer, ctl)
        kv = {}
        ctl.begin("full", kv, store_kv=True, score=True, key_start=TXT_LEN if ctx is not None else 0)
        ours = proc(attn, x, ctx, None, rope)
        ctl.end()
        refs = ref if isinstance(ref, tuple) else (ref,)
        ours = ours if isinstance(ours, tuple) else (ours,)
        assert all(torch.equal(a, b) for a, b in zip(refs, ours))
        assert layer in kv and kv[layer][0].shape[1] == n


@pytest.mark.parametrize("text", [True, False], ids=["text-computed", "text-cached"])
def test_partial_call_with_fresh_cache_reproduces_full_outputs(pipe, text):
    """K/V mechanics: cache every layer's K/V on a full call, then run only some image tokens (latents and
    img_ids restricted, text kept, or with `text=False` no text token at all: `text_tokens="cache"`) on the same
    input: their outputs equal the full call's. Without text, the text rows of every cache stay the full call's."""
    t = pipe.transformer
    ad = adapter_for(t)
    mods = ad.attention_modules()
    originals = [m.processor for m in mods]
    ctl = AttnControl()
    for i, m in enumerate(mods):
        m.set_processor(ad.kv_cache_processor(m, i, ctl))
    try:
        g = torch.Generator().manual_seed(0)
        pe, pooled = embeds()
        ids = torch.zeros(8, 8, 3)
        ids[..., 1] += torch.arange(8)[:, None]
        ids[..., 2] += torch.arange(8)[None, :]
        kw = dict(hidden_states=torch.randn(1, N_IMG, 16, generator=g), encoder_hidden_states=pe,
                  pooled_projections=pooled, timestep=torch.tensor([0.7]), img_ids=ids.reshape(-1, 3),
                  txt_ids=torch.zeros(TXT_LEN, 3), return_dict=False)
        kv = {}
        ctl.begin("full", kv, store_kv=True, score=False)
        full = t(**kw)[0]
        ctl.end()
        idx = torch.tensor([40, 3, 10, 11, 63])  # any order: rows follow the index
        layout = TokenLayout(grid=(8, 8), n_text=TXT_LEN)
        text_kv = {layer: (k_[:, :TXT_LEN].clone(), v_[:, :TXT_LEN].clone()) for layer, (k_, v_) in kv.items()}
        rows = ad.joint_rows(layout, idx, text=text)
        assert rows.tolist() == (list(range(TXT_LEN)) if text else []) + (idx + TXT_LEN).tolist()
        ctl.begin("partial", kv, store_kv=False, score=True, rows=rows, key_start=TXT_LEN)
        a, k = ad.with_call_inputs((), kw, image_index=idx, text=text)
        assert k["encoder_hidden_states"].shape[1] == k["txt_ids"].shape[0] == (TXT_LEN if text else 0)
        part = t(*a, **k)[0]
        attn_pairs = ctl.attn_pairs
        ctl.end()
        assert part.shape == (1, 5, 16)
        torch.testing.assert_close(part, full[:, idx], rtol=1e-4, atol=1e-5)
        # queries: (text +) 5 image tokens, against every cached key, in 5 layers x 2 heads
        assert attn_pairs == 5 * 2 * ((TXT_LEN if text else 0) + 5) * (TXT_LEN + N_IMG)
        if not text:
            assert all(torch.equal(kv[layer][0][:, :TXT_LEN], k_) and torch.equal(kv[layer][1][:, :TXT_LEN], v_)
                       for layer, (k_, v_) in text_kv.items())
    finally:
        for m, p in zip(mods, originals):
            m.set_processor(p)


def test_text_cache_all_full_and_remove_are_plain(pipe):
    """text_tokens="cache": cache_rate 0 is the plain pipeline bit for bit; an accelerated run really differs from
    the same run computing the text (the text rows come from the caches), and remove() gives the plain output."""
    plain = run(pipe, STEPS, size=SIZE)
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.0, text_tokens="cache")):
        assert torch.equal(run(pipe, STEPS, size=SIZE), plain)
    outs = {}
    for text_tokens in ("compute", "cache"):
        with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.75, text_tokens=text_tokens)) as h:
            outs[text_tokens] = run(pipe, STEPS, size=SIZE)
            assert sum(r.decision == "partial" for r in h.trace.steps) == STEPS - 4
    assert not torch.equal(outs["cache"], outs["compute"]) and not torch.equal(outs["cache"], plain)
    assert rel(outs["cache"], plain) < 0.5  # still the same picture, roughly
    assert torch.equal(run(pipe, STEPS, size=SIZE), plain)


# ---- the step plan --------------------------------------------------------------------------------------
def test_cache_rate_zero_runs_plain_and_scores_nothing(pipe):
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.0, warmup_steps=2)) as h:
        run(pipe, 6, size=SIZE)
        trace = h.trace
    assert [r.reason for r in trace.steps] == ["no_cache"] * 6 and trace.overhead == []
    assert all(r.extra["score_layers"] == 0 and r.extra["score_pairs"] == 0 for r in trace.steps)


def test_no_prerun_when_no_step_can_be_partial(pipe):
    """The pre-run is only paid for when a partial step can follow: 4 steps with 4 warm-up steps have none."""
    for warmup, partial in ((4, 0), (3, 1)):
        with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=warmup)) as h:
            run(pipe, 4, size=SIZE)
            trace = h.trace
        assert sum(r.decision == "partial" for r in trace.steps) == partial
        assert len(trace.overhead) == partial and ("prerun" in trace.meta) == bool(partial)


def test_without_a_prerun_no_step_is_partial(pipe, monkeypatch):
    """A partial step needs the pre-run's "future" scores: without them every scheduled partial step falls back
    to a full one (reason no_history), and the run is the plain pipeline's."""
    plain = run(pipe, 6, size=SIZE)
    monkeypatch.setattr(accel.specdiff.SpecDiffModelHook, "_prerun", lambda self, module, state: None)
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2)) as h:
        out = run(pipe, 6, size=SIZE)
        trace = h.trace
    assert [r.reason for r in trace.steps] == ["warmup"] * 2 + ["no_history"] * 4
    assert all(r.decision == "full" for r in trace.steps) and torch.equal(out, plain)


def test_run_starting_mid_schedule():
    """img2img (strength 0.75 of 12 steps): the run's first step is step 3. Warm-up, refresh and the pre-run
    count from there; the pre-run's sigmas are picked from the rest of the schedule."""
    p = FluxImg2ImgPipeline(**tiny_flux_pipe().components)
    p.set_progress_bar_config(disable=True)
    pe, pooled = embeds()
    x = torch.randn(1, N_IMG, 16, generator=torch.Generator().manual_seed(3))
    cfg = accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, spec_steps=2, refresh_every=3)
    with accel.apply(p, cfg) as h:
        p(prompt_embeds=pe, pooled_prompt_embeds=pooled, image=torch.zeros(1, 3, SIZE, SIZE), latents=x,
          height=SIZE, width=SIZE, num_inference_steps=12, strength=0.75, output_type="latent")
        trace = h.trace
    steps = trace.steps
    assert [r.step for r in steps] == list(range(3, 12))
    assert "".join("F" if r.decision == "full" else "p" for r in steps) == "FFpppFppp"
    assert [r.reason for r in steps[:6]] == ["warmup", "warmup", "partial", "partial", "partial", "refresh"]
    # 9 steps left + the terminal sigma: picks round(j * 9 / 2) = 0, 4 -> the sigmas of steps 3 and 7
    (prerun,) = trace.meta["prerun"].values()
    assert prerun["sigmas"] == [steps[0].sigma, steps[4].sigma] and steps[0].sigma == 0.75


def test_bfloat16_run():
    """A bf16 pipeline: the pre-run's Euler steps keep the latents' dtype (the model takes nothing else), the C3
    average and the output are bf16."""
    p = tiny_flux_pipe().to(torch.bfloat16)
    pe, pooled = embeds()
    kw = dict(prompt_embeds=pe.bfloat16(), pooled_prompt_embeds=pooled.bfloat16(), height=SIZE, width=SIZE,
              num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="latent")
    plain = p(**kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    with accel.apply(p, accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, spec_steps=3)) as h:
        out = p(**kw).images
        trace = h.trace
    assert out.dtype == torch.bfloat16 and len(trace.overhead) == 2
    assert sum(r.decision == "partial" for r in trace.steps) == 6
    assert 0 < rel(out.float(), plain.float()) < 0.5


# ---- real savings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_tokens", ["compute", "cache"])
def test_partial_step_cost_accounting(pipe, text_tokens):
    """(Token rows entering every leaf Linear, call by call: tests/test_contract.py.) What the trace charges a
    partial step: blocks in proportion to the tokens computed, attention and score pairs of text + C1 queries
    (C1 only with text_tokens="cache") against every key, and the pre-run in the ideal speedup."""
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.9, spec_steps=3, score_every=1,
                                                score_query_stride=1, text_tokens=text_tokens)) as h:
        run(pipe, STEPS, size=SIZE)
        trace = h.trace
    assert len(trace.overhead) == 2
    n1 = round(0.1 * N_IMG)
    assert [r.tokens_computed for r in trace.steps] == [N_IMG] * 4 + [n1] * (STEPS - 4)
    # warm-up steps score attention only for the pre-run (step 0) and for the partial step after them (step 3)
    dense = 5 * 2 * (TXT_LEN + N_IMG) ** 2
    assert [r.extra for r in trace.steps[:4]] == [
        {"c1": N_IMG, "c2": 0, "c3": 0, "score_pairs": sp, "score_layers": sl, "attn_pairs": dense}
        for sp, sl in ((dense, 5), (0, 0), (0, 0), (dense, 5))]
    # cost accounting: partial blocks = n_blocks * (text computed + C1) / (text + all), the pre-run counted in
    text = TXT_LEN if text_tokens == "compute" else 0
    part = [r for r in trace.steps if r.decision == "partial"]
    assert all(math.isclose(r.blocks_computed, 5 * (text + n1) / (TXT_LEN + N_IMG)) for r in part)
    # attention: text + C1 queries (C1 only) against every key, in 5 layers x 2 heads; scores on the same pairs
    pairs = 5 * 2 * (text + n1) * (TXT_LEN + N_IMG)
    assert all(r.extra["attn_pairs"] == pairs for r in part)
    assert all(r.extra["score_pairs"] == pairs for r in part[:-1]) and part[-1].extra["score_pairs"] == 0
    assert all(isinstance(r.extra[k], int) for r in trace.steps for k in ("c1", "c2", "c3"))
    s = trace.summary()
    done = 4 * 5 + len(part) * 5 * (text + n1) / (TXT_LEN + N_IMG) + 2 * 5
    assert s["ideal_speedup"] == round(STEPS * 5 / done, 4) and s["overhead_calls"] == 2


def test_prerun_calls_are_traced_like_steps():
    """Every pre-run call is an overhead record: its sigma picked evenly (by index) across the schedule, the
    scheduler's timestep for it, a full dense call's cost, its own wall time."""
    p = tiny_flux_pipe()
    p.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=500)  # timestep = 500 * sigma
    cfg = accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, spec_steps=3, share_first_step=False, score_every=1,
                                 score_query_stride=1)
    start = time.perf_counter()
    with accel.apply(p, cfg) as h:
        run(p, 9, size=SIZE)
        trace = h.trace
    wall_ms = (time.perf_counter() - start) * 1000.0
    steps, over = trace.steps, trace.overhead
    # 9 steps + the terminal sigma: picks round(j * 9 / 3) = 0, 3, 6
    assert [r.sigma for r in over] == [steps[0].sigma, steps[3].sigma, steps[6].sigma]
    assert trace.meta["prerun"] == {"cond": {"sigmas": [r.sigma for r in over], "calls": 3,
                                             "shared_first_step": False}}
    pairs = 5 * 2 * (TXT_LEN + N_IMG) ** 2  # 5 layers x 2 heads, every query against every key, all scored
    fastest_step = min(r.time_ms for r in steps)
    for j, r in enumerate(over):
        assert (r.step, r.num_steps, r.context, r.decision, r.reason) == (j, 3, "cond", "full", "prerun")
        assert r.timestep == pytest.approx(500 * r.sigma) and r.timestep == pytest.approx(steps[3 * j].timestep)
        assert (r.blocks_computed, r.blocks_total, r.tokens_computed, r.tokens_total) == (5, 5, N_IMG, N_IMG)
        assert r.extra == {"score_pairs": pairs, "score_layers": 5, "attn_pairs": pairs}
        assert 1e-3 * fastest_step < r.time_ms < wall_ms


def test_share_first_step_only_saves_a_call(pipe):
    outs, traces = [], []
    for share in (True, False):
        with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8, share_first_step=share)) as h:
            outs.append(run(pipe, STEPS, size=SIZE))
            traces.append(h.trace)
    assert torch.equal(outs[0], outs[1])
    assert [len(t.overhead) for t in traces] == [1, 2]
    assert [(t.meta["prerun"]["cond"]["calls"], t.meta["prerun"]["cond"]["shared_first_step"]) for t in traces] == [
        (1, True), (2, False)]
    assert traces[1].overhead[0].sigma == traces[1].steps[0].sigma
    assert traces[0].meta["prerun"]["cond"]["sigmas"] == traces[1].meta["prerun"]["cond"]["sigmas"]


# ---- levels, importance, history ------------------------------------------------------------------------
def test_level_maps_partition_tokens_and_trace_fields(pipe, tmp_path):
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.75, c2_share=0.2)) as h:
        run(pipe, STEPS, size=SIZE)
        trace = h.trace
    n1 = N_IMG // 4
    for r in trace.steps:
        lv = torch.tensor(r.maps["level"])
        assert lv.shape == (8, 8) and r.tokens_total == N_IMG
        counts = [int((lv == k).sum()) for k in (1, 2, 3)]
        assert sum(counts) == N_IMG and counts == [r.extra["c1"], r.extra["c2"], r.extra["c3"]]
        assert counts[0] == r.tokens_computed
        if r.decision == "partial":
            assert counts[0] == n1 and counts[1] > 0 and counts[2] > 0
            imp = torch.tensor(r.maps["importance"])
            assert imp.shape == (8, 8) and imp.max() == 1.0 and (imp >= 0).all()
            # C1 = the top scores; C2 = the lowest, holding at most c2_share of the mass
            assert imp[lv == 1].min() >= imp[lv != 1].max()
            assert imp[lv == 2].sum() <= 0.2 * imp.sum() + 1e-6
            assert imp[lv == 2].max() <= imp[lv == 3].min()
            assert r.extra["spec_sigma"] in trace.meta["prerun"]["cond"]["sigmas"]
            assert (r.extra["score_pairs"] > 0) == (r.step < STEPS - 1)  # the last step's scores are unused
        else:
            assert counts == [N_IMG, 0, 0]
    back = accel.Trace.from_json(trace.to_json())
    assert back.steps[6] == trace.steps[6] and len(back.overhead) == 1
    assert back.steps[6].maps["level"].dtype == "int8" and back.steps[6].maps["importance"].dtype == "float32"


def test_starvation_refreshes_every_token():
    p = tiny_flux_pipe(seed=2)
    steps = 40
    with accel.apply(p, accel.SpecDiffConfig(cache_rate=0.9)) as h:
        out = run(p, steps, size=SIZE)
        trace = h.trace
    assert torch.isfinite(out).all()
    partial = [torch.tensor(r.maps["level"]) == 1 for r in trace.steps if r.decision == "partial"]
    assert len(partial) == steps - 4
    assert torch.stack(partial).any(0).all()  # every token computed on some partial step
    # without the starvation term the same run leaves some token cached throughout
    with accel.apply(p, accel.SpecDiffConfig(cache_rate=0.9, starvation_scale=0.0)) as h:
        run(p, steps, size=SIZE)
        never = [torch.tensor(r.maps["level"]) == 1 for r in h.trace.steps if r.decision == "partial"]
    assert not torch.stack(never).any(0).all()


def test_tokens_that_receive_no_attention_rank_last(pipe, monkeypatch):
    """Attention received that underflows to exactly 0 (a float32 softmax column, with logits ~100 apart): such
    tokens get a finite importance below every other token's (log(0) is guarded), in the step's history term and
    in the pre-run's future term alike, and the run stays finite."""
    import accel.adapters.kv_attention as kva

    received = kva.attention_received

    def underflowing(*args, **kwargs):
        s = received(*args, **kwargs)
        s[:, :4] = 0.0  # image tokens 0..3 receive nothing
        return s

    monkeypatch.setattr(kva, "attention_received", underflowing)
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8, warmup_steps=2)) as h:
        out = run(pipe, 8, size=SIZE)
        trace = h.trace
    assert torch.isfinite(out).all()
    part = [r for r in trace.steps if r.decision == "partial"]
    assert len(part) == 6
    for r in part:
        imp = torch.tensor(r.maps["importance"]).flatten()
        assert torch.isfinite(imp).all() and imp.max() == 1.0
        assert imp[:4].max() < imp[4:].min()
        assert (torch.tensor(r.maps["level"]).flatten()[:4] != 1).all()


def test_assign_levels_by_hand():
    score = torch.tensor([0.05, 0.5, 0.01, 1.0, 0.02, 0.3, 0.04, 0.08])
    c1, level = assign_levels(score, 2, 0.05)
    assert c1.tolist() == [1, 3]
    # ascending: .01 (2) .02 (4) .04 (6) .05 (0) ... cumsum .01 .03 .07 > 0.05 * 2.0 = 0.1? .07 <= .1, .12 > .1
    assert level.tolist() == [3, 1, 2, 1, 2, 3, 2, 3]


def test_history_weights_are_normalised_exponential():
    w = history_weights(3, torch.tensor([3, 2, 1, 0]))
    e = torch.exp(-torch.arange(1.0, 4.0))
    torch.testing.assert_close(w[:, 0], e / e.sum())
    torch.testing.assert_close(w[:, 1], torch.cat([e[:2] / e[:2].sum(), torch.zeros(1)]))
    torch.testing.assert_close(w[:, 2], torch.tensor([1.0, 0.0, 0.0]))
    assert w[:, 3].sum() == 0  # no history: nothing (never used: warm-up fills every token)


def test_assign_levels_c2_boundary_is_inclusive():
    # ascending 0.5 (3), 1.5 (1), 2.5 (2), 3.5 (0), total 8: the cumulative sum 2.0 equals 0.25 * 8 exactly
    c1, level = assign_levels(torch.tensor([3.5, 1.5, 2.5, 0.5]), 1, 0.25)
    assert c1.tolist() == [0] and level.tolist() == [1, 2, 3, 2]


def test_n_computed_by_hand():
    cfg = lambda r: accel.SpecDiffConfig(cache_rate=r)  # noqa: E731
    assert cfg(0.85).n_computed(64) == 10  # round(9.6)
    assert cfg(0.99).n_computed(64) == 1 and cfg(0.999).n_computed(64) == 1  # never fewer than one token
    assert cfg(0.0).n_computed(64) == 64 and cfg(0.5).n_computed(1) == 1 and cfg(0.5).n_computed(5) == 2


def test_history_weights_stay_on_the_device_in_float32():
    available = torch.tensor([3, 1])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = history_weights(3, available)
    finally:
        torch.set_default_dtype(prev)
    assert w.dtype == torch.float32 and w[:, 1].tolist() == [1.0, 0.0, 0.0]
    # made where the history is (no host tensor in the step): on the meta device, nothing touches the CPU
    assert history_weights(3, available.to("meta")).device.type == "meta"


def test_normalise_scores_by_hand():
    """Each sample scaled to mean 1, then the samples averaged (not pooled: sample 1's scale must not dominate)."""
    s = torch.tensor([[1.0, 3.0, 0.0, 4.0], [10.0, 10.0, 10.0, 10.0]], dtype=torch.float64)  # means 2 and 10
    got = normalise_scores(s)
    assert got.dtype == torch.float32 and got.tolist() == [0.75, 1.25, 0.5, 1.5]
    assert normalise_scores(s[:1]).tolist() == [0.5, 1.5, 0.0, 2.0]
    assert normalise_scores(torch.zeros(1, 3)).tolist() == [0.0, 0.0, 0.0]  # no attention at all: no NaN


def test_nearest_speculative_sigma_and_a_step_at_sigma_zero(pipe):
    """Each partial step takes the "future" of the pre-run sigma nearest its own, also a last step at sigma 0."""
    sigmas = [1.0 - i / 7 for i in range(8)]
    sigmas[-1] = 0.0
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, spec_steps=3)) as h:
        run(pipe, 8, size=SIZE, sigmas=sigmas)
        trace = h.trace
    pre = trace.meta["prerun"]["cond"]["sigmas"]
    assert len(pre) == 3 and pre[0] == 1.0
    part = [r for r in trace.steps if r.decision == "partial"]
    assert len(part) == 6 and part[-1].sigma == 0.0
    assert [r.extra["spec_sigma"] for r in part] == [min(pre, key=lambda p: abs(p - r.sigma)) for r in part]
    assert part[0].extra["spec_sigma"] == pre[1] and part[-1].extra["spec_sigma"] == pre[2]


def test_without_maps_the_run_is_the_same(pipe):
    """record_maps=False only leaves the maps out: same output, decisions and level counts."""
    runs = []
    for maps in (True, False):
        with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, record_maps=maps)) as h:
            runs.append((run(pipe, 8, size=SIZE), h.trace))
    (out, trace), (out_nomaps, trace_nomaps) = runs
    assert torch.equal(out, out_nomaps)
    assert all(r.maps == {} for r in trace_nomaps.steps) and all("level" in r.maps for r in trace.steps)
    key = lambda t: [(r.decision, r.extra["c1"], r.extra["c2"], r.extra["c3"]) for r in t.steps]  # noqa: E731
    assert key(trace_nomaps) == key(trace) and trace.steps[-1].extra["c2"] > 0


def _run_keeping_outputs(pipe, cfg, steps, **kw):
    """A run with `cfg`, keeping what the transformer returned at every main step (a plain torch hook)."""
    outs = []
    hh = pipe.transformer.register_forward_hook(lambda mod, args, kwargs, out: outs.append(out[0].clone()),
                                                with_kwargs=True)
    try:
        with accel.apply(pipe, cfg) as h:
            run(pipe, steps, size=SIZE, **kw)
            trace = h.trace
    finally:
        hh.remove()
    return outs, trace


def _check_outputs_follow_the_level_maps(outs, trace):
    """Rebuild every step's output per sample and token from the outputs the model computed before: level 2 =
    the sample's last computed output of that token, level 3 = the e^-i weighted average of its last three,
    level 1 = freshly computed. One level map per step serves every sample of the batch."""
    levels = [torch.tensor(r.maps["level"]).flatten() for r in trace.steps]
    batch = outs[0].shape[0]
    computed = [[[] for _ in range(N_IMG)] for _ in range(batch)]  # per sample and token, newest last
    e = torch.exp(-torch.arange(1.0, 4.0))
    seen = set()
    for lv, out in zip(levels, outs):
        for b in range(batch):
            for tok in range(N_IMG):
                hist = computed[b][tok][::-1][:3]  # newest first
                seen.add(int(lv[tok]))
                if lv[tok] == 2:
                    assert torch.equal(out[b, tok], hist[0])
                elif lv[tok] == 3:
                    w = e[: len(hist)] / e[: len(hist)].sum()
                    ref = sum(wi * hi for wi, hi in zip(w, hist))
                    torch.testing.assert_close(out[b, tok], ref, rtol=1e-5, atol=1e-6)
                else:
                    if hist:
                        assert not torch.equal(out[b, tok], hist[0])
                    computed[b][tok].append(out[b, tok])
    assert seen == {1, 2, 3}


def test_c3_is_weighted_history_and_c2_last_value(pipe):
    """After the run, rebuild every partial step's output from the recorded model outputs per token."""
    outs, trace = _run_keeping_outputs(pipe, accel.SpecDiffConfig(cache_rate=0.8, warmup_steps=2), 8)
    _check_outputs_follow_the_level_maps(outs, trace)


# ---- the chunked score ------------------------------------------------------------------------------
def test_scores_reuse_the_attention_calls_log_sum_exp(pipe, monkeypatch):
    """Scoring a layer costs one more pass over its keys (the column sums, in `score_chunk` queries at a time):
    the row log-sum-exp comes from the attention call itself (the CPU's flash kernel returns it), never from a
    second pass."""
    import accel.kernels as K

    seen = {"lse": 0, "chunks": []}
    row_lse, column_sums = K.row_logsumexp, K.column_sums

    def counting_lse(*args, **kwargs):
        seen["lse"] += 1
        return row_lse(*args, **kwargs)

    def recording_sums(*args, **kwargs):
        seen["chunks"].append(kwargs.get("chunk"))
        return column_sums(*args, **kwargs)

    monkeypatch.setattr(K, "row_logsumexp", counting_lse)
    monkeypatch.setattr(K, "column_sums", recording_sums)
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8, score_chunk=7)) as h:
        run(pipe, 8, size=SIZE)
        trace = h.trace
    layers = sum(r.extra["score_layers"] for r in trace.steps + trace.overhead)
    assert layers > 0 and seen["chunks"] == [7] * layers and seen["lse"] == 0


@pytest.mark.parametrize("chunk,key_start", [(1, 0), (3, 4), (7, 5), (100, 2)])
def test_attention_received_equals_naive_softmax(chunk, key_start):
    g = torch.Generator().manual_seed(chunk)
    q = torch.randn(2, 11, 3, 8, generator=g)
    k = torch.randn(2, 13, 3, 8, generator=g)
    naive = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8), dim=-1)
    expect = naive.mean(dim=1).mean(dim=1)[:, key_start:]  # head-averaged column means
    got = attention_received(q, k, key_start=key_start, chunk=chunk)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(attention_received(q, k, chunk=chunk).sum(-1), torch.ones(2))


def test_score_query_stride_scores_every_kth_query(pipe):
    """Scored query x key pairs follow the stride; the partial steps' outputs barely move (the ranking of
    64 tokens from half the queries)."""
    outs, traces = [], []
    for stride in (1, 2, 3):
        with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8, score_every=1, score_query_stride=stride)) as h:
            outs.append(run(pipe, STEPS, size=SIZE))
            traces.append(h.trace)
    for stride, trace in zip((1, 2, 3), traces):
        r = trace.steps[3]  # last warm-up step: all 8 + 64 queries scored in 5 layers x 2 heads
        assert r.extra["score_pairs"] == 5 * 2 * -(-(TXT_LEN + N_IMG) // stride) * (TXT_LEN + N_IMG)
    assert rel(outs[1], outs[0]) < 0.05


# ---- C3 as a Taylor forecast ------------------------------------------------------------------------------
def test_taylor_weights_are_exact_on_polynomials():
    """Lagrange weights through each token's newest order + 1 computed outputs, at uneven steps: exact for
    polynomials of degree <= order; tokens with fewer outputs fall back to a lower order."""
    pos = torch.tensor([[9.0, 9.0, 7.0, 8.0], [6.0, 5.0, 6.0, 3.0], [2.0, 4.0, 5.0, 1.0]])  # [W=3, tokens], newest first
    avail = torch.tensor([3, 2, 3, 1])
    x = 11.0
    w1 = taylor_weights(1, pos, avail, x)
    f = lambda p: 3.0 * p - 2.0  # noqa: E731  (degree 1)
    got = (w1 * f(pos)).sum(0)
    torch.testing.assert_close(got[:3], torch.full((3,), f(x)))
    assert got[3] == f(pos[0, 3])  # one output: repeated
    torch.testing.assert_close(w1.sum(0), torch.ones(4))
    w2 = taylor_weights(2, pos, avail, x)
    g = lambda p: 0.5 * p ** 2 - p + 4.0  # noqa: E731  (degree 2)
    got2 = (w2 * g(pos)).sum(0)
    torch.testing.assert_close(got2[[0, 2]], torch.full((2,), g(x)))  # three outputs: exact to degree 2
    torch.testing.assert_close(w2[:, 1], w1[:, 1])  # two outputs: order 1
    assert (w2[2:, 1] == 0).all() and (w1[2] == 0).all()


def test_taylor_weights_order_and_window_limits():
    """m = min(order, available - 1, W - 1): an order above the window, or more outputs than the window holds,
    use the W outputs there are; a token with fewer outputs ignores the positions of its empty slots (zeros,
    as the run initialises them), even where two of them coincide."""
    pos = torch.tensor([[9.0, 9.0, 4.0], [6.0, 0.0, 0.0]])  # W=2, newest first
    f = lambda p: 3.0 * p - 2.0  # noqa: E731
    for order in (1, 2, 5):
        w = taylor_weights(order, pos, torch.tensor([5, 1, 1]), 11.0)
        torch.testing.assert_close((w[:, 0] * f(pos[:, 0])).sum(), torch.tensor(f(11.0)))  # the line through both
        assert w[:, 1:].tolist() == [[1.0, 1.0], [0.0, 0.0]]  # one output: repeated
    w = taylor_weights(2, torch.tensor([[4.0, 7.0], [0.0, 5.0], [0.0, 0.0]]), torch.tensor([1, 2]), 8.0)
    assert w[:, 0].tolist() == [1.0, 0.0, 0.0] and w[:, 1].tolist() == [1.5, -0.5, 0.0]


def test_taylor_weights_stay_on_the_device_in_float32():
    pos, available = torch.tensor([[4.0, 7.0], [2.0, 5.0], [1.0, 0.0]]), torch.tensor([3, 2])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = taylor_weights(2, pos, available, 6.0)
    finally:
        torch.set_default_dtype(prev)
    assert w.dtype == torch.float32 and w[:, 1].tolist() == [0.5, 0.5, 0.0]
    assert taylor_weights(2, pos.to("meta"), available.to("meta"), 6.0).device.type == "meta"


@pytest.mark.parametrize("refresh_every", [0, 2])
def test_c3_taylor_is_linear_extrapolation_of_computed_outputs(pipe, refresh_every):
    """A whole run with c3_mode="taylor": every C3 output is the line through the token's last two computed
    outputs (at the steps they were computed) evaluated at this step; C2 still repeats the last one. With refresh
    steps, full steps come after partial ones, when the tokens' last computed steps differ."""
    outs = []
    hh = pipe.transformer.register_forward_hook(lambda mod, args, kwargs, out: outs.append(out[0].clone()),
                                                with_kwargs=True)
    cfg = accel.SpecDiffConfig(cache_rate=0.8, warmup_steps=2, c3_mode="taylor", refresh_every=refresh_every)
    try:
        with accel.apply(pipe, cfg) as h:
            run(pipe, 10, size=SIZE)
            trace = h.trace
    finally:
        hh.remove()
    kinds = "".join("F" if r.decision == "full" else "p" for r in trace.steps)
    assert kinds == ("FFppFppFpp" if refresh_every else "FFpppppppp")
    levels = [torch.tensor(r.maps["level"]).flatten() for r in trace.steps]
    computed: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(N_IMG)]
    n3 = 0
    for step, (lv, out) in enumerate(zip(levels, outs)):
        for tok in range(N_IMG):
            hist = computed[tok]
            if lv[tok] == 2:
                assert torch.equal(out[0, tok], hist[-1][1])
            elif lv[tok] == 3:
                (s1, f1), (s2, f2) = hist[-1], hist[-2]
                ref = f1 + (f1 - f2) * (step - s1) / (s1 - s2)
                torch.testing.assert_close(out[0, tok], ref, rtol=1e-4, atol=1e-5)
                n3 += 1
            else:
                hist.append((step, out[0, tok]))
    assert n3 > 100


# ---- fewer host syncs, hoisted modulation, regional compilation ----------------------------------------------
def test_unsynchronised_steps_fill_the_trace(pipe):
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8, sync_timing=False)) as h:
        run(pipe, STEPS, size=SIZE)
        trace = h.trace
    part = [r for r in trace.steps if r.decision == "partial"]
    assert part and all(isinstance(r.extra["c2"], int) and len(r.maps["level"]) == 8 for r in part)
    assert all(sum(r.extra[k] for k in ("c1", "c2", "c3")) == N_IMG for r in part)


def test_hoisted_modulation_matches_and_leaves_no_trace(pipe):
    """Partial steps take every block's adaLN modulation from one table per run: the same values up to the
    rounding of a batched product (and the same decisions); the hooks come off at the end of each run and
    leave the linears as they were."""
    baseline = run(pipe, STEPS, size=SIZE)
    ad = adapter_for(pipe.transformer)
    mods = ad.modulation_linears()
    assert len(mods) == 2 * 2 + 3 + 1  # norm1/norm1_context per double block, norm per single block, norm_out
    outs, traces = [], []
    for hoist in (True, False):
        with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8, hoist_modulation=hoist)) as h:
            outs.append(run(pipe, STEPS, size=SIZE))
            traces.append(h.trace)
            assert all("forward" not in m.__dict__ and not hasattr(m, "_diffusers_hook") for m in mods)
    assert rel(outs[0], outs[1]) < 1e-5
    assert all(torch.equal(torch.tensor(a.maps["level"]), torch.tensor(b.maps["level"]))
               for a, b in zip(traces[0].steps, traces[1].steps))
    assert torch.equal(run(pipe, STEPS, size=SIZE), baseline)


def test_hoisted_modulation_is_computed_once_per_run(pipe):
    """What hoisting saves, counted: with it, the modulation linears' products run at the full steps, the pre-run
    and once more for the run's table (at the first partial step), never on a later partial step; without it,
    at every transformer call."""
    from torch.overrides import TorchFunctionMode

    weights = {id(m.weight) for m in adapter_for(pipe.transformer).modulation_linears()}
    calls: list[int] = []

    class CountModulation(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.linear:
                w = args[1] if len(args) > 1 else kwargs.get("weight")
                if id(w) in weights:
                    calls[-1] += 1
            return func(*args, **kwargs)

    hook = pipe.transformer.register_forward_pre_hook(lambda mod, args: calls.append(0))
    try:
        for hoist in (True, False):
            calls.clear()
            with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8, warmup_steps=2, hoist_modulation=hoist)):
                with CountModulation():
                    run(pipe, 8, size=SIZE)
            n = len(weights)
            # per step: step 0 with the pre-run's second call, step 1 (full), steps 2..7 (partial; the table at 2)
            assert calls == ([2 * n, n, n] + [0] * 5 if hoist else [2 * n] + [n] * 7), (hoist, calls)
    finally:
        hook.remove()


def test_regional_compilation_stays_under_the_recompile_limit():
    """Under diffusers' compile_repeated_blocks (backend "eager": dynamo's guards and graph breaks, no code
    generation) a SpecDiff run recompiles a bounded number of times, whatever the number of blocks: the
    per-layer state (layer index, mode, cache, rows) is read outside the compiled graphs (`attend` is not
    compiled). The output equals the uncompiled run's."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    p = tiny_flux_pipe(seed=3, double=3, single=10)  # more blocks of each kind than the recompile limit
    cfg = accel.SpecDiffConfig(cache_rate=0.85, score_every=3)
    text_cached = accel.SpecDiffConfig(cache_rate=0.85, score_every=3, text_tokens="cache")
    with accel.apply(p, cfg):
        eager = run(p, 10, size=SIZE)
    with accel.apply(p, text_cached):
        eager_text_cached = run(p, 10, size=SIZE)
    dynamo.reset()
    counters.clear()
    old = dynamo.config.recompile_limit, dynamo.config.fail_on_recompile_limit_hit
    dynamo.config.recompile_limit, dynamo.config.fail_on_recompile_limit_hit = 8, True
    try:
        p.transformer.compile_repeated_blocks(backend="eager")
        run(p, 10, size=SIZE)  # plain, compiled
        plain_frames = counters["frames"]["total"]
        with accel.apply(p, cfg):
            out = run(p, 10, size=SIZE)
            again = run(p, 10, size=SIZE)
        with accel.apply(p, accel.SpecDiffConfig(cache_rate=0.5, score_every=1, c3_mode="taylor")):
            run(p, 10, size=SIZE)
        frames = counters["frames"]["total"]
        with accel.apply(p, text_cached):  # partial steps with 0 text tokens (a size dynamo specialises on)
            out_text_cached = run(p, 10, size=SIZE)
        text_frames = counters["frames"]["total"] - frames
    finally:
        dynamo.config.recompile_limit, dynamo.config.fail_on_recompile_limit_hit = old
        dynamo.reset()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_text_cached, eager_text_cached, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, out)
    print("compiled frames: plain", plain_frames, "with SpecDiff", frames, "then with text cached", text_frames)
    assert frames - plain_frames <= 24, frames  # a per-layer guard would add one per block
    assert text_frames <= 12, text_frames  # fewer than the blocks (13): no per-layer guard either


# ---- isolation, CFG, configs -------------------------------------------------------------------------
# (interleaved pipelines, runs one after another, true-CFG exactness and separation: tests/test_contract.py)
def test_true_cfg_runs_one_prerun_per_branch(pipe):
    pe, pooled = embeds(seed=1)
    ne, npooled = embeds(seed=2)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=ne,
              negative_pooled_prompt_embeds=npooled, true_cfg_scale=3.0, height=SIZE, width=SIZE,
              num_inference_steps=STEPS, output_type="latent")
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8)) as h:
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        trace = h.trace
    assert torch.isfinite(out).all() and rel(out, base) < 0.5
    assert sorted(r.context for r in trace.overhead) == ["cond", "uncond"]  # one pre-run per branch
    assert set(trace.meta["prerun"]) == {"cond", "uncond"}
    assert all(trace.meta["prerun"][c]["calls"] == 1 for c in ("cond", "uncond"))


def test_batch_shares_one_token_subset(pipe):
    """Two different samples: the model runs one token subset for both (rows entering an image-stream Linear =
    2 x C1), and each sample's output follows the step's one level map with its own history."""
    rows = []
    hq = pipe.transformer.transformer_blocks[0].attn.to_q.register_forward_hook(
        lambda m, i, o: rows.append(i[0].shape[0] * i[0].shape[1]))
    try:
        outs, trace = _run_keeping_outputs(pipe, accel.SpecDiffConfig(cache_rate=0.8, warmup_steps=2), 8,
                                           batch=2, seed=4)
    finally:
        hq.remove()
    assert outs[0].shape[0] == 2 and not torch.equal(outs[-1][0], outs[-1][1])
    part = [r for r in trace.steps if r.decision == "partial"]
    assert len(part) == 6 and all(r.tokens_computed == round(0.2 * N_IMG) for r in part)
    recs = trace.steps[:1] + trace.overhead + trace.steps[1:]
    assert rows == [2 * r.tokens_computed for r in recs]
    _check_outputs_follow_the_level_maps(outs, trace)


def test_refresh_every_and_score_every(pipe):
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.8, warmup_steps=2, refresh_every=3,
                                                score_every=2)) as h:
        run(pipe, STEPS, size=SIZE)
        trace = h.trace
    kinds = "".join("F" if r.decision == "full" else "p" for r in trace.steps)
    assert kinds == "FFpppFpppFpp"
    assert [r.reason for r in trace.steps[:6]] == ["warmup", "warmup", "partial", "partial", "partial", "refresh"]
    # 5 attention layers, every 2nd scored: 0, 2, 4
    # scores are computed only where the next step is partial (it needs them): 5 layers, every 2nd -> 3
    scored = [r.extra["score_layers"] for r in trace.steps]
    assert scored == [3, 3, 3, 3, 0, 3, 3, 3, 0, 3, 3, 0]  # step 0: the shared pre-run call


@pytest.mark.parametrize("kwargs,field", [
    (dict(cache_rate=1.0), "cache_rate"), (dict(cache_rate=-0.1), "cache_rate"), (dict(cache_rate="x"), "cache_rate"),
    (dict(spec_steps=0), "spec_steps"), (dict(spec_steps=2.0), "spec_steps"), (dict(c2_share=1.0), "c2_share"),
    (dict(history_window=0), "history_window"), (dict(history_window=9), "history_window"),
    (dict(starvation_scale=-1), "starvation_scale"), (dict(warmup_steps=0), "warmup_steps"),
    (dict(refresh_every=-1), "refresh_every"), (dict(score_chunk=0), "score_chunk"),
    (dict(score_every=0), "score_every"), (dict(share_first_step=1), "share_first_step"),
    (dict(record_maps="yes"), "record_maps"), (dict(c3_mode="linear"), "c3_mode"), (dict(c3_order=5), "c3_order"),
    (dict(c3_mode="taylor", c3_order=3, history_window=3), "history_window"),
    (dict(score_query_stride=0), "score_query_stride"), (dict(cuda_graphs="no"), "cuda_graphs"),
    (dict(hoist_modulation=0), "hoist_modulation"), (dict(text_tokens="skip"), "text_tokens"),
    (dict(text_tokens=None), "text_tokens"),
])
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        accel.SpecDiffConfig(**kwargs)


def test_config_round_trip_and_one_method_at_a_time(pipe):
    cfg = accel.SpecDiffConfig(cache_rate=0.95, spec_steps=3)
    assert accel.SpecDiffConfig.from_dict(cfg.to_dict()) == cfg
    with accel.apply(pipe, cfg):
        with pytest.raises(ValueError, match="already attached"):
            accel.apply(pipe, accel.SpeCaConfig())
