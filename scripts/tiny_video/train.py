"""Train the tiny HunyuanVideo model: first the video VAE, then the transformer (flow matching).

Clips come from ``scripts.tiny_video.data`` (rendered on the training device: fresh batches for the VAE, then a set of
``--latent-clips`` encoded once for the transformer), text embeddings from the pipeline's own ``encode_prompt``
(frozen Llama + CLIP, ``prompt_template=PROMPT_TEMPLATE``), so training sees what
``HunyuanVideoPipeline.__call__`` feeds the transformer.

Objective (``FlowMatchEulerDiscreteScheduler.step``: x_next = x + (sigma_next - sigma) * v):
    x_sigma = (1 - sigma) * x0 + sigma * noise,  target v = noise - x0,
    the transformer gets ``timestep = 1000 * sigma`` (the pipeline passes the scheduler's timesteps, 0..1000).
x0 = VAE latent * scaling_factor (the pipeline decodes latents / scaling_factor, no shift). sigma: logit-normal
(80 %) / uniform (20 %), then the scheduler's static shift. 10 % of captions are dropped to "". float32 + TF32.

The shipped weights came from two GPU calls of ``scripts/tiny_video/gpu_train.sh`` (docs/tiny-video.md): a
first run (``--vae-bf16 --vae-seconds 160 --dit-seconds 250 --eval-every 60``), then the same folder continued
(``--vae-lr 5e-4 --vae-seconds 140 --lr 6e-4 --dit-seconds 340``). One call of the same total length::

    python -m scripts.tiny_video.build --out assets/models/tiny-hunyuanvideo --force
    python -m scripts.tiny_video.train --model assets/models/tiny-hunyuanvideo --vae-bf16 --vae-seconds 300 \
        --dit-seconds 590 --eval-every 120 --eval

CPU smoke run (smoke preset in a temp folder, a few iterations, same code path)::

    python -m scripts.tiny_video.train --smoke
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

from scripts.tiny_flux.train import Budget, autocast, log, lr_at
from scripts.tiny_video import data
from scripts.tiny_video.build import PROMPT_TEMPLATE

# the shipped model's default call (docs/tiny-video.md)
DEFAULT_CALL = dict(height=64, width=64, num_frames=9, num_inference_steps=10, max_sequence_length=32,
                    prompt_template=PROMPT_TEMPLATE)
EVAL_PROMPTS = [data.caption(s, c, z, d, b) for (s, c, z, b) in [
    ("circle", "red", "large", "black"), ("square", "blue", "large", "white"), ("triangle", "green", "large", "gray"),
    ("circle", "yellow", "small", "black"), ("square", "orange", "large", "gray"), ("circle", "cyan", "large", "black"),
] for d in data.DIR_NAMES]  # 24 prompts: 6 objects x 4 directions
ATTRS = ("direction", "color", "shape", "bg")  # what evaluate() reads back from a clip and scores


def train_vae(vae, args, device, rng, history):
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    b = Budget(args.vae_steps, args.vae_seconds)
    acc, n = 0.0, 0
    while not b.done():
        for g in opt.param_groups:
            g["lr"] = lr_at(b.progress(), args.vae_lr)
        x = data.render(data.sample_clips(args.vae_batch, rng), args.frames, args.res, device) * 2 - 1
        with autocast(device, args.vae_bf16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        kl = post.kl().float().mean() / post.mean[0].numel()
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
    with torch.no_grad():
        x = data.render(data.sample_clips(max(8, args.vae_batch), rng), args.frames, args.res, device) * 2 - 1
        z = vae.encode(x).latent_dist.sample()
        scale = 1.0 / z.std().item()
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        mse = F.mse_loss(rec.clamp(-1, 1), x).item()
    vae.register_to_config(scaling_factor=scale)
    history.update(vae_steps=b.i, vae_seconds=time.time() - b.t0, scaling_factor=scale, latent_mean=z.mean().item(),
                   vae_recon_mse=mse, vae_recon_psnr=10 * math.log10(4.0 / max(mse, 1e-10)))
    log(f"vae done: {b.i} steps, scaling_factor {scale:.4f} latent mean {z.mean().item():.3f} "
        f"recon PSNR {history['vae_recon_psnr']:.1f} dB")


def sample_sigmas(n, shift, gen, device):
    u = torch.sigmoid(torch.randn(n, generator=gen))
    u = torch.where(torch.rand(n, generator=gen) < 0.2, torch.rand(n, generator=gen), u).clamp(1e-3, 1.0)
    return (shift * u / (1 + (shift - 1) * u)).to(device)


class LatentSet:
    """``n`` clips encoded once by the trained VAE (posterior mean and std), with their captions.

    A DiT step then samples ``x0 = (mean + std * eps) * scaling_factor`` from it instead of rendering and
    encoding a fresh batch: the tiny transformer's step is a few ms of GPU work, the VAE encode was most of it.
    The clip parameters are continuous (travel, offsets), the grammar has 576 captions, so 32k clips cover it.
    """

    def __init__(self, vae, n: int, args, device, rng, chunk: int = 256):
        self.clips = data.sample_clips(n, rng)
        self.captions = np.array(data.captions(self.clips))
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, n, chunk):
                part = data.Clips(*[getattr(self.clips, f)[i:i + chunk] for f in data.Clips.__dataclass_fields__])
                post = vae.encode(data.render(part, args.frames, args.res, device) * 2 - 1).latent_dist
                means.append(post.mean.half())
                stds.append(post.std.half())
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.scale = vae.config.scaling_factor

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        i = torch.as_tensor(idx, device=self.mean.device)
        m, s = self.mean[i].float(), self.std[i].float()
        return (m + s * torch.randn(m.shape, generator=gen).to(m.device)) * self.scale


class TextCache:
    """``encode_prompt`` output per caption at ``max_len`` tokens; shorter lengths are prefixes of it.

    That holds because right padding is used and the pipeline reads the Llama's embedding layer (no context) and
    CLIP's pooled output (which does not see the Llama length)."""

    def __init__(self, pipe, device, max_len: int):
        self.pipe, self.device, self.max_len, self.store = pipe, device, max_len, {}

    def __call__(self, caps: list[str], length: int):
        new = sorted(set(caps) - set(self.store))
        if new:
            with torch.no_grad():
                pe, pooled, mask = self.pipe.encode_prompt(new, prompt_template=PROMPT_TEMPLATE, device=self.device,
                                                           max_sequence_length=self.max_len)
            self.store.update({c: (pe[k], pooled[k], mask[k]) for k, c in enumerate(new)})
        pe, pooled, mask = (torch.stack(t) for t in zip(*(self.store[c] for c in caps)))
        return pe[:, :length], pooled, mask[:, :length]


