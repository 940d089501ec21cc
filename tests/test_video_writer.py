"""The lab's video file: H.264 mp4 through imageio-ffmpeg, else PyAV, else VP8 WebM through OpenCV, else a message
that names the packages and the fix (the H100 image of run 1 had no imageio-ffmpeg, and every video request ended
in "internal error")."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
from PIL import Image

import app
import tiny
import tiny_video
from lab import methods as LM
from lab import models as M
from lab import video as VID
from lab.session import Session


def _frames(n=5, size=(64, 48)):
    """A bright square moving right on black, so a re-read can check the motion."""
    out = []
    for i in range(n):
        a = np.zeros((size[1], size[0], 3), np.uint8)
        a[16:32, 4 + 8 * i:20 + 8 * i] = (255, 255, 255)
        out.append(Image.fromarray(a))
    return out


def _hide(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` raises ImportError


def test_imageio_ffmpeg_writes_an_h264_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio

    path = VID.write_video(_frames(), 8, str(tmp_path / "v"))
    assert path.endswith(".mp4")
    got = imageio.mimread(path)
    assert len(got) == 5 and got[0].shape == (48, 64, 3)
    import imageio_ffmpeg

    meta = next(imageio_ffmpeg.read_frames(path))
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")  # what browsers play
    sent = [np.asarray(f, dtype=float) for f in _frames()]
    assert max(np.abs(np.asarray(g, dtype=float) - f).mean() for g, f in zip(got, sent)) < 12  # the frames, lossy


def test_without_imageio_ffmpeg_opencv_writes_a_vp8_webm_that_reads_back(tmp_path, monkeypatch):
    if importlib.util.find_spec("cv2") is None:
        pytest.skip("opencv-python-headless is not installed (requirements-test.txt has it)")
    import cv2

    _hide(monkeypatch, "imageio_ffmpeg", "av")
    path = VID.write_video(_frames(), 8, str(tmp_path / "v"))
    assert path.endswith(".webm") and os.path.getsize(path) > 0
    cap = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert cap.get(cv2.CAP_PROP_FOURCC) and len(frames) == 5 and frames[0].shape == (48, 64, 3)
    # the square moves right: its column of brightest mass grows frame by frame
    cols = [int(np.argmax(f.mean(axis=(0, 2)))) for f in frames]
    assert cols == sorted(cols) and cols[-1] > cols[0]


def test_without_any_writer_the_message_names_the_packages_and_the_fix(tmp_path, monkeypatch):
    _hide(monkeypatch, "imageio_ffmpeg", "av", "cv2")
    with pytest.raises(VID.VideoWriteError) as e:
        VID.write_video(_frames(), 8, str(tmp_path / "v"))
    msg = str(e.value)
    assert "imageio-ffmpeg" in msg and "pip install imageio-ffmpeg" in msg and "opencv-python-headless" in msg
    assert not list(tmp_path.iterdir())


def test_a_video_run_without_any_writer_shows_its_frames_and_the_fix_not_an_internal_error(monkeypatch):
    _hide(monkeypatch, "imageio_ffmpeg", "av", "cv2")
    lab = app.Lab(M.ModelManager(factory=lambda p: tiny_video.tiny_video_pipe() if p.is_video else
                                 tiny.tiny_flux_pipe()), every_s=0.2)
    ups = list(lab.generate(Session(), model=M.TINY_VIDEO, prompt="a red circle", method=LM.SPECA, steps=6, width=64,
                            height=64, frames=9, guidance=6.0, compare=False))
    out = dict(zip(app.OUTPUTS, ups[-1]))
    assert out["video"] is None and not any(f.endswith((".mp4", ".webm")) for f in out["files"])
    assert out["image"].size == (64 * 3, 64)  # the strip of frames is shown all the same
    assert "video file was not written" in out["summary"] and "pip install imageio" in out["summary"]
    assert "internal error" not in out["summary"]
