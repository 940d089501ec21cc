"""The lab at full size, in one device call: FLUX.1-dev- and HunyuanVideo-shaped pipeline folders with random
weights, served by `app.py --model FOLDER` and driven through `gradio_client`, against the bare pipeline call.

    python -m scripts.bench.gpu_lab all --out $OUT            # the GPU run (scripts/bench/gpu_lab.sh)
    python -m scripts.bench.gpu_lab all --tiny --out /tmp/lab  # the same code path on a CPU in a few minutes

The plan (`PLANS`; run 2 of issue 13: one call of <= 590 s with the wheel install):
1. `build`, one subprocess per family, both at once (each saves its folder, then waits for its turn on the GPU):
   a pipeline of the real shapes with random weights: the transformer (scripts.bench.pipes: FLUX.1-dev 19 + 38
   blocks, HunyuanVideo 20 + 40) and the VAE in their real configs, text encoders with the real output widths
   (T5 4096 / CLIP 768, Llama 4096 / CLIP 768) and 2 layers, the bundled tiny models' tokenizers; saved with
   `save_pretrained` in bfloat16, to /dev/shm when it has room for both folders (else /tmp). Then the bare rows,
   timed as scripts/bench does (`timed_call`: one call between device syncs) with the lab's config for each method
   (`lab.methods`, `sync_timing` off as in the lab) and a fresh `accel.apply` per call as each lab request has
   (SpeCa captures its CUDA graphs per apply), after an untimed warm-up call of a few steps: latents out from
   given prompt embeddings, only the (method, steps) the lab rows compare with; and one plain call of 2 steps
   with the prompt and the decode, for what the text encoders and the decode add (the same for every method).
   FLUX's bare rows run while the video folder's build waits; the video's bare rows once FLUX's lab rows are done.
2. `drive`: `python app.py --model FOLDER` (started while the bare rows run: it loads the folder on its first
   request), then `/generate` through `gradio_client`: a first request (load + 2 steps), one short untimed request
   per method at the run's size (the server's first-call costs: Triton kernels, CUDA graphs), then the rows. The
   rows that compare (the shown speedup is the full run timed back to back inside the request) are the ones the
   table checks against the bench speedup. FLUX also runs SpeCa once with `compile` (regional compilation; its
   warm-up is reported apart), last, while its stage has time. Recorded per request: time to the first streamed
   preview, time to the method's image (the accelerated run, streamed and rendered), total time, the summary's
   measured speedup, the trace's denoiser time and peak GPU memory.
Rows are printed as JSON lines as they finish and written to OUT/gpu_lab.json; a table is printed last. Every
stage has a deadline (`--budget-s`): what does not fit is skipped and listed.

Lab overhead = (time to the image - bare wall) / bare wall, where bare wall = the method's latent-out call +
(the plain 2-step call with prompt and decode - 2 plain steps); a plain step = the plain latent-out call / steps.
Bench speedup = plain latent-out wall / the method's latent-out wall.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_FLUX = os.path.join(ROOT, "assets", "models", "tiny-flux")
TINY_VIDEO = os.path.join(ROOT, "assets", "models", "tiny-hunyuanvideo")
PROMPT = "a large red circle on the left and a small blue square on the right, on a gray background"
VIDEO_PROMPT = "a large red circle moving left, on a gray background"
FULL, SPECA, SPECDIFF, TAYLOR = "Full", "SpeCa", "SpecDiff", "TaylorSeerCache (diffusers)"
METHODS = (FULL, SPECA, SPECDIFF, TAYLOR)
"""Lab labels (lab.methods): the four the issue asks for."""

# what each family runs: (GPU, --tiny). rows: (steps, method, compare); bare: {steps: methods} (the rows' needs)
_FLUX_ROWS = [(28, FULL, False), (28, SPECA, True), (28, SPECDIFF, True), (28, TAYLOR, True), (50, FULL, False),
              (50, SPECA, True)]
_VIDEO_ROWS = [(10, FULL, False), (10, SPECA, True), (10, SPECDIFF, False)]
PLANS = {
    "flux": {
        "gpu": dict(width=1024, height=1024, frames=None, rows=_FLUX_ROWS, warm_steps=8, compile_steps=28,
                    bare={28: METHODS, 50: (FULL, SPECA)}),
        "tiny": dict(width=128, height=128, frames=None, rows=[(6 if s == 28 else 10, m, c) for s, m, c in _FLUX_ROWS],
                     warm_steps=4, compile_steps=None, bare={6: METHODS, 10: (FULL, SPECA)}),
    },
    "video": {
        # 10 steps, not 50: a 544x960x33 step costs ~1.8 s, and the whole call has 9.8 minutes
        "gpu": dict(width=960, height=544, frames=33, rows=_VIDEO_ROWS, warm_steps=4, compile_steps=None,
                    bare={10: (FULL, SPECA, SPECDIFF)}),
        "tiny": dict(width=64, height=64, frames=9, rows=[(8, m, c) for _, m, c in _VIDEO_ROWS], warm_steps=4,
                     compile_steps=None, bare={8: (FULL, SPECA, SPECDIFF)}),
    },
}
PIL_STEPS = 2
"""The plain call with the prompt and the decode runs this many steps: what it adds is the same at any step count."""
VIDEO_NEEDS_S = 215.0
"""Seconds the video stage needs (bare rows ~55 s, server and lab rows ~150 s on an H100): FLUX's deadline."""
GIB = 2**30
SHARD = "2GB"
"""save_pretrained's shard size: safetensors holds a whole shard's bytes in host memory while writing it, and the
two builds write at once next to 48 GiB of folders in /dev/shm (RAM)."""
FOLDER_GIB = {"flux": 23.1, "video": 25.2}