def dit_batch(lat: LatentSet, text: TextCache, args, rng, gen, dropout: float, captions: np.ndarray | None = None):
    """A training batch from ``lat``; ``captions`` (one per clip of ``lat``) replaces its own, e.g. shuffled."""
    idx = rng.integers(0, len(lat), args.batch)
    caps = lat.captions if captions is None else captions
    caps = ["" if d else c for c, d in zip(caps[idx], rng.random(args.batch) < dropout)]
    pe, pooled, mask = text(caps, int(rng.choice(args.seq_lens)))
    x0 = lat.sample(idx, gen)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    sigma = sample_sigmas(args.batch, text.pipe.scheduler.config.shift, gen, x0.device)
    s = sigma[:, None, None, None, None]
    return dict(xt=(1 - s) * x0 + s * noise, t=sigma * 1000.0, target=noise - x0, pe=pe, pooled=pooled, mask=mask)


def dit_loss(tr, bt):
    pred = tr(hidden_states=bt["xt"], timestep=bt["t"], encoder_hidden_states=bt["pe"],
              encoder_attention_mask=bt["mask"], pooled_projections=bt["pooled"], guidance=None,
              return_dict=False)[0]
    return F.mse_loss(pred.float(), bt["target"])


def train_dit(pipe, lat: LatentSet, args, device, rng, gen, history):
    """Flow matching on ``lat``; every ``--eval-every`` seconds the EMA weights are scored for adherence."""
    tr = pipe.transformer
    text = TextCache(pipe, device, max(args.seq_lens))
    tr.train().requires_grad_(True)
    params = list(tr.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    b = Budget(args.dit_steps, args.dit_seconds)
    acc, n, next_eval = 0.0, 0, args.eval_every
    while not b.done():
        for g in opt.param_groups:
            g["lr"] = lr_at(b.progress(), args.lr)
        loss = dit_loss(tr, dit_batch(lat, text, args, rng, gen, args.caption_dropout))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(args.ema, (1 + b.i) / (10 + b.i)))
        b.i += 1
        acc, n = acc + loss.item(), n + 1
        if b.i % args.log_every == 0 or b.done():
            history["dit"].append([b.i, acc / n])
            log(f"dit step {b.i} loss {acc / n:.4f} lr {opt.param_groups[0]['lr']:.2e} ({time.time() - b.t0:.0f}s)")
            acc, n = 0.0, 0
        if args.eval_every > 0 and time.time() - b.t0 >= next_eval and not b.done():
            next_eval += args.eval_every
            with swapped(params, ema):
                tr.eval()
                res = evaluate(pipe, EVAL_PROMPTS, height=args.res, width=args.res, num_frames=args.frames)
                tr.train()
            history["checkpoints"].append(dict(step=b.i, seconds=time.time() - b.t0, **summary(res)))
            log(f"  eval at step {b.i}: {fmt(res)}")
    tr.eval().requires_grad_(False)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
        vrng, vgen = np.random.default_rng(12345), torch.Generator().manual_seed(12345)
        vl = [dit_loss(tr, dit_batch(lat, text, args, vrng, vgen, 0.0)).item() for _ in range(4)]
        # how much the transformer uses its text: the same held-out batches with captions shuffled
        vrng, vgen = np.random.default_rng(12345), torch.Generator().manual_seed(12345)
        shuffled = lat.captions[np.random.default_rng(1).permutation(len(lat))]
        sl = [dit_loss(tr, dit_batch(lat, text, args, vrng, vgen, 0.0, shuffled)).item() for _ in range(4)]
    history.update(dit_steps=b.i, dit_seconds=time.time() - b.t0, dit_eval_loss=float(np.mean(vl)),
                   dit_eval_loss_shuffled_captions=float(np.mean(sl)))
    log(f"dit done: {b.i} steps, held-out loss (EMA) {history['dit_eval_loss']:.4f}, "
        f"with shuffled captions {history['dit_eval_loss_shuffled_captions']:.4f}")


