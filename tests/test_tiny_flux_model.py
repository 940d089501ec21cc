"""The bundled default model assets/models/tiny-flux: loads offline, is a real FLUX pipeline, follows prompts."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from scripts.tiny_flux import check as chk  # noqa: E402
from scripts.tiny_flux import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = os.path.join(ROOT, "assets", "models", "tiny-flux")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(MODEL)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def adherence(pipe):
    """One prompt per colour (shapes cycle, left/right alternate), default call: 128 px, 28 steps."""
    items = chk.adherence_prompts(1)
    images = chk.generate(pipe, [it["prompt"] for it in items], seed=0, batch_size=len(items))
    return items, images, chk.score(items, images)


def test_folder_is_small_and_complete():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODEL) for f in fs)
    assert size <= 30e6, size
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(MODEL, sub)), sub
    assert os.path.isfile(os.path.join(MODEL, "model_index.json"))


def test_loads_offline_as_a_flux_pipeline(pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    tc = pipe.transformer.config
    assert tc.num_layers >= 2 and tc.num_single_layers >= 4 and tc.in_channels == 16
    assert sum(tc.axes_dims_rope) == tc.attention_head_dim and not tc.guidance_embeds
    vc = pipe.vae.config
    assert len(vc.block_out_channels) == 3 and vc.latent_channels == 4
    assert not vc.use_quant_conv and not vc.use_post_quant_conv
    assert vc.scaling_factor != 1.0 and vc.shift_factor != 0.0  # set from data statistics
    assert pipe.scheduler.config.use_dynamic_shifting
    # the tokenizers load on their own, as a user would load them
    t1 = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    t2 = T5TokenizerFast.from_pretrained(MODEL, subfolder="tokenizer_2")
    for w in data.VOCAB_WORDS:
        assert len(t1(w, add_special_tokens=False).input_ids) == 1
        assert len(t2(w, add_special_tokens=False).input_ids) == 1
    # 128 px -> 32x32 latent -> 16x16 packed image tokens
    lat = pipe("a small red square in the center, on a black background", height=128, width=128,
               num_inference_steps=1, max_sequence_length=32, output_type="latent").images
    assert lat.shape == (1, 256, 16)


def test_deterministic_for_a_seed_and_unknown_words_do_not_crash(pipe):
    kw = dict(height=128, width=128, num_inference_steps=4, max_sequence_length=32, output_type="np")
    prompt = "a large blue circle on the right, on a white background"
    a = pipe(prompt, generator=torch.Generator().manual_seed(3), **kw).images
    b = pipe(prompt, generator=torch.Generator().manual_seed(3), **kw).images
    c = pipe(prompt, generator=torch.Generator().manual_seed(4), **kw).images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    odd = pipe("A Zebra, riding 2 bicycles! ÜBER ☃", generator=torch.Generator().manual_seed(3), **kw).images
    assert np.isfinite(odd).all()


def test_colour_follows_the_prompt(adherence):
    items, _, res = adherence
    assert len({it["color"] for it in items}) == len(data.COLOR_NAMES)
    assert res["color_pct"] >= 80, res["details"]


def test_shape_follows_the_prompt(adherence):
    items, _, res = adherence
    assert len({it["shape"] for it in items}) == 3
    assert res["shape_pct"] > 60, res["details"]


def test_object_is_on_the_named_side(adherence):
    items, _, res = adherence
    assert {it["pos"] for it in items} == {"left", "right"}
    assert res["side_pct"] >= 85, res["details"]
    assert res["bg_pct"] >= 85, res["details"]


def test_different_prompts_give_different_images(adherence):
    _, images, _ = adherence
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 0.02, (i, j)


def test_training_smoke_mode_runs(tmp_path):
    from scripts.tiny_flux import train as train_tiny_flux

    hist = train_tiny_flux.main(["--smoke", "--out", str(tmp_path)])
    assert hist["vae_steps"] == 3 and hist["dit_steps"] == 4
    assert np.isfinite(hist["dit_eval_loss"])
    assert os.path.isfile(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(tmp_path / "vae" / "config.json") and os.path.isfile(tmp_path / "samples.png")