def log(*a):
    print(*a, flush=True)


# ---- 1. build and time the bare pipeline ---------------------------------------------------------------------
def _tokenizers(src: str, dest: str, clip_dir: str, clip_len: int = 77) -> None:
    """Copy the bundled tiny model's tokenizers; the CLIP one reads `clip_len` tokens, as the real one does."""
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(src, name), os.path.join(dest, name), dirs_exist_ok=True)
    cfg_path = os.path.join(dest, clip_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = clip_len
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)


def _clip(src_dir: str, hidden: int, layers: int, dtype, max_pos: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.from_pretrained(src_dir)
    heads = max(1, hidden // 64)
    cfg.update(dict(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads,
                    num_hidden_layers=layers, max_position_embeddings=max_pos, projection_dim=hidden))
    return CLIPTextModel(cfg).to(dtype).eval()


def build_flux(folder: str, tiny: bool, device, dtype):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5Config, T5EncoderModel

    from scripts.bench.pipes import FLUX_DEV_SCHEDULER, random_flux

    over = dict(joint_attention_dim=64, pooled_projection_dim=32) if tiny else {}
    transformer = random_flux("small" if tiny else "dev", device, dtype, **over).transformer
    width = transformer.config.joint_attention_dim
    pooled = transformer.config.pooled_projection_dim
    t5_cfg = T5Config.from_pretrained(os.path.join(TINY_FLUX, "text_encoder_2"))
    t5_cfg.update(dict(d_model=width, d_kv=64 if not tiny else 16, num_heads=64 if not tiny else 4,
                       d_ff=10240 if not tiny else 128, num_layers=2, relative_attention_num_buckets=32,
                       relative_attention_max_distance=128))
    torch.manual_seed(1)
    t5 = T5EncoderModel(t5_cfg).to(dtype).eval()
    clip = _clip(os.path.join(TINY_FLUX, "text_encoder"), pooled, 2, dtype)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2, norm_num_groups=32, sample_size=128 if tiny else 1024,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        force_upcast=True).to(dtype).eval()
    from transformers import CLIPTokenizer, T5TokenizerFast

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae,
                        text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(os.path.join(TINY_FLUX, "tokenizer")),
                        text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(
                            os.path.join(TINY_FLUX, "tokenizer_2")), transformer=transformer)
    pipe.save_pretrained(folder, max_shard_size=SHARD)
    _tokenizers(TINY_FLUX, folder, "tokenizer")
    return pipe


