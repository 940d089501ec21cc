"""Train the tiny FLUX model: first the VAE, then the FLUX transformer (flow matching).

Data come from ``scripts.tiny_flux.data`` and are rendered on the training device on the fly. Text embeddings
come from the pipeline's own ``encode_prompt`` (frozen CLIP + T5), latents from the trained VAE,
packing and position ids from ``FluxPipeline``'s own helpers, so training sees exactly what
``FluxPipeline.__call__`` feeds the transformer at inference.

Objective (matches ``FlowMatchEulerDiscreteScheduler.step``: x_next = x + (sigma_next - sigma) * v):
    x_sigma = (1 - sigma) * x0 + sigma * noise,   target v = noise - x0,
    the transformer gets ``timestep = sigma`` in [0, 1] (the pipeline passes t / 1000).
sigma is drawn from a logit-normal (80 %) / uniform (20 %) u, then shifted exactly like the pipeline's
dynamic shifting for the batch's token count (mu = calculate_shift(seq_len)), so training covers the
inference sigmas. The T5 padding length is drawn from {32, 32, 48, 64} per step, 10 % of captions are
dropped to "" (so ``true_cfg_scale`` with a negative prompt can work), and every 6th step uses 2x
resolution (256 px: 32x32 tokens) at a quarter of the batch. The transformer trains in float32 with TF32
matmuls (bf16 autocast failed in cuBLAS on the H100 used, see docs/tiny-flux.md).

GPU recipe (defaults; ~8.5 minutes on one H100; docs/tiny-flux.md says how the shipped weights were made)::

    python -m scripts.tiny_flux.build --out assets/models/tiny-flux --force
    python -m scripts.tiny_flux.train --model assets/models/tiny-flux --out assets/models/tiny-flux --eval

CPU smoke test (tiny preset in a temp folder, a few iterations, seconds)::

    python -m scripts.tiny_flux.train --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from scripts.tiny_flux import data


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def lr_at(progress: float, base: float, warm: float = 0.05, floor: float = 0.1) -> float:
    if progress < warm:
        return base * max(progress / warm, 0.01)
    p = min(1.0, (progress - warm) / (1 - warm))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


class Budget:
    """Stops after ``steps`` iterations or ``seconds`` of wall time, whichever comes first."""

    def __init__(self, steps: int, seconds: float):
        self.steps, self.seconds, self.t0, self.i = steps, seconds, time.time(), 0

    def progress(self) -> float:
        p = self.i / self.steps if self.steps > 0 else 0.0
        if self.seconds > 0:
            p = max(p, (time.time() - self.t0) / self.seconds)
        return min(p, 1.0)

    def done(self) -> bool:
        return self.progress() >= 1.0


def autocast(device, enabled: bool = True):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------


def train_vae(vae, args, device, rng, history):
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    b = Budget(args.vae_steps, args.vae_seconds)
    acc, n = 0.0, 0
    while not b.done():
        for g in opt.param_groups:
            g["lr"] = lr_at(b.progress(), args.vae_lr)
        x = data.render(data.sample_scenes(args.vae_batch, rng), args.res, device) * 2 - 1
        with autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        b.i += 1
        acc, n = acc + loss.item(), n + 1
        if b.i % args.log_every == 0 or b.done():
            history["vae"].append([b.i, acc / n])
            log(f"vae step {b.i} loss {acc / n:.5f} kl {kl.item():.3f} ({time.time() - b.t0:.0f}s)")
            acc, n = 0.0, 0
    vae.eval().requires_grad_(False)
    # latent statistics -> scaling/shift factors (the pipeline decodes z / scaling + shift)
    with torch.no_grad():
        zs = []
        for _ in range(4):
            x = data.render(data.sample_scenes(max(8, args.vae_batch), rng), args.res, device) * 2 - 1
            zs.append(vae.encode(x).latent_dist.sample().float())
        z = torch.cat(zs)
        shift = z.mean().item()
        scale = 1.0 / (z - shift).std().item()
        x = data.render(data.sample_scenes(16, rng), args.res, device) * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        mse = F.mse_loss(rec.clamp(-1, 1), x).item()
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    history.update(vae_steps=b.i, vae_seconds=time.time() - b.t0, scaling_factor=scale, shift_factor=shift,
                   vae_recon_mse=mse, vae_recon_psnr=10 * math.log10(4.0 / max(mse, 1e-10)))
    log(f"vae done: {b.i} steps, scaling_factor {scale:.4f} shift_factor {shift:.4f} "
        f"recon PSNR {history['vae_recon_psnr']:.1f} dB")


# ----------------------------------------------------------------------------------------------
# transformer
# ----------------------------------------------------------------------------------------------


def sample_sigmas(n, seq_len, sched_cfg, gen, device):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len, sched_cfg.get("base_image_seq_len", 256), sched_cfg.get("max_image_seq_len", 4096),
                         sched_cfg.get("base_shift", 0.5), sched_cfg.get("max_shift", 1.15))
    u = torch.sigmoid(torch.randn(n, generator=gen))
    uni = torch.rand(n, generator=gen)
    u = torch.where(torch.rand(n, generator=gen) < 0.2, uni, u).clamp(1e-4, 1.0)
    sig = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return sig.to(device)


def dit_batch(pipe, args, device, rng, gen, big: bool):
    from diffusers import FluxPipeline

    res = args.res * 2 if big else args.res
    bs = max(1, args.batch // 4) if big else args.batch
    scenes = data.sample_scenes(bs, rng)
    caps = data.captions(scenes)
    drop = rng.random(bs) < args.caption_dropout
    caps = ["" if d else c for c, d in zip(caps, drop)]
    max_len = int(rng.choice(args.seq_lens))
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(caps, None, device=device, max_sequence_length=max_len)
        x = data.render(scenes, res, device) * 2 - 1
        z = pipe.vae.encode(x).latent_dist.sample()
        z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    _, c, h, w = z.shape
    x0 = FluxPipeline._pack_latents(z, bs, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(bs, h // 2, w // 2, device, x0.dtype)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    sigma = sample_sigmas(bs, x0.shape[1], dict(pipe.scheduler.config), gen, device)
    xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    return dict(xt=xt, sigma=sigma, target=noise - x0, pe=pe, pooled=pooled, text_ids=text_ids, img_ids=img_ids)


def dit_loss(transformer, bt, device, bf16: bool = False):
    # fp32 (TF32 matmuls) by default: the bf16-autocast backward hit CUBLAS_STATUS_EXECUTION_FAILED on the
    # H100 (torch 2.11 + cu130) in the first recorded run; the model is small enough for fp32
    with autocast(device, bf16):
        pred = transformer(
            hidden_states=bt["xt"],
            timestep=bt["sigma"],
            guidance=None,
            pooled_projections=bt["pooled"],
            encoder_hidden_states=bt["pe"],
            txt_ids=bt["text_ids"],
            img_ids=bt["img_ids"],
            return_dict=False,
        )[0]
    return F.mse_loss(pred.float(), bt["target"])


def save(pipe, ema, out, history, shard_mb: int = 0):
    tr = pipe.transformer
    backup = {k: v.detach().clone() for k, v in tr.state_dict().items()}
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(tr.parameters(), ema):
                p.copy_(e)
    kw = dict(max_shard_size=f"{shard_mb}MB") if shard_mb else {}
    tr.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True, **kw)
    tr.load_state_dict(backup)
    pipe.vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(history, f, indent=1)


def train_dit(pipe, args, device, rng, gen, history):
    tr = pipe.transformer
    tr.train().requires_grad_(True)
    params = [p for p in tr.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone().float() for p in params]
    b = Budget(args.dit_steps, args.dit_seconds)
    acc, n, last_ckpt = 0.0, 0, time.time()
    while not b.done():
        for g in opt.param_groups:
            g["lr"] = lr_at(b.progress(), args.lr)
        big = args.big_every > 0 and b.i % args.big_every == args.big_every - 1
        bt = dit_batch(pipe, args, device, rng, gen, big)
        loss = dit_loss(tr, bt, device, args.dit_bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(args.ema, (1 + b.i) / (10 + b.i))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - d)
        b.i += 1
        if not big:
            acc, n = acc + loss.item(), n + 1
        if b.i % args.log_every == 0 or b.done():
            history["dit"].append([b.i, acc / max(n, 1)])
            lr = opt.param_groups[0]["lr"]
            log(f"dit step {b.i} loss {acc / max(n, 1):.4f} lr {lr:.2e} ({time.time() - b.t0:.0f}s)")
            acc, n = 0.0, 0
        if args.ckpt_every_s > 0 and time.time() - last_ckpt > args.ckpt_every_s:
            history.update(dit_steps=b.i, dit_seconds=time.time() - b.t0)
            save(pipe, ema, args.out, history, args.shard_mb)
            last_ckpt = time.time()
            log("checkpoint saved")
    history.update(dit_steps=b.i, dit_seconds=time.time() - b.t0)
    tr.eval().requires_grad_(False)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    # held-out loss (EMA weights, fixed seed, 128 px, max_sequence_length 32)
    vrng, vgen = np.random.default_rng(12345), torch.Generator().manual_seed(12345)
    old = args.seq_lens, args.caption_dropout
    args.seq_lens, args.caption_dropout = [32], 0.0
    with torch.no_grad():
        vl = [dit_loss(tr, dit_batch(pipe, args, device, vrng, vgen, False), device).item() for _ in range(4)]
    args.seq_lens, args.caption_dropout = old
    history["dit_eval_loss"] = float(np.mean(vl))
    log(f"dit done: {b.i} steps, held-out loss (EMA) {history['dit_eval_loss']:.4f}")
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_flux.train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-flux", help="pipeline folder from scripts.tiny_flux.build")
    ap.add_argument("--out", default=None, help="where trained vae/ and transformer/ go (default: --model)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny preset, few iterations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--vae-steps", type=int, default=0, help="0: only the time budget counts")
    ap.add_argument("--vae-seconds", type=float, default=90)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-5)
    ap.add_argument("--dit-steps", type=int, default=0)
    ap.add_argument("--dit-seconds", type=float, default=400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--dit-bf16", action="store_true", help="bf16 autocast for the transformer (default fp32/TF32)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32, 32, 48, 64])
    ap.add_argument("--big-every", type=int, default=6, help="every N-th step at 2x resolution (0: never)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--ckpt-every-s", type=float, default=150)
    ap.add_argument("--shard-mb", type=int, default=0, help="shard the transformer file (for size-limited transfers)")
    ap.add_argument("--eval", action="store_true", help="after training, run scripts.tiny_flux.check on the result")
    ap.add_argument("--allow-cpu", action="store_true", help="allow a full (non-smoke) run on the CPU")
    args = ap.parse_args(argv)
    if not args.smoke and args.device == "cpu" and not args.allow_cpu:
        sys.exit("a full run on the CPU takes hours and overwrites --out: use a GPU, --smoke, or --allow-cpu")

    tmp = None
    if args.smoke:
        from scripts.tiny_flux import build

        tmp = tempfile.mkdtemp(prefix="tinyflux-smoke-")
        build.build(os.path.join(tmp, "model"), preset="smoke", seed=args.seed)
        args.model = os.path.join(tmp, "model")
        args.device = "cpu"
        args.res, args.vae_batch, args.batch = 32, 4, 8
        args.vae_steps, args.dit_steps, args.vae_seconds, args.dit_seconds = 3, 4, 0, 0
        args.log_every, args.ckpt_every_s, args.eval = 2, 0, True
    args.out = args.out or args.model
    os.makedirs(args.out, exist_ok=True)

    from diffusers import FluxPipeline

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipe = FluxPipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    history = {"args": {k: v for k, v in vars(args).items()}, "vae": [], "dit": []}
    t0 = time.time()
    if args.vae_steps > 0 or args.vae_seconds > 0:
        train_vae(pipe.vae, args, device, rng, history)
        pipe.vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    train_dit(pipe, args, device, rng, gen, history)
    history["train_seconds"] = time.time() - t0
    save(pipe, None, args.out, history, args.shard_mb)  # weights are EMA already
    log(f"saved to {args.out} ({history['train_seconds']:.0f}s)")
    if args.eval:
        from scripts.tiny_flux import check as chk

        kw = dict(height=args.res, width=args.res)
        if args.smoke:
            kw["num_inference_steps"] = 2
        res = chk.check(pipe, n_per_color=2 if not args.smoke else 1, seed=0,
                        grid=os.path.join(args.out, "samples.png"), **kw)
        history["adherence"] = {k: v for k, v in res.items() if k != "details"}
        history["adherence_details"] = res["details"]
        with open(os.path.join(args.out, "train_log.json"), "w") as f:
            json.dump(history, f, indent=1)
        log(f"adherence: colour {res['color_pct']:.0f}% shape {res['shape_pct']:.0f}% side {res['side_pct']:.0f}% "
            f"bg {res['bg_pct']:.0f}% found {res['found_pct']:.0f}%")
    if tmp:
        import shutil

        if os.path.abspath(args.out).startswith(os.path.abspath(tmp)):
            history["smoke_dir"] = tmp  # the result lives there: keep it
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return history


if __name__ == "__main__":
    main()
