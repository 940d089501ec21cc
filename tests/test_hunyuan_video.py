"""SpeCa and SpecDiff on a tiny random HunyuanVideo pipeline: what is specific to the family. The (frames, h, w)
token grid, the verify block, positional block arguments, the masked K/V-caching attention processor, token-subset
calls, padded prompts under true CFG, errors. (Exactness, remove(), compute counted from leaf Linears and isolation
run for every family in tests/test_contract.py.)"""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accel
from tiny_video import GRID, TXT_LEN, TXT_PAD, embeds, run, tiny_video_pipe

# accel internals these tests reach, imported in this one place (a moved module is a one-line change here)
from accel.adapters import TokenLayout, adapter_for
from accel.adapters.kv_attention import AttnControl, attention_received
from accel.adapters.kv_attention import attention_received as attention_received_masked
from accel.kernels import accumulate

STEPS = 8
N_IMG = math.prod(GRID)  # 3 x 4 x 4 = 48


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is far too small for intra-op threads: one thread is faster and steadier on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe():
    return tiny_video_pipe()


class LinearCalls:
    """Calls of every leaf nn.Linear inside the transformer blocks, by module name (plain torch hooks)."""

    def __init__(self, transformer):
        self.calls = Counter()
        self.handles = []
        for name, m in transformer.named_modules():
            if isinstance(m, nn.Linear) and "transformer_blocks" in name:
                self.handles.append(m.register_forward_hook(self._hit(name)))

    def _hit(self, name):
        def hook(mod, inputs, out):
            self.calls[name] += 1
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