def build_video(folder: str, tiny: bool, device, dtype):
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline
    from transformers import CLIPTokenizer, LlamaConfig, LlamaModel, LlamaTokenizerFast

    from scripts.bench.pipes import random_hunyuan_video

    pipe0, _ = random_hunyuan_video("small" if tiny else "full", device, dtype, text_len=8, text_valid=8)
    transformer = pipe0.transformer
    width = transformer.config.text_embed_dim
    pooled = transformer.config.pooled_projection_dim
    llama_cfg = LlamaConfig.from_pretrained(os.path.join(TINY_VIDEO, "text_encoder"))
    llama_cfg.update(dict(hidden_size=width, intermediate_size=14336 if not tiny else 4 * width,
                          num_attention_heads=32 if not tiny else 4, num_key_value_heads=8 if not tiny else 4,
                          head_dim=width // (32 if not tiny else 4), num_hidden_layers=2))
    torch.manual_seed(1)
    llama = LlamaModel(llama_cfg).to(dtype).eval()
    clip = _clip(os.path.join(TINY_VIDEO, "text_encoder_2"), pooled, 2, dtype)
    vae = (AutoencoderKLHunyuanVideo(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32)
           if tiny else AutoencoderKLHunyuanVideo()).to(dtype).eval()
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=LlamaTokenizerFast.from_pretrained(
        os.path.join(TINY_VIDEO, "tokenizer")), transformer=transformer, vae=vae, scheduler=pipe0.scheduler,
        text_encoder_2=clip, tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(TINY_VIDEO, "tokenizer_2")))
    pipe.save_pretrained(folder, max_shard_size=SHARD)
    _tokenizers(TINY_VIDEO, folder, "tokenizer_2")
    return pipe


def _wait_for(path: str | None, timeout_s: float) -> None:
    """Wait until `path` exists (another process's signal), at most `timeout_s`."""
    t0 = time.time()
    while path and not os.path.exists(path):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {path}")
        time.sleep(0.5)


def _touch(path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write(str(time.time()))


def bare(pipe, folder: str, family: str, tiny: bool, out_json: str) -> None:
    """Time the bare calls of the pipeline just built (the same weights the lab loads from `folder`), with the
    arguments the lab passes for the folder's preset (`lab.runner.pipe_kwargs`) and the lab's configs."""
    import torch

    import accel
    from lab import methods as LM
    from lab import models as M
    from lab import runner as R
    from lab.preview import Previewer
    from scripts.bench.utils import timed_call

    plan = PLANS[family]["tiny" if tiny else "gpu"]
    gpu = torch.cuda.is_available() and not tiny
    preset = M.folder_preset(folder, gpu=gpu)
    t0 = time.perf_counter()
    if gpu:
        pipe.to("cuda")
        if preset.is_video:
            pipe.vae.enable_tiling()  # as the lab loads a video folder (lab.models.load_preset)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    device = pipe._execution_device
    model = M.LoadedModel(preset, pipe, previewer=Previewer(pipe))
    weights = sum(p.numel() * p.element_size() for c in pipe.components.values()
                  if isinstance(c, torch.nn.Module) for p in c.parameters())
    rows = dict(family=family, folder=folder, load_s=load_s, weights_gib=weights / GIB, preset=preset.name,
                device=torch.cuda.get_device_name() if gpu else "cpu", rows=[])
    log(f"[bare] {preset.name}: {weights / GIB:.1f} GiB of weights, on {rows['device']} in {load_s:.1f} s")
    prompt = VIDEO_PROMPT if family == "video" else PROMPT

    def emit(row):
        rows["rows"].append(row)
        log(json.dumps(row))
        with open(out_json, "w") as f:  # after every row: a stage cut short keeps what it timed
            json.dump(rows, f, indent=1)

    first = True
    for steps, labels in plan["bare"].items():
        spec = R.RunSpec(preset.name, prompt, 0, steps, plan["width"], plan["height"], preset.guidance,
                         plan["frames"])
        kw_pil = R.pipe_kwargs(spec, model)
        kw_pil.pop("generator")
        text = {k: v for k, v in kw_pil.items() if k in ("prompt", "max_sequence_length", "prompt_template")}
        if first:  # the plain call with the prompt and the decode (also the first call: cuBLAS, VAE, encoders)
            _, pil_wall, pil_peak = timed_call(pipe, dict(kw_pil, num_inference_steps=PIL_STEPS), device, seed=0,
                                               generator_device="cpu")
            _, pil_wall, pil_peak = timed_call(pipe, dict(kw_pil, num_inference_steps=PIL_STEPS), device, seed=0,
                                               generator_device="cpu")
            emit(dict(kind="bare", family=family, method="Full+text+decode", steps=PIL_STEPS, wall_s=pil_wall,
                      peak_gib=pil_peak / GIB))
        with torch.no_grad():
            if family == "video":
                pe, pooled, mask = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                      max_sequence_length=text["max_sequence_length"],
                                                      prompt_template=text.get("prompt_template") or
                                                      {"template": "{}", "crop_start": 0})
                embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=mask)
            else:
                pe, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                   max_sequence_length=text["max_sequence_length"])
                embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
        kw_lat = {k: v for k, v in kw_pil.items() if k not in text}
        kw_lat.update(embeds, output_type="latent")
        for label in labels:
            cfg = LM.by_label(label).build({})
            if first and label != FULL:  # first-call costs (Triton kernels, CUDA graphs, pre-run), untimed
                with accel.apply(pipe, cfg):
                    timed_call(pipe, dict(kw_lat, num_inference_steps=plan["warm_steps"]), device, seed=0,
                               generator_device="cpu")
            with accel.apply(pipe, cfg) as handle:  # a fresh apply, as each lab request has
                _, wall, peak = timed_call(pipe, kw_lat, device, seed=0, generator_device="cpu")
            summary = handle.trace.summary()
            emit(dict(kind="bare", family=family, method=label, steps=steps, latent_wall_s=wall, peak_gib=peak / GIB,
                      ideal=summary["ideal_speedup"], denoiser_s=summary["measured_ms"] / 1e3))
        first = False


