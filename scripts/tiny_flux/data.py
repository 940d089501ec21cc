"""Procedural, captioned shape images for the bundled tiny FLUX model.

No downloads: every image is drawn from a small caption grammar.

* one or two objects per image
* shapes:      circle, square, triangle
* colours:     red, orange, yellow, green, cyan, blue, purple, white
* sizes:       small, large
* positions:   left, right, top, bottom, center
* backgrounds: black, white, gray   (never the same colour as an object)

Caption example::

    a large red circle on the left and a small blue square on the right, on a gray background

Scenes are sampled with a NumPy generator (deterministic for a seed) and
rendered with torch on any device (batched, anti-aliased signed-distance
shapes), so the training script can render on the GPU on the fly.

The module also holds the *analysis* helpers (background estimate,
foreground mask, colour / shape / side classification) that the tests use
both on generator output (to check the generator) and on images produced by
the trained pipeline (to measure prompt adherence).

Usage as a script writes a PNG grid with its captions::

    python -m scripts.tiny_flux.data --n 16 --seed 0 --res 128 --out /tmp/grid.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.15),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.25, 0.95),
    "purple": (0.60, 0.15, 0.80),
    "white": (0.97, 0.97, 0.97),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5)}
BG_NAMES = tuple(BACKGROUNDS)
SIZES = {"small": 0.10, "large": 0.18}  # half extent, in units of the image side
SIZE_NAMES = tuple(SIZES)
POSITIONS = {  # centre (x, y), y grows downwards
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POS_NAMES = tuple(POSITIONS)
POS_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# ordered pairs of positions allowed for two-object scenes (never overlapping)
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
JITTER = 0.03  # max random offset of an object centre

# every word the grammar can produce (plus the comma), used to build the tokenizers
VOCAB_WORDS = sorted(
    set(
        ["a", "and", "on", "background", ","]
        + list(SHAPES)
        + list(COLORS)
        + list(BACKGROUNDS)
        + list(SIZES)
        + " ".join(POS_PHRASE.values()).split()
    )
)


@dataclass
class Scenes:
    """A batch of scenes as integer attribute arrays (slot 1 unused when n_obj == 1)."""

    n_obj: np.ndarray  # (B,) 1 or 2
    shape: np.ndarray  # (B, 2) index into SHAPES
    color: np.ndarray  # (B, 2) index into COLOR_NAMES
    size: np.ndarray  # (B, 2) index into SIZE_NAMES
    pos: np.ndarray  # (B, 2) index into POS_NAMES
    jitter: np.ndarray  # (B, 2, 2) float offsets of the centres
    bg: np.ndarray  # (B,) index into BG_NAMES

    def __len__(self) -> int:
        return len(self.n_obj)


def sample_scenes(n: int, seed: int | np.random.Generator = 0, p_two: float = 0.5) -> Scenes:
    """Sample ``n`` scenes; deterministic for an int seed (or a given Generator)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n_obj = np.where(rng.random(n) < p_two, 2, 1)
    shape = rng.integers(0, len(SHAPES), (n, 2))
    size = rng.integers(0, len(SIZES), (n, 2))
    bg = rng.integers(0, len(BG_NAMES), n)
    # object colours: never equal to the background colour (only white can clash)
    color = rng.integers(0, len(COLOR_NAMES), (n, 2))
    white_bg = np.array([BG_NAMES[b] == "white" for b in bg])
    wi = COLOR_NAMES.index("white")
    for k in range(2):
        clash = white_bg & (color[:, k] == wi)
        color[clash, k] = rng.integers(0, len(COLOR_NAMES) - 1, clash.sum())  # white is last
    # positions: any of the 5 for one object, a non-overlapping pair for two
    pos = np.zeros((n, 2), dtype=np.int64)
    single = rng.integers(0, len(POS_NAMES), n)
    pair = rng.integers(0, len(PAIRS), n)
    for i in range(n):
        if n_obj[i] == 1:
            pos[i] = (single[i], single[i])
        else:
            a, b = PAIRS[pair[i]]
            pos[i] = (POS_NAMES.index(a), POS_NAMES.index(b))
    jitter = rng.uniform(-JITTER, JITTER, (n, 2, 2))
    return Scenes(n_obj, shape, color, size, pos, jitter, bg)


