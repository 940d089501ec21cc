"""Baselines (accel/baselines.py): plain run and diffusers' TaylorSeerCache / FirstBlockCache, traced."""

import pytest
import torch

import accel
import tiny
from accel.trace import ACCEPTED, FULL, Trace

STEPS = 12


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_flux_pipe()


@pytest.fixture(scope="module")
def plain(pipe):
    return tiny.run(pipe, steps=STEPS)


def _n_blocks(pipe):
    t = pipe.transformer
    return len(t.transformer_blocks) + len(t.single_transformer_blocks)


def _count_to_q(pipe):
    """Independent tally: calls of every block's attention `to_q`, per denoiser call (plain torch hooks)."""
    per_call, handles = [], []
    t = pipe.transformer
    for b in list(t.transformer_blocks) + list(t.single_transformer_blocks):
        handles.append(b.attn.to_q.register_forward_hook(lambda *a: per_call.__setitem__(-1, per_call[-1] + 1)))
    handles.append(t.register_forward_pre_hook(lambda *a: per_call.append(0)))
    return per_call, handles


def test_full_is_traced(pipe):
    """(Bit-identical output and remove(): tests/test_contract.py.)"""
    with accel.apply(pipe, accel.FullConfig()) as h:
        tiny.run(pipe, steps=STEPS)
    t = h.trace
    assert t.method == "full" and len(t.steps) == STEPS
    assert all(r.decision == FULL and r.blocks_computed == _n_blocks(pipe) for r in t.steps)
    assert t.summary()["ideal_speedup"] == 1.0
    assert all(r.time_ms > 0 for r in t.steps)


@pytest.mark.parametrize("lite", [False, True])
def test_taylorseer_matches_diffusers_and_counts_real_compute(pipe, plain, lite):
    cfg = accel.TaylorSeerConfig(cache_interval=3, disable_cache_before_step=2, max_order=1, use_lite_mode=lite,
                                 taylor_factors_dtype="float32")
    pipe.transformer.enable_cache(cfg.to_diffusers())
    try:
        expected = tiny.run(pipe, steps=STEPS)
    finally:
        pipe.transformer.disable_cache()

    per_call, hs = _count_to_q(pipe)
    try:
        h = accel.apply(pipe, cfg)
        out = tiny.run(pipe, steps=STEPS)
    finally:
        for x in hs:
            x.remove()
    assert pipe.transformer.is_cache_enabled
    h.remove()
    assert not pipe.transformer.is_cache_enabled
    assert torch.equal(out, expected)  # the counting hooks change nothing
    assert torch.equal(tiny.run(pipe, steps=STEPS), plain)  # removed: baseline again

    t, n = h.trace, _n_blocks(pipe)
    assert t.method == "taylorseer" and len(t.steps) == STEPS
    for rec, q in zip(t.steps, per_call):
        planned_full, _ = cfg.planned_full(rec.step)
        assert (rec.decision == FULL) == planned_full
        if planned_full:
            assert rec.blocks_computed == pytest.approx(n) and q == n
        else:
            assert rec.decision == ACCEPTED and rec.reason == "forecast" and q == 0
            assert rec.blocks_computed < n
            if lite:
                assert rec.blocks_computed == 0
            else:  # the MLPs still run: a real, positive share of every block
                assert 0 < rec.blocks_computed < n
    s = t.summary()
    assert s["accepted_steps"] > 0 and s["ideal_speedup"] > 1


def test_first_block_cache_matches_diffusers_and_traces_its_error(pipe):
    cfg = accel.FirstBlockConfig(threshold=0.37)
    pipe.transformer.enable_cache(cfg.to_diffusers())
    try:
        expected = tiny.run(pipe, steps=STEPS)
    finally:
        pipe.transformer.disable_cache()

    per_call, hs = _count_to_q(pipe)
    try:
        with accel.apply(pipe, cfg) as h:
            out = tiny.run(pipe, steps=STEPS)
    finally:
        for x in hs:
            x.remove()
    assert torch.equal(out, expected)
    assert not pipe.transformer.is_cache_enabled
    t, n = h.trace, _n_blocks(pipe)
    assert t.steps[0].decision == FULL and t.steps[0].error is None
    decisions = {r.decision for r in t.steps}
    assert decisions == {FULL, ACCEPTED}, "threshold chosen so that the tiny pipe both skips and computes"
    for rec, q in zip(t.steps[1:], per_call[1:]):
        assert rec.threshold == 0.37 and rec.error is not None
        # diffusers computes the rest iff the first block's residual changed by more than the threshold
        assert (rec.decision == FULL) == (rec.error > 0.37)
        assert q == (n if rec.decision == FULL else 1)
        assert rec.blocks_computed == pytest.approx(n if rec.decision == FULL else 1)
        grid = t.token_grid
        assert len(rec.maps["error"]) == grid[0] and len(rec.maps["error"][0]) == grid[1]
    back = Trace.from_json(t.to_json())
    assert back.summary() == t.summary()


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="cache_interval"):
        accel.TaylorSeerConfig(cache_interval=0)
    with pytest.raises(ValueError, match="disable_cache_before_step"):
        accel.TaylorSeerConfig(disable_cache_before_step=0)
    with pytest.raises(ValueError, match="taylor_factors_dtype"):
        accel.TaylorSeerConfig(taylor_factors_dtype="int8")
    with pytest.raises(ValueError, match="threshold"):
        accel.FirstBlockConfig(threshold=-1)


def test_one_method_at_a_time(pipe):
    h = accel.apply(pipe, accel.FirstBlockConfig())
    try:
        with pytest.raises(ValueError):
            accel.apply(pipe, accel.TaylorSeerConfig())
    finally:
        h.remove()
    accel.apply(pipe, accel.FullConfig()).remove()
    assert not pipe.transformer.is_cache_enabled