def _give_back_host_memory() -> None:
    """Return the save's freed host memory to the OS (glibc keeps it otherwise): this process waits a few minutes
    beside the other stages, and /dev/shm's folders are RAM too."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cmd_build(args) -> None:
    import torch

    gpu = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    t0 = time.perf_counter()
    if os.path.isdir(args.folder):
        shutil.rmtree(args.folder)
    try:
        with torch.no_grad():
            pipe = (build_flux if args.family == "flux" else build_video)(args.folder, args.tiny, device, dtype)
    finally:  # also when the build failed: the other family's bare rows wait for this signal
        _touch(args.saved)
    _give_back_host_memory()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.folder) for f in fs)
    log(f"[build] {args.family}: {args.folder} ({size / GIB:.1f} GiB) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    _wait_for(args.wait_for, args.wait_s)  # the GPU's turn: the other family's stage
    if args.wait_for:
        log(f"[build] {args.family}: waited {time.perf_counter() - t0:.1f} s for the GPU")
    bare(pipe, args.folder, args.family, args.tiny, args.json)


# ---- 2. serve and drive the lab ------------------------------------------------------------------------------------
def _summary_number(summary: str, pattern: str):
    m = re.search(pattern, summary or "")
    return float(m.group(1)) if m else None


def _is_file(value) -> bool:
    """An image output that carries a picture (gradio_client gives a file path; a skipped output is an update
    dict without one)."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("value")
    return isinstance(value, str) and os.path.isfile(value)


def _final_fields(summary: str, files: list) -> dict:
    """What a request's last update says: the shown speedup, the compile warm-up, the summary's first line (from
    the summary markdown) and the denoiser time and peak GPU memory (from the trace file among `files`: paths, or
    file dicts with a "path" on this machine, as gradio_client and the wire both give them)."""
    trace = {}
    for f in files:
        path = f if isinstance(f, str) else getattr(f, "path", None) or f.get("path")
        if path and str(path).endswith("_trace.json"):  # the server's own file, on this machine
            with open(path) as fh:
                trace = json.load(fh)
    meta = trace.get("meta", {})
    steps = trace.get("steps", [])
    return dict(shown_speedup=_summary_number(summary, r"measured speedup \(time\)[^*]*\*\*([0-9.]+)x"),
                compile_warmup_s=_summary_number(summary, r"compile warm-up ([0-9.]+) s"),
                denoiser_s=sum(r.get("time_ms") or 0 for r in steps) / 1e3 if steps else None,
                peak_gib=(meta.get("peak_gpu_bytes") or 0) / 2**30 or None,
                summary_head=(summary or "").split("\n")[0][:160])