# ---- block rebuild ------------------------------------------------------------------------------------
def test_forecast_of_real_features_rebuilds_block_output(pipe):
    """Block inputs + gate * its real features (as a speculative step adds them) == the block's own output:
    positional arguments, [image, text] single-block rows, gates and output order are right."""
    t = pipe.transformer
    adapter = adapter_for(t)
    g = torch.Generator().manual_seed(3)
    d = t.config.num_attention_heads * t.config.attention_head_dim
    hidden, enc = torch.randn(1, N_IMG, d, generator=g), torch.randn(1, TXT_LEN, d, generator=g)
    temb = torch.randn(1, d, generator=g)
    mask = torch.ones(1, 1, 1, N_IMG + TXT_LEN, dtype=torch.bool)
    mask[..., -TXT_PAD:] = False
    rope = t.rope(torch.zeros(1, 4, GRID[0], GRID[1] * 2, GRID[2] * 2))
    layout = TokenLayout(grid=GRID, n_text=TXT_LEN)
    for block in adapter.blocks():
        captured, handles = {}, []
        for site in adapter.feature_sites(block):
            def grab(mod, inp, out, site=site):
                if site.index is None:
                    captured[site.names[0]] = out
                else:
                    for name, i in zip(site.names, site.index):
                        captured[name] = out[i]
            handles.append(site.module.register_forward_hook(grab))
        args = (hidden, enc, temb, mask, rope, None, GRID[1] * GRID[2])
        with torch.no_grad():
            real = block.module(*args)
            sites = adapter.gate_sites(block)
            x = adapter.gate_input(temb)
            gates = torch.stack([F.linear(x, *_rows(s.linear, s.n_chunks, s.chunk)) for s in sites])
            index = {s.feature: i for i, s in enumerate(sites)}
            streams = adapter.block_streams(args, {})
            for c in adapter.contributions(block, layout):
                entry = ([captured[c.feature]], index[c.feature], c.row_start)
                streams[c.stream] = accumulate(streams[c.stream], [entry], gates, [1.0])
            rebuilt = adapter.block_output(block, streams)
        for h in handles:
            h.remove()
        assert rebuilt[0].shape == (1, N_IMG, d) and rebuilt[1].shape == (1, TXT_LEN, d)
        torch.testing.assert_close(rebuilt[0], real[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rebuilt[1], real[1], rtol=1e-5, atol=1e-5)


def _rows(linear, n_chunks, chunk):
    d = linear.out_features // n_chunks
    return linear.weight[chunk * d:(chunk + 1) * d], linear.bias[chunk * d:(chunk + 1) * d]


# ---- SpeCa: real compute, verify block, maps ------------------------------------------------------------
def test_speca_verifies_with_the_last_block_and_maps_errors_on_the_frame_grid(pipe):
    t = pipe.transformer
    counter = LinearCalls(t)
    run(pipe, STEPS)
    plain = Counter(counter.calls)
    counter.calls.clear()
    cfg = accel.SpeCaConfig(threshold=1e9, warmup_steps=2, min_spec_steps=1, max_spec_steps=4)
    try:
        with accel.apply(pipe, cfg) as handle:
            run(pipe, STEPS)
            trace = handle.trace
    finally:
        counter.close()
    full = trace.summary()["full_steps"]
    assert 0 < full < STEPS
    # the verify block defaults to the last single block: it runs on every step, every other block only
    # on full steps
    last = f"single_transformer_blocks.{len(t.single_transformer_blocks) - 1}."
    for name, n in plain.items():
        per_step = n // STEPS
        expect = per_step * STEPS if name.startswith(last) else per_step * full
        assert counter.calls[name] == expect, name
    # verification error maps on the (frames, h, w) token grid
    assert trace.token_grid == list(GRID)
    spec = [r for r in trace.steps if r.decision == "accepted"]
    assert spec and all(r.error is not None and torch.tensor(r.maps["error"]).shape == GRID for r in spec)


def test_speca_tight_threshold_rejects_and_recomputes(pipe):
    cfg = accel.SpeCaConfig(threshold=0.0, warmup_steps=2, min_spec_steps=1, max_spec_steps=8)
    with accel.apply(pipe, cfg) as handle:
        out = run(pipe, STEPS)
        recs = handle.trace.steps
    assert torch.isfinite(out).all()
    assert [r.decision for r in recs[:4]] == ["full", "full", "accepted", "rejected"]
    assert recs[3].reason == "recomputed" and recs[3].blocks_computed == recs[3].blocks_total + 1


def test_speca_reference_preset_keeps_the_forecast_of_verified_steps(pipe):
    """The released code's preset (verify output "forecast") on blocks called with positional arguments: a verified
    step keeps its forecast, so replaying the run's schedule (every speculative step verified) gives the same
    latents bit for bit."""
    with accel.apply(pipe, accel.SpeCaConfig.reference()) as handle:
        out = run(pipe, STEPS)
        trace = handle.trace
    assert sum(r.reason == "verified" for r in trace.steps) > 0
    with accel.apply(pipe, accel.SpeCaConfig.reference(schedule=trace.schedule())) as handle:
        replay = run(pipe, STEPS)
    assert handle.trace.schedule() == trace.schedule() and torch.equal(out, replay)


# ---- SpecDiff: real token savings, maps, K/V mechanics ----------------------------------------------------
def test_specdiff_maps_and_the_final_projection_follow_c1(pipe):
    """(Rows entering the blocks' Linears: tests/test_contract.py.) The output norm and projection see only C1
    rows too; level and importance maps lie on the (frames, h, w) grid."""
    t = pipe.transformer
    final_rows = []
    hh = t.proj_out.register_forward_hook(lambda m, i, o: final_rows.append(i[0].shape[1]))
    try:
        with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.9, warmup_steps=2, spec_steps=3)) as h:
            out = run(pipe, STEPS)
            trace = h.trace
    finally:
        hh.remove()
    assert torch.isfinite(out).all()
    expected = [trace.steps[0].tokens_computed] + [r.tokens_computed for r in trace.overhead] + [
        r.tokens_computed for r in trace.steps[1:]]
    n1 = round(0.1 * N_IMG)
    assert final_rows == expected and len(expected) == STEPS + 2
    assert [r.tokens_computed for r in trace.steps] == [N_IMG] * 2 + [n1] * (STEPS - 2)
    assert [r.extra["c1"] for r in trace.steps] == [r.tokens_computed for r in trace.steps]
    assert trace.token_grid == list(GRID)
    for r in trace.steps:
        lv = torch.tensor(r.maps["level"])
        assert lv.shape == GRID
        assert [int((lv == k).sum()) for k in (1, 2, 3)] == [r.extra["c1"], r.extra["c2"], r.extra["c3"]]
    part = [r for r in trace.steps if r.decision == "partial"]
    assert part and all(torch.tensor(r.maps["importance"]).shape == GRID for r in part)


