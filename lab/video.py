"""Video helpers of the lab: latent frames -> PIL frames, a strip of frames, and the video writer
(H.264 mp4 through imageio-ffmpeg or PyAV, else VP8 WebM through OpenCV).

HunyuanVideo latents are unpacked already: (B, C, F, h, w), F = (num_frames - 1) // 4 + 1 latent frames.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from .errors import LabError

log = logging.getLogger("speclab")


def latent_frames(previewer, latents: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """(B, C, F, h, w) latents -> one preview image per latent frame (first sample), resized to `size`."""
    lat = latents[:1]
    return [previewer.to_image(lat[:, :, f], size) for f in range(lat.shape[2])]


def to_pil_frames(video) -> list[Image.Image]:
    """The pipeline's `output_type="np"` video (B, F, H, W, 3) in [0, 1] (or a list of PIL frames) -> PIL frames
    of the first sample."""
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], Image.Image):
        return list(video)
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], (list, tuple)):
        return list(video[0])
    a = np.asarray(video[0] if getattr(video, "ndim", 0) == 5 else video, dtype=np.float32)
    return [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in a]


def pick(frames: list, n: int = 8) -> list:
    """At most `n` evenly spaced frames (first and last included)."""
    if len(frames) <= n:
        return list(frames)
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]


def strip(frames: list[Image.Image], n: int = 8) -> Image.Image:
    """Up to `n` evenly spaced frames side by side (what the image panels and the difference map show)."""
    sel = pick(frames, n)
    w, h = sel[0].size
    out = Image.new("RGB", (w * len(sel), h))
    for i, f in enumerate(sel):
        out.paste(f.convert("RGB").resize((w, h)), (i * w, 0))
    return out


class VideoWriteError(LabError):
    """No video writer could write the file: the message names the package to install."""


NO_WRITER = ("the video file was not written: this server has no video encoder. Install imageio-ffmpeg "
             "(`pip install imageio-ffmpeg`, H.264 mp4), or PyAV (`pip install av`), or opencv-python-headless "
             "(`pip install opencv-python-headless`, VP8 WebM); the frames are shown above all the same")


def _even(arr: list[np.ndarray]) -> list[np.ndarray]:
    """H.264 and VP8 want even sizes; the lab's sizes are multiples of 16 anyway, but odd input must not fail."""
    h, w = arr[0].shape[:2]
    return [a[: h - h % 2, : w - w % 2] for a in arr] if h % 2 or w % 2 else arr


X264_PRESET = "veryfast"
"""libx264's speed preset for the lab's mp4 (imageio-ffmpeg). 33 frames of 544x960 on this project's 2-core CPU:
0.31 s at "veryfast" against 0.59 s at x264's default "medium", files of the same size (81 vs 80 kB), and 2.7 s
through diffusers' `export_to_video`, which converts every frame to float and back first."""


def _imageio_ffmpeg(frames: list[np.ndarray], fps: int, stem: str) -> str:
    """H.264 mp4 (yuv420p, which browsers play) through imageio-ffmpeg's own ffmpeg binary, fed the uint8 frames."""
    import imageio_ffmpeg

    path = stem + ".mp4"
    h, w = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=float(fps), codec="libx264", pix_fmt_out="yuv420p",
                                         output_params=["-preset", X264_PRESET], macro_block_size=2)
    writer.send(None)  # starts ffmpeg
    try:
        for f in frames:
            writer.send(np.ascontiguousarray(f))
    finally:
        writer.close()
    return path


def _pyav(frames: list[np.ndarray], fps: int, stem: str) -> str:
    """H.264 mp4 through PyAV (its wheels carry FFmpeg)."""
    import av

    path = stem + ".mp4"
    with av.open(path, mode="w") as box:
        stream = box.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=int(fps))
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return path


def _opencv(frames: list[np.ndarray], fps: int, stem: str) -> str:
    """VP8 WebM through OpenCV (opencv-python's FFmpeg has libvpx but no H.264 encoder; browsers play VP8 WebM,
    not the MPEG-4 part 2 of OpenCV's 'mp4v')."""
    import cv2

    path = stem + ".webm"
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"VP80"), float(fps), (w, h))
    if not writer.isOpened():
        raise RuntimeError("OpenCV's FFmpeg has no VP8 encoder")
    try:
        for f in frames:
            writer.write(np.ascontiguousarray(f[:, :, ::-1]))  # OpenCV takes BGR
    finally:
        writer.release()
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise RuntimeError("OpenCV wrote an empty file")
    return path


WRITERS = (("imageio-ffmpeg", _imageio_ffmpeg), ("av", _pyav), ("opencv-python-headless", _opencv))
"""Tried in order: the first that is installed and works writes the file."""


def write_video(frames: list[Image.Image], fps: int = 8, stem: str | None = None) -> str:
    """Write `frames` as a video a browser plays: an H.264 mp4 (imageio-ffmpeg, else PyAV), else a VP8 WebM
    (OpenCV); returns the path (`stem` + the writer's extension). `VideoWriteError` (its message names the
    packages and the fix) when none of them is installed or works."""
    if stem is None:
        stem = os.path.join(tempfile.mkdtemp(prefix="speclab_video_"), "speclab")
    arr = _even([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])
    failed = []
    for name, writer in WRITERS:
        try:
            return writer(arr, fps, stem)
        except ImportError:
            failed.append(f"{name}: not installed")
        except Exception as e:  # noqa: BLE001  installed but unable (e.g. no ffmpeg binary, no encoder)
            failed.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    log.warning("no video writer worked: %s", "; ".join(failed))
    raise VideoWriteError(NO_WRITER)


def write_mp4(frames: list[Image.Image], fps: int = 8, path: str | None = None) -> str:
    """`write_video` with a path ending in ".mp4" (the extension the writer picks replaces it)."""
    return write_video(frames, fps, None if path is None else os.path.splitext(path)[0])


def decode_video(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """(B, C, F, h, w) latents -> the pipeline's own VAE decode as PIL frames (what `output_type="np"` gives)."""
    vae = pipe.vae
    p = next(vae.parameters())
    with torch.no_grad():
        v = vae.decode(latents.to(p.device, p.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return to_pil_frames(pipe.video_processor.postprocess_video(v, output_type="np"))