def _request(client, outputs, deadline, **controls) -> dict:
    """One `/generate` request, its updates timed as they arrive."""
    import app  # noqa: F401  (OUTPUTS)

    i_preview, i_image, i_summary, i_files = (outputs.index(k) for k in ("preview", "image", "summary", "files"))
    t0 = time.perf_counter()
    job = client.submit(api_name="/generate", **controls)
    first_preview = image_at = None
    last = None
    n = 0
    arrivals = []  # (seconds, outputs carrying a file) per update, as the client had it
    for up in job:
        now = time.perf_counter() - t0
        n += 1
        last = up
        arrivals.append((round(now, 3), [k for k, v in zip(outputs, up) if _is_file(v)]))
        if first_preview is None and _is_file(up[i_preview]):
            first_preview = now
        if image_at is None and _is_file(up[i_image]):
            image_at = now
        if time.perf_counter() > deadline:
            job.cancel()
            raise TimeoutError("request past the deadline")
    total = time.perf_counter() - t0
    return dict(first_preview_s=first_preview, image_s=image_at, total_s=total, updates=n, arrivals=arrivals,
                t0=time.time() - total, **_final_fields(last[i_summary] if last else "",
                                                        (last[i_files] or []) if last else []))


def _has_file(value) -> bool:
    """Whether an output's value, or its diff against the last update (Gradio's stream format), carries a file."""
    if isinstance(value, dict):
        if value.get("path") or value.get("url"):
            return True
        return any(_has_file(v) for v in value.values())
    if isinstance(value, list):
        if (len(value) == 3 and isinstance(value[0], str) and isinstance(value[1], list) and value[1]
                and value[1][-1] in ("path", "url") and value[2]):
            return True  # an edit of a diff that points a picture at a new file
        return any(_has_file(v) for v in value)
    return False


def _wire_request(client, outputs, deadline, **controls) -> dict:
    """One `/generate` request as a browser makes it (the queue's join, then the session's event stream, whose
    updates carry diffs), timed as each message comes off the wire: `gradio_client` deep-copies every output's last
    value to apply each diff before it hands an update over, which at ~3 updates a second with Plotly figures
    falls seconds behind the server (run 3 of issue 13). The final message carries the full values."""
    import uuid

    import httpx

    fn_index = client._infer_fn_index("/generate", None)
    endpoint = client.endpoints[fn_index]
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    positional = [controls[p["parameter_name"]] if p["parameter_name"] in controls else p.get("parameter_default")
                  for p in api]
    data = list(endpoint.insert_empty_state(*positional))
    api_outputs = [k for k in outputs if k != "trace"]  # the session's state is no API output
    i_summary, i_files = api_outputs.index("summary"), api_outputs.index("files")
    session = uuid.uuid4().hex
    arrivals, first_preview, image_at, final = [], None, None, None
    t0 = time.perf_counter()
    with httpx.Client(timeout=httpx.Timeout(30.0, read=None)) as h:
        r = h.post(client.sse_data_url, json={"data": data, "fn_index": fn_index, "session_hash": session,
                                               "event_data": None, "trigger_id": None})
        r.raise_for_status()
        with h.stream("GET", client.sse_url, params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                kind = msg.get("msg")
                now = time.perf_counter() - t0
                if kind in ("process_generating", "process_completed"):
                    out = (msg.get("output") or {}).get("data") or []
                    if kind == "process_completed" and not msg.get("success", True):
                        raise RuntimeError(f"/generate failed: {str(msg.get('output'))[:300]}")
                    files = [k for k, v in zip(api_outputs, out) if _has_file(v)]
                    arrivals.append((round(now, 3), files))
                    if first_preview is None and "preview" in files:
                        first_preview = now
                    if image_at is None and "image" in files:
                        image_at = now
                    if kind == "process_completed":
                        final = out
                if kind in ("process_completed", "close_stream"):
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError("request past the deadline")
    total = time.perf_counter() - t0
    summary = final[i_summary] if final else ""
    if isinstance(summary, dict):  # an update dict: its value
        summary = summary.get("value") or ""
    return dict(first_preview_s=first_preview, image_s=image_at, total_s=total, updates=len(arrivals),
                arrivals=arrivals, t0=time.time() - total, client="wire",
                **_final_fields(summary, (final[i_files] or []) if final else []))


CLIENTS = {"wire": _wire_request, "gradio": _request}
"""How the rows' requests are made (`--client`): "wire" (default: the browser's protocol, timed off the wire) or
"gradio" (`gradio_client`, timed as it hands updates over)."""


def _serve(folder: str, port: int, log_path: str, max_work: float):
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    # app.py with a timeline of the server's side (scripts/lab/latency.py: each yield, image encode, postprocess,
    # the pipeline's start and end), written beside the log
    cmd = [sys.executable, "-m", "scripts.lab.latency", "serve", "--folder", folder, "--port", str(port),
           "--max-size", "0", "--threads", "0", "--max-work", str(max_work),
           "--timeline", os.path.splitext(log_path)[0] + "-timeline.jsonl"]
    f = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f


def _connect(url: str, proc, timeout_s: float):
    from gradio_client import Client

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode} before serving")
        try:
            return Client(url, verbose=False)
        except Exception:
            time.sleep(1.0)
    raise TimeoutError("app.py did not serve in time")