def test_output_tokens_are_the_final_projection_rows(pipe):
    """`sample_tokens` (model output [B, C, F, H, W] -> [B, N, C p_t p p]) gives exactly the rows of the final
    proj_out, in the (frames, h, w) order of the token grid; `tokens_sample` inverts it."""
    t = pipe.transformer
    ad = adapter_for(t)
    rows = []
    hh = t.proj_out.register_forward_hook(lambda m, i, o: rows.append(o))
    pe, pooled, mask = embeds()
    x = torch.randn(1, 4, GRID[0], GRID[1] * 2, GRID[2] * 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = t(x, torch.tensor([700.0]), pe, mask, pooled, guidance=torch.tensor([6000.0]), return_dict=False)[0]
    hh.remove()
    tok = ad.sample_tokens(out)
    assert torch.equal(tok, rows[0])
    assert torch.equal(ad.tokens_sample(tok, TokenLayout(grid=GRID, n_text=TXT_LEN)), out)
    # with a temporal patch too
    t2 = tiny_video_pipe(patch_size=1, patch_size_t=2, double=1, single=1).transformer
    ad2 = adapter_for(t2)
    y = torch.randn(2, 4, 6, 4, 8)
    lay = TokenLayout(grid=(3, 4, 8), n_text=TXT_LEN)
    assert ad2.sample_tokens(y).shape == (2, 96, 8) and torch.equal(ad2.tokens_sample(ad2.sample_tokens(y), lay), y)


def test_processor_full_path_is_bitwise_and_scores_honour_the_mask(pipe):
    t = pipe.transformer
    ad = adapter_for(t)
    ctl = AttnControl(score_every=1, score_chunk=7)
    g = torch.Generator().manual_seed(3)
    d = t.config.num_attention_heads * t.config.attention_head_dim
    mask = torch.ones(2, 1, 1, N_IMG + TXT_LEN, dtype=torch.bool)
    mask[1, ..., -TXT_PAD:] = False  # sample 1 has padding
    rope = t.rope(torch.zeros(1, 4, GRID[0], GRID[1] * 2, GRID[2] * 2))
    for layer, attn in enumerate(ad.attention_modules()):
        x, ctx = torch.randn(2, N_IMG, d, generator=g), torch.randn(2, TXT_LEN, d, generator=g)
        ref = attn.processor(attn, x, ctx, mask, rope)
        proc = ad.kv_cache_processor(attn, layer, ctl)
        kv = {}
        ctl.begin("full", kv, store_kv=True, score=True)
        ours = proc(attn, x, ctx, mask, rope)
        ctl.end()
        assert all(torch.equal(a, b) for a, b in zip(ref, ours))
        assert kv[layer][0].shape[:3] == (2, N_IMG + TXT_LEN, attn.heads)
        assert ctl.scores.shape == (2, N_IMG) and ctl.score_layers == 1
    # the masked score against a naive softmax with the mask
    q, k = torch.randn(2, 11, 3, 8, generator=g), torch.randn(2, 11, 3, 8, generator=g)
    km = torch.ones(2, 11, dtype=torch.bool)
    km[1, -3:] = False
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    probs = torch.softmax(logits.masked_fill(~km[:, None, None, :], float("-inf")), dim=-1)
    w = km.float()[:, None, :, None]
    naive = (probs * w).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) * 3)
    got = attention_received_masked(q, k, 8, km, km, chunk=4)
    torch.testing.assert_close(got, naive[:, :8], rtol=1e-5, atol=1e-7)
    assert (got[1].sum() - 1.0).abs() < 1e-5  # masked keys get nothing: the 8 image keys take all of it
    # no mask: the same as the FLUX score over the leading keys
    torch.testing.assert_close(attention_received_masked(q, k, 8, None, None, chunk=4), attention_received(q, k)[:, :8])


def test_partial_call_with_fresh_cache_reproduces_full_outputs(pipe):
    """K/V mechanics through `run_subset`: cache every layer's K/V on a dense call, then run only some image
    tokens (patch embedding and RoPE rows restricted, key mask widened, text kept) on the same input: their
    outputs equal the dense call's."""
    t = pipe.transformer
    ad = adapter_for(t)
    mods = ad.attention_modules()
    originals = [m.processor for m in mods]
    ctl = AttnControl()
    for i, m in enumerate(mods):
        m.set_processor(ad.kv_cache_processor(m, i, ctl))
    try:
        pe, pooled, mask = embeds()
        x = torch.randn(1, 4, GRID[0], GRID[1] * 2, GRID[2] * 2, generator=torch.Generator().manual_seed(0))
        kw = dict(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=pe,
                  encoder_attention_mask=mask, pooled_projections=pooled, guidance=torch.tensor([6000.0]),
                  return_dict=False)
        kv = {}
        ctl.begin("full", kv, store_kv=True, score=False)
        with torch.no_grad():
            full = ad.sample_tokens(t(**kw)[0])
        ctl.end()
        idx = torch.tensor([40, 3, 10, 11, 47, 20])  # any order: rows follow the index
        layout = TokenLayout(grid=GRID, n_text=TXT_LEN)
        ctl.begin("partial", kv, store_kv=False, score=True, rows=ad.joint_rows(layout, idx))
        with torch.no_grad():
            out, part = ad.run_subset(t.forward, (), kw, idx)
        ctl.end()
        assert part.shape == (1, 6, full.shape[2]) and out[0].shape == x.shape
        torch.testing.assert_close(part, full[:, idx], rtol=1e-4, atol=1e-5)
        assert ctl.scores.shape == (1, N_IMG)
    finally:
        for m, p in zip(mods, originals):
            m.set_processor(p)


# ---- CFG branches and batches --------------------------------------------------------------------------
def _padded_pair(seed):
    """(prompt_embeds, pooled, mask) for a batch of 2 whose samples have different prompt lengths (the model masks
    text tokens from each sample's length on)."""
    pe, pooled, mask = embeds(seed=seed, batch=2)
    mask[1, 3:] = 0
    return pe, pooled, mask


