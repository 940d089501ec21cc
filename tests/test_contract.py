"""The contract every model family and every method keep (after diffusers' `CacheTesterMixin`).

Parametrised over the families of tests/families.py (tiny random FLUX, tiny random HunyuanVideo) and over the
methods (SpeCa, SpecDiff, and the baselines Full / TaylorSeer / FirstBlockCache). A new family gets every test
here by adding one `Family` to `families.FAMILIES`.

- exactness: all-full configs give the plain pipeline's output bit for bit;
- `remove()`: the plain pipeline's output again, hooks, processors and diffusers caches gone, also after an
  exception in the middle of a run;
- real compute: multiply-accumulates of the blocks' leaf `nn.Linear`s (plain torch hooks), and for SpecDiff the
  token rows entering them, equal the trace's `blocks_computed` / `tokens_computed` call by call, and an
  accelerated run computes less;
- isolation: two pipelines interleaved, runs one after another, true-CFG cond/uncond, batch 2;
- SpecDiff's partial steps and importance against a reference built from diffusers' own attention (a K/V cache
  from the previous step's input, rows rebuilt by hand; attention received by a naive softmax).

Only the public API (`accel.apply`, configs, `Handle`, `Trace`) and diffusers are used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import accel
from families import FAMILIES, Family


# ---- methods ------------------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str
    accelerated: Callable[[Family], object] | None
    """A config that really skips work on the tiny models (None: the method never does)."""
    all_full: Callable[[int], object] | None = None
    """steps -> a config of this method that computes every step fully (None: the method has none)."""
    branch_signature: Callable | None = None
    """StepRecord -> what must differ between the true-CFG branches when their prompts differ."""
    tokens: bool = False
    """Its compute is a share of the tokens (SpecDiff): counted from token rows, not whole blocks."""


def _speca(**forecast) -> Method:
    """SpeCa with its default forecast (output), or another one (`forecast="stack"` / `"per_block"`)."""
    return Method(
        "speca",
        lambda fam: accel.SpeCaConfig(threshold=1e9, warmup_steps=2, min_spec_steps=1, max_spec_steps=4, **forecast),
        lambda n: accel.SpeCaConfig(schedule=[True] * n, **forecast),
        branch_signature=lambda r: r.errors,
    )


METHODS = {
    "speca": _speca(),
    "speca_stack": _speca(forecast="stack"),
    "speca_per_block": _speca(forecast="per_block"),
    "specdiff": Method(
        "specdiff",
        # text tokens computed (the paper's; the default "auto" caches them on FLUX, whose contract is below)
        lambda fam: accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, spec_steps=3, text_tokens="compute"),
        lambda n: accel.SpecDiffConfig(cache_rate=0.0),
        branch_signature=lambda r: None if "importance" not in r.maps else r.maps["importance"].tobytes(),
        tokens=True,
    ),
    "full": Method("full", None, lambda n: accel.FullConfig()),
    "taylorseer": Method(
        "taylorseer",
        lambda fam: accel.TaylorSeerConfig(cache_interval=3, disable_cache_before_step=2,
                                           taylor_factors_dtype="float32"),
    ),
    "fbcache": Method("fbcache", lambda fam: accel.FirstBlockConfig(threshold=10.0)),
}
ALL = list(METHODS)
ACCELERATING = [m for m in ALL if METHODS[m].accelerated is not None]
ALL_FULL = [m for m in ALL if METHODS[m].all_full is not None]


# Contract breaches found by this suite in accel's baselines (accel/baselines.py), kept visible as strict xfails:
# each turns into a failure (XPASS) the day it is fixed, so the mark must go then.
KNOWN_BREACHES: dict = {}


def methods(names, contract: str) -> list:
    """Parametrisation of `names` with the known breaches of `contract` marked strict xfail."""
    out = []
    for n in names:
        reason = KNOWN_BREACHES.get((contract, n))
        out.append(pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=reason)) if reason else n)
    return out


def config_for(method: str, fam: Family):
    m = METHODS[method]
    return m.accelerated(fam) if m.accelerated is not None else m.all_full(fam.steps)


# ---- family fixture -------------------------------------------------------------------------------------------
class Env:
    """One family's pipelines and cached plain outputs for the whole module."""

    def __init__(self, fam: Family):
        self.fam = fam
        self.pipe = fam.make_pipe(0)
        self._pipe2 = None
        self._plain: dict = {}

    @property
    def pipe2(self):
        """A second pipeline of the family with other weights (isolation tests)."""
        if self._pipe2 is None:
            self._pipe2 = self.fam.make_pipe(5)
        return self._pipe2

    def plain(self, key: str = "default", **kw) -> torch.Tensor:
        if key not in self._plain:
            assert not hooks_on(self.pipe)
            self._plain[key] = self.fam.run(self.pipe, **kw)
        return self._plain[key]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def env(request):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models are far too small for intra-op threads
    yield Env(request.param)
    torch.set_num_threads(n)