def _stop(server) -> None:
    proc, logf = server
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    logf.close()


def drive(server, family: str, tiny: bool, deadline: float, port: int, request=_wire_request) -> list[dict]:
    """The lab rows of `PLANS[family]` through the app `server` (started by `_serve`, stopped here), each made by
    `request` (`CLIENTS`)."""
    import app

    plan = PLANS[family]["tiny" if tiny else "gpu"]
    proc, _ = server
    rows, skipped = [], []
    base = dict(prompt=VIDEO_PROMPT if family == "video" else PROMPT, seed=0, width=plan["width"],
                height=plan["height"])
    if plan["frames"]:
        base["frames"] = plan["frames"]
    todo = list(plan["rows"])
    try:
        t0 = time.perf_counter()
        client = _connect(f"http://127.0.0.1:{port}/", proc, max(10.0, deadline - time.time()))
        up_s = time.perf_counter() - t0
        # the first request loads the folder (the server loads presets on first use)
        first = request(client, app.OUTPUTS, deadline, method=FULL, steps=2, compare=False, **base)
        rows.append(dict(kind="lab", family=family, method=FULL, steps=2, what="first request: load + run",
                         server_up_s=up_s, **first))
        log(json.dumps(rows[-1]))
        for label in dict.fromkeys(m for _, m, _ in todo if m != FULL):  # first-call costs, untimed
            request(client, app.OUTPUTS, deadline, method=label, steps=plan["warm_steps"], compare=False, **base)
        while todo:
            steps, label, compare = todo.pop(0)
            if time.time() > deadline - 5:
                skipped.append(f"{family} {label} {steps} steps (the stage's deadline)")
                continue
            r = request(client, app.OUTPUTS, deadline, method=label, steps=steps, compare=compare, **base)
            rows.append(dict(kind="lab", family=family, method=label, steps=steps, compare=compare, **r))
            log(json.dumps(rows[-1]))
        if plan["compile_steps"]:
            if time.time() < deadline - 60:
                r = request(client, app.OUTPUTS, deadline, method=SPECA, steps=plan["compile_steps"],
                            compare=True, compile=True, **base)
                rows.append(dict(kind="lab", family=family, method="SpeCa compiled", steps=plan["compile_steps"],
                                 compare=True, **r))
                log(json.dumps(rows[-1]))
            else:
                skipped.append(f"{family} SpeCa compiled (less than 60 s left in the stage)")
    except Exception as e:  # a stage cut short still reports what it finished
        log(f"[drive] {family} stopped: {type(e).__name__}: {e}")
        skipped += [f"{family} {m} {s} steps ({type(e).__name__})" for s, m, _ in todo]
        if plan["compile_steps"] and not any(r.get("method") == "SpeCa compiled" for r in rows):
            skipped.append(f"{family} SpeCa compiled ({type(e).__name__})")
    finally:
        _stop(server)
    for s in skipped:
        log(f"[drive] skipped: {s}")
    return rows + [dict(kind="skipped", what=s) for s in skipped]


# ---- 3. the table ------------------------------------------------------------------------------------------------
def bare_wall(bare_rows: dict, family: str, method: str, steps: int):
    """(bare wall of the lab's call: latents + text + decode, bench speedup) or (None, None)."""
    b = {(x["method"], x["steps"]): x for x in bare_rows.get(family, {}).get("rows", [])}
    mine, plain, pil = b.get((method, steps)), b.get((FULL, steps)), b.get(("Full+text+decode", PIL_STEPS))
    if not (mine and plain and pil):
        return None, None
    text_decode = pil["wall_s"] - PIL_STEPS * plain["latent_wall_s"] / steps
    return mine["latent_wall_s"] + text_decode, plain["latent_wall_s"] / mine["latent_wall_s"]


