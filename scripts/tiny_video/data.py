"""Procedural, captioned moving-shape clips for the bundled tiny HunyuanVideo model.

The tiny FLUX's shapes, colours, sizes and backgrounds (``scripts.tiny_flux.data``), one object per clip, moving in a
straight line across the frame:

* directions: left, right, up, down (the object travels ``TRAVEL`` of the frame side over the clip)

Caption example::

    a large red circle moving left, on a black background

Clips are sampled with a NumPy generator (deterministic for a seed) and rendered with torch on any device
(the shapes' anti-aliased signed distances from ``scripts.tiny_flux.data``), so training renders on the GPU on the
fly.
The analysis helpers (per-frame centroid, colour, direction of motion) are used by the tests both on
generator output and on clips the trained pipeline makes.

    python -m scripts.tiny_video.data --n 8 --out /tmp/clips.png     # one row of frames per clip
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import numpy as np
import torch

from scripts.tiny_flux import data as img

SHAPES, COLORS, COLOR_NAMES = img.SHAPES, img.COLORS, img.COLOR_NAMES
BACKGROUNDS, BG_NAMES, SIZES, SIZE_NAMES = img.BACKGROUNDS, img.BG_NAMES, img.SIZES, img.SIZE_NAMES
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y grows down
DIR_NAMES = tuple(DIRECTIONS)
TRAVEL = (0.35, 0.5)  # distance travelled over the clip, in frame sides (uniform in this range)
CROSS_JITTER = 0.12  # offset of the path across the direction of motion
FRAMES, RES = 9, 64  # the shipped model's clip: 9 frames of 64 x 64

VOCAB_WORDS = sorted(set(["a", "moving", "on", "background", ","] + list(SHAPES) + list(COLORS) + list(BACKGROUNDS)
                         + list(SIZES) + list(DIRECTIONS)))


@dataclass
class Clips:
    shape: np.ndarray  # (B,) index into SHAPES
    color: np.ndarray  # (B,)
    size: np.ndarray  # (B,)
    direction: np.ndarray  # (B,) index into DIR_NAMES
    bg: np.ndarray  # (B,)
    travel: np.ndarray  # (B,) distance travelled
    cross: np.ndarray  # (B,) offset across the motion
    along: np.ndarray  # (B,) offset of the path's midpoint along the motion

    def __len__(self) -> int:
        return len(self.shape)


def sample_clips(n: int, seed: int | np.random.Generator = 0) -> Clips:
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    bg = rng.integers(0, len(BG_NAMES), n)
    color = rng.integers(0, len(COLOR_NAMES), n)
    clash = np.array([BG_NAMES[b] == "white" for b in bg]) & (color == COLOR_NAMES.index("white"))
    color[clash] = rng.integers(0, len(COLOR_NAMES) - 1, clash.sum())  # white is the last colour
    return Clips(
        shape=rng.integers(0, len(SHAPES), n), color=color, size=rng.integers(0, len(SIZE_NAMES), n),
        direction=rng.integers(0, len(DIR_NAMES), n), bg=bg, travel=rng.uniform(*TRAVEL, n),
        cross=rng.uniform(-CROSS_JITTER, CROSS_JITTER, n), along=rng.uniform(-0.04, 0.04, n),
    )


def clip_from_attrs(shape: str, color: str, size: str, direction: str, bg: str) -> Clips:
    return Clips(np.array([SHAPES.index(shape)]), np.array([COLOR_NAMES.index(color)]),
                 np.array([SIZE_NAMES.index(size)]), np.array([DIR_NAMES.index(direction)]),
                 np.array([BG_NAMES.index(bg)]), np.array([np.mean(TRAVEL)]), np.zeros(1), np.zeros(1))


def caption(shape: str, color: str, size: str, direction: str, bg: str) -> str:
    return f"a {size} {color} {shape} moving {direction}, on a {bg} background"


CAPTION_RE = re.compile(r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>\w+), on a (?P<bg>\w+) "
                        r"background$")


def parse_caption(text: str) -> dict:
    """Inverse of ``caption``: {size, color, shape, direction, bg}; ValueError for text outside the grammar."""
    m = CAPTION_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a caption of this grammar: {text!r}")
    return m.groupdict()


def clip_attrs(c: Clips, i: int) -> dict:
    return dict(shape=SHAPES[c.shape[i]], color=COLOR_NAMES[c.color[i]], size=SIZE_NAMES[c.size[i]],
                direction=DIR_NAMES[c.direction[i]], bg=BG_NAMES[c.bg[i]])


def captions(c: Clips) -> list[str]:
    return [caption(**clip_attrs(c, i)) for i in range(len(c))]


def centers(c: Clips, frames: int) -> np.ndarray:
    """(B, frames, 2) object centres (x, y) in frame units."""
    d = np.array([DIRECTIONS[DIR_NAMES[k]] for k in c.direction])  # (B, 2)
    perp = d[:, ::-1].copy()
    s = np.linspace(-0.5, 0.5, frames)[None, :, None] * c.travel[:, None, None]  # (B, F, 1)
    mid = 0.5 + d * c.along[:, None] + perp * c.cross[:, None]
    return mid[:, None, :] + s * d[:, None, :]


def render(c: Clips, frames: int = FRAMES, res: int = RES, device="cpu") -> torch.Tensor:
    """Render clips to (B, 3, frames, res, res) in [0, 1]."""
    B, dev = len(c), torch.device(device)
    palette = torch.tensor([COLORS[n] for n in COLOR_NAMES], device=dev)
    bg_pal = torch.tensor([BACKGROUNDS[n] for n in BG_NAMES], device=dev)
    radii = torch.tensor([SIZES[n] for n in SIZE_NAMES], device=dev)
    coords = (torch.arange(res, device=dev, dtype=torch.float32) + 0.5) / res
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    ctr = torch.as_tensor(centers(c, frames), device=dev, dtype=torch.float32).reshape(B * frames, 2)
    rep = lambda a: torch.as_tensor(a, device=dev).repeat_interleave(frames)  # noqa: E731
    shape = rep(c.shape)[:, None, None]
    r = radii[rep(c.size)][:, None, None]
    d = img._sdf(shape, xx[None] - ctr[:, 0, None, None], yy[None] - ctr[:, 1, None, None], r)
    alpha = (0.5 - d * res).clamp(0.0, 1.0)[:, None]
    out = bg_pal[rep(c.bg)][:, :, None, None] * (1 - alpha) + palette[rep(c.color)][:, :, None, None] * alpha
    return out.reshape(B, frames, 3, res, res).permute(0, 2, 1, 3, 4).contiguous()


def batch(n: int, seed=0, frames: int = FRAMES, res: int = RES, device="cpu"):
    c = sample_clips(n, seed)
    return render(c, frames, res, device), captions(c)


# ----------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------


def frames_of(video) -> list[np.ndarray]:
    """Clip -> list of (H, W, 3) float arrays. Accepts a (3, F, H, W) tensor in [0, 1], a list of PIL
    images / arrays (the pipeline's ``output_type="pil"`` / ``"np"`` frames) or an (F, H, W, 3) array."""
    if isinstance(video, torch.Tensor):
        return [img.to_array(video[:, f]) for f in range(video.shape[1])]
    return [img.to_array(f) for f in video]


def analyze_clip(video) -> dict:
    """Centroid track, colour (median over frames) and direction of motion of the clip's single object.

    direction: the dominant axis of the displacement between the mean centroid of the first and last third
    of the frames where the object is found; ``None`` when it moves less than 5 % of the frame side.
    """
    fr = frames_of(video)
    infos = [img.analyze_single(f) for f in fr]
    found = [i for i in infos if i["found"]]
    res = {"found_frac": len(found) / len(infos), "bg": infos[0]["bg"]}
    if len(found) < 2:
        return {**res, "direction": None, "color": None, "shape": None, "track": []}
    track = np.array([[i["cx"], i["cy"]] for i in found])
    k = max(1, len(track) // 3)
    dx, dy = track[-k:].mean(0) - track[:k].mean(0)
    if max(abs(dx), abs(dy)) < 0.05:
        direction = None
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    colors = [i["color"] for i in found]
    shapes = [i["shape"] for i in found]
    return {**res, "direction": direction, "dx": float(dx), "dy": float(dy), "track": track.tolist(),
            "color": max(set(colors), key=colors.count), "shape": max(set(shapes), key=shapes.count)}


def save_strip(videos: torch.Tensor, path: str) -> None:
    """(B, 3, F, H, W) -> PNG, one row of frames per clip."""
    B, _, F, H, W = videos.shape
    img.save_grid(videos.permute(0, 2, 1, 3, 4).reshape(B * F, 3, H, W), path, ncol=F)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_video.data", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/tinyvideo_data.png")
    args = ap.parse_args()
    v, caps = batch(args.n, args.seed)
    save_strip(v, args.out)
    for i, c in enumerate(caps):
        print(i, c, analyze_clip(v[i])["direction"])
    print("wrote", args.out)


if __name__ == "__main__":
    main()