def scene_from_attrs(objects: list[dict], bg: str) -> Scenes:
    """Build a one-scene batch from names.

    e.g. ``[{"shape": "circle", "color": "red", "size": "large", "pos": "left"}]``
    """
    objs = list(objects) + [objects[0]] * (2 - len(objects))
    return Scenes(
        n_obj=np.array([len(objects)]),
        shape=np.array([[SHAPES.index(o["shape"]) for o in objs]]),
        color=np.array([[COLOR_NAMES.index(o["color"]) for o in objs]]),
        size=np.array([[SIZE_NAMES.index(o["size"]) for o in objs]]),
        pos=np.array([[POS_NAMES.index(o["pos"]) for o in objs]]),
        jitter=np.zeros((1, 2, 2)),
        bg=np.array([BG_NAMES.index(bg)]),
    )


def object_phrase(shape: str, color: str, size: str, pos: str) -> str:
    return f"a {size} {color} {shape} {POS_PHRASE[pos]}"


def caption(objects: list[tuple[str, str, str, str]], bg: str) -> str:
    """``objects``: list of (shape, color, size, pos) names."""
    return " and ".join(object_phrase(*o) for o in objects) + f", on a {bg} background"


def scene_objects(s: Scenes, i: int) -> list[tuple[str, str, str, str]]:
    return [
        (SHAPES[s.shape[i, k]], COLOR_NAMES[s.color[i, k]], SIZE_NAMES[s.size[i, k]], POS_NAMES[s.pos[i, k]])
        for k in range(int(s.n_obj[i]))
    ]


def captions(s: Scenes) -> list[str]:
    return [caption(scene_objects(s, i), BG_NAMES[s.bg[i]]) for i in range(len(s))]