class swapped:
    """Within the block ``params`` hold ``other``'s values (EMA weights for an evaluation), then their own."""

    def __init__(self, params, other):
        self.params, self.other = params, other

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, o in zip(self.params, self.other):
                p.copy_(o)

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)


def summary(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "details"}


def fmt(res: dict) -> str:
    return (f"direction {res['direction_pct']:.0f}% colour {res['color_pct']:.0f}% shape {res['shape_pct']:.0f}% "
            f"background {res['bg_pct']:.0f}% of {res['n']}")


def evaluate(pipe, prompts=EVAL_PROMPTS, seed: int = 0, strip: str | None = None, batch: int = 8, **call) -> dict:
    """Motion / colour adherence of ``pipe`` on ``prompts`` (one clip each, generator seeded ``seed + i``).

    Prompts go through the pipeline ``batch`` at a time with one generator each, which draws the same starting
    noise as one call per prompt."""
    kw = {**DEFAULT_CALL, **call}
    details, clips = [], []
    for start in range(0, len(prompts), batch):
        part = list(prompts[start:start + batch])
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(part))]
        with torch.no_grad():
            out = pipe(part, generator=gens, output_type="pt", **kw).frames  # (B, F, 3, H, W)
        for p, video in zip(part, out):
            clip = video.permute(1, 0, 2, 3).float().cpu()  # (F, 3, H, W) -> (3, F, H, W)
            clips.append(clip)
            a, want = data.analyze_clip(clip), data.parse_caption(p)
            details.append(dict(prompt=p, direction=a["direction"], color=a["color"], shape=a["shape"], bg=a["bg"],
                                **{f"ok_{k}": a[k] == want[k] for k in ATTRS}))
    if strip:
        data.save_strip(torch.stack(clips), strip)
    n = len(details)
    pct = {f"{k}_pct": 100 * sum(d[f"ok_{k}"] for d in details) / n for k in ATTRS}
    return dict(**pct, n=n, details=details)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_video.train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-hunyuanvideo")
    ap.add_argument("--out", default=None, help="where vae/, transformer/ and train_log.json go (default --model)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--res", type=int, default=data.RES)
    ap.add_argument("--frames", type=int, default=data.FRAMES)
    ap.add_argument("--vae-steps", type=int, default=0)
    ap.add_argument("--vae-seconds", type=float, default=110)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-5)
    ap.add_argument("--vae-bf16", action="store_true", help="bf16 autocast for the VAE (the 3-D convs dominate)")
    ap.add_argument("--dit-steps", type=int, default=0)
    ap.add_argument("--dit-seconds", type=float, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--latent-clips", type=int, default=32768, help="clips encoded once for the DiT (LatentSet)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=float, default=0, help="seconds between adherence checks in training")
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--allow-cpu", action="store_true", help="allow a full (non-smoke) run on the CPU")
    args = ap.parse_args(argv)
    tmp = None
    if args.smoke:
        from scripts.tiny_video import build

        tmp = tempfile.mkdtemp(prefix="tinyvideo-smoke-")
        build.build(os.path.join(tmp, "model"), preset="smoke", seed=args.seed)
        args.model, args.device, args.out = os.path.join(tmp, "model"), "cpu", None
        args.res, args.frames, args.vae_batch, args.batch = 32, 5, 2, 2
        args.vae_steps, args.dit_steps, args.vae_seconds, args.dit_seconds = 2, 3, 0, 0
        args.log_every, args.eval, args.latent_clips = 1, True, 8
    elif args.device == "cpu" and not args.allow_cpu:
        sys.exit("a full run on the CPU takes hours: use a GPU or --smoke")
    args.out = args.out or args.model
    os.makedirs(args.out, exist_ok=True)

    from diffusers import HunyuanVideoPipeline

    torch.manual_seed(args.seed)
    rng, gen, device = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed), torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pipe = HunyuanVideoPipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    history = {"args": dict(vars(args)), "vae": [], "dit": [], "checkpoints": []}
    t0 = time.time()
    if args.vae_steps > 0 or args.vae_seconds > 0:
        train_vae(pipe.vae, args, device, rng, history)
        pipe.vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    t1 = time.time()
    lat = LatentSet(pipe.vae, args.latent_clips, args, device, rng)
    history["latent_set_seconds"] = time.time() - t1
    log(f"encoded {len(lat)} clips in {history['latent_set_seconds']:.0f}s")
    train_dit(pipe, lat, args, device, rng, gen, history)
    pipe.transformer.save_pretrained(os.path.join(args.out, "transformer"), safe_serialization=True)
    history["train_seconds"] = time.time() - t0
    log(f"saved to {args.out} ({history['train_seconds']:.0f}s)")
    if args.eval:
        kw = dict(height=args.res, width=args.res, num_frames=args.frames)
        prompts = EVAL_PROMPTS[:2] if args.smoke else EVAL_PROMPTS
        if args.smoke:
            kw["num_inference_steps"] = 2
        res = evaluate(pipe, prompts, strip=os.path.join(args.out, "samples.png"), **kw)
        history["adherence"], history["adherence_details"] = summary(res), res["details"]
        log(f"adherence: {fmt(res)}")
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(history, f, indent=1)
    if tmp:
        history["smoke_dir"] = tmp
    return history


if __name__ == "__main__":
    main()
