"""One pipeline, one run at a time. A second concurrent call fails as soon as it reaches the denoiser, without
touching the running call's state. It has already reset the pipeline's shared scheduler by then (diffusers'
pipelines set the scheduler before the first denoiser call), so the first run either goes on bit-identical (the
reset left its schedule as it was) or stops with a clear error: never a silently wrong result."""

import threading
import time

import pytest
import torch

import accel
from tiny import run, tiny_flux_pipe

STEPS = 8

CONFIGS = [accel.SpeCaConfig(), accel.SpecDiffConfig(cache_rate=0.5, warmup_steps=2), accel.FullConfig()]


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipe()


def _run_with_intruder(pipe, config, intruder_steps: int, at_step: int = 3, caught: dict | None = None):
    """Run `config` on `pipe`; at step `at_step` a second thread calls the same pipeline and is joined before
    the first run goes on. Returns (first run's latents, the intruder's exception or None, the trace); the
    intruder's exception also lands in `caught["e"]`."""
    caught = {} if caught is None else caught

    def intruder():
        try:
            run(pipe, intruder_steps, seed=5)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            caught["e"] = e

    def on_step_end(p, i, t, kw):
        if i == at_step:
            th = threading.Thread(target=intruder)
            th.start()
            th.join(timeout=120)
            assert not th.is_alive(), "the intruding call hung"
        return kw

    with accel.apply(pipe, config) as h:
        out = run(pipe, STEPS, callback_on_step_end=on_step_end)
        trace = h.trace
    return out, caught.get("e"), trace


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_second_call_fails_at_once_and_the_first_run_stops_loudly(pipe, config):
    caught = {}
    with pytest.raises(RuntimeError, match="reset its scheduler in the middle of this run"):
        _run_with_intruder(pipe, config, intruder_steps=STEPS, caught=caught)
    # the intruder was refused at its first denoiser call: it did not wait for the first run
    assert isinstance(caught.get("e"), RuntimeError)
    assert "already running an accelerated call in another thread" in str(caught["e"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_intruder_gets_a_clear_error_and_first_run_is_untouched_until_the_scheduler_moves(pipe, config):
    # An intruder that fails before it reaches the scheduler (bad input) leaves the first run bit-identical;
    # one that reaches the denoiser is refused with the concurrency message.
    with accel.apply(pipe, config) as h:
        solo = run(pipe, STEPS)
        solo_decisions = [r.decision for r in h.trace.steps]
    refused = []

    def on_step_end(p, i, t, kw):
        if i == 3:
            def intruder():
                try:
                    with pipe.transformer.cache_context("cond"):
                        pipe.transformer(**kw_intruder)
                except RuntimeError as e:
                    refused.append(str(e))
            th = threading.Thread(target=intruder)
            th.start()
            th.join(timeout=60)
        return kw

    lat = torch.randn(1, 16, 16)
    from tiny import embeds
    pe, pooled = embeds()
    kw_intruder = dict(hidden_states=lat, encoder_hidden_states=pe, pooled_projections=pooled,
                       timestep=torch.tensor([1.0]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(pe.shape[1], 3),
                       return_dict=False)
    with accel.apply(pipe, config) as h:
        out = run(pipe, STEPS, callback_on_step_end=on_step_end)
        decisions = [r.decision for r in h.trace.steps]
    assert refused and "already running an accelerated call in another thread" in refused[0]
    assert torch.equal(out, solo)
    assert decisions == solo_decisions
    # and the pipeline is free again afterwards, from any thread
    res = {}
    th = threading.Thread(target=lambda: res.setdefault("x", run(pipe, STEPS)))
    th.start()
    th.join()
    assert torch.equal(res["x"], run(pipe, STEPS))


def test_a_schedule_changed_mid_run_stops_the_first_run_with_a_clear_error(pipe):
    # The intruder sets the shared scheduler to another step count before it reaches the denoiser: the first
    # run cannot be right any more, so it must fail loudly instead of returning a silently wrong image.
    with pytest.raises(RuntimeError, match="reset its scheduler in the middle of this run"):
        _run_with_intruder(pipe, accel.SpeCaConfig(), intruder_steps=STEPS + 3)
    # the pipeline is usable again
    with accel.apply(pipe, accel.FullConfig()):
        assert torch.equal(run(pipe, STEPS), run(pipe, STEPS))


def test_an_abandoned_run_frees_the_pipeline_for_other_threads(pipe):
    def boom(p, i, t, kw):
        if i == 2:
            raise KeyboardInterrupt
        return kw

    with accel.apply(pipe, accel.SpeCaConfig()) as h:
        with pytest.raises(KeyboardInterrupt):
            run(pipe, STEPS, callback_on_step_end=boom)  # raised outside the transformer: no reset
        driver = h.pipe.transformer._diffusers_hook.get_hook("speclab_speca")
        assert driver._owner[0] == threading.get_ident()
        driver._owner = (driver._owner[0], time.monotonic() - driver._stale_after() - 1)  # it went quiet
        res = {}
        th = threading.Thread(target=lambda: res.setdefault("x", run(pipe, STEPS)))
        th.start()
        th.join()
        assert res["x"].shape == run(pipe, STEPS).shape