def _cfg_call(pipe, negative):
    pe, pooled, mask = _padded_pair(1)
    ne, npooled, nmask = negative
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=mask,
                negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npooled,
                negative_prompt_attention_mask=nmask, true_cfg_scale=3.0, height=64, width=64, num_frames=9,
                num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0)).frames


CFG_CONFIGS = {
    "speca": (accel.SpeCaConfig(threshold=1e9, warmup_steps=2, min_spec_steps=1),
              accel.SpeCaConfig(schedule=[True] * STEPS)),
    "specdiff": (accel.SpecDiffConfig(cache_rate=0.8, warmup_steps=2), accel.SpecDiffConfig(cache_rate=0.0)),
}


@pytest.mark.parametrize("method", list(CFG_CONFIGS))
def test_true_cfg_and_batch_keep_separate_states(pipe, method):
    """True CFG, a batch of 2, prompts of different lengths per sample and per branch.
    - All-full configs: the plain pipeline's output bit for bit.
    - A negative prompt equal to the prompt: both branches see the same inputs, so with separate states they
      record the same steps, and the CFG mix equals the one-branch run exactly.
    - Another negative prompt (sample 1 shorter still): each branch has its own pre-run and its own errors or
      token ranking; errors are per sample."""
    accelerated, all_full = CFG_CONFIGS[method]
    other = embeds(seed=2, batch=2)
    other[2][1, 2:] = 0  # sample 1's negative prompt: 2 tokens (the model reads a prompt's length from its mask)
    plain = _cfg_call(pipe, other)
    with accel.apply(pipe, all_full):
        assert torch.equal(_cfg_call(pipe, other), plain)

    pe, pooled, mask = _padded_pair(1)
    with accel.apply(pipe, accelerated) as h:
        one_branch = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=mask, height=64,
                          width=64, num_frames=9, num_inference_steps=STEPS, output_type="latent",
                          generator=torch.Generator().manual_seed(0)).frames
        same = _cfg_call(pipe, _padded_pair(1))
        trace = h.trace
    assert torch.equal(same, one_branch)
    cond, uncond = trace.for_context("cond"), trace.for_context("uncond")
    assert len(cond) == len(uncond) == STEPS
    view = lambda r: (r.decision, r.blocks_computed, r.error, r.errors,  # noqa: E731
                      {k: v.tobytes() for k, v in sorted(r.maps.items())})
    assert [view(r) for r in cond] == [view(r) for r in uncond]

    with accel.apply(pipe, accelerated) as h:
        out = _cfg_call(pipe, other)
        trace = h.trace
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert trace.contexts() == ["cond", "uncond"]
    cond, uncond = trace.for_context("cond"), trace.for_context("uncond")
    assert all(r.decision != "full" for r in cond[2:] + uncond[2:])
    if method == "speca":
        spec = [(c, u) for c, u in zip(cond, uncond) if c.errors is not None]
        assert spec and all(len(c.errors) == len(u.errors) == 2 for c, u in spec)
        assert all(c.errors != u.errors and c.errors[0] != c.errors[1] for c, u in spec)
    else:
        assert sorted(r.context for r in trace.overhead) == ["cond", "uncond"]
        assert any((c.maps["importance"] != u.maps["importance"]).any() for c, u in zip(cond, uncond)
                   if c.decision == "partial")


# ---- errors ---------------------------------------------------------------------------------------------
def test_unsupported_models_raise_clear_errors(pipe):
    class NotAPipe:
        transformer = nn.Linear(2, 2)
        scheduler = None

    with pytest.raises(ValueError, match="unsupported model: Linear.*HunyuanVideoTransformer3DModel"):
        accel.apply(NotAPipe(), accel.SpeCaConfig())
    i2v = tiny_video_pipe(double=1, single=1)
    i2v.transformer.register_to_config(image_condition_type="token_replace")
    for cfg in (accel.SpeCaConfig(), accel.SpecDiffConfig()):
        with pytest.raises(ValueError, match="image_condition_type='token_replace'"):
            accel.apply(i2v, cfg)
    with pytest.raises(ValueError, match=r"verify_block=4 is out of range: this model has 4 blocks"):
        accel.apply(pipe, accel.SpeCaConfig(verify_block=4))
    # SpecDiff's text caching: FLUX only (HunyuanVideo's text goes through the token refiner, masked); nothing is
    # left attached by the refusal
    with pytest.raises(ValueError, match="text_tokens='cache' is not supported for the hunyuan_video family"):
        accel.apply(pipe, accel.SpecDiffConfig(text_tokens="cache"))
    assert all(type(m.processor).__module__.startswith("diffusers") for m in pipe.transformer.modules()
               if hasattr(m, "processor"))
    with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.0)):
        pass