def hooks_on(pipe) -> list[str]:
    """SpecLab hooks on any module of the transformer, or a diffusers cache left enabled."""
    names = []
    for m in pipe.transformer.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None:
            names += [n for n in reg.hooks if n.startswith("speclab_")]
    if pipe.transformer.is_cache_enabled:
        names.append("diffusers cache")
    return names


def processors(pipe) -> list:
    return [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]


def cfg_kwargs(fam: Family, same_negative: bool, batch: int = 1) -> dict:
    """True-CFG call arguments: the negative prompt equals the prompt, or is another one."""
    neg = fam.negative(1 if same_negative else 2, batch)
    return dict(true_cfg_scale=3.0, **neg)


def record_view(r) -> tuple:
    """What a step record says about the computation (not its wall time)."""
    maps = {k: (v.shape, v.tobytes()) for k, v in sorted(r.maps.items())}  # arrays, compared bit for bit
    return (r.step, r.decision, r.reason, r.blocks_computed, r.tokens_computed, r.error, r.errors, maps)


def close(a, b, rtol=1e-5, atol=1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---- independent compute meter --------------------------------------------------------------------------------
class Meter:
    """Per transformer call: calls, multiply-accumulates and input token rows of every leaf `nn.Linear` inside the
    blocks, from plain torch forward hooks (they fire only where a Linear really runs). A call starts at the
    family's call marker, so calls that bypass the transformer's `__call__` (SpecDiff's pre-run) count too."""

    def __init__(self, fam: Family, transformer):
        self.calls: list[dict] = []
        blocks = fam.blocks(transformer)
        self.n_blocks = len(blocks)
        self.handles = [fam.call_marker(transformer).register_forward_pre_hook(lambda *_: self.calls.append({}))]
        for bi, block in enumerate(blocks):
            for name, m in block.named_modules():
                if isinstance(m, nn.Linear):
                    self.handles.append(m.register_forward_hook(self._hit(bi, f"{bi}.{name}")))

    def _hit(self, block: int, name: str):
        def hook(mod, inputs, out):
            x = inputs[0]
            rows = x.numel() // x.shape[-1]
            macs = rows * mod.in_features * mod.out_features
            rec = self.calls[-1].setdefault(name, {"block": block, "calls": 0, "macs": 0, "token_macs": 0, "rows": 0})
            rec["calls"] += 1
            rec["macs"] += macs
            if x.ndim > 2:  # token rows; [B, D] inputs are the modulation linears (temb)
                rec["token_macs"] += macs
                rec["rows"] += rows
        return hook

    def per_block(self, call: dict, key: str) -> list[float]:
        out = [0.0] * self.n_blocks
        for rec in call.values():
            out[rec["block"]] += rec[key]
        return out

    def block_equivalents(self, call: dict, ref: dict, key: str = "macs") -> float:
        """Sum over blocks of (work in this call / work of the same block in a plain call)."""
        done, full = self.per_block(call, key), self.per_block(ref, key)
        return sum(d / f for d, f in zip(done, full))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def call_records(trace: accel.Trace) -> list:
    """Trace records in the order the transformer ran them: step 0, the pre-run (it runs right after step 0),
    the other steps (one context, no CFG)."""
    return trace.steps[:1] + list(trace.overhead) + trace.steps[1:]


# ==== exactness ==================================================================================================
@pytest.mark.parametrize("method", ALL_FULL)
def test_all_full_config_is_bit_identical(env, method):
    fam = env.fam
    with accel.apply(env.pipe, METHODS[method].all_full(fam.steps)) as h:
        out = fam.run(env.pipe)
        trace = h.trace
    assert torch.equal(out, env.plain())
    s = trace.summary()
    assert s["steps"] == s["full_steps"] == fam.steps
    assert s["accepted_steps"] == s["rejected_steps"] == s["partial_steps"] == s["overhead_calls"] == 0
    assert s["ideal_speedup"] == 1.0
    assert trace.meta["family"] == fam.name and trace.token_grid == list(fam.grid)


@pytest.mark.parametrize("method", ALL)
def test_remove_restores_the_plain_pipeline(env, method):
    fam, pipe = env.fam, env.pipe
    plain = env.plain()  # computed (and cached) before anything is attached
    before = processors(pipe)
    h = accel.apply(pipe, config_for(method, fam))
    assert hooks_on(pipe)
    out = fam.run(pipe)
    if METHODS[method].accelerated is not None:
        assert not torch.equal(out, plain), "the accelerated config changes the output"
    h.remove()
    h.remove()  # a second remove is harmless
    assert not hooks_on(pipe)
    assert all(a is b for a, b in zip(processors(pipe), before))
    assert torch.equal(fam.run(pipe), plain)


def test_speca_speculative_steps_take_the_runs_rotary_embedding(env, monkeypatch):
    """SpeCa's speculative steps reuse the rotary embedding of the run's full steps (token positions are set once
    per pipeline call): the module runs on full steps only, and the outputs are bit-identical to runs that
    recompute it every step, over runs one after another with other seeds."""
    fam, pipe = env.fam, env.pipe
    rot = fam.rotary(pipe.transformer)
    calls = []
    inner = rot.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(rot, "forward", counted)  # before apply: the hook's original forward is the counter
    schedule = [True, True] + [False, False, True] * fam.steps
    cfg = accel.SpeCaConfig(schedule=schedule[:fam.steps])
    n_full = sum(cfg.schedule)
    outs = []
    with accel.apply(pipe, cfg) as h:
        for seed in (0, 1):
            calls.clear()
            outs.append(fam.run(pipe, seed=seed))
            assert len(calls) == n_full, "the rotary module ran on speculative steps"
        assert h.trace.meta["cache_bytes"] > h.trace.meta["cache_bytes_terms"]
    adapter_cls = type(accel.adapters.adapter_for(pipe.transformer))
    monkeypatch.setattr(adapter_cls, "rotary_modules", lambda self: [])
    with accel.apply(pipe, cfg):
        for seed, kept in zip((0, 1), outs):
            calls.clear()
            assert torch.equal(fam.run(pipe, seed=seed), kept)
            assert len(calls) == fam.steps  # recomputed every step
    assert not hooks_on(pipe)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("method", methods(ALL, "exception"))
def test_exception_mid_run_leaves_nothing_behind(env, method):
    """An exception raised inside the transformer in the middle of a run: the next run with the method attached
    gives the same output as an uninterrupted one, and `remove()` then gives the plain pipeline back."""
    fam, pipe = env.fam, env.pipe
    cfg = config_for(method, fam)
    with accel.apply(pipe, cfg) as h:
        clean = fam.run(pipe)
        clean_trace = h.trace
    h = accel.apply(pipe, cfg)
    calls = []

    def boom(*_):
        calls.append(1)
        if len(calls) == fam.steps // 2 + 1:
            raise Boom("mid-run")

    hb = fam.call_marker(pipe.transformer).register_forward_pre_hook(boom)
    try:
        with pytest.raises(Boom):
            fam.run(pipe)
    finally:
        hb.remove()
    try:
        assert torch.equal(fam.run(pipe), clean)
        assert [record_view(r) for r in h.trace.steps] == [record_view(r) for r in clean_trace.steps]
    finally:
        h.remove()
    assert not hooks_on(pipe)
    assert torch.equal(fam.run(pipe), env.plain())


# ==== real compute ===============================================================================================
@pytest.mark.parametrize("method", methods(ALL, "compute"))
def test_compute_counted_from_linears_matches_the_trace(env, method):
    fam, pipe = env.fam, env.pipe
    m = METHODS[method]
    meter = Meter(fam, pipe.transformer)
    try:
        fam.run(pipe)
        plain_calls = list(meter.calls)
        meter.calls.clear()
        with accel.apply(pipe, config_for(method, fam)) as h:
            fam.run(pipe)
            trace = h.trace
    finally:
        meter.close()
    ref = plain_calls[0]
    assert all(c == ref for c in plain_calls)  # every plain call does the same work
    recs = call_records(trace)
    assert len(meter.calls) == len(recs)
    key = "token_macs" if m.tokens else "macs"
    for rec, call in zip(recs, meter.calls):
        assert rec.blocks_total == meter.n_blocks
        assert rec.blocks_computed == pytest.approx(meter.block_equivalents(call, ref, key), rel=1e-9), rec
    if m.tokens:
        check_token_rows(fam, recs, meter.calls, ref)
    total = sum(meter.block_equivalents(c, ref) for c in meter.calls)
    if m.accelerated is None:
        assert total == pytest.approx(fam.steps * meter.n_blocks)
    else:
        assert total < fam.steps * meter.n_blocks * 0.95, "the accelerated run really computes less"
        assert trace.summary()["ideal_speedup"] > 1.05


def test_specdiff_text_tokens_auto_caches_where_supported(env):
    """The default text_tokens="auto": the text tokens are cached on partial steps where the family supports it
    (FLUX: no text row enters a partial call), computed elsewhere (HunyuanVideo: every partial call has them);
    the trace says which."""
    fam, pipe = env.fam, env.pipe
    assert accel.SpecDiffConfig().text_tokens == "auto"
    seen = []  # text rows of each transformer call, from the context embedder (both families have one)
    keep = pipe.transformer.context_embedder.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    try:
        with accel.apply(pipe, accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, spec_steps=3)) as h:
            fam.run(pipe)
            trace = h.trace
    finally:
        keep.remove()
    cached = fam.name == "flux"
    assert trace.meta["text_tokens"] == ("cache" if cached else "compute")
    partial = [r for r in trace.steps if r.decision == "partial"]
    assert partial
    assert (min(seen) == 0) == cached  # a call without text rows happened exactly when the text is cached


