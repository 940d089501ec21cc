"""Tiny HunyuanVideo: the clip generator's captions agree with its pixels; the build + training path (--smoke:
smoke preset, CPU, a few iterations) makes a folder that loads offline through
``HunyuanVideoPipeline.from_pretrained``; and the bundled, trained model (assets/models/tiny-hunyuanvideo) loads
offline, fits its size budget, and makes clips that move in the direction the prompt names, in its colour, also
under SpeCa and SpecDiff (docs/tiny-video.md)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from scripts.tiny_video import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generator_captions_agree_with_pixels():
    clips = data.sample_clips(32, seed=7)
    video = data.render(clips)
    assert video.shape == (32, 3, data.FRAMES, data.RES, data.RES)
    for i, cap in enumerate(data.captions(clips)):
        at, a = data.clip_attrs(clips, i), data.analyze_clip(video[i])
        assert cap == data.caption(**at)
        assert (a["direction"], a["color"], a["bg"]) == (at["direction"], at["color"], at["bg"]), (cap, a)
        assert a["found_frac"] == 1.0


def test_generator_is_deterministic_and_covers_the_grammar():
    a, b = data.sample_clips(64, seed=3), data.sample_clips(64, seed=3)
    assert data.captions(a) == data.captions(b)
    assert torch.equal(data.render(a, frames=3, res=16), data.render(b, frames=3, res=16))
    assert set(a.direction.tolist()) == set(range(len(data.DIR_NAMES)))
    one = data.render(data.clip_from_attrs("circle", "red", "large", "left", "black"))[0]
    r = data.analyze_clip(one)
    assert (r["direction"], r["color"], r["shape"], r["bg"]) == ("left", "red", "circle", "black")
    assert np.all(np.diff(np.array(r["track"])[:, 0]) < 0)  # moves left every frame


@pytest.fixture(scope="module")
def smoke():
    from scripts.tiny_video import train as train_tiny_video

    return train_tiny_video.main(["--smoke"])


def test_train_smoke_runs(smoke):
    assert len(smoke["vae"]) == 2 and len(smoke["dit"]) == 3
    assert all(np.isfinite(v) for _, v in smoke["dit"]) and np.isfinite(smoke["dit_eval_loss"])
    assert smoke["scaling_factor"] > 0 and smoke["adherence"]["n"] == 2


def test_smoke_folder_loads_offline_and_is_deterministic(smoke):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    from scripts.tiny_video.build import PROMPT_TEMPLATE

    pipe = HunyuanVideoPipeline.from_pretrained(os.path.join(smoke["smoke_dir"], "model"))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, HunyuanVideoTransformer3DModel)
    assert isinstance(pipe.vae, AutoencoderKLHunyuanVideo)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 4)
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=16,
              prompt_template=PROMPT_TEMPLATE, output_type="pt")
    prompt = "a large red circle moving left, on a black background"
    a = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).frames
    b = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).frames
    assert a.shape == (1, 5, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b)


# ---- the bundled, trained model ---------------------------------------------------------------------------------
BUNDLED = os.path.join(ROOT, "assets", "models", "tiny-hunyuanvideo")


@pytest.fixture(scope="module")
def bundled():
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(BUNDLED)  # the same call as for hunyuanvideo-community/HunyuanVideo
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_folder_fits_its_budget():
    files = [os.path.join(d, f) for d, _, fs in os.walk(BUNDLED) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 30 * 2**20
    assert os.path.isfile(os.path.join(BUNDLED, "model_index.json"))


def test_bundled_default_call_shape_and_determinism(bundled):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from scripts.tiny_video.train import DEFAULT_CALL

    assert isinstance(bundled.transformer, HunyuanVideoTransformer3DModel)
    assert isinstance(bundled.vae, AutoencoderKLHunyuanVideo)
    # 64 x 64, 9 frames -> 3 latent frames of 16 x 16 tokens (spatial 4, temporal 4, patch 1)
    assert (bundled.vae_scale_factor_temporal, bundled.vae_scale_factor_spatial) == (4, 4)
    assert bundled.transformer.config.patch_size == 1 and DEFAULT_CALL["height"] // 4 == 16
    assert DEFAULT_CALL["num_frames"] >= 9
    prompt = "a large red circle moving left, on a black background"
    a = bundled(prompt, generator=torch.Generator().manual_seed(0), output_type="pt", **DEFAULT_CALL).frames
    b = bundled(prompt, generator=torch.Generator().manual_seed(0), output_type="pt", **DEFAULT_CALL).frames
    assert a.shape == (1, 9, 3, 64, 64) and torch.equal(a, b)


def test_bundled_model_follows_motion_and_colour_on_heldout_prompts(bundled):
    """16 prompts from the whole grammar with seeds its training never scored (scripts/tiny_video/check.py)."""
    from scripts.tiny_video.check import heldout_prompts
    from scripts.tiny_video.train import evaluate, summary

    res = evaluate(bundled, heldout_prompts(16, 2000), seed=2000)
    assert res["direction_pct"] >= 75, summary(res)  # measured: 100 % (and 100 % of 32 prompts at seed 1000)
    assert res["color_pct"] >= 75 and res["bg_pct"] >= 75, summary(res)


@pytest.mark.parametrize("method", ["speca", "specdiff"])
def test_accelerated_bundled_model_computes_less_and_keeps_the_motion(bundled, method):
    import accel
    from scripts.tiny_video.check import heldout_prompts
    from scripts.tiny_video.train import evaluate, summary

    cfg = accel.SpeCaConfig() if method == "speca" else accel.SpecDiffConfig(cache_rate=0.85)
    handle = accel.apply(bundled, cfg)
    try:
        res = evaluate(bundled, heldout_prompts(8, 3000), seed=3000, batch=8, num_inference_steps=20)
        trace = handle.trace.summary()
    finally:
        handle.remove()
    assert trace["steps"] == 20 and trace["ideal_speedup"] > 1.2, trace
    if method == "speca":
        assert trace["accepted_steps"] > 0 and trace["full_steps"] < 20
    else:
        assert trace["partial_steps"] > 0 and trace["token_fraction_computed"] < 0.6
    # measured here: both 100 % / 100 %. Colour is the first thing SpecDiff loses on so small a grid (a small
    # object is a few of 768 tokens): 62 % of 16 prompts at seed 1000 (plain 94 %), hence the looser bound.
    assert res["direction_pct"] >= 75, summary(res)
    assert res["color_pct"] >= (75 if method == "speca" else 50), summary(res)