def _sdf(shape: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (image-side units, <0 inside) for a batch of shapes centred at 0.

    shape/r: (B, 1, 1); px/py: (B, H, W) coordinates relative to the centre.
    """
    circle = torch.sqrt(px * px + py * py) - r
    square = torch.maximum(px.abs(), py.abs()) - r
    # isosceles triangle pointing up: apex (0, -r), base y = +r from x = -r to x = r
    # inside: 2|x| - y - r <= 0 (the two sides) and y - r <= 0 (the base); max of half-planes
    n = 1.0 / np.sqrt(5.0)
    side = (2.0 * px.abs() - py - r) * n
    base = py - r
    triangle = torch.maximum(side, base)
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def render(s: Scenes, res: int = 128, device: str | torch.device = "cpu") -> torch.Tensor:
    """Render scenes to a float tensor (B, 3, res, res) in [0, 1]."""
    B = len(s)
    dev = torch.device(device)
    palette = torch.tensor([COLORS[c] for c in COLOR_NAMES], device=dev)
    bg_pal = torch.tensor([BACKGROUNDS[b] for b in BG_NAMES], device=dev)
    centers = torch.tensor([POSITIONS[p] for p in POS_NAMES], device=dev)
    radii = torch.tensor([SIZES[z] for z in SIZE_NAMES], device=dev)
    coords = (torch.arange(res, device=dev, dtype=torch.float32) + 0.5) / res
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    img = bg_pal[torch.as_tensor(s.bg, device=dev)][:, :, None, None].expand(B, 3, res, res).clone()
    n_obj = torch.as_tensor(s.n_obj, device=dev)
    for k in range(2):
        shape = torch.as_tensor(s.shape[:, k], device=dev)[:, None, None]
        r = radii[torch.as_tensor(s.size[:, k], device=dev)][:, None, None]
        c = centers[torch.as_tensor(s.pos[:, k], device=dev)] + torch.as_tensor(
            s.jitter[:, k], device=dev, dtype=torch.float32
        )
        d = _sdf(shape, xx[None] - c[:, 0, None, None], yy[None] - c[:, 1, None, None], r)
        alpha = (0.5 - d * res).clamp(0.0, 1.0)  # 1-pixel anti-aliasing
        alpha = alpha * (n_obj > k).float()[:, None, None]
        col = palette[torch.as_tensor(s.color[:, k], device=dev)][:, :, None, None]
        img = img * (1 - alpha[:, None]) + col * alpha[:, None]
    return img


def batch(n: int, seed: int | np.random.Generator = 0, res: int = 128, device="cpu", p_two: float = 0.5):
    """Convenience: (images (B,3,res,res) in [0,1], captions)."""
    s = sample_scenes(n, seed, p_two=p_two)
    return render(s, res, device), captions(s)


# ----------------------------------------------------------------------------------------------
# Analysis helpers (used by tests on generator output and on generated images)
# ----------------------------------------------------------------------------------------------


def to_array(img) -> np.ndarray:
    """PIL image / uint8 array / float tensor (3,H,W) -> float32 array (H, W, 3) in [0, 1]."""
    if isinstance(img, torch.Tensor):
        return img.detach().float().cpu().permute(1, 2, 0).numpy()
    a = np.asarray(img)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    return a[..., :3].astype(np.float32)


def estimate_background(a: np.ndarray) -> np.ndarray:
    """Median colour of the 2-pixel border."""
    h, w, _ = a.shape
    b = max(1, h // 64)
    sides = (a[:b], a[-b:], a[:, :b], a[:, -b:])
    border = np.concatenate([s.reshape(-1, 3) for s in sides])
    return np.median(border, axis=0)


def nearest(rgb: np.ndarray, table: dict[str, tuple]) -> str:
    names = list(table)
    cols = np.array([table[n] for n in names])
    return names[int(np.argmin(((cols - rgb[None]) ** 2).sum(1)))]


def foreground(a: np.ndarray, bg: np.ndarray | None = None, thresh: float = 0.25) -> np.ndarray:
    if bg is None:
        bg = estimate_background(a)
    return np.sqrt(((a - bg[None, None]) ** 2).sum(-1)) > thresh


def analyze_single(img) -> dict:
    """Describe the (assumed single) object of an image: colour, shape, side, size, background.

    Returns a dict with keys bg, color, shape, cx, cy (centroid in [0, 1]), area (fraction of image),
    fill (area / bounding-box area) or ``{"found": False}`` when there is no foreground.
    """
    a = to_array(img)
    h, w, _ = a.shape
    bgc = estimate_background(a)
    fg = foreground(a, bgc)
    if fg.sum() < max(4, h * w // 2000):
        return {"found": False, "bg": nearest(bgc, BACKGROUNDS)}
    # keep the core of the object for colour (avoid anti-aliased rims)
    core = fg & (np.sqrt(((a - bgc[None, None]) ** 2).sum(-1)) > 0.5 * np.sqrt(((a[fg] - bgc) ** 2).sum(-1)).max())
    col = np.median(a[core if core.sum() > 0 else fg], axis=0)
    ys, xs = np.nonzero(fg)
    # robust bounding box (ignore stray pixels)
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    box = max(1.0, (x1 - x0 + 1) * (y1 - y0 + 1))
    crop = fg[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].astype(np.float32)
    fill = float(crop.sum() / box)
    ch, cw = crop.shape
    # upward triangle: the top half of its box holds 1/4 of its area (circle, square: 1/2)
    top = float(crop[: ch // 2].sum() / max(1.0, crop.sum()))
    # square: its box corners are filled (circle, triangle top corners: empty)
    k = max(1, int(round(0.2 * min(ch, cw))))
    corners = float(np.mean([crop[:k, :k].mean(), crop[:k, -k:].mean(), crop[-k:, :k].mean(), crop[-k:, -k:].mean()]))
    if top < 0.38:
        shape = "triangle"
    elif corners > 0.6:
        shape = "square"
    else:
        shape = "circle"
    return {
        "found": True,
        "bg": nearest(bgc, BACKGROUNDS),
        "color": nearest(col, COLORS),
        "rgb": col,
        "shape": shape,
        "fill": fill,
        "top": top,
        "corners": corners,
        "cx": float(xs.mean() + 0.5) / w,
        "cy": float(ys.mean() + 0.5) / h,
        "area": float(fg.sum()) / (h * w),
        "extent": float(max(x1 - x0 + 1, y1 - y0 + 1)) / max(h, w),  # ~0.2 small, ~0.36 large
    }


def side_of(cx: float, cy: float) -> str:
    """Name of the region a centroid lies in (left/right/top/bottom/center)."""
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.125:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def save_grid(images: torch.Tensor, path: str, ncol: int = 8) -> None:
    from PIL import Image

    B, _, H, W = images.shape
    nrow = (B + ncol - 1) // ncol
    grid = torch.ones(3, nrow * (H + 2), ncol * (W + 2))
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[:, r * (H + 2) : r * (H + 2) + H, c * (W + 2) : c * (W + 2) + W] = images[i].float().cpu().clamp(0, 1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_flux.data", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--out", default="/tmp/tinyflux_data.png")
    args = ap.parse_args()
    imgs, caps = batch(args.n, args.seed, args.res)
    save_grid(imgs, args.out)
    for i, c in enumerate(caps):
        print(i, c)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