def test_specdiff_text_cache_compute_counted_from_linears(env):
    """SpecDiff with text_tokens="cache" (FLUX; refused for the other families): on partial calls no text row
    enters any Linear, image rows are the C1 tokens, and the trace's blocks_computed = n_blocks x C1 / (text + N)
    equals the multiply-accumulates counted, call by call."""
    fam, pipe = env.fam, env.pipe
    cfg = accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, spec_steps=3, text_tokens="cache")
    if fam.name != "flux":
        with pytest.raises(ValueError, match="text_tokens='cache' is not supported"):
            accel.apply(pipe, cfg)
        assert not hooks_on(pipe)
        return
    meter = Meter(fam, pipe.transformer)
    try:
        fam.run(pipe)
        ref = meter.calls[0]
        meter.calls.clear()
        with accel.apply(pipe, cfg) as h:
            fam.run(pipe)
            trace = h.trace
    finally:
        meter.close()
    recs = call_records(trace)
    assert len(meter.calls) == len(recs)
    n1 = cfg.n_computed(fam.n_image)
    for rec, call in zip(recs, meter.calls):
        assert rec.blocks_computed == pytest.approx(meter.block_equivalents(call, ref, "token_macs"), rel=1e-9), rec
        if rec.decision == "partial":
            assert rec.blocks_computed == pytest.approx(meter.n_blocks * n1 / (fam.n_text + fam.n_image), rel=1e-12)
    check_token_rows(fam, recs, meter.calls, ref, text_cached=True)


