"""Measure prompt adherence of a tiny FLUX pipeline folder from generated pixels.

For a fixed set of single-object prompts (every colour, every shape, left and right) it runs the real
``FluxPipeline`` call, then classifies the generated image with ``scripts.tiny_flux.data.analyze_single``:
colour (nearest palette colour of the object's core pixels), shape (fill ratio of the bounding box)
and side (centroid). Prints the percentages and writes a PNG grid.

Usage::

    HF_HUB_OFFLINE=1 python -m scripts.tiny_flux.check --model assets/models/tiny-flux --out docs/tiny-flux-check.png
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from scripts.tiny_flux import data

# pipeline call defaults the app and tests use
DEFAULTS = dict(height=128, width=128, num_inference_steps=28, guidance_scale=1.0, max_sequence_length=32)


def adherence_prompts(n_per_color: int = 2) -> list[dict]:
    """Fixed single-object prompts: every colour ``n_per_color`` times, shapes cycling, left/right alternating,
    backgrounds cycling (never white object on white)."""
    out = []
    k = 0
    for rep in range(n_per_color):
        for ci, color in enumerate(data.COLOR_NAMES):
            shape = data.SHAPES[(ci + rep) % 3]
            pos = ("left", "right")[(ci + rep) % 2]
            bg = data.BG_NAMES[(ci + 2 * rep) % 3]
            if color == "white" and bg == "white":
                bg = "black"
            size = "large"
            obj = dict(shape=shape, color=color, size=size, pos=pos)
            out.append(dict(obj, bg=bg, prompt=data.caption([(shape, color, size, pos)], bg)))
            k += 1
    return out


def generate(pipe, prompts: list[str], seed: int = 0, batch_size: int = 8, **kw) -> list:
    args = dict(DEFAULTS, **kw)
    images = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        g = torch.Generator("cpu").manual_seed(seed + i)
        out = pipe(chunk, generator=g, output_type="np", **args).images
        images += [np.asarray(o, dtype=np.float32) for o in out]
    return images


def score(items: list[dict], images: list) -> dict:
    res = dict(color=0, shape=0, side=0, bg=0, found=0, n=len(items), details=[])
    for it, img in zip(items, images):
        a = data.analyze_single(img)
        d = dict(prompt=it["prompt"], found=a["found"], bg=a["bg"])
        res["bg"] += a["bg"] == it["bg"]
        if a["found"]:
            res["found"] += 1
            side = data.side_of(a["cx"], a["cy"])
            res["color"] += a["color"] == it["color"]
            res["shape"] += a["shape"] == it["shape"]
            res["side"] += side == it["pos"]
            d.update(color=a["color"], shape=a["shape"], side=side, fill=round(a["fill"], 3))
        res["details"].append(d)
    for k in ("color", "shape", "side", "bg", "found"):
        res[k + "_pct"] = 100.0 * res[k] / max(1, res["n"])
    return res


def check(pipe, n_per_color: int = 2, seed: int = 0, grid: str | None = None, **kw) -> dict:
    items = adherence_prompts(n_per_color)
    t = time.time()
    imgs = generate(pipe, [it["prompt"] for it in items], seed=seed, **kw)
    res = score(items, imgs)
    res["seconds"] = time.time() - t
    if grid:
        data.save_grid(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2), grid, ncol=8)
    return res


def plot_losses(curves: dict[str, list], path: str, w: int = 480, h: int = 200) -> None:
    """Tiny log-scale line plot of [[step, loss], ...] curves (PIL only; no matplotlib needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h * len(curves)), "white")
    d = ImageDraw.Draw(img)
    for k, (name, pts) in enumerate(curves.items()):
        pts = np.array(pts, dtype=np.float64)
        x, y = pts[:, 0], np.log10(pts[:, 1])
        x0, y0, y1 = 0.0, y.min(), y.max()
        ox, oy, pw, ph = 50, k * h + 20, w - 60, h - 45
        d.rectangle([ox, oy, ox + pw, oy + ph], outline="black")
        xy = [(ox + pw * (a - x0) / (x.max() - x0), oy + ph * (1 - (b - y0) / max(y1 - y0, 1e-9)))
              for a, b in zip(x, y)]
        d.line(xy, fill=(200, 30, 30), width=2)
        title = f"{name}: log10 loss, {pts[0, 1]:.3g} -> {pts[-1, 1]:.3g} at step {int(x.max())}"
        d.text((ox, oy - 15), title, fill="black")
        d.text((4, oy), f"{10 ** y1:.2g}", fill="black")
        d.text((4, oy + ph - 10), f"{10 ** y0:.2g}", fill="black")
        d.text((ox + pw - 40, oy + ph + 4), f"{int(x.max())}", fill="black")
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_flux.check", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-flux")
    ap.add_argument("--n-per-color", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"])
    ap.add_argument("--res", type=int, default=DEFAULTS["height"])
    ap.add_argument("--max-seq", type=int, default=DEFAULTS["max_sequence_length"])
    ap.add_argument("--out", default=None, help="PNG grid of the generated images")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--plot-logs", nargs="+", default=None, help="only plot the loss curves of these train_log.json")
    args = ap.parse_args()
    if args.plot_logs:
        import json

        curves = {}
        for logfile in args.plot_logs:
            hist = json.load(open(logfile))
            curves.update({f"{k} ({os.path.basename(logfile)})": hist[k] for k in ("vae", "dit") if hist.get(k)})
        plot_losses(curves, args.out or "loss.png")
        return
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    res = check(
        pipe, args.n_per_color, args.seed, args.out,
        num_inference_steps=args.steps, height=args.res, width=args.res, max_sequence_length=args.max_seq,
    )
    if args.verbose:
        for d in res["details"]:
            print(d)
    print(
        f"n={res['n']} colour {res['color_pct']:.0f}%  shape {res['shape_pct']:.0f}%  side {res['side_pct']:.0f}%  "
        f"background {res['bg_pct']:.0f}%  object found {res['found_pct']:.0f}%  ({res['seconds']:.1f} s)"
    )


if __name__ == "__main__":
    main()
