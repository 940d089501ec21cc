"""accel.calibrate: the speed knob's value whose ideal speedup matches a target, by bisection."""

import pytest

import accel
import tiny


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_flux_pipe()


def _kw():
    pe, pooled = tiny.embeds()
    return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=64, width=64, num_inference_steps=10,
                output_type="latent")


def test_every_lab_method_with_a_trade_off_names_its_speed_knob():
    assert accel.speed_knob(accel.SpeCaConfig).name == "threshold"
    assert accel.speed_knob(accel.SpecDiffConfig).name == "cache_rate"
    assert accel.speed_knob(accel.TaylorSeerConfig).name == "cache_interval"
    with pytest.raises(ValueError, match="speed knob"):
        accel.speed_knob(accel.FullConfig)


@pytest.mark.parametrize("config, target", [(accel.SpeCaConfig(), 1.5), (accel.SpecDiffConfig(), 1.25)])
def test_calibrate_reaches_the_target_and_is_monotone(pipe, config, target):
    cal = accel.calibrate(pipe, config, target, tolerance=0.1, **_kw())
    assert abs(cal.speedup - target) <= 0.1 * target, cal.tried
    assert type(cal.config) is type(config)
    assert cal.traces and cal.traces[0].summary()["ideal_speedup"] == pytest.approx(cal.speedup, rel=1e-3)
    pts = sorted(cal.tried)
    assert all(a[1] <= b[1] + 1e-9 for a, b in zip(pts, pts[1:])), pts  # larger knob, no slower


def test_calibrate_refuses_a_target_below_one(pipe):
    with pytest.raises(ValueError, match="target_speedup"):
        accel.calibrate(pipe, accel.SpeCaConfig(), 0.5, **_kw())