def check_token_rows(fam: Family, recs, calls, ref, batch: int = 1, text_cached: bool = False) -> None:
    """SpecDiff: every Linear that carries image tokens gets exactly `tokens_computed` of them per sample; a Linear
    that carries only text tokens gets all of them, on every call (with `text_cached`, none on partial calls: then
    a Linear that carries both gets no text row either)."""
    text_rows = batch * fam.n_text
    for rec, call in zip(recs, calls):
        assert rec.tokens_total == fam.n_image
        assert set(call) == set(ref)
        skipped = batch * (fam.n_image - rec.tokens_computed)
        no_text = text_cached and rec.decision == "partial"
        for name, plain in ref.items():
            if not plain["rows"]:
                continue
            text_only = plain["rows"] == text_rows * plain["calls"]
            if not no_text:
                expect = plain["rows"] if text_only else plain["rows"] - skipped
            else:  # rows per call: text only, image only, or both (joint)
                per_call = plain["rows"] // plain["calls"]
                assert per_call in (text_rows, batch * fam.n_image, text_rows + batch * fam.n_image), name
                expect = 0 if text_only else plain["calls"] * batch * rec.tokens_computed
            assert call[name]["rows"] == expect, (rec.step, name)
    assert any(r.tokens_computed < fam.n_image for r in recs)