def table(bare_rows: dict, lab_rows: list[dict]) -> list[str]:
    """Lab vs bare per (family, method, steps)."""
    lines = [f"{'family':6s} {'method':28s} {'steps':>5s} {'preview s':>9s} {'image s':>8s} {'bare s':>7s} "
             f"{'overhead':>8s} {'total s':>8s} {'lab x':>6s} {'bench x':>7s} {'lab/bench':>9s} {'peak GiB':>8s} "
             f"{'bare peak':>9s} {'lab den s':>9s} {'bare den s':>10s}"]
    for r in lab_rows:
        if r.get("kind") != "lab" or r["steps"] == 2:
            continue
        fam = r["family"]
        method = r["method"].replace(" compiled", "")
        compiled = "compiled" in r["method"]
        b = {(x["method"], x["steps"]): x for x in bare_rows.get(fam, {}).get("rows", [])}
        mine = b.get((method, r["steps"]))
        bare_s, bench = bare_wall(bare_rows, fam, method, r["steps"])
        if compiled:
            bare_s = None  # the bare rows are eager
        over = (r["image_s"] - bare_s) / bare_s if bare_s and r.get("image_s") else None
        lab_x = r.get("shown_speedup")
        ratio = lab_x / bench if lab_x and bench and not compiled else None
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        lines.append(f"{fam:6s} {r['method']:28s} {r['steps']:>5} {f(r.get('first_preview_s'), '9.2f')} "
                     f"{f(r.get('image_s'), '8.2f')} {f(bare_s, '7.2f')} {f(over and over * 100, '7.1f')}% "
                     f"{f(r.get('total_s'), '8.2f')} {f(lab_x, '6.2f')} {f(bench, '7.2f')} {f(ratio, '9.3f')} "
                     f"{f(r.get('peak_gib'), '8.1f')} {f(mine and mine['peak_gib'], '9.1f')} "
                     f"{f(r.get('denoiser_s'), '9.2f')} {f(mine and mine.get('denoiser_s'), '10.2f')}")
    return lines


def _work_dir(args) -> tuple[str, bool]:
    """(where the folders go, whether both fit there at once): /dev/shm when it holds both with room to spare (RAM:
    writing 48 GiB to a disk took most of run 1's two minutes of builds), else /tmp; builds in sequence (each folder
    removed after its stage, as in run 1) when /tmp cannot hold both either."""
    if args.tiny:
        return args.work or os.path.join(args.out, "work"), True
    need = sum(FOLDER_GIB.values()) + 6

    def free(path):
        try:
            return shutil.disk_usage(path).free / GIB
        except OSError:
            return 0.0

    if args.work:
        return args.work, free(os.path.dirname(args.work.rstrip("/")) or "/") > need
    if free("/dev/shm") > need:
        return "/dev/shm/speclab-lab", True
    return "/tmp/speclab-lab", free("/tmp") > need


def _save(args, bare_rows, lab_rows, start) -> None:
    with open(os.path.join(args.out, "gpu_lab.json"), "w") as f:
        json.dump(dict(bare=bare_rows, lab=lab_rows, tiny=args.tiny, seconds=time.time() - start), f, indent=1)


def cmd_all(args) -> None:
    start = time.time()
    deadline_all = start + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    work, parallel = _work_dir(args)
    parallel = parallel and not args.sequential
    os.makedirs(work, exist_ok=True)
    log(f"[all] folders in {work}; builds {'at once' if parallel else 'in sequence (no room for both)'}")
    bare_rows, lab_rows = {}, []
    families = args.families.split(",")
    signals = {f: dict(saved=os.path.join(work, f"{f}.saved"), done=os.path.join(work, f"{f}.done"))
               for f in families}
    for sig in signals.values():
        for path in sig.values():
            if os.path.exists(path):
                os.remove(path)

    def start_build(k: int, fam: str):
        """Build `fam`'s folder; at once: then wait for the GPU (FLUX for the video build to be saved, video for
        FLUX's lab rows to be done); in sequence: this family's turn has come."""
        before = families[k - 1] if k else None
        after = families[k + 1] if k + 1 < len(families) else None
        wait = None
        if parallel:
            wait = signals[before]["done"] if before else (signals[after]["saved"] if after else None)
        cmd = [sys.executable, "-m", "scripts.bench.gpu_lab", "build", "--family", fam, "--folder",
               os.path.join(work, f"{fam}-random"), "--json", os.path.join(args.out, f"bare-{fam}.json"),
               "--saved", signals[fam]["saved"], "--wait-s", str(max(30.0, deadline_all - time.time()))]
        cmd += (["--wait-for", wait] if wait else []) + (["--tiny"] if args.tiny else [])
        return subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)

    builds = {fam: start_build(k, fam) for k, fam in enumerate(families) if parallel or k == 0}
    try:
        for k, fam in enumerate(families):
            later = len(families) - k - 1
            fam_deadline = deadline_all - later * ((VIDEO_NEEDS_S + (0 if parallel else 60.0)) if not args.tiny else 0.0)
            if args.tiny:
                fam_deadline = deadline_all if not later else start + args.budget_s * 0.6
            folder = os.path.join(work, f"{fam}-random")
            server = None
            if fam not in builds:
                builds[fam] = start_build(k, fam)
            try:
                _wait_for(signals[fam]["saved"], max(10.0, fam_deadline - time.time()))
                # the server imports gradio while the bare rows run; it loads the folder on its first request
                server = _serve(folder, args.port + k, os.path.join(args.out, f"app-{fam}.log"), max_work=100000)
                builds[fam].wait(timeout=max(10.0, fam_deadline - time.time() - 30))
                if builds[fam].returncode:
                    raise RuntimeError(f"build exited with {builds[fam].returncode}")
            except Exception as e:  # noqa: BLE001
                log(f"[all] {fam}: build or bare rows failed: {type(e).__name__}: {e}")
                lab_rows.append(dict(kind="skipped", what=f"{fam}: build or bare rows ({type(e).__name__})"))
                if builds[fam].poll() is None:  # past its time: the GPU goes to the next stage
                    os.killpg(builds[fam].pid, signal.SIGKILL)
                    builds[fam].wait()
                if server is not None:
                    _stop(server)
                _touch(signals[fam]["done"])
                continue
            finally:
                try:
                    with open(os.path.join(args.out, f"bare-{fam}.json")) as f:
                        bare_rows[fam] = json.load(f)
                except (OSError, ValueError):
                    pass
            log(f"[all] {fam}: lab rows ({fam_deadline - time.time():.0f} s left for {fam})")
            lab_rows += drive(server, fam, args.tiny, fam_deadline, args.port + k, CLIENTS[args.client])
            _touch(signals[fam]["done"])
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
            _save(args, bare_rows, lab_rows, start)
    finally:
        for p in builds.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if not args.keep:
            for fam in families:
                shutil.rmtree(os.path.join(work, f"{fam}-random"), ignore_errors=True)
    _save(args, bare_rows, lab_rows, start)
    log("")
    log(f"lab vs bare pipeline ({'tiny, CPU' if args.tiny else 'random weights, GPU'}); wall {time.time() - start:.0f} s")
    for line in table(bare_rows, lab_rows):
        log(line)
    for r in lab_rows:
        if r.get("kind") == "skipped":
            log(f"skipped: {r['what']}")
        if r.get("compile_warmup_s") is not None:
            log(f"{r['family']} {r['method']}: compile warm-up {r['compile_warmup_s']:.1f} s (not in its timings)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.gpu_lab", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a random pipeline folder and time the bare calls (one family)")
    b.add_argument("--family", choices=("flux", "video"), required=True)
    b.add_argument("--folder", required=True)
    b.add_argument("--json", required=True)
    b.add_argument("--tiny", action="store_true")
    b.add_argument("--saved", default=None, help="a file to create once the folder is saved")
    b.add_argument("--wait-for", default=None, help="a file to wait for before timing the bare rows")
    b.add_argument("--wait-s", type=float, default=600.0)
    a = sub.add_parser("all", help="build, time and drive every family")
    a.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    a.add_argument("--work", default=None, help="where the pipeline folders go (default /tmp/speclab-lab)")
    a.add_argument("--families", default="flux,video")
    a.add_argument("--budget-s", type=float, default=550.0)
    a.add_argument("--port", type=int, default=7865)
    a.add_argument("--tiny", action="store_true", help="CPU-sized pipelines (a smoke run of this script)")
    a.add_argument("--keep", action="store_true", help="keep the pipeline folders")
    a.add_argument("--sequential", action="store_true", help="build one folder at a time (as run 1 did)")
    a.add_argument("--client", choices=tuple(CLIENTS), default="wire",
                   help="time the requests off the wire (the browser's protocol) or as gradio_client hands them over")
    args = ap.parse_args(argv)
    (cmd_build if args.cmd == "build" else cmd_all)(args)


if __name__ == "__main__":
    main()