@pytest.mark.parametrize("method", ["taylorseer", "fbcache"])
def test_baseline_output_is_diffusers_own_cache(env, method):
    fam, pipe = env.fam, env.pipe
    cfg = config_for(method, fam)
    pipe.transformer.enable_cache(cfg.to_diffusers())
    try:
        expected = fam.run(pipe)
    finally:
        pipe.transformer.disable_cache()
    with accel.apply(pipe, cfg):
        assert torch.equal(fam.run(pipe), expected)


# ==== isolation ==================================================================================================
@pytest.mark.parametrize("method", ACCELERATING)
def test_interleaved_pipelines_do_not_share_state(env, method):
    fam, a, b = env.fam, env.pipe, env.pipe2
    cfg = config_for(method, fam)
    with accel.apply(a, cfg):
        alone_a = fam.run(a)
    with accel.apply(b, cfg):
        alone_b = fam.run(b, seed=3)
    ha, hb = accel.apply(a, cfg), accel.apply(b, cfg)
    inner = {}

    def in_the_middle(p, i, t, kw):
        if i == fam.steps // 2:  # a whole run of b inside a step of a
            inner["b"] = fam.run(b, seed=3)
        return kw

    try:
        out_a = fam.run(a, callback_on_step_end=in_the_middle)
        assert torch.equal(out_a, alone_a) and torch.equal(inner["b"], alone_b)
        assert len(ha.traces) == 1 and len(hb.traces) == 1
        assert [r.step for r in ha.trace.steps] == list(range(fam.steps))
    finally:
        ha.remove(), hb.remove()


@pytest.mark.parametrize("method", ACCELERATING)
def test_runs_one_after_another_start_clean(env, method):
    fam, pipe = env.fam, env.pipe
    with accel.apply(pipe, config_for(method, fam)) as h:
        first = fam.run(pipe)
        fam.run(pipe, steps=fam.steps - 2, seed=7, prompt_seed=4)  # another run in between
        again = fam.run(pipe)
        traces = list(h.traces)
    assert torch.equal(again, first)
    assert len(traces) == 3 and [len(t.steps) for t in traces] == [fam.steps, fam.steps - 2, fam.steps]
    assert [record_view(r) for r in traces[2].steps] == [record_view(r) for r in traces[0].steps]
    assert len(traces[2].overhead) == len(traces[0].overhead)


@pytest.mark.parametrize("method", ALL)
def test_true_cfg_branches_keep_separate_states(env, method):
    """With the negative prompt equal to the prompt, the two branches see the same inputs: with separate states
    they take the same decisions and the CFG mix is exactly the one-branch output. With another negative prompt,
    all-full configs still match the plain CFG pipeline bit for bit, and each branch verifies/ranks its own."""
    fam, pipe = env.fam, env.pipe
    if fam.negative is None:
        pytest.skip(f"{fam.name}'s pipeline has no true CFG (negative prompts)")
    m = METHODS[method]
    cfg = config_for(method, fam)
    with accel.apply(pipe, cfg) as h:
        one_branch = fam.run(pipe)
        both = fam.run(pipe, **cfg_kwargs(fam, same_negative=True))
        trace = h.trace
    assert torch.equal(both, one_branch)
    assert trace.contexts() == ["cond", "uncond"]
    cond, uncond = trace.for_context("cond"), trace.for_context("uncond")
    assert len(cond) == len(uncond) == fam.steps
    assert [record_view(r) for r in cond] == [record_view(r) for r in uncond]
    assert sorted(r.context for r in trace.overhead) == sorted(["cond", "uncond"] * (len(trace.overhead) // 2))

    other = cfg_kwargs(fam, same_negative=False)
    if m.all_full is not None:
        plain = env.plain("cfg", **other)
        with accel.apply(pipe, m.all_full(fam.steps)):
            assert torch.equal(fam.run(pipe, **other), plain)
    if m.branch_signature is not None:
        with accel.apply(pipe, cfg) as h:
            out = fam.run(pipe, **other)
            trace = h.trace
        assert torch.isfinite(out).all()
        sig = [(m.branch_signature(c), m.branch_signature(u))
               for c, u in zip(trace.for_context("cond"), trace.for_context("uncond"))]
        assert any(c is not None and c != u for c, u in sig), "each branch computes its own errors / importance"


@pytest.mark.parametrize("method", ALL)
def test_batch_of_two(env, method):
    """Two copies of one sample in a batch: both outputs equal the batch-1 output of that sample, with the same
    decisions. Two different samples: per-sample errors (SpeCa), different outputs."""
    fam, pipe = env.fam, env.pipe
    cfg = config_for(method, fam)
    x = fam.latents(11, 1)
    prompt = fam.prompt(1, 1)
    twice = {k: torch.cat([v, v]) for k, v in prompt.items()}
    with accel.apply(pipe, cfg) as h:
        single = fam.run(pipe, latents=x)
        t1 = h.trace
        pair = fam.run(pipe, latents=torch.cat([x, x]), batch=2, **twice)
        t2 = h.trace
        mixed = fam.run(pipe, latents=fam.latents(12, 2), batch=2)
        t3 = h.trace
    assert pair.shape[0] == 2 and torch.equal(pair[0], pair[1])
    close(pair[:1], single, rtol=1e-4, atol=1e-5)
    assert [r.decision for r in t2.steps] == [r.decision for r in t1.steps]
    assert [r.blocks_computed for r in t2.steps] == pytest.approx([r.blocks_computed for r in t1.steps])
    assert mixed.shape[0] == 2 and torch.isfinite(mixed).all() and not torch.equal(mixed[0], mixed[1])
    verified = [r for r in t3.steps if r.errors is not None]
    if METHODS[method].name == "speca":
        assert verified and all(len(r.errors) == 2 and r.error == max(r.errors) for r in verified)
        assert all(r.errors[0] != r.errors[1] for r in verified)
        assert all(len(r.errors) == 2 and r.errors[0] == pytest.approx(r.errors[1], rel=1e-4)
                   for r in t2.steps if r.errors is not None)


# ==== SpecDiff against a reference built from diffusers' own attention ==============================================
class AttentionTap:
    """Wraps the `dispatch_attention_fn` that the family's diffusers attention processors call. On every joint
    attention layer (text + image keys) it records query, key, value and mask, and can rewrite key/value first.
    With it, a plain transformer call becomes a reference for SpecDiff's K/V-cached partial steps."""

    def __init__(self, fam: Family, monkeypatch):
        self.n_keys = fam.n_text + fam.n_image
        self.layers: list[dict] = []
        self.rewrite = None
        for mod in fam.attention_modules:
            monkeypatch.setattr(mod, "dispatch_attention_fn", self._wrap(mod.dispatch_attention_fn))

    def _wrap(self, real):
        def dispatch(query, key, value, attn_mask=None, **kw):
            if key.shape[1] == self.n_keys:
                if self.rewrite is not None:
                    key, value = self.rewrite(len(self.layers), key, value)
                self.layers.append(dict(q=query, k=key, v=value, mask=attn_mask))
            return real(query, key, value, attn_mask=attn_mask, **kw)
        return dispatch

    def call(self, transformer, kwargs, rewrite=None):
        self.layers, self.rewrite = [], rewrite
        try:
            with torch.no_grad():
                out = transformer(**kwargs)
        finally:
            self.rewrite = None
        return (out[0] if isinstance(out, tuple) else out.sample), self.layers


def attention_received(fam: Family, layers: list[dict], every: int, rows: torch.Tensor | None = None,
                       stride: int = 1) -> torch.Tensor:
    """Naive: per scored layer, softmax(q k^T / sqrt(d)) with the key mask, averaged over heads and over the valid
    scored queries (every `stride`-th of `rows` of the joint sequence, or of all), column of every image key;
    summed over layers. [B, N]."""
    total = 0.0
    for i, layer in enumerate(layers):
        if i % every:
            continue
        q, k = layer["q"].double(), layer["k"].double()
        b, s = k.shape[:2]
        valid = torch.ones(b, s, dtype=torch.bool) if layer["mask"] is None else layer["mask"].reshape(b, s).bool()
        rows_ = (torch.arange(q.shape[1]) if rows is None else rows)[::stride]
        qvalid = valid[:, rows_]
        q = q[:, rows_]
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(dim=1)  # B q k
        probs = (probs * qvalid[..., None]).sum(dim=1) / qvalid.sum(dim=1, keepdim=True)
        total = total + probs[:, fam.image_key_start:fam.image_key_start + fam.n_image]
    return total


def per_sample_mean_one(scores: torch.Tensor) -> torch.Tensor:
    return (scores / scores.mean(dim=-1, keepdim=True)).mean(dim=0)


SPECDIFF_REF = dict(cache_rate=0.75, warmup_steps=2, spec_steps=2, score_every=2, starvation_scale=0.5,
                    text_tokens="compute")


def _replay_scope(fixture_name, config) -> str:
    """Module scope (one replay for the two tests below), except under mutmut (scripts/mutation.py): mutmut runs,
    for a mutant, only the tests it saw reach the mutated function, and a module fixture runs inside the first test
    that asks for it; per test, both tests reach SpecDiff and both run on every SpecDiff mutant."""
    return "function" if "MUTANT_UNDER_TEST" in os.environ else "module"


@pytest.fixture(scope=_replay_scope)
def specdiff_replay(env):
    """A SpecDiff run (inputs and outputs of every main step captured with a torch hook), then the same steps
    rebuilt with the plain transformer: full steps as they are; partial steps as dense calls whose attention layers
    take, for the image tokens outside C1, K/V from a cache that the reference keeps itself (the previous steps'
    dense K/V, C1 and text rows overwritten step by step); the pre-run as Euler steps from step 0's output."""
    return replay_specdiff(env, SPECDIFF_REF)


def replay_specdiff(env, config: dict) -> dict:
    """`specdiff_replay` for a config. With text_tokens="cache" the reference overwrites only the C1 rows: the text
    rows of its cache stay those of the last full step, and the history scores C1's queries only."""
    fam, pipe = env.fam, env.pipe
    cfg = accel.SpecDiffConfig(**config)
    text_cached = cfg.text_tokens == "cache"
    calls = []
    keep = pipe.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(({k: v.clone() if torch.is_tensor(v) else v
                                                      for k, v in kwargs.items()}, out[0].clone())),
        with_kwargs=True)
    try:
        with accel.apply(pipe, cfg) as h:
            fam.run(pipe)
            trace = h.trace
    finally:
        keep.remove()
    assert len(calls) == len(trace.steps) == fam.steps

    ref = {"trace": trace, "accel_out": [fam.out_tokens(o) for _, o in calls], "ref_out": {}, "stale_out": {},
           "importance": {}, "c1": {}, "text_fresh_out": {}}
    t = pipe.transformer
    every, stride = cfg.score_every, cfg.score_query_stride
    with pytest.MonkeyPatch.context() as mp:
        tap = AttentionTap(fam, mp)
        # the pre-run ("future"): its first call is step 0, the others Euler steps from there
        sigmas = trace.meta["prerun"]["cond"]["sigmas"]
        kw0, _ = calls[0]
        x, fut = kw0["hidden_states"], []
        for j, s in enumerate(sigmas):
            kw = dict(kw0, hidden_states=x, timestep=torch.full_like(kw0["timestep"], s * 1000.0 / fam.timestep_scale))
            v, layers = tap.call(t, kw)
            fut.append(per_sample_mean_one(attention_received(fam, layers, every, stride=stride)))
            if j + 1 < len(sigmas):
                x = (x.float() + (sigmas[j + 1] - s) * v.float()).to(x.dtype)
        cache: dict[int, tuple] = {}
        cached_for = torch.zeros(fam.n_image, dtype=torch.float64)
        his = None
        for i, rec in enumerate(trace.steps):
            kw, _ = calls[i]
            if rec.decision == "full":
                _, layers = tap.call(t, kw)
                cache = {l: (L["k"].clone(), L["v"].clone()) for l, L in enumerate(layers)}
                his = per_sample_mean_one(attention_received(fam, layers, every, stride=stride))
                cached_for.zero_()
                continue
            assert rec.decision == "partial"
            # importance of this step from what the steps before left
            j = min(range(len(sigmas)), key=lambda k: abs(sigmas[k] - rec.sigma))
            imp = his * fut[j] * torch.exp(cfg.starvation_scale * cached_for)
            ref["importance"][i] = (imp / imp.max(), sigmas[j])
            c1 = (torch.tensor(rec.maps["level"]).flatten() == 1).nonzero().flatten()
            ref["c1"][i] = c1
            fresh = fam.joint_image_rows(c1) if text_cached else torch.cat([fam.joint_text_rows(),
                                                                              fam.joint_image_rows(c1)])
            if i not in ref["stale_out"] and not ref["stale_out"]:  # the first partial step, without the row update
                out, _ = tap.call(t, kw, rewrite=lambda l, k, v: (cache[l][0], cache[l][1]))
                ref["stale_out"][i] = fam.out_tokens(out)[:, c1]

            if text_cached:  # the same step with fresh text rows too (what text_tokens="compute" would attend to)
                both = torch.cat([fam.joint_text_rows(), fresh])

                def merge_text_too(layer, key, value):
                    ck, cv = cache[layer][0].clone(), cache[layer][1].clone()
                    ck[:, both] = key[:, both]
                    cv[:, both] = value[:, both]
                    return ck, cv

                out, _ = tap.call(t, kw, rewrite=merge_text_too)
                ref["text_fresh_out"][i] = fam.out_tokens(out)[:, c1]

            def merge(layer, key, value):
                ck, cv = cache[layer]
                ck[:, fresh] = key[:, fresh]
                cv[:, fresh] = value[:, fresh]
                return ck.clone(), cv.clone()

            out, layers = tap.call(t, kw, rewrite=merge)
            ref["ref_out"][i] = fam.out_tokens(out)[:, c1]
            his = per_sample_mean_one(attention_received(fam, layers, every, rows=fresh, stride=stride))
            cached_for += 1
            cached_for[c1] = 0
    return ref


def test_specdiff_partial_steps_match_the_dense_reference(env, specdiff_replay):
    """Each partial step's output for its C1 tokens = the reference, whose K/V cache came from other inputs (the
    previous steps): a partial step that does not write its fresh K/V rows into the cache fails this."""
    ref = specdiff_replay
    assert len(ref["ref_out"]) == env.fam.steps - SPECDIFF_REF["warmup_steps"]
    for i, expect in ref["ref_out"].items():
        got = ref["accel_out"][i][:, ref["c1"][i]]
        close(got, expect, rtol=1e-4, atol=1e-5)
    # the reference can tell: the same step without the row update is far off
    (i, stale), = ref["stale_out"].items()
    assert (stale - ref["ref_out"][i]).norm() > 100 * 1e-5 * ref["ref_out"][i].norm()


def test_specdiff_text_cache_partial_steps_match_the_dense_reference(env):
    """text_tokens="cache" (FLUX): each partial step's C1 outputs = the dense reference whose cache keeps the last
    full step's text rows; the same reference with fresh text rows (what "compute" does) is far off, so a partial
    step that still computed the text would fail this."""
    if env.fam.name != "flux":
        pytest.skip("text_tokens='cache' is FLUX only (the refusal: test_specdiff_text_cache_compute_counted...)")
    cfg = dict(SPECDIFF_REF, text_tokens="cache")
    ref = replay_specdiff(env, cfg)
    assert len(ref["ref_out"]) == env.fam.steps - SPECDIFF_REF["warmup_steps"]
    for i, expect in ref["ref_out"].items():
        close(ref["accel_out"][i][:, ref["c1"][i]], expect, rtol=1e-4, atol=1e-5)
    # the importance follows the same reference (history from C1's queries only)
    for i, (expect, _) in ref["importance"].items():
        got = torch.tensor(ref["trace"].steps[i].maps["importance"], dtype=torch.float64).flatten()
        close(got, expect, rtol=1e-4, atol=1e-6)
    # the reference can tell: the same inputs attending to fresh text rows are far off
    last = max(ref["ref_out"])
    assert (ref["text_fresh_out"][last] - ref["ref_out"][last]).norm() > 100 * 1e-5 * ref["ref_out"][last].norm()


def test_specdiff_importance_term_by_term(env, specdiff_replay):
    """importance = history (attention received at the previous step: all queries after a full step, text + C1
    after a partial one, every `score_query_stride`-th of them) x future (the pre-run call at the nearest sigma) x exp(starvation_scale x steps cached),
    scaled to max 1: the trace's map, step by step."""
    ref, trace = specdiff_replay, specdiff_replay["trace"]
    assert ref["importance"]
    cached_twice = False
    for i, (expect, sigma) in ref["importance"].items():
        rec = trace.steps[i]
        assert rec.extra["spec_sigma"] == sigma
        got = torch.tensor(rec.maps["importance"], dtype=torch.float64).flatten()
        close(got, expect, rtol=1e-4, atol=1e-6)
        levels = torch.tensor(rec.maps["level"]).flatten()
        assert got[levels == 1].min() >= got[levels != 1].max()  # C1 = the top of this very map
        cached_twice |= i >= SPECDIFF_REF["warmup_steps"] + 2
    assert cached_twice, "the starvation term was checked with counts above 1"
    # the future term matters here: the two pre-run sigmas rank the tokens differently
    assert len({s for _, s in ref["importance"].values()}) == 2
